//! `openvla eval metaworld`: closed-loop episodes in Meta-World through the policy's HTTP server.
//!
//! Flags are checked (tasks, episodes, seeds, the policy's action dimension and inputs) before any
//! worker starts. Episodes go task by task to the worker pool; each finished episode is appended
//! to `episodes.jsonl` at once, so Ctrl-C (which stops the pool) and `--resume` (which skips what
//! that file holds) lose nothing. At the end (or on Ctrl-C) the scores are written:
//! `results.json`, `results.md`, `success.png`, and per task the first episode's MP4 and contact
//! sheet under `videos/`.

use crate::policy::{choose_unnorm_key, model_path, Endpoint, PolicyInputs, PolicyKind};
use crate::pool::{self, Job, Outcome, PoolConfig};
use crate::render::Render;
use crate::results::{markdown, summarize, EpisodeRecord};
use crate::tasks;
use crate::worker::PythonEnv;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use openvla::kernels::ComputePrecision;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Seeds of demonstrations start here (python/sim/openvla_sim/sim.py DEMO_SEED_BASE); evaluation
/// seeds stay below, so demos never replay an evaluation episode.
pub const DEMO_SEED_BASE: u64 = 1_000_000_000;

/// The benchmark's fixed goals per task (`--protocol metaworld`).
pub const METAWORLD_GOALS: u64 = 50;

/// The evaluation protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// LeRobot's (`lerobot-eval --env.type=metaworld`): seeded random object and goal positions.
    Lerobot,
    /// The benchmark's own: episode i runs fixed goal i of the 50 of MT1(task, seed=42).
    Metaworld,
}

/// Arguments of `openvla eval metaworld`.
#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    /// OpenVLA model directory to serve (in this process, over loopback HTTP).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Arithmetic of the served model's many-row products: f32 (exact) or bf16 (bf16 operands,
    /// f32 sums; AMX or AVX512-BF16 where the CPU has them). Default: the model's
    /// `inference_compute` (config.json), else f32. With --model only; part of the run's config
    /// (checked by --resume) when bf16.
    #[arg(long)]
    pub compute: Option<openvla::kernels::ComputePrecision>,
    /// Tasks: mt10, mt50, easy, medium, hard, very_hard, or names (reach-v3,push-v3), comma-separated.
    #[arg(long, default_value = "mt10")]
    pub tasks: String,
    /// Episodes per task.
    #[arg(long, default_value_t = 10)]
    pub episodes: u64,
    /// Simulator worker processes (default: one per core).
    #[arg(long)]
    pub envs: Option<usize>,
    /// Output directory (results.json, results.md, success.png, videos/, episodes.jsonl).
    #[arg(long, default_value = "runs/eval-metaworld")]
    pub out: PathBuf,
    /// First seed: episode i of every task runs env.seed(seed + i).
    #[arg(long, default_value_t = 1000)]
    pub seed: u64,
    /// Evaluate the server already running at this URL instead of serving --model.
    #[arg(long)]
    pub url: Option<String>,
    /// Which policy acts: model (--model or --url), expert (Meta-World's scripted experts over
    /// HTTP), random, or local-expert (experts inside the workers, no HTTP: a speed baseline).
    #[arg(long, value_enum, default_value = "model")]
    pub policy: PolicyKind,
    /// lerobot (seeded random positions, LeRobot's protocol) or metaworld (the 50 fixed goals).
    #[arg(long, value_enum, default_value = "lerobot")]
    pub protocol: Protocol,
    /// Camera image size in pixels (square); 480 matches LeRobot's dataset.
    #[arg(long, default_value_t = 224)]
    pub image_size: u32,
    /// Render settings: fast (no multisampling, shadows or reflections; what `openvla sim demos`
    /// records by default) or default (MuJoCo's, as Meta-World's `env.render()` and LeRobot's
    /// evaluation). Part of the run's config (checked by --resume) when not fast.
    #[arg(long, value_enum, default_value = "fast")]
    pub render: Render,
    /// Diagnostic: send the policy an all-black image (same size) instead of every rendered
    /// frame, to measure how much of its success does not depend on what the camera sees
    /// (the state and instruction still go). Videos still show the rendered frames. Part of the
    /// run's config (checked by --resume) when set.
    #[arg(long)]
    pub blind: bool,
    /// Actions of a returned chunk to run before asking again (default: the whole chunk, up to 8).
    #[arg(long)]
    pub execute: Option<usize>,
    /// Dataset statistics (`unnorm_key`) to un-normalize with; default: the model's only one with
    /// 4-D actions.
    #[arg(long)]
    pub unnorm_key: Option<String>,
    /// Finish the run in --out, skipping the episodes it already finished.
    #[arg(long)]
    pub resume: bool,
    /// Steps per episode (Meta-World's max_path_length, 500, is the protocol; lower only to test).
    #[arg(long, default_value_t = 500)]
    pub horizon: u64,
    /// Episodes per task recorded as MP4 + contact sheet (the first ones).
    #[arg(long, default_value_t = 1)]
    pub videos: u64,
    /// With --policy expert or random: the policy server declares no image input, so the workers
    /// render only the recorded episodes (outcomes are unchanged, as these policies never look at
    /// the image; for quick tables, not for speed comparisons).
    #[arg(long)]
    pub no_render: bool,
    /// Longest wait for one policy answer, in seconds; past it the episode fails.
    #[arg(long, default_value_t = 60.0)]
    pub policy_timeout_s: f64,
    /// Longest time for one whole episode, in seconds; past it the worker is restarted.
    #[arg(long, default_value_t = 1800)]
    pub episode_timeout_s: u64,
}

/// What a run produced.
#[derive(Debug)]
pub struct EvalOutcome {
    /// `results.json`'s content.
    pub results: Value,
    /// Whether every episode ran (false after Ctrl-C).
    pub complete: bool,
    /// The output directory.
    pub out: PathBuf,
}

/// Flags checked and resolved.
#[derive(Debug, Clone)]
struct Plan {
    tasks: Vec<String>,
    envs: usize,
    /// The arithmetic of a model served here: `--compute`, else the model's
    /// `inference_compute`, else f32 (f32 for a policy served elsewhere).
    compute: ComputePrecision,
}

fn check_flags(a: &EvalArgs) -> Result<Plan> {
    let tasks = tasks::resolve(&a.tasks)?;
    if a.episodes == 0 {
        bail!("--episodes must be at least 1");
    }
    if a.protocol == Protocol::Metaworld && a.episodes > METAWORLD_GOALS {
        bail!(
            "--protocol metaworld has {METAWORLD_GOALS} fixed goals per task; --episodes {} is more",
            a.episodes
        );
    }
    if a.seed.saturating_add(a.episodes) > DEMO_SEED_BASE {
        bail!(
            "--seed {} + --episodes {} reaches {DEMO_SEED_BASE}, where demonstration seeds start",
            a.seed,
            a.episodes
        );
    }
    if !(32..=1024).contains(&a.image_size) {
        bail!("--image-size {} is outside 32..=1024", a.image_size);
    }
    if a.horizon == 0 || a.horizon > 500 {
        bail!(
            "--horizon {} is outside 1..=500 (Meta-World's max_path_length)",
            a.horizon
        );
    }
    if a.execute == Some(0) {
        bail!("--execute must be at least 1 (omit it for the whole chunk, up to 8)");
    }
    if a.no_render && !matches!(a.policy, PolicyKind::Expert | PolicyKind::Random) {
        bail!("--no-render goes with --policy expert or random (a model needs its images)");
    }
    if a.blind && a.policy != PolicyKind::Model {
        bail!("--blind goes with --policy model (--model or --url); the scripted policies never look at the image");
    }
    if a.policy_timeout_s.is_nan() || a.policy_timeout_s <= 0.0 {
        bail!("--policy-timeout-s must be positive");
    }
    let envs = a.envs.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    if envs == 0 {
        bail!("--envs must be at least 1");
    }
    match (a.policy, &a.model, &a.url) {
        (PolicyKind::Model, None, None) => {
            bail!("--policy model needs --model DIR (served here) or --url URL (a running server)")
        }
        (PolicyKind::Model, Some(_), Some(_)) => bail!("give --model or --url, not both"),
        (PolicyKind::Model, Some(m), None) if !m.is_dir() => {
            bail!("--model {}: no such directory", m.display())
        }
        (k, Some(_), _) | (k, _, Some(_)) if k != PolicyKind::Model => {
            bail!("--model and --url go with --policy model, not {k:?}")
        }
        _ => {}
    }
    let compute = match (a.compute, &a.model) {
        (Some(compute), None) => bail!(
            "--compute {compute} sets the arithmetic of a model served here: it needs --model DIR \
             (a server at --url chooses its own, `openvla serve --compute`)"
        ),
        (_, Some(dir)) => {
            openvla::ModelConfig::from_file(&dir.join("config.json"))?.compute_for(a.compute)
        }
        (None, None) => ComputePrecision::F32,
    };
    Ok(Plan {
        tasks,
        envs,
        compute,
    })
}

/// The configuration recorded in results.json and compared on --resume.
fn config_json(a: &EvalArgs, plan: &Plan) -> Value {
    json!({
        "tasks": plan.tasks,
        "episodes_per_task": a.episodes,
        "envs": plan.envs,
        "seed": a.seed,
        "protocol": a.protocol,
        "policy": a.policy,
        "image_size": a.image_size,
        "camera": a.render.camera(),
        // Recorded only when not fast, so that runs from before the flag resume.
        "render": a.render.recorded(),
        // Recorded only when set, so that runs from before the flag resume.
        "blind": a.blind.then_some(true),
        "state": "obs[:4]",
        "execute": a.execute,
        "horizon": a.horizon,
        "unnorm_key": a.unnorm_key,
        "model": a.model.as_deref().map(model_path),
        // Recorded only when not the exact default, so that runs from before the flag resume.
        "compute": (plan.compute != ComputePrecision::F32).then(|| plan.compute.name()),
        "url": a.url,
        "policy_timeout_s": a.policy_timeout_s,
        "render_every_step": !a.no_render,
        "mt1_seed": 42,
    })
}

/// Keys of the config that must match for --resume.
const RESUME_KEYS: [&str; 12] = [
    "tasks",
    "episodes_per_task",
    "seed",
    "protocol",
    "policy",
    "image_size",
    "execute",
    "horizon",
    "model",
    "compute",
    "render",
    "blind",
];

fn read_records(path: &Path) -> Result<Vec<EpisodeRecord>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<EpisodeRecord>(&line) {
            Ok(r) => out.push(r),
            // A line cut by a crash mid-write: that episode runs again.
            Err(e) => tracing::warn!("{}:{}: skipped ({e})", path.display(), i + 1),
        }
    }
    Ok(out)
}

fn stop_flag() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("\ninterrupted: stopping the workers and writing partial results");
                s.store(true, Ordering::SeqCst);
            }
        });
    });
    stop
}

/// Runs `openvla eval metaworld`.
pub fn run(a: &EvalArgs) -> Result<EvalOutcome> {
    run_with_stop(a, stop_flag())
}

/// Runs with an explicit stop flag (set it to interrupt, as Ctrl-C does).
pub fn run_with_stop(a: &EvalArgs, stop: Arc<AtomicBool>) -> Result<EvalOutcome> {
    let plan = check_flags(a)?;
    let env = PythonEnv::discover()?;
    let config = config_json(a, &plan);

    // The output directory: a fresh run, or --resume of the same configuration.
    let out = a.out.clone();
    let jsonl = out.join("episodes.jsonl");
    let mut records: Vec<EpisodeRecord> = Vec::new();
    if jsonl.exists() {
        if !a.resume {
            bail!(
                "{} already holds a run (episodes.jsonl); pass --resume to finish it or choose another --out",
                out.display()
            );
        }
        let old: Value = std::fs::read_to_string(out.join("config.json"))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .context("--resume: config.json of the earlier run is missing or unreadable")?;
        for k in RESUME_KEYS {
            if old[k] != config[k] {
                bail!(
                    "--resume: {k} differs from the earlier run ({} there, {} now)",
                    old[k],
                    config[k]
                );
            }
        }
        records = read_records(&jsonl)?;
    }
    std::fs::create_dir_all(out.join("videos"))
        .with_context(|| format!("creating {}", out.display()))?;

    // The policy, checked before any worker starts.
    let mut endpoint = match (a.policy, &a.model, &a.url) {
        (PolicyKind::Model, Some(m), _) => {
            eprintln!("openvla eval: loading {}", m.display());
            Endpoint::serve_model(m, plan.envs, plan.compute)?
        }
        (PolicyKind::Model, None, Some(u)) => Endpoint::remote(u)?,
        (PolicyKind::LocalExpert, _, _) => Endpoint::local_expert(),
        (k, _, _) => Endpoint::python_policy(&env, k, a.seed, !a.no_render)?,
    };
    let inputs = PolicyInputs::from_metadata(&endpoint.metadata)?;
    inputs.check()?;
    let unnorm_key = choose_unnorm_key(&endpoint.metadata, a.unnorm_key.as_deref())?;
    let mut config = config;
    config["unnorm_key"] = json!(unnorm_key);
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;

    let finished: BTreeSet<(String, u64)> =
        records.iter().map(|r| (r.task.clone(), r.index)).collect();
    let policy_json = match a.policy {
        PolicyKind::LocalExpert => json!({"kind": "local-expert"}),
        _ => json!({
            "kind": "http", "url": endpoint.url, "inputs": inputs,
            "unnorm_key": unnorm_key, "timeout_s": a.policy_timeout_s,
        }),
    };
    let mut jobs = Vec::new();
    let mut keys = Vec::new();
    for task in &plan.tasks {
        for i in 0..a.episodes {
            if finished.contains(&(task.clone(), i)) {
                continue;
            }
            let seed = a.seed + i;
            let record = (i < a.videos).then(|| {
                let stem = out.join("videos").join(format!("{task}-ep{i:03}"));
                json!({"mp4": stem.with_extension("mp4"), "png": stem.with_extension("png")})
            });
            jobs.push(Job {
                cmd: json!({
                    "op": "episode", "task": task, "index": i, "seed": seed,
                    "protocol": a.protocol, "image_size": a.image_size, "render": a.render.name(),
                    "blind": a.blind, "horizon": a.horizon,
                    "execute": a.execute.unwrap_or(0), "policy": policy_json, "record": record,
                }),
            });
            keys.push((task.clone(), i, seed));
        }
    }
    let total = (plan.tasks.len() as u64) * a.episodes;
    eprintln!(
        "openvla eval metaworld: {} tasks x {} episodes ({} to run, {} done before), {} workers, policy {} ({})",
        plan.tasks.len(),
        a.episodes,
        jobs.len(),
        records.len(),
        plan.envs,
        json!(a.policy).as_str().unwrap_or(""),
        if endpoint.url.is_empty() { "in the workers" } else { endpoint.url.as_str() }
    );

    let bar = progress_bar(total);
    bar.set_position(records.len() as u64);
    let mut successes = records.iter().filter(|r| r.success).count();
    bar.set_message(format!("success {successes}/{}", records.len()));
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&jsonl)
        .with_context(|| format!("opening {}", jsonl.display()))?;
    let mut versions = Value::Null;
    let started = Instant::now();
    let steps_before: u64 = records.iter().map(|r| r.steps).sum();
    let pool_cfg = PoolConfig {
        workers: plan.envs,
        job_timeout: Duration::from_secs(a.episode_timeout_s),
        start_timeout: Duration::from_secs(180),
    };
    let ran = pool::run(
        &env,
        jobs,
        &pool_cfg,
        stop.clone(),
        |h| {
            if versions.is_null() {
                versions = h["versions"].clone();
                versions["mujoco_gl"] = h["gl"].clone();
            }
        },
        |i, outcome| {
            let (task, index, seed) = keys[i].clone();
            let rec = record_of(task, index, seed, outcome);
            writeln!(file, "{}", serde_json::to_string(&rec)?)?;
            file.flush()?;
            successes += rec.success as usize;
            records.push(rec);
            bar.inc(1);
            bar.set_message(format!("success {successes}/{}", records.len()));
            Ok(())
        },
    );
    bar.finish_and_clear();
    let wall = started.elapsed().as_secs_f64();
    ran?;
    endpoint.shutdown();

    let complete = records.len() as u64 >= total;
    records.sort_by(|x, y| (&x.task, x.index).cmp(&(&y.task, y.index)));
    let summary = summarize(&plan.tasks, &records);
    let new_steps = records.iter().map(|r| r.steps).sum::<u64>() - steps_before;
    let mut results = json!({
        "harness": "openvla eval metaworld",
        "openvla_version": env!("CARGO_PKG_VERSION"),
        "complete": complete,
        "episodes_done": records.len(),
        "episodes_planned": total,
        "config": config,
        "policy": {
            "kind": a.policy,
            "model": a.model.as_deref().map(model_path),
            "url": a.url,
            "metadata": endpoint.metadata,
            "inputs": inputs,
            "unnorm_key": unnorm_key,
            "execute": a.execute.map_or_else(
                || format!("whole chunk up to 8 (chunk_size {})", inputs.chunk_size),
                |k| k.to_string()),
        },
        "seeds": {
            "rule": "episode i of every task: env.seed(seed + i), then reset()",
            "first": a.seed,
            "last": a.seed + a.episodes - 1,
        },
        "versions": versions,
        "run": {"wall_s": wall, "env_steps": new_steps,
                "env_steps_per_s": if wall > 0.0 { new_steps as f64 / wall } else { 0.0 },
                "workers": plan.envs},
    });
    if let (Some(r), Some(s)) = (results.as_object_mut(), summary.as_object()) {
        for (k, v) in s {
            r.insert(k.clone(), v.clone());
        }
        r.insert(
            "episodes".into(),
            json!(records
                .iter()
                .map(|e| {
                    let mut v = json!(e);
                    v.as_object_mut().map(|o| o.remove("latencies_ms"));
                    v.as_object_mut().map(|o| o.remove("batch_sizes"));
                    v
                })
                .collect::<Vec<_>>()),
        );
    }
    write_reports(&env, &out, &results, a)?;
    if !complete {
        eprintln!(
            "partial results ({} of {total} episodes) in {}; finish with --resume",
            records.len(),
            out.display()
        );
    }
    Ok(EvalOutcome {
        results,
        complete,
        out,
    })
}

fn record_of(task: String, index: u64, seed: u64, outcome: Outcome) -> EpisodeRecord {
    let mut r = EpisodeRecord {
        task,
        index,
        seed,
        success: false,
        steps: 0,
        success_step: None,
        requests: 0,
        latencies_ms: vec![],
        batch_sizes: vec![],
        wall_s: 0.0,
        policy_s: 0.0,
        error: None,
        retries: 0,
        rand_vec: vec![],
        video: None,
        contact_sheet: None,
        media_error: None,
    };
    match outcome {
        Outcome::Done(v, retries) => {
            r.retries = retries;
            r.success = v["success"].as_bool().unwrap_or(false);
            r.steps = v["steps"].as_u64().unwrap_or(0);
            r.success_step = v["success_step"].as_u64();
            r.requests = v["requests"].as_u64().unwrap_or(0);
            r.latencies_ms = serde_json::from_value(v["latencies_ms"].clone()).unwrap_or_default();
            r.batch_sizes = serde_json::from_value(v["batch_sizes"].clone()).unwrap_or_default();
            r.wall_s = v["wall_s"].as_f64().unwrap_or(0.0);
            r.policy_s = v["policy_s"].as_f64().unwrap_or(0.0);
            r.error = v["error"].as_str().map(str::to_string);
            r.rand_vec = serde_json::from_value(v["rand_vec"].clone()).unwrap_or_default();
            r.media_error = v["media_error"].as_str().map(str::to_string);
        }
        Outcome::Failed(reason, retries) => {
            r.retries = retries;
            r.error = Some(reason);
        }
    }
    r
}

fn progress_bar(total: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(total);
    b.set_style(
        ProgressStyle::with_template(
            "{spinner} [{bar:30}] {pos}/{len} episodes, {msg}, {elapsed} elapsed, ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    b.enable_steady_tick(Duration::from_millis(500));
    b
}

fn write_reports(env: &PythonEnv, out: &Path, results: &Value, a: &EvalArgs) -> Result<()> {
    // Link each task's recorded episode in results.json's episodes.
    let mut results = results.clone();
    if let Some(eps) = results["episodes"].as_array_mut() {
        for e in eps {
            let (task, i) = (
                e["task"].as_str().unwrap_or(""),
                e["index"].as_u64().unwrap_or(0),
            );
            let stem = format!("videos/{task}-ep{i:03}");
            if out.join(format!("{stem}.mp4")).is_file() {
                e["video"] = json!(format!("{stem}.mp4"));
            }
            if out.join(format!("{stem}.png")).is_file() {
                e["contact_sheet"] = json!(format!("{stem}.png"));
            }
        }
    }
    let path = out.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results)?)
        .with_context(|| format!("writing {}", path.display()))?;
    let title = format!(
        "Meta-World, protocol {}, policy {}{}",
        json!(a.protocol).as_str().unwrap_or(""),
        json!(a.policy).as_str().unwrap_or(""),
        a.model
            .as_ref()
            .map(|m| format!(" ({})", m.display()))
            .or_else(|| a.url.as_ref().map(|u| format!(" ({u})")))
            .unwrap_or_default()
    );
    std::fs::write(out.join("results.md"), markdown(&title, &results))?;
    let chart = env
        .module("openvla_sim.media")
        .arg("chart")
        .arg(&path)
        .arg(out.join("success.png"))
        .output()
        .context("running the chart writer")?;
    if !chart.status.success() {
        eprintln!(
            "warning: success.png not written: {}",
            String::from_utf8_lossy(&chart.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: EvalArgs,
    }

    fn args(extra: &[&str]) -> EvalArgs {
        Cli::parse_from(["x"].iter().chain(extra)).a
    }

    #[test]
    fn bad_flags_fail_before_any_worker() {
        let e = |v: &[&str]| check_flags(&args(v)).unwrap_err().to_string();
        assert!(e(&["--policy", "expert", "--tasks", "fly"]).contains("unknown Meta-World task"));
        assert!(e(&["--policy", "expert", "--episodes", "0"]).contains("--episodes"));
        assert!(e(&["--policy", "expert", "--envs", "0"]).contains("--envs"));
        assert!(e(&[
            "--policy",
            "expert",
            "--protocol",
            "metaworld",
            "--episodes",
            "51"
        ])
        .contains("50 fixed goals"));
        assert!(e(&[
            "--policy",
            "expert",
            "--seed",
            "999999999",
            "--episodes",
            "2"
        ])
        .contains("demonstration seeds"));
        assert!(e(&[]).contains("--model DIR"));
        assert!(e(&["--model", "/nonexistent-model"]).contains("no such directory"));
        assert!(e(&["--policy", "random", "--url", "http://x:1"]).contains("--policy model"));
        assert!(e(&["--policy", "expert", "--execute", "0"]).contains("--execute"));
        assert!(e(&["--url", "http://127.0.0.1:1", "--compute", "bf16"]).contains("--model DIR"));
        assert!(e(&["--policy", "expert", "--compute", "bf16"]).contains("--model DIR"));
        let p = check_flags(&args(&[
            "--policy", "expert", "--tasks", "hard", "--envs", "3",
        ]))
        .unwrap();
        assert_eq!((p.tasks.len(), p.envs), (6, 3));
    }

    /// The arithmetic the served model runs with is part of the config --resume checks: the
    /// flag, else the model's `inference_compute` (the shipped policy asks for bf16); the exact
    /// f32 is recorded as absent, as in runs from before the flag, so those still resume.
    #[test]
    fn compute_enters_the_config_only_when_not_the_default() {
        let model = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/metaworld-mt10");
        let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/openvla-tiny");
        let compute = |v: &[&str]| {
            let a = args(v);
            config_json(&a, &check_flags(&a).unwrap())["compute"].clone()
        };
        assert_eq!(
            compute(&["--model", model]),
            "bf16",
            "the model's own default"
        );
        assert!(compute(&["--model", model, "--compute", "f32"]).is_null());
        assert!(
            compute(&["--model", fixture]).is_null(),
            "no inference_compute: f32"
        );
        assert_eq!(compute(&["--model", fixture, "--compute", "bf16"]), "bf16");
        assert!(compute(&["--policy", "expert"]).is_null());
        assert!(RESUME_KEYS.contains(&"compute"));
    }
}
