//! Up-front memory estimate of a fine-tuning run, so that a run that cannot fit fails in a
//! second with a clear message instead of after hours.
//!
//! ```text
//! weights      all base parameters x weight dtype (frozen ones may be bf16; trained base
//!              parameters are float32 masters)
//! lora         LoRA parameters x 4 B
//! gradients    trainable parameters x 4 B
//! moments      trainable parameters x 8 B (AdamW exp_avg + exp_avg_sq, float32)
//! activations  what autograd keeps for the backward, per sample (see `activation_elems`)
//! ```
//!
//! Activations follow candle's autograd, which keeps every intermediate tensor of the graph
//! alive until `backward` (no in-place ops, no recomputation): per Llama layer on a sequence of
//! `S = num_patches + T` tokens about `S (16 h + 4 kv + 6 I) + 4 heads S^2` values, per ViT
//! block `N (14 d + 4 m) + 4 heads N^2`, plus the logits `S x V`. Towers whose parameters and
//! inputs need no gradient (frozen vision) keep nothing. That count is multiplied by
//! [`ACTIVATION_CALIBRATION`], measured on the real model (the explicit norms, softmax, rope
//! and the LoRA branches keep more intermediates than the count above). With per-block
//! gradient checkpointing only each block's input is kept, plus one block's graph at a time
//! ([`checkpointed_activation_elems`]).

use crate::error::{Result, TrainError};
use crate::lora::targets::{count_lora_params, modules_from_tensors, select_targets};
use crate::lora::TargetModules;
use crate::mode::{is_trainable, TrainMode};
use openvla::ModelConfig;

/// Measured peak over counted activations: LoRA r=32 on the MiniVLA-sized model at batch 1
/// peaked at 13.7 GiB RSS (allocator slack ruled out with `MALLOC_MMAP_THRESHOLD_`), i.e.
/// 9.1 GiB of activations where the count gives 3.97 GiB (docs/finetuning.md).
pub const ACTIVATION_CALIBRATION: f64 = 2.3;

/// The inputs of an estimate.
#[derive(Debug, Clone)]
pub struct MemoryInputs<'a> {
    /// The model.
    pub config: &'a ModelConfig,
    /// Fine-tuning mode.
    pub mode: TrainMode,
    /// LoRA rank (LoRA mode).
    pub lora_rank: usize,
    /// LoRA targets (LoRA mode).
    pub lora_targets: TargetModules,
    /// Samples per micro-batch.
    pub batch_size: usize,
    /// Text tokens per sample (prompt + actions + EOS; about 30-45 for OpenVLA prompts), plus
    /// any positions besides the first image's patches (OFT: the other images' patches, the
    /// proprio token, the `K·D` action positions).
    pub text_tokens: usize,
    /// Images per sample, each through the vision towers (1 for OpenVLA).
    pub images: usize,
    /// Bytes per frozen weight (2 for bf16, 4 for float32).
    pub weight_bytes: usize,
    /// Bytes per activation value (2 for bf16 compute, 4 for float32).
    pub activation_bytes: usize,
    /// Per-block gradient checkpointing (`--checkpointing`).
    pub checkpointing: bool,
}

/// The estimate, in bytes (and parameter counts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// All base parameters.
    pub total_params: u64,
    /// Parameters the optimizer updates (LoRA matrices, or the trained base parameters).
    pub trainable_params: u64,
    /// Base weights (+ LoRA weights).
    pub weights: u64,
    /// Gradients of the trainable parameters.
    pub gradients: u64,
    /// AdamW moments.
    pub optimizer: u64,
    /// Activations kept for the backward, whole micro-batch.
    pub activations: u64,
}

impl MemoryEstimate {
    /// Sum of all parts.
    pub fn total(&self) -> u64 {
        self.weights + self.gradients + self.optimizer + self.activations
    }

    /// A human-readable breakdown.
    pub fn describe(&self) -> String {
        format!(
            "{} total = weights {} + gradients {} + AdamW moments {} + activations {} \
             ({} trainable of {} parameters)",
            gib(self.total()),
            gib(self.weights),
            gib(self.gradients),
            gib(self.optimizer),
            gib(self.activations),
            self.trainable_params,
            self.total_params
        )
    }
}

/// Formats bytes as GiB.
pub fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

/// Activation values kept per sample: `(vision, llm)`.
pub fn activation_elems(config: &ModelConfig, text_tokens: usize) -> (u64, u64) {
    activations(config, text_tokens, false)
}

/// Activation values kept per sample with per-block gradient checkpointing
/// (`--checkpointing`): each block's input, plus the whole graph of one block (the largest),
/// which is alive while it is recomputed, plus the logits: `(vision, llm)`.
pub fn checkpointed_activation_elems(config: &ModelConfig, text_tokens: usize) -> (u64, u64) {
    activations(config, text_tokens, true)
}

fn activations(config: &ModelConfig, text_tokens: usize, checkpointed: bool) -> (u64, u64) {
    let mut vision = 0u64;
    let mut largest_block = 0u64;
    for t in &config.towers {
        let n = (t.num_patches() + t.num_prefix_tokens()) as u64;
        let d = t.embed_dim as u64;
        let m = t.mlp_hidden() as u64;
        let blocks = (t.selected_block() + 1) as u64;
        let block = n * (14 * d + 4 * m) + 4 * t.num_heads as u64 * n * n;
        largest_block = largest_block.max(block);
        vision += blocks * if checkpointed { n * d } else { block };
    }
    let tx = &config.text;
    let s = (config.num_patches() + text_tokens) as u64;
    let h = tx.hidden_size as u64;
    let kv = (tx.num_key_value_heads * tx.head_dim()) as u64;
    let i = tx.intermediate_size as u64;
    let heads = tx.num_attention_heads as u64;
    let layer = s * (16 * h + 4 * kv + 6 * i) + 4 * heads * s * s;
    let logits = s * tx.vocab_size as u64 * 2;
    let layers = tx.num_hidden_layers as u64;
    if checkpointed {
        // One block's graph at a time, whichever is largest.
        let llm = layers * s * h + layer.max(largest_block) + logits;
        (vision, llm)
    } else {
        (vision, layers * layer + logits)
    }
}

/// Estimates the memory of a run.
pub fn estimate(inp: &MemoryInputs) -> Result<MemoryEstimate> {
    let tensors = openvla::synth::checkpoint_tensors(inp.config);
    let layers = inp.config.text.num_hidden_layers;
    let mut total = 0u64;
    let mut trained_base = 0u64;
    for (name, shape) in &tensors {
        let n: u64 = shape.iter().map(|&d| d as u64).product();
        total += n;
        if is_trainable(inp.mode, name, layers) {
            trained_base += n;
        }
    }
    let lora = if inp.mode == TrainMode::Lora {
        let modules = modules_from_tensors(&tensors);
        let targets = select_targets(
            &modules,
            &inp.lora_targets,
            Some(crate::lora::targets::OPENVLA_OUTPUT_EMBEDDING),
        )?;
        count_lora_params(&targets, inp.lora_rank) as u64
    } else {
        0
    };
    let trainable = trained_base + lora;
    let weights = (total - trained_base) * inp.weight_bytes as u64 + trained_base * 4 + lora * 4;
    let (vision, llm) = activations(inp.config, inp.text_tokens, inp.checkpointing);
    let vision_needs_grad = matches!(
        inp.mode,
        TrainMode::Lora | TrainMode::Full | TrainMode::Sandwich
    );
    let vision = vision * inp.images.max(1) as u64;
    let per_sample = llm + if vision_needs_grad { vision } else { 0 };
    let counted = per_sample * inp.batch_size as u64 * inp.activation_bytes as u64;
    let activations = (counted as f64 * ACTIVATION_CALIBRATION) as u64;
    Ok(MemoryEstimate {
        total_params: total,
        trainable_params: trainable,
        weights,
        gradients: trainable * 4,
        optimizer: trainable * 8,
        activations,
    })
}

/// Memory available to this process (`MemAvailable`, Linux), the engine's one reading of it.
pub use openvla::policy::available_memory;

/// Errors with a clear message when `est` exceeds `available` bytes.
pub fn check_fits(est: &MemoryEstimate, available: u64, what: &str) -> Result<()> {
    if est.total() > available {
        return Err(TrainError::OutOfMemory(format!(
            "{what} needs about {} but only {} is available: {}. Use a smaller --batch-size \
             with more --grad-accumulation, LoRA instead of full fine-tuning, or bf16 \
             weights (--precision bf16)",
            gib(est.total()),
            gib(available),
            est.describe()
        )));
    }
    Ok(())
}
