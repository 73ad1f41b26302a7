//! `openvla init` as a user runs it: a preset's config, a directory that `predict` accepts, and
//! clear errors.

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

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const TINY: &str = r#"
[vision]
image_size = 32
[[vision.towers]]
kind = "siglip"
width = 16
depth = 2
heads = 2
patch_size = 16
[llm]
width = 16
depth = 1
heads = 2
intermediate = 32
tie_word_embeddings = true
[head]
kind = "l1"
chunk = 4
action_dim = 3
proprio_dim = 2
"#;

const STATS: &str = r#"{"sim": {
  "action": {"q01": [-1, -1, -1], "q99": [1, 1, 1], "mask": [true, true, true]},
  "proprio": {"q01": [-1, -1], "q99": [1, 1], "min": [-1, -1], "max": [1, 1]}}}"#;

#[test]
fn print_config_shows_the_preset() {
    let o = openvla(&["init", "--preset", "metaworld-small", "--print-config"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let s = text(&o.stdout);
    for want in [
        "[[vision.towers]]",
        "image_size = 128",
        "chunk = 8",
        "tie_word_embeddings = true",
    ] {
        assert!(s.contains(want), "{want:?} missing from:\n{s}");
    }
}

#[test]
fn init_then_predict_a_chunk() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("tiny.toml");
    std::fs::write(&cfg, TINY).unwrap();
    let stats = tmp.path().join("stats.json");
    std::fs::write(&stats, STATS).unwrap();
    let out = tmp.path().join("model");
    let (cfg, stats, out) = (
        cfg.to_str().unwrap(),
        stats.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let o = openvla(&[
        "init", "--config", cfg, "--out", out, "--seed", "3", "--stats", stats,
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("action_head--0_checkpoint.pt"));
    let o = openvla(&[
        "predict",
        "--model",
        out,
        "--image",
        "testdata/image/center_crop_noise_45x32_44x31.png",
        "--instruction",
        "push the block",
        "--proprio=0.5,-0.5",
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: Value = serde_json::from_str(&text(&o.stdout)).unwrap();
    let actions = v["actions"].as_array().unwrap();
    assert_eq!(actions.len(), 4);
    assert!(actions.iter().all(|a| a.as_array().unwrap().len() == 3));
    assert_eq!(v["unnorm_key"], "sim");
}

#[test]
fn bad_invocations_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    let out = out.to_str().unwrap();
    let cases: [(&[&str], &str); 4] = [
        (&["init", "--out", out], "--config"),
        (
            &[
                "init",
                "--preset",
                "metaworld-small",
                "--config",
                "x.toml",
                "--out",
                out,
            ],
            "cannot be used with",
        ),
        (
            &["init", "--preset", "big", "--out", out],
            "unknown preset \"big\"",
        ),
        (
            &[
                "init",
                "--preset",
                "metaworld-small",
                "--out",
                out,
                "--dtype",
                "f16",
            ],
            "expected bf16 or f32",
        ),
    ];
    for (args, want) in cases {
        let o = openvla(args);
        assert!(!o.status.success(), "{args:?} succeeded");
        let e = text(&o.stderr);
        assert!(e.contains(want), "{args:?}: {want:?} not in {e}");
    }
    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, TINY.replace("patch_size = 16", "patch_size = 5")).unwrap();
    let o = openvla(&["init", "--config", bad.to_str().unwrap(), "--out", out]);
    assert!(!o.status.success());
    let e = text(&o.stderr);
    assert!(
        e.contains("bad.toml") && e.contains("patch_size 5 must divide"),
        "{e}"
    );
    assert!(
        !Path::new(out).exists(),
        "nothing is written for a bad config"
    );
}
