//! `openvla finetune` and `openvla merge`: argument structs (clap) and their runners. The
//! binary (`openvla-cli`) only parses and calls these.

use crate::error::{Result, TrainError};
use crate::export::{export_model_dir, ExportDtype, ExportOptions};
use crate::io::write_atomic;
use crate::lora::config::ALL_LINEAR;
use crate::lora::targets::{
    count_lora_params, modules_from_tensors, select_targets, OPENVLA_OUTPUT_EMBEDDING,
};
use crate::lora::{LoraConfig, TargetModules};
use crate::memory::{available_memory, check_fits, estimate, MemoryEstimate, MemoryInputs};
use crate::merge::{merge_model_dir, MergeOptions, MergeRecipe};
use crate::mode::TrainMode;
use crate::optim::AdamWConfig;
use crate::schedule::{LrSchedule, LrScheduleKind};
use clap::{Args, ValueEnum};
use openvla::oft::constants::NormalizationType;
use openvla::ModelConfig;
use openvla_data::source::DatasetSource;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Compute precision of the forward/backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// float32 everywhere (the CPU default; the fixtures' numerics).
    F32,
    /// bf16 frozen weights and activations, float32 trainable weights and optimizer.
    Bf16,
}

/// `openvla finetune`: adapt OpenVLA to a dataset (LoRA, full, frozen-vision, last-layer,
/// sandwich). Defaults are `vla-scripts/finetune.py`'s.
#[derive(Debug, Clone, Args)]
pub struct FinetuneArgs {
    /// HF model directory (config.json, tokenizer.json, safetensors).
    #[arg(long)]
    pub model: PathBuf,
    /// Dataset: an RLDS/TFDS dataset or version directory, a data root (with --dataset), or a
    /// LeRobot v3 root.
    #[arg(long)]
    pub data: PathBuf,
    /// Dataset name under the data root; also selects the built-in standardization and is the
    /// key of the saved statistics.
    #[arg(long)]
    pub dataset: Option<String>,
    /// Custom dataset description (TOML or JSON, see `openvla_data::oxe::configs`) instead of
    /// the built-in one, or for LeRobot v3 data, instead of the conventions read from
    /// meta/info.json. `--config` is accepted as an alias, as in `openvla stats`.
    #[arg(long = "dataset-config", visible_alias = "config")]
    pub dataset_config: Option<PathBuf>,
    /// Run directory: checkpoints, metrics.jsonl, curves.svg, adapter, dataset statistics.
    #[arg(long)]
    pub out: PathBuf,
    /// What to train.
    #[arg(long, value_enum, default_value_t = TrainMode::Lora)]
    pub mode: TrainMode,
    /// LoRA rank.
    #[arg(long, default_value_t = 32)]
    pub lora_rank: usize,
    /// LoRA alpha (default min(rank, 16)).
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// LoRA dropout.
    #[arg(long, default_value_t = 0.0)]
    pub lora_dropout: f64,
    /// LoRA target modules: `all-linear` or a comma-separated list of module names/suffixes.
    #[arg(long, default_value = ALL_LINEAR)]
    pub target_modules: String,
    /// AdamW learning rate (the peak of --lr-schedule).
    #[arg(long, default_value_t = 5e-4)]
    pub lr: f64,
    /// Learning-rate schedule: `constant` (finetune.py's) or `cosine` (half a cosine from --lr
    /// down to 0 at --max-steps, after the warmup).
    #[arg(long, value_enum, default_value_t = LrScheduleKind::Constant)]
    pub lr_schedule: LrScheduleKind,
    /// Optimizer steps of linear learning-rate warmup from 0.
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: u64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Samples per micro-batch.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accumulation: u64,
    /// Optimizer steps.
    #[arg(long, default_value_t = 200_000)]
    pub max_steps: u64,
    /// Save a checkpoint every N steps.
    #[arg(long, default_value_t = 5000)]
    pub save_interval: u64,
    /// Keep the newest N checkpoints (0 = all; the reference keeps only the latest).
    #[arg(long, default_value_t = 1)]
    pub keep_last: usize,
    /// Image augmentation (random resized crop 0.9, brightness, contrast, saturation, hue).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub image_aug: bool,
    /// Frame shuffle buffer (clamped to the frames of one pass when the dataset is smaller).
    #[arg(long, default_value_t = 100_000)]
    pub shuffle_buffer: usize,
    /// Per-block gradient checkpointing: keep only each vision block's and decoder layer's
    /// input, and recompute the block during a backward driven block by block. Much less
    /// activation memory for about one more forward pass; gradients are unchanged (up to
    /// summation order).
    #[arg(long)]
    pub checkpointing: bool,
    /// Seed of data order, augmentation, LoRA init and dropout.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Compute precision.
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub precision: Precision,
    /// Arithmetic of the linears' products, forward and backward: f32 (exact, the default) or
    /// bf16 (both operands rounded to bf16, f32 sums, as PyTorch's bf16 autocast; on AMX or
    /// AVX512-BF16 where the CPU has them). Weights, gradients and the optimizer stay f32.
    #[arg(long, default_value = "f32")]
    pub compute: openvla::kernels::ComputePrecision,
    /// Continue the run in --out from its newest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Memory budget in GiB for the up-front check (default: available system memory).
    #[arg(long)]
    pub max_memory_gb: Option<f64>,
    /// Skip the up-front memory check.
    #[arg(long)]
    pub no_memory_check: bool,
    /// With --head l1: every checkpoint also holds the complete exported model directory
    /// (`checkpoints/step-N/model/`, as `<out>/model/` at the end), so intermediate checkpoints
    /// can be evaluated (success against training time). Costs one model's size per checkpoint.
    #[arg(long)]
    pub export_checkpoints: bool,
    /// Dtype of the model exported to `<out>/model/` by non-LoRA modes: `base` keeps each
    /// tensor's checkpoint dtype (bf16 for the released checkpoints), `float32` writes every
    /// floating-point tensor in float32 (the trained weights exactly), `bf16` every one in bf16
    /// (rounded once). A finished run re-exports with `--resume` and another `--export-dtype`.
    #[arg(long, value_enum, default_value_t = ExportDtype::Base)]
    pub export_dtype: ExportDtype,
    /// Largest shard of the exported model in GB.
    #[arg(long, default_value_t = 5.0)]
    pub export_max_shard_gb: f64,
    /// The training objective: `256-bin` (OpenVLA's next-token objective over action tokens)
    /// or `l1` (OpenVLA-OFT: parallel decoding of an action chunk with an MLPResNet L1 head
    /// and bidirectional attention; needs --chunk).
    #[arg(long, value_enum, default_value_t = HeadArg::Bins256)]
    pub head: HeadArg,
    /// Actions per chunk K (OFT's NUM_ACTIONS_CHUNK; with --head l1). Each sample's chunk is
    /// the current and the next K-1 actions of its episode; frames too close to the episode's
    /// end are not sampled, as the reference does.
    #[arg(long)]
    pub chunk: Option<usize>,
    /// Cameras the model reads, in order (with --head l1): `primary` or `primary,wrist` (the
    /// dataset's wrist_image_key).
    #[arg(long, default_value = "primary")]
    pub images: String,
    /// Feed the robot state (the dataset's state_key, normalized like the actions) through a
    /// proprio projector as one more token (with --head l1).
    #[arg(long)]
    pub proprio: bool,
    /// Normalization of actions and proprio for --head l1 (OFT's
    /// ACTION_PROPRIO_NORMALIZATION_TYPE: LIBERO and Bridge use bounds_q99, ALOHA bounds).
    #[arg(long, value_enum, default_value_t = NormalizationArg::BoundsQ99)]
    pub normalization: NormalizationArg,
    /// Train an auxiliary head beside the L1 action head (with --head l1): a linear map from the
    /// action head's input to the dataset's privileged environment state (LeRobot's
    /// `observation.environment_state`, e.g. object and goal positions from a simulator,
    /// normalized like the actions), its L1 error added to the loss with this weight. It makes
    /// the features the action head reads locate the scene's objects; the exported policy is
    /// unchanged (the head is dropped) and takes the same inputs. Recorded by `openvla sim
    /// demos`.
    #[arg(long, value_name = "WEIGHT")]
    pub aux_environment_state: Option<f64>,
}

/// `--head` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
pub enum HeadArg {
    /// OpenVLA's 256-bin action tokens (cross-entropy).
    #[value(name = "256-bin")]
    #[serde(rename = "256-bin")]
    Bins256,
    /// OpenVLA-OFT's L1 regression head on an action chunk.
    #[value(name = "l1")]
    #[serde(rename = "l1")]
    L1,
}

/// `--normalization` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
pub enum NormalizationArg {
    /// `(min, max)`.
    #[value(name = "bounds")]
    #[serde(rename = "bounds")]
    Bounds,
    /// `(q01, q99)`.
    #[value(name = "bounds_q99")]
    #[serde(rename = "bounds_q99")]
    BoundsQ99,
}

impl NormalizationArg {
    /// The data stream's normalization.
    pub fn data(self) -> openvla_data::normalize::Normalization {
        match self {
            NormalizationArg::Bounds => openvla_data::normalize::Normalization::Bounds,
            NormalizationArg::BoundsQ99 => openvla_data::normalize::Normalization::BoundsQ99,
        }
    }

    /// The engine's OFT normalization type.
    pub fn oft(self) -> NormalizationType {
        match self {
            NormalizationArg::Bounds => NormalizationType::Bounds,
            NormalizationArg::BoundsQ99 => NormalizationType::BoundsQ99,
        }
    }
}

/// `openvla merge`: merge a PEFT LoRA adapter into its base model and write a full HF model
/// directory.
#[derive(Debug, Clone, Args)]
pub struct MergeArgs {
    /// Base HF model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output directory (must be empty or absent).
    #[arg(long)]
    pub out: PathBuf,
    /// `dataset_statistics.json` of the fine-tuning data (default: the adapter directory's,
    /// else its parent run directory's, else the base model's).
    #[arg(long)]
    pub dataset_statistics: Option<PathBuf>,
    /// `bf16-reference` reproduces finetune.py's bf16 merge bit for bit; `float32` rounds once.
    #[arg(long, value_enum, default_value_t = RecipeArg::Bf16Reference)]
    pub recipe: RecipeArg,
    /// Largest output shard in GB.
    #[arg(long, default_value_t = 5.0)]
    pub max_shard_gb: f64,
}

/// `--recipe` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RecipeArg {
    /// PEFT on a bf16 base.
    Bf16Reference,
    /// float32 arithmetic.
    Float32,
}

/// Parses `--target-modules`.
pub fn parse_target_modules(s: &str) -> Result<TargetModules> {
    let s = s.trim();
    if s.eq_ignore_ascii_case(ALL_LINEAR) {
        return Ok(TargetModules::Pattern(ALL_LINEAR.into()));
    }
    let set: BTreeSet<String> = s
        .split(',')
        .map(|x| x.trim().to_string())
        .filter(|x| !x.is_empty())
        .collect();
    if set.is_empty() {
        return Err(TrainError::Invalid(
            "--target-modules is empty; use all-linear or a comma-separated list".into(),
        ));
    }
    Ok(TargetModules::List(set))
}

impl FinetuneArgs {
    /// Checks the flags' values on their own.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Invalid(m));
        if self.lora_rank == 0 {
            return bad("--lora-rank must be at least 1".into());
        }
        if let Some(a) = self.lora_alpha {
            if !(a.is_finite() && a > 0.0) {
                return bad(format!("--lora-alpha must be positive, got {a}"));
            }
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad(format!(
                "--lora-dropout must be in [0, 1), got {}",
                self.lora_dropout
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("--lr must be positive, got {}", self.lr));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!(
                "--weight-decay must be >= 0, got {}",
                self.weight_decay
            ));
        }
        if self.batch_size == 0 || self.grad_accumulation == 0 {
            return bad("--batch-size and --grad-accumulation must be at least 1".into());
        }
        if !(self.export_max_shard_gb.is_finite() && self.export_max_shard_gb > 0.0) {
            return bad(format!(
                "--export-max-shard-gb must be positive, got {}",
                self.export_max_shard_gb
            ));
        }
        if self.max_steps == 0 || self.save_interval == 0 {
            return bad("--max-steps and --save-interval must be at least 1".into());
        }
        if self.mode != TrainMode::Lora && (self.lora_alpha.is_some() || self.lora_dropout != 0.0) {
            return bad(format!(
                "--lora-alpha/--lora-dropout only apply to --mode lora (mode is {})",
                self.mode
            ));
        }
        parse_target_modules(&self.target_modules)?;
        match self.head {
            HeadArg::L1 => {
                match self.chunk {
                    None => {
                        return bad(
                            "--head l1 needs --chunk K, the number of actions per chunk \
                                    (OFT's NUM_ACTIONS_CHUNK, e.g. 8 for LIBERO)"
                                .into(),
                        )
                    }
                    Some(0) => return bad("--chunk must be at least 1".into()),
                    Some(_) => {}
                }
                crate::oft::parse_images(&self.images)?;
                if let Some(w) = self.aux_environment_state {
                    if !(w.is_finite() && w > 0.0) {
                        return bad(format!(
                            "--aux-environment-state {w}: the weight must be a positive number"
                        ));
                    }
                }
            }
            HeadArg::Bins256 => {
                let oft_only = [
                    (self.chunk.is_some(), "--chunk"),
                    (self.images.trim() != "primary", "--images"),
                    (self.proprio, "--proprio"),
                    (
                        self.aux_environment_state.is_some(),
                        "--aux-environment-state",
                    ),
                    (
                        self.normalization != NormalizationArg::BoundsQ99,
                        "--normalization",
                    ),
                ];
                if let Some((_, flag)) = oft_only.iter().find(|(given, _)| *given) {
                    return bad(format!(
                        "{flag} applies to the OFT objective only: add --head l1 (the 256-bin \
                         objective reads one image and one action)"
                    ));
                }
            }
        }
        Ok(())
    }

    /// The OFT settings of a `--head l1` run (`None` for the 256-bin objective).
    pub fn oft(&self) -> Result<Option<OftRun>> {
        if self.head != HeadArg::L1 {
            return Ok(None);
        }
        let chunk = self
            .chunk
            .ok_or_else(|| TrainError::Invalid("--head l1 needs --chunk K".into()))?;
        let wrist = crate::oft::parse_images(&self.images)?;
        Ok(Some(OftRun {
            chunk,
            wrist,
            proprio: self.proprio,
            normalization: self.normalization,
        }))
    }

    /// The learning-rate schedule over the run's --max-steps.
    pub fn schedule(&self) -> LrSchedule {
        LrSchedule {
            kind: self.lr_schedule,
            warmup_steps: self.warmup_steps,
            total_steps: self.max_steps,
        }
    }

    /// The AdamW settings.
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            lr: self.lr,
            weight_decay: self.weight_decay,
            ..AdamWConfig::default()
        }
    }

    /// The reference's experiment id, e.g.
    /// `openvla-7b+bridge_orig+b16+lr-0.0005+lora-r32+dropout-0.0--image_aug`.
    pub fn experiment_id(&self, model_name: &str, dataset: &str) -> String {
        let mut id = format!(
            "{model_name}+{dataset}+b{}+lr-{}",
            self.batch_size * self.grad_accumulation as usize,
            self.lr
        );
        if self.mode == TrainMode::Lora {
            id.push_str(&format!(
                "+lora-r{}+dropout-{:?}",
                self.lora_rank, self.lora_dropout
            ));
        } else {
            id.push_str(&format!("+{}", self.mode));
        }
        if self.image_aug {
            id.push_str("--image_aug");
        }
        id
    }
}

/// The OFT settings of a `--head l1` run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OftRun {
    /// Actions per chunk (K).
    pub chunk: usize,
    /// Whether the wrist camera is the second image.
    pub wrist: bool,
    /// Whether the robot state is an input.
    pub proprio: bool,
    /// Normalization of actions and proprio.
    pub normalization: NormalizationArg,
}

impl OftRun {
    /// Images per sample.
    pub fn num_images(&self) -> usize {
        1 + usize::from(self.wrist)
    }
}

/// Everything `finetune` resolved before training starts.
#[derive(Debug, Clone)]
pub struct FinetunePlan {
    /// The model's config.
    pub config: ModelConfig,
    /// Dataset statistics key.
    pub dataset_name: String,
    /// Action dimension of the dataset (= the model's).
    pub action_dim: usize,
    /// The LoRA config written with the adapter (LoRA mode).
    pub lora: Option<LoraConfig>,
    /// Number of LoRA-adapted modules (LoRA mode).
    pub lora_modules: usize,
    /// Memory estimate.
    pub memory: MemoryEstimate,
    /// The run directory.
    pub run_dir: PathBuf,
    /// Experiment id.
    pub experiment_id: String,
    /// What a resumed run must agree on.
    pub fingerprint: serde_json::Value,
    /// The OFT settings (`--head l1`).
    pub oft: Option<OftRun>,
}

/// The action dimensions the model was trained for, by dataset, from its `norm_stats` (a
/// sibling `dataset_statistics.json` replaces the config's, as in the engine).
pub fn model_action_dims(
    model_dir: &Path,
    config: &ModelConfig,
) -> Result<std::collections::BTreeMap<String, usize>> {
    let (stats, _) = openvla::policy::load_norm_stats(model_dir, config)?;
    Ok(stats
        .iter()
        .map(|(k, s)| (k.clone(), s.action.q01.len()))
        .collect())
}

/// Checks the dataset's action dimension against the model's: it must equal the dimension the
/// model has for the same dataset name, or else one of the dimensions the model was trained on
/// (OpenVLA emits one token per dimension and un-normalizes with per-dataset statistics).
pub fn check_action_dim(
    dataset: &str,
    data_dim: usize,
    model_dims: &std::collections::BTreeMap<String, usize>,
) -> Result<()> {
    if let Some(&m) = model_dims.get(dataset) {
        if m != data_dim {
            return Err(TrainError::ActionDimMismatch(format!(
                "dataset {dataset:?} has {data_dim}-dimensional actions but the model's \
                 statistics for {dataset:?} are {m}-dimensional"
            )));
        }
        return Ok(());
    }
    let dims: BTreeSet<usize> = model_dims.values().copied().collect();
    if !dims.is_empty() && !dims.contains(&data_dim) {
        let list = dims
            .iter()
            .map(|d| format!("{d}-dimensional"))
            .collect::<Vec<_>>()
            .join(" or ");
        return Err(TrainError::ActionDimMismatch(format!(
            "dataset {dataset:?} has {data_dim}-dimensional actions but the model predicts \
             {list} actions (its norm_stats); OpenVLA emits one token per action dimension, so \
             standardize the dataset to that layout (e.g. EEF_POS: xyz, rpy, gripper)"
        )));
    }
    Ok(())
}

/// Resolves and checks everything up to the training loop: flags, model config, tokenizer,
/// dataset and its action dimension, LoRA targets, memory, and the run directory (creates it,
/// writes `run.json`). Refuses a directory with checkpoints unless `--resume`.
pub fn prepare_finetune(args: &FinetuneArgs) -> Result<FinetunePlan> {
    args.validate()?;
    let config = ModelConfig::from_file(&args.model.join("config.json"))?;
    for f in ["tokenizer.json", "preprocessor_config.json"] {
        if !args.model.join(f).is_file() {
            return Err(TrainError::Invalid(format!(
                "{} has no {f}; --model must be a full HF model directory",
                args.model.display()
            )));
        }
    }
    let source = DatasetSource::open(
        &args.data,
        args.dataset.as_deref(),
        args.dataset_config.as_deref(),
    )?;
    let dataset_name = source.name().to_string();
    let action_dim = source.config.action_encoding.dim();
    let oft = args.oft()?;
    match &oft {
        // The L1 head regresses any action dimension; an existing head is checked against it
        // when it is read.
        Some(o) => {
            check_oft_data(&source, o)?;
            check_oft_model(&args.model, o)?;
            if args.aux_environment_state.is_some() && source.environment_state_dim().is_none() {
                return Err(TrainError::Invalid(format!(
                    "--aux-environment-state: dataset {:?} records no environment state (a \
                     LeRobot feature `{}` of one dimension, which `openvla sim demos` writes)",
                    source.name(),
                    openvla_data::trajectory::ENVIRONMENT_STATE_KEY
                )));
            }
        }
        None => check_action_dim(
            &dataset_name,
            action_dim,
            &model_action_dims(&args.model, &config)?,
        )?,
    }
    let targets = parse_target_modules(&args.target_modules)?;
    let (lora, lora_modules) = if args.mode == TrainMode::Lora {
        let tensors = openvla::synth::checkpoint_tensors(&config);
        let modules = modules_from_tensors(&tensors);
        let sel = select_targets(&modules, &targets, Some(OPENVLA_OUTPUT_EMBEDDING))?;
        let mut lc =
            LoraConfig::finetune_default(args.lora_rank, args.lora_alpha, args.lora_dropout);
        lc.target_modules = TargetModules::List(crate::lora::targets::resolve_target_names(
            &targets,
            &modules,
            Some(OPENVLA_OUTPUT_EMBEDDING),
        )?);
        lc.base_model_name_or_path = Some(args.model.display().to_string());
        let _ = count_lora_params(&sel, args.lora_rank);
        (Some(lc), sel.len())
    } else {
        (None, 0)
    };
    let bytes = match args.precision {
        Precision::F32 => 4,
        Precision::Bf16 => 2,
    };
    let memory = estimate(&MemoryInputs {
        config: &config,
        mode: args.mode,
        lora_rank: args.lora_rank,
        lora_targets: targets,
        batch_size: args.batch_size,
        // OFT: the other images' patches, the proprio token and the K·D action positions too.
        text_tokens: 40
            + oft.map_or(0, |o| {
                o.chunk * action_dim
                    + (o.num_images() - 1) * config.num_patches()
                    + usize::from(o.proprio)
            }),
        images: oft.map_or(1, |o| o.num_images()),
        weight_bytes: bytes,
        // The forward and backward compute in float32 with either precision.
        activation_bytes: 4,
        checkpointing: args.checkpointing,
    })?;
    if !args.no_memory_check {
        let avail = match args.max_memory_gb {
            Some(g) => Some((g * (1u64 << 30) as f64) as u64),
            None => available_memory(),
        };
        if let Some(a) = avail {
            check_fits(
                &memory,
                a,
                &format!("{} fine-tuning at batch {}", args.mode, args.batch_size),
            )?;
        }
    }
    let model_name = args
        .model
        .file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "openvla".into());
    let experiment_id = args.experiment_id(&model_name, &dataset_name);
    let fingerprint = serde_json::json!({
        "model": args.model.display().to_string(),
        "dataset": dataset_name,
        "mode": args.mode,
        "lora_rank": lora.as_ref().map(|l| l.r),
        "lora_alpha": lora.as_ref().map(|l| l.lora_alpha),
        "target_modules": args.target_modules,
        "batch_size": args.batch_size,
        "grad_accumulation": args.grad_accumulation,
        "seed": args.seed,
        "precision": args.precision,
        "image_aug": args.image_aug,
    });
    let mut fingerprint = fingerprint;
    if let Some(o) = &oft {
        fingerprint["head"] = serde_json::json!(args.head);
        fingerprint["chunk"] = o.chunk.into();
        fingerprint["images"] = args.images.trim().into();
        fingerprint["proprio"] = o.proprio.into();
        fingerprint["normalization"] = serde_json::json!(o.normalization);
        // Runs from before the flag resume as they were: the key exists only when it is set.
        if let Some(w) = args.aux_environment_state {
            fingerprint["aux_environment_state"] = w.into();
        }
    }
    if args.export_checkpoints && (oft.is_none() || args.mode == TrainMode::Lora) {
        return Err(TrainError::Invalid(format!(
            "--export-checkpoints exports the full model at every checkpoint of an OFT run: it \
             needs --head l1 and a mode that trains base weights (this run has --head {} \
             --mode {}); LoRA checkpoints already hold their adapter",
            serde_json::json!(args.head).as_str().unwrap_or("?"),
            args.mode
        )));
    }
    // Runs at a constant learning rate keep the fingerprint of earlier versions.
    let schedule = args.schedule();
    schedule.validate()?;
    if !schedule.is_constant() {
        fingerprint["lr_schedule"] = serde_json::json!(schedule.kind);
        fingerprint["warmup_steps"] = schedule.warmup_steps.into();
    }
    // f32 runs keep the fingerprint of earlier versions.
    if args.compute != openvla::kernels::ComputePrecision::F32 {
        fingerprint["compute"] = args.compute.name().into();
    }
    let run_dir = args.out.clone();
    let has_ckpt = crate::checkpoint::latest_checkpoint(&run_dir)?.is_some();
    if has_ckpt && !args.resume {
        return Err(TrainError::Invalid(format!(
            "{} already holds checkpoints; pass --resume to continue that run or choose another \
             --out",
            run_dir.display()
        )));
    }
    if args.resume && !has_ckpt {
        return Err(TrainError::Invalid(format!(
            "--resume: {} holds no complete checkpoint",
            run_dir.display()
        )));
    }
    let model_dir = run_dir.join("model");
    if (args.mode != TrainMode::Lora || oft.is_some()) && model_dir.exists() && !args.resume {
        return Err(TrainError::Invalid(format!(
            "{} already holds an exported model; pass --resume to continue that run (its end \
             replaces the export) or choose another --out",
            run_dir.display()
        )));
    }
    std::fs::create_dir_all(&run_dir).map_err(|e| TrainError::io(&run_dir, e))?;
    let run_json = serde_json::json!({
        "experiment_id": experiment_id,
        "fingerprint": fingerprint,
        "max_steps": args.max_steps,
        "save_interval": args.save_interval,
        "keep_last": args.keep_last,
        "adamw": args.adamw(),
        "lr_schedule": schedule,
        "shuffle_buffer": args.shuffle_buffer,
        "action_dim": action_dim,
        "lora_modules": lora_modules,
        "memory_estimate_bytes": memory.total(),
        "head": args.head,
        "chunk": oft.map(|o| o.chunk),
        "images": oft.map(|o| o.num_images()),
        "proprio": oft.map(|o| o.proprio),
    });
    let text =
        serde_json::to_string_pretty(&run_json).map_err(|e| TrainError::json(&run_dir, e))?;
    write_atomic(&run_dir.join("run.json"), text.as_bytes())?;
    Ok(FinetunePlan {
        config,
        dataset_name,
        action_dim,
        lora,
        lora_modules,
        memory,
        run_dir,
        experiment_id,
        fingerprint,
        oft,
    })
}

/// Checks that the dataset has what `--images` and `--proprio` ask for.
pub fn check_oft_data(source: &DatasetSource, oft: &OftRun) -> Result<()> {
    let name = source.name();
    if oft.wrist && source.config.wrist_image_key.is_none() {
        return Err(TrainError::Invalid(format!(
            "--images primary,wrist: dataset {name:?} has no wrist camera (its configuration \
             has no wrist_image_key; set one in a --dataset-config file)"
        )));
    }
    if oft.proprio && source.config.state_key.is_none() {
        return Err(TrainError::Invalid(format!(
            "--proprio: dataset {name:?} has no robot state (its configuration has no \
             state_key; set one in a --dataset-config file, or drop --proprio)"
        )));
    }
    Ok(())
}

/// An `oft_constants` / `oft_eval_cfg` value of `config.json` (the fields this engine writes
/// and reads; absent: `None`).
fn oft_config_value(
    config: &serde_json::Value,
    table: &str,
    key: &str,
) -> Option<serde_json::Value> {
    config
        .get(table)?
        .get(key)
        .filter(|v| !v.is_null())
        .cloned()
}

/// Checks the run's OFT settings against an OFT `--model` (one with `oft_constants` /
/// `oft_eval_cfg` fields or component files): its chunk size, image count, proprio input and
/// normalization must be the ones given. A plain OpenVLA model passes (its head and projector
/// are initialized fresh).
pub fn check_oft_model(model: &Path, oft: &OftRun) -> Result<()> {
    let path = model.join("config.json");
    let config: serde_json::Value = crate::error::read_json(&path)?;
    let contradiction = |what: &str, field: &str, have: String, flag: String| {
        let given = if what.is_empty() {
            flag
        } else {
            format!("{what} {flag}")
        };
        Err(TrainError::Invalid(format!(
            "{}: {field} is {have}, but this run gives {given}; the action head and proprio \
             projector of --model were trained with {have} (choose matching flags or start \
             from the plain OpenVLA model)",
            path.display()
        )))
    };
    if let Some(v) = oft_config_value(&config, "oft_constants", "NUM_ACTIONS_CHUNK") {
        if v.as_u64() != Some(oft.chunk as u64) {
            return contradiction(
                "--chunk",
                "oft_constants.NUM_ACTIONS_CHUNK",
                v.to_string(),
                oft.chunk.to_string(),
            );
        }
    }
    if let Some(v) = oft_config_value(&config, "oft_eval_cfg", "num_images_in_input") {
        if v.as_u64() != Some(oft.num_images() as u64) {
            return contradiction(
                "--images with",
                "oft_eval_cfg.num_images_in_input",
                v.to_string(),
                format!("{} image(s)", oft.num_images()),
            );
        }
    }
    let has_projector =
        openvla::oft::pt::find_component(model, openvla::oft::PROPRIO_PROJECTOR)?.is_some();
    let has_head = openvla::oft::pt::find_component(model, openvla::oft::ACTION_HEAD)?.is_some();
    let is_oft = has_head
        || has_projector
        || config.get("oft_constants").is_some()
        || config.get("oft_eval_cfg").is_some();
    if !is_oft {
        return Ok(());
    }
    let uses_proprio = oft_config_value(&config, "oft_eval_cfg", "use_proprio")
        .and_then(|v| v.as_bool())
        .unwrap_or(has_projector);
    if uses_proprio != oft.proprio {
        let has = if uses_proprio { "true" } else { "false" };
        return contradiction(
            "",
            "the proprio input (oft_eval_cfg.use_proprio / a proprio_projector file)",
            has.into(),
            if oft.proprio {
                "--proprio".into()
            } else {
                "no --proprio".into()
            },
        );
    }
    if let Some(v) = oft_config_value(
        &config,
        "oft_constants",
        "ACTION_PROPRIO_NORMALIZATION_TYPE",
    ) {
        let want = oft.normalization.oft().to_string();
        if v.as_str().map(str::to_ascii_lowercase) != Some(want.clone()) {
            return contradiction(
                "--normalization",
                "oft_constants.ACTION_PROPRIO_NORMALIZATION_TYPE",
                v.to_string(),
                want,
            );
        }
    }
    Ok(())
}

/// What `openvla finetune` did.
#[derive(Debug, Clone)]
pub struct FinetuneReport {
    /// The resolved plan.
    pub plan: FinetunePlan,
    /// The training loop's outcome.
    pub outcome: crate::trainer::RunOutcome,
    /// The last metrics record (loss, accuracy, L1, steps/s), if any step ran.
    pub last: Option<crate::log::MetricsRecord>,
    /// Trainable parameters (LoRA matrices or base weights).
    pub trainable_params: usize,
    /// Where the PEFT adapter was written (LoRA mode).
    pub adapter_dir: Option<PathBuf>,
    /// Where the fine-tuned HF model directory was written (`<out>/model`; the non-LoRA modes).
    pub model_dir: Option<PathBuf>,
}

/// Runs `openvla finetune`: checks everything up front ([`prepare_finetune`]), loads the
/// differentiable model ([`crate::model::OpenVlaTrain`]) with the mode's trainable parameters
/// and `--precision`'s storage for frozen weights, and trains ([`finetune_with_model`]).
pub fn run_finetune(args: &FinetuneArgs) -> Result<FinetuneReport> {
    use crate::model::{LoadTrainOptions, OpenVlaTrain, WeightStorage};
    let plan = prepare_finetune(args)?;
    let device = candle_core::Device::Cpu;
    let storage = match args.precision {
        Precision::F32 => WeightStorage::F32,
        Precision::Bf16 => WeightStorage::Bf16,
    };
    let model = OpenVlaTrain::load(
        &args.model,
        LoadTrainOptions {
            mode: args.mode,
            storage,
        },
        &device,
    )?;
    let base: usize = crate::seam::TrainModel::named_parameters(&model)
        .iter()
        .map(|(_, v)| v.elem_count())
        .sum();
    let trainable_params = match &plan.lora {
        Some(l) => {
            let modules = crate::seam::TrainModel::modules(&model);
            let sel = select_targets(
                &modules,
                &parse_target_modules(&args.target_modules)?,
                Some(OPENVLA_OUTPUT_EMBEDDING),
            )?;
            count_lora_params(&sel, l.r)
        }
        None => base,
    };
    let outcome = finetune_with_model(args, model, &device)?;
    // The OFT head and proprio projector train in full besides.
    let trainable_params = match plan.oft {
        Some(o) => {
            use crate::model::head::{
                aux_head_param_count, l1_head_param_count, proprio_projector_param_count,
            };
            let h = plan.config.text.hidden_size;
            let mut n = trainable_params + l1_head_param_count(h, plan.action_dim);
            if o.proprio || args.aux_environment_state.is_some() {
                let stats = dataset_statistics(
                    &DatasetSource::open(
                        &args.data,
                        args.dataset.as_deref(),
                        args.dataset_config.as_deref(),
                    )?,
                    &plan.run_dir,
                    o.proprio,
                )?;
                if let (true, Some(p)) = (o.proprio, &stats.proprio) {
                    n += proprio_projector_param_count(p.q01.len(), h);
                }
                if let (Some(_), Some(e)) = (args.aux_environment_state, &stats.environment_state) {
                    n += aux_head_param_count(plan.action_dim * h, e.q01.len());
                }
            }
            n
        }
        None => trainable_params,
    };
    let mpath = crate::trainer::metrics_path(&plan.run_dir);
    let last = if mpath.is_file() {
        crate::log::read_metrics(&mpath)?.pop()
    } else {
        None
    };
    let adapter_dir = plan.lora.as_ref().map(|_| plan.run_dir.join("adapter"));
    let model_dir = (plan.lora.is_none() || plan.oft.is_some()).then(|| plan.run_dir.join("model"));
    Ok(FinetuneReport {
        plan,
        outcome,
        last,
        trainable_params,
        adapter_dir,
        model_dir,
    })
}

/// Runs `openvla merge`.
pub fn run_merge(args: &MergeArgs) -> Result<crate::merge::MergeReport> {
    if !(args.max_shard_gb.is_finite() && args.max_shard_gb > 0.0) {
        return Err(TrainError::Invalid(format!(
            "--max-shard-gb must be positive, got {}",
            args.max_shard_gb
        )));
    }
    let stats_path = match &args.dataset_statistics {
        Some(p) => Some(p.clone()),
        None => [
            args.adapter.join("dataset_statistics.json"),
            args.adapter
                .parent()
                .map(|p| p.join("dataset_statistics.json"))
                .unwrap_or_default(),
        ]
        .into_iter()
        .find(|p| p.is_file()),
    };
    let dataset_statistics = match stats_path {
        Some(p) => {
            let v: serde_json::Value = crate::error::read_json(&p)?;
            let stats: openvla::NormStats = serde_json::from_value(v.clone())
                .map_err(|e| TrainError::json(&p, format!("not a dataset_statistics.json: {e}")))?;
            for (k, s) in &stats {
                s.action.validate(k).map_err(|m| TrainError::json(&p, m))?;
            }
            Some(v)
        }
        None => None,
    };
    merge_model_dir(&MergeOptions {
        base: args.model.clone(),
        adapter: args.adapter.clone(),
        out: args.out.clone(),
        recipe: match args.recipe {
            RecipeArg::Bf16Reference => MergeRecipe::Bf16Reference,
            RecipeArg::Float32 => MergeRecipe::Float32,
        },
        max_shard_bytes: (args.max_shard_gb * 1e9) as u64,
        dataset_statistics,
    })
}

/// Computes (or, on resume, reloads) the fine-tuning dataset's statistics and writes them as
/// `<run>/dataset_statistics.json` under the dataset's name, the file `openvla merge` and the
/// engine read. With `proprio`, they include the robot state's statistics (OFT's `proprio`
/// entry); a dataset with an environment state gets its `environment_state` entry too. A saved
/// file without what is asked for is recomputed.
pub fn dataset_statistics(
    source: &DatasetSource,
    run_dir: &Path,
    proprio: bool,
) -> Result<openvla_data::stats::DatasetStatistics> {
    let path = run_dir.join("dataset_statistics.json");
    if path.is_file() {
        let file = openvla_data::stats::load_statistics(&path)?;
        if let Some(s) = file.get(source.name()) {
            let env_ok = source.environment_state_dim().is_none() || s.environment_state.is_some();
            if (!proprio || s.proprio.is_some()) && env_ok {
                return Ok(s.clone());
            }
        }
    }
    let acc = openvla_data::stats::StatsAccumulator::new();
    let acc = if proprio { acc.with_proprio() } else { acc };
    let st = source.compute_statistics("all", false, None, None, acc)?;
    let mut file = openvla_data::stats::StatisticsFile::new();
    file.insert(source.name().to_string(), st.clone());
    let text = serde_json::to_string_pretty(&file).map_err(|e| TrainError::json(&path, e))?;
    write_atomic(&path, text.as_bytes())?;
    Ok(st)
}

/// Writes the PEFT adapter of a LoRA run to `<run>/adapter/`, with the run's
/// `dataset_statistics.json` next to it (where `openvla merge --adapter` finds it).
fn save_adapter(adapter: &crate::lora::LoraAdapter, run_dir: &Path) -> Result<()> {
    let dir = run_dir.join("adapter");
    adapter.save(&dir)?;
    let stats = run_dir.join("dataset_statistics.json");
    let bytes = std::fs::read(&stats).map_err(|e| TrainError::io(&stats, e))?;
    write_atomic(&dir.join("dataset_statistics.json"), &bytes)
}

/// The run-wide part of an OFT export's settings.
#[derive(Debug, Clone, Copy)]
struct OftExportSettings {
    run: OftRun,
    center_crop: bool,
    lora_rank: Option<usize>,
    compute: openvla::kernels::ComputePrecision,
}

impl OftExportSettings {
    fn at<'a>(
        &self,
        step: u64,
        head: &'a crate::model::head::L1HeadTrain,
        proprio: Option<&'a crate::model::head::ProprioProjectorTrain>,
    ) -> crate::export::OftExport<'a> {
        crate::export::OftExport {
            chunk: self.run.chunk,
            num_images: self.run.num_images(),
            normalization: self.run.normalization.oft(),
            center_crop: self.center_crop,
            lora_rank: self.lora_rank,
            inference_compute: (self.compute != openvla::kernels::ComputePrecision::F32)
                .then_some(self.compute),
            step,
            head,
            proprio,
        }
    }
}

/// Where and how the run's model directory `<run>/model/` is exported, with the run's
/// statistics.
fn export_options(args: &FinetuneArgs, run_dir: &Path) -> Result<ExportOptions> {
    let stats: serde_json::Value =
        crate::error::read_json(&run_dir.join("dataset_statistics.json"))?;
    Ok(ExportOptions {
        base: args.model.clone(),
        out: run_dir.join("model"),
        dtype: args.export_dtype,
        max_shard_bytes: (args.export_max_shard_gb * 1e9) as u64,
        dataset_statistics: Some(stats),
    })
}

/// Runs `openvla finetune` with a model that implements the training seam: statistics, the
/// frame stream, LoRA adapters (LoRA mode) or the mode's trainable parameters, the training
/// loop, and the final PEFT adapter in `<out>/adapter/` (with `dataset_statistics.json`, so
/// `openvla merge --adapter <out>/adapter` finds it), or, when base parameters were trained,
/// the complete HF model directory `<out>/model/` ([`export_model_dir`]: trained tensors from
/// the `Var`s, the others copied from `--model`, the run's `dataset_statistics.json`).
pub fn finetune_with_model<M: crate::seam::TrainModel + Send>(
    args: &FinetuneArgs,
    model: M,
    device: &candle_core::Device,
) -> Result<crate::trainer::RunOutcome> {
    use crate::data::{BatchFormat, OftStreamBatches, StreamBatches};
    use crate::export::export_oft_dir;
    use crate::lora::LoraAdapter;
    use crate::rng::TrainRng;
    use crate::seam::{L1Objective, VlaObjective};
    use crate::trainer::{train, TrainerConfig};
    use std::io::IsTerminal;

    let plan = prepare_finetune(args)?;
    let source = DatasetSource::open(
        &args.data,
        args.dataset.as_deref(),
        args.dataset_config.as_deref(),
    )?;
    let stats = dataset_statistics(&source, &plan.run_dir, plan.oft.is_some_and(|o| o.proprio))?;
    let split = source.reference_split(true);
    let seed = args.seed;
    let shuffle = args.shuffle_buffer;
    let aug = args.image_aug;
    let open_source = source.clone();
    let oft = plan.oft;
    let aux_weight = args.aux_environment_state;
    let run_stats = stats.clone();
    // Frames are resized to the model's resolution before augmentation, as the reference's
    // `resize_resolution=tuple(vla.module.config.image_sizes)`.
    let resize = plan.config.resize_resolution();
    let open = move || -> Result<openvla_data::stream::FrameStream> {
        let ds = openvla_data::stream::StreamDataset {
            source: open_source.clone(),
            split: split.clone(),
            weight: 1.0,
            statistics: Some(stats.clone()),
        };
        let mut cfg = openvla_data::stream::StreamConfig {
            seed,
            shuffle_buffer: shuffle,
            image_size: Some(resize),
            augment: aug.then(Default::default),
            ..Default::default()
        };
        if let Some(o) = oft {
            cfg.action_chunk = o.chunk;
            cfg.wrist = o.wrist;
            cfg.proprio = o.proprio;
            cfg.environment_state = aux_weight.is_some();
            cfg.normalization = o.normalization.data();
        }
        Ok(openvla_data::stream::stream(vec![ds], cfg)?)
    };
    let pre_path = args.model.join("preprocessor_config.json");
    let pre_text = std::fs::read_to_string(&pre_path).map_err(|e| TrainError::io(&pre_path, e))?;
    let preprocessor = openvla_image::PreprocessorConfig::from_json(&pre_text)
        .map_err(|e| TrainError::json(&pre_path, e))?;
    let format = BatchFormat {
        tokenizer: std::sync::Arc::new(openvla::processor::PromptTokenizer::from_file(
            &args.model.join("tokenizer.json"),
        )?),
        style: plan.config.prompt_style,
        n_bins: plan.config.n_action_bins,
        action_vocab_size: plan.config.action_vocab_size,
        preprocessor,
    };
    let adapter = match &plan.lora {
        Some(cfg) => {
            let modules = crate::seam::TrainModel::modules(&model);
            let targets = select_targets(
                &modules,
                &parse_target_modules(&args.target_modules)?,
                Some(OPENVLA_OUTPUT_EMBEDDING),
            )?;
            let mut rng = TrainRng::new(seed ^ 0x4C6F_5241);
            Some(LoraAdapter::init(cfg.clone(), &targets, &mut rng, device)?)
        }
        None => None,
    };
    let layers = plan.config.text.num_hidden_layers;
    let mode = args.mode;
    let cfg = TrainerConfig {
        run_dir: plan.run_dir.clone(),
        max_steps: args.max_steps,
        grad_accumulation: args.grad_accumulation,
        save_interval: args.save_interval,
        keep_last: args.keep_last,
        adamw: args.adamw(),
        schedule: args.schedule(),
        seed,
        progress: std::io::stderr().is_terminal(),
        fingerprint: plan.fingerprint.clone(),
        stop_after: None,
    };
    if let Some(o) = plan.oft {
        let (head, proprio) =
            crate::oft::start_components(&args.model, &plan.config, &o, &run_stats, seed)?;
        let mut data = OftStreamBatches::new(
            Box::new(open),
            args.batch_size,
            o.chunk,
            format,
            device.clone(),
        )?;
        let mut objective = L1Objective::new(
            model,
            |n| crate::mode::is_trainable(mode, n, layers),
            adapter,
            head,
            proprio,
            seed,
        )?;
        objective.checkpointing = args.checkpointing;
        if let Some(weight) = aux_weight {
            let st = run_stats.environment_state.as_ref().ok_or_else(|| {
                TrainError::Invalid(
                    "--aux-environment-state: the dataset statistics have no environment_state \
                     entry (some episode records no environment state)"
                        .into(),
                )
            })?;
            let mut rng = TrainRng::new(seed ^ 0x0041_5558);
            let head = crate::model::head::AuxHeadTrain::init(
                plan.action_dim * plan.config.text.hidden_size,
                st.q01.len(),
                &mut rng,
            )?;
            objective.aux = Some(crate::seam::AuxObjective { head, weight });
        }
        let settings = OftExportSettings {
            run: o,
            center_crop: args.image_aug,
            lora_rank: plan.lora.as_ref().map(|l| l.r),
            compute: args.compute,
        };
        let options = export_options(args, &plan.run_dir)?;
        if args.export_checkpoints {
            // The Vars share their storage with the trained ones: each checkpoint exports the
            // weights as they are at its step.
            let base_params = objective.backbone.base_params.clone();
            let options = options.clone();
            objective.components = Some(Box::new(move |dir, step, head, proprio| {
                crate::export::write_oft_components(dir, step, head, proprio)?;
                let opts = ExportOptions {
                    out: dir.join("model"),
                    ..options.clone()
                };
                export_oft_dir(&opts, &base_params, None, &settings.at(step, head, proprio))
                    .map(|_| ())
            }));
        } else {
            objective.components = Some(Box::new(crate::export::write_oft_components));
        }
        let outcome = in_training_pool(args.compute, || {
            train(&mut objective, &mut data, &cfg, args.resume)
        })?;
        if let Some(ad) = &objective.backbone.adapter {
            save_adapter(ad, &plan.run_dir)?;
        }
        export_oft_dir(
            &options,
            &objective.backbone.base_params,
            objective.backbone.adapter.as_ref(),
            &settings.at(outcome.step, &objective.head, objective.proprio.as_ref()),
        )?;
        return Ok(outcome);
    }
    let mut data = StreamBatches::new(Box::new(open), args.batch_size, format, device.clone())?;
    let mut objective = VlaObjective::new(
        model,
        |n| crate::mode::is_trainable(mode, n, layers),
        adapter,
        openvla::action::ActionTokenizer::new(
            plan.config.n_action_bins,
            plan.config.action_vocab_size,
        ),
        seed,
    )?;
    objective.checkpointing = args.checkpointing;
    let outcome = in_training_pool(args.compute, || {
        train(&mut objective, &mut data, &cfg, args.resume)
    })?;
    if let Some(ad) = &objective.backbone.adapter {
        save_adapter(ad, &plan.run_dir)?;
    } else if !objective.backbone.base_params.is_empty() {
        export_model_dir(
            &export_options(args, &plan.run_dir)?,
            &objective.backbone.base_params,
        )?;
    }
    Ok(outcome)
}

/// Runs `f` (the training loop) on a thread of the rayon pool with the linears' arithmetic
/// `compute`: the parallel ops of every step then split their work with `join` on the pool
/// instead of each handing a job to a sleeping worker and putting the caller to sleep until it
/// is done (thousands of ops per step, two thread wake-ups each).
fn in_training_pool<R: Send>(
    compute: openvla::kernels::ComputePrecision,
    f: impl FnOnce() -> R + Send,
) -> R {
    openvla::kernels::in_pool(|| {
        let _compute = crate::model::fused::BF16Matmuls::set(compute);
        f()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: FinetuneArgs,
    }

    fn parse(extra: &[&str]) -> std::result::Result<FinetuneArgs, clap::Error> {
        let mut argv = vec!["finetune", "--model", "m", "--data", "d", "--out", "o"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).map(|c| c.args)
    }

    #[test]
    fn oft_flags_parse() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.head, HeadArg::Bins256);
        assert!(a.oft().unwrap().is_none());
        a.validate().unwrap();
        let a = parse(&[
            "--head",
            "l1",
            "--chunk",
            "8",
            "--images",
            "primary,wrist",
            "--proprio",
            "--normalization",
            "bounds",
        ])
        .unwrap();
        a.validate().unwrap();
        let o = a.oft().unwrap().unwrap();
        assert_eq!((o.chunk, o.num_images(), o.proprio), (8, 2, true));
        assert_eq!(o.normalization.oft(), NormalizationType::Bounds);
        assert!(parse(&["--head", "l2"]).is_err());
        let e = parse(&["--head", "l1"]).unwrap().validate().unwrap_err();
        assert!(e.to_string().contains("--chunk"), "{e}");
        let e = parse(&["--proprio"]).unwrap().validate().unwrap_err();
        assert!(e.to_string().contains("--head l1"), "{e}");
    }
}
