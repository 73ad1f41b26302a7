//! `openvla finetune` in a non-LoRA mode ends with a complete HF model directory
//! (`<out>/model/`): it loads in the engine and predicts, its trained tensors are the trained
//! weights after the last step (the float32 `Var`s, as the last checkpoint's
//! `params.safetensors` stores them), every other tensor is the base's, bit for bit, and a
//! resumed run replaces it.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use openvla_train::cli::{prepare_finetune, run_finetune, FinetuneArgs, Precision};
use openvla_train::export::ExportDtype;
use openvla_train::io::read_safetensors;
use openvla_train::TrainMode;
use std::collections::BTreeMap;
use std::path::Path;

fn args(out: &Path, mode: TrainMode) -> FinetuneArgs {
    FinetuneArgs {
        model: tiny_model(),
        data: root().join("testdata/data/rlds/bridge_orig"),
        dataset: None,
        dataset_config: None,
        out: out.to_path_buf(),
        mode,
        lora_rank: 32,
        lora_alpha: None,
        lora_dropout: 0.0,
        target_modules: "all-linear".into(),
        lr: 2e-3,
        weight_decay: 0.01,
        batch_size: 2,
        grad_accumulation: 1,
        max_steps: 2,
        save_interval: 2,
        keep_last: 1,
        image_aug: false,
        shuffle_buffer: 16,
        checkpointing: false,
        seed: 7,
        precision: Precision::F32,
        compute: Default::default(),
        resume: false,
        max_memory_gb: None,
        no_memory_check: false,
        export_dtype: ExportDtype::Base,
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

/// Every tensor of a model directory (all shards) as raw (dtype, shape, bytes).
fn raw_model(dir: &Path) -> BTreeMap<String, Raw> {
    let mut out = BTreeMap::new();
    for shard in openvla_train::merge::model_shards(dir).unwrap() {
        out.extend(read_raw(&shard));
    }
    out
}

/// The trainable parameters after the last step, as the final checkpoint stores them.
fn trained_params(run: &Path, step: u64) -> BTreeMap<String, Tensor> {
    read_safetensors(
        &run.join(format!("checkpoints/step-{step:08}/params.safetensors")),
        &Device::Cpu,
    )
    .unwrap()
}

fn bf16_bytes(t: &Tensor) -> Vec<u8> {
    t.to_dtype(DType::BF16)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<half::bf16>()
        .unwrap()
        .iter()
        .flat_map(|x| x.to_bits().to_le_bytes())
        .collect()
}

fn f32_bytes(t: &Tensor) -> Vec<u8> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect()
}

/// bf16 bytes widened to float32 bytes (exact).
fn widen(bf16: &[u8]) -> Vec<u8> {
    bf16.chunks_exact(2)
        .flat_map(|c| {
            half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]]))
                .to_f32()
                .to_le_bytes()
        })
        .collect()
}

/// Greedy prediction of one observation.
fn predict(dir: &Path, key: &str) -> openvla::Prediction {
    let policy = openvla::Policy::load(
        dir,
        &openvla::LoadOptions {
            precision: openvla::Precision::F32,
            ..Default::default()
        },
    )
    .unwrap();
    let image = openvla_image::open(&root().join("testdata/openvla-tiny/s0_image.png")).unwrap();
    let obs = openvla::Observation::new(image, "pick up the red block");
    policy.predict(&[obs], Some(key)).unwrap().remove(0)
}

/// The exported directory has the files of a model, the run's statistics, and predicts
/// something else than the base (the weights moved).
fn check_loads_and_moved(model: &Path) {
    assert_files(
        model,
        &[
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "preprocessor_config.json",
            "dataset_statistics.json",
        ],
    );
    let stats: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(model.join("dataset_statistics.json")).unwrap(),
    )
    .unwrap();
    let keys: Vec<&String> = stats.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["bridge_orig"]);
    let tuned = predict(model, "bridge_orig");
    let base = predict(&tiny_model(), "fake_bridge_orig");
    assert_eq!(tuned.action().len(), 7);
    assert!(tuned.action().iter().all(|a| a.is_finite()));
    assert_ne!(tuned.token_ids, base.token_ids, "the weights moved");
    // Same statistics-free comparison: the normalized actions differ too.
    assert_ne!(tuned.normalized_action(), base.normalized_action());
}

#[test]
fn export_full_finetuning_as_a_loadable_model_and_replace_it_on_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let rep = run_finetune(&args(&run, TrainMode::Full)).unwrap();
    let model = run.join("model");
    assert_eq!(rep.model_dir.as_deref(), Some(model.as_path()));
    assert!(rep.adapter_dir.is_none());
    // One shard at the default 5 GB, base dtype (bf16) everywhere.
    assert!(model.join("model.safetensors").is_file());
    assert!(!model.join("model.safetensors.index.json").exists());
    let base = raw_model(&tiny_model());
    let exported = raw_model(&model);
    let trained = trained_params(&run, 2);
    assert_eq!(exported.len(), base.len());
    assert_eq!(trained.len(), base.len(), "full mode trains every tensor");
    let mut moved = 0;
    for (k, (dtype, shape, bytes)) in &exported {
        assert_eq!(dtype, "BF16", "{k}");
        assert_eq!(shape, &base[k].1, "{k}");
        assert_eq!(bytes, &bf16_bytes(&trained[k]), "{k}: the trained weights");
        moved += usize::from(bytes != &base[k].2);
    }
    // Every tensor on the loss path moved; the towers' unused last blocks did not.
    assert!(moved > 100, "only {moved} tensors moved");
    check_loads_and_moved(&model);

    // A new run cannot silently overwrite the export ...
    std::fs::remove_dir_all(run.join("checkpoints")).unwrap();
    let e = prepare_finetune(&args(&run, TrainMode::Full))
        .unwrap_err()
        .to_string();
    assert!(e.contains("exported model"), "{e}");

    // ... a resumed run replaces it with its own last step, leaving nothing else behind.
    let run2 = tmp.path().join("run2");
    let mut a = args(&run2, TrainMode::Full);
    a.max_steps = 1;
    a.save_interval = 1;
    run_finetune(&a).unwrap();
    let first = raw_model(&run2.join("model"));
    a.max_steps = 2;
    a.resume = true;
    let rep = run_finetune(&a).unwrap();
    assert_eq!((rep.outcome.resumed_from, rep.outcome.step), (1, 2));
    let second = raw_model(&run2.join("model"));
    let trained = trained_params(&run2, 2);
    for (k, (_, _, bytes)) in &second {
        assert_eq!(bytes, &bf16_bytes(&trained[k]), "{k}");
    }
    assert_ne!(first, second, "the resumed run's export replaced the first");
    let leftovers: Vec<String> = std::fs::read_dir(&run2)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(".model"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_finished_run_re_exports_in_bf16_with_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let mut a = args(&run, TrainMode::LastLayer);
    a.export_dtype = ExportDtype::Float32;
    run_finetune(&a).unwrap();
    assert!(raw_model(&run.join("model"))
        .values()
        .all(|(dtype, _, _)| dtype == "F32"));
    // Same run, same --max-steps: no step is taken, only the export is written again.
    a.resume = true;
    a.export_dtype = ExportDtype::Bf16;
    let rep = run_finetune(&a).unwrap();
    assert_eq!((rep.outcome.resumed_from, rep.outcome.step), (2, 2));
    let exported = raw_model(&rep.model_dir.unwrap());
    let base = raw_model(&tiny_model());
    let trained = trained_params(&run, 2);
    assert_eq!(exported.len(), base.len());
    for (k, (dtype, _, bytes)) in &exported {
        assert_eq!(dtype, "BF16", "{k}");
        match trained.get(k) {
            // The float32 weights of the last step, rounded once.
            Some(t) => assert_eq!(bytes, &bf16_bytes(t), "{k}"),
            // Untouched: the base's bf16 bits.
            None => assert_eq!(bytes, &base[k].2, "{k}"),
        }
    }
    check_loads_and_moved(&run.join("model"));
}

#[test]
fn export_last_layer_in_float32_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let mut a = args(&run, TrainMode::LastLayer);
    a.export_dtype = ExportDtype::Float32;
    a.export_max_shard_gb = 0.004; // 4 MB shards
    let rep = run_finetune(&a).unwrap();
    let model = rep.model_dir.unwrap();
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(model.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let shards = openvla_train::merge::model_shards(&model).unwrap();
    assert!(shards.len() >= 2, "{shards:?}");
    assert_eq!(index["weight_map"].as_object().unwrap().len(), 156);
    let base = raw_model(&tiny_model());
    let exported = raw_model(&model);
    let trained = trained_params(&run, 2);
    assert_eq!(exported.len(), base.len());
    let layers = openvla::ModelConfig::from_file(&tiny_model().join("config.json"))
        .unwrap()
        .text
        .num_hidden_layers;
    let last = format!("language_model.model.layers.{}.", layers - 1);
    let mut n_trained = 0;
    for (k, (dtype, _, bytes)) in &exported {
        assert_eq!(dtype, "F32", "{k}");
        let is_last_layer = k == "language_model.model.embed_tokens.weight"
            || k == "language_model.lm_head.weight"
            || k.starts_with(&last);
        assert_eq!(trained.contains_key(k), is_last_layer, "{k}");
        if let Some(t) = trained.get(k) {
            // Exactly the float32 weights after the last step.
            assert_eq!(bytes, &f32_bytes(t), "{k}");
            assert_ne!(bytes, &widen(&base[k].2), "{k} moved");
            n_trained += 1;
        } else {
            // Untouched: the base's bf16 bits, widened exactly.
            assert_eq!(bytes, &widen(&base[k].2), "{k}");
        }
    }
    assert_eq!(n_trained, trained.len());
    check_loads_and_moved(&model);
}
