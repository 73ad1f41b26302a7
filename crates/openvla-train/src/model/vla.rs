//! [`OpenVlaTrain`]: vision towers -> projector -> Llama on the multimodal sequence
//! `[BOS, patches, rest of the prompt]`, implementing the training seam.

use super::backend::Train;
use super::llama::LlamaTrain;
use super::params::{ParamStore, WeightStorage};
use crate::error::{Result, TrainError};
use crate::lora::{LoraLayer, ModuleInfo};
use crate::mode::{is_trainable, TrainMode};
use crate::recompute::{backward_blocks, backward_through, forward_blocks, Grads};
use crate::seam::{Attention, TrainLogits, TrainModel, TrunkInputs, TrunkOutput};
use candle_core::{DType, Device, Tensor, Var};
use openvla::config::Variant;
use openvla::model::llama::MASKED;
use openvla::model::projector::Projector;
use openvla::model::vision::{VisionBackbone, VisionFeatures, TOWER_PREFIXES};
use openvla::ModelConfig;
use std::path::Path;
use std::sync::Arc;

/// How to load the training model.
#[derive(Debug, Clone, Copy)]
pub struct LoadTrainOptions {
    /// Which base parameters become trainable `Var`s.
    pub mode: TrainMode,
    /// How frozen weight matrices are stored.
    pub storage: WeightStorage,
}

/// The differentiable OpenVLA (both published variants: fused DINOv2 + SigLIP with the 3-layer
/// projector, and v0.1 SigLIP-only with the 2-layer projector).
#[derive(Debug)]
pub struct OpenVlaTrain {
    config: ModelConfig,
    params: ParamStore,
    backbone: VisionBackbone<Train>,
    projector: Projector<Train>,
    llm: LlamaTrain,
}

impl OpenVlaTrain {
    /// Loads the HF model directory `dir` (config.json + safetensors) for `options.mode`.
    pub fn load(dir: &Path, options: LoadTrainOptions, device: &Device) -> Result<Self> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let layers = config.text.num_hidden_layers;
        let mode = options.mode;
        Self::load_with(
            dir,
            config,
            &|n| is_trainable(mode, n, layers),
            options.storage,
            device,
        )
    }

    /// Loads with an explicit predicate choosing the trainable base parameters.
    pub fn load_with(
        dir: &Path,
        config: ModelConfig,
        trainable: &dyn Fn(&str) -> bool,
        storage: WeightStorage,
        device: &Device,
    ) -> Result<Self> {
        let params = ParamStore::load(dir, &config, trainable, storage, device)?;
        let backbone = VisionBackbone::load_with(&params, &config)?;
        let projector = Projector::load_with(
            &params,
            config.variant == Variant::OpenVla,
            config.vision_dim(),
            config.text.hidden_size,
        )?;
        let llm = LlamaTrain::load(&params, &config.text)?;
        params.check_all_used(&config)?;
        Ok(Self {
            config,
            params,
            backbone,
            projector,
            llm,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The parameter store (every checkpoint tensor and its state).
    pub fn params(&self) -> &ParamStore {
        &self.params
    }

    /// Images per sample in `pixel_values [B, images·3·towers, H, W]`, and the pixel values
    /// regrouped as one image per row: `[B·images, 3·towers, H, W]` (sample-major).
    fn per_image(&self, pixel_values: &Tensor) -> Result<(usize, Tensor)> {
        let per = self.backbone.in_channels();
        let (b, c, h, w) = pixel_values.dims4()?;
        if c == 0 || c % per != 0 {
            return Err(TrainError::Invalid(format!(
                "pixel_values have {c} channels; this model's backbone expects {per} per image \
                 (3 per vision tower)"
            )));
        }
        let n = c / per;
        Ok((n, pixel_values.contiguous()?.reshape((b * n, per, h, w))?))
    }

    /// Fused patch features `[B, images·P, vision_dim]` of `pixel_values
    /// [B, images·3·towers, H, W]`: each image through the towers, patches in image order.
    pub fn vision(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let b = pixel_values.dim(0)?;
        let (n, pixels) = self.per_image(pixel_values)?;
        let features = self.backbone.forward_with(&self.params, &pixels, None)?;
        Self::images_to_sequence(&features.fused, b, n)
    }

    /// `[B·images, P, F]` -> `[B, images·P, F]` (each sample's images in order).
    fn images_to_sequence(x: &Tensor, b: usize, n: usize) -> Result<Tensor> {
        let (_, p, f) = x.dims3()?;
        Ok(x.reshape((b, n * p, f))?)
    }

    /// The additive attention mask `[B, 1, S, S]` of the multimodal sequence
    /// `[BOS, prefix positions, rest]`: keys masked where `[mask[:, :1], ones(prefix),
    /// mask[:, 1:]]` is 0 (right padding), and, for causal attention, keys after the query.
    pub fn multimodal_mask(
        &self,
        attention_mask: &Tensor,
        prefix: usize,
        attention: Attention,
        device: &Device,
    ) -> Result<Tensor> {
        let m = attention_mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let b = m.len();
        let t = m.first().map(|r| r.len()).unwrap_or(0);
        if t == 0 {
            return Err(TrainError::Invalid(
                "attention_mask is empty (BOS is required)".into(),
            ));
        }
        let s = t + prefix;
        let causal = attention == Attention::Causal;
        let mut out = vec![0f32; b * s * s];
        for (row, mr) in m.iter().enumerate() {
            let key_ok: Vec<bool> = (0..s)
                .map(|j| {
                    if j == 0 {
                        mr[0] != 0.0
                    } else if j <= prefix {
                        true
                    } else {
                        mr[j - prefix] != 0.0
                    }
                })
                .collect();
            let base = row * s * s;
            for i in 0..s {
                for j in 0..s {
                    if (causal && j > i) || !key_ok[j] {
                        out[base + i * s + j] = MASKED;
                    }
                }
            }
        }
        Ok(Tensor::from_vec(out, (b, 1, s, s), device)?)
    }

    /// Checks the batch's shapes; returns the pixel values as float32.
    fn check_inputs(&self, inputs: &TrunkInputs<'_>) -> Result<Tensor> {
        let (b, t) = inputs.input_ids.dims2()?;
        if t == 0 {
            return Err(TrainError::Invalid(
                "input_ids are empty (BOS is required)".into(),
            ));
        }
        let bad_extra = match inputs.extra_tokens {
            Some(e) => e.rank() != 3 || e.dim(0)? != b || e.dim(2)? != self.hidden_size(),
            None => false,
        };
        let bad_zeroed = match inputs.zeroed {
            Some(z) => z.dims() != [b, t],
            None => false,
        };
        if inputs.attention_mask.dims2()? != (b, t)
            || inputs.pixel_values.dim(0)? != b
            || bad_extra
            || bad_zeroed
        {
            return Err(TrainError::Invalid(format!(
                "batch shapes disagree: input_ids {:?}, attention_mask {:?}, pixel_values {:?}, \
                 extra tokens {:?} (expected [B, n, {}]), zeroed {:?}",
                inputs.input_ids.dims(),
                inputs.attention_mask.dims(),
                inputs.pixel_values.dims(),
                inputs.extra_tokens.map(|e| e.dims().to_vec()),
                self.hidden_size(),
                inputs.zeroed.map(|z| z.dims().to_vec()),
            )));
        }
        Ok(inputs.pixel_values.to_dtype(DType::F32)?)
    }

    /// The LLM's hidden size.
    pub fn hidden_size(&self) -> usize {
        self.config.text.hidden_size
    }

    /// The LLM's input `[BOS, projected patches, extra tokens, rest of the prompt]`
    /// (`[B, prefix + T, D]`), with the `zeroed` positions' embeddings replaced by zeros;
    /// returns it and `prefix`.
    fn sequence(
        &self,
        projected: &Tensor,
        images: usize,
        inputs: &TrunkInputs<'_>,
    ) -> Result<(Tensor, usize)> {
        if projected.dim(1)? != images * self.num_patches() {
            return Err(TrainError::Invalid(format!(
                "the images give {} patches; the model expects {} per image (wrong image size?)",
                projected.dim(1)? / images.max(1),
                self.num_patches()
            )));
        }
        let mut text = self.llm.embed(inputs.input_ids)?;
        if let Some(z) = inputs.zeroed {
            let keep = (1.0 - z.to_dtype(DType::F32)?)?.unsqueeze(2)?;
            text = text.broadcast_mul(&keep)?;
        }
        let extra = inputs
            .extra_tokens
            .map(|e| e.to_dtype(DType::F32))
            .transpose()?;
        let mut prefix = vec![projected];
        prefix.extend(extra.as_ref());
        let len = prefix
            .iter()
            .map(|p| p.dim(1))
            .sum::<candle_core::Result<usize>>()?;
        Ok((openvla::model::multimodal_sequence(&text, &prefix)?, len))
    }

    /// The LLM's input sequence, its prefix length and its attention mask.
    fn llm_input(
        &self,
        projected: &Tensor,
        images: usize,
        inputs: &TrunkInputs<'_>,
    ) -> Result<(Tensor, usize, Tensor)> {
        let (seq, prefix) = self.sequence(projected, images, inputs)?;
        let mask = self.multimodal_mask(
            inputs.attention_mask,
            prefix,
            inputs.attention,
            seq.device(),
        )?;
        Ok((seq, prefix, mask))
    }

    /// The forward of the full multimodal sequence up to the final norm: hidden states
    /// `[B, P + T, D]` (OpenVLA's causal inputs).
    pub fn hidden_states(
        &self,
        pixel_values: &Tensor,
        input_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<Tensor> {
        Ok(self
            .trunk_forward(&TrunkInputs::causal(
                pixel_values,
                input_ids,
                attention_mask,
            ))?
            .hidden)
    }

    /// The logits the 256-bin objective reads, from the trunk's output.
    fn train_logits(&self, out: &TrunkOutput) -> Result<TrainLogits> {
        // Patch positions predict patches (label -100): skip their logits.
        let np = out.prefix;
        let s = out.hidden.dim(1)?;
        let h = out.hidden.narrow(1, np, s - np)?;
        Ok(TrainLogits {
            logits: self.llm.logits(&self.params, &h)?,
            offset: np,
        })
    }
}

impl TrainModel for OpenVlaTrain {
    fn num_patches(&self) -> usize {
        self.config.num_patches()
    }

    fn forward_train(
        &self,
        pixel_values: &Tensor,
        input_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<TrainLogits> {
        let out = self.trunk_forward(&TrunkInputs::causal(
            pixel_values,
            input_ids,
            attention_mask,
        ))?;
        self.train_logits(&out)
    }

    fn trunk_forward(&self, inputs: &TrunkInputs<'_>) -> Result<TrunkOutput> {
        let pixel_values = self.check_inputs(inputs)?;
        let vision = self.vision(&pixel_values)?;
        let images = pixel_values.dim(1)? / self.backbone.in_channels();
        let projected = self.projector.forward_with(&self.params, &vision)?;
        let (seq, prefix, mask) = self.llm_input(&projected, images, inputs)?;
        Ok(TrunkOutput {
            hidden: self.llm.forward(&self.params, &seq, &mask)?,
            prefix,
        })
    }

    fn named_parameters(&self) -> Vec<(String, Var)> {
        self.params.named_parameters()
    }

    fn forward_backward_checkpointed(
        &self,
        pixel_values: &Tensor,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        params: &[(String, Var)],
        lora: &[Arc<LoraLayer>],
        loss_of: &mut dyn FnMut(&TrainLogits) -> Result<Tensor>,
    ) -> Result<(Tensor, Grads)> {
        let inputs = TrunkInputs::causal(pixel_values, input_ids, attention_mask);
        let mut top = |out: &TrunkOutput| -> Result<Tensor> { loss_of(&self.train_logits(out)?) };
        self.trunk_backward_checkpointed(&inputs, params, lora, &mut top)
    }

    fn trunk_backward_checkpointed(
        &self,
        inputs: &TrunkInputs<'_>,
        params: &[(String, Var)],
        lora: &[Arc<LoraLayer>],
        top: &mut dyn FnMut(&TrunkOutput) -> Result<Tensor>,
    ) -> Result<(Tensor, Grads)> {
        // Every vision block and decoder layer keeps only its input and is recomputed in a
        // backward driven block by block (crate::recompute); gradients equal forward_train +
        // backward's up to summation order.
        let p = &self.params;
        let vars: Vec<Var> = params.iter().map(|(_, v)| v.clone()).collect();
        let pixel_values = self.check_inputs(inputs)?;
        let b = pixel_values.dim(0)?;
        let (images, pixels) = self.per_image(&pixel_values)?;
        // Vision (every image of every sample as one batch row): the stems keep their (small)
        // graphs; the blocks are checkpointed.
        let mut towers = Vec::with_capacity(self.backbone.towers().len());
        for (i, t) in self.backbone.towers().iter().enumerate() {
            let stem = t.stem(p, &pixels.narrow(1, 3 * i, 3)?)?;
            let block = |j: usize, h: &Tensor| Ok(t.block(p, j, h, None)?);
            let (out, tape) = forward_blocks(&stem, t.num_blocks(), lora, &block)?;
            let leaf = Var::from_tensor(&out)?;
            let trains = params.iter().any(|(n, _)| n.contains(TOWER_PREFIXES[i]));
            towers.push((stem, tape, leaf, trains));
        }
        let feats = towers
            .iter()
            .zip(self.backbone.towers())
            .map(|((_, _, leaf, _), t)| t.patch_features(leaf.as_tensor()))
            .collect::<openvla::Result<Vec<_>>>()?;
        let feats = VisionFeatures::fuse(feats)?.fused;
        let feats = Self::images_to_sequence(&feats, b, images)?;
        let projected = self.projector.forward_with(p, &feats)?;
        let (seq, prefix, mask) = self.llm_input(&projected, images, inputs)?;
        let rope = self.llm.rope(&seq)?;
        let layer = |i: usize, h: &Tensor| self.llm.decoder_layer(p, i, h, &mask, &rope);
        let (out, llm_tape) = forward_blocks(&seq, self.llm.num_layers(), lora, &layer)?;
        // The top: final norm and the objective's head and loss, with a plain backward.
        let top_var = Var::from_tensor(&out)?;
        let hidden = self.llm.final_norm(top_var.as_tensor())?;
        let loss = top(&TrunkOutput { hidden, prefix })?;
        let mut grads = Grads::new();
        let store = loss.backward()?;
        grads.absorb(&store, &vars)?;
        let g_top = match store.get(top_var.as_tensor()) {
            Some(g) => g.detach(),
            None => top_var.as_tensor().zeros_like()?,
        };
        drop(store);
        // The decoder, layer by layer, then the projector, embeddings and extra tokens in one
        // pass.
        let g_seq = backward_blocks(&llm_tape, &g_top, lora, &layer, &vars, &mut grads)?;
        drop(llm_tape);
        let store = backward_through(&seq, &g_seq)?;
        grads.absorb(&store, &vars)?;
        // Each tower whose parameters train, block by block, then its stem.
        for ((stem, tape, leaf, trains), t) in towers.iter().zip(self.backbone.towers()) {
            if !trains {
                continue;
            }
            let Some(g) = store.get(leaf.as_tensor()) else {
                continue;
            };
            let block = |j: usize, h: &Tensor| Ok(t.block(p, j, h, None)?);
            let g_stem = backward_blocks(tape, g, lora, &block, &vars, &mut grads)?;
            grads.absorb(&backward_through(stem, &g_stem)?, &vars)?;
        }
        Ok((loss.detach(), grads))
    }

    fn modules(&self) -> Vec<ModuleInfo> {
        self.params.modules()
    }

    fn attach_lora(&mut self, name: &str, layer: Arc<LoraLayer>) -> Result<()> {
        self.params.attach_lora(name, layer)
    }
}
