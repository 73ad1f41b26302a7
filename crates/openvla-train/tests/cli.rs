//! `openvla merge` end to end (merged directory loads in the engine and predicts what the
//! reference's merged model predicts) and `openvla finetune`'s checks.

mod common;

use candle_core::{DType, Device};
use common::*;
use openvla_train::cli::{
    prepare_finetune, run_finetune, run_merge, FinetuneArgs, MergeArgs, RecipeArg,
};
use openvla_train::io::read_safetensors;
use openvla_train::{TrainError, TrainMode};
use std::path::{Path, PathBuf};

fn merge_args(out: &Path) -> MergeArgs {
    MergeArgs {
        model: tiny_model(),
        adapter: td().join("lora_step1"),
        out: out.to_path_buf(),
        dataset_statistics: None,
        recipe: RecipeArg::Bf16Reference,
        max_shard_gb: 5.0,
    }
}

#[test]
fn merged_directory_matches_reference_and_predicts_the_same_actions() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let report = run_merge(&merge_args(&out)).unwrap();
    assert_eq!(report.changed.len(), 57);
    assert_eq!(report.shards, vec![out.join("model.safetensors")]);
    assert_files(
        &out,
        &[
            "config.json",
            "tokenizer.json",
            "preprocessor_config.json",
            "dataset_statistics.json",
        ],
    );
    // Every tensor equals the reference's merged_model: the changed ones (subset stored) and
    // the unchanged ones (= base).
    let merged = read_safetensors(&out.join("model.safetensors"), &Device::Cpu).unwrap();
    let base = read_safetensors(&tiny_model().join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(merged.len(), base.len());
    let subset =
        read_safetensors(&td().join("merged_bf16_subset.safetensors"), &Device::Cpu).unwrap();
    let bits = |t: &candle_core::Tensor| -> Vec<u16> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<half::bf16>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    };
    for (k, t) in &merged {
        assert_eq!(t.dtype(), DType::BF16);
        if let Some(w) = subset.get(k) {
            assert_eq!(bits(t), bits(w), "{k}");
        } else if k == "language_model.lm_head.weight" {
            for (key, rows) in [("[2:3]", (2, 1)), ("[31744:32000]", (31744, 256))] {
                let w = &subset[&format!("{k}{key}")];
                assert_eq!(
                    bits(&t.narrow(0, rows.0, rows.1).unwrap()),
                    bits(w),
                    "{k}{key}"
                );
            }
        } else {
            assert_eq!(bits(t), bits(&base[k]), "{k} must be unchanged");
        }
    }
    // The engine loads it and predicts the reference's merged-model actions.
    let policy = openvla::Policy::load(
        &out,
        &openvla::LoadOptions {
            precision: openvla::Precision::F32,
            ..Default::default()
        },
    )
    .unwrap();
    let image = openvla_image::open(&root().join("testdata/openvla-tiny/s0_image.png")).unwrap();
    let exp = expected();
    let want = &exp["predict_action_merged"];
    let obs = openvla::Observation::new(image, "pick up the red block");
    let pred = policy
        .predict(
            &[obs],
            Some(exp["predict_action_unnorm_key"].as_str().unwrap()),
        )
        .unwrap();
    let ids: Vec<u64> = pred[0].token_ids.iter().map(|&x| x as u64).collect();
    let want_ids: Vec<u64> = want["generated_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(ids, want_ids);
    for (a, b) in pred[0]
        .action()
        .iter()
        .zip(want["actions"].as_array().unwrap())
    {
        assert!((a - b.as_f64().unwrap()).abs() < 1e-12, "{a} vs {b}");
    }
    // A second merge into the same directory is refused.
    let e = run_merge(&merge_args(&out)).unwrap_err().to_string();
    assert!(e.contains("not empty"), "{e}");
}

#[test]
fn merge_shards_and_writes_given_statistics() {
    let tmp = tempfile::tempdir().unwrap();
    let stats = tmp.path().join("stats.json");
    std::fs::write(
        &stats,
        r#"{"my_robot": {"action": {"q01": [0,0,0,0,0,0,0], "q99": [1,1,1,1,1,1,1],
            "mask": [true,true,true,true,true,true,false]}, "num_transitions": 5, "num_trajectories": 1}}"#,
    )
    .unwrap();
    let out = tmp.path().join("m");
    let mut args = merge_args(&out);
    args.dataset_statistics = Some(stats);
    args.max_shard_gb = 0.004; // 4 MB shards
    args.recipe = RecipeArg::Float32;
    let report = run_merge(&args).unwrap();
    assert!(report.shards.len() >= 2, "{:?}", report.shards);
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(index["weight_map"].as_object().unwrap().len(), 156);
    let s: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("dataset_statistics.json")).unwrap(),
    )
    .unwrap();
    assert!(s.get("my_robot").is_some());
    // Loads in the engine (sharded) with the new statistics.
    let policy = openvla::Policy::load(&out, &openvla::LoadOptions::default()).unwrap();
    drop(policy);
    // Bad statistics and a missing adapter are clear errors.
    std::fs::write(
        tmp.path().join("bad.json"),
        r#"{"x": {"action": {"q01": [0], "q99": [1, 2]}}}"#,
    )
    .unwrap();
    let mut bad = merge_args(&tmp.path().join("m2"));
    bad.dataset_statistics = Some(tmp.path().join("bad.json"));
    assert!(run_merge(&bad).unwrap_err().to_string().contains("q99"));
    let mut bad = merge_args(&tmp.path().join("m3"));
    bad.adapter = tmp.path().to_path_buf();
    assert!(run_merge(&bad)
        .unwrap_err()
        .to_string()
        .contains("adapter_config.json"));
}

fn finetune_args(model: &Path, out: &Path) -> FinetuneArgs {
    FinetuneArgs {
        model: model.to_path_buf(),
        data: root().join("testdata/data/rlds/bridge_orig"),
        dataset: None,
        dataset_config: None,
        out: out.to_path_buf(),
        mode: TrainMode::Lora,
        lora_rank: 32,
        lora_alpha: None,
        lora_dropout: 0.0,
        target_modules: "all-linear".into(),
        lr: 5e-4,
        weight_decay: 0.01,
        batch_size: 2,
        grad_accumulation: 1,
        max_steps: 10,
        save_interval: 5,
        keep_last: 1,
        image_aug: true,
        shuffle_buffer: 1000,
        checkpointing: false,
        seed: 7,
        precision: openvla_train::cli::Precision::F32,
        compute: Default::default(),
        resume: false,
        max_memory_gb: None,
        no_memory_check: false,
        export_dtype: Default::default(),
        export_max_shard_gb: 5.0,
        export_checkpoints: false,
        lr_schedule: openvla_train::schedule::LrScheduleKind::Constant,
        warmup_steps: 0,
        head: openvla_train::cli::HeadArg::Bins256,
        chunk: None,
        images: "primary".into(),
        proprio: false,
        normalization: openvla_train::cli::NormalizationArg::BoundsQ99,
        aux_environment_state: None,
    }
}

#[test]
fn finetune_prepares_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let args = finetune_args(&tiny_model(), &out);
    let plan = prepare_finetune(&args).unwrap();
    assert_eq!(plan.dataset_name, "bridge_orig");
    assert_eq!(plan.action_dim, 7);
    let lora = plan.lora.as_ref().unwrap();
    assert_eq!((lora.r, lora.lora_alpha), (32, 16.0));
    assert_eq!(plan.lora_modules, 57);
    assert!(out.join("run.json").is_file());
    assert_eq!(
        plan.experiment_id,
        "openvla-tiny+bridge_orig+b2+lr-0.0005+lora-r32+dropout-0.0--image_aug"
    );
    // The real model trains: 2 steps of LoRA r=4 on the tiny OpenVLA.
    let mut run = args.clone();
    run.out = tmp.path().join("run2");
    run.lora_rank = 4;
    run.max_steps = 2;
    run.save_interval = 1;
    let rep = run_finetune(&run).unwrap();
    assert_eq!((rep.outcome.step, rep.outcome.resumed_from), (2, 0));
    assert_eq!(
        rep.trainable_params, 169112,
        "the fixture's LoRA r=4 parameter count"
    );
    let last = rep.last.unwrap();
    assert_eq!(last.step, 2);
    assert!(last.loss.is_finite() && last.action_accuracy.is_some());
    let adapter = rep.adapter_dir.unwrap();
    assert!(adapter.join("adapter_model.safetensors").is_file());
    assert!(run
        .out
        .join("checkpoints/step-00000002/state.json")
        .is_file());
    // --resume without checkpoints.
    let mut r = args.clone();
    r.resume = true;
    assert!(prepare_finetune(&r)
        .unwrap_err()
        .to_string()
        .contains("no complete checkpoint"));
}

/// `--compute bf16` (the linears' products in bf16 arithmetic) trains the same run within bf16's
/// precision of float32, and is part of the run's settings: a resume with another arithmetic is
/// refused.
#[test]
fn finetune_in_bf16_arithmetic_tracks_f32_and_is_checked_on_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let mut args = finetune_args(&tiny_model(), &tmp.path().join("f32"));
    args.lora_rank = 4;
    args.max_steps = 2;
    args.save_interval = 1;
    let losses = |args: &FinetuneArgs| -> Vec<f64> {
        run_finetune(args).unwrap();
        openvla_train::log::read_metrics(&args.out.join("metrics.jsonl"))
            .unwrap()
            .iter()
            .map(|r| r.loss)
            .collect()
    };
    let exact = losses(&args);
    let mut bf16 = args.clone();
    bf16.out = tmp.path().join("bf16");
    bf16.compute = openvla::kernels::ComputePrecision::Bf16;
    let rounded = losses(&bf16);
    assert_eq!((exact.len(), rounded.len()), (2, 2));
    for (a, b) in exact.iter().zip(&rounded) {
        assert!(
            a != b,
            "bf16 arithmetic gave float32's loss {a} bit for bit"
        );
        assert!(
            ((a - b) / a).abs() < 0.02,
            "bf16 arithmetic loss {b} is not within 2 % of float32's {a}"
        );
    }
    let mut resume = bf16.clone();
    resume.resume = true;
    resume.max_steps = 3;
    resume.compute = openvla::kernels::ComputePrecision::F32;
    let e = run_finetune(&resume).unwrap_err().to_string();
    assert!(
        e.contains("different settings") && e.contains("bf16"),
        "{e}"
    );
}

#[test]
fn finetune_rejects_bad_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let base = finetune_args(&tiny_model(), tmp.path());
    type Edit = Box<dyn Fn(&mut FinetuneArgs)>;
    let cases: Vec<(Edit, &str)> = vec![
        (Box::new(|a| a.lora_rank = 0), "--lora-rank"),
        (Box::new(|a| a.lr = -1.0), "--lr"),
        (Box::new(|a| a.lora_dropout = 1.0), "--lora-dropout"),
        (Box::new(|a| a.batch_size = 0), "--batch-size"),
        (Box::new(|a| a.save_interval = 0), "--save-interval"),
        (
            Box::new(|a| a.export_max_shard_gb = 0.0),
            "--export-max-shard-gb",
        ),
        (
            Box::new(|a| a.target_modules = " , ".into()),
            "--target-modules",
        ),
        (
            Box::new(|a| {
                a.mode = TrainMode::Full;
                a.lora_alpha = Some(8.0)
            }),
            "only apply to --mode lora",
        ),
        (
            Box::new(|a| a.target_modules = "nonexistent".into()),
            "match no Linear",
        ),
        (
            Box::new(|a| a.target_modules = "embed_tokens".into()),
            "Embedding",
        ),
        (
            Box::new(|a| a.model = PathBuf::from("/nonexistent")),
            "config.json",
        ),
        (
            Box::new(|a| a.export_checkpoints = true),
            "--export-checkpoints exports the full model",
        ),
        (
            Box::new(|a| {
                a.lr_schedule = openvla_train::schedule::LrScheduleKind::Cosine;
                a.warmup_steps = a.max_steps;
            }),
            "must be smaller than --max-steps",
        ),
    ];
    for (f, want) in cases {
        let mut a = base.clone();
        f(&mut a);
        let e = prepare_finetune(&a).unwrap_err().to_string();
        assert!(e.contains(want), "expected {want:?} in {e:?}");
    }
}

#[test]
fn finetune_rejects_action_dimension_mismatch() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for f in std::fs::read_dir(tiny_model()).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), model.join(f.file_name())).unwrap();
    }
    std::fs::write(
        model.join("dataset_statistics.json"),
        r#"{"six_dof": {"action": {"q01": [0,0,0,0,0,0], "q99": [1,1,1,1,1,1]}}}"#,
    )
    .unwrap();
    let args = finetune_args(&model, &tmp.path().join("run"));
    let e = prepare_finetune(&args).unwrap_err();
    assert!(matches!(e, TrainError::ActionDimMismatch(_)), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("7-dimensional") && msg.contains("6-dimensional"),
        "{msg}"
    );
}

#[test]
fn finetune_rejects_a_run_that_cannot_fit_in_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let mut args = finetune_args(&tiny_model(), &tmp.path().join("run"));
    args.mode = TrainMode::Full;
    args.batch_size = 64;
    args.max_memory_gb = Some(0.05);
    let e = prepare_finetune(&args).unwrap_err();
    assert!(matches!(e, TrainError::OutOfMemory(_)), "{e}");
    assert!(e.to_string().contains("--batch-size"), "{e}");
}
