//! Simulator worker processes (`python -m openvla_sim.worker`): one Meta-World env each, driven
//! by JSON lines on stdin/stdout.
//!
//! Workers run in their own process group, so a Ctrl-C in the terminal reaches only the harness,
//! which then stops them itself. A worker that exits, or does not answer in time, is reported as
//! dead; the caller restarts it.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How a worker is started.
#[derive(Debug, Clone)]
pub struct PythonEnv {
    /// The interpreter (the project venv's).
    pub python: PathBuf,
    /// `python/sim` of the checkout, prepended to PYTHONPATH when found.
    pub sim_dir: Option<PathBuf>,
}

impl PythonEnv {
    /// Finds the interpreter: `$OPENVLA_PYTHON`, else `.venv/bin/python` in the current directory
    /// or in a directory above the running executable (a checkout's `target/<profile>/`).
    pub fn discover() -> Result<PythonEnv> {
        let mut roots: Vec<PathBuf> = Vec::new();
        if let Ok(cwd) = std::env::current_dir() {
            roots.extend(cwd.ancestors().map(Path::to_path_buf));
        }
        if let Ok(exe) = std::env::current_exe() {
            roots.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
        }
        let sim_dir = roots
            .iter()
            .map(|r| r.join("python/sim/openvla_sim"))
            .find(|p| p.is_dir())
            .and_then(|p| p.parent().map(Path::to_path_buf));
        if let Some(p) = std::env::var_os("OPENVLA_PYTHON") {
            return Ok(PythonEnv {
                python: PathBuf::from(p),
                sim_dir,
            });
        }
        for r in &roots {
            let py = r.join(".venv/bin/python");
            if py.is_file() {
                return Ok(PythonEnv {
                    python: py,
                    sim_dir: Some(r.join("python/sim"))
                        .filter(|d| d.is_dir())
                        .or(sim_dir),
                });
            }
        }
        bail!(
            "no Python environment with the simulator: run `bash tools/setup.sh` in the openvla-rs \
             checkout (it creates .venv with metaworld and python/sim), or set OPENVLA_PYTHON to an \
             interpreter that can import openvla_sim"
        )
    }

    /// A command running `python -m <module>` with the simulator package on the path.
    pub fn module(&self, module: &str) -> Command {
        let mut cmd = Command::new(&self.python);
        cmd.args(["-u", "-m", module]);
        if let Some(dir) = &self.sim_dir {
            let mut path = dir.as_os_str().to_owned();
            if let Some(old) = std::env::var_os("PYTHONPATH") {
                path.push(":");
                path.push(old);
            }
            cmd.env("PYTHONPATH", path);
        }
        cmd
    }
}

/// Why a call to a worker did not return an answer.
#[derive(Debug, Clone, PartialEq)]
pub enum CallError {
    /// The process exited or closed its pipes (with the tail of its stderr).
    Died(String),
    /// No answer within the time allowed (the worker is then killed).
    Timeout(Duration),
    /// The worker answered `ok: false` (its error message).
    Failed(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Died(s) => write!(f, "the simulator worker died: {s}"),
            CallError::Timeout(d) => write!(
                f,
                "the simulator worker did not answer within {} s",
                d.as_secs()
            ),
            CallError::Failed(s) => write!(f, "the simulator worker failed: {s}"),
        }
    }
}

/// One running worker.
pub struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stderr: Arc<Mutex<VecDeque<String>>>,
    /// What the worker said in answer to `hello` (GL backend, package versions, pid).
    pub hello: Value,
}

const STDERR_LINES: usize = 40;

impl Worker {
    /// Starts a worker and waits (up to `start_timeout`) for its `hello`.
    pub fn spawn(env: &PythonEnv, start_timeout: Duration) -> Result<Worker> {
        let mut cmd = env.module("openvla_sim.worker");
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd.spawn().with_context(|| {
            format!(
                "starting the simulator worker with {} (run `bash tools/setup.sh`)",
                env.python.display()
            )
        })?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let stderr_pipe = child.stderr.take().context("worker stderr")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        let tail = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr_pipe).lines().map_while(Result::ok) {
                tracing::debug!("worker: {line}");
                if let Ok(mut t) = tail.lock() {
                    if t.len() == STDERR_LINES {
                        t.pop_front();
                    }
                    t.push_back(line);
                }
            }
        });
        let stdin = child.stdin.take();
        let mut w = Worker {
            child,
            stdin,
            lines,
            stderr,
            hello: Value::Null,
        };
        match w.call(&json!({"op": "hello"}), start_timeout) {
            Ok(h) => w.hello = h,
            Err(e) => bail!("the simulator worker did not start: {e}"),
        }
        Ok(w)
    }

    /// The worker's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stderr_tail(&self) -> String {
        // Give the reader thread a moment to take the last lines of a dying process.
        std::thread::sleep(Duration::from_millis(100));
        self.stderr
            .lock()
            .map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }

    fn died(&mut self) -> CallError {
        let status = match self.child.try_wait() {
            Ok(Some(s)) => format!("{s}"),
            _ => {
                let _ = self.child.kill();
                match self.child.wait() {
                    Ok(s) => format!("{s} (killed)"),
                    Err(e) => format!("unknown exit ({e})"),
                }
            }
        };
        let tail = self.stderr_tail();
        CallError::Died(if tail.is_empty() {
            status
        } else {
            format!("{status}; its last output:\n{tail}")
        })
    }

    /// Sends one command and waits up to `timeout` for its answer.
    pub fn call(&mut self, cmd: &Value, timeout: Duration) -> Result<Value, CallError> {
        let line = format!("{cmd}\n");
        let sent = match self.stdin.as_mut() {
            Some(s) => s.write_all(line.as_bytes()).and_then(|_| s.flush()).is_ok(),
            None => false,
        };
        if !sent {
            return Err(self.died());
        }
        let answer = match self.lines.recv_timeout(timeout) {
            Ok(a) => a,
            Err(RecvTimeoutError::Timeout) => {
                self.kill();
                return Err(CallError::Timeout(timeout));
            }
            Err(RecvTimeoutError::Disconnected) => return Err(self.died()),
        };
        let v: Value = serde_json::from_str(&answer).map_err(|e| {
            CallError::Failed(format!(
                "unreadable answer ({e}): {}",
                truncate(&answer, 300)
            ))
        })?;
        if v.get("ok").and_then(Value::as_bool) == Some(true) {
            Ok(v)
        } else {
            let msg = v
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("no error message")
                .to_string();
            if v.get("fatal").and_then(Value::as_bool) == Some(true) {
                return Err(CallError::Died(msg));
            }
            Err(CallError::Failed(msg))
        }
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        self.stdin = None;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(mut s) = self.stdin.take() {
            let _ = s.write_all(b"{\"op\": \"quit\"}\n");
        }
        for _ in 0..20 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill();
    }
}

/// At most `n` characters of `s`.
pub fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n).collect();
        t.push_str("...");
        t
    }
}
