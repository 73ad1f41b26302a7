//! OpenVLA-OFT error paths and constant resolution: every bad directory, flag or request is a
//! clear error naming what was wrong, never a panic; constants come from flags, config.json,
//! presets or shapes, in that order.

use openvla::oft::constants::{NormalizationType, OftOptions, Platform, Source};
use openvla::{LoadOptions, Observation, Policy, Precision};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/openvla-oft-tiny")
        .join(name)
}

fn copy_model(src: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    dir
}

fn load_with(dir: &Path, oft: OftOptions) -> openvla::Result<Policy> {
    Policy::load(
        dir,
        &LoadOptions {
            precision: Precision::F32,
            oft,
            ..Default::default()
        },
    )
}

fn load_err(dir: &Path, oft: OftOptions) -> String {
    load_with(dir, oft)
        .expect_err("loading should fail")
        .to_string()
}

/// Rewrites config.json with `edit` applied.
fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, v.to_string()).unwrap();
}

fn obs(images: usize, proprio: Option<Vec<f64>>) -> Observation {
    let img = openvla_image::open(&fixture("s0_img0_input.png")).unwrap();
    Observation {
        images: (0..images)
            .map(|i| (format!("img{i}"), img.clone()))
            .collect(),
        instruction: "pick up the black bowl".into(),
        proprio,
    }
}

#[test]
fn missing_action_head_file_is_named() {
    let dir = copy_model(&fixture("model"));
    std::fs::remove_file(dir.path().join("action_head--150000_checkpoint.pt")).unwrap();
    let e = load_err(dir.path(), OftOptions::default());
    assert!(e.contains("action_head--<step>_checkpoint.pt"), "{e}");
}

#[test]
fn two_action_head_files_are_both_named() {
    let dir = copy_model(&fixture("model"));
    std::fs::copy(
        dir.path().join("action_head--150000_checkpoint.pt"),
        dir.path().join("action_head--50000_checkpoint.pt"),
    )
    .unwrap();
    let e = load_err(dir.path(), OftOptions::default());
    assert!(
        e.contains("action_head--150000_checkpoint.pt")
            && e.contains("action_head--50000_checkpoint.pt")
            && e.contains("exactly one"),
        "{e}"
    );
}

#[test]
fn a_bad_pt_file_is_an_error_naming_it() {
    let dir = copy_model(&fixture("model"));
    std::fs::write(
        dir.path().join("proprio_projector--150000_checkpoint.pt"),
        b"not a zip archive",
    )
    .unwrap();
    let e = load_err(dir.path(), OftOptions::default());
    assert!(
        e.contains("proprio_projector--150000_checkpoint.pt") && e.contains("state dict"),
        "{e}"
    );
    // A valid archive of the wrong component: missing tensors are named.
    std::fs::copy(
        dir.path().join("action_head--150000_checkpoint.pt"),
        dir.path().join("proprio_projector--150000_checkpoint.pt"),
    )
    .unwrap();
    let e = load_err(dir.path(), OftOptions::default());
    assert!(e.contains("fc1.weight"), "{e}");
}

#[test]
fn a_dimension_contradicting_the_head_names_both() {
    let dir = fixture("model");
    let e = load_err(
        &dir,
        OftOptions {
            action_dim: Some(6),
            ..Default::default()
        },
    );
    assert!(e.contains("6 (from flag)") && e.contains("7 rows"), "{e}");
    // ALOHA's preset (D = 14) against a LIBERO head, when config.json says nothing.
    let dir = copy_model(&fixture("model"));
    edit_config(dir.path(), |v| {
        v.as_object_mut().unwrap().remove("oft_constants");
    });
    let e = load_err(
        dir.path(),
        OftOptions {
            platform: Some(Platform::Aloha),
            ..Default::default()
        },
    );
    assert!(
        e.contains("14 (from --platform aloha preset)") && e.contains("7 rows"),
        "{e}"
    );
    // A proprio dimension contradicting the projector.
    let e = load_err(
        &fixture("model"),
        OftOptions {
            proprio_dim: Some(7),
            ..Default::default()
        },
    );
    assert!(
        e.contains("7 (from flag)") && e.contains("8 columns"),
        "{e}"
    );
}

#[test]
fn an_undetermined_constant_is_named() {
    let dir = copy_model(&fixture("model"));
    edit_config(dir.path(), |v| {
        let o = v.as_object_mut().unwrap();
        o.remove("oft_constants");
        o.remove("oft_eval_cfg");
    });
    let e = load_err(dir.path(), OftOptions::default());
    assert!(e.contains("chunk size") && e.contains("--chunk"), "{e}");
    let e = load_err(
        dir.path(),
        OftOptions {
            chunk: Some(8),
            ..Default::default()
        },
    );
    assert!(e.contains("number of input images"), "{e}");
    let e = load_err(
        dir.path(),
        OftOptions {
            chunk: Some(8),
            num_images: Some(2),
            ..Default::default()
        },
    );
    assert!(e.contains("normalization type"), "{e}");
}

#[test]
fn constants_follow_flags_config_preset_shapes() {
    // config.json fields.
    let p = load_with(&fixture("model"), OftOptions::default()).unwrap();
    let c = &p.oft().unwrap().constants;
    assert_eq!(c.chunk.value, 8);
    assert_eq!(
        c.chunk.source,
        Source::Config("oft_constants.NUM_ACTIONS_CHUNK".into())
    );
    assert_eq!(c.proprio_dim.value, Some(8));
    assert_eq!(p.head().family(), "oft-l1");
    // Flags override config.json.
    let p = load_with(
        &fixture("model"),
        OftOptions {
            chunk: Some(4),
            normalization: Some(NormalizationType::Bounds),
            ..Default::default()
        },
    )
    .unwrap();
    let c = &p.oft().unwrap().constants;
    assert_eq!((c.chunk.value, c.chunk.source.clone()), (4, Source::Flag));
    assert_eq!(c.normalization.value, NormalizationType::Bounds);
    // Without config.json fields: the preset, and the head's shape for D when no preset.
    let dir = copy_model(&fixture("model"));
    edit_config(dir.path(), |v| {
        let o = v.as_object_mut().unwrap();
        o.remove("oft_constants");
        o.remove("oft_eval_cfg");
    });
    let p = load_with(
        dir.path(),
        OftOptions {
            platform: Some(Platform::Libero),
            ..Default::default()
        },
    )
    .unwrap();
    let c = &p.oft().unwrap().constants;
    assert_eq!(c.chunk.source, Source::Platform(Platform::Libero));
    assert_eq!((c.num_images.value, c.chunk.value), (2, 8));
    let p = load_with(
        dir.path(),
        OftOptions {
            chunk: Some(8),
            num_images: Some(2),
            normalization: Some(NormalizationType::BoundsQ99),
            ..Default::default()
        },
    )
    .unwrap();
    let c = &p.oft().unwrap().constants;
    assert!(
        matches!(c.action_dim.source, Source::Shape(_)),
        "{:?}",
        c.action_dim
    );
    assert!(
        matches!(c.proprio_dim.source, Source::Shape(_)),
        "{:?}",
        c.proprio_dim
    );
    assert_eq!((c.action_dim.value, c.proprio_dim.value), (7, Some(8)));
}

#[test]
fn requests_with_missing_proprio_or_wrong_image_count_fail_alone() {
    let p = load_with(&fixture("model"), OftOptions::default()).unwrap();
    let key = Some("fake_libero_spatial_no_noops");
    let e = p
        .trace_parallel(&obs(2, None), key)
        .unwrap_err()
        .to_string();
    assert!(e.contains("takes proprio") && e.contains("8 values"), "{e}");
    let e = p
        .trace_parallel(&obs(1, Some(vec![0.0; 8])), key)
        .unwrap_err()
        .to_string();
    assert!(e.contains("takes 2 images") && e.contains("got 1"), "{e}");
    let e = p
        .trace_parallel(&obs(2, Some(vec![0.0; 7])), key)
        .unwrap_err()
        .to_string();
    assert!(e.contains("proprio has 7 values"), "{e}");
    // In a batch, the bad requests fail alone and the good one gets its single answer.
    let good = openvla::Request {
        observation: obs(2, Some(vec![0.1; 8])),
        unnorm_key: key.map(str::to_string),
    };
    let bad = openvla::Request {
        observation: obs(3, Some(vec![0.1; 8])),
        unnorm_key: key.map(str::to_string),
    };
    let single = p
        .predict_batch(std::slice::from_ref(&good))
        .remove(0)
        .unwrap();
    let batch = p.predict_batch(&[bad.clone(), good.clone(), bad]);
    assert!(batch[0].is_err() && batch[2].is_err());
    assert_eq!(batch[1].as_ref().unwrap(), &single);
}

#[test]
fn discrete_oft_without_a_head_file_decodes_tokens_in_parallel() {
    let dir = copy_model(&fixture("model"));
    std::fs::remove_file(dir.path().join("action_head--150000_checkpoint.pt")).unwrap();
    let p = load_with(
        dir.path(),
        OftOptions {
            discrete: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(p.head().family(), "oft-discrete");
    let pred = &p
        .predict(
            &[obs(2, Some(vec![0.1; 8]))],
            Some("fake_libero_spatial_no_noops"),
        )
        .unwrap()[0];
    assert_eq!(pred.actions.len(), 8);
    assert_eq!(pred.token_ids.len(), 56);
    // Every normalized value is a bin centre of the token it came from.
    let tok = p.action_tokenizer();
    let flat: Vec<f64> = pred.normalized_actions.concat();
    assert_eq!(flat, tok.decode(&pred.token_ids));
}
