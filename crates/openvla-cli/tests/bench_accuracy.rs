//! `openvla bench --accuracy`: pairs dumped with `--dump-pairs` read back with
//! `--accuracy-pairs` give the same comparison; pairs from a dataset; bad pair directories are
//! clear errors.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn bench(extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_openvla"))
        .args([
            "bench",
            "--model",
            "models/openvla-tiny",
            "--unnorm-key",
            "fake_bridge_orig",
            "--runs",
            "0",
            "--configs",
            "int8",
        ])
        .args(extra)
        .env("RAYON_NUM_THREADS", "2")
        .current_dir(root())
        .output()
        .expect("running openvla")
}

fn report(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn dumped_pairs_read_back_give_the_same_accuracy() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs");
    let (r1, r2) = (tmp.path().join("r1.json"), tmp.path().join("r2.json"));
    let a = bench(&[
        "--accuracy",
        "3",
        "--dump-pairs",
        pairs.to_str().unwrap(),
        "--report",
        r1.to_str().unwrap(),
    ]);
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert!(pairs.join("pairs.json").is_file() && pairs.join("pair_002.ppm").is_file());
    let b = bench(&[
        "--accuracy",
        "3",
        "--accuracy-pairs",
        pairs.to_str().unwrap(),
        "--report",
        r2.to_str().unwrap(),
    ]);
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
    let (x, y) = (report(&r1), report(&r2));
    assert_eq!(x["accuracy"], y["accuracy"]);
    let row = &x["accuracy"]["configs"][0];
    assert_eq!(row["config"], "int8");
    for k in [
        "token_agreement",
        "teacher_forced_agreement",
        "first_token_agreement",
    ] {
        let v = row[k].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{k} = {v}");
    }
    assert_eq!(x["accuracy"]["tokens"], 21);
}

#[test]
fn pairs_from_a_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    let r = tmp.path().join("r.json");
    let o = bench(&[
        "--accuracy",
        "2",
        "--accuracy-data",
        "testdata/data/rlds/fractal20220817_data",
        "--report",
        r.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(report(&r)["accuracy"]["pairs"], 2);
}

#[test]
fn bad_pair_directories_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = bench(&[
        "--accuracy",
        "2",
        "--accuracy-pairs",
        tmp.path().to_str().unwrap(),
    ]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("pairs.json"));

    std::fs::write(
        tmp.path().join("pairs.json"),
        r#"[{"image": "a.ppm", "instruction": "pick"}]"#,
    )
    .unwrap();
    let few = bench(&[
        "--accuracy",
        "2",
        "--accuracy-pairs",
        tmp.path().to_str().unwrap(),
    ]);
    assert!(!few.status.success());
    assert!(
        String::from_utf8_lossy(&few.stderr).contains("fewer than the 2"),
        "{}",
        String::from_utf8_lossy(&few.stderr)
    );

    std::fs::write(tmp.path().join("a.ppm"), b"P6\n4 4\n255\n\x00\x01").unwrap();
    let short = bench(&[
        "--accuracy",
        "1",
        "--accuracy-pairs",
        tmp.path().to_str().unwrap(),
    ]);
    assert!(!short.status.success());
    let e = String::from_utf8_lossy(&short.stderr);
    assert!(e.contains("a.ppm") && e.contains("4x4"), "{e}");
}
