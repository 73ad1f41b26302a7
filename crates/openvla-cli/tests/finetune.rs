//! `openvla finetune` as a process: a run killed with SIGKILL mid-training and resumed with
//! `--resume` logs exactly the loss curve of an uninterrupted run; errors exit with status 1.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn finetune(out: &Path, max_steps: u64) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_openvla"));
    c.arg("finetune")
        .arg("--model")
        .arg(root().join("models/openvla-tiny"))
        .arg("--data")
        .arg(root().join("testdata/data/rlds/bridge_orig"))
        .arg("--out")
        .arg(out)
        .args(["--lora-rank", "4", "--batch-size", "2"])
        .args([
            "--save-interval",
            "2",
            "--shuffle-buffer",
            "16",
            "--seed",
            "3",
        ])
        .args(["--max-steps", &max_steps.to_string()])
        .env("RAYON_NUM_THREADS", "2")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// `(step, loss bits, accuracy bits)` of every record of metrics.jsonl.
fn curve(dir: &Path) -> Vec<(u64, u64, u64)> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["step"].as_u64().unwrap(),
                v["loss"].as_f64().unwrap().to_bits(),
                v["action_accuracy"].as_f64().unwrap().to_bits(),
            )
        })
        .collect()
}

#[test]
fn sigkill_and_resume_gives_the_uninterrupted_loss_curve() {
    let tmp = tempfile::tempdir().unwrap();
    let steps = 8;
    let full = tmp.path().join("full");
    let out = finetune(&full, steps)
        .args(["--lora-dropout", "0.1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("last step: loss"),
        "summary missing: {stderr}"
    );
    assert!(stderr.contains("adapter:"), "{stderr}");
    let want = curve(&full);
    assert_eq!(want.len(), steps as usize);
    assert!(full.join("adapter/adapter_model.safetensors").is_file());

    // Kill the second run as soon as its first checkpoint is complete.
    let part = tmp.path().join("part");
    let mut child = finetune(&part, steps)
        .args(["--lora-dropout", "0.1"])
        .spawn()
        .unwrap();
    let ckpt = part.join("checkpoints/step-00000002/state.json");
    let t0 = Instant::now();
    while !ckpt.is_file() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before its first checkpoint"
        );
        assert!(t0.elapsed() < Duration::from_secs(300), "no checkpoint");
        std::thread::sleep(Duration::from_millis(20));
    }
    let killed_mid_run = child.try_wait().unwrap().is_none();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(killed_mid_run, "the run finished before it could be killed");
    assert!(curve(&part).len() < steps as usize);

    let out = finetune(&part, steps)
        .args(["--lora-dropout", "0.1", "--resume"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        curve(&part),
        want,
        "resumed curve differs from the uninterrupted one"
    );
}

#[test]
fn finetune_errors_exit_with_a_message() {
    let tmp = tempfile::tempdir().unwrap();
    let out = finetune(&tmp.path().join("r"), 2)
        .args(["--mode", "full", "--max-memory-gb", "0.01"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("error:") && e.contains("GiB"), "{e}");
    // A run directory with checkpoints needs --resume.
    let run = tmp.path().join("r2");
    assert!(finetune(&run, 2).output().unwrap().status.success());
    let out = finetune(&run, 4).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--resume"));
}
