//! `openvla bench` on an OpenVLA-OFT model (the shipped Meta-World policy): it times the one
//! parallel pass, reports the chunk and actions per second, predicts what `predict` predicts,
//! compares quantized chunks with f32, and refuses a proprio of the wrong length clearly.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const MODEL: &str = "models/metaworld-mt10";
const IMAGE: &str = "models/metaworld-mt10/examples/drawer-close-v3-seed1000.png";
const PROPRIO: &str = "--proprio=0.0045842,0.601388,0.195143,1";
const INSTRUCTION: &str = "Push and close a drawer";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn openvla(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_openvla"))
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .current_dir(root())
        .output()
        .expect("running openvla")
}

/// `openvla <command...>` on the model's example frame, state and instruction, with `--json`.
fn on_example(command: &[&str]) -> Output {
    let mut args = command.to_vec();
    args.extend([
        "--model",
        MODEL,
        "--image",
        IMAGE,
        "--instruction",
        INSTRUCTION,
        PROPRIO,
        "--json",
    ]);
    openvla(&args)
}

fn last_json(o: &Output) -> Value {
    let text = String::from_utf8_lossy(&o.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON in {text}"));
    serde_json::from_str(line).unwrap()
}

#[test]
fn bench_times_the_parallel_pass_and_predicts_what_predict_predicts() {
    let b = on_example(&["bench", "--runs", "2"]);
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
    let r = last_json(&b);
    assert_eq!(r["family"], "oft-l1");
    assert_eq!(r["chunk_size"], 8);
    let ms = &r["median_ms"];
    for k in [
        "preprocess",
        "vision",
        "projector",
        "prefill",
        "head",
        "total",
    ] {
        let v = ms[k].as_f64().unwrap_or(f64::NAN);
        assert!(v.is_finite() && v >= 0.0, "{k} = {v}");
    }
    assert!(ms["decode_per_token"].is_null(), "OFT has no decode: {ms}");
    let total = ms["total"].as_f64().unwrap();
    let aps = r["actions_per_s"].as_f64().unwrap();
    assert!(
        (aps - 8e3 / total).abs() < 1e-6 * aps,
        "{aps} vs {total} ms"
    );

    let p = on_example(&["predict"]);
    assert!(p.status.success(), "{}", String::from_utf8_lossy(&p.stderr));
    let want = last_json(&p)["normalized_actions"].clone();
    assert_eq!(r["normalized_actions"], want);
}

#[test]
fn bench_compares_quantized_chunks_with_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let report = tmp.path().join("r.json");
    let o = openvla(&[
        "bench",
        "--model",
        MODEL,
        "--runs",
        "0",
        "--configs",
        "int8",
        "--accuracy",
        "2",
        "--report",
        report.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("chunk L1 error"), "{out}");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let acc = &r["accuracy"];
    assert_eq!(acc["family"], "oft-l1");
    let row = &acc["configs"][0];
    assert_eq!(row["config"], "int8");
    let (mean, max) = (
        row["mean_abs_delta"].as_f64().unwrap(),
        row["max_abs_delta"].as_f64().unwrap(),
    );
    // int8 weights change the chunk a little, never by a whole normalized range.
    assert!(
        mean > 0.0 && mean <= max && max < 0.5,
        "mean {mean}, max {max}"
    );
}

#[test]
fn bench_refuses_a_proprio_of_the_wrong_length() {
    let o = openvla(&["bench", "--model", MODEL, "--runs", "0", "--proprio=1,2"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("proprio has 2 values, this model takes 4"),
        "{err}"
    );
}
