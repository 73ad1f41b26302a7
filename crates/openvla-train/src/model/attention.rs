//! Scaled dot-product attention for training as one graph node with a hand-written backward:
//! `out = softmax(q·kᵀ·scale + mask)·v` per (sample, head), the additive mask `[B, 1, T, S]`
//! broadcast over the heads.
//!
//! Composed of candle ops this was a scale pass, two batched matmuls (one rayon-parallel tiny
//! `gemm` per sample and head, with transposed operands made contiguous), the fused softmax,
//! and in backward candle's four matmul gradients with their transposes and gradient-store
//! adds. Here each head is one task on the rayon pool: its scores, softmax and output through
//! the kernels' single-threaded packed product ([`gemm_single`]); the backward recomputes the
//! head's probabilities (one `t·s·hd` product, cheaper than keeping `[B, H, T, S]` alive until
//! the backward) and runs the four gradient products the same way.
//!
//! Arithmetic is float32 in every mode (PyTorch's bf16 autocast runs these products in bf16;
//! here they are a few percent of a step, and exact f32 keeps the training attention equal to
//! the inference engine's up to summation order).

use super::fused::{tensor, with_f32};
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Shape, Tensor};
use openvla::kernels::activation::{exp_slice, f32_contiguous};
use openvla::kernels::transpose::transpose;
use openvla::kernels::{gemm_single, uninit_vec};
use rayon::prelude::*;

/// `softmax(q·kᵀ·scale + mask)·v` for `q [B, H, T, hd]`, `k`, `v [B, H, S, hd]` (float32,
/// contiguous) with an optional additive `mask [B, 1, T, S]` (no gradient): `apply_op3(q, k, v)`.
#[derive(Debug, Clone)]
pub struct AttentionOp {
    /// Multiplies the scores before the mask is added (`1/√hd`).
    pub scale: f32,
    /// `[B, 1, T, S]` float32, contiguous.
    pub mask: Option<Tensor>,
}

/// One head's sizes: `t` queries, `s` keys, `hd` wide.
#[derive(Debug, Clone, Copy)]
struct Head {
    t: usize,
    s: usize,
    hd: usize,
    scale: f32,
}

impl Head {
    /// `p [t, s] = softmax(q·kᵀ·scale + mask)` row by row (max subtracted first).
    fn probs(&self, q: &[f32], k: &[f32], mask: Option<&[f32]>, p: &mut [f32]) {
        let Head { t, s, hd, scale } = *self;
        gemm_single(q, k, p, s, t, s, hd);
        for (i, row) in p.chunks_exact_mut(s).enumerate() {
            match mask {
                Some(m) => {
                    for (x, m) in row.iter_mut().zip(&m[i * s..(i + 1) * s]) {
                        *x = *x * scale + m;
                    }
                }
                None => row.iter_mut().for_each(|x| *x *= scale),
            }
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            row.iter_mut().for_each(|x| *x -= max);
            exp_slice(row);
            let inv = 1.0 / row.iter().sum::<f32>();
            row.iter_mut().for_each(|x| *x *= inv);
        }
    }

    /// `out [t, hd] = p·v`.
    fn forward(&self, q: &[f32], k: &[f32], v: &[f32], mask: Option<&[f32]>, out: &mut [f32]) {
        let Head { t, s, hd, .. } = *self;
        // SAFETY: probs writes all t·s scores; the transpose all hd·s elements.
        let mut p = unsafe { uninit_vec::<f32>(t * s) };
        self.probs(q, k, mask, &mut p);
        let mut vt = unsafe { uninit_vec::<f32>(hd * s) };
        transpose(v, s, hd, hd, &mut vt);
        gemm_single(&p, &vt, out, hd, t, hd, s);
    }

    /// `(dq [t, hd], dk [s, hd], dv [s, hd])` of `out = p·v` for the output gradient `g [t, hd]`.
    fn backward(
        &self,
        (q, k, v): (&[f32], &[f32], &[f32]),
        mask: Option<&[f32]>,
        g: &[f32],
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
    ) {
        let Head { t, s, hd, scale } = *self;
        // SAFETY (each scratch below): written in full by probs, gemm_single or transpose before
        // it is read.
        let mut p = unsafe { uninit_vec::<f32>(t * s) };
        self.probs(q, k, mask, &mut p);
        let mut pt = unsafe { uninit_vec::<f32>(s * t) };
        transpose(&p, t, s, s, &mut pt);
        let mut gt = unsafe { uninit_vec::<f32>(hd * t) };
        transpose(g, t, hd, hd, &mut gt);
        // dv = pᵀ·g
        gemm_single(&pt, &gt, dv, hd, s, hd, t);
        // dp = g·vᵀ, then ds = scale · p ⊙ (dp − Σ dp ⊙ p) in place.
        let mut ds = unsafe { uninit_vec::<f32>(t * s) };
        gemm_single(g, v, &mut ds, s, t, s, hd);
        for (dr, pr) in ds.chunks_exact_mut(s).zip(p.chunks_exact(s)) {
            let c: f32 = dr.iter().zip(pr).map(|(d, p)| d * p).sum();
            for (d, p) in dr.iter_mut().zip(pr) {
                *d = scale * p * (*d - c);
            }
        }
        // dq = ds·k
        let mut kt = unsafe { uninit_vec::<f32>(hd * s) };
        transpose(k, s, hd, hd, &mut kt);
        gemm_single(&ds, &kt, dq, hd, t, hd, s);
        // dk = dsᵀ·q
        let mut dst = pt;
        transpose(&ds, t, s, s, &mut dst);
        let mut qt = gt;
        transpose(q, t, hd, hd, &mut qt);
        gemm_single(&dst, &qt, dk, hd, s, hd, t);
    }
}

/// `(B, H, T, S, hd)` of the operands, checked against each other and the mask.
fn dims(
    q: &Shape,
    k: &Shape,
    v: &Shape,
    mask: Option<&Tensor>,
) -> candle_core::Result<(usize, usize, usize, usize, usize)> {
    let (b, h, t, hd) = q.dims4()?;
    let (bk, hk, s, hdk) = k.dims4()?;
    if (bk, hk, hdk) != (b, h, hd) || v.dims() != k.dims() {
        bail!(
            "attention: q {:?}, k {:?} and v {:?} do not fit",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    if let Some(m) = mask {
        if m.dims() != [b, 1, t, s] {
            bail!(
                "attention: mask {:?} does not fit scores [{b}, {h}, {t}, {s}]",
                m.dims()
            )
        }
    }
    Ok((b, h, t, s, hd))
}

impl AttentionOp {
    /// Runs `f(mask)` with the mask's rows (or none).
    fn with_mask<R>(&self, f: impl FnOnce(Option<&[f32]>) -> R) -> candle_core::Result<R> {
        match &self.mask {
            Some(m) => with_f32(m, "fused-attention", |m| Ok(f(Some(m)))),
            None => Ok(f(None)),
        }
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (_, h, t, s, hd) = dims(l1.shape(), l2.shape(), l3.shape(), self.mask.as_ref())?;
        let (q, k, v) = (
            f32_contiguous(s1, l1, name)?,
            f32_contiguous(s2, l2, name)?,
            f32_contiguous(s3, l3, name)?,
        );
        let head = Head {
            t,
            s,
            hd,
            scale: self.scale,
        };
        // SAFETY: each head's task writes its t·hd outputs.
        let mut out = unsafe { uninit_vec::<f32>(q.len()) };
        if t * hd > 0 {
            self.with_mask(|mask| {
                out.par_chunks_mut(t * hd).enumerate().for_each(|(i, o)| {
                    let (qs, ks) = (i * t * hd, i * s * hd);
                    let m = mask.map(|m| &m[(i / h) * t * s..(i / h + 1) * t * s]);
                    head.forward(
                        &q[qs..qs + t * hd],
                        &k[ks..ks + s * hd],
                        &v[ks..ks + s * hd],
                        m,
                        o,
                    );
                })
            })?;
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let name = self.name();
        let (_, h, t, s, hd) = dims(q.shape(), k.shape(), v.shape(), self.mask.as_ref())?;
        if grad.dims() != q.dims() {
            bail!(
                "attention: output gradient {:?} for an output {:?}",
                grad.dims(),
                q.dims()
            )
        }
        let head = Head {
            t,
            s,
            hd,
            scale: self.scale,
        };
        let (dq, dk, dv) = with_f32(q, name, |qv| {
            with_f32(k, name, |kv| {
                with_f32(v, name, |vv| {
                    with_f32(grad, name, |g| {
                        // SAFETY: each head's task writes its slices of all three.
                        let mut dq = unsafe { uninit_vec::<f32>(qv.len()) };
                        let mut dk = unsafe { uninit_vec::<f32>(kv.len()) };
                        let mut dv = unsafe { uninit_vec::<f32>(vv.len()) };
                        if t * hd > 0 && s > 0 {
                            self.with_mask(|mask| {
                                dq.par_chunks_mut(t * hd)
                                    .zip(dk.par_chunks_mut(s * hd).zip(dv.par_chunks_mut(s * hd)))
                                    .enumerate()
                                    .for_each(|(i, (dq, (dk, dv)))| {
                                        let (qs, ks) = (i * t * hd, i * s * hd);
                                        let m =
                                            mask.map(|m| &m[(i / h) * t * s..(i / h + 1) * t * s]);
                                        head.backward(
                                            (
                                                &qv[qs..qs + t * hd],
                                                &kv[ks..ks + s * hd],
                                                &vv[ks..ks + s * hd],
                                            ),
                                            m,
                                            &g[qs..qs + t * hd],
                                            dq,
                                            dk,
                                            dv,
                                        );
                                    })
                            })?;
                        } else {
                            dq.fill(0.0);
                            dk.fill(0.0);
                            dv.fill(0.0);
                        }
                        Ok((dq, dk, dv))
                    })
                })
            })
        })?;
        Ok((
            Some(tensor(dq, q.shape())?),
            Some(tensor(dk, k.shape())?),
            Some(tensor(dv, v.shape())?),
        ))
    }
}

/// `softmax(q·kᵀ·scale + mask)·v` ([`AttentionOp`]) for `q [B, H, T, hd]`, `k`, `v [B, H, S, hd]`
/// and an optional additive `mask [B, 1, T, S]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f32,
) -> crate::error::Result<Tensor> {
    let mask = match mask {
        Some(m) => Some(super::ops::as_f32(m)?.contiguous()?),
        None => None,
    };
    Ok(q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        AttentionOp { scale, mask },
    )?)
}

#[cfg(test)]
mod tests {
    use super::super::fused_reference;
    use super::super::ops::tests::{data, same_values_and_grads};
    use super::*;
    use candle_core::Device;

    /// Values within 1e-5 relative and the gradients of q, k and v within 1e-4 of the composed
    /// candle ops (`fused_reference::attention`), on ragged shapes (one query, keys ≠ queries,
    /// widths off the kernels' blocks), with and without a mask that hides keys (causal, and a
    /// padded key in sample 0).
    #[test]
    fn matches_composed_attention_and_its_gradients() {
        for &(b, h, t, s, hd, masked) in &[
            (1, 1, 1, 1, 1, false),
            (2, 3, 7, 7, 5, true),
            (2, 2, 13, 9, 64, false),
            (1, 4, 33, 33, 24, true),
            (3, 2, 64, 64, 64, true),
        ] {
            let mask = masked.then(|| {
                let mut m = vec![0f32; b * t * s];
                for bi in 0..b {
                    for i in 0..t {
                        for j in 0..s {
                            if j > s - t + i || (bi == 0 && j == 0 && i + 1 < t) {
                                m[(bi * t + i) * s + j] = f32::MIN / 2.0;
                            }
                        }
                    }
                }
                Tensor::from_vec(m, (b, 1, t, s), &Device::Cpu).unwrap()
            });
            let scale = (hd as f64).powf(-0.5);
            let inputs = [
                data(&[b, h, t, hd], 1),
                data(&[b, h, s, hd], 2),
                data(&[b, h, s, hd], 3),
            ];
            let m = mask.as_ref();
            same_values_and_grads(
                &inputs,
                &|x| attention(&x[0], &x[1], &x[2], m, scale as f32).unwrap(),
                &|x| fused_reference::attention(&x[0], &x[1], &x[2], m, scale).unwrap(),
                1e-5,
            );
        }
    }

    /// Operands that do not fit each other, or a mask that does not fit the scores, are errors
    /// that name the shapes.
    #[test]
    fn mismatched_shapes_are_errors() {
        let q = data(&[1, 2, 4, 8], 1);
        let k = data(&[1, 2, 5, 8], 2);
        let e = attention(&q, &k, &data(&[1, 2, 4, 8], 3), None, 1.0).unwrap_err();
        assert!(e.to_string().contains("do not fit"), "{e}");
        let e = attention(&q, &k, &k, Some(&data(&[1, 1, 4, 4], 4)), 1.0).unwrap_err();
        assert!(e.to_string().contains("mask [1, 1, 4, 4]"), "{e}");
    }
}
