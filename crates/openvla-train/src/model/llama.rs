//! The Llama language model for training (transformers 4.40.1 `LlamaForCausalLM`, the same math
//! as `openvla::model::llama` without the KV cache): RMSNorm, grouped-query attention with
//! half-rotation RoPE (float32 tables), SwiGLU, an additive attention mask.

use super::ops::{as_f32, masked_softmax, rms_norm, rope, Linear};
use super::params::ParamStore;
use crate::error::{Result, TrainError};
use candle_core::{DType, Device, Tensor};
use openvla::config::TextConfig;

/// Additive mask value for keys a query may not attend to (finite, as the inference model).
pub const MASKED: f32 = f32::MIN / 2.0;

#[derive(Debug, Clone)]
struct Layer {
    input_layernorm: Tensor,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    post_attention_layernorm: Tensor,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

/// The decoder stack, final norm and `lm_head`.
#[derive(Debug, Clone)]
pub struct LlamaTrain {
    embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    inv_freq: Vec<f32>,
    cfg: TextConfig,
}

impl LlamaTrain {
    /// Reads `language_model.*`.
    pub fn load(p: &ParamStore, c: &TextConfig) -> Result<Self> {
        let (v, d) = (c.vocab_size, c.hidden_size);
        let hd = c.head_dim();
        let (q, kv, i) = (
            c.num_attention_heads * hd,
            c.num_key_value_heads * hd,
            c.intermediate_size,
        );
        let b = c.attention_bias;
        let layers = (0..c.num_hidden_layers)
            .map(|l| {
                let pre = format!("language_model.model.layers.{l}");
                let lin = |n: &str, dims, bias| Linear::load(p, &format!("{pre}.{n}"), dims, bias);
                Ok(Layer {
                    input_layernorm: p.get(&format!("{pre}.input_layernorm.weight"), &[d])?,
                    q_proj: lin("self_attn.q_proj", (d, q), b)?,
                    k_proj: lin("self_attn.k_proj", (d, kv), b)?,
                    v_proj: lin("self_attn.v_proj", (d, kv), b)?,
                    o_proj: lin("self_attn.o_proj", (q, d), b)?,
                    post_attention_layernorm: p
                        .get(&format!("{pre}.post_attention_layernorm.weight"), &[d])?,
                    gate_proj: lin("mlp.gate_proj", (d, i), false)?,
                    up_proj: lin("mlp.up_proj", (d, i), false)?,
                    down_proj: lin("mlp.down_proj", (i, d), false)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
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
        let base = c.rope_theta as f32;
        let inv_freq = (0..hd)
            .step_by(2)
            .map(|i| 1.0f32 / base.powf(i as f32 / hd as f32))
            .collect();
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
        let hd = 2 * self.inv_freq.len();
        let mut cos = Vec::with_capacity(s * hd);
        let mut sin = Vec::with_capacity(s * hd);
        for pos in 0..s {
            for _ in 0..2 {
                for &f in &self.inv_freq {
                    let a = pos as f32 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        Ok((
            Tensor::from_vec(cos, (s, hd), device)?,
            Tensor::from_vec(sin, (s, hd), device)?,
        ))
    }

    fn layer(
        &self,
        p: &ParamStore,
        l: &Layer,
        x: &Tensor,
        mask: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let (b, s, _) = x.dims3()?;
        let hd = c.head_dim();
        let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
        let n = rms_norm(x, &l.input_layernorm, c.rms_norm_eps)?;
        let heads = |y: Tensor, h: usize| -> Result<Tensor> {
            Ok(y.reshape((b, s, h, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let q = rope(&heads(l.q_proj.forward(p, &n)?, nh)?, cos, sin)?;
        let k = rope(&heads(l.k_proj.forward(p, &n)?, nkv)?, cos, sin)?;
        let v = heads(l.v_proj.forward(p, &n)?, nkv)?;
        let rep = nh / nkv.max(1);
        let (k, v) = if rep > 1 {
            let expand = |y: &Tensor| -> Result<Tensor> {
                Ok(y.unsqueeze(2)?
                    .broadcast_as((b, nkv, rep, s, hd))?
                    .reshape((b, nh, s, hd))?)
            };
            (expand(&k)?, expand(&v)?)
        } else {
            (k, v)
        };
        let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
        let probs = masked_softmax(&scores, mask)?;
        let out = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, s, nh * hd))?;
        let x = (x + l.o_proj.forward(p, &out)?)?;
        let n = rms_norm(&x, &l.post_attention_layernorm, c.rms_norm_eps)?;
        let m = (l.gate_proj.forward(p, &n)?.silu()? * l.up_proj.forward(p, &n)?)?;
        Ok((x + l.down_proj.forward(p, &m)?)?)
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
        self.layer(p, l, x, mask, cos, sin)
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
