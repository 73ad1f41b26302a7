//! The compositions of candle ops that the training model used before [`super::fused`]: the
//! references that the fused ops' tests and the `fused_ops` bench compare against. The model
//! itself does not use them.

use crate::error::Result;
use candle_core::{Tensor, D};

/// LayerNorm over the last dimension from `mean`/`sqr`/`sqrt` (biased variance).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(y.broadcast_mul(w)?.broadcast_add(b)?)
}

/// Llama RMSNorm `w * x / sqrt(mean(x^2) + eps)` from `sqr`/`mean`/`sqrt`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let y = x.broadcast_div(&(ms + eps)?.sqrt()?)?;
    Ok(y.broadcast_mul(w)?)
}

/// Scaled dot-product attention `softmax(q·kᵀ·scale + mask)·v` from `matmul`/`max`/`exp`/`sum`
/// (the max detached), an optional additive mask `[B, 1, T, S]` broadcast over the heads of
/// `q [B, H, T, hd]`, `k`, `v [B, H, S, hd]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let z = (q.matmul(&k.t()?)? * scale)?;
    let z = match mask {
        Some(m) => z.broadcast_add(m)?,
        None => z,
    };
    let mx = z.max_keepdim(D::Minus1)?.detach();
    let e = z.broadcast_sub(&mx)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?.matmul(v)?)
}

/// Half-rotation rotary embedding by `narrow`/`cat`: `x cos + rotate_half(x) sin`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let half = hd / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?)?)
}

/// `x W^T + b` as candle's `matmul` of the 2-D view and `broadcast_add` (float32 operands).
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let k = x.dim(D::Minus1)?;
    let y = x.reshape((x.elem_count() / k.max(1), k))?.matmul(&w.t()?)?;
    Ok(match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}
