//! Command-line front ends, as clap `Args` structs plus `run_*` functions, so that the `openvla`
//! binary wires each with one line:
//!
//! ```ignore
//! #[derive(clap::Subcommand)]
//! enum Command {
//!     /// Compute dataset_statistics.json (mean/std/min/max/q01/q99) for a dataset.
//!     Stats(openvla_data::cli::StatsArgs),
//!     /// Describe a dataset: format, splits, features, a sample episode.
//!     Inspect(openvla_data::cli::InspectArgs),
//!     /// Measure the frame pipeline (decode + resize + augment) throughput.
//!     DataBench(openvla_data::cli::DataBenchArgs),
//! }
//! // match cmd { Command::Stats(a) => openvla_data::cli::run_stats(&a)?, ... }
//! ```
//!
//! Progress goes to stderr through indicatif; results go to stdout or the `--out` file.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::augment::AugmentConfig;
use crate::source::{DatasetSource, Format};
use crate::stats::{save_statistics, StatisticsFile, StatsAccumulator};
use crate::stream::{stream, StreamConfig, StreamDataset};

/// `openvla stats`: compute `dataset_statistics.json` as the reference does.
#[derive(Debug, Clone, Args)]
pub struct StatsArgs {
    /// Dataset directory: an RLDS/TFDS version or dataset directory, a data root (with
    /// --dataset), or a LeRobot v3 root.
    #[arg(long)]
    pub data: PathBuf,
    /// Dataset name under the data root; also selects the built-in standardization.
    #[arg(long)]
    pub dataset: Option<String>,
    /// Custom dataset description (TOML or JSON, see `openvla_data::oxe::configs`) instead of
    /// the built-in one, or for LeRobot v3 data, instead of the conventions read from
    /// meta/info.json. `--config` is accepted as an alias.
    #[arg(long = "dataset-config", visible_alias = "config")]
    pub config: Option<PathBuf>,
    /// Split expression (the reference computes statistics over `all`).
    #[arg(long, default_value = "all")]
    pub split: String,
    /// Output file.
    #[arg(long, default_value = "dataset_statistics.json")]
    pub out: PathBuf,
    /// Skip corrupt TFRecords (and report how many) instead of failing.
    #[arg(long)]
    pub skip_corrupt: bool,
    /// Memory budget for the exact-quantile value columns, in MiB; past it they spill to disk.
    #[arg(long, default_value_t = 4096)]
    pub max_memory_mb: u64,
    /// Merge into an existing output file instead of replacing it.
    #[arg(long)]
    pub merge: bool,
    /// Also compute proprio statistics from the state (`state_key`; LeRobot's
    /// `observation.state`), as OFT checkpoints need for `--proprio`. Without it proprio
    /// statistics are zeros, as the reference OpenVLA writes them. (A LeRobot dataset with
    /// `observation.environment_state` always gets an `environment_state` entry too, which
    /// `openvla finetune --aux-environment-state` needs and inference ignores.)
    #[arg(long)]
    pub proprio: bool,
}

fn progress(quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(0);
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} episodes {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb
}

/// Runs `openvla stats`.
pub fn run_stats(args: &StatsArgs) -> anyhow::Result<()> {
    let src = DatasetSource::open(&args.data, args.dataset.as_deref(), args.config.as_deref())
        .with_context(|| format!("opening {}", args.data.display()))?;
    let pb = progress(false);
    let skipped = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let mut acc = StatsAccumulator::with_memory_budget(args.max_memory_mb << 20, None);
    if args.proprio {
        acc = acc.with_proprio();
    }
    let st = src.compute_statistics(
        &args.split,
        args.skip_corrupt,
        Some(skipped.clone()),
        Some(&pb),
        acc,
    )?;
    pb.finish_and_clear();
    let mut file: StatisticsFile = if args.merge && args.out.is_file() {
        crate::stats::load_statistics(&args.out)?
    } else {
        StatisticsFile::new()
    };
    eprintln!(
        "{}: {} trajectories, {} transitions in {:.1}s{}",
        src.name(),
        st.num_trajectories,
        st.num_transitions,
        t0.elapsed().as_secs_f64(),
        match skipped.load(Ordering::Relaxed) {
            0 => String::new(),
            n => format!(", {n} corrupt records skipped"),
        }
    );
    file.insert(src.name().to_string(), st);
    save_statistics(&args.out, &file)?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

/// `openvla inspect`: describe a dataset.
#[derive(Debug, Clone, Args)]
pub struct InspectArgs {
    /// Dataset directory (see `openvla stats --data`).
    #[arg(long)]
    pub data: PathBuf,
    /// Dataset name under the data root.
    #[arg(long)]
    pub dataset: Option<String>,
    /// Custom dataset description (TOML or JSON, see `openvla_data::oxe::configs`) instead of
    /// the built-in one, or for LeRobot v3 data, instead of the conventions read from
    /// meta/info.json. `--config` is accepted as an alias.
    #[arg(long = "dataset-config", visible_alias = "config")]
    pub config: Option<PathBuf>,
    /// Split to sample from.
    #[arg(long, default_value = "train")]
    pub split: String,
    /// How many episodes to summarize.
    #[arg(long, default_value_t = 1)]
    pub episodes: usize,
    /// Skip corrupt TFRecords.
    #[arg(long)]
    pub skip_corrupt: bool,
}

/// Runs `openvla inspect`.
pub fn run_inspect(args: &InspectArgs) -> anyhow::Result<()> {
    // Metadata first, so a dataset without a built-in config can still be described.
    let builtin = DatasetSource::open(&args.data, args.dataset.as_deref(), args.config.as_deref());
    let src = match builtin {
        Ok(s) => s,
        Err(e) => {
            describe_raw(&args.data, args.dataset.as_deref())?;
            println!("standardization: unavailable ({e})");
            return Ok(());
        }
    };
    match &src.format {
        Format::Rlds(d) => {
            println!("format: RLDS (TFDS) {}", d.dir.display());
            println!("name: {}  version: {}", d.info.name, d.info.version);
            for s in &d.info.splits {
                println!(
                    "split {}: {} episodes in {} shards",
                    s.name,
                    s.num_examples(),
                    s.shard_lengths.len()
                );
            }
            println!("features:");
            for f in d.features.leaves.values() {
                println!(
                    "  {}{} {:?}",
                    f.key,
                    if f.per_step { " [per step]" } else { "" },
                    f.kind
                );
            }
        }
        #[cfg(feature = "lerobot")]
        Format::LeRobot(d) => {
            println!(
                "format: LeRobot {} {}",
                d.info.codebase_version,
                d.root.display()
            );
            println!(
                "episodes: {}  frames: {}  fps: {}  tasks: {}",
                d.episodes.len(),
                d.info.total_frames,
                d.info.fps,
                d.tasks.len()
            );
            for (k, f) in &d.info.features {
                println!("  {k}: {} {:?}", f.dtype, f.shape);
            }
        }
    }
    println!("config: {}", serde_json::to_string(&src.config)?);
    println!("reference train split: {}", src.reference_split(true));
    for t in src
        .trajectories(&args.split, args.skip_corrupt, None)?
        .take(args.episodes)
    {
        let t = t?;
        println!(
            "episode {} ({}): {} steps, instruction {:?}",
            t.episode_index,
            t.source,
            t.len(),
            t.instructions.first().cloned().unwrap_or_default()
        );
        for i in 0..t.len().min(3) {
            println!("  action[{i}] = {:?}", t.actions.row(i));
        }
    }
    Ok(())
}

fn describe_raw(data: &std::path::Path, name: Option<&str>) -> anyhow::Result<()> {
    let dir = match name {
        Some(n) => data.join(n),
        None => data.to_path_buf(),
    };
    let d = crate::rlds::RldsDataset::open(&dir)?;
    println!("format: RLDS (TFDS) {}", d.dir.display());
    for s in &d.info.splits {
        println!("split {}: {} episodes", s.name, s.num_examples());
    }
    for f in d.features.leaves.values() {
        println!(
            "  {}{} {:?}",
            f.key,
            if f.per_step { " [per step]" } else { "" },
            f.kind
        );
    }
    Ok(())
}

/// `openvla data-bench`: frames per second through decode, resize and augmentation.
#[derive(Debug, Clone, Args)]
pub struct DataBenchArgs {
    /// Dataset directory (see `openvla stats --data`).
    #[arg(long)]
    pub data: PathBuf,
    /// Dataset name under the data root.
    #[arg(long)]
    pub dataset: Option<String>,
    /// Custom dataset description (TOML or JSON, see `openvla_data::oxe::configs`) instead of
    /// the built-in one, or for LeRobot v3 data, instead of the conventions read from
    /// meta/info.json. `--config` is accepted as an alias.
    #[arg(long = "dataset-config", visible_alias = "config")]
    pub config: Option<PathBuf>,
    /// Frames to pull.
    #[arg(long, default_value_t = 2000)]
    pub frames: u64,
    /// Decode worker threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Shuffle buffer size.
    #[arg(long, default_value_t = 1000)]
    pub shuffle_buffer: usize,
    /// Disable augmentation.
    #[arg(long)]
    pub no_augment: bool,
}

/// Runs `openvla data-bench`, printing frames/s and peak RSS.
pub fn run_data_bench(args: &DataBenchArgs) -> anyhow::Result<()> {
    let src = DatasetSource::open(&args.data, args.dataset.as_deref(), args.config.as_deref())?;
    let split = src.reference_split(true);
    let cfg = StreamConfig {
        decode_threads: args.threads,
        shuffle_buffer: args.shuffle_buffer,
        augment: (!args.no_augment).then(AugmentConfig::default),
        ..StreamConfig::default()
    };
    let ds = StreamDataset {
        source: src,
        split,
        weight: 1.0,
        statistics: None,
    };
    let pb = ProgressBar::new(args.frames);
    let mut s = stream(vec![ds], cfg)?;
    // Warm up (fills the shuffle buffer) before timing.
    let warm = (args.shuffle_buffer as u64).min(args.frames / 4);
    for _ in 0..warm {
        s.next().transpose()?;
    }
    let t0 = Instant::now();
    let mut n = 0u64;
    while n < args.frames {
        match s.next() {
            Some(r) => {
                r?;
            }
            None => break,
        }
        n += 1;
        pb.inc(1);
    }
    pb.finish_and_clear();
    let dt = t0.elapsed().as_secs_f64();
    println!(
        "{n} frames in {dt:.2}s: {:.1} frames/s with {} decode threads{}; peak RSS {}",
        n as f64 / dt,
        args.threads,
        if args.no_augment {
            ""
        } else {
            " (with augmentation)"
        },
        peak_rss()
            .map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
            .unwrap_or_else(|| "n/a".into())
    );
    Ok(())
}

/// Peak resident set size in KiB (Linux `VmHWM`).
pub fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
