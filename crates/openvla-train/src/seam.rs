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
use crate::model::head::{AuxHeadTrain, L1HeadTrain, ProprioProjectorTrain};
use crate::oft::OftBatch;
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

    /// The trunk (vision towers -> projector -> Llama) on general inputs: several images, extra
    /// tokens after the patches, zeroed embeddings and causal or bidirectional attention
    /// ([`TrunkInputs`]). Returns the hidden states after the final norm. Heads other than the
    /// 256-bin one read these (the OFT L1 head). Models without it say so.
    fn trunk_forward(&self, _inputs: &TrunkInputs<'_>) -> Result<TrunkOutput> {
        Err(TrainError::Invalid(
            "this model has no general trunk forward (several images, extra tokens, \
             bidirectional attention)"
                .into(),
        ))
    }

    /// [`TrainModel::trunk_forward`] and its backward with per-block gradient checkpointing:
    /// `top` maps the trunk's output to the loss (it may use parameters of its own, e.g. a
    /// head; their gradients are gathered when they are in `params`, as are those of
    /// parameters that produced `inputs.extra_tokens`). Returns the (detached) loss and the
    /// gradients of `params`.
    fn trunk_backward_checkpointed(
        &self,
        _inputs: &TrunkInputs<'_>,
        _params: &[(String, Var)],
        _lora: &[Arc<LoraLayer>],
        _top: &mut dyn FnMut(&TrunkOutput) -> Result<Tensor>,
    ) -> Result<(Tensor, Grads)> {
        Err(TrainError::Invalid(
            "this model does not support gradient checkpointing".into(),
        ))
    }

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

/// How the positions of the multimodal sequence attend to each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attention {
    /// Causal (OpenVLA's next-token objective); right-padding keys masked.
    Causal,
    /// Every position attends to every non-padding position (OFT's parallel decoding, with
    /// the reference's transformers fork: the padding mask's last row broadcast to all rows).
    Bidirectional,
}

/// The inputs of the trunk: the one place where new inputs plug in. The LLM reads
/// `[BOS, the patches of each image in order, extra tokens, input_ids[1..]]`.
#[derive(Debug, Clone, Copy)]
pub struct TrunkInputs<'a> {
    /// `[B, images·3·towers, H, W]`: each image's channels (every tower's 3) one after the
    /// other, primary first.
    pub pixel_values: &'a Tensor,
    /// `[B, T]` (u32), BOS first.
    pub input_ids: &'a Tensor,
    /// `[B, T]` (u8, 1 = real token; right padding).
    pub attention_mask: &'a Tensor,
    /// `[B, n, D]` tokens appended after all image patches (OFT's proprio token); may carry a
    /// graph back to parameters outside the model.
    pub extra_tokens: Option<&'a Tensor>,
    /// `[B, T]` (u8, 1 = this token's embedding is replaced by zeros: OFT's action positions).
    pub zeroed: Option<&'a Tensor>,
    /// The attention pattern.
    pub attention: Attention,
}

impl<'a> TrunkInputs<'a> {
    /// OpenVLA's inputs: one image, no extra tokens, causal attention.
    pub fn causal(
        pixel_values: &'a Tensor,
        input_ids: &'a Tensor,
        attention_mask: &'a Tensor,
    ) -> Self {
        Self {
            pixel_values,
            input_ids,
            attention_mask,
            extra_tokens: None,
            zeroed: None,
            attention: Attention::Causal,
        }
    }
}

/// What [`TrainModel::trunk_forward`] returns.
#[derive(Debug, Clone)]
pub struct TrunkOutput {
    /// `[B, 1 + prefix + T - 1, D]`: the hidden states after the final norm.
    pub hidden: Tensor,
    /// Positions between BOS and `input_ids[1]`: all images' patches plus the extra tokens
    /// (the reference's `NUM_PATCHES`).
    pub prefix: usize,
}

/// Attaches `adapter`'s LoRA branches to `model` (their dropout streams seeded from `seed`);
/// returns the branches.
pub fn attach_adapter<M: TrainModel>(
    model: &mut M,
    adapter: Option<&LoraAdapter>,
    seed: u64,
) -> Result<Vec<Arc<LoraLayer>>> {
    let mut lora_layers = Vec::new();
    let Some(ad) = adapter else {
        return Ok(lora_layers);
    };
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
    Ok(lora_layers)
}

/// The backbone side of an objective: the model, the base parameters being trained (as
/// float32 `Var`s) and the LoRA adapter with its branches attached to the model. Both
/// objectives ([`VlaObjective`], [`L1Objective`]) train it the same way.
pub struct Backbone<M: TrainModel> {
    /// The model.
    pub model: M,
    /// Base parameters being trained (empty for LoRA).
    pub base_params: Vec<(String, Var)>,
    /// The LoRA adapter, when training LoRA.
    pub adapter: Option<LoraAdapter>,
    /// The LoRA branches (reseeded from the run RNG every step for dropout).
    pub lora_layers: Vec<Arc<LoraLayer>>,
}

impl<M: TrainModel> std::fmt::Debug for Backbone<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backbone")
            .field("base_params", &self.base_params.len())
            .field("lora_layers", &self.lora_layers.len())
            .finish_non_exhaustive()
    }
}

impl<M: TrainModel> Backbone<M> {
    /// Trains the base parameters of `model` whose names `trainable` accepts and, if given,
    /// attaches `adapter`'s LoRA branches (LoRA mode; dropout streams seeded from `seed`).
    pub fn new(
        mut model: M,
        trainable: impl Fn(&str) -> bool,
        adapter: Option<LoraAdapter>,
        seed: u64,
    ) -> Result<Self> {
        let base_params = model
            .named_parameters()
            .into_iter()
            .filter(|(n, _)| trainable(n))
            .collect();
        let lora_layers = attach_adapter(&mut model, adapter.as_ref(), seed)?;
        Ok(Self {
            model,
            base_params,
            adapter,
            lora_layers,
        })
    }

    /// The trained backbone parameters: the base ones, then the adapter's.
    pub fn params(&self) -> Vec<(String, Var)> {
        let mut p = self.base_params.clone();
        if let Some(ad) = &self.adapter {
            p.extend(ad.named_vars());
        }
        p
    }

    /// Draws this step's LoRA dropout streams from the run RNG.
    fn reseed(&self, rng: &mut TrainRng) -> Result<()> {
        for l in &self.lora_layers {
            l.reseed(rng.next_u64())?;
        }
        Ok(())
    }

    /// Saves the adapter (if any) into a checkpoint directory.
    fn export(&self, dir: &Path) -> Result<()> {
        if let Some(ad) = &self.adapter {
            ad.save(&dir.join("adapter"))?;
        }
        Ok(())
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
    /// The model and what of it trains.
    pub backbone: Backbone<M>,
    /// Decodes action ids for the L1 metric.
    pub action_tokenizer: ActionTokenizer,
    /// Per-block gradient checkpointing (`--checkpointing`): less memory, one more forward.
    pub checkpointing: bool,
}

impl<M: TrainModel> std::fmt::Debug for VlaObjective<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VlaObjective")
            .field("backbone", &self.backbone)
            .finish_non_exhaustive()
    }
}

impl<M: TrainModel> VlaObjective<M> {
    /// Wraps `model`, training the base parameters whose names `trainable` accepts, and, if
    /// given, attaching `adapter` (LoRA mode). `strides` gives a Conv2d module's stride.
    pub fn new(
        model: M,
        trainable: impl Fn(&str) -> bool,
        adapter: Option<LoraAdapter>,
        action_tokenizer: ActionTokenizer,
        seed: u64,
    ) -> Result<Self> {
        Ok(Self {
            backbone: Backbone::new(model, trainable, adapter, seed)?,
            action_tokenizer,
            checkpointing: false,
        })
    }
}

impl<M: TrainModel> Objective for VlaObjective<M> {
    type Batch = VlaBatch;

    fn params(&self) -> Vec<(String, Var)> {
        self.backbone.params()
    }

    fn forward(&mut self, batch: &VlaBatch, rng: &mut TrainRng) -> Result<StepOutput> {
        self.backbone.reseed(rng)?;
        let dev = batch.pixel_values.device();
        let out = self.backbone.model.forward_train(
            &batch.pixel_values,
            &batch.text.input_ids_tensor(dev)?,
            &batch.text.attention_mask_tensor(dev)?,
        )?;
        let np = self.backbone.model.num_patches();
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
            next_actions_l1_loss: None,
            aux_l1_loss: None,
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
        self.backbone.reseed(rng)?;
        let dev = batch.pixel_values.device().clone();
        let np = self.backbone.model.num_patches();
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
        let (_, grads) = self.backbone.model.forward_backward_checkpointed(
            &batch.pixel_values,
            &batch.text.input_ids_tensor(&dev)?,
            &batch.text.attention_mask_tensor(&dev)?,
            &params,
            &self.backbone.lora_layers,
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
                next_actions_l1_loss: None,
                aux_l1_loss: None,
            },
            grads,
        ))
    }

    fn export(&self, dir: &Path, _step: u64) -> Result<()> {
        self.backbone.export(dir)
    }
}

/// OpenVLA-OFT's L1 objective (`vla-scripts/finetune.py` `run_forward_pass` with
/// `use_l1_regression`): one bidirectional pass over `[BOS, every image's patches, the proprio
/// token, prompt, K·D zeroed action positions, </s>]`, the hidden states of the shifted action
/// window through the MLPResNet head, and `mean |gt - pred|` over the normalized chunk.
///
/// Trains the backbone as [`VlaObjective`] does (LoRA or the mode's base parameters) plus the
/// action head and the proprio projector in full.
pub struct L1Objective<M: TrainModel> {
    /// The model and what of it trains.
    pub backbone: Backbone<M>,
    /// The L1 action head.
    pub head: L1HeadTrain,
    /// The proprio projector, when the model takes proprio.
    pub proprio: Option<ProprioProjectorTrain>,
    /// Per-block gradient checkpointing (`--checkpointing`).
    pub checkpointing: bool,
    /// Writes the OFT component files of a checkpoint (`Objective::export`), if set.
    pub components: Option<ComponentWriter>,
    /// The auxiliary environment-state objective (`--aux-environment-state`), if set.
    pub aux: Option<AuxObjective>,
}

/// An auxiliary training target beside the L1 action loss: the [`AuxHeadTrain`] predicts the
/// batch's normalized environment state (privileged simulator labels: object and goal
/// positions) from the action head's input, and `weight · mean |e - ê|` joins the loss. Only
/// training sees it; the exported policy is the same model without it.
#[derive(Debug, Clone)]
pub struct AuxObjective {
    /// The head.
    pub head: AuxHeadTrain,
    /// The weight of its L1 term in the loss.
    pub weight: f64,
}

/// Writes what a checkpoint directory holds besides the trained tensors, at a step: the OFT
/// component files ([`crate::export::write_oft_components`]) and, when asked, the complete
/// model directory.
pub type ComponentWriter =
    Box<dyn Fn(&Path, u64, &L1HeadTrain, Option<&ProprioProjectorTrain>) -> Result<()> + Send>;

/// Name prefix of the action head's parameters among the objective's.
pub const HEAD_PREFIX: &str = "action_head.";
/// Name prefix of the proprio projector's parameters among the objective's.
pub const PROPRIO_PREFIX: &str = "proprio_projector.";
/// Name prefix of the auxiliary environment-state head's parameters among the objective's.
pub const AUX_PREFIX: &str = "aux_head.";

/// What the L1 objective computes for one batch.
#[derive(Debug, Clone)]
pub struct L1Output {
    /// `mean |gt - pred|` (differentiable).
    pub loss: Tensor,
    /// The predicted normalized chunk `[B, K, D]` (detached).
    pub predicted: Tensor,
    /// L1 of chunk row 0.
    pub current_l1: f64,
    /// L1 of rows `1..K` (`None` for a chunk of one).
    pub next_l1: Option<f64>,
    /// The auxiliary head's L1 on the environment state, unweighted (`None` without one).
    pub aux_l1: Option<f64>,
}

impl<M: TrainModel> std::fmt::Debug for L1Objective<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("L1Objective")
            .field("backbone", &self.backbone)
            .field("proprio", &self.proprio.is_some())
            .field("aux", &self.aux)
            .finish_non_exhaustive()
    }
}

impl<M: TrainModel> L1Objective<M> {
    /// Wraps `model` with `head` (and `proprio`), training the base parameters `trainable`
    /// accepts and, if given, the LoRA `adapter`.
    pub fn new(
        model: M,
        trainable: impl Fn(&str) -> bool,
        adapter: Option<LoraAdapter>,
        head: L1HeadTrain,
        proprio: Option<ProprioProjectorTrain>,
        seed: u64,
    ) -> Result<Self> {
        Ok(Self {
            backbone: Backbone::new(model, trainable, adapter, seed)?,
            head,
            proprio,
            checkpointing: false,
            components: None,
            aux: None,
        })
    }

    /// The proprio token `[B, 1, D]` of the batch (graph back to the projector), checked
    /// against what the model takes.
    fn proprio_token(&self, batch: &OftBatch) -> Result<Option<Tensor>> {
        match (&self.proprio, &batch.proprio) {
            (Some(p), Some(x)) => Ok(Some(p.forward(x)?)),
            (None, None) => Ok(None),
            (Some(_), None) => Err(TrainError::Invalid(
                "the model takes proprio (it has a proprio projector) but the batch has none"
                    .into(),
            )),
            (None, Some(_)) => Err(TrainError::Invalid(
                "the batch has proprio but the model has no proprio projector".into(),
            )),
        }
    }

    /// The trunk's inputs for `batch`.
    fn inputs<'a>(
        batch: &'a OftBatch,
        ids: &'a Tensor,
        mask: &'a Tensor,
        token: Option<&'a Tensor>,
    ) -> TrunkInputs<'a> {
        TrunkInputs {
            pixel_values: &batch.pixel_values,
            input_ids: ids,
            attention_mask: mask,
            extra_tokens: token,
            zeroed: Some(&batch.zeroed),
            attention: Attention::Bidirectional,
        }
    }

    /// The head and the loss on the trunk's output.
    pub fn head_loss(&self, out: &TrunkOutput, batch: &OftBatch) -> Result<L1Output> {
        if batch.action_dim != self.head.action_dim() {
            return Err(TrainError::Invalid(format!(
                "the batch has {}-dimensional actions, the action head predicts {}",
                batch.action_dim,
                self.head.action_dim()
            )));
        }
        let x = batch.head_input(&out.hidden, out.prefix)?;
        let pred = self.head.forward(&x)?;
        let diff = (&batch.actions - &pred)?.abs()?;
        let mut loss = diff.mean_all()?;
        let mut aux_l1 = None;
        if let Some(aux) = &self.aux {
            let target = batch.environment_state.as_ref().ok_or_else(|| {
                TrainError::Invalid(
                    "the auxiliary head needs the batch's environment state, and the batch has \
                     none"
                        .into(),
                )
            })?;
            if target.dim(1)? != aux.head.state_dim()? {
                return Err(TrainError::Invalid(format!(
                    "the batch's environment state has {} dimensions, the auxiliary head \
                     predicts {}",
                    target.dim(1)?,
                    aux.head.state_dim()?
                )));
            }
            let l = (target - aux.head.forward(&x)?)?.abs()?.mean_all()?;
            aux_l1 = Some(l.to_scalar::<f32>()? as f64);
            loss = (loss + (l * aux.weight)?)?;
        }
        let row_l1 = |start: usize, len: usize| -> Result<f64> {
            Ok(diff.narrow(1, start, len)?.mean_all()?.to_scalar::<f32>()? as f64)
        };
        let k = batch.chunk;
        Ok(L1Output {
            current_l1: row_l1(0, 1)?,
            next_l1: if k > 1 { Some(row_l1(1, k - 1)?) } else { None },
            aux_l1,
            predicted: pred.detach(),
            loss,
        })
    }

    /// The in-training model's prediction for `batch`: the normalized chunk `[B, K, D]` (with
    /// LoRA dropout, if configured, drawn from the branches' current streams).
    pub fn predict(&self, batch: &OftBatch) -> Result<Tensor> {
        let dev = batch.pixel_values.device();
        let ids = batch.text.input_ids_tensor(dev)?;
        let mask = batch.text.attention_mask_tensor(dev)?;
        let token = self.proprio_token(batch)?;
        let out =
            self.backbone
                .model
                .trunk_forward(&Self::inputs(batch, &ids, &mask, token.as_ref()))?;
        Ok(self.head_loss(&out, batch)?.predicted)
    }

    fn step_output(out: &L1Output) -> StepOutput {
        StepOutput {
            loss: out.loss.clone(),
            action_accuracy: None,
            action_l1_loss: Some(out.current_l1),
            next_actions_l1_loss: out.next_l1,
            aux_l1_loss: out.aux_l1,
        }
    }
}

impl<M: TrainModel> Objective for L1Objective<M> {
    type Batch = OftBatch;

    fn params(&self) -> Vec<(String, Var)> {
        let mut p = self.backbone.params();
        p.extend(
            self.head
                .named_parameters()
                .into_iter()
                .map(|(n, v)| (format!("{HEAD_PREFIX}{n}"), v)),
        );
        if let Some(pp) = &self.proprio {
            p.extend(
                pp.named_parameters()
                    .into_iter()
                    .map(|(n, v)| (format!("{PROPRIO_PREFIX}{n}"), v)),
            );
        }
        if let Some(aux) = &self.aux {
            p.extend(
                aux.head
                    .named_parameters()
                    .into_iter()
                    .map(|(n, v)| (format!("{AUX_PREFIX}{n}"), v)),
            );
        }
        p
    }

    fn forward(&mut self, batch: &OftBatch, rng: &mut TrainRng) -> Result<StepOutput> {
        self.backbone.reseed(rng)?;
        let dev = batch.pixel_values.device();
        let ids = batch.text.input_ids_tensor(dev)?;
        let mask = batch.text.attention_mask_tensor(dev)?;
        let token = self.proprio_token(batch)?;
        let out =
            self.backbone
                .model
                .trunk_forward(&Self::inputs(batch, &ids, &mask, token.as_ref()))?;
        Ok(Self::step_output(&self.head_loss(&out, batch)?))
    }

    fn forward_backward(
        &mut self,
        batch: &OftBatch,
        rng: &mut TrainRng,
        accumulation: u64,
    ) -> Result<(StepOutput, Grads)> {
        if !self.checkpointing {
            return plain_forward_backward(self, batch, rng, accumulation);
        }
        self.backbone.reseed(rng)?;
        let dev = batch.pixel_values.device().clone();
        let ids = batch.text.input_ids_tensor(&dev)?;
        let mask = batch.text.attention_mask_tensor(&dev)?;
        let token = self.proprio_token(batch)?;
        let params = self.params();
        let mut result = None;
        let this = &*self;
        let mut top = |out: &TrunkOutput| -> Result<Tensor> {
            let o = this.head_loss(out, batch)?;
            let loss = if accumulation > 1 {
                (&o.loss / accumulation as f64)?
            } else {
                o.loss.clone()
            };
            result = Some(o);
            Ok(loss)
        };
        let (_, grads) = self.backbone.model.trunk_backward_checkpointed(
            &Self::inputs(batch, &ids, &mask, token.as_ref()),
            &params,
            &self.backbone.lora_layers,
            &mut top,
        )?;
        let o = result.ok_or_else(|| TrainError::Invalid("the loss was never computed".into()))?;
        let mut step = Self::step_output(&o);
        step.loss = o.loss.detach();
        Ok((step, grads))
    }

    fn export(&self, dir: &Path, step: u64) -> Result<()> {
        self.backbone.export(dir)?;
        if let Some(write) = &self.components {
            write(dir, step, &self.head, self.proprio.as_ref())?;
        }
        Ok(())
    }
}
