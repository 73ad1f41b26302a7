//! `openvla finetune --head l1 --aux-environment-state W`: the auxiliary head on the dataset's
//! privileged environment state (object and goal positions) adds `W · mean |e - ê|` to the L1
//! loss and nothing else; its gradient reaches the trunk, resumes only with the same weight, leaves the exported
//! policy as it was, and is refused where it cannot apply.

mod common;

use common::root;
use openvla::init::{write_initialized, InitConfig, InitOptions};
use openvla::synth::SavedDtype;
use openvla_train::cli::{run_finetune, FinetuneArgs, HeadArg};
use openvla_train::log::read_metrics;
use std::path::{Path, PathBuf};

/// One SigLIP-like tower at 32 px (4 patches), Llama 16 x 2, the L1 head with chunk 4,
/// action dim 4 and proprio 4: the Meta-World demos' shapes, tiny.
const SHAPE: &str = r#"
[vision]
image_size = 32
[[vision.towers]]
kind = "siglip"
width = 16
depth = 3
heads = 2
patch_size = 16
[llm]
width = 16
depth = 2
heads = 2
intermediate = 40
tie_word_embeddings = true
[head]
kind = "l1"
chunk = 4
action_dim = 4
proprio_dim = 4
images = 1
"#;

/// Two reach and two push demonstrations with `observation.environment_state`.
fn metaworld_env() -> PathBuf {
    root().join("testdata/data/lerobot/metaworld_env")
}

fn init_model(dir: &Path) -> PathBuf {
    let model = dir.join("init");
    let cfg = InitConfig::from_toml(SHAPE, Path::new("aux_objective.rs")).unwrap();
    write_initialized(
        &model,
        &cfg,
        &InitOptions {
            seed: 3,
            dtype: SavedDtype::F32,
            tokenizer: root().join("models/openvla-tiny/tokenizer.json"),
            stats: None,
            max_shard_bytes: u64::MAX,
        },
        &|_, _| {},
    )
    .unwrap();
    model
}

/// `openvla finetune` on the Meta-World fixture from `model`, parsed from flags as the CLI
/// parses them (every other setting at its default): full training of the L1 head with
/// chunks of 4 and proprio, no augmentation, a constant learning rate.
fn args(model: &Path, out: &Path, aux: Option<f64>, steps: u64) -> FinetuneArgs {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        a: FinetuneArgs,
    }
    let steps = steps.to_string();
    let mut flags = vec![
        "finetune".to_string(),
        format!("--model={}", model.display()),
        format!("--data={}", metaworld_env().display()),
        format!("--out={}", out.display()),
    ];
    for f in [
        "--mode=full",
        "--head=l1",
        "--chunk=4",
        "--proprio",
        "--lr=3e-3",
        "--weight-decay=0",
        "--batch-size=4",
        "--shuffle-buffer=64",
        "--image-aug=false",
        "--seed=5",
        "--no-memory-check",
        "--export-dtype=float32",
        "--lr-schedule=constant",
        "--warmup-steps=0",
        "--keep-last=0",
    ] {
        flags.push(f.into());
    }
    flags.push(format!("--max-steps={steps}"));
    flags.push(format!("--save-interval={steps}"));
    if let Some(w) = aux {
        flags.push(format!("--aux-environment-state={w}"));
    }
    <Cli as clap::Parser>::try_parse_from(flags)
        .expect("the test's flags parse")
        .a
}

#[test]
fn the_aux_term_is_its_weight_times_its_l1_and_reaches_the_trunk() {
    let tmp = tempfile::tempdir().unwrap();
    let model = init_model(tmp.path());
    let plain = run_finetune(&args(&model, &tmp.path().join("plain"), None, 2)).unwrap();
    let weight = 2.5;
    let aux_out = tmp.path().join("aux");
    let aux = run_finetune(&args(&model, &aux_out, Some(weight), 2)).unwrap();
    let p = read_metrics(&tmp.path().join("plain/metrics.jsonl")).unwrap();
    let m = read_metrics(&aux_out.join("metrics.jsonl")).unwrap();
    assert!(p.iter().all(|r| r.aux_l1_loss.is_none()));
    // Step 1 is the same model on the same batch: the action terms agree, and the loss grows
    // by exactly the weighted auxiliary L1.
    assert_eq!(
        p[0].action_l1_loss, m[0].action_l1_loss,
        "action L1 at step 1"
    );
    assert_eq!(p[0].next_actions_l1_loss, m[0].next_actions_l1_loss);
    let aux_l1 = m[0].aux_l1_loss.expect("the aux run logs its L1");
    assert!(aux_l1 > 0.05, "{aux_l1}");
    let want = p[0].loss + weight * aux_l1;
    assert!(
        (m[0].loss - want).abs() <= 1e-5 * want,
        "loss {} != {} + {weight} * {aux_l1}",
        m[0].loss,
        p[0].loss
    );
    // The curves plot it (and only for the aux run).
    let svg = |d: &Path| std::fs::read_to_string(d.join("curves.svg")).unwrap();
    assert!(svg(&aux_out).contains("environment-state L1"));
    assert!(!svg(&tmp.path().join("plain")).contains("environment-state L1"));
    // Its gradient reaches the shared trunk: after one update the action L1 on the same
    // second batch differs from the plain run's.
    let (a2, p2) = (m[1].action_l1_loss.unwrap(), p[1].action_l1_loss.unwrap());
    assert!((a2 - p2).abs() > 1e-6, "step 2 action L1 {a2} == {p2}");
    // The head is trained and checkpointed (so a resumed run continues it).
    let ck = candle_core::safetensors::load(
        aux_out.join("checkpoints/step-00000002/params.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let w = &ck["aux_head.fc.weight"];
    assert_eq!(w.dims(), [6, 4 * 16]);
    assert!(ck.contains_key("aux_head.fc.bias"));
    // The exported policy is the plain model's shape: the same files, no auxiliary tensors.
    let names = |dir: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let (pd, ad) = (
        plain.model_dir.clone().unwrap(),
        aux.model_dir.clone().unwrap(),
    );
    assert_eq!(names(&pd), names(&ad));
    let tensors =
        candle_core::safetensors::load(ad.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    assert!(!tensors.is_empty());
    assert!(tensors.keys().all(|n| !n.contains("aux")));
    // The run's statistics carry the environment state's bounds.
    let stats: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(aux_out.join("dataset_statistics.json")).unwrap(),
    )
    .unwrap();
    let entry = stats.as_object().unwrap().values().next().unwrap();
    assert_eq!(
        entry["environment_state"]["q01"].as_array().unwrap().len(),
        6
    );
    // Resuming with another weight (or none) is refused: the fingerprint records it.
    for other in [None, Some(1.0)] {
        let mut r = args(&model, &aux_out, other, 3);
        r.resume = true;
        let e = run_finetune(&r).unwrap_err().to_string();
        assert!(e.contains("different settings"), "{other:?}: {e}");
    }
}

#[test]
fn aux_flag_errors_are_clear() {
    let tmp = tempfile::tempdir().unwrap();
    let model = init_model(tmp.path());
    let err = |a: &FinetuneArgs| {
        openvla_train::cli::prepare_finetune(a)
            .unwrap_err()
            .to_string()
    };
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let a = args(&model, &tmp.path().join("w"), Some(bad), 1);
        let e = err(&a);
        assert!(
            e.contains("--aux-environment-state") && e.contains("positive"),
            "{bad}: {e}"
        );
    }
    // Only with the L1 objective.
    let mut a = args(&model, &tmp.path().join("h"), Some(1.0), 1);
    a.head = HeadArg::Bins256;
    a.chunk = None;
    a.proprio = false;
    let e = err(&a);
    assert!(
        e.contains("--aux-environment-state") && e.contains("--head l1"),
        "{e}"
    );
    // A dataset without the column.
    let mut a = args(&model, &tmp.path().join("d"), Some(1.0), 1);
    a.data = root().join("testdata/data/lerobot/tiny_libero");
    let e = err(&a);
    assert!(
        e.contains("records no environment state") && e.contains("observation.environment_state"),
        "{e}"
    );
}
