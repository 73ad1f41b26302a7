//! One Llama decoder layer (transformers 4.40.1 `LlamaDecoderLayer`, spec §4): RMSNorm,
//! grouped-query attention, SwiGLU, two residuals. Written once for inference and training
//! ([`Backend`]); how attention runs (KV caches, packed sequences, causal or bidirectional,
//! a mask) is the caller's, given as a closure, since that is what inference (one cache per
//! sequence, row-independent kernels) and training (an additive mask over a batch) do
//! differently.

use crate::config::TextConfig;
use crate::error::Result;
use crate::model::backend::{Backend, Infer, ParamSource};
use crate::model::linear::LayerKind;
use candle_core::Tensor;

/// Attention over the rotated-to-be heads: `q [B, heads, T, hd]`, `k`, `v`
/// `[B, kv_heads, T, hd]` (before RoPE) -> `[B, heads, T, hd]`.
pub type Attend<'a> = dyn FnMut(Tensor, Tensor, Tensor) -> Result<Tensor> + 'a;

/// `inv_freq = 1 / base^(arange(0, head_dim, 2) / head_dim)`, in float32 as transformers
/// computes it.
pub fn rope_inv_freq(cfg: &TextConfig) -> Vec<f32> {
    let hd = cfg.head_dim();
    let base = cfg.rope_theta as f32;
    (0..hd)
        .step_by(2)
        .map(|i| 1.0f32 / base.powf(i as f32 / hd as f32))
        .collect()
}

/// cos and sin of `pos · inv_freq` for positions `start .. start + t`, row-major
/// `[t, head_dim / 2]`, in float32 as transformers computes them.
pub fn rope_angles(inv_freq: &[f32], start: usize, t: usize) -> (Vec<f32>, Vec<f32>) {
    let mut cos = Vec::with_capacity(t * inv_freq.len());
    let mut sin = Vec::with_capacity(t * inv_freq.len());
    for p in start..start + t {
        for &f in inv_freq {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    (cos, sin)
}

/// Grouped-query attention's key/value heads, each repeated `rep` times (HF `repeat_kv`):
/// `y [B, kv_heads, S, hd]` -> `[B, kv_heads · rep, S, hd]`.
pub fn repeat_kv(y: &Tensor, rep: usize) -> Result<Tensor> {
    if rep == 1 {
        return Ok(y.clone());
    }
    let (b, kv, s, hd) = y.dims4()?;
    Ok(y.unsqueeze(2)?
        .broadcast_as((b, kv, rep, s, hd))?
        .reshape((b, kv * rep, s, hd))?)
}

/// One pre-norm decoder layer.
#[derive(Debug, Clone)]
pub struct DecoderLayer<B: Backend = Infer> {
    input_layernorm: Tensor,
    /// `q_proj`, `k_proj`, `v_proj`.
    qkv_proj: B::Group<3>,
    o_proj: B::Linear,
    post_attention_layernorm: Tensor,
    /// `gate_proj`, `up_proj`.
    gate_up_proj: B::Group<2>,
    down_proj: B::Linear,
    eps: f64,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl<B: Backend> DecoderLayer<B> {
    /// Loads the layer under `prefix` (`language_model.model.layers.{i}`).
    pub fn load_with(w: &dyn ParamSource<B>, prefix: &str, c: &TextConfig) -> Result<Self> {
        let d = c.hidden_size;
        let hd = c.head_dim();
        let q = c.num_attention_heads * hd;
        let kv = c.num_key_value_heads * hd;
        let i = c.intermediate_size;
        let b = c.attention_bias;
        let linear = |name: &str, dims: (usize, usize), bias: bool| {
            w.linear(&format!("{prefix}.{name}"), dims, bias, LayerKind::Llm)
        };
        let norm = |name: &str| w.tensor(&format!("{prefix}.{name}.weight"), &[d]);
        Ok(DecoderLayer {
            input_layernorm: norm("input_layernorm")?,
            qkv_proj: B::group([
                linear("self_attn.q_proj", (d, q), b)?,
                linear("self_attn.k_proj", (d, kv), b)?,
                linear("self_attn.v_proj", (d, kv), b)?,
            ])?,
            o_proj: linear("self_attn.o_proj", (q, d), b)?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            gate_up_proj: B::group([
                linear("mlp.gate_proj", (d, i), false)?,
                linear("mlp.up_proj", (d, i), false)?,
            ])?,
            down_proj: linear("mlp.down_proj", (i, d), false)?,
            eps: c.rms_norm_eps,
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_key_value_heads,
            head_dim: hd,
        })
    }

    /// Query heads, key/value heads and the head width.
    pub fn heads(&self) -> (usize, usize, usize) {
        (self.num_heads, self.num_kv_heads, self.head_dim)
    }

    /// The layer over `x [B, T, D]`: `attend` gets the projected heads (RoPE is its to apply,
    /// with the positions it knows) and returns the attention output. `rowwise` computes every
    /// row of every product on its own ([`Backend::linear_rowwise`]).
    pub fn forward_with(
        &self,
        ctx: &B::Ctx,
        x: &Tensor,
        rowwise: bool,
        attend: &mut Attend<'_>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let hd = self.head_dim;
        let lin = |l: &B::Linear, y: &Tensor| {
            if rowwise {
                B::linear_rowwise(ctx, l, y)
            } else {
                B::linear(ctx, l, y)
            }
        };
        let heads = |y: Tensor, nh: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let n = B::rms_norm(x, &self.input_layernorm, self.eps)?;
        let [q, k, v] = B::linear_group(ctx, &self.qkv_proj, &n, rowwise)?;
        let out = attend(
            heads(q, self.num_heads)?,
            heads(k, self.num_kv_heads)?,
            heads(v, self.num_kv_heads)?,
        )?;
        let out = out.transpose(1, 2)?.reshape((b, t, self.num_heads * hd))?;
        let x = (x + lin(&self.o_proj, &out)?)?;
        let n = B::rms_norm(&x, &self.post_attention_layernorm, self.eps)?;
        let [gate, up] = B::linear_group(ctx, &self.gate_up_proj, &n, rowwise)?;
        let m = B::silu_mul(&gate, &up)?;
        Ok((x + lin(&self.down_proj, &m)?)?)
    }
}

impl DecoderLayer<Infer> {
    /// The arithmetic of the layer's many-row products (its attention's too).
    pub fn compute(&self) -> crate::kernels::ComputePrecision {
        self.o_proj.compute()
    }

    /// Bytes of the layer's weight matrices.
    pub fn weight_bytes(&self) -> usize {
        self.qkv_proj.storage_bytes()
            + self.gate_up_proj.storage_bytes()
            + self.o_proj.storage_bytes()
            + self.down_proj.storage_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn repeat_kv_repeats_each_head_in_place() {
        // [1, 2 kv heads, 1 position, 1] -> heads [a, a, a, b, b, b] (HF repeat_kv order).
        let y = Tensor::from_slice(&[1f32, 2.], (1, 2, 1, 1), &Device::Cpu).unwrap();
        let r = repeat_kv(&y, 3).unwrap();
        assert_eq!(r.dims(), [1, 6, 1, 1]);
        let v: Vec<f32> = r.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v, [1., 1., 1., 2., 2., 2.]);
        assert_eq!(repeat_kv(&y, 1).unwrap().dims(), [1, 2, 1, 1]);
    }

    #[test]
    fn rope_angles_are_position_times_frequency() {
        let inv = [1.0f32, 0.5];
        let (cos, sin) = rope_angles(&inv, 3, 2);
        // positions 3 and 4, two frequencies each, row-major.
        let want = [3.0f32, 1.5, 4.0, 2.0];
        for (i, a) in want.iter().enumerate() {
            assert_eq!(cos[i], a.cos());
            assert_eq!(sin[i], a.sin());
        }
        let cfg = TextConfig {
            vocab_size: 16,
            hidden_size: 8,
            intermediate_size: 16,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            num_key_value_heads: 2,
            rms_norm_eps: 1e-6,
            rope_theta: 100.0,
            max_position_embeddings: 8,
            attention_bias: false,
            tie_word_embeddings: false,
            bos_token_id: 1,
            eos_token_id: 2,
            pad_token_id: None,
        };
        // head_dim 4: 1 / 100^(0/4), 1 / 100^(2/4).
        assert_eq!(rope_inv_freq(&cfg), [1.0, 0.1]);
    }
}
