//! The seam between the training crate and the model.
//!
//! Everything else in this crate (batches, loss, metrics, AdamW, LoRA files and merging, the
//! loop, checkpoints) works without the model's internals. What the model has to provide is
//! the [`TrainModel`] trait; [`VlaObjective`] turns any implementation into a trainer
//! [`Objective`](crate::trainer::Objective).
//!
//! # What the model must provide (`openvla::model`)
//!
//! 1. **A differentiable forward** (`forward_train`): `pixel_values [B, C, 224, 224]`,
//!    `input_ids [B, T]` (u32), `attention_mask [B, T]` (u8, 1 = real token) to the logits of
//!    the multimodal sequence `[BOS, 256 patches, input_ids[1..]]`, `[B, 256 + T, V]`, like the
//!    HF forward with `labels`. Requirements:
//!    * every op on the path records a backward: no `candle_nn::ops::{softmax_last_dim,
//!      rms_norm, layer_norm}`, no `rotary_emb::rope*`, no `RmsNorm/LayerNorm::forward` on
//!      contiguous input, no `QMatMul` (rust-stack §1.7); use `ops::softmax(x, D::Minus1)`,
//!      explicit norms and `rope_slow`-style rotary;
//!    * the multimodal attention mask is `[mask[:, :1], ones(256), mask[:, 1:]]` with causal
//!      masking (right padding: pad keys masked);
//!    * the vision towers stop at block `len - 2` (the last block, the final norms and SigLIP's
//!      attention pool are not on the path and get no gradient);
//!    * it may return only positions `offset..` (e.g. `offset = 256` skips the patch-position
//!      logits, which no label uses): [`TrainLogits::offset`].
//! 2. **Parameters as `Var`s by checkpoint name** (`named_parameters`): the HF tensor names
//!    (`language_model.model.layers.0.self_attn.q_proj.weight`, ...). For full, frozen-vision,
//!    last-layer and sandwich modes the trained ones must be float32 `Var`s whose tensors are
//!    the ones used in the forward (so the `GradStore` has their gradients); frozen ones may be
//!    plain tensors in any dtype.
//! 3. **The module list** (`modules`): every Linear, Conv2d and Embedding with its name (the
//!    weight's name without `.weight`) and weight shape, for PEFT targeting (`all-linear`).
//! 4. **LoRA injection** (`attach_lora`): for a Linear named `m`, `y = x W^T + b +
//!    lora.forward_delta(x)`; for the patch-embed Conv2d, `y = conv(x) + lora.forward_delta(x)`
//!    (the [`LoraLayer`] knows the stride). Names are PEFT module names without the
//!    `base_model.model.` prefix.
//!
//! ```ignore
//! impl TrainModel for openvla::model::OpenVla { ... }   // the later step
//! ```

use crate::batch::{collate, ExampleBuilder, TextBatch, MODEL_MAX_LENGTH};
use crate::error::{Result, TrainError};
use crate::lora::{LoraAdapter, LoraLayer, ModuleInfo};
use crate::loss::causal_lm_loss;
use crate::metrics::action_metrics;
use crate::recompute::Grads;
use crate::rng::TrainRng;
use crate::trainer::{plain_forward_backward, Objective, StepOutput};
use candle_core::{Device, Tensor, Var};
use openvla::action::ActionTokenizer;
use std::path::Path;
use std::sync::Arc;

/// Logits returned by [`TrainModel::forward_train`].
#[derive(Debug, Clone)]
pub struct TrainLogits {
    /// `[B, S, V]`; row `i` is multimodal position `offset + i`.
    pub logits: Tensor,
    /// Multimodal position of row 0.
    pub offset: usize,
}

/// What training needs from the model (see the module docs).
pub trait TrainModel {
    /// Image patch tokens spliced after BOS (256 for OpenVLA).
    fn num_patches(&self) -> usize;

    /// The differentiable forward.
    fn forward_train(
        &self,
        pixel_values: &Tensor,
        input_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<TrainLogits>;

    /// Base parameters by HF checkpoint name (trained ones as float32 `Var`s).
    fn named_parameters(&self) -> Vec<(String, Var)>;

    /// Every Linear / Conv2d / Embedding module, in model order.
    fn modules(&self) -> Vec<ModuleInfo>;

    /// Adds a LoRA branch to module `name`.
    fn attach_lora(&mut self, name: &str, layer: Arc<LoraLayer>) -> Result<()>;

    /// One micro-batch's forward and backward with per-block gradient checkpointing
    /// ([`crate::recompute`]): `loss_of` maps the logits to the loss; returns the (detached)
    /// loss and the gradients of `params`. Models without block structure say so.
    fn forward_backward_checkpointed(
        &self,
        _pixel_values: &Tensor,
        _input_ids: &Tensor,
        _attention_mask: &Tensor,
        _params: &[(String, Var)],
        _lora: &[Arc<LoraLayer>],
        _loss_of: &mut dyn FnMut(&TrainLogits) -> Result<Tensor>,
    ) -> Result<(Tensor, Grads)> {
        Err(TrainError::Invalid(
            "this model does not support gradient checkpointing".into(),
        ))
    }
}

/// A training batch for the VLA: images and collated text.
#[derive(Debug, Clone)]
pub struct VlaBatch {
    /// `[B, C, H, W]` float32 pixel values.
    pub pixel_values: Tensor,
    /// Collated ids, labels and mask.
    pub text: TextBatch,
}

/// One raw training sample: a preprocessed image, the instruction and the normalized action.
#[derive(Debug, Clone)]
pub struct VlaSample {
    /// Preprocessed image (`[C, H, W]` values).
    pub pixel_values: openvla_image::PixelValues,
    /// Language instruction.
    pub instruction: String,
    /// BOUNDS_Q99-normalized action.
    pub action: Vec<f32>,
}

/// Builds a [`VlaBatch`] from samples exactly as the reference's transform + collator do.
pub fn make_batch(
    builder: &ExampleBuilder,
    samples: &[VlaSample],
    device: &Device,
) -> Result<VlaBatch> {
    let examples = samples
        .iter()
        .map(|s| builder.build(&s.instruction, &s.action))
        .collect::<Result<Vec<_>>>()?;
    let text = collate(&examples, MODEL_MAX_LENGTH)?;
    let first = samples
        .first()
        .ok_or_else(|| TrainError::Invalid("empty batch".into()))?;
    let (c, h, w) = (
        first.pixel_values.channels,
        first.pixel_values.height,
        first.pixel_values.width,
    );
    let mut data = Vec::with_capacity(samples.len() * c * h * w);
    for s in samples {
        let p = &s.pixel_values;
        if (p.channels, p.height, p.width) != (c, h, w) {
            return Err(TrainError::Invalid(
                "images of one batch have different preprocessed sizes".into(),
            ));
        }
        data.extend_from_slice(&p.data);
    }
    let pixel_values = Tensor::from_vec(data, (samples.len(), c, h, w), device)?;
    Ok(VlaBatch { pixel_values, text })
}

/// The VLA objective: forward, loss, metrics; trains the model's selected base parameters and
/// any LoRA adapter attached through it.
pub struct VlaObjective<M: TrainModel> {
    /// The model.
    pub model: M,
    /// Base parameters being trained (empty for LoRA).
    pub base_params: Vec<(String, Var)>,
    /// The LoRA adapter, when training LoRA.
    pub adapter: Option<LoraAdapter>,
    /// The LoRA branches (reseeded from the run RNG every step for dropout).
    pub lora_layers: Vec<Arc<LoraLayer>>,
    /// Decodes action ids for the L1 metric.
    pub action_tokenizer: ActionTokenizer,
    /// Per-block gradient checkpointing (`--checkpointing`): less memory, one more forward.
    pub checkpointing: bool,
}

impl<M: TrainModel> std::fmt::Debug for VlaObjective<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VlaObjective")
            .field("base_params", &self.base_params.len())
            .field("lora_layers", &self.lora_layers.len())
            .finish_non_exhaustive()
    }
}

impl<M: TrainModel> VlaObjective<M> {
    /// Wraps `model`, training the base parameters whose names `trainable` accepts, and, if
    /// given, attaching `adapter` (LoRA mode). `strides` gives a Conv2d module's stride.
    pub fn new(
        mut model: M,
        trainable: impl Fn(&str) -> bool,
        adapter: Option<LoraAdapter>,
        action_tokenizer: ActionTokenizer,
        seed: u64,
    ) -> Result<Self> {
        let base_params: Vec<(String, Var)> = model
            .named_parameters()
            .into_iter()
            .filter(|(n, _)| trainable(n))
            .collect();
        let mut lora_layers = Vec::new();
        if let Some(ad) = &adapter {
            let modules = model.modules();
            ad.check_against(&modules)?;
            let mut rng = TrainRng::new(seed);
            for (name, w) in &ad.modules {
                let stride = modules
                    .iter()
                    .find(|m| &m.name == name)
                    .and_then(|m| m.weight_shape.get(2).copied())
                    .unwrap_or(1);
                let layer = Arc::new(LoraLayer::new(
                    w.clone(),
                    ad.config.scaling(),
                    ad.config.lora_dropout,
                    stride,
                    rng.next_u64(),
                ));
                model.attach_lora(name, layer.clone())?;
                lora_layers.push(layer);
            }
        }
        Ok(Self {
            model,
            base_params,
            adapter,
            lora_layers,
            action_tokenizer,
            checkpointing: false,
        })
    }
}

impl<M: TrainModel> Objective for VlaObjective<M> {
    type Batch = VlaBatch;

    fn params(&self) -> Vec<(String, Var)> {
        let mut p = self.base_params.clone();
        if let Some(ad) = &self.adapter {
            p.extend(ad.named_vars());
        }
        p
    }

    fn forward(&mut self, batch: &VlaBatch, rng: &mut TrainRng) -> Result<StepOutput> {
        for l in &self.lora_layers {
            l.reseed(rng.next_u64())?;
        }
        let dev = batch.pixel_values.device();
        let out = self.model.forward_train(
            &batch.pixel_values,
            &batch.text.input_ids_tensor(dev)?,
            &batch.text.attention_mask_tensor(dev)?,
        )?;
        let np = self.model.num_patches();
        let labels = batch.text.multimodal_labels(np);
        let loss = causal_lm_loss(&out.logits, &labels, out.offset)?;
        let m = action_metrics(
            &out.logits,
            &batch.text,
            np,
            out.offset,
            &self.action_tokenizer,
        )?;
        Ok(StepOutput {
            loss: loss.loss,
            action_accuracy: Some(m.action_accuracy),
            action_l1_loss: Some(m.action_l1_loss),
        })
    }

    fn forward_backward(
        &mut self,
        batch: &VlaBatch,
        rng: &mut TrainRng,
        accumulation: u64,
    ) -> Result<(StepOutput, Grads)> {
        if !self.checkpointing {
            return plain_forward_backward(self, batch, rng, accumulation);
        }
        for l in &self.lora_layers {
            l.reseed(rng.next_u64())?;
        }
        let dev = batch.pixel_values.device().clone();
        let np = self.model.num_patches();
        let labels = batch.text.multimodal_labels(np);
        let mut metrics = None;
        let mut unscaled = None;
        let tokenizer = &self.action_tokenizer;
        let text = &batch.text;
        let mut loss_of = |out: &TrainLogits| -> Result<Tensor> {
            let loss = causal_lm_loss(&out.logits, &labels, out.offset)?;
            metrics = Some(action_metrics(
                &out.logits,
                text,
                np,
                out.offset,
                tokenizer,
            )?);
            unscaled = Some(loss.loss.detach());
            Ok(if accumulation > 1 {
                (loss.loss / accumulation as f64)?
            } else {
                loss.loss
            })
        };
        let params = self.params();
        let (_, grads) = self.model.forward_backward_checkpointed(
            &batch.pixel_values,
            &batch.text.input_ids_tensor(&dev)?,
            &batch.text.attention_mask_tensor(&dev)?,
            &params,
            &self.lora_layers,
            &mut loss_of,
        )?;
        let (Some(m), Some(loss)) = (metrics, unscaled) else {
            return Err(TrainError::Invalid("the loss was never computed".into()));
        };
        Ok((
            StepOutput {
                loss,
                action_accuracy: Some(m.action_accuracy),
                action_l1_loss: Some(m.action_l1_loss),
            },
            grads,
        ))
    }

    fn export(&self, dir: &Path) -> Result<()> {
        if let Some(ad) = &self.adapter {
            ad.save(&dir.join("adapter"))?;
        }
        Ok(())
    }
}
