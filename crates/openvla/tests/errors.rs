//! Error paths: every bad input is a clear error naming what was wrong, never a panic.

use openvla::{LoadOptions, Observation, Policy, Precision};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tiny() -> PathBuf {
    root().join("models/openvla-tiny")
}

/// Copies a model directory (following symlinks) into a fresh temporary directory.
fn copy_model(src: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    dir
}

fn load(dir: &Path) -> openvla::Result<Policy> {
    Policy::load(dir, &LoadOptions::default())
}

fn load_err(dir: &Path) -> String {
    load(dir).expect_err("loading should fail").to_string()
}

fn obs(instruction: &str) -> Observation {
    let image = openvla_image::open(&root().join("testdata/openvla-tiny/s0_image.png")).unwrap();
    Observation::new(image, instruction)
}

#[test]
fn unknown_unnorm_key_lists_the_available_keys() {
    let p = load(&tiny()).unwrap();
    let e = p
        .predict(&[obs("pick")], Some("bridge_orig"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"bridge_orig\""), "{e}");
    for k in ["fake_bridge_orig", "fake_libero_spatial", "fake_nomask_4d"] {
        assert!(e.contains(k), "{e}");
    }
}

#[test]
fn omitted_unnorm_key_with_several_datasets_is_an_error() {
    let p = load(&tiny()).unwrap();
    let e = p.predict(&[obs("pick")], None).unwrap_err().to_string();
    assert!(
        e.contains("unnorm_key is required") && e.contains("fake_nomask_4d"),
        "{e}"
    );
}

#[test]
fn omitted_unnorm_key_with_one_dataset_uses_it() {
    let dir = copy_model(&tiny());
    let stats = std::fs::read_to_string(dir.path().join("dataset_statistics.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    let one = v["fake_libero_spatial"].take();
    std::fs::write(
        dir.path().join("dataset_statistics.json"),
        serde_json::json!({ "only": one }).to_string(),
    )
    .unwrap();
    let p = load(dir.path()).unwrap();
    let pred = p.predict(&[obs("pick")], None).unwrap().remove(0);
    assert_eq!(pred.unnorm_key, "only");
}

#[test]
fn empty_instruction_is_an_error() {
    let p = load(&tiny()).unwrap();
    for text in ["", "   "] {
        let e = p
            .predict(&[obs(text)], Some("fake_bridge_orig"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("instruction is empty"), "{e}");
    }
}

#[test]
fn unreadable_image_is_an_error_naming_the_file() {
    let missing = root().join("testdata/does-not-exist.png");
    let e = openvla_image::open(&missing).unwrap_err().to_string();
    assert!(e.contains("does-not-exist.png"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.png");
    std::fs::write(&garbage, b"\x89PNG\r\n\x1a\nthis is not a png").unwrap();
    assert!(openvla_image::open(&garbage).is_err());
}

#[test]
fn missing_shard_is_named() {
    let dir = copy_model(&root().join("testdata/ref-gqa-sharded/model"));
    std::fs::remove_file(dir.path().join("model-00002-of-00003.safetensors")).unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("model-00002-of-00003.safetensors") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn truncated_safetensors_is_named() {
    let dir = copy_model(&tiny());
    let path = dir.path().join("model.safetensors");
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len - 1000).unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("model.safetensors") && e.contains("truncated") && e.contains("tensor"),
        "{e}"
    );
}

#[test]
fn corrupt_safetensors_header_is_an_error() {
    let dir = copy_model(&tiny());
    std::fs::write(
        dir.path().join("model.safetensors"),
        [8u8, 0, 0, 0, 0, 0, 0, 0, b'{', b'x', 0, 0, 0, 0, 0, 0],
    )
    .unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("model.safetensors") && e.contains("header"),
        "{e}"
    );
    std::fs::write(dir.path().join("model.safetensors"), b"abc").unwrap();
    assert!(load_err(dir.path()).contains("not a safetensors file"));
}

#[test]
fn missing_weights_and_files_are_named() {
    let dir = copy_model(&tiny());
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    assert!(load_err(dir.path()).contains("model.safetensors.index.json"));
    for file in ["config.json", "tokenizer.json", "preprocessor_config.json"] {
        let dir = copy_model(&tiny());
        std::fs::remove_file(dir.path().join(file)).unwrap();
        let e = load_err(dir.path());
        assert!(e.contains(file), "{file}: {e}");
    }
    assert!(load_err(&root().join("no/such/model")).contains("does not exist"));
}

#[test]
fn config_that_does_not_match_the_weights_names_the_tensor() {
    let dir = copy_model(&tiny());
    let path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["text_config"]["intermediate_size"] = serde_json::json!(96);
    std::fs::write(&path, cfg.to_string()).unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("mlp.gate_proj.weight") && e.contains("[128, 64]") && e.contains("[96, 64]"),
        "{e}"
    );
}

#[test]
fn extra_tensors_are_rejected() {
    // A 2-layer checkpoint read as a 1-layer model leaves layer 1 unused.
    let dir = copy_model(&tiny());
    let path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["text_config"]["num_hidden_layers"] = serde_json::json!(1);
    std::fs::write(&path, cfg.to_string()).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("do not belong") && e.contains("layers.1"), "{e}");
}

#[test]
fn bad_config_values_are_explained() {
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "timm_model_ids",
            serde_json::json!(["vit_huge_patch14_clip_224", "vit_so400m_patch14_siglip_224"]),
            "unsupported timm model id",
        ),
        (
            "use_fused_vision_backbone",
            serde_json::json!(false),
            "timm_model_ids must have 1",
        ),
        (
            "text_config",
            serde_json::json!({"model_type": "mistral"}),
            "only \"llama\"",
        ),
    ];
    for (key, value, want) in cases {
        let dir = copy_model(&tiny());
        let path = dir.path().join("config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        cfg[key] = value;
        std::fs::write(&path, cfg.to_string()).unwrap();
        let e = load_err(dir.path());
        assert!(e.contains("config.json") && e.contains(want), "{key}: {e}");
    }
    let dir = copy_model(&tiny());
    std::fs::write(dir.path().join("config.json"), "{not json").unwrap();
    assert!(load_err(dir.path()).contains("invalid JSON"));
}

#[test]
fn malformed_dataset_statistics_are_named() {
    let dir = copy_model(&tiny());
    std::fs::write(
        dir.path().join("dataset_statistics.json"),
        r#"{"x": {"action": {"q01": [0, 0], "q99": [1]}}}"#,
    )
    .unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("dataset_statistics.json") && e.contains("q99 has 1"),
        "{e}"
    );
}

#[test]
fn config_json_stats_apply_without_sidecar() {
    // ref-gqa-sharded stores different statistics in config.json and dataset_statistics.json;
    // its manifest records the actions each file gives.
    let src = root().join("testdata/ref-gqa-sharded");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("manifest.json")).unwrap()).unwrap();
    let dir = copy_model(&src.join("model"));
    std::fs::remove_file(dir.path().join("dataset_statistics.json")).unwrap();
    let p = Policy::load(
        dir.path(),
        &LoadOptions {
            precision: Precision::F32,
            progress: None,
            ..Default::default()
        },
    )
    .unwrap();
    for s in manifest["samples"].as_array().unwrap() {
        let image = openvla_image::open(&src.join(s["files"]["image"].as_str().unwrap())).unwrap();
        let pred = p
            .predict(
                &[Observation::new(image, s["instruction"].as_str().unwrap())],
                s["unnorm_key"].as_str(),
            )
            .unwrap()
            .remove(0);
        let want: Vec<f64> = s["actions_with_config_json_norm_stats_list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        for (a, b) in pred.action().iter().zip(&want) {
            assert!((a - b).abs() <= 1e-9, "{a} vs {b}");
        }
    }
}

#[test]
fn over_long_instruction_fails_alone_in_a_batch() {
    let p = load(&tiny()).unwrap();
    let key = Some("fake_bridge_orig".to_string());
    // ~2000 words: more prompt tokens than the tiny model's 2048 positions leave room for.
    let long = vec!["pick"; 2000].join(" ");
    let requests = vec![
        openvla::Request {
            observation: obs(&long),
            unnorm_key: key.clone(),
        },
        openvla::Request {
            observation: obs("pick up the block"),
            unnorm_key: key.clone(),
        },
    ];
    let out = p.predict_batch(&requests);
    let e = out[0].as_ref().expect_err("over-long prompt").to_string();
    assert!(
        e.contains("too long") && e.contains("max_position_embeddings (2048)"),
        "{e}"
    );
    let alone = p
        .predict(&[obs("pick up the block")], key.as_deref())
        .unwrap();
    assert_eq!(out[1].as_ref().unwrap(), &alone[0]);
}
