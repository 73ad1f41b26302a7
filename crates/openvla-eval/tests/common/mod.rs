//! Helpers shared by the harness tests: the venv check and a scriptable fake policy server.

#![allow(dead_code)]

use openvla_eval::metaworld::EvalArgs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Fails (never skips) when the project venv is missing: CI's tools/setup.sh must create it.
pub fn require_venv() {
    let py = std::env::var_os("OPENVLA_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv/bin/python"));
    let ok = std::process::Command::new(&py)
        .args(["-c", "import openvla_sim, metaworld, mujoco"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{} cannot import openvla_sim and metaworld: run `bash tools/setup.sh`",
        py.display()
    );
}

/// `openvla eval metaworld` arguments parsed like the command line.
pub fn eval_args(extra: &[&str]) -> EvalArgs {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: EvalArgs,
    }
    Cli::parse_from(std::iter::once("openvla-eval").chain(extra.iter().copied())).a
}

/// A never-set stop flag.
pub fn no_stop() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(false))
}

/// How the fake server answers POST /act.
#[derive(Clone, Copy, Debug)]
pub enum ActReply {
    /// HTTP 500 with an error body.
    Error500,
    /// Never answers (the client must time out).
    Hang,
    /// A zero action when the request's `image` is all zeros, else HTTP 422 naming the mean
    /// pixel value (for `--blind`).
    ZeroIfBlack,
}

/// A fake policy server on loopback: GET /metadata answers `metadata`, POST /act as `act` says.
/// Returns its URL; it serves until the test process ends.
pub fn fake_server(metadata: serde_json::Value, act: ActReply) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            let metadata = metadata.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut stream = stream;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut len = 0usize;
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).unwrap_or(0) == 0 {
                            return;
                        }
                        if h == "\r\n" || h == "\n" {
                            break;
                        }
                        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0u8; len];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    let (status, text) = if line.starts_with("GET /metadata") {
                        ("200 OK", metadata.to_string())
                    } else if line.starts_with("POST /act") {
                        match act {
                            ActReply::Error500 => (
                                "500 Internal Server Error",
                                r#"{"error":"internal","detail":"the model failed"}"#.to_string(),
                            ),
                            ActReply::ZeroIfBlack => {
                                let req: serde_json::Value =
                                    serde_json::from_slice(&body).unwrap_or_default();
                                match openvla_server::json_numpy::decode_u8(&req["image"], 1 << 24)
                                {
                                    Ok(img) if img.data.iter().all(|&b| b == 0) => {
                                        ("200 OK", "[[0.0, 0.0, 0.0, 0.0]]".to_string())
                                    }
                                    Ok(img) => {
                                        let mean = img.data.iter().map(|&b| b as f64).sum::<f64>()
                                            / img.data.len().max(1) as f64;
                                        (
                                            "422 Unprocessable Entity",
                                            format!(
                                                r#"{{"error":"image not black: mean {mean:.1}"}}"#
                                            ),
                                        )
                                    }
                                    Err(e) => (
                                        "400 Bad Request",
                                        format!(r#"{{"error":"no image: {e}"}}"#),
                                    ),
                                }
                            }
                            ActReply::Hang => {
                                std::thread::sleep(std::time::Duration::from_secs(3600));
                                return;
                            }
                        }
                    } else {
                        ("404 Not Found", r#"{"error":"not_found"}"#.to_string())
                    };
                    let reply = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
                        text.len()
                    );
                    if stream.write_all(reply.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    url
}
