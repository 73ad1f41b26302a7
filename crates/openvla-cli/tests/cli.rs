//! The `openvla` binary as a user runs it.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn openvla(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_openvla"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("running openvla")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn predict_json_prints_one_object_equal_to_the_reference() {
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("testdata/openvla-tiny/manifest.json")).unwrap(),
    )
    .unwrap();
    for s in manifest["samples"].as_array().unwrap() {
        let image = format!(
            "testdata/openvla-tiny/{}",
            s["files"]["image"].as_str().unwrap()
        );
        let o = openvla(&[
            "predict",
            "--model",
            "models/openvla-tiny",
            "--image",
            &image,
            "--instruction",
            s["instruction"].as_str().unwrap(),
            "--unnorm-key",
            s["unnorm_key"].as_str().unwrap(),
            "--json",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let out = stdout(&o);
        assert_eq!(out.trim().lines().count(), 1, "exactly one line: {out}");
        let v: Value = serde_json::from_str(out.trim()).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "action",
                "actions",
                "normalized_action",
                "normalized_actions",
                "token_ids",
                "unnorm_key"
            ]
        );
        // The 256-bin family answers a chunk of one: its only row is the action.
        assert_eq!(v["actions"], Value::Array(vec![v["action"].clone()]));
        assert_eq!(v["token_ids"], s["generated_ids_list"]);
        assert_eq!(v["unnorm_key"], s["unnorm_key"]);
        let got = v["action"].as_array().unwrap();
        let want = s["actions_list"].as_array().unwrap();
        assert_eq!(got.len(), want.len());
        for (a, b) in got.iter().zip(want) {
            // Printed with full precision: the f64 round-trips.
            assert!(
                (a.as_f64().unwrap() - b.as_f64().unwrap()).abs() <= 1e-9,
                "{a} vs {b}"
            );
        }
    }
}

#[test]
fn predict_errors_are_clear_and_exit_nonzero() {
    let o = openvla(&[
        "predict",
        "--model",
        "models/openvla-tiny",
        "--image",
        "testdata/openvla-tiny/s0_image.png",
        "--instruction",
        "pick",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("unnorm_key is required"),
        "{}",
        stderr(&o)
    );
    assert!(stdout(&o).is_empty());

    let o = openvla(&[
        "predict",
        "--model",
        "models/openvla-tiny",
        "--image",
        "missing.png",
        "--instruction",
        "pick",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("missing.png"), "{}", stderr(&o));

    let o = openvla(&[
        "predict",
        "--model",
        "models/openvla-tiny",
        "--image",
        "testdata/openvla-tiny/s0_image.png",
        "--instruction",
        "pick",
        "--precision",
        "f64",
    ]);
    assert_eq!(o.status.code(), Some(2), "bad flag values are usage errors");
    assert!(
        stderr(&o).contains("expected auto, f32 or bf16"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn help_explains_every_flag() {
    let o = openvla(&["predict", "--help"]);
    assert!(o.status.success());
    let h = stdout(&o);
    for flag in [
        "--model",
        "--image",
        "--instruction",
        "--unnorm-key",
        "--json",
        "--precision",
    ] {
        assert!(h.contains(flag), "{flag} missing from help:\n{h}");
    }
}

#[test]
fn inspect_reports_components_and_norm_stats() {
    let o = openvla(&["inspect", "--model", "models/openvla-tiny", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["total_parameters"], 4_491_055);
    let names: Vec<&str> = v["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "featurizer (DINOv2)",
            "fused_featurizer (SigLIP)",
            "projector",
            "language_model (Llama)"
        ]
    );
    let dims: Vec<(String, u64)> = v["datasets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["unnorm_key"].as_str().unwrap().to_string(),
                d["action_dim"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(dims.contains(&("fake_nomask_4d".to_string(), 4)));
    assert!(dims.contains(&("fake_bridge_orig".to_string(), 7)));
    let text = stdout(&openvla(&["inspect", "--model", "models/openvla-tiny"]));
    assert!(
        text.contains("BF16") && text.contains("4,491,055"),
        "{text}"
    );
}

#[test]
fn synthesized_sharded_checkpoint_loads_and_predicts() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tiny-synth");
    let o = openvla(&[
        "synth",
        "--shape",
        "tiny",
        "--out",
        out.to_str().unwrap(),
        "--max-shard-bytes",
        "3000000",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.join("model.safetensors.index.json").exists());
    let o = openvla(&[
        "predict",
        "--model",
        out.to_str().unwrap(),
        "--image",
        "testdata/openvla-tiny/s2_image.png",
        "--instruction",
        "open the drawer",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["unnorm_key"], "bridge_orig");
    assert_eq!(v["action"].as_array().unwrap().len(), 7);
    // The synthesized model emits action tokens, like a trained one.
    for t in v["token_ids"].as_array().unwrap() {
        let t = t.as_u64().unwrap();
        assert!((31744..32000).contains(&t), "token {t}");
    }
    let o = openvla(&["inspect", "--model", out.to_str().unwrap(), "--json"]);
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["total_parameters"], 4_491_055);
    let shards = v["shards"].as_array().unwrap();
    assert!(shards.len() > 1, "{shards:?}");
    assert!(shards
        .iter()
        .all(|s| s.as_str().unwrap().starts_with("model-0000")));
}

/// OpenVLA-OFT: `predict --image --image --proprio --json` prints the chunk the reference
/// computes (fixture sample s0), and `inspect` names the family and where each constant came
/// from.
#[test]
fn oft_predict_prints_the_chunk_and_inspect_names_sources() {
    let d = "testdata/openvla-oft-tiny";
    let proprio = "--proprio=-0.21124162683394807,-0.011090601889321502,1.1742495176982402,\
                   3.140895396142254,-0.002847819833825949,-0.08773931027790592,\
                   0.03872336505859045,-0.0387222020954563";
    let o = openvla(&[
        "predict",
        "--model",
        &format!("{d}/model"),
        "--image",
        &format!("{d}/s0_img0_input.png"),
        "--image",
        &format!("{d}/s0_img1_input.png"),
        proprio,
        "--instruction",
        "pick up the black bowl between the plate and the ramekin and place it on the plate",
        "--unnorm-key",
        "fake_libero_spatial_no_noops",
        "--precision",
        "f32",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    assert_eq!(keys, ["actions", "normalized_actions", "unnorm_key"]);
    let golden = candle_core::Tensor::read_npy(root().join(d).join("s0_actions.npy"))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let got: Vec<f64> = v["actions"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| {
            assert_eq!(row.as_array().unwrap().len(), 7);
            row.as_array().unwrap().iter().map(|x| x.as_f64().unwrap())
        })
        .collect();
    assert_eq!(got.len(), 56);
    for (a, b) in got.iter().zip(&golden) {
        assert!((a - b).abs() <= 1e-5, "{a} vs {b}");
    }
    // One image for a two-image model: a clear error.
    let o = openvla(&[
        "predict",
        "--model",
        &format!("{d}/model"),
        "--image",
        &format!("{d}/s0_img0_input.png"),
        proprio,
        "--instruction",
        "pick up the bowl",
        "--unnorm-key",
        "fake_libero_spatial_no_noops",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("takes 2 images"), "{}", stderr(&o));

    let o = openvla(&["inspect", "--model", &format!("{d}/model"), "--chunk", "4"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("family:     oft-l1"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains("chunk_size") && l.contains("4") && l.contains("from flag")),
        "{out}"
    );
    assert!(
        out.contains("from config.json oft_constants.ACTION_DIM"),
        "{out}"
    );
}
