//! The seam between the one model definition and the two ways it runs.
//!
//! The network (the timm towers of [`super::vit`], the backbone of [`super::vision`], the
//! projector of [`super::projector`], FiLM, the Llama decoder layer of [`super::decoder`], OFT's
//! action head and proprio projector) is written once, generic over a [`Backend`]: the handful
//! of operations whose implementation differs between inference and training.
//!
//! - [`Infer`] (this crate): quantized, bf16 or packed weights, fused kernels that have no
//!   backward (`fused_qkv_attention`, candle's `layer_norm`), row-independent products. It is
//!   the exact default every golden test checks.
//! - `openvla_train::model::Train`: float32 `Var`s and frozen weights, LoRA branches looked up
//!   in the parameter store, and only ops that record a backward (candle's, or the training
//!   crate's fused ops with hand-written backwards).
//!
//! What is not an operation (shapes, token order, prefix tokens, LayerScale, FiLM's
//! `x·(1+γ)+β`, which block is read) is in the definition and so the same for both.
//! Loading is the same seam: a [`ParamSource`] turns checkpoint names into a backend's layers.

use crate::error::{Error, Result};
use crate::kernels::activation::{gelu_erf, silu_mul};
use crate::kernels::attention::fused_qkv_attention;
use crate::model::linear::{LayerKind, Linear, LinearGroup};
use candle_core::Tensor;

/// The operations a model definition is written with.
pub trait Backend: Sized + Send + Sync + 'static {
    /// A linear layer (`[out, in]` weight and optional bias) as this backend holds it.
    type Linear: std::fmt::Debug + Clone + Send + Sync;
    /// What a forward pass reads besides the modules' own tensors: nothing for inference, the
    /// parameter store (LoRA adapters by module name) for training.
    type Ctx: ?Sized;

    /// `x · Wᵀ + b` over the last dimension of `x`.
    fn linear(ctx: &Self::Ctx, layer: &Self::Linear, x: &Tensor) -> Result<Tensor>;

    /// A patch-embedding convolution (kernel = stride = patch) applied to `patches
    /// [B, P, 3·p·p]`, the flattened patches of `pixels [B, 3, H, W]`. The default is the
    /// linear map of the flattened patches; a backend with adapters on the convolution adds
    /// their branch, which reads the image.
    fn patch_embed(
        ctx: &Self::Ctx,
        layer: &Self::Linear,
        pixels: &Tensor,
        patches: &Tensor,
    ) -> Result<Tensor> {
        let _ = pixels;
        Self::linear(ctx, layer, patches)
    }

    /// Like [`Backend::linear`], with every row computed on its own whatever the number of
    /// rows (inference: the row-independent kernels, so a batched answer equals a single one;
    /// training has no such constraint and uses [`Backend::linear`]).
    fn linear_rowwise(ctx: &Self::Ctx, layer: &Self::Linear, x: &Tensor) -> Result<Tensor> {
        Self::linear(ctx, layer, x)
    }

    /// Layers that read the same input (q/k/v, gate/up), as this backend holds them.
    type Group<const N: usize>: std::fmt::Debug + Clone + Send + Sync;

    /// Groups `layers` (same input width).
    fn group<const N: usize>(layers: [Self::Linear; N]) -> Result<Self::Group<N>>;

    /// Each layer of `group` applied to `x`; `rowwise` as [`Backend::linear_rowwise`].
    fn linear_group<const N: usize>(
        ctx: &Self::Ctx,
        group: &Self::Group<N>,
        x: &Tensor,
        rowwise: bool,
    ) -> Result<[Tensor; N]>;

    /// Llama's RMSNorm `w · x / sqrt(mean(x²) + eps)` over the last dimension.
    fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor>;

    /// The SwiGLU product `silu(gate) · up`.
    fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor>;

    /// LayerNorm over the last dimension with affine `w`, `b` (biased variance, as torch).
    fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor>;

    /// Exact (erf) GELU.
    fn gelu_erf(x: &Tensor) -> Result<Tensor>;

    /// Bidirectional multi-head self-attention of a ViT block: fused `qkv [B, N, 3·D]`
    /// (q, k, v, each heads-major) -> `[B, N, D]`, scores scaled by `head_dim^-1/2`, in the
    /// arithmetic of `qkv_layer`, the layer that produced `qkv` (where the backend has more
    /// than one).
    fn vit_attention(qkv_layer: &Self::Linear, qkv: &Tensor, num_heads: usize) -> Result<Tensor>;
}

/// Where a backend's modules come from, by checkpoint name.
pub trait ParamSource<B: Backend> {
    /// The float32 tensor `name`, which must have exactly `shape`.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor>;

    /// The linear layer `{prefix}.weight` (`[out, in]` for `dims = (in, out)`) and, with
    /// `bias`, `{prefix}.bias` (`[out]`); `kind` says which part of the model it belongs to
    /// (quantization plans choose by it).
    fn linear(
        &self,
        prefix: &str,
        dims: (usize, usize),
        bias: bool,
        kind: LayerKind,
    ) -> Result<B::Linear>;

    /// The patch-embedding convolution `{prefix}.weight` (`[dim, 3, patch, patch]`) and
    /// `{prefix}.bias`, as a linear map of flattened `(channel, row, column)` patches.
    /// The default is an error: only the shards hold towers.
    fn patch_embed(&self, prefix: &str, dim: usize, patch: usize) -> Result<B::Linear> {
        let _ = (dim, patch);
        Err(Error::InvalidInput(format!(
            "{prefix}: this source holds no vision tower (no patch embedding)"
        )))
    }

    /// Marks every tensor under `prefix` as knowingly unused (the reference stores it, its
    /// output never depends on it).
    fn skip_prefix(&self, prefix: &str) {
        let _ = prefix;
    }

    /// The FiLM projections of the ViT block under `block_prefix`, with `vision_dim` outputs,
    /// or `None` when this source has no FiLM.
    fn film(&self, block_prefix: &str, vision_dim: usize) -> Result<Option<FilmLayer<B>>> {
        let _ = (block_prefix, vision_dim);
        Ok(None)
    }
}

/// Inference: this crate's weights and kernels, no backward.
#[derive(Debug, Clone, Copy, Default)]
pub struct Infer;

impl Backend for Infer {
    type Linear = Linear;
    type Ctx = ();

    fn linear(_: &(), layer: &Linear, x: &Tensor) -> Result<Tensor> {
        layer.forward(x)
    }

    fn linear_rowwise(_: &(), layer: &Linear, x: &Tensor) -> Result<Tensor> {
        layer.forward_rowwise(x)
    }

    type Group<const N: usize> = LinearGroup<N>;

    fn group<const N: usize>(layers: [Linear; N]) -> Result<LinearGroup<N>> {
        LinearGroup::new(layers)
    }

    fn linear_group<const N: usize>(
        _: &(),
        group: &LinearGroup<N>,
        x: &Tensor,
        rowwise: bool,
    ) -> Result<[Tensor; N]> {
        group.forward(x, rowwise)
    }

    fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32)?)
    }

    fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        Ok(silu_mul(gate, up)?)
    }

    fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
        Ok(candle_nn::ops::layer_norm(
            &x.contiguous()?,
            w,
            b,
            eps as f32,
        )?)
    }

    fn gelu_erf(x: &Tensor) -> Result<Tensor> {
        Ok(gelu_erf(x)?)
    }

    fn vit_attention(qkv_layer: &Linear, qkv: &Tensor, num_heads: usize) -> Result<Tensor> {
        Ok(fused_qkv_attention(qkv, num_heads, qkv_layer.compute())?)
    }
}

/// The FiLM projections of one ViT block (OFT, oft-spec §3): `γ = scale(avg)`,
/// `β = shift(avg)`, applied as `x · (1 + γ) + β` to every token between the attention and MLP
/// residuals.
#[derive(Debug, Clone)]
pub struct FilmLayer<B: Backend = Infer> {
    scale: B::Linear,
    shift: B::Linear,
}

impl<B: Backend> FilmLayer<B> {
    /// Wraps the two projections (`[vision_dim, llm_dim]` weights with bias).
    pub fn new(scale: B::Linear, shift: B::Linear) -> Self {
        FilmLayer { scale, shift }
    }

    /// The two projections, scale first.
    pub fn layers(&self) -> [&B::Linear; 2] {
        [&self.scale, &self.shift]
    }

    /// `x [B, T, D]` modulated by the average language embedding `language [B, llm_dim]`
    /// (film_vit_wrapper.py:65-72).
    pub fn modulate(&self, ctx: &B::Ctx, x: &Tensor, language: &Tensor) -> Result<Tensor> {
        let gamma = B::linear(ctx, &self.scale, language)?;
        let beta = B::linear(ctx, &self.shift, language)?;
        let one_plus_gamma = (gamma + 1.0)?.unsqueeze(1)?;
        Ok(x.broadcast_mul(&one_plus_gamma)?
            .broadcast_add(&beta.unsqueeze(1)?)?)
    }
}

/// The average of the raw token embeddings FiLM is conditioned on: `embeddings [1, n, D]` of
/// every non-placeholder token (BOS, the prompt, 29871 and `</s>`) -> `[1, D]`
/// (modeling_prismatic.py:994-1003, film_vit_wrapper.py:241-242).
pub fn language_mean(embeddings: &Tensor) -> Result<Tensor> {
    Ok(embeddings.to_dtype(candle_core::DType::F32)?.mean(1)?)
}

impl FilmLayer<Infer> {
    /// Bytes of the two weight matrices.
    pub fn weight_bytes(&self) -> usize {
        self.scale.storage_bytes() + self.shift.storage_bytes()
    }
}
