//! Differentiable building blocks. Every op here records a backward in candle 0.11.1; none of
//! the fused kernels (`softmax_last_dim`, `rms_norm`, `layer_norm`, `rotary_emb::rope*`) is used.

use super::params::ParamStore;
use crate::error::Result;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor, D};
use openvla::kernels::activation::f32_contiguous;

/// A Linear (or a Conv2d whose kernel equals its stride, seen as a Linear over flattened
/// patches) by module name; its LoRA branch, if any, is looked up in the [`ParamStore`].
#[derive(Debug, Clone)]
pub struct Linear {
    /// Module name (`language_model.model.layers.0.self_attn.q_proj`).
    pub name: String,
    /// `[out, in]` (float32 `Var` tensor, or a frozen float32/bf16 tensor).
    pub weight: Tensor,
    /// `[out]`.
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Reads `{name}.weight` (`[out, in]`) and, with `bias`, `{name}.bias`.
    pub fn load(
        p: &ParamStore,
        name: &str,
        (fin, fout): (usize, usize),
        bias: bool,
    ) -> Result<Self> {
        Ok(Self {
            name: name.to_string(),
            weight: p.get(&format!("{name}.weight"), &[fout, fin])?,
            bias: if bias {
                Some(p.get(&format!("{name}.bias"), &[fout])?)
            } else {
                None
            },
        })
    }

    /// `x W^T + b` (+ the LoRA branch) over the last dimension of `x`.
    pub fn forward(&self, p: &ParamStore, x: &Tensor) -> Result<Tensor> {
        let y = linear(x, &self.weight, self.bias.as_ref())?;
        match p.lora(&self.name) {
            Some(l) => Ok((y + l.forward_delta(x)?)?),
            None => Ok(y),
        }
    }
}

/// `x W^T + b` for `x [..., in]`, `w [out, in]`, as one 2-D product. A frozen weight (one that
/// records no op: not a `Var` and not derived from one) goes through [`FrozenMatmul`], whose
/// backward yields only the input's gradient.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let fin = *dims.last().unwrap_or(&1);
    let rows = x.elem_count() / fin.max(1);
    let x2 = x.reshape((rows, fin))?;
    let y = if w.track_op() {
        x2.matmul(&as_f32(w)?.t()?)?
    } else {
        x2.contiguous()?
            .apply_op1(FrozenMatmul { weight: w.clone() })?
    };
    let y = match b {
        Some(b) => y.broadcast_add(&as_f32(b)?)?,
        None => y,
    };
    let mut out = dims;
    if let Some(last) = out.last_mut() {
        *last = w.dim(0)?;
    }
    Ok(y.reshape(out)?)
}

/// `x W^T` with a frozen `W` (`[out, in]`, float32 or bf16, widened per call) as a custom op.
///
/// candle's `matmul` backward computes the gradient of both operands, so a frozen weight would
/// cost one extra weight-sized product per layer and a weight-sized gradient that stays in the
/// `GradStore` until the step ends (the whole model's size again, for LoRA). This op's backward
/// returns only `grad · W`; a bf16 weight is also never kept widened between forward and
/// backward.
#[derive(Debug, Clone)]
pub struct FrozenMatmul {
    /// `[out, in]`.
    pub weight: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_contiguous(storage, layout, self.name())?;
        let (rows, fin) = layout.shape().dims2()?;
        let x = Tensor::from_slice(x, (rows, fin), &Device::Cpu)?;
        let w = self.weight.to_dtype(DType::F32)?;
        let y = x.matmul(&w.t()?)?;
        let out = w.dim(0)?;
        Ok((
            CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?),
            Shape::from((rows, out)),
        ))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let w = self.weight.to_dtype(DType::F32)?;
        Ok(Some(grad_res.contiguous()?.matmul(&w)?))
    }
}

/// `t` in float32.
pub fn as_f32(t: &Tensor) -> Result<Tensor> {
    Ok(if t.dtype() == DType::F32 {
        t.clone()
    } else {
        t.to_dtype(DType::F32)?
    })
}

/// LayerNorm over the last dimension (biased variance, as torch).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(y.broadcast_mul(w)?.broadcast_add(b)?)
}

/// Llama RMSNorm: `w * x / sqrt(mean(x^2) + eps)`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let y = x.broadcast_div(&(ms + eps)?.sqrt()?)?;
    Ok(y.broadcast_mul(w)?)
}

/// Softmax over the last dimension (the max is subtracted as a constant), as one op.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(MaskedSoftmax { mask: None })?)
}

/// `softmax(x + mask)` over the last dimension for `x [B, H, S, K]` and an additive
/// `mask [B, 1, S, K]` (no gradient), as one op.
pub fn masked_softmax(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, _, s, k) = x.dims4()?;
    if mask.dims() != [b, 1, s, k] {
        return Err(crate::error::TrainError::Invalid(format!(
            "attention mask {:?} does not fit scores {:?}",
            mask.dims(),
            x.dims()
        )));
    }
    Ok(x.contiguous()?.apply_op1(MaskedSoftmax {
        mask: Some(mask.to_dtype(DType::F32)?.contiguous()?),
    })?)
}

/// Softmax (optionally of `x + mask`, the mask broadcast over heads) with its analytic
/// backward `dx = y * (dy - sum(dy * y))`.
///
/// Composed of candle ops (max, sub, exp, sum, div), the attention softmax is a chain of about
/// 25 passes over the `[B, H, S, S]` scores in forward and backward (each node also gets a
/// zero-filled gradient slot); fused it is 2 passes forward and 4 backward. On the tiny model at
/// batch 16 the scores are the largest tensors of the step.
#[derive(Debug, Clone)]
pub struct MaskedSoftmax {
    /// `[B, 1, S, K]` float32, contiguous.
    pub mask: Option<Tensor>,
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let x = f32_contiguous(storage, layout, self.name())?;
        let dims = layout.shape().dims();
        let k = *dims.last().unwrap_or(&1);
        let mut out = x.to_vec();
        let mask: Option<Vec<f32>> = match &self.mask {
            Some(m) => Some(m.flatten_all()?.to_vec1::<f32>()?),
            None => None,
        };
        // Row r of x is (batch, head, query) = (r / (H S), ., r % S) in [B, H, S, K].
        let (heads, s) = if dims.len() == 4 {
            (dims[1], dims[2])
        } else {
            (1, 1)
        };
        out.par_chunks_mut(k.max(1))
            .enumerate()
            .for_each(|(r, row)| {
                if let Some(m) = &mask {
                    let bi = r / (heads * s);
                    let qi = r % s;
                    let mrow = &m[(bi * s + qi) * k..(bi * s + qi + 1) * k];
                    for (x, m) in row.iter_mut().zip(mrow) {
                        *x += m;
                    }
                }
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for x in row.iter_mut() {
                    *x = (*x - max).exp();
                    sum += *x;
                }
                for x in row.iter_mut() {
                    *x /= sum;
                }
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let gy = (grad * res)?;
        let s = gy.sum_keepdim(D::Minus1)?;
        Ok(Some(res.mul(&grad.broadcast_sub(&s)?)?))
    }
}

/// Half-rotation rotary embedding (HF `rotate_half`): `x cos + rotate_half(x) sin` for
/// `x [B, H, T, hd]` and tables `[T, hd]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let half = hd / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d <= tol, "max abs diff {d} > {tol}");
    }

    fn data(shape: &[usize], seed: u64) -> Tensor {
        let mut r = crate::rng::TrainRng::new(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| r.normal() as f32).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn norms_and_softmax_match_the_fused_kernels_and_have_gradients() {
        let x = Var::from_tensor(&data(&[2, 5, 8], 1)).unwrap();
        let w = data(&[8], 2);
        let b = data(&[8], 3);
        let ln = layer_norm(x.as_tensor(), &w, &b, 1e-6).unwrap();
        let rn = rms_norm(x.as_tensor(), &w, 1e-5).unwrap();
        let sm = softmax_last(x.as_tensor()).unwrap();
        let fused_sm = {
            let e = x.as_tensor().exp().unwrap();
            e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap()
        };
        close(&sm, &fused_sm, 1e-6);
        // mean 0 / unit variance before the affine part
        let plain = layer_norm(
            x.as_tensor(),
            &Tensor::ones(8, DType::F32, &Device::Cpu).unwrap(),
            &Tensor::zeros(8, DType::F32, &Device::Cpu).unwrap(),
            0.0,
        )
        .unwrap();
        let m = plain.mean_keepdim(D::Minus1).unwrap();
        close(&m, &m.zeros_like().unwrap(), 1e-6);
        let loss = (ln.sum_all().unwrap() + rn.sqr().unwrap().sum_all().unwrap()).unwrap();
        let loss = (loss + sm.sqr().unwrap().sum_all().unwrap()).unwrap();
        let g = loss.backward().unwrap();
        assert!(g.get(&x).is_some(), "no gradient through the norms");
    }

    #[test]
    fn frozen_matmul_equals_matmul_with_the_input_gradient_only() {
        let x = Var::from_tensor(&data(&[3, 4, 5], 4)).unwrap();
        let w = data(&[6, 5], 5);
        let b = data(&[6], 6);
        let frozen = linear(x.as_tensor(), &w, Some(&b)).unwrap();
        let wv = Var::from_tensor(&w).unwrap();
        let plain = linear(x.as_tensor(), wv.as_tensor(), Some(&b)).unwrap();
        close(&frozen, &plain, 1e-6);
        let gf = frozen.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let gp = plain.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        close(gf.get(&x).unwrap(), gp.get(&x).unwrap(), 1e-5);
        let weight_sized = |g: &candle_core::backprop::GradStore| {
            g.get_ids()
                .filter(|id| g.get_id(**id).is_some_and(|t| t.elem_count() == 30))
                .count()
        };
        // candle's matmul computes (and keeps) a gradient for a frozen operand too.
        let leaked = x
            .as_tensor()
            .reshape((12, 5))
            .unwrap()
            .matmul(&w.t().unwrap())
            .unwrap();
        let gl = leaked.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(
            weight_sized(&gl),
            1,
            "candle keeps a gradient for the frozen W^T"
        );
        assert_eq!(weight_sized(&gp), 1, "the Var's gradient");
        assert_eq!(
            weight_sized(&gf),
            0,
            "no gradient computed for the frozen weight"
        );
        let wb = w.to_dtype(DType::BF16).unwrap();
        let y = linear(x.as_tensor(), &wb, None).unwrap();
        let want = linear(x.as_tensor(), &wb.to_dtype(DType::F32).unwrap(), None).unwrap();
        close(&y, &want, 1e-6);
    }

    #[test]
    fn fused_masked_softmax_matches_the_composed_one_with_gradients() {
        let x = Var::from_tensor(&data(&[2, 3, 4, 5], 7)).unwrap();
        let mut m = vec![0f32; 2 * 4 * 5];
        for (i, v) in m.iter_mut().enumerate() {
            if i % 3 == 1 {
                *v = f32::MIN / 2.0;
            }
        }
        let mask = Tensor::from_vec(m, (2, 1, 4, 5), &Device::Cpu).unwrap();
        let w = data(&[2, 3, 4, 5], 8);
        let composed = {
            let z = x.as_tensor().broadcast_add(&mask).unwrap();
            let mx = z.max_keepdim(D::Minus1).unwrap().detach();
            let e = z.broadcast_sub(&mx).unwrap().exp().unwrap();
            e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap()
        };
        let fused = masked_softmax(x.as_tensor(), &mask).unwrap();
        close(&fused, &composed, 1e-6);
        let gc = (&composed * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gf = (&fused * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        close(gf.get(&x).unwrap(), gc.get(&x).unwrap(), 1e-6);
        let plain = softmax_last(x.as_tensor()).unwrap();
        let sums = plain.sum_keepdim(D::Minus1).unwrap();
        close(&sums, &sums.ones_like().unwrap(), 1e-6);
    }

    #[test]
    fn rope_rotates_pairs_half_apart() {
        // hd = 4: pairs (0, 2) and (1, 3) rotate by the angle of their frequency.
        let x = Tensor::from_vec(vec![1f32, 0., 0., 0.], (1, 1, 1, 4), &Device::Cpu).unwrap();
        let a = 0.3f32;
        let cos = Tensor::from_vec(vec![a.cos(), 1., a.cos(), 1.], (1, 4), &Device::Cpu).unwrap();
        let sin = Tensor::from_vec(vec![a.sin(), 0., a.sin(), 0.], (1, 4), &Device::Cpu).unwrap();
        let y = rope(&x, &cos, &sin).unwrap().flatten_all().unwrap();
        let want = Tensor::from_vec(vec![a.cos(), 0., a.sin(), 0.], 4, &Device::Cpu).unwrap();
        close(&y, &want, 1e-7);
    }
}
