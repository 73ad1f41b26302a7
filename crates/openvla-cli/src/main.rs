//! `openvla`: run, inspect and benchmark OpenVLA policies from one binary.

mod alloc;
mod bench;
mod progress;
mod quantize;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use openvla::quant::Quantization;
use openvla::{LoadOptions, Observation, Policy, Precision};
use openvla_server::cli::OftArgs;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "openvla",
    version,
    about = "OpenVLA vision-language-action policies in Rust"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Predict one action from an image and an instruction.
    Predict(PredictArgs),
    /// Describe a model directory: variant, parameters per component, dtypes, norm_stats keys.
    Inspect(InspectArgs),
    /// Write a random-weight checkpoint of a real OpenVLA shape (for benchmarks and tests).
    Synth(SynthArgs),
    /// Write a freshly initialized model directory of any OpenVLA-family shape (towers, image
    /// size, LLM, OFT L1 or 256-bin head) from a TOML config or a preset, with the reference's
    /// initializations, for `openvla finetune --mode full`. See docs/init.md.
    Init(InitArgs),
    /// Time predict stage by stage (preprocess, vision, projector, prefill, decode) and report
    /// peak memory.
    Bench(bench::BenchArgs),
    /// Write an int8 or int4 copy of a model directory (loads fast, accepted everywhere a model
    /// directory is).
    Quantize(quantize::QuantizeArgs),
    /// Compute dataset statistics (mean, std, min, max, q01, q99, mask) in the reference's
    /// dataset_statistics.json format, from an RLDS or LeRobot v3 dataset.
    Stats(openvla_data::cli::StatsArgs),
    /// Describe a robot dataset: splits, episodes, steps, features.
    InspectData(openvla_data::cli::InspectArgs),
    /// Measure the training data stream's throughput (decode, resize, augment).
    BenchData(openvla_data::cli::DataBenchArgs),
    /// Serve the policy over HTTP: deploy.py-compatible POST /act with dynamic batching, plus
    /// /health, /metadata and /metrics. Listens on 127.0.0.1 unless --host says otherwise.
    Serve(openvla_server::cli::ServeArgs),
    /// Load-test a running server with real POST /act requests from concurrent clients.
    Loadtest(openvla_server::cli::LoadtestArgs),
    /// Merge a PEFT LoRA adapter into its base model, writing a full HF model directory (sharded
    /// safetensors, index, config, tokenizer, dataset_statistics.json) that this engine and the
    /// reference both load.
    Merge(openvla_train::cli::MergeArgs),
    /// Fine-tune on RLDS or LeRobot demonstrations (LoRA, full, frozen-vision, last-layer,
    /// sandwich): resumable checkpoints, metrics.jsonl, curves.svg and, for LoRA, a PEFT adapter
    /// that `openvla merge` folds into the model. See docs/finetuning.md.
    Finetune(openvla_train::cli::FinetuneArgs),
    /// Closed-loop evaluation in a simulator through the policy's HTTP server
    /// (`openvla eval metaworld`; see docs/evaluation.md).
    #[command(subcommand)]
    Eval(openvla_eval::cli::EvalCommand),
    /// Simulator utilities: `openvla sim demos metaworld` records scripted-expert demonstrations
    /// as a LeRobot v3 dataset.
    #[command(subcommand)]
    Sim(openvla_eval::cli::SimCommand),
}

#[derive(clap::Args)]
struct PredictArgs {
    /// HF model directory (config.json, preprocessor_config.json, tokenizer.json, safetensors;
    /// for OpenVLA-OFT also the action_head / proprio_projector .pt files).
    #[arg(long)]
    model: PathBuf,
    /// Camera image, PNG or JPEG, any size. Repeat for OFT models that take several: the
    /// primary (third-person) image first, then the wrist views in the model's order.
    #[arg(long, required = true)]
    image: Vec<PathBuf>,
    /// Task instruction, e.g. "pick up the red block" (lowercased as the reference does).
    #[arg(long)]
    instruction: String,
    /// Robot state for OFT models with a proprio projector: comma-separated raw values,
    /// e.g. --proprio=-0.2,0.01,1.17,3.14,0,-0.09,0.04,-0.04.
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    proprio: Option<Vec<f64>>,
    /// Dataset whose statistics un-normalize the action (e.g. bridge_orig). May be omitted only
    /// when the model has exactly one dataset.
    #[arg(long)]
    unnorm_key: Option<String>,
    /// Print exactly one JSON object on stdout: actions ([K][D]), normalized_actions,
    /// unnorm_key; for the 256-bin family also action, normalized_action (the chunk's only
    /// row) and token_ids.
    #[arg(long)]
    json: bool,
    /// Weight precision: f32 (the reference's float32 run), bf16 (same results, half the
    /// memory), f16 (f16 weights, f32 compute), or auto (f32 if it fits comfortably in
    /// available memory, else bf16).
    #[arg(long, default_value = "auto")]
    precision: Precision,
    /// Quantize the weights while loading: int8 (q8_0 everywhere) or int4 (q4_0 LLM layers,
    /// q8_0 elsewhere). See docs/quantization.md.
    #[arg(long)]
    quantize: Option<Quantization>,
    /// Arithmetic of the many-row products (vision towers, projector, prefill): f32 (exact) or
    /// bf16 (bf16 operands, f32 sums, as PyTorch bf16; AMX or AVX512-BF16 where the CPU has
    /// them, docs/kernels.md). Default: the model's `inference_compute` (config.json), else f32.
    #[arg(long)]
    compute: Option<openvla::kernels::ComputePrecision>,
    /// OpenVLA-OFT constants.
    #[command(flatten)]
    oft: OftArgs,
}

#[derive(clap::Args)]
struct InspectArgs {
    /// HF model directory.
    #[arg(long)]
    model: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// OpenVLA-OFT constants (as for `openvla predict`).
    #[command(flatten)]
    oft: OftArgs,
}

#[derive(clap::Args)]
struct SynthArgs {
    /// Shape: tiny, minivla (DINOv2-L + SigLIP-so400m + Qwen2.5-0.5B-shaped Llama) or 7b.
    #[arg(long)]
    shape: openvla::synth::SynthShape,
    /// Output directory (created).
    #[arg(long)]
    out: PathBuf,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Largest shard in bytes (7 GB, as the reference's conversion, gives 3 shards for 7B).
    #[arg(long, default_value_t = 7_000_000_000)]
    max_shard_bytes: u64,
    /// tokenizer.json to copy into the directory.
    #[arg(long, default_value = "models/openvla-tiny/tokenizer.json")]
    tokenizer: PathBuf,
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("shape").required(true).args(["config", "preset"])))]
struct InitArgs {
    /// TOML file describing the shape ([vision], [[vision.towers]], [llm], [head]; see
    /// docs/init.md). `--preset NAME --print-config` prints an example to start from.
    #[arg(long)]
    config: Option<PathBuf>,
    /// A named shape instead of --config: metaworld-small (one SigLIP-like tower, 128 px,
    /// patch 16, width 192, depth 5 of which OpenVLA uses 4 (the output of block len-2), tied
    /// Llama 256x4, OFT L1 head K=8 D=4 proprio 4; 28.8 MB in bf16) or metaworld-fused (the
    /// same with DINOv2-reg + SigLIP towers).
    #[arg(long)]
    preset: Option<String>,
    /// Print the configuration's TOML and exit without writing anything.
    #[arg(long)]
    print_config: bool,
    /// Output directory (must not exist, or be empty).
    #[arg(long, required_unless_present = "print_config")]
    out: Option<PathBuf>,
    /// Seed of every random draw (the directory is a function of config, seed and dtype).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Dtype of model.safetensors and the action head: bf16 or f32 (the proprio projector is
    /// always f32, as the reference saves it).
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// dataset_statistics.json to install (e.g. from `openvla stats`); without it predict
    /// reports that the model has no statistics until `openvla finetune` writes them.
    #[arg(long)]
    stats: Option<PathBuf>,
    /// The Llama-2 tokenizer.json to copy (with tokenizer_config.json and
    /// special_tokens_map.json from its folder).
    #[arg(long, default_value = "models/openvla-tiny/tokenizer.json")]
    tokenizer: PathBuf,
}

fn main() {
    alloc::tune();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Predict(a) => predict(a),
        Command::Inspect(a) => inspect(a),
        Command::Synth(a) => synth(a),
        Command::Init(a) => init(a),
        Command::Bench(a) => bench::run(a),
        Command::Quantize(a) => quantize::run(a),
        Command::Stats(a) => openvla_data::cli::run_stats(&a),
        Command::InspectData(a) => openvla_data::cli::run_inspect(&a),
        Command::BenchData(a) => openvla_data::cli::run_data_bench(&a),
        Command::Serve(a) => openvla_server::cli::run_serve(&a),
        Command::Loadtest(a) => openvla_server::cli::run_loadtest(&a),
        Command::Eval(c) => openvla_eval::cli::run_eval(&c),
        Command::Sim(c) => openvla_eval::cli::run_sim(&c),
        Command::Merge(a) => openvla_train::cli::run_merge(&a)
            .map(|r| {
                eprintln!(
                    "merged {} tensors into {} ({} shard file(s))",
                    r.changed.len(),
                    a.out.display(),
                    r.shards.len()
                )
            })
            .map_err(Into::into),
        Command::Finetune(a) => openvla_train::cli::run_finetune(&a)
            .map(|r| {
                let o = &r.outcome;
                eprintln!(
                    "finetune {}: {} trainable parameters, steps {}..{} of {}",
                    r.plan.experiment_id, r.trainable_params, o.resumed_from, o.step, a.max_steps
                );
                if let Some(m) = &r.last {
                    eprintln!(
                        "last step: loss {:.4}, action accuracy {}, L1 {}, {:.3} steps/s",
                        m.loss,
                        m.action_accuracy
                            .map_or("-".into(), |x| format!("{:.1}%", 100.0 * x)),
                        m.action_l1_loss.map_or("-".into(), |x| format!("{x:.4}")),
                        m.steps_per_s
                    );
                    if let Some(x) = m.aux_l1_loss {
                        eprintln!("auxiliary environment-state L1 {x:.4}");
                    }
                }
                if let Some(c) = &o.last_checkpoint {
                    eprintln!("checkpoint: {}", c.display());
                }
                if let Some(d) = &r.adapter_dir {
                    eprintln!("adapter: {} (openvla merge --adapter)", d.display());
                }
                if let Some(d) = &r.model_dir {
                    eprintln!("model: {} (openvla predict --model)", d.display());
                }
                eprintln!(
                    "metrics: {}",
                    r.plan.run_dir.join("metrics.jsonl").display()
                );
            })
            .map_err(Into::into),
    };
    if let Err(e) = result {
        eprintln!("error: {}", error_chain(&e));
        std::process::exit(1);
    }
}

/// The error and its causes on one line, skipping causes whose text the message already holds.
fn error_chain(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !msg.contains(&text) {
            if !msg.is_empty() {
                msg.push_str(": ");
            }
            msg.push_str(&text);
        }
    }
    msg
}

/// Loads a policy with a progress display on stderr, with OpenVLA-OFT constants given as flags.
pub(crate) fn load_policy_with(
    model: &std::path::Path,
    precision: Precision,
    quantize: Option<Quantization>,
    compute: Option<openvla::kernels::ComputePrecision>,
    oft: &OftArgs,
) -> Result<Policy> {
    let bar = progress::Progress::new("loading weights");
    let cb = |p: openvla::checkpoint::LoadProgress| bar.update(p.done, p.total);
    let policy = Policy::load(
        model,
        &LoadOptions {
            precision,
            quantize,
            compute,
            progress: Some(&cb),
            oft: oft.options(),
        },
    )
    .with_context(|| format!("loading model from {}", model.display()))?;
    bar.finish();
    Ok(policy)
}

/// Names of the images of `openvla predict`, in order: `primary`, then `wrist`, `wrist_2`, ...
fn image_name(i: usize) -> String {
    match i {
        0 => "primary".into(),
        1 => "wrist".into(),
        _ => format!("wrist_{i}"),
    }
}

fn predict(a: PredictArgs) -> Result<()> {
    let mut images = Vec::with_capacity(a.image.len());
    for (i, path) in a.image.iter().enumerate() {
        images.push((image_name(i), openvla_image::open(path)?));
    }
    let policy = load_policy_with(&a.model, a.precision, a.quantize, a.compute, &a.oft)?;
    if a.proprio.is_some() && policy.proprio_dim().is_none() {
        eprintln!("openvla predict: this model takes no proprio; --proprio is ignored");
    }
    let obs = Observation {
        images,
        instruction: a.instruction.clone(),
        proprio: a.proprio.clone(),
    };
    if policy.head().is_parallel() {
        let t = policy.trace_parallel(&obs, a.unnorm_key.as_deref())?;
        let p = &t.prediction;
        if a.json {
            let mut out = serde_json::json!({
                "actions": p.actions,
                "normalized_actions": p.normalized_actions,
                "unnorm_key": p.unnorm_key,
            });
            if !p.token_ids.is_empty() {
                out["token_ids"] = serde_json::json!(p.token_ids);
            }
            println!("{out}");
        } else {
            println!("instruction:        {}", a.instruction);
            println!("unnorm_key:         {}", p.unnorm_key);
            println!("family:             {}", policy.head().family());
            for (i, (act, norm)) in p.actions.iter().zip(&p.normalized_actions).enumerate() {
                println!(
                    "action[{i}]:{:>width$}{act:?}",
                    "",
                    width = 9 - i.to_string().len()
                );
                println!("  normalized:       {norm:?}");
            }
            if !p.token_ids.is_empty() {
                println!("token_ids:          {:?}", p.token_ids);
            }
            let f = &t.forward;
            println!(
                "time:               preprocess {:.1} ms, vision {:.1} ms, projector {:.1} ms, llm {:.1} ms ({} positions, bidirectional)",
                t.preprocess_time.as_secs_f64() * 1e3,
                f.vision_time.as_secs_f64() * 1e3,
                f.projector_time.as_secs_f64() * 1e3,
                f.llm_time.as_secs_f64() * 1e3,
                f.hidden.dim(1)?
            );
        }
        return Ok(());
    }
    let trace = policy.trace(&obs, a.unnorm_key.as_deref())?;
    let p = &trace.prediction;
    if a.json {
        let out = serde_json::json!({
            "action": p.action(),
            "actions": p.actions,
            "normalized_action": p.normalized_action(),
            "normalized_actions": p.normalized_actions,
            "token_ids": p.token_ids,
            "unnorm_key": p.unnorm_key,
        });
        println!("{out}");
    } else {
        println!("instruction:       {}", a.instruction);
        println!("unnorm_key:        {}", p.unnorm_key);
        println!("action:            {:?}", p.action());
        println!("normalized_action: {:?}", p.normalized_action());
        println!("token_ids:         {:?}", p.token_ids);
        let g = &trace.generation;
        let decode: f64 = g.decode_times.iter().map(|d| d.as_secs_f64()).sum();
        println!(
            "time:              preprocess {:.1} ms, vision {:.1} ms, projector {:.1} ms, prefill {:.1} ms, decode {:.1} ms ({} steps)",
            trace.preprocess_time.as_secs_f64() * 1e3,
            g.vision_time.as_secs_f64() * 1e3,
            g.projector_time.as_secs_f64() * 1e3,
            g.prefill_time.as_secs_f64() * 1e3,
            decode * 1e3,
            g.decode_times.len()
        );
    }
    Ok(())
}

fn inspect(a: InspectArgs) -> Result<()> {
    let s = openvla::inspect::ModelSummary::read_with(&a.model, &a.oft.options())
        .with_context(|| format!("inspecting {}", a.model.display()))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    println!("model:      {}", a.model.display());
    println!("variant:    {}", s.variant);
    println!("family:     {}", s.family);
    println!("head:       {}", s.head);
    if let Some(o) = &s.oft {
        println!("oft constants:");
        for c in &o.constants {
            println!(
                "  {:<14} {:<12} from {}",
                c.name,
                c.value.to_string(),
                c.source
            );
        }
        println!("  {:<14} {:<12}", "center_crop", o.center_crop);
        for f in &o.files {
            println!("oft file:   {f}");
        }
    }
    for t in &s.towers {
        println!("tower:      {t}");
    }
    println!("llm:        {}", s.llm);
    println!("prompt:     {}", s.prompt_style);
    println!("resize:     {}", s.image_resize_strategy);
    println!(
        "weights:    {} in {} file(s): {}",
        human_bytes(s.total_bytes),
        s.shards.len(),
        s.shards.join(", ")
    );
    println!("parameters:");
    for c in &s.components {
        println!(
            "  {:<28} {:>15} params  {:>5} tensors  {}",
            c.name,
            group_digits(c.parameters),
            c.tensors,
            c.dtypes.join(",")
        );
    }
    println!(
        "  {:<28} {:>15} params",
        "total",
        group_digits(s.total_parameters)
    );
    println!("norm_stats ({}):", s.norm_stats_source);
    for d in &s.datasets {
        println!(
            "  {:<50} action_dim {:>2}  un-normalized dims {:>2}{}",
            d.unnorm_key,
            d.action_dim,
            d.masked_dims,
            d.num_transitions
                .map(|n| format!("  transitions {n}"))
                .unwrap_or_default()
        );
    }
    println!("kernels on this CPU:");
    print!("{}", openvla::kernels::dispatch::table());
    Ok(())
}

fn synth(a: SynthArgs) -> Result<()> {
    let bar = progress::Progress::new("writing weights");
    openvla::synth::write_random_checkpoint(
        &a.out,
        &openvla::synth::SynthOptions {
            shape: a.shape,
            seed: a.seed,
            max_shard_bytes: a.max_shard_bytes,
            tokenizer: a.tokenizer.clone(),
        },
        &|d, t| bar.update(d, t),
    )
    .with_context(|| format!("writing {}", a.out.display()))?;
    bar.finish();
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

fn init(a: InitArgs) -> Result<()> {
    use openvla::init::{preset_text, InitConfig, InitOptions};
    let (text, origin) = match (&a.config, &a.preset) {
        (Some(path), None) => (
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
            path.clone(),
        ),
        (None, Some(name)) => (
            preset_text(name)?.to_string(),
            PathBuf::from(format!("preset {name}")),
        ),
        _ => anyhow::bail!("give exactly one of --config FILE and --preset NAME"),
    };
    let cfg = InitConfig::from_toml(&text, &origin)?;
    if a.print_config {
        print!("{text}");
        return Ok(());
    }
    let dtype = match a.dtype.as_str() {
        "bf16" => openvla::synth::SavedDtype::Bf16,
        "f32" => openvla::synth::SavedDtype::F32,
        other => anyhow::bail!("--dtype {other:?}: expected bf16 or f32"),
    };
    let out = a
        .out
        .clone()
        .context("--out DIR is required (the directory to write)")?;
    let bar = progress::Progress::new("writing weights");
    let summary = openvla::init::write_initialized(
        &out,
        &cfg,
        &InitOptions {
            seed: a.seed,
            dtype,
            tokenizer: a.tokenizer.clone(),
            stats: a.stats.clone(),
            max_shard_bytes: 7_000_000_000,
        },
        &|d, t| bar.update(d, t),
    )
    .with_context(|| format!("writing {}", out.display()))?;
    bar.finish();
    eprintln!(
        "wrote {}: {} backbone + {} head parameters, {} of weights ({})",
        out.display(),
        group_digits(summary.backbone_params),
        group_digits(summary.head_params),
        human_bytes(summary.weight_bytes),
        summary.files.join(", ")
    );
    if a.stats.is_none() {
        eprintln!(
            "no dataset statistics: `openvla finetune` writes them (or pass --stats FILE from \
             `openvla stats`)"
        );
    }
    Ok(())
}

pub(crate) fn human_bytes(b: u64) -> String {
    let gib = b as f64 / (1u64 << 30) as f64;
    if gib >= 1.0 {
        format!("{gib:.2} GiB")
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

fn group_digits(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
