//! The OpenVLA network: vision backbone -> projector -> Llama, and greedy action decoding.

pub mod backend;
pub mod checkpoint;
pub mod decoder;
pub mod linear;
pub mod llama;
pub mod projector;
pub mod vision;
pub mod vit;

use crate::config::{ModelConfig, Variant};
use crate::error::{Error, Result};
use crate::model::checkpoint::WeightLoader;
use candle_core::Tensor;
use linear::WeightPolicy;
use llama::{argmax, packs, KvCache, Llama, MAX_PACKED_POSITIONS};
use projector::Projector;
use std::time::{Duration, Instant};
use vision::{VisionBackbone, VisionFeatures};

/// Token id of `▁`, appended to the prompt before generation (spec §5.1).
pub const SPACE_TOKEN: u32 = 29871;

/// Token id of `</s>`, which closes OFT's placeholder block (oft-spec §2.4).
pub const STOP_TOKEN: u32 = 2;

/// The inputs of one OFT parallel decoding pass.
#[derive(Debug, Clone, Copy)]
pub struct ParallelInput<'a> {
    /// `pixel_values [1, C, H, W]` of each image, primary first.
    pub pixel_values: &'a [Tensor],
    /// The proprio token `[1, 1, D]`, if the model takes proprio.
    pub proprio_token: Option<&'a Tensor>,
    /// Prompt ids, BOS first, ending with 29871.
    pub input_ids: &'a [u32],
    /// Number of zeroed placeholder positions (K·D).
    pub placeholders: usize,
}

/// Intermediate results of [`OpenVla::parallel_forward`].
#[derive(Debug, Clone)]
pub struct ParallelTrace {
    /// Vision features of each image.
    pub vision: Vec<VisionFeatures>,
    /// FiLM models: the average raw embedding `[1, D]` of BOS, the prompt, 29871 and `</s>`
    /// that the towers were conditioned on.
    pub language_mean: Option<Tensor>,
    /// Projector output of all images' patches `[1, 256·N, D]`.
    pub projected: Tensor,
    /// The LLM input `[1, S, D]`.
    pub inputs_embeds: Tensor,
    /// The last hidden states after the final RMSNorm `[1, S, D]`.
    pub hidden: Tensor,
    /// The head's window `[1, K·D, D]`.
    pub window: Tensor,
    /// Position of the window's first row (the 29871 token).
    pub window_start: usize,
    /// Wall time of the vision towers.
    pub vision_time: Duration,
    /// Wall time of the projector.
    pub projector_time: Duration,
    /// Wall time of the LLM pass (the whole pack's, when batched).
    pub llm_time: Duration,
}

/// The full model.
#[derive(Debug, Clone)]
pub struct OpenVla {
    /// DINOv2/SigLIP towers.
    pub vision: VisionBackbone,
    /// Vision-to-LLM projector.
    pub projector: Projector,
    /// The language model.
    pub llm: Llama,
}

/// One sample to generate for.
#[derive(Debug, Clone, Copy)]
pub struct GenerationRequest<'a> {
    /// `[1, C, H, W]`.
    pub pixel_values: &'a Tensor,
    /// Prompt ids (BOS first, 29871 appended).
    pub input_ids: &'a [u32],
    /// Action dimension of the request's dataset.
    pub max_new_tokens: usize,
}

/// Runs `pass(packed, lens)` on the sequences `embeds` (each `[1, len, D]`) laid end to end
/// along the positions, one pack of at most [`MAX_PACKED_POSITIONS`] at a time ([`packs`]), in
/// order.
fn for_each_pack(
    embeds: &[Tensor],
    mut pass: impl FnMut(Tensor, &[usize]) -> Result<()>,
) -> Result<()> {
    let lens = embeds
        .iter()
        .map(|e| e.dim(1))
        .collect::<candle_core::Result<Vec<_>>>()?;
    for pack in packs(&lens, MAX_PACKED_POSITIONS) {
        let parts: Vec<&Tensor> = embeds[pack.clone()].iter().collect();
        pass(Tensor::cat(&parts, 1)?, &lens[pack])?;
    }
    Ok(())
}

/// Result of [`OpenVla::decode_greedy`].
#[derive(Debug, Clone)]
pub struct GreedyOutput {
    /// Logits of the last position at each step, `[steps][vocab]`.
    pub step_logits: Vec<Vec<f32>>,
    /// Generated ids.
    pub generated: Vec<u32>,
    /// Wall time of each forward, prefill first.
    pub times: Vec<Duration>,
}

/// Intermediate results of one generation, for golden tests and timing.
#[derive(Debug, Clone)]
pub struct GenerationTrace {
    /// Vision features (per tower and fused), `[1, P, ·]`.
    pub vision: VisionFeatures,
    /// Projector output `[1, P, D]`.
    pub projected: Tensor,
    /// Prefill input embeddings `[1, 1 + P + n, D]`.
    pub inputs_embeds: Tensor,
    /// Logits of the last position at each decode step, `[steps, vocab]`.
    pub step_logits: Vec<Vec<f32>>,
    /// Generated token ids (stops early at EOS, like the reference).
    pub generated: Vec<u32>,
    /// Wall time of the vision towers.
    pub vision_time: Duration,
    /// Wall time of the projector.
    pub projector_time: Duration,
    /// Wall time of the prefill forward (through the first token's logits).
    pub prefill_time: Duration,
    /// Wall time of each later decode step.
    pub decode_times: Vec<Duration>,
}

/// The multimodal sequence the LLM reads, for inference and training alike (spec §4.2,
/// oft-spec §2.4): BOS, then the `prefix` positions in order (each image's projected patches,
/// then OFT's proprio token), then the rest of the text `text [B, T, D]` (the prompt, and for
/// OFT 29871, the placeholders and `</s>`).
pub fn multimodal_sequence(text: &Tensor, prefix: &[&Tensor]) -> Result<Tensor> {
    let t = text.dim(1)?;
    if t == 0 {
        return Err(Error::InvalidInput(
            "the text is empty (BOS is required)".into(),
        ));
    }
    let bos = text.narrow(1, 0, 1)?;
    let rest = text.narrow(1, 1, t - 1)?;
    let mut parts = Vec::with_capacity(prefix.len() + 2);
    parts.push(&bos);
    parts.extend_from_slice(prefix);
    parts.push(&rest);
    Ok(Tensor::cat(&parts, 1)?)
}

impl OpenVla {
    /// The LLM input sequence `[1, 1 + P + n - 1, D]`: `[BOS, image patches, rest of prompt]`.
    pub fn splice(&self, projected: &Tensor, input_ids: &[u32]) -> Result<Tensor> {
        if input_ids.is_empty() {
            return Err(Error::InvalidInput(
                "input_ids are empty (BOS is required)".into(),
            ));
        }
        multimodal_sequence(&self.llm.embed(input_ids)?, &[projected])
    }

    /// Greedy KV-cached decoding from prefill embeddings `[1, T, D]`.
    ///
    /// Returns the logits of the last position at each step, the generated ids (stopping after
    /// EOS as HF `generate` does) and the wall time of each forward (prefill first).
    pub fn decode_greedy(
        &self,
        inputs_embeds: &Tensor,
        max_new_tokens: usize,
    ) -> Result<GreedyOutput> {
        let t0 = Instant::now();
        let mut cache = KvCache::new(1);
        let hidden = self.llm.forward(inputs_embeds, &mut cache)?;
        let logits = self
            .llm
            .last_logits(&hidden)?
            .squeeze(0)?
            .to_vec1::<f32>()?;
        let prefill = t0.elapsed();
        let mut out = self.decode_batch(vec![logits], cache, &[max_new_tokens])?;
        let mut o = out.remove(0);
        o.times.insert(0, prefill);
        Ok(o)
    }

    /// Greedy decoding of several prefilled sequences at once.
    ///
    /// `first_logits[r]` are the prefill logits of row `r` of `cache`. Every step embeds the
    /// chosen token of each unfinished row and runs them as one batch; rows stop after EOS or
    /// `max_new_tokens[r]` tokens. Each row is computed with row-independent kernels and its own
    /// cache, so its tokens and logits are exactly those it gets alone.
    pub fn decode_batch(
        &self,
        first_logits: Vec<Vec<f32>>,
        mut cache: KvCache,
        max_new_tokens: &[usize],
    ) -> Result<Vec<GreedyOutput>> {
        let n = first_logits.len();
        if cache.rows() != n || max_new_tokens.len() != n {
            return Err(Error::InvalidInput(format!(
                "decode_batch: {n} logits rows, {} cache rows, {} limits",
                cache.rows(),
                max_new_tokens.len()
            )));
        }
        let eos = self.llm.config().eos_token_id;
        let mut outs: Vec<GreedyOutput> = (0..n)
            .map(|_| GreedyOutput {
                step_logits: Vec::new(),
                generated: Vec::new(),
                times: Vec::new(),
            })
            .collect();
        let mut logits = first_logits;
        // `active[i]` is the request index of cache row i.
        let mut active: Vec<usize> = (0..n).collect();
        loop {
            let mut keep = Vec::new();
            let mut next = Vec::new();
            for (row, &r) in active.iter().enumerate() {
                if max_new_tokens[r] == 0 {
                    continue;
                }
                let token = argmax(&logits[row]) as u32;
                let o = &mut outs[r];
                o.step_logits.push(std::mem::take(&mut logits[row]));
                o.generated.push(token);
                if token != eos && o.generated.len() < max_new_tokens[r] {
                    keep.push(row);
                    next.push(token);
                }
            }
            if keep.is_empty() {
                break;
            }
            if keep.len() != active.len() {
                cache.select(&keep);
                active = keep.iter().map(|&row| active[row]).collect();
            }
            let t0 = Instant::now();
            let x = self.llm.embed(&next)?.squeeze(0)?.unsqueeze(1)?;
            let hidden = self.llm.forward(&x, &mut cache)?;
            let l = self.llm.last_logits(&hidden)?;
            logits = (0..active.len())
                .map(|i| l.get(i)?.to_vec1::<f32>())
                .collect::<candle_core::Result<Vec<_>>>()?;
            let dt = t0.elapsed();
            for &r in &active {
                outs[r].times.push(dt);
            }
        }
        Ok(outs)
    }

    /// Greedy generation for several samples: the towers and the projector run on the stacked
    /// images, the prefills run packed into one LLM pass (each sequence causal on its own, no
    /// padding), then all decode together, one batched forward per step. Every kernel computes
    /// a row on its own, so every sample gets exactly the tokens and logits it gets alone. The
    /// stage times of a batched sample are those of the whole batch's pass.
    pub fn generate_batch(&self, requests: &[GenerationRequest]) -> Result<Vec<GenerationTrace>> {
        // On a pool thread, the many small parallel kernels of the decode steps hand work to
        // the other threads without waking the caller each time (15-20 % of a MiniVLA int8
        // decode step).
        crate::kernels::in_pool(|| self.generate_batch_here(requests))
    }

    fn generate_batch_here(&self, requests: &[GenerationRequest]) -> Result<Vec<GenerationTrace>> {
        // The towers of every request as stacked batches.
        let t0 = Instant::now();
        let pixels: Vec<&Tensor> = requests.iter().map(|r| r.pixel_values).collect();
        let vision = self.vision.forward_stacked(&pixels, None)?;
        let vision_time = t0.elapsed();
        let t0 = Instant::now();
        let projected = self.project_stacked(vision.iter().map(|v| v.fused.clone()).collect())?;
        let projector_time = t0.elapsed();
        // The prefills packed into one LLM pass (causal within each request).
        let t0 = Instant::now();
        let embeds = requests
            .iter()
            .zip(&projected)
            .map(|(r, p)| self.splice(p, r.input_ids))
            .collect::<Result<Vec<_>>>()?;
        let mut logits = Vec::with_capacity(requests.len());
        let mut caches = Vec::new();
        for_each_pack(&embeds, |packed, lens| {
            let (hidden, cache) = self.llm.prefill_packed(&packed, lens)?;
            let mut end = 0;
            let mut last = Vec::with_capacity(lens.len());
            for &len in lens {
                end += len;
                last.push(hidden.narrow(1, end - 1, 1)?);
            }
            let l = self.llm.last_logits(&Tensor::cat(&last, 0)?)?;
            for i in 0..last.len() {
                logits.push(l.get(i)?.to_vec1::<f32>()?);
            }
            caches.push(cache);
            Ok(())
        })?;
        let prefill_time = t0.elapsed();
        let limits: Vec<usize> = requests.iter().map(|r| r.max_new_tokens).collect();
        let outs = self.decode_batch(logits, KvCache::concat(caches), &limits)?;
        Ok(vision
            .into_iter()
            .zip(projected)
            .zip(embeds)
            .zip(outs)
            .map(
                |(((vision, projected), inputs_embeds), o)| GenerationTrace {
                    vision,
                    projected,
                    inputs_embeds,
                    step_logits: o.step_logits,
                    generated: o.generated,
                    vision_time,
                    projector_time,
                    prefill_time,
                    decode_times: o.times,
                },
            )
            .collect())
    }

    /// The projector over several samples' features `[1, P, D_v]`, stacked into one pass
    /// (row-independent kernels: each sample gets the bits it gets alone).
    fn project_stacked(&self, features: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let rows = match features.first() {
            Some(f) => f.dim(1)?,
            None => return Ok(Vec::new()),
        };
        let stack = if crate::kernels::stacks_bit_exactly(rows) {
            vision::MAX_STACKED_IMAGES
        } else {
            1
        };
        let mut out = Vec::with_capacity(features.len());
        for group in features.chunks(stack) {
            if group.len() == 1 {
                out.push(self.projector.forward(&group[0])?);
                continue;
            }
            let all = self.projector.forward(&Tensor::cat(group, 0)?)?;
            for i in 0..group.len() {
                out.push(all.narrow(0, i, 1)?);
            }
        }
        Ok(out)
    }

    /// OpenVLA-OFT's parallel decoding pass (oft-spec §2.2-2.5): the patches of every image
    /// (in order), the optional proprio token, then the prompt after BOS (ending with 29871),
    /// `placeholders` zero vectors and the `</s>` embedding, run through the Llama once with
    /// bidirectional attention and no cache.
    pub fn parallel_forward(&self, input: &ParallelInput) -> Result<ParallelTrace> {
        let mut out = self.parallel_forward_batch(std::slice::from_ref(input))?;
        out.pop()
            .ok_or_else(|| Error::InvalidInput("the batch lost its only sample".into()))
    }

    /// [`OpenVla::parallel_forward`] for several samples at once: the towers and projector run
    /// per sample, then every sample's sequence is packed into one LLM pass (the projections
    /// run on all positions together; attention stays within each sequence). A sample gets
    /// the same result alone (a pack of one) and in any batch.
    pub fn parallel_forward_batch(&self, inputs: &[ParallelInput]) -> Result<Vec<ParallelTrace>> {
        crate::kernels::in_pool(|| self.parallel_forward_here(inputs))
    }

    fn parallel_forward_here(&self, inputs: &[ParallelInput]) -> Result<Vec<ParallelTrace>> {
        // Text embeddings and, for FiLM, the language each sample's towers are conditioned on.
        let mut texts = Vec::with_capacity(inputs.len());
        let mut language = Vec::with_capacity(inputs.len());
        let stop = self.llm.embed(&[STOP_TOKEN])?;
        for input in inputs {
            let ids = input.input_ids;
            if ids.len() < 2 {
                return Err(Error::InvalidInput(
                    "input_ids need BOS and at least one prompt token".into(),
                ));
            }
            if input.pixel_values.is_empty() {
                return Err(Error::InvalidInput("no images".into()));
            }
            let text = self.llm.embed(ids)?;
            // FiLM is conditioned on the mean raw embedding of every non-placeholder token:
            // BOS, the prompt, 29871 and `</s>` (modeling_prismatic.py:994-1003,
            // film_vit_wrapper.py:241-242).
            language.push(if self.vision.is_film() {
                Some(backend::language_mean(&Tensor::cat(&[&text, &stop], 1)?)?)
            } else {
                None
            });
            texts.push(text);
        }
        // The towers: every image of every sample stacked (a FiLM backbone: each sample's
        // images together, as they share their language).
        let t0 = Instant::now();
        let mut vision: Vec<Vec<VisionFeatures>> = Vec::with_capacity(inputs.len());
        if self.vision.is_film() {
            for (input, lang) in inputs.iter().zip(&language) {
                let images: Vec<&Tensor> = input.pixel_values.iter().collect();
                vision.push(self.vision.forward_stacked(&images, lang.as_ref())?);
            }
        } else {
            let images: Vec<&Tensor> = inputs.iter().flat_map(|i| i.pixel_values).collect();
            let mut all = self.vision.forward_stacked(&images, None)?.into_iter();
            for input in inputs {
                vision.push(all.by_ref().take(input.pixel_values.len()).collect());
            }
        }
        let vision_time = t0.elapsed();
        // The projector over every sample's patches (all its images, in order).
        let t0 = Instant::now();
        let fused = vision
            .iter()
            .map(|v| {
                let parts: Vec<&Tensor> = v.iter().map(|f| &f.fused).collect();
                Ok(Tensor::cat(&parts, 1)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let projected = self.project_stacked(fused)?;
        let projector_time = t0.elapsed();
        let mut embeds = Vec::with_capacity(inputs.len());
        let mut window_starts = Vec::with_capacity(inputs.len());
        for ((input, text), projected) in inputs.iter().zip(&texts).zip(&projected) {
            let ids = input.input_ids;
            let hidden_size = text.dim(2)?;
            // The placeholders' embeddings are zeroed (oft-spec §2.4).
            let zeros = Tensor::zeros(
                (1, input.placeholders, hidden_size),
                candle_core::DType::F32,
                text.device(),
            )?;
            let text = Tensor::cat(&[text, &zeros, &stop], 1)?;
            let mut prefix: Vec<&Tensor> = vec![projected];
            prefix.extend(input.proprio_token);
            embeds.push(multimodal_sequence(&text, &prefix)?);
            let num_patches = projected.dim(1)? + usize::from(input.proprio_token.is_some());
            // The head reads the window shifted by one: the hidden state at 29871 (the last
            // prompt token) and the first placeholders (oft-spec §2.5).
            window_starts.push(num_patches + ids.len() - 1);
        }
        // One bidirectional LLM pass over the packed sequences.
        let t0 = Instant::now();
        let mut hidden = Vec::with_capacity(inputs.len());
        for_each_pack(&embeds, |packed, lens| {
            let h = self.llm.forward_packed_bidirectional(&packed, lens)?;
            let mut start = 0;
            for &len in lens {
                hidden.push(h.narrow(1, start, len)?);
                start += len;
            }
            Ok(())
        })?;
        let llm_time = t0.elapsed();
        let mut out = Vec::with_capacity(inputs.len());
        let rows = vision
            .into_iter()
            .zip(language)
            .zip(projected)
            .zip(embeds)
            .zip(hidden)
            .zip(window_starts)
            .zip(inputs);
        for (
            (((((vision, language_mean), projected), inputs_embeds), hidden), window_start),
            input,
        ) in rows
        {
            let window = hidden.narrow(1, window_start, input.placeholders)?;
            out.push(ParallelTrace {
                vision,
                language_mean,
                projected,
                inputs_embeds,
                hidden,
                window,
                window_start,
                vision_time,
                projector_time,
                llm_time,
            });
        }
        Ok(out)
    }

    /// Loads every component named by `cfg` from `w`.
    pub fn load(w: &WeightLoader, cfg: &ModelConfig, wp: &WeightPolicy) -> Result<Self> {
        Self::load_with_film(w, cfg, wp, None)
    }

    /// Like [`OpenVla::load`]; with `towers` (an OpenVLA-OFT FiLM checkpoint,
    /// `oft::film::FilmCheckpoint`) the towers and their FiLM layers come from it, as in the
    /// reference, and the shards' vision tensors are skipped.
    pub fn load_with_film(
        w: &WeightLoader,
        cfg: &ModelConfig,
        wp: &WeightPolicy,
        towers: Option<&dyn vit::TowerSource>,
    ) -> Result<Self> {
        let vision = match towers {
            Some(f) => {
                w.skip_prefix("vision_backbone.");
                VisionBackbone::load_from(f, cfg, wp)?
            }
            None => VisionBackbone::load(w, cfg, wp)?,
        };
        let projector = Projector::load(
            w,
            cfg.variant == Variant::OpenVla,
            cfg.vision_dim(),
            cfg.text.hidden_size,
            wp,
        )?;
        let llm = Llama::load(w, &cfg.text, wp)?;
        Ok(OpenVla {
            vision,
            projector,
            llm,
        })
    }

    /// Greedy generation of up to `max_new_tokens` tokens for one sample.
    ///
    /// `input_ids` are the prompt ids with BOS first and the trailing 29871 already appended;
    /// `pixel_values` is `[1, C, H, W]`. The image patches are spliced right after BOS and the
    /// whole sequence is causal (spec §4.2–4.4). Generation stops after EOS, as HF `generate`
    /// does.
    pub fn generate(
        &self,
        pixel_values: &Tensor,
        input_ids: &[u32],
        max_new_tokens: usize,
    ) -> Result<GenerationTrace> {
        let mut out = self.generate_batch(&[GenerationRequest {
            pixel_values,
            input_ids,
            max_new_tokens,
        }])?;
        Ok(out.remove(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn multimodal_sequence_puts_the_prefix_after_bos() {
        let dev = Device::Cpu;
        // text: BOS=0, then 1, 2; prefix: patches 10, 11, then a proprio token 20 (width 1).
        let text = Tensor::from_slice(&[0f32, 1., 2.], (1, 3, 1), &dev).unwrap();
        let patches = Tensor::from_slice(&[10f32, 11.], (1, 2, 1), &dev).unwrap();
        let proprio = Tensor::from_slice(&[20f32], (1, 1, 1), &dev).unwrap();
        let s = multimodal_sequence(&text, &[&patches, &proprio]).unwrap();
        let v: Vec<f32> = s.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v, [0., 10., 11., 20., 1., 2.]);
        let empty = Tensor::zeros((1, 0, 1), candle_core::DType::F32, &dev).unwrap();
        let e = multimodal_sequence(&empty, &[&patches])
            .unwrap_err()
            .to_string();
        assert!(e.contains("BOS is required"), "{e}");
    }
}
