//! The Llama language model for training (transformers 4.40.1 `LlamaForCausalLM`): the decoder
//! layers are `openvla::model::decoder::DecoderLayer<Train>`, the one definition inference runs
//! too; here are the parts only training has: one pass over a batch with an additive attention
//! mask (no KV cache), half-rotation RoPE with full float32 tables, the embeddings and `lm_head`
//! as `Var`s.

use super::attention::attention;
use super::backend::{to_model, Train};
use super::ops::{as_f32, rms_norm, rope, Linear};
use super::params::ParamStore;
use crate::error::{Result, TrainError};
use candle_core::{DType, Device, Tensor};
use openvla::config::TextConfig;
use openvla::model::decoder::{repeat_kv, rope_angles, rope_inv_freq, DecoderLayer};

/// The decoder stack, final norm and `lm_head`.
#[derive(Debug, Clone)]
pub struct LlamaTrain {
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer<Train>>,
    norm: Tensor,
    lm_head: Linear,
    inv_freq: Vec<f32>,
    cfg: TextConfig,
}

impl LlamaTrain {
    /// Reads `language_model.*`.
    pub fn load(p: &ParamStore, c: &TextConfig) -> Result<Self> {
        let (v, d) = (c.vocab_size, c.hidden_size);
        let layers = (0..c.num_hidden_layers)
            .map(|l| DecoderLayer::load_with(p, &format!("language_model.model.layers.{l}"), c))
            .collect::<openvla::Result<Vec<_>>>()?;
        let embed_tokens = p.get("language_model.model.embed_tokens.weight", &[v, d])?;
        let lm_head = if c.tie_word_embeddings && !p.contains("language_model.lm_head.weight") {
            Linear {
                name: "language_model.model.embed_tokens".into(),
                weight: embed_tokens.clone(),
                bias: None,
            }
        } else {
            Linear::load(p, "language_model.lm_head", (d, v), false)?
        };
        let inv_freq = rope_inv_freq(c);
        Ok(Self {
            embed_tokens,
            layers,
            norm: p.get("language_model.model.norm.weight", &[d])?,
            lm_head,
            inv_freq,
            cfg: c.clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }

    /// Token embeddings `[B, T, D]` (float32) of `ids [B, T]` (u32).
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        let max = flat.max(0)?.to_dtype(DType::U32)?.to_scalar::<u32>()?;
        if max as usize >= self.cfg.vocab_size {
            return Err(TrainError::Invalid(format!(
                "token id {max} is outside the vocabulary of {} entries",
                self.cfg.vocab_size
            )));
        }
        let e = self.embed_tokens.index_select(&flat, 0)?;
        Ok(as_f32(&e)?.reshape((b, t, self.cfg.hidden_size))?)
    }

    /// cos/sin tables `[S, head_dim]` (each half repeated, as HF's `cat(freqs, freqs)`),
    /// positions `0..s`, computed in float32 as transformers does.
    fn rope_tables(&self, s: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let (cos, sin) = rope_angles(&self.inv_freq, 0, s);
        let full = |t: Vec<f32>| -> Result<Tensor> {
            let t = Tensor::from_vec(t, (s, half), device)?;
            Ok(Tensor::cat(&[&t, &t], 1)?)
        };
        Ok((full(cos)?, full(sin)?))
    }

    /// Runs the decoder over `x [B, S, D]` with the additive mask `[B, 1, S, S]` (positions
    /// `0..S`); returns the hidden states after the final RMSNorm.
    pub fn forward(&self, p: &ParamStore, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let rope = self.rope(x)?;
        let mut h = x.clone();
        for i in 0..self.layers.len() {
            h = self.decoder_layer(p, i, &h, mask, &rope)?;
        }
        self.final_norm(&h)
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The RoPE tables for a sequence `x [B, S, D]` (an error past `max_position_embeddings`).
    pub fn rope(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let s = x.dim(1)?;
        if s > self.cfg.max_position_embeddings {
            return Err(TrainError::Invalid(format!(
                "sequence of {s} positions exceeds max_position_embeddings {}",
                self.cfg.max_position_embeddings
            )));
        }
        self.rope_tables(s, x.device())
    }

    /// Decoder layer `i` over `x [B, S, D]` with the additive mask and the tables of
    /// [`LlamaTrain::rope`].
    pub fn decoder_layer(
        &self,
        p: &ParamStore,
        i: usize,
        x: &Tensor,
        mask: &Tensor,
        (cos, sin): &(Tensor, Tensor),
    ) -> Result<Tensor> {
        let l = self.layers.get(i).ok_or_else(|| {
            TrainError::Invalid(format!(
                "no decoder layer {i} (the model has {})",
                self.layers.len()
            ))
        })?;
        Ok(l.forward_with(p, x, false, &mut |q, k, v| {
            let (nh, nkv, hd) = l.heads();
            let q = rope(&q, cos, sin).map_err(to_model)?;
            let k = rope(&k, cos, sin).map_err(to_model)?;
            let rep = nh / nkv.max(1);
            let (k, v) = (repeat_kv(&k, rep)?, repeat_kv(&v, rep)?);
            let scale = (1.0 / (hd as f64).sqrt()) as f32;
            attention(&q, &k, &v, Some(mask), scale).map_err(to_model)
        })?)
    }

    /// The final RMSNorm.
    pub fn final_norm(&self, h: &Tensor) -> Result<Tensor> {
        rms_norm(h, &self.norm, self.cfg.rms_norm_eps)
    }

    /// Logits `[B, T, V]` (float32) of hidden states `[B, T, D]`.
    pub fn logits(&self, p: &ParamStore, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(p, hidden)
    }
}
