//! The OpenVLA network: vision backbone -> projector -> Llama, and greedy action decoding.

pub mod linear;
pub mod llama;
pub mod projector;
pub mod vision;
pub mod vit;

use crate::checkpoint::WeightLoader;
use crate::config::{ModelConfig, Variant};
use crate::error::{Error, Result};
use candle_core::Tensor;
use linear::WeightPolicy;
use llama::{argmax, KvCache, Llama};
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

/// State after the prefill of one sample.
struct Prefilled {
    vision: VisionFeatures,
    projected: Tensor,
    inputs_embeds: Tensor,
    logits: Vec<f32>,
    cache: KvCache,
    vision_time: Duration,
    projector_time: Duration,
    prefill_time: Duration,
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

impl OpenVla {
    /// The LLM input sequence `[1, 1 + P + n - 1, D]`: `[BOS, image patches, rest of prompt]`.
    pub fn splice(&self, projected: &Tensor, input_ids: &[u32]) -> Result<Tensor> {
        if input_ids.is_empty() {
            return Err(Error::InvalidInput(
                "input_ids are empty (BOS is required)".into(),
            ));
        }
        let text = self.llm.embed(input_ids)?;
        let bos = text.narrow(1, 0, 1)?;
        let rest = text.narrow(1, 1, input_ids.len() - 1)?;
        Ok(Tensor::cat(&[&bos, projected, &rest], 1)?)
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

    /// Vision, projector and prefill of one sample: the prefill logits and the sample's cache.
    fn prefill(&self, pixel_values: &Tensor, input_ids: &[u32]) -> Result<Prefilled> {
        let t0 = Instant::now();
        let vision = self.vision.forward(pixel_values)?;
        let vision_time = t0.elapsed();
        let t0 = Instant::now();
        let projected = self.projector.forward(&vision.fused)?;
        let projector_time = t0.elapsed();
        let t0 = Instant::now();
        let inputs_embeds = self.splice(&projected, input_ids)?;
        let mut cache = KvCache::new(1);
        let hidden = self.llm.forward(&inputs_embeds, &mut cache)?;
        let logits = self
            .llm
            .last_logits(&hidden)?
            .squeeze(0)?
            .to_vec1::<f32>()?;
        let prefill_time = t0.elapsed();
        Ok(Prefilled {
            vision,
            projected,
            inputs_embeds,
            logits,
            cache,
            vision_time,
            projector_time,
            prefill_time,
        })
    }

    /// Greedy generation for several samples: each is prefilled on its own (prompts differ in
    /// length; prefill is compute-bound), then all decode together, one batched forward per
    /// step. Every sample gets exactly the tokens it gets alone.
    pub fn generate_batch(&self, requests: &[GenerationRequest]) -> Result<Vec<GenerationTrace>> {
        // On a pool thread, the many small parallel kernels of the decode steps hand work to
        // the other threads without waking the caller each time (15-20 % of a MiniVLA int8
        // decode step).
        crate::kernels::in_pool(|| self.generate_batch_here(requests))
    }

    fn generate_batch_here(&self, requests: &[GenerationRequest]) -> Result<Vec<GenerationTrace>> {
        let mut pre = Vec::with_capacity(requests.len());
        for r in requests {
            pre.push(self.prefill(r.pixel_values, r.input_ids)?);
        }
        let mut logits = Vec::with_capacity(pre.len());
        let mut caches = Vec::with_capacity(pre.len());
        for p in pre.iter_mut() {
            logits.push(std::mem::take(&mut p.logits));
            caches.push(std::mem::take(&mut p.cache));
        }
        let limits: Vec<usize> = requests.iter().map(|r| r.max_new_tokens).collect();
        let outs = self.decode_batch(logits, KvCache::concat(caches), &limits)?;
        Ok(pre
            .into_iter()
            .zip(outs)
            .map(|(p, o)| GenerationTrace {
                vision: p.vision,
                projected: p.projected,
                inputs_embeds: p.inputs_embeds,
                step_logits: o.step_logits,
                generated: o.generated,
                vision_time: p.vision_time,
                projector_time: p.projector_time,
                prefill_time: p.prefill_time,
                decode_times: o.times,
            })
            .collect())
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
        struct Embedded {
            vision: Vec<VisionFeatures>,
            language_mean: Option<Tensor>,
            projected: Tensor,
            inputs_embeds: Tensor,
            window_start: usize,
            vision_time: Duration,
            projector_time: Duration,
        }
        let mut embedded = Vec::with_capacity(inputs.len());
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
            let stop = self.llm.embed(&[STOP_TOKEN])?;
            // FiLM is conditioned on the mean raw embedding of every non-placeholder token:
            // BOS, the prompt, 29871 and `</s>` (modeling_prismatic.py:994-1003,
            // film_vit_wrapper.py:241-242).
            let language_mean = if self.vision.is_film() {
                Some(crate::oft::film::language_mean(&Tensor::cat(
                    &[&text, &stop],
                    1,
                )?)?)
            } else {
                None
            };
            let t0 = Instant::now();
            let vision = input
                .pixel_values
                .iter()
                .map(|p| self.vision.forward_film(p, language_mean.as_ref()))
                .collect::<Result<Vec<_>>>()?;
            let vision_time = t0.elapsed();
            let t0 = Instant::now();
            let fused: Vec<&Tensor> = vision.iter().map(|v| &v.fused).collect();
            let projected = self.projector.forward(&Tensor::cat(&fused, 1)?)?;
            let projector_time = t0.elapsed();
            let hidden_size = text.dim(2)?;
            let bos = text.narrow(1, 0, 1)?;
            let rest = text.narrow(1, 1, ids.len() - 1)?;
            let zeros = Tensor::zeros(
                (1, input.placeholders, hidden_size),
                candle_core::DType::F32,
                text.device(),
            )?;
            let mut parts: Vec<&Tensor> = vec![&bos, &projected];
            if let Some(p) = input.proprio_token {
                parts.push(p);
            }
            parts.extend([&rest, &zeros, &stop]);
            let inputs_embeds = Tensor::cat(&parts, 1)?;
            let num_patches = projected.dim(1)? + usize::from(input.proprio_token.is_some());
            // The head reads the window shifted by one: the hidden state at 29871 (the last
            // prompt token) and the first placeholders (oft-spec §2.5).
            let window_start = num_patches + ids.len() - 1;
            embedded.push(Embedded {
                vision,
                language_mean,
                projected,
                inputs_embeds,
                window_start,
                vision_time,
                projector_time,
            });
        }
        let t0 = Instant::now();
        let lens = embedded
            .iter()
            .map(|e| e.inputs_embeds.dim(1))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let packed: Vec<&Tensor> = embedded.iter().map(|e| &e.inputs_embeds).collect();
        let hidden = self
            .llm
            .forward_packed_bidirectional(&Tensor::cat(&packed, 1)?, &lens)?;
        let llm_time = t0.elapsed();
        let mut out = Vec::with_capacity(inputs.len());
        let mut start = 0;
        for ((e, input), len) in embedded.into_iter().zip(inputs).zip(lens) {
            let hidden = hidden.narrow(1, start, len)?;
            start += len;
            let window = hidden.narrow(1, e.window_start, input.placeholders)?;
            out.push(ParallelTrace {
                vision: e.vision,
                language_mean: e.language_mean,
                projected: e.projected,
                inputs_embeds: e.inputs_embeds,
                hidden,
                window,
                window_start: e.window_start,
                vision_time: e.vision_time,
                projector_time: e.projector_time,
                llm_time,
            });
        }
        Ok(out)
    }

    /// Loads every component named by `cfg` from `w`.
    pub fn load(w: &WeightLoader, cfg: &ModelConfig, wp: &WeightPolicy) -> Result<Self> {
        Self::load_with_film(w, cfg, wp, None)
    }

    /// Like [`OpenVla::load`]; with an OpenVLA-OFT FiLM checkpoint the towers (and their FiLM
    /// layers) come from its `vision_backbone` file, as in the reference, and the shards'
    /// vision tensors are skipped.
    pub fn load_with_film(
        w: &WeightLoader,
        cfg: &ModelConfig,
        wp: &WeightPolicy,
        film: Option<&crate::oft::film::FilmCheckpoint>,
    ) -> Result<Self> {
        let vision = match film {
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
