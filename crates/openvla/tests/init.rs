//! `openvla::init`: freshly initialized directories of several shapes load in the engine and
//! predict; the initializations follow the reference's modules; the output is deterministic.

use candle_core::{DType, Device, Tensor};
use openvla::init::{write_initialized, InitConfig, InitOptions, InitSummary};
use openvla::model::linear::Weight;
use openvla::processor::RgbImage;
use openvla::synth::SavedDtype;
use openvla::{LoadOptions, Observation, Policy, Precision};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn tokenizer() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/openvla-tiny/tokenizer.json")
}

/// One SigLIP-like tower, 32 px / patch 16 (4 patches), tied embeddings, an L1 head with
/// chunk 3, action dim 2, proprio 5 and two images.
const L1_ONE_TOWER: &str = r#"
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
chunk = 3
action_dim = 2
proprio_dim = 5
images = 2
"#;

/// DINOv2-reg + SigLIP fused, 28 px / patch 14 (4 patches), untied, the 256-bin head.
const BINS_FUSED: &str = r#"
[vision]
image_size = 28
[[vision.towers]]
kind = "dinov2"
width = 8
depth = 2
heads = 2
patch_size = 14
registers = 2
[[vision.towers]]
kind = "siglip"
width = 12
depth = 2
heads = 3
mlp_ratio = 2.0
patch_size = 14
attn_pool = true
[llm]
width = 16
depth = 1
heads = 4
kv_heads = 2
intermediate = 24
[head]
kind = "bins"
"#;

const STATS_L1: &str = r#"{"metaworld": {
  "action": {"q01": [-1.0, -2.0], "q99": [1.0, 2.0], "min": [-1.0, -2.0], "max": [1.0, 2.0],
             "mean": [0.0, 0.0], "std": [1.0, 1.0], "mask": [true, true]},
  "proprio": {"q01": [-1, -1, -1, -1, -1], "q99": [1, 1, 1, 1, 1], "min": [-1, -1, -1, -1, -1],
              "max": [1, 1, 1, 1, 1], "mean": [0, 0, 0, 0, 0], "std": [1, 1, 1, 1, 1]},
  "num_transitions": 10, "num_trajectories": 1}}"#;

const STATS_BINS: &str = r#"{"bridge_orig": {"action": {
  "q01": [-0.1, -0.1, -0.1, -0.1, -0.1, -0.1, 0.0], "q99": [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 1.0],
  "mask": [true, true, true, true, true, true, false]}}}"#;

fn init(
    dir: &Path,
    text: &str,
    seed: u64,
    dtype: SavedDtype,
    stats: Option<&str>,
) -> openvla::Result<InitSummary> {
    let cfg = InitConfig::from_toml(text, Path::new("test.toml"))?;
    let stats = stats.map(|s| {
        let p = dir.with_extension("stats.json");
        std::fs::write(&p, s).unwrap();
        p
    });
    write_initialized(
        dir,
        &cfg,
        &InitOptions {
            seed,
            dtype,
            tokenizer: tokenizer(),
            stats,
            max_shard_bytes: u64::MAX,
        },
        &|_, _| {},
    )
}

fn image(seed: u8) -> RgbImage {
    let data: Vec<u8> = (0..40 * 30 * 3)
        .map(|i| (i as u8).wrapping_mul(seed))
        .collect();
    RgbImage::from_raw(40, 30, data).unwrap()
}

fn load(dir: &Path) -> Policy {
    Policy::load(
        dir,
        &LoadOptions {
            precision: Precision::F32,
            ..Default::default()
        },
    )
    .unwrap()
}

fn tensors(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::F32).unwrap()))
        .collect()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn std_of(v: &[f32]) -> f64 {
    let n = v.len() as f64;
    let m = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    (v.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / n).sqrt()
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0.0f32, |a, x| a.max(x.abs()))
}

#[test]
fn l1_one_tower_loads_and_predicts_a_chunk() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let summary = init(&dir, L1_ONE_TOWER, 1, SavedDtype::F32, Some(STATS_L1)).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "action_head--0_checkpoint.pt",
        "proprio_projector--0_checkpoint.pt",
        "dataset_statistics.json",
    ] {
        assert!(summary.files.iter().any(|x| x == f), "{f} not written");
    }
    let policy = load(&dir);
    assert_eq!(policy.chunk_size(), 3);
    assert_eq!(policy.num_images(), 2);
    assert_eq!(policy.proprio_dim(), Some(5));
    assert_eq!(policy.config().num_patches(), 4);
    let obs = Observation {
        images: vec![("primary".into(), image(3)), ("wrist".into(), image(7))],
        instruction: "open the drawer".into(),
        proprio: Some(vec![0.1, -0.2, 0.3, 0.0, 0.5]),
    };
    let p = policy.predict(&[obs], None).unwrap().remove(0);
    assert_eq!(p.actions.len(), 3);
    assert!(p.actions.iter().all(|a| a.len() == 2));
    assert!(p.actions.iter().flatten().all(|v| v.is_finite()));
    assert!(p.token_ids.is_empty());
    assert_eq!(p.unnorm_key, "metaworld");

    // Tied: no lm_head in the file, and the loaded output projection is the embedding table.
    let t = tensors(&dir);
    assert!(!t.contains_key("language_model.lm_head.weight"));
    let llm = &policy.model().llm;
    let dense = |w: &Weight| match w {
        Weight::Dense(t) => values(&t.to_dtype(DType::F32).unwrap()),
        Weight::Quant(_) => panic!("unexpected quantized weight"),
    };
    let (head, embed) = (
        dense(llm.lm_head_weight()),
        dense(llm.embed_tokens_weight()),
    );
    assert_eq!(head, embed);
    assert_eq!(
        embed,
        values(&t["language_model.model.embed_tokens.weight"])
    );
}

#[test]
fn fused_bins_loads_and_predicts_action_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let summary = init(&dir, BINS_FUSED, 2, SavedDtype::Bf16, Some(STATS_BINS)).unwrap();
    assert_eq!(summary.head_params, 0);
    assert!(!summary.files.iter().any(|f| f.ends_with(".pt")));
    let t = tensors(&dir);
    assert!(t.contains_key("language_model.lm_head.weight"));
    assert!(t.contains_key("vision_backbone.fused_featurizer.attn_pool.latent"));
    assert_eq!(t["vision_backbone.featurizer.reg_token"].dims(), &[1, 2, 8]);
    // timm 0.9.10: registers start at zero, the class token at normal(1e-6).
    assert!(values(&t["vision_backbone.featurizer.reg_token"])
        .iter()
        .all(|&x| x == 0.0));
    let cls = values(&t["vision_backbone.featurizer.cls_token"]);
    assert!(max_abs(&cls) < 1e-5 && max_abs(&cls) > 0.0);
    let policy = load(&dir);
    assert!(policy.oft().is_none());
    let p = policy
        .predict(&[Observation::new(image(5), "close the window")], None)
        .unwrap()
        .remove(0);
    assert_eq!(p.actions.len(), 1);
    assert_eq!(p.action().len(), 7);
    assert_eq!(p.token_ids.len(), 7);
}

#[test]
fn initializations_follow_the_reference_modules() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    // Wider than the other tests so the moments are measurable.
    let text = L1_ONE_TOWER
        .replace("width = 16\ndepth = 3", "width = 64\ndepth = 3")
        .replace("heads = 2\npatch_size", "heads = 4\npatch_size")
        .replace("[llm]\nwidth = 16", "[llm]\nwidth = 64");
    init(&dir, &text, 9, SavedDtype::F32, None).unwrap();
    let t = tensors(&dir);
    let v = |n: &str| values(&t[n]);
    let f = "vision_backbone.featurizer";
    // timm: Linear trunc_normal(0.02), bias 0, LayerNorm 1/0, pos_embed trunc_normal(0.02).
    let qkv = v(&format!("{f}.blocks.0.attn.qkv.weight"));
    assert!((std_of(&qkv) - 0.02).abs() < 0.001, "{}", std_of(&qkv));
    assert!(v(&format!("{f}.blocks.1.mlp.fc1.bias"))
        .iter()
        .all(|&x| x == 0.0));
    assert!(v(&format!("{f}.blocks.0.norm1.weight"))
        .iter()
        .all(|&x| x == 1.0));
    assert!(v(&format!("{f}.norm.bias")).iter().all(|&x| x == 0.0));
    let pos = v(&format!("{f}.pos_embed"));
    assert!((std_of(&pos) - 0.02).abs() < 0.006 && max_abs(&pos) < 0.2);
    // Patch embedding: Conv2d default, U(±1/sqrt(3·16·16)).
    let bound = 1.0 / (3.0f32 * 256.0).sqrt();
    for n in ["patch_embed.proj.weight", "patch_embed.proj.bias"] {
        let w = v(&format!("{f}.{n}"));
        assert!(max_abs(&w) <= bound && max_abs(&w) > 0.8 * bound, "{n}");
    }
    // Projector: nn.Linear default, U(±1/sqrt(fan_in)).
    let w = v("projector.fc1.weight");
    assert!(max_abs(&w) <= 1.0 / 8.0 && max_abs(&w) > 0.9 / 8.0);
    // Llama: normal(0.02), pad row zero, RMSNorm ones.
    let e = v("language_model.model.embed_tokens.weight");
    assert!((std_of(&e) - 0.02).abs() < 2e-4);
    assert!(e[32000 * 64..32001 * 64].iter().all(|&x| x == 0.0));
    assert!(e[31999 * 64..32000 * 64].iter().any(|&x| x != 0.0));
    let q = v("language_model.model.layers.1.self_attn.q_proj.weight");
    assert!((std_of(&q) - 0.02).abs() < 0.002);
    assert!(v("language_model.model.norm.weight")
        .iter()
        .all(|&x| x == 1.0));
    // OFT head: LayerNorm 1/0, Linear U(±1/sqrt(fan_in)); projector likewise, in f32.
    let head =
        openvla::oft::pt::StateDict::read(&dir.join("action_head--0_checkpoint.pt")).unwrap();
    let hv = |n: &str, r| values(&head.get(n, r).unwrap());
    assert!(hv("model.layer_norm1.weight", 1).iter().all(|&x| x == 1.0));
    assert!(hv("model.mlp_resnet_blocks.1.ffn.0.bias", 1)
        .iter()
        .all(|&x| x == 0.0));
    let fc1 = hv("model.fc1.weight", 2);
    let b = 1.0 / (128.0f32).sqrt(); // fan_in = llm 64 x action_dim 2
    assert!(max_abs(&fc1) <= b && max_abs(&fc1) > 0.9 * b);
    assert_eq!(head.shape("model.fc2.weight"), Some(vec![2, 64]));
    let proprio =
        openvla::oft::pt::StateDict::read(&dir.join("proprio_projector--0_checkpoint.pt")).unwrap();
    assert_eq!(proprio.stored_dtype("fc1.weight"), Some(DType::F32));
    assert_eq!(head.stored_dtype("model.fc1.weight"), Some(DType::F32));
}

#[test]
fn output_is_a_function_of_config_seed_and_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    let read = |d: &Path, f: &str| std::fs::read(d.join(f)).unwrap();
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    init(&a, L1_ONE_TOWER, 4, SavedDtype::Bf16, None).unwrap();
    init(&b, L1_ONE_TOWER, 4, SavedDtype::Bf16, None).unwrap();
    init(&c, L1_ONE_TOWER, 5, SavedDtype::Bf16, None).unwrap();
    for f in [
        "model.safetensors",
        "action_head--0_checkpoint.pt",
        "proprio_projector--0_checkpoint.pt",
        "config.json",
    ] {
        assert_eq!(read(&a, f), read(&b, f), "{f} differs between equal seeds");
    }
    assert_ne!(read(&a, "model.safetensors"), read(&c, "model.safetensors"));
    assert_ne!(
        read(&a, "action_head--0_checkpoint.pt"),
        read(&c, "action_head--0_checkpoint.pt")
    );
    // bf16 head, f32 proprio projector, as the reference saves them.
    let head = openvla::oft::pt::StateDict::read(&a.join("action_head--0_checkpoint.pt")).unwrap();
    assert_eq!(head.stored_dtype("model.fc1.weight"), Some(DType::BF16));
}

#[test]
fn without_statistics_predict_says_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    init(&dir, L1_ONE_TOWER, 1, SavedDtype::F32, None).unwrap();
    assert!(!dir.join("dataset_statistics.json").exists());
    let policy = load(&dir);
    let obs = Observation {
        images: vec![("primary".into(), image(3)), ("wrist".into(), image(7))],
        instruction: "open the drawer".into(),
        proprio: Some(vec![0.0; 5]),
    };
    let err = policy.predict(&[obs], None).unwrap_err().to_string();
    assert!(err.contains("no norm_stats"), "{err}");
}

#[test]
fn refuses_to_overwrite_and_names_bad_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    init(&dir, BINS_FUSED, 1, SavedDtype::Bf16, None).unwrap();
    let err = init(&dir, BINS_FUSED, 1, SavedDtype::Bf16, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not empty"), "{err}");

    let cfg = InitConfig::from_toml(BINS_FUSED, Path::new("t.toml")).unwrap();
    let opts = |tokenizer: PathBuf, stats: Option<PathBuf>| InitOptions {
        seed: 0,
        dtype: SavedDtype::Bf16,
        tokenizer,
        stats,
        max_shard_bytes: u64::MAX,
    };
    let err = write_initialized(
        &tmp.path().join("n"),
        &cfg,
        &opts(tmp.path().join("missing.json"), None),
        &|_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("missing.json") && err.contains("tokenizer"),
        "{err}"
    );
    assert!(!tmp.path().join("n").exists());

    let bad_stats = tmp.path().join("bad.json");
    std::fs::write(
        &bad_stats,
        r#"{"x": {"action": {"q01": [0, 0], "q99": [1]}}}"#,
    )
    .unwrap();
    let err = write_initialized(
        &tmp.path().join("o"),
        &cfg,
        &opts(tokenizer(), Some(bad_stats)),
        &|_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("bad.json") && err.contains("q99"), "{err}");
}

#[test]
fn metaworld_small_fits_the_size_budget() {
    // The shipped Meta-World policy must be at most 30 MB in bf16 (issue 15).
    let cfg = InitConfig::preset("metaworld-small").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let s = write_initialized(
        &dir,
        &cfg,
        &InitOptions {
            seed: 0,
            dtype: SavedDtype::Bf16,
            tokenizer: tokenizer(),
            stats: None,
            max_shard_bytes: u64::MAX,
        },
        &|_, _| {},
    )
    .unwrap();
    let on_disk: u64 = s
        .files
        .iter()
        .filter(|f| f.ends_with(".safetensors") || f.ends_with(".pt"))
        .map(|f| std::fs::metadata(dir.join(f)).unwrap().len())
        .sum();
    assert!(on_disk <= 30_000_000, "{on_disk} bytes of weights");
    assert!(s.weight_bytes <= on_disk && on_disk - s.weight_bytes < 100_000);
    let policy = load(&dir);
    assert_eq!(policy.config().num_patches(), 64);
    assert_eq!(policy.config().towers[0].selected_block(), 3);
}

#[test]
fn tied_config_ignores_a_stored_lm_head_as_transformers_does() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    init(&dir, BINS_FUSED, 6, SavedDtype::F32, Some(STATS_BINS)).unwrap();
    assert!(tensors(&dir).contains_key("language_model.lm_head.weight"));
    let untied = load(&dir);
    let dense = |w: &Weight| match w {
        Weight::Dense(t) => values(&t.to_dtype(DType::F32).unwrap()),
        Weight::Quant(_) => panic!("unexpected quantized weight"),
    };
    let llm = &untied.model().llm;
    assert_ne!(
        dense(llm.lm_head_weight()),
        dense(llm.embed_tokens_weight())
    );
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["text_config"]["tie_word_embeddings"] = serde_json::json!(true);
    std::fs::write(&path, cfg.to_string()).unwrap();
    let tied = load(&dir);
    let llm = &tied.model().llm;
    assert_eq!(
        dense(llm.lm_head_weight()),
        dense(llm.embed_tokens_weight())
    );
    tied.predict(&[Observation::new(image(5), "reach")], None)
        .unwrap();
}
