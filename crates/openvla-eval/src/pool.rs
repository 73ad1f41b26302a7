//! A pool of simulator workers working through a queue of jobs (episodes).
//!
//! Each pool thread owns one worker process and takes the next job when it is free. A worker that
//! dies or stops answering is killed and restarted, and its job retried once; a job whose worker
//! dies twice fails with the reason. When `stop` is set (Ctrl-C), no new job starts, the workers
//! are killed, and jobs in flight are left unfinished (not reported).

use crate::worker::{CallError, PythonEnv, Worker};
use anyhow::Result;
use serde_json::Value;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One unit of work: a command for a worker.
#[derive(Debug, Clone)]
pub struct Job {
    /// The worker command (`op` and its fields).
    pub cmd: Value,
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The worker's answer, and how many times the job was retried after a dead worker.
    Done(Value, u32),
    /// No answer (the reason), and the retries.
    Failed(String, u32),
}

/// The pool's settings.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Worker processes.
    pub workers: usize,
    /// Longest time for one job's answer.
    pub job_timeout: Duration,
    /// Longest time for a worker to start.
    pub start_timeout: Duration,
}

/// Runs `jobs` on `cfg.workers` workers, calling `on_done(job index, outcome)` on this thread
/// as each finishes, and `on_hello` with the first worker's `hello` answer. Returns when every
/// job is done or `stop` was set.
pub fn run(
    env: &PythonEnv,
    jobs: Vec<Job>,
    cfg: &PoolConfig,
    stop: Arc<AtomicBool>,
    mut on_hello: impl FnMut(&Value),
    mut on_done: impl FnMut(usize, Outcome) -> Result<()>,
) -> Result<()> {
    let total = jobs.len();
    let queue: Arc<Mutex<VecDeque<(usize, Job)>>> =
        Arc::new(Mutex::new(jobs.into_iter().enumerate().collect()));
    let pids: Arc<Mutex<Vec<Option<u32>>>> = Arc::new(Mutex::new(vec![None; cfg.workers]));
    let (tx, rx) = mpsc::channel::<Msg>();
    let mut handles = Vec::new();
    for slot in 0..cfg.workers.min(total.max(1)) {
        let (queue, pids, tx, stop, env, cfg) = (
            queue.clone(),
            pids.clone(),
            tx.clone(),
            stop.clone(),
            env.clone(),
            cfg.clone(),
        );
        handles.push(std::thread::spawn(move || {
            pool_thread(slot, &env, &cfg, &queue, &pids, &tx, &stop)
        }));
    }
    drop(tx);
    let mut done = 0;
    let mut result = Ok(());
    while done < total {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(Msg::Hello(h)) => on_hello(&h),
            Ok(Msg::Done(i, o)) => {
                done += 1;
                if let Err(e) = on_done(i, o) {
                    result = Err(e);
                    stop.store(true, Ordering::SeqCst);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if stop.load(Ordering::SeqCst) {
            kill_all(&pids);
            // Take what already finished, then leave.
            while let Ok(m) = rx.recv_timeout(Duration::from_millis(500)) {
                if let Msg::Done(i, o) = m {
                    if !matches!(o, Outcome::Failed(_, _)) {
                        let _ = on_done(i, o);
                    }
                }
            }
            break;
        }
    }
    for h in handles {
        let _ = h.join();
    }
    result
}

enum Msg {
    Hello(Value),
    Done(usize, Outcome),
}

fn kill_all(pids: &Mutex<Vec<Option<u32>>>) {
    if let Ok(p) = pids.lock() {
        for pid in p.iter().flatten() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

fn pool_thread(
    slot: usize,
    env: &PythonEnv,
    cfg: &PoolConfig,
    queue: &Mutex<VecDeque<(usize, Job)>>,
    pids: &Mutex<Vec<Option<u32>>>,
    tx: &mpsc::Sender<Msg>,
    stop: &AtomicBool,
) {
    let mut worker: Option<Worker> = None;
    let set_pid = |pid: Option<u32>| {
        if let Ok(mut p) = pids.lock() {
            p[slot] = pid;
        }
    };
    loop {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let next = queue.lock().ok().and_then(|mut q| q.pop_front());
        let Some((index, job)) = next else { break };
        let mut retries = 0u32;
        let outcome = loop {
            if worker.is_none() {
                match Worker::spawn(env, cfg.start_timeout) {
                    Ok(w) => {
                        set_pid(Some(w.pid()));
                        let _ = tx.send(Msg::Hello(w.hello.clone()));
                        worker = Some(w);
                    }
                    Err(e) => {
                        if retries >= 1 || stop.load(Ordering::SeqCst) {
                            break Outcome::Failed(format!("{e:#}"), retries);
                        }
                        retries += 1;
                        continue;
                    }
                }
            }
            if stop.load(Ordering::SeqCst) {
                break Outcome::Failed("interrupted".into(), retries);
            }
            let Some(w) = worker.as_mut() else { continue };
            match w.call(&job.cmd, cfg.job_timeout) {
                Ok(v) => break Outcome::Done(v, retries),
                Err(e) => {
                    // Dead, hung or failed inside the simulator: a fresh process, one retry.
                    if let Some(mut w) = worker.take() {
                        w.kill();
                    }
                    set_pid(None);
                    if stop.load(Ordering::SeqCst) {
                        break Outcome::Failed("interrupted".into(), retries);
                    }
                    if retries >= 1 {
                        break Outcome::Failed(describe(&e, true), retries);
                    }
                    tracing::warn!("{}; retrying the episode once", describe(&e, false));
                    retries += 1;
                }
            }
        };
        if tx.send(Msg::Done(index, outcome)).is_err() {
            break;
        }
    }
    set_pid(None);
}

fn describe(e: &CallError, twice: bool) -> String {
    let s = e.to_string();
    if twice {
        format!("{s} (also on the retry)")
    } else {
        s
    }
}
