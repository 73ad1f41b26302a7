//! `openvla sim demos metaworld`: scripted-expert demonstrations as a LeRobot v3 dataset.
//!
//! Exactly the evaluation's camera (corner4 rotated 180 degrees, fast render settings), image
//! size, state (obs[:4]) and instructions (LeRobot's descriptions); actions clipped to [-1, 1];
//! 80 fps. An episode ends `--extra-steps` steps after its first success. Failed expert episodes
//! are dropped and counted, and replaced by fresh seeds (at most `--per-task` extra attempts per
//! task).
//!
//! Initial conditions never meet an evaluation's: demo seeds are
//! `DEMO_SEED_BASE + 1_000_000 * (task's MT50 position) + attempt` (evaluation seeds must stay below
//! DEMO_SEED_BASE), and each worker refuses a demo whose random vector equals one of the
//! benchmark's 50 goals (`--protocol metaworld`).

use crate::metaworld::DEMO_SEED_BASE;
use crate::pool::{self, Job, Outcome, PoolConfig};
use crate::render::Render;
use crate::tasks;
use crate::worker::PythonEnv;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Arguments of `openvla sim demos metaworld`.
#[derive(clap::Args, Debug, Clone)]
pub struct DemosArgs {
    /// Tasks: mt10, mt50, easy, medium, hard, very_hard, or names, comma-separated.
    #[arg(long, default_value = "mt10")]
    pub tasks: String,
    /// Successful demonstrations per task.
    #[arg(long, default_value_t = 50)]
    pub per_task: u64,
    /// Output directory of the LeRobot v3 dataset (must not exist or be empty, unless
    /// `--resume`).
    #[arg(long)]
    pub out: PathBuf,
    /// Continue an interrupted run in `--out`: episodes already recorded (listed in
    /// `.staging/journal.jsonl`) are kept, and only the missing ones are recorded. The other
    /// flags must equal the interrupted run's.
    #[arg(long)]
    pub resume: bool,
    /// Simulator worker processes (default: one per core).
    #[arg(long)]
    pub envs: Option<usize>,
    /// Camera image size (square), as `openvla eval metaworld --image-size`.
    #[arg(long, default_value_t = 224)]
    pub image_size: u32,
    /// Render settings, as `openvla eval metaworld --render`: fast, or default (MuJoCo's, as
    /// Meta-World's `env.render()` and LeRobot's evaluation; about 5-10x slower on llvmpipe).
    #[arg(long, value_enum, default_value = "fast")]
    pub render: Render,
    /// Steps recorded after the first success.
    #[arg(long, default_value_t = 10)]
    pub extra_steps: u64,
    /// Encode the videos losslessly (H.264 RGB, -qp 0): exact frames, large files.
    #[arg(long)]
    pub lossless: bool,
    /// Before recording, move the hand in one random direction (uniform in [-1, 1]³, gripper
    /// effort 0) for a random number of steps in 0..=N, unrecorded: the episode then starts
    /// from a random hand position up to N cm from the task's fixed start. Without it, a
    /// policy can read where the goal is from how far the hand has moved from that start
    /// (the state), and learns to ignore the camera (docs/evaluation.md). 0: the fixed start.
    #[arg(long, default_value_t = 0)]
    pub start_steps: u64,
    /// Gaussian noise of this standard deviation added to the expert's xyz action before it
    /// is executed (then clipped to [-1, 1]); the dataset records the expert's clean action
    /// (DART, Laskey et al. 2017): the demos show how the expert recovers from where noise
    /// took the hand. 0: the expert's actions are executed as they are.
    #[arg(long, default_value_t = 0.0)]
    pub action_noise: f64,
    /// Also write each episode's raw frames (`episode-N.rgb`, N x H x W x 3 bytes) and its
    /// states and actions (`episode-N.json`) here (for checks).
    #[arg(long, hide = true)]
    pub keep_raw: Option<PathBuf>,
}

/// What `openvla sim demos` wrote.
#[derive(Debug, Clone)]
pub struct DemosOutcome {
    /// Episodes in the dataset.
    pub episodes: u64,
    /// Frames in the dataset.
    pub frames: u64,
    /// Expert episodes that failed and were dropped, per task.
    pub dropped: Vec<(String, u64)>,
}

struct Pending {
    task: String,
    attempt: u64,
}

/// File (in the staging directory) that records every finished attempt, one JSON object a
/// line: `{"task", "attempt", "success", "answer"}`; `--resume` restarts from it.
const JOURNAL: &str = "journal.jsonl";

/// File (in the staging directory) holding the flags that shape the recordings; `--resume`
/// refuses a run whose flags differ.
const RUN_FLAGS: &str = "run.json";

/// The flags a resumed run must share with the interrupted one.
fn run_flags(a: &DemosArgs) -> Value {
    let mut flags = json!({"tasks": a.tasks, "per_task": a.per_task, "image_size": a.image_size,
           "extra_steps": a.extra_steps, "lossless": a.lossless});
    // Recorded only when not fast, so that runs from before the flag resume.
    if let Some(r) = a.render.recorded() {
        flags["render"] = json!(r);
    }
    // Likewise recorded only when set.
    if a.start_steps > 0 {
        flags["start_steps"] = json!(a.start_steps);
    }
    if a.action_noise > 0.0 {
        flags["action_noise"] = json!(a.action_noise);
    }
    flags
}

/// Finished attempts of an interrupted run, per task: (successful attempts with their answers,
/// attempt numbers finished, dropped count).
type Restored = (
    Vec<Vec<(u64, Value)>>,
    Vec<std::collections::BTreeSet<u64>>,
    Vec<u64>,
);

/// Reads the journal of `staging` for `task_list`. A torn last line (the run was killed while
/// writing it) is ignored; any other unreadable line is an error.
fn read_journal(staging: &Path, task_list: &[String]) -> Result<Restored> {
    let mut good = vec![Vec::new(); task_list.len()];
    let mut finished = vec![std::collections::BTreeSet::new(); task_list.len()];
    let mut dropped = vec![0u64; task_list.len()];
    let path = staging.join(JOURNAL);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let v: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(_) if i + 1 == lines.len() => break,
            Err(e) => bail!("{} line {}: {e}", path.display(), i + 1),
        };
        let (Some(task), Some(attempt), Some(success)) = (
            v["task"].as_str(),
            v["attempt"].as_u64(),
            v["success"].as_bool(),
        ) else {
            bail!(
                "{} line {}: expected task, attempt and success",
                path.display(),
                i + 1
            );
        };
        let Some(t) = task_list.iter().position(|x| x == task) else {
            bail!(
                "{} line {}: task {task} is not in --tasks",
                path.display(),
                i + 1
            );
        };
        if !finished[t].insert(attempt) {
            continue;
        }
        if success {
            good[t].push((attempt, v["answer"].clone()));
        } else {
            dropped[t] += 1;
        }
    }
    Ok((good, finished, dropped))
}

/// Runs `openvla sim demos metaworld`.
pub fn run(a: &DemosArgs) -> Result<DemosOutcome> {
    let task_list = tasks::resolve(&a.tasks)?;
    if a.per_task == 0 {
        bail!("--per-task must be at least 1");
    }
    if a.per_task > 100_000 {
        bail!("--per-task {} is more than 100000", a.per_task);
    }
    if !(32..=1024).contains(&a.image_size) {
        bail!("--image-size {} is outside 32..=1024", a.image_size);
    }
    if a.start_steps > 200 {
        bail!(
            "--start-steps {} is more than 200 (the hand moves 1 cm a step at most; the episode has 500)",
            a.start_steps
        );
    }
    if !(0.0..=2.0).contains(&a.action_noise) {
        bail!(
            "--action-noise {} must be a standard deviation in 0..=2 (actions are in [-1, 1])",
            a.action_noise
        );
    }
    let envs = a.envs.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    if envs == 0 {
        bail!("--envs must be at least 1");
    }
    let staging = a.out.join(".staging");
    let flags_path = staging.join(RUN_FLAGS);
    if a.resume {
        let old: Value = std::fs::read_to_string(&flags_path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .with_context(|| {
                format!(
                    "--resume: {} holds no interrupted recording (no readable {})",
                    a.out.display(),
                    flags_path.display()
                )
            })?;
        if old != run_flags(a) {
            bail!(
                "--resume: the interrupted run in {} used {old}; this one asks for {}",
                a.out.display(),
                run_flags(a)
            );
        }
    } else if a.out.exists()
        && std::fs::read_dir(&a.out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        bail!(
            "--out {} exists and is not empty (use --resume to continue an interrupted run)",
            a.out.display()
        );
    }
    let env = PythonEnv::discover()?;
    std::fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    std::fs::write(&flags_path, run_flags(a).to_string())
        .with_context(|| format!("writing {}", flags_path.display()))?;
    if let Some(raw) = &a.keep_raw {
        std::fs::create_dir_all(raw).with_context(|| format!("creating {}", raw.display()))?;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let total = task_list.len() as u64 * a.per_task;
    let bar = if std::io::stderr().is_terminal() {
        let b = ProgressBar::new(total);
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} [{bar:30}] {pos}/{len} demos, {msg}, ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    // Per task: successful episodes (attempt, answer), attempts finished, and dropped ones.
    let (mut good, mut finished, mut dropped) = read_journal(&staging, &task_list)?;
    bar.inc(
        good.iter()
            .map(|g| g.len().min(a.per_task as usize) as u64)
            .sum(),
    );
    let journal_path = staging.join(JOURNAL);
    let mut journal = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&journal_path)
        .with_context(|| format!("opening {}", journal_path.display()))?;
    let started = Instant::now();
    let cfg = PoolConfig {
        workers: envs,
        job_timeout: Duration::from_secs(1800),
        start_timeout: Duration::from_secs(180),
    };
    loop {
        let mut pending = Vec::new();
        for (t, task) in task_list.iter().enumerate() {
            let missing = a.per_task.saturating_sub(good[t].len() as u64);
            let budget = (2 * a.per_task).saturating_sub(finished[t].len() as u64);
            // The lowest attempt numbers not finished yet (an attempt cut off by a kill is
            // recorded again with the same seed).
            let fresh = (0..2 * a.per_task).filter(|n| !finished[t].contains(n));
            for attempt in fresh.take(missing.min(budget) as usize) {
                pending.push(Pending {
                    task: task.clone(),
                    attempt,
                });
            }
        }
        if pending.is_empty() {
            break;
        }
        let jobs: Vec<Job> = pending
            .iter()
            .map(|p| {
                let t = mt50_position(&p.task);
                let seed = DEMO_SEED_BASE + 1_000_000 * t + p.attempt;
                Job {
                    cmd: json!({
                        "op": "demo", "task": p.task, "seed": seed, "image_size": a.image_size,
                        "render": a.render.name(),
                        "extra_steps": a.extra_steps, "staging": staging,
                        "key": format!("{}-{}", p.task, p.attempt), "lossless": a.lossless,
                        "save_raw": a.keep_raw.is_some(),
                        "start_steps": a.start_steps, "action_noise": a.action_noise,
                    }),
                }
            })
            .collect();
        let mut failure: Option<String> = None;
        pool::run(
            &env,
            jobs,
            &cfg,
            stop.clone(),
            |_| {},
            |i, outcome| {
                let p = &pending[i];
                let t = task_list.iter().position(|x| *x == p.task).unwrap_or(0);
                if let Outcome::Done(v, _) = &outcome {
                    let success = v["success"].as_bool() == Some(true);
                    let line = json!({"task": p.task, "attempt": p.attempt, "success": success,
                                      "answer": v});
                    writeln!(journal, "{line}")
                        .and_then(|_| journal.flush())
                        .with_context(|| format!("writing {}", journal_path.display()))?;
                    finished[t].insert(p.attempt);
                }
                match outcome {
                    Outcome::Done(v, _) if v["success"].as_bool() == Some(true) => {
                        good[t].push((p.attempt, v));
                        bar.inc(1);
                    }
                    Outcome::Done(_, _) => dropped[t] += 1,
                    Outcome::Failed(reason, _) => {
                        failure
                            .get_or_insert(format!("{} attempt {}: {reason}", p.task, p.attempt));
                    }
                }
                bar.set_message(format!("{} dropped", dropped.iter().sum::<u64>()));
                Ok(())
            },
        )?;
        if let Some(f) = failure {
            bail!("a demonstration could not be recorded: {f}");
        }
        if stop.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
    }
    bar.finish_and_clear();

    // The manifest interleaves the tasks (the first demo of every task, then the second, ...),
    // so any contiguous run of episodes covers every task: a training stream whose shuffle
    // buffer is smaller than the dataset still mixes all tasks in each batch.
    let mut per_task: Vec<Vec<Value>> = Vec::new();
    for (t, task) in task_list.iter().enumerate() {
        good[t].sort_by_key(|g| g.0);
        per_task.push(
            good[t]
                .iter()
                .take(a.per_task as usize)
                .map(|(attempt, v)| {
                    json!({
                        "key": format!("{task}-{attempt}"), "task": task, "length": v["length"],
                        "image_stats": v["image_stats"],
                        "seed": DEMO_SEED_BASE + 1_000_000 * mt50_position(task) + attempt,
                        "success_step": v["success_step"],
                    })
                })
                .collect(),
        );
    }
    let episodes = interleave(per_task);
    let frames: u64 = episodes.iter().filter_map(|e| e["length"].as_u64()).sum();
    let manifest = json!({
        "episodes": episodes,
        "image_size": a.image_size,
        "lossless": a.lossless,
        "provenance": {
            "generator": "openvla sim demos metaworld",
            "openvla_version": env!("CARGO_PKG_VERSION"),
            "camera": a.render.camera(),
            "state": "obs[:4]",
            "extra_steps_after_success": a.extra_steps,
            "start_steps": a.start_steps,
            "action_noise": a.action_noise,
            "seed_rule": format!("{DEMO_SEED_BASE} + 1000000 * (MT50 position of the task) + attempt"),
            "dropped_failed_expert_episodes": task_list.iter().zip(&dropped)
                .map(|(t, d)| (t.clone(), json!(d))).collect::<serde_json::Map<_, _>>(),
            "episode_seeds": episodes.iter().map(|e| e["seed"].clone()).collect::<Vec<_>>(),
        },
    });
    let manifest_path = staging.join("manifest.json");
    std::fs::write(&manifest_path, serde_json::to_string(&manifest)?)?;
    if let Some(raw) = &a.keep_raw {
        keep_raw(&staging, raw, &manifest)?;
    }
    let st = env
        .module("openvla_sim.lerobot_v3")
        .arg("assemble")
        .arg("--staging")
        .arg(&staging)
        .arg("--out")
        .arg(&a.out)
        .arg("--manifest")
        .arg(&manifest_path)
        .status()
        .context("running the LeRobot v3 writer")?;
    if !st.success() {
        bail!(
            "writing the LeRobot v3 dataset failed ({st}); the recordings stay in {}",
            staging.display()
        );
    }
    std::fs::remove_dir_all(&staging).ok();
    let dropped: Vec<(String, u64)> = task_list.iter().cloned().zip(dropped).collect();
    eprintln!(
        "openvla sim demos: {} episodes, {frames} frames in {} ({:.0} s); failed expert episodes dropped: {}",
        manifest["episodes"].as_array().map_or(0, Vec::len),
        a.out.display(),
        started.elapsed().as_secs_f64(),
        dropped.iter().map(|(_, d)| d).sum::<u64>()
    );
    Ok(DemosOutcome {
        episodes: manifest["episodes"].as_array().map_or(0, Vec::len) as u64,
        frames,
        dropped,
    })
}

/// Round-robin over the lists: element 0 of each list in list order, then element 1, ...
/// (shorter lists simply run out).
fn interleave<T>(lists: Vec<Vec<T>>) -> Vec<T> {
    let mut iters: Vec<_> = lists.into_iter().map(Vec::into_iter).collect();
    let mut out = Vec::new();
    loop {
        let before = out.len();
        out.extend(iters.iter_mut().filter_map(Iterator::next));
        if out.len() == before {
            return out;
        }
    }
}

fn mt50_position(task: &str) -> u64 {
    tasks::table()
        .mt50
        .iter()
        .position(|t| t == task)
        .unwrap_or(0) as u64
}

fn keep_raw(staging: &Path, raw: &Path, manifest: &Value) -> Result<()> {
    let eps = manifest["episodes"].as_array().cloned().unwrap_or_default();
    for (n, e) in eps.iter().enumerate() {
        let key = e["key"].as_str().unwrap_or("");
        std::fs::copy(
            staging.join(format!("{key}.rgb")),
            raw.join(format!("episode-{n}.rgb")),
        )
        .with_context(|| format!("copying the raw frames of {key}"))?;
        std::fs::copy(
            staging.join(format!("{key}.json")),
            raw.join(format!("episode-{n}.json")),
        )
        .with_context(|| format!("copying the states and actions of {key}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::interleave;

    #[test]
    fn interleave_is_round_robin_and_keeps_every_item() {
        let out = interleave(vec![
            vec!["a0", "a1", "a2"],
            vec!["b0"],
            vec![],
            vec!["c0", "c1"],
        ]);
        assert_eq!(out, ["a0", "b0", "c0", "a1", "c1", "a2"]);
        assert!(interleave::<u8>(vec![]).is_empty());
    }
}
