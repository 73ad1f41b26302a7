//! `openvla serve` and `openvla loadtest` as a user runs them: the real binary on a loopback
//! ephemeral port, a Python robot client (requests + json-numpy, tools/client/) whose actions
//! must equal `openvla predict --json`, a load test, and shutdown on SIGTERM.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_openvla")
}

/// A running `openvla serve`, killed if the test fails before it stops it.
struct ServeProcess {
    child: Child,
    url: String,
    stderr: Arc<Mutex<String>>,
}

impl ServeProcess {
    fn start(extra: &[&str]) -> ServeProcess {
        let mut child = Command::new(bin())
            .args(["serve", "--model", "models/openvla-tiny", "--port", "0"])
            .args(extra)
            .current_dir(root())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting openvla serve");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let pipe = child.stderr.take().unwrap();
        let log = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if let Some(url) = line.split("listening on ").nth(1) {
                    let _ = tx.send(url.trim().to_string());
                }
                let mut l = log.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let url = match rx.recv_timeout(Duration::from_secs(300)) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "openvla serve did not start listening:\n{}",
                    stderr.lock().unwrap()
                );
            }
        };
        assert!(url.starts_with("http://127.0.0.1:"), "{url}");
        ServeProcess { child, url, stderr }
    }

    /// Sends SIGTERM and waits (bounded) for a clean exit.
    fn terminate(mut self) -> String {
        let pid = self.child.id().to_string();
        let st = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(st.success());
        let until = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < until, "openvla serve ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        };
        // Let the reader thread take the last lines.
        std::thread::sleep(Duration::from_millis(200));
        let log = self.stderr.lock().unwrap().clone();
        assert!(status.success(), "exit status {status}:\n{log}");
        log
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The project venv's interpreter (CONTRACTS.md): `$OPENVLA_PYTHON` if set, else
/// `<repo>/.venv/bin/python`, which tools/setup.sh creates.
fn python() -> PathBuf {
    std::env::var_os("OPENVLA_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv/bin/python"))
}

fn require_python_client_packages() {
    let hint = "run `bash tools/setup.sh` (it creates .venv and installs tools/venv/client.txt: \
                requests, json-numpy, numpy, pillow)";
    let py = python();
    match Command::new(&py)
        .args(["-c", "import requests, json_numpy, numpy, PIL"])
        .output()
    {
        Err(e) => panic!(
            "{} is needed for the deploy.py client test but cannot run ({e}); {hint}",
            py.display()
        ),
        Ok(o) if !o.status.success() => panic!(
            "{} lacks the deploy.py client packages:\n{}\n{hint}",
            py.display(),
            String::from_utf8_lossy(&o.stderr)
        ),
        Ok(_) => {}
    }
}

#[test]
fn python_deploy_client_gets_predict_actions_and_loadtest_runs_clean() {
    require_python_client_packages();
    let server = ServeProcess::start(&["--max-batch", "8", "--batch-wait-ms", "20"]);

    let out = Command::new(python())
        .arg("tools/client/test_deploy_client.py")
        .args(["--url", &server.url, "--openvla", bin()])
        .args([
            "--model",
            "models/openvla-tiny",
            "--testdata",
            "testdata/openvla-tiny",
        ])
        .current_dir(root())
        .output()
        .expect("running the venv python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(" 0 failed"), "{stdout}");
    assert!(!stdout.contains("FAIL"), "{stdout}");

    for format in ["numpy", "encoded", "png"] {
        let o = Command::new(bin())
            .args([
                "loadtest",
                "--url",
                &server.url,
                "--clients",
                "4",
                "--requests",
                "16",
            ])
            .args([
                "--image",
                "testdata/openvla-tiny/s1_image.png",
                "--format",
                format,
            ])
            .args([
                "--unnorm-key",
                "fake_bridge_orig",
                "--unnorm-key",
                "fake_nomask_4d",
            ])
            .args([
                "--instruction",
                "go",
                "--instruction",
                "open the top drawer slowly",
            ])
            .arg("--json")
            .current_dir(root())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let r: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(r["ok"], 16, "{format}: {r}");
        assert_eq!(r["errors"], serde_json::json!({}), "{format}: {r}");
        assert!(r["throughput_rps"].as_f64().unwrap() > 0.0);
        assert!(
            r["latency_ms"]["p99"].as_f64().unwrap() >= r["latency_ms"]["p50"].as_f64().unwrap()
        );
    }

    let log = server.terminate();
    assert!(log.contains("shutting down"), "{log}");
    assert!(log.contains("openvla serve: stopped"), "{log}");
}

#[test]
fn serve_and_loadtest_refuse_bad_flags() {
    let o = Command::new(bin())
        .args([
            "serve",
            "--model",
            "models/openvla-tiny",
            "--max-batch",
            "0",
        ])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--max-batch must be at least 1"));
    let o = Command::new(bin())
        .args(["serve", "--model", "no/such/model", "--port", "0"])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no/such/model"));
    // A load generator must not be pointed elsewhere by accident.
    let o = Command::new(bin())
        .args([
            "loadtest",
            "--url",
            "http://10.1.2.3:8000",
            "--requests",
            "1",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--allow-remote"));
    let o = Command::new(bin())
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).contains("exposes the server"));
}

#[test]
fn serve_accepts_quantized_loading() {
    let server = ServeProcess::start(&["--quantize", "int8", "--precision", "f32"]);
    let o = Command::new(bin())
        .args([
            "loadtest",
            "--url",
            &server.url,
            "--clients",
            "2",
            "--requests",
            "4",
        ])
        .args(["--unnorm-key", "fake_bridge_orig", "--json"])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["ok"], 4, "{r}");
    server.terminate();
}
