//! `openvla bench`: stage-by-stage latency medians, peak memory and efficiency of `predict`,
//! against the machine's limits and the PyTorch baseline, plus quantization accuracy.
//!
//! Without `--configs`, one configuration is timed in this process. With `--configs`, each
//! configuration runs in its own child process (so each gets its own peak RSS), then the
//! PyTorch baselines (`--pytorch`, one process each, never two at once), and the report puts
//! them side by side with the memory bandwidth and peak rates measured in the same run
//! (`--limits`). `--accuracy N` compares each configuration's action tokens with f32 on N
//! image/instruction pairs.

use anyhow::{anyhow, bail, Context, Result};
use openvla::config::{ModelConfig, Variant};
use openvla::head::ActionHead;
use openvla::kernels::{probe, ComputePrecision};
use openvla::quant::Quantization;
use openvla::synth::SynthShape;
use openvla::{LoadOptions, Observation, Policy, Precision};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Arguments of `openvla bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// HF model directory (e.g. one written by `openvla synth` or `openvla quantize`).
    #[arg(long, required_unless_present = "shape")]
    model: Option<PathBuf>,
    /// Benchmark a random-weight checkpoint of this shape (tiny, minivla, 7b), written to
    /// `<models-dir>/<shape>-random` by `openvla synth` first if it is not there.
    #[arg(long, conflicts_with = "model")]
    shape: Option<SynthShape>,
    /// Where `--shape` checkpoints live.
    #[arg(long, default_value = "bench-models")]
    models_dir: PathBuf,
    /// Image to use; a deterministic 256x256 test pattern when omitted.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Instruction.
    #[arg(long, default_value = "put the carrot in the bowl")]
    instruction: String,
    /// Robot state for OpenVLA-OFT models with a proprio projector: comma-separated raw values
    /// (default: zeros of the model's proprio dimension). OFT models that take several images
    /// get `--image` (or the test pattern) for each of them.
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    proprio: Option<Vec<f64>>,
    /// Dataset statistics to use (defaults to the only one, if there is one).
    #[arg(long)]
    unnorm_key: Option<String>,
    /// Timed runs after one warm-up run (with --configs, 0 skips the timing, e.g. for an
    /// accuracy-only run).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Weight precision (auto, f32, bf16, f16) of the single configuration.
    #[arg(long, default_value = "auto")]
    precision: Precision,
    /// Quantize while loading (int8, int4), single configuration.
    #[arg(long)]
    quantize: Option<Quantization>,
    /// Arithmetic of the many-row products (f32: exact; bf16: bf16 operands, f32 sums), single
    /// configuration. Default: the model's `inference_compute` (config.json), else f32, as
    /// `predict` and `serve` load it.
    #[arg(long)]
    compute: Option<ComputePrecision>,
    /// Configurations to time, each in its own process: comma-separated among f32, bf16, f16,
    /// int8, int4, and bf16-compute (bf16 weights and bf16 arithmetic).
    #[arg(long, value_delimiter = ',')]
    configs: Vec<BenchConfig>,
    /// PyTorch baselines to time after ours (fp32, bf16), one process each.
    #[arg(long, value_delimiter = ',')]
    pytorch: Vec<String>,
    /// Python with torch 2.2.0, timm 0.9.10, transformers 4.40.1.
    #[arg(long, default_value = ".venv/bin/python")]
    python: PathBuf,
    /// The baseline script.
    #[arg(long, default_value = "tools/bench/pytorch_baseline.py")]
    pytorch_script: PathBuf,
    /// Timed PyTorch runs (default: --runs).
    #[arg(long)]
    pytorch_runs: Option<usize>,
    /// Measure memory bandwidth and peak arithmetic rates first, for efficiency figures.
    #[arg(long)]
    limits: bool,
    /// Compare the action tokens of every configuration with f32 on this many
    /// image/instruction pairs.
    #[arg(long)]
    accuracy: Option<usize>,
    /// Write the accuracy pairs (`--accuracy N`) as `pair_NNN.ppm` + `pairs.json` to this
    /// directory, for `tools/bench/pytorch_baseline.py --pairs` (PyTorch's own bf16-vs-fp32
    /// agreement on the same inputs).
    #[arg(long, requires = "accuracy")]
    dump_pairs: Option<PathBuf>,
    /// Take the accuracy pairs from this dataset's frames (image and instruction, frames spread
    /// evenly over the dataset) instead of the built-in synthetic ones, e.g. the data a
    /// fine-tuned model was trained on.
    #[arg(long, requires = "accuracy")]
    accuracy_data: Option<PathBuf>,
    /// Take the accuracy pairs from a directory in the `--dump-pairs` format (`pairs.json`:
    /// a list of `{"image": FILE, "instruction": TEXT}`; PPM, PNG or JPEG images), e.g. your
    /// own camera frames. `--accuracy N` then uses the first N.
    #[arg(long, requires = "accuracy", conflicts_with = "accuracy_data")]
    accuracy_pairs: Option<PathBuf>,
    /// Dataset name under `--accuracy-data` (a data root holding several datasets).
    #[arg(long, requires = "accuracy_data")]
    accuracy_dataset: Option<String>,
    /// Requests per batch in the accuracy runs (decoded together, prefilled one by one).
    #[arg(long, default_value_t = 8)]
    accuracy_batch: usize,
    /// Write the whole report as JSON to this file.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// A timed configuration: precision of dense weights, quantization and arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BenchConfig {
    precision: Precision,
    quantize: Option<Quantization>,
    compute: ComputePrecision,
}

impl std::str::FromStr for BenchConfig {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let f32 = ComputePrecision::F32;
        let (precision, quantize, compute) = match s {
            "f32" => (Precision::F32, None, f32),
            "bf16" => (Precision::Bf16, None, f32),
            "bf16-compute" => (Precision::Bf16, None, ComputePrecision::Bf16),
            "f16" => (Precision::F16, None, f32),
            "int8" => (Precision::Auto, Some(Quantization::Int8), f32),
            "int4" => (Precision::Auto, Some(Quantization::Int4), f32),
            _ => {
                return Err(format!(
                    "unknown configuration {s:?}; expected f32, bf16, bf16-compute, f16, int8 \
                     or int4"
                ))
            }
        };
        Ok(BenchConfig {
            precision,
            quantize,
            compute,
        })
    }
}

impl std::fmt::Display for BenchConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.quantize, self.compute) {
            (Some(q), ComputePrecision::F32) => write!(f, "{q}"),
            (Some(q), c) => write!(f, "{q}-{c}-compute"),
            (None, ComputePrecision::F32) => write!(f, "{}", self.precision),
            (None, c) if self.precision.to_string() == c.name() => write!(f, "{c}-compute"),
            (None, c) => write!(f, "{}-{c}-compute", self.precision),
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Peak resident memory of this process (VmHWM), in bytes.
pub fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// The 1-minute load average (other processes competing for the cores).
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn test_pattern() -> Result<openvla_image::RgbImage> {
    let (w, h) = (256u32, 256u32);
    let mut data = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        for x in 0..w {
            data.extend_from_slice(&[
                (x % 256) as u8,
                (y % 256) as u8,
                ((x * 7 + y * 13) % 256) as u8,
            ]);
        }
    }
    Ok(openvla_image::RgbImage::from_raw(w, h, data)?)
}

/// The model family and head, as reports name it.
fn family(policy: &Policy) -> &'static str {
    match policy.head() {
        ActionHead::Autoregressive256(_) => "openvla-256-bin",
        ActionHead::ParallelL1(_) => "oft-l1",
        ActionHead::ParallelDiscrete(_) => "oft-discrete",
    }
}

/// `obs` completed for what `policy` takes: an OpenVLA-OFT model that reads several images
/// gets the primary image again for each wrist view, and a model with a proprio projector gets
/// `proprio` (zeros of its dimension when none is given). Other models take `obs` as it is.
fn observation_for(
    policy: &Policy,
    mut obs: Observation,
    proprio: Option<&[f64]>,
) -> Result<Observation> {
    if policy.oft().is_none() {
        return Ok(obs);
    }
    let primary = obs
        .primary()
        .cloned()
        .ok_or_else(|| anyhow!("the observation has no image"))?;
    for i in obs.images.len()..policy.num_images() {
        obs.images.push((format!("wrist_{i}"), primary.clone()));
    }
    obs.proprio = match (policy.proprio_dim(), proprio) {
        (Some(_), Some(p)) => Some(p.to_vec()),
        (Some(d), None) => Some(vec![0.0; d]),
        (None, _) => None,
    };
    Ok(obs)
}

/// Floating-point operations of each compute stage, from the configuration.
#[derive(Debug, Clone, Copy)]
struct StageFlops {
    vision: f64,
    projector: f64,
    prefill: f64,
}

/// `logit_rows`: rows that go through the LM head in the timed pass (1 for the 256-bin
/// prefill's last position, 0 for the OFT L1 head, the window's K·D rows for OFT's discrete
/// head).
fn stage_flops(cfg: &ModelConfig, prefill_tokens: usize, logit_rows: usize) -> StageFlops {
    let mut vision = 0.0;
    for t in &cfg.towers {
        let n = (t.num_patches() + t.num_prefix_tokens()) as f64;
        let (d, h, p) = (
            t.embed_dim as f64,
            t.mlp_hidden() as f64,
            t.patch_size as f64,
        );
        let blocks = (t.selected_block() + 1) as f64;
        vision += 2.0 * t.num_patches() as f64 * 3.0 * p * p * d;
        vision += blocks * (2.0 * n * (4.0 * d * d + 2.0 * d * h) + 4.0 * n * n * d);
    }
    let patches = cfg.towers.first().map_or(0, |t| t.num_patches()) as f64;
    let (vd, ld) = (cfg.vision_dim() as f64, cfg.text.hidden_size as f64);
    let projector = if cfg.variant == Variant::OpenVla {
        2.0 * patches * (vd * 4.0 * vd + 4.0 * vd * ld + ld * ld)
    } else {
        2.0 * patches * (vd * ld + ld * ld)
    };
    let c = &cfg.text;
    let (d, i) = (c.hidden_size as f64, c.intermediate_size as f64);
    let q = (c.num_attention_heads * c.head_dim()) as f64;
    let kv = (c.num_key_value_heads * c.head_dim()) as f64;
    let t = prefill_tokens as f64;
    let per_layer = 2.0 * t * (d * (q + 2.0 * kv) + q * d + 3.0 * d * i) + 4.0 * t * t * q;
    let prefill =
        c.num_hidden_layers as f64 * per_layer + 2.0 * logit_rows as f64 * d * c.vocab_size as f64;
    StageFlops {
        vision,
        projector,
        prefill,
    }
}

/// Runs the benchmark.
pub fn run(a: BenchArgs) -> Result<()> {
    let model = resolve_model(&a)?;
    if !a.json {
        eprint!("kernel dispatch:\n{}", openvla::kernels::dispatch::table());
    }
    if a.configs.is_empty() && a.pytorch.is_empty() && !a.limits && a.accuracy.is_none() {
        let r = time_one(&a, &model, a.precision, a.quantize, a.compute)?;
        print_single(&a, &r)?;
        return Ok(());
    }
    suite(&a, &model)
}

fn resolve_model(a: &BenchArgs) -> Result<PathBuf> {
    if let Some(m) = &a.model {
        return Ok(m.clone());
    }
    let shape = a.shape.ok_or_else(|| anyhow!("give --model or --shape"))?;
    let name = match shape {
        SynthShape::Tiny => "tiny",
        SynthShape::MiniVla => "minivla",
        SynthShape::OpenVla7b => "openvla-7b",
    };
    let dir = a.models_dir.join(format!("{name}-random"));
    if !dir.join("config.json").exists() {
        eprintln!(
            "openvla bench: writing a random {name} checkpoint to {}",
            dir.display()
        );
        let bar = crate::progress::Progress::new("writing weights");
        openvla::synth::write_random_checkpoint(
            &dir,
            &openvla::synth::SynthOptions {
                shape,
                seed: 0,
                max_shard_bytes: 7_000_000_000,
                tokenizer: PathBuf::from("models/openvla-tiny/tokenizer.json"),
            },
            &|d, t| bar.update(d, t),
        )
        .with_context(|| format!("writing {}", dir.display()))?;
        bar.finish();
    }
    Ok(dir)
}

/// Times one configuration in this process.
fn time_one(
    a: &BenchArgs,
    model: &Path,
    precision: Precision,
    quantize: Option<Quantization>,
    compute: Option<ComputePrecision>,
) -> Result<Value> {
    let image = match &a.image {
        Some(p) => openvla_image::open(p)?,
        None => test_pattern()?,
    };
    let load_before = load_average();
    let t0 = Instant::now();
    let policy = Policy::load(
        model,
        &LoadOptions {
            precision,
            quantize,
            compute,
            ..Default::default()
        },
    )
    .with_context(|| format!("loading model from {}", model.display()))?;
    let load_s = t0.elapsed().as_secs_f64();
    if a.proprio.is_some() && policy.proprio_dim().is_none() {
        eprintln!("openvla bench: this model takes no proprio; --proprio is ignored");
    }
    let obs = observation_for(
        &policy,
        Observation::new(image, a.instruction.clone()),
        a.proprio.as_deref(),
    )?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let family = family(&policy);
    // preprocess, vision, projector, prefill (OFT: the one LLM pass), decode/token, total, head
    let mut rows: Vec<[f64; 7]> = Vec::new();
    let mut tokens = Vec::new();
    let mut normalized = Vec::new();
    let mut prefill_len = 0;
    for i in 0..=a.runs {
        let t = Instant::now();
        let row = if policy.oft().is_some() {
            let trace = policy.trace_parallel(&obs, a.unnorm_key.as_deref())?;
            let total = ms(t.elapsed());
            let f = &trace.forward;
            prefill_len = f.inputs_embeds.dim(1)?;
            tokens = trace.prediction.token_ids.clone();
            normalized = trace.prediction.normalized_actions.clone();
            let (pre, vis, proj, llm) = (
                ms(trace.preprocess_time),
                ms(f.vision_time),
                ms(f.projector_time),
                ms(f.llm_time),
            );
            // What is left: the head (MLPResNet or the window's logits) and un-normalization.
            let head = (total - pre - vis - proj - llm).max(0.0);
            [pre, vis, proj, llm, f64::NAN, total, head]
        } else {
            let trace = policy.trace(&obs, a.unnorm_key.as_deref())?;
            let total = ms(t.elapsed());
            let g = &trace.generation;
            prefill_len = g.inputs_embeds.dim(1)?;
            let per_token = if g.decode_times.is_empty() {
                f64::NAN
            } else {
                g.decode_times.iter().map(|d| ms(*d)).sum::<f64>() / g.decode_times.len() as f64
            };
            tokens = trace.prediction.token_ids.clone();
            normalized = trace.prediction.normalized_actions.clone();
            [
                ms(trace.preprocess_time),
                ms(g.vision_time),
                ms(g.projector_time),
                ms(g.prefill_time),
                per_token,
                total,
                f64::NAN,
            ]
        };
        if i > 0 || a.runs == 0 {
            rows.push(row);
        }
    }
    let col = |j: usize| median(rows.iter().map(|r| r[j]).collect());
    let m = policy.model();
    let bytes = json!({
        "vision": m.vision.weight_bytes(),
        "projector": m.projector.weight_bytes(),
        "llm_layers": m.llm.layer_weight_bytes(),
        "lm_head": m.llm.lm_head_bytes(),
        "embed_tokens": m.llm.embedding_bytes(),
    });
    let config = BenchConfig {
        precision,
        quantize: policy.weight_policy().quantization,
        compute: policy.compute(),
    };
    let logit_rows = match policy.head() {
        ActionHead::Autoregressive256(_) => 1,
        ActionHead::ParallelL1(_) => 0,
        ActionHead::ParallelDiscrete(_) => {
            policy.chunk_size() * policy.action_dim(a.unnorm_key.as_deref())?
        }
    };
    let f = stage_flops(policy.config(), prefill_len, logit_rows);
    let chunk = policy.chunk_size();
    let flops = json!({"vision": f.vision, "projector": f.projector, "prefill": f.prefill});
    Ok(json!({
        "engine": "openvla-rs",
        "config": config.to_string(),
        "model": model.display().to_string(),
        "weights": format!("{:?}", policy.weight_policy()),
        "threads": rayon::current_num_threads(),
        "runs": a.runs,
        "load_s": load_s,
        "prefill_tokens": prefill_len,
        "family": family,
        "chunk_size": chunk,
        "actions_per_s": chunk as f64 * 1e3 / col(5),
        "median_ms": {
            "preprocess": col(0), "vision": col(1), "projector": col(2),
            "prefill": col(3), "decode_per_token": col(4), "total": col(5), "head": col(6)
        },
        "peak_rss_bytes": peak_rss().unwrap_or(0),
        "token_ids": tokens,
        "normalized_actions": normalized,
        "flops": flops,
        "weight_bytes": bytes,
        "decode_bytes_per_token": m.llm.layer_weight_bytes() + m.llm.lm_head_bytes(),
        "load_average": [load_before, load_average()],
    }))
}

fn print_single(a: &BenchArgs, r: &Value) -> Result<()> {
    if a.json {
        println!("{r}");
        return Ok(());
    }
    let m = &r["median_ms"];
    let f = |k: &str| m[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "model {} ({}, {} threads), {} runs after 1 warm-up; load {:.1} s",
        r["model"].as_str().unwrap_or(""),
        r["weights"].as_str().unwrap_or(""),
        r["threads"],
        r["runs"],
        r["load_s"].as_f64().unwrap_or(0.0)
    );
    if r["family"].as_str().is_some_and(|f| f.starts_with("oft")) {
        println!(
            "median ms: preprocess {:.1} | vision {:.1} | projector {:.1} | LLM pass ({} tokens, bidirectional) {:.1} | head {:.1} | total {:.1}",
            f("preprocess"),
            f("vision"),
            f("projector"),
            r["prefill_tokens"],
            f("prefill"),
            f("head"),
            f("total")
        );
        println!(
            "{}: a chunk of {} actions per call, {:.1} actions/s",
            r["family"].as_str().unwrap_or(""),
            r["chunk_size"],
            r["actions_per_s"].as_f64().unwrap_or(f64::NAN)
        );
    } else {
        println!(
            "median ms: preprocess {:.1} | vision {:.1} | projector {:.1} | prefill ({} tokens) {:.1} | decode/token {:.1} | total {:.1} ({:.2} actions/s)",
            f("preprocess"),
            f("vision"),
            f("projector"),
            r["prefill_tokens"],
            f("prefill"),
            f("decode_per_token"),
            f("total"),
            r["actions_per_s"].as_f64().unwrap_or(f64::NAN)
        );
    }
    println!(
        "peak RSS: {}",
        crate::human_bytes(r["peak_rss_bytes"].as_u64().unwrap_or(0))
    );
    Ok(())
}

/// Machine limits measured in this run.
fn measure_limits() -> Value {
    eprintln!("openvla bench: measuring memory bandwidth and peak rates");
    let bw = probe::memory_bandwidth(1 << 30);
    let fma = probe::fma_peak_gflops();
    let int8 = probe::int8_peak_gops();
    let peaks = probe::Peaks::measure();
    let gemm = probe::matmul_gflops(279, 4096, 4096);
    json!({
        "threads": rayon::current_num_threads(),
        "bandwidth_gbs": bw,
        "peaks": peaks,
        "path_peak_gflops": {
            "f32": peaks.path_peak(ComputePrecision::F32),
            "bf16": peaks.path_peak(ComputePrecision::Bf16),
        },
        "dispatch": openvla::kernels::dispatch::table(),
        "fma_peak_gflops": fma,
        "int8_peak_gops": int8,
        "gemm_gflops": gemm,
        "load_average": load_average(),
    })
}

fn run_child(cmd: &mut Command, what: &str) -> Result<Value> {
    eprintln!("openvla bench: running {what}");
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("starting {what}"))?;
    if !out.status.success() {
        bail!("{what} failed ({})", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .ok_or_else(|| anyhow!("{what} printed no JSON result"))?;
    serde_json::from_str(line).with_context(|| format!("parsing the result of {what}"))
}

fn suite(a: &BenchArgs, model: &Path) -> Result<()> {
    let mut report = json!({
        "model": model.display().to_string(),
        "date_unix": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        "cpu": cpu_name(),
    });
    if a.limits {
        report["limits"] = measure_limits();
    }
    let exe = std::env::current_exe().context("locating the openvla binary")?;
    let mut ours = Vec::new();
    let timed: &[BenchConfig] = if a.runs == 0 { &[] } else { &a.configs };
    for c in timed {
        let mut cmd = Command::new(&exe);
        cmd.arg("bench")
            .arg("--model")
            .arg(model)
            .args(["--runs", &a.runs.to_string(), "--json"])
            .args(["--precision", &c.precision.to_string()])
            .args(["--compute", c.compute.name()])
            .args(["--instruction", &a.instruction]);
        if let Some(q) = c.quantize {
            cmd.args(["--quantize", q.name()]);
        }
        if let Some(k) = &a.unnorm_key {
            cmd.args(["--unnorm-key", k]);
        }
        if let Some(i) = &a.image {
            cmd.arg("--image").arg(i);
        }
        if let Some(p) = &a.proprio {
            let list: Vec<String> = p.iter().map(f64::to_string).collect();
            cmd.arg(format!("--proprio={}", list.join(",")));
        }
        ours.push(run_child(&mut cmd, &format!("openvla-rs {c}"))?);
    }
    let mut torch = Vec::new();
    for dtype in &a.pytorch {
        let mut cmd = Command::new(&a.python);
        cmd.arg(&a.pytorch_script)
            .arg(model)
            .args(["--dtype", dtype, "--json"])
            .args([
                "--runs",
                &a.pytorch_runs.unwrap_or(a.runs).to_string(),
                "--threads",
                &rayon::current_num_threads().to_string(),
                "--instruction",
                &a.instruction,
            ]);
        if let Some(k) = &a.unnorm_key {
            cmd.args(["--unnorm-key", k]);
        }
        if let Some(i) = &a.image {
            cmd.arg("--image").arg(i);
        }
        torch.push(run_child(&mut cmd, &format!("PyTorch {dtype}"))?);
    }
    report["openvla_rs"] = Value::Array(ours);
    report["pytorch"] = Value::Array(torch);
    if let Some(n) = a.accuracy {
        report["accuracy"] = accuracy(a, model, n)?;
    }
    print_report(&report);
    if let Some(path) = &a.report {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if a.json {
        println!("{report}");
    }
    Ok(())
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default()
}

/// The PyTorch result to compare a configuration with: fp32 for f32, bf16 for the rest (the
/// issue's targets), else whatever ran.
fn baseline_for<'a>(config: &str, torch: &'a [Value]) -> Option<&'a Value> {
    let want = if config == "f32" { "fp32" } else { "bf16" };
    torch
        .iter()
        .find(|t| t["dtype"] == want)
        .or_else(|| torch.first())
}

fn print_report(r: &Value) {
    let empty = vec![];
    let ours = r["openvla_rs"].as_array().unwrap_or(&empty);
    let torch = r["pytorch"].as_array().unwrap_or(&empty);
    let stages = [
        "vision",
        "projector",
        "prefill",
        "decode_per_token",
        "total",
    ];
    let ms = |v: &Value, s: &str| v["median_ms"][s].as_f64().unwrap_or(f64::NAN);
    let gib = |v: &Value| v["peak_rss_bytes"].as_f64().unwrap_or(f64::NAN) / (1u64 << 30) as f64;
    println!(
        "model {}  ({})",
        r["model"].as_str().unwrap_or(""),
        r["cpu"].as_str().unwrap_or("")
    );
    let limits = &r["limits"];
    if !limits.is_null() {
        println!(
            "limits ({} threads, load average {:.1}): copy {:.1} GB/s, read {:.1} GB/s; f32 FMA peak {:.0} GFLOP/s; int8 dot peak {:.0} GOP/s; 279x4096x4096 matmul: f32 {:.0}, bf16 {:.0}, q8_0 {:.0}, q4_0 {:.0} GFLOP/s",
            limits["threads"],
            limits["load_average"].as_f64().unwrap_or(f64::NAN),
            limits["bandwidth_gbs"]["copy_gbs"].as_f64().unwrap_or(f64::NAN),
            limits["bandwidth_gbs"]["read_gbs"].as_f64().unwrap_or(f64::NAN),
            limits["fma_peak_gflops"].as_f64().unwrap_or(f64::NAN),
            limits["int8_peak_gops"].as_f64().unwrap_or(f64::NAN),
            limits["gemm_gflops"]["f32"].as_f64().unwrap_or(f64::NAN),
            limits["gemm_gflops"]["bf16"].as_f64().unwrap_or(f64::NAN),
            limits["gemm_gflops"]["q8_0"].as_f64().unwrap_or(f64::NAN),
            limits["gemm_gflops"]["q4_0"].as_f64().unwrap_or(f64::NAN),
        );
        let p = &limits["peaks"];
        let g = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.0}"));
        println!(
            "peaks (GFLOP/s, GOP/s): AVX2 FMA {}, AVX-512 FMA {}, vdpbf16ps {}, AMX tdpbf16ps {}, vpdpbusd zmm {}, vpdpbusd ymm {}; 279x4096x4096 bf16-compute matmul {:.0} GFLOP/s",
            g(&p["avx2_fma"]),
            g(&p["avx512_fma"]),
            g(&p["avx512_bf16_dot"]),
            g(&p["amx_bf16"]),
            g(&p["avx512_vnni_dot"]),
            g(&p["avx_vnni_dot"]),
            limits["gemm_gflops"]["bf16_compute"].as_f64().unwrap_or(f64::NAN),
        );
    }
    println!(
        "{:<22} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9} {:>7}",
        "median ms",
        "vision",
        "projector",
        "prefill",
        "decode/tok",
        "total",
        "actions/s",
        "peak RSS",
        "load"
    );
    let row = |name: String, v: &Value| {
        println!(
            "{:<22} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>5.2} GiB {:>6.1}s",
            name,
            ms(v, "vision"),
            ms(v, "projector"),
            ms(v, "prefill"),
            ms(v, "decode_per_token"),
            ms(v, "total"),
            v["actions_per_s"].as_f64().unwrap_or(f64::NAN),
            gib(v),
            v["load_s"].as_f64().unwrap_or(f64::NAN)
        )
    };
    if ours
        .iter()
        .any(|v| v["family"].as_str().is_some_and(|f| f.starts_with("oft")))
    {
        println!("(OpenVLA-OFT: `prefill` is the one bidirectional LLM pass; there is no decode)");
    }
    for v in ours {
        row(
            format!("openvla-rs {}", v["config"].as_str().unwrap_or("")),
            v,
        );
    }
    for v in torch {
        row(format!("PyTorch {}", v["dtype"].as_str().unwrap_or("")), v);
    }
    if !torch.is_empty() {
        println!("ours / PyTorch (same run):");
        for v in ours {
            let config = v["config"].as_str().unwrap_or("");
            let Some(t) = baseline_for(config, torch) else {
                continue;
            };
            let ratios: Vec<String> = stages
                .iter()
                .map(|s| format!("{s} {:.2}", ms(v, s) / ms(t, s)))
                .collect();
            println!(
                "  {config:<6} vs PyTorch {:<5} {}  | RSS {:.2}",
                t["dtype"].as_str().unwrap_or(""),
                ratios.join("  "),
                gib(v) / gib(t)
            );
        }
    }
    if !limits.is_null() && !ours.is_empty() {
        let bw = limits["bandwidth_gbs"]["read_gbs"]
            .as_f64()
            .unwrap_or(f64::NAN)
            .max(
                limits["bandwidth_gbs"]["copy_gbs"]
                    .as_f64()
                    .unwrap_or(f64::NAN),
            );
        let path_peak = |c: &str| {
            limits["path_peak_gflops"][c]
                .as_f64()
                .unwrap_or(limits["fma_peak_gflops"].as_f64().unwrap_or(f64::NAN))
        };
        println!(
            "efficiency (bandwidth bound at {bw:.1} GB/s; against the peak of the path taken: f32 arithmetic {:.0} GFLOP/s, bf16 arithmetic {:.0} GFLOP/s):",
            path_peak("f32"),
            path_peak("bf16")
        );
        for v in ours {
            let compute = if v["config"].as_str().unwrap_or("").contains("bf16-compute") {
                "bf16"
            } else {
                "f32"
            };
            let peak = path_peak(compute);
            let bytes = v["decode_bytes_per_token"].as_f64().unwrap_or(f64::NAN);
            let bound_ms = bytes / (bw * 1e9) * 1e3;
            let dec = ms(v, "decode_per_token");
            let rate =
                |s: &str| v["flops"][s].as_f64().unwrap_or(f64::NAN) / (ms(v, s) / 1e3) / 1e9;
            if dec.is_nan() {
                // OpenVLA-OFT: one LLM pass, no decode.
                println!(
                    "  {:<6} LLM pass {:.0} GFLOP/s, {:.0}% of peak | vision {:.0} GFLOP/s, {:.0}% of peak",
                    v["config"].as_str().unwrap_or(""),
                    rate("prefill"),
                    100.0 * rate("prefill") / peak,
                    rate("vision"),
                    100.0 * rate("vision") / peak,
                );
                continue;
            }
            println!(
                "  {:<6} decode {:.0} MB/token, bound {:.1} ms, {:.0}% of bandwidth | prefill {:.0} GFLOP/s, {:.0}% of peak | vision {:.0} GFLOP/s, {:.0}% of peak",
                v["config"].as_str().unwrap_or(""),
                bytes / 1e6,
                bound_ms,
                100.0 * bound_ms / dec,
                rate("prefill"),
                100.0 * rate("prefill") / peak,
                rate("vision"),
                100.0 * rate("vision") / peak,
            );
        }
    }
    if let Some(acc) = r["accuracy"]
        .as_object()
        .filter(|a| a["family"] == "oft-l1")
    {
        println!(
            "accuracy vs f32 on {} observations (OpenVLA-OFT L1 head: the whole normalized chunk compared):",
            acc.get("pairs").cloned().unwrap_or(Value::Null),
        );
        for c in acc
            .get("configs")
            .and_then(|c| c.as_array())
            .into_iter()
            .flatten()
        {
            println!(
                "  {:<6} chunk L1 error: mean |Δ normalized action| {:.5}, max {:.5}",
                c["config"].as_str().unwrap_or(""),
                c["mean_abs_delta"].as_f64().unwrap_or(f64::NAN),
                c["max_abs_delta"].as_f64().unwrap_or(f64::NAN),
            );
        }
    } else if let Some(acc) = r["accuracy"].as_object() {
        let m = |k: &str| {
            acc.get("f32_margin_quantiles")
                .and_then(|q| q[k].as_f64())
                .unwrap_or(f64::NAN)
        };
        println!(
            "accuracy vs f32 on {} image/instruction pairs ({} action tokens; f32 top1-top2 action-logit margin p10 {:.3}, median {:.3}, p90 {:.3}):",
            acc.get("pairs").cloned().unwrap_or(Value::Null),
            acc.get("tokens").cloned().unwrap_or(Value::Null),
            m("p10"),
            m("p50"),
            m("p90")
        );
        if let Some(rows) = acc.get("configs").and_then(|c| c.as_array()) {
            for c in rows {
                println!(
                    "  {:<6} token agreement {:.1}%  teacher-forced {:.1}%  all-7 agreement {:.1}%  first-token agreement {:.1}%  mean |Δ normalized action| {:.4}",
                    c["config"].as_str().unwrap_or(""),
                    100.0 * c["token_agreement"].as_f64().unwrap_or(f64::NAN),
                    100.0 * c["teacher_forced_agreement"].as_f64().unwrap_or(f64::NAN),
                    100.0 * c["action_agreement"].as_f64().unwrap_or(f64::NAN),
                    100.0 * c["first_token_agreement"].as_f64().unwrap_or(f64::NAN),
                    c["mean_abs_delta"].as_f64().unwrap_or(f64::NAN),
                );
            }
        }
    }
}

/// The token `policy` picks at each generation step when fed the prefix of `reference`
/// (the f32 run's generated tokens) instead of its own: one forward over
/// `[prefill embeddings, reference[..n-1]]`, argmax of the last `n` positions.
fn teacher_forced(
    policy: &Policy,
    t: &openvla::policy::Trace,
    reference: &[u32],
) -> Result<Vec<u32>> {
    if reference.is_empty() {
        return Ok(Vec::new());
    }
    let llm = &policy.model().llm;
    let fed = llm.embed(&reference[..reference.len() - 1])?;
    let x = candle_core::Tensor::cat(&[&t.generation.inputs_embeds, &fed], 1)?;
    let mut cache = openvla::model::llama::KvCache::new(1);
    let hidden = llm.forward(&x, &mut cache)?;
    let logits = llm.all_logits(&hidden)?.squeeze(0)?;
    let rows = logits.dim(0)?;
    (rows - reference.len()..rows)
        .map(|i| {
            let row = logits.get(i)?.to_vec1::<f32>()?;
            Ok(openvla::model::llama::argmax(&row) as u32)
        })
        .collect()
}

/// The first `n` pairs of a `--dump-pairs` directory.
fn read_pairs(dir: &Path, n: usize) -> Result<Vec<Observation>> {
    let list_path = dir.join("pairs.json");
    let text = std::fs::read_to_string(&list_path)
        .with_context(|| format!("reading {}", list_path.display()))?;
    let list: Vec<Value> = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: expected a JSON list of {{\"image\": FILE, \"instruction\": TEXT}}",
            list_path.display()
        )
    })?;
    if list.len() < n {
        bail!(
            "{} lists {} pairs, fewer than the {n} asked for",
            list_path.display(),
            list.len()
        );
    }
    list.iter()
        .take(n)
        .enumerate()
        .map(|(i, p)| {
            let (Some(image), Some(instruction)) = (p["image"].as_str(), p["instruction"].as_str())
            else {
                bail!(
                    "{}: pair {i} needs string fields \"image\" and \"instruction\"",
                    list_path.display()
                );
            };
            let path = dir.join(image);
            let image = if path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("ppm"))
            {
                read_ppm(&path)?
            } else {
                openvla_image::open(&path)?
            };
            Ok(Observation::new(image, instruction.to_string()))
        })
        .collect()
}

/// A binary (P6, 8-bit) PPM, the format `--dump-pairs` writes.
fn read_ppm(path: &Path) -> Result<openvla::processor::RgbImage> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut fields = Vec::new();
    let mut pos = 0;
    while fields.len() < 4 {
        while pos < bytes.len() && bytes[pos].is_ascii_whitespace() {
            pos += 1;
        }
        let start = pos;
        while pos < bytes.len() && !bytes[pos].is_ascii_whitespace() {
            pos += 1;
        }
        if start == pos {
            bail!("{}: truncated PPM header", path.display());
        }
        fields.push(String::from_utf8_lossy(&bytes[start..pos]).into_owned());
    }
    let num = |s: &str| -> Result<u32> {
        s.parse()
            .with_context(|| format!("{}: bad PPM header field {s:?}", path.display()))
    };
    let (w, h, max) = (num(&fields[1])?, num(&fields[2])?, num(&fields[3])?);
    if fields[0] != "P6" || max != 255 {
        bail!(
            "{}: only binary 8-bit PPM (P6, maxval 255) is read, got {} with maxval {max}",
            path.display(),
            fields[0]
        );
    }
    let data = bytes.get(pos + 1..).unwrap_or_default().to_vec();
    openvla::processor::RgbImage::from_raw(w, h, data)
        .with_context(|| format!("{}: pixel data does not match {w}x{h}", path.display()))
}

/// `n` image/instruction pairs from a dataset's frames, spread evenly over all its frames in
/// order (no shuffling, no augmentation).
fn dataset_pairs(dir: &Path, name: Option<&str>, n: usize) -> Result<Vec<Observation>> {
    use openvla_data::stream::{stream, StreamConfig, StreamDataset};
    let source = openvla_data::source::DatasetSource::open(dir, name, None)
        .with_context(|| format!("opening the accuracy dataset {}", dir.display()))?;
    let frames = stream(
        vec![StreamDataset {
            source,
            split: "all".into(),
            weight: 1.0,
            statistics: None,
        }],
        StreamConfig {
            shuffle_buffer: 1,
            repeat: false,
            ..Default::default()
        },
    )?;
    let mut all = Vec::new();
    for f in frames {
        let f = f?;
        all.push(Observation::new(
            openvla::processor::RgbImage::from_raw(f.image.width, f.image.height, f.image.data)?,
            f.instruction,
        ));
    }
    if all.len() < n {
        bail!(
            "{} has {} frames, fewer than the {n} accuracy pairs asked for",
            dir.display(),
            all.len()
        );
    }
    let step = all.len() as f64 / n as f64;
    Ok((0..n)
        .map(|i| all[(i as f64 * step) as usize].clone())
        .collect())
}

/// Deterministic image/instruction pairs for the accuracy comparison.
fn accuracy_pairs(n: usize) -> Result<Vec<Observation>> {
    const TASKS: [&str; 10] = [
        "put the carrot in the bowl",
        "pick up the red block",
        "open the top drawer",
        "close the microwave door",
        "move the spoon to the left of the pot",
        "wipe the table with the sponge",
        "put the eggplant in the yellow basket",
        "stack the green cup on the blue cup",
        "push the button",
        "fold the cloth in half",
    ];
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let (w, h) = (224 + 16 * (i % 5) as u32, 224 + 8 * (i % 3) as u32);
        let mut s = 0x9E37_79B9_7F4A_7C15u64 ^ (i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as u32
        };
        // A background gradient, a few solid rectangles ("objects") and pixel noise.
        let base = [next() % 256, next() % 256, next() % 256];
        let rects: Vec<[u32; 7]> = (0..4)
            .map(|_| {
                let (x0, y0) = (next() % w, next() % h);
                [
                    x0,
                    y0,
                    x0 + 20 + next() % 80,
                    y0 + 20 + next() % 80,
                    next() % 256,
                    next() % 256,
                    next() % 256,
                ]
            })
            .collect();
        let mut data = Vec::with_capacity((w * h * 3) as usize);
        for y in 0..h {
            for x in 0..w {
                let mut px = [
                    (base[0] + x / 2) % 256,
                    (base[1] + y / 2) % 256,
                    (base[2] + (x + y) / 4) % 256,
                ];
                for r in &rects {
                    if x >= r[0] && x < r[2] && y >= r[1] && y < r[3] {
                        px = [r[4], r[5], r[6]];
                    }
                }
                let noise = next() % 16;
                data.extend(px.iter().map(|&c| (c + noise).min(255) as u8));
            }
        }
        out.push(Observation::new(
            openvla_image::RgbImage::from_raw(w, h, data)?,
            TASKS[i % TASKS.len()],
        ));
    }
    Ok(out)
}

/// Writes the pairs as binary PPM images and `pairs.json`.
fn dump_pairs(dir: &Path, pairs: &[Observation]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut list = Vec::new();
    for (i, p) in pairs.iter().enumerate() {
        let name = format!("pair_{i:03}.ppm");
        let image = p
            .primary()
            .ok_or_else(|| anyhow::anyhow!("pair {i} has no image"))?;
        let (w, h) = (image.width(), image.height());
        let mut bytes = format!("P6\n{w} {h}\n255\n").into_bytes();
        bytes.extend_from_slice(image.data());
        std::fs::write(dir.join(&name), bytes)
            .with_context(|| format!("writing {}", dir.join(&name).display()))?;
        list.push(json!({"image": name, "instruction": p.instruction}));
    }
    std::fs::write(dir.join("pairs.json"), serde_json::to_string_pretty(&list)?)
        .with_context(|| format!("writing {}", dir.join("pairs.json").display()))?;
    Ok(())
}

/// One configuration's result on one accuracy pair.
struct PairResult {
    /// The predicted action tokens.
    tokens: Vec<u32>,
    /// Their normalized action.
    normalized_action: Vec<f64>,
    /// Top-1 minus top-2 action-token logit at each step.
    margins: Vec<f32>,
    /// Generated ids (the prefix fed to the other configurations when teacher forcing).
    generated: Vec<u32>,
    /// Tokens picked when fed the f32 run's prefix (empty for the f32 run itself).
    teacher_forced: Vec<u32>,
}

/// Token agreement and mean |Δ normalized action| of each configuration against f32.
fn accuracy(a: &BenchArgs, model: &Path, n: usize) -> Result<Value> {
    let pairs = match &a.accuracy_data {
        Some(dir) => dataset_pairs(dir, a.accuracy_dataset.as_deref(), n)?,
        None => match &a.accuracy_pairs {
            Some(dir) => read_pairs(dir, n)?,
            None => accuracy_pairs(n)?,
        },
    };
    if let Some(dir) = &a.dump_pairs {
        dump_pairs(dir, &pairs)?;
    }
    let configs: Vec<BenchConfig> = if a.configs.is_empty() {
        ["bf16", "int8", "int4"]
            .iter()
            .filter_map(|c| c.parse().ok())
            .collect()
    } else {
        a.configs.clone()
    };
    // Each configuration's tokens, normalized actions and the top1-top2 margin of the
    // action-token logits at every step.
    // With `forced` (the f32 run's generated tokens per pair), also the tokens this
    // configuration picks at each step when fed the f32 prefix (teacher forcing): agreement
    // without the cascade a first differing token causes in free-running generation.
    type Run = Vec<PairResult>;
    // Also returns the model's family (the accuracy measure depends on it).
    let run = |c: BenchConfig, forced: Option<&Run>| -> Result<(Run, &'static str)> {
        let (precision, quantize) = (c.precision, c.quantize);
        let policy = Policy::load(
            model,
            &LoadOptions {
                precision,
                quantize,
                compute: Some(c.compute),
                ..Default::default()
            },
        )?;
        let mut out = Vec::with_capacity(pairs.len());
        let bs = a.accuracy_batch.max(1);
        for (ci, chunk) in pairs.chunks(bs).enumerate() {
            eprintln!(
                "openvla bench: accuracy {c} pairs {}..{}",
                ci * bs,
                ci * bs + chunk.len()
            );
            let requests: Vec<openvla::Request> = chunk
                .iter()
                .map(|o| -> Result<openvla::Request> {
                    Ok(openvla::Request {
                        observation: observation_for(&policy, o.clone(), a.proprio.as_deref())?,
                        unnorm_key: a.unnorm_key.clone(),
                    })
                })
                .collect::<Result<_>>()?;
            if policy.oft().is_some() {
                // One parallel pass per request: the whole normalized chunk is compared.
                for t in policy.trace_parallel_batch(&requests)? {
                    let p = t?.prediction;
                    out.push(PairResult {
                        normalized_action: p.normalized_actions.concat(),
                        tokens: p.token_ids,
                        margins: Vec::new(),
                        generated: Vec::new(),
                        teacher_forced: Vec::new(),
                    });
                }
                continue;
            }
            for (j, t) in policy.trace_batch(&requests)?.into_iter().enumerate() {
                let t = t?;
                let teacher = match forced.and_then(|f| f.get(ci * bs + j)) {
                    Some(r) => teacher_forced(&policy, &t, &r.generated)?,
                    None => Vec::new(),
                };
                let margins = t
                    .generation
                    .step_logits
                    .iter()
                    .map(|l| {
                        // The 256 action tokens are the last rows before the 64 padding rows.
                        let hi = l.len().saturating_sub(64);
                        let mut v: Vec<f32> = l[hi.saturating_sub(256)..hi].to_vec();
                        v.sort_by(|x, y| y.total_cmp(x));
                        v.first().copied().unwrap_or(0.0) - v.get(1).copied().unwrap_or(0.0)
                    })
                    .collect();
                out.push(PairResult {
                    normalized_action: t.prediction.normalized_action().to_vec(),
                    tokens: t.prediction.token_ids,
                    margins,
                    generated: t.generation.generated,
                    teacher_forced: teacher,
                });
            }
        }
        Ok((out, family(&policy)))
    };
    let (reference, family) = run(
        BenchConfig {
            precision: Precision::F32,
            quantize: None,
            compute: ComputePrecision::F32,
        },
        None,
    )?;
    let tokens: usize = reference.iter().map(|p| p.tokens.len()).sum();
    let mut margins: Vec<f32> = reference
        .iter()
        .flat_map(|p| p.margins.iter().copied())
        .collect();
    margins.sort_by(|x, y| x.total_cmp(y));
    let q = |f: f64| {
        margins
            .get(((margins.len() as f64 - 1.0) * f) as usize)
            .copied()
    };
    let mut rows = Vec::new();
    for c in configs {
        if c.precision == Precision::F32
            && c.quantize.is_none()
            && c.compute == ComputePrecision::F32
        {
            continue;
        }
        let (got, _) = run(c, Some(&reference))?;
        let (mut same, mut all_same, mut delta, mut count) = (0usize, 0usize, 0f64, 0usize);
        let mut max_delta = 0f64;
        let (mut first_same, mut forced_same, mut forced_total) = (0usize, 0usize, 0usize);
        for (r, g) in reference.iter().zip(&got) {
            forced_same += r
                .generated
                .iter()
                .zip(&g.teacher_forced)
                .filter(|(x, y)| x == y)
                .count();
            forced_total += r.generated.len();
            first_same += usize::from(r.tokens.first() == g.tokens.first());
            let s = r
                .tokens
                .iter()
                .zip(&g.tokens)
                .filter(|(x, y)| x == y)
                .count();
            same += s;
            all_same += usize::from(s == r.tokens.len() && r.tokens.len() == g.tokens.len());
            for (x, y) in r.normalized_action.iter().zip(&g.normalized_action) {
                delta += (x - y).abs();
                max_delta = max_delta.max((x - y).abs());
                count += 1;
            }
        }
        rows.push(json!({
            "config": c.to_string(),
            "token_agreement": same as f64 / tokens.max(1) as f64,
            "action_agreement": all_same as f64 / pairs.len().max(1) as f64,
            "first_token_agreement": first_same as f64 / pairs.len().max(1) as f64,
            "teacher_forced_agreement": forced_same as f64 / forced_total.max(1) as f64,
            "mean_abs_delta": delta / count.max(1) as f64,
            "max_abs_delta": max_delta,
        }));
    }
    Ok(json!({
        "family": family,
        "pairs": n,
        "tokens": tokens,
        "f32_margin_quantiles": {"p10": q(0.1), "p50": q(0.5), "p90": q(0.9)},
        "configs": rows,
    }))
}
