//! Differentiable building blocks. Every op here records a backward in candle 0.11.1; none of
//! candle's fused kernels (`softmax_last_dim`, `rms_norm`, `layer_norm`, `rotary_emb::rope*`,
//! which have no backward) is used. The norms, GELU, SwiGLU product, rotary embedding and linear
//! layers are this crate's fused ops with hand-written backward passes ([`super::fused`]), as is
//! attention ([`super::attention`]); the tests keep the earlier compositions of candle ops as
//! references ([`super::fused_reference`]).

use super::fused::{
    linear_bwd, linear_fwd, GeluKind, GeluOp, LayerNormOp, LinearOp, RmsNormOp, RopeOp, SiluMulOp,
};
use crate::error::Result;
use crate::lora::Adapters;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

/// A Linear (or a Conv2d whose kernel equals its stride, seen as a Linear over flattened
/// patches) by module name; its LoRA branch, if any, is looked up by that name
/// ([`Adapters`]: the [`ParamStore`](super::params::ParamStore)).
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
    /// `x W^T + b` (+ the LoRA branch) over the last dimension of `x`.
    pub fn forward(&self, p: &dyn Adapters, x: &Tensor) -> Result<Tensor> {
        let y = linear(x, &self.weight, self.bias.as_ref())?;
        match p.lora(&self.name) {
            Some(l) => Ok((y + l.forward_delta(x)?)?),
            None => Ok(y),
        }
    }
}

/// `x W^T + b` for `x [..., in]`, `w [out, in]`, as one product over the rows of `x`
/// ([`LinearOp`], one graph node: no reshapes). Its backward computes the input's, the weight's
/// and the bias's gradients only where they are wanted: a frozen weight (float32 or bf16,
/// widened per call, one that records no op) gets none, as [`FrozenMatmul`].
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let x = x.contiguous()?;
    let w = if w.dtype() == DType::F32 || w.dtype() == DType::BF16 || w.dtype() == DType::F16 {
        w.contiguous()?
    } else {
        as_f32(w)?.contiguous()?
    };
    Ok(match b {
        Some(b) => x.apply_op3(&w, &as_f32(b)?.contiguous()?, LinearOp)?,
        None => x.apply_op2(&w, LinearOp)?,
    })
}

/// `x W^T` with a frozen `W` (`[out, in]`, float32 or bf16, widened per call) as a custom op.
///
/// candle's `matmul` backward computes the gradient of both operands, so a frozen weight would
/// cost one extra weight-sized product per layer and a weight-sized gradient that stays in the
/// `GradStore` until the step ends (the whole model's size again, for LoRA). This op's backward
/// returns only `grad · W`. [`linear`] gets the same from [`LinearOp`] with the weight as an
/// operand that records no op.
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
        let w = self.weight.contiguous()?;
        let (ws, wl) = w.storage_and_layout();
        match &*ws {
            candle_core::Storage::Cpu(wc) => linear_fwd((storage, layout), (wc, wl), None),
            _ => candle_core::bail!("frozen-matmul runs on the CPU only"),
        }
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(linear_bwd(arg, &self.weight.detach(), grad_res, false)?.0)
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

/// LayerNorm over the last dimension (biased variance, as torch), one fused op
/// ([`LayerNormOp`]) with the gradients of `x`, `w` and `b`.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op3(
        &as_f32(w)?.contiguous()?,
        &as_f32(b)?.contiguous()?,
        LayerNormOp { eps: eps as f32 },
    )?)
}

/// Llama RMSNorm `w * x / sqrt(mean(x^2) + eps)`, one fused op ([`RmsNormOp`]).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(x.contiguous()?
        .apply_op2(&as_f32(w)?.contiguous()?, RmsNormOp { eps: eps as f32 })?)
}

/// Exact (erf) GELU, one fused op with its analytic backward ([`GeluOp`]).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(GeluOp {
        kind: GeluKind::Erf,
    })?)
}

/// tanh-approximated GELU, one fused op with its analytic backward ([`GeluOp`]).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(GeluOp {
        kind: GeluKind::Tanh,
    })?)
}

/// `silu(gate) * up` (the SwiGLU product), one fused op ([`SiluMulOp`]).
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMulOp)?)
}

/// Half-rotation rotary embedding (HF `rotate_half`): `x cos + rotate_half(x) sin` for
/// `x [B, H, T, hd]` and tables `[T, hd]`, one fused op ([`RopeOp`]; the tables get no
/// gradient).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op3(
        &as_f32(cos)?.contiguous()?,
        &as_f32(sin)?.contiguous()?,
        RopeOp,
    )?)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let d = max_abs_diff(a, b);
        assert!(d <= tol, "max abs diff {d} > {tol}");
    }

    pub(crate) fn data(shape: &[usize], seed: u64) -> Tensor {
        let mut r = crate::rng::TrainRng::new(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| r.normal() as f32).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn norms_have_gradients_and_normalize() {
        let x = Var::from_tensor(&data(&[2, 5, 8], 1)).unwrap();
        let w = data(&[8], 2);
        let b = data(&[8], 3);
        let ln = layer_norm(x.as_tensor(), &w, &b, 1e-6).unwrap();
        let rn = rms_norm(x.as_tensor(), &w, 1e-5).unwrap();
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

    /// The compositions of candle ops the model used before the fused ops (references).
    mod composed {
        use crate::model::fused_reference as r;
        use candle_core::Tensor;

        pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Tensor {
            r::layer_norm(x, w, b, eps).unwrap()
        }
        pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
            r::rms_norm(x, w, eps).unwrap()
        }
        pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
            r::rope(x, cos, sin).unwrap()
        }
        pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
            r::linear(x, w, b).unwrap()
        }
    }

    /// Relative max difference `max|a - b| / max|b|`.
    fn rel(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        let s = b.abs().unwrap().max_all().unwrap();
        d.to_scalar::<f32>().unwrap() / s.to_scalar::<f32>().unwrap().max(1e-30)
    }

    /// Checks that `f` (fused) equals `g` (composed) on `inputs` within `tol` relative, and so
    /// do the gradients of every input of `sum(f(inputs) * r)` for a random `r`.
    pub(crate) fn same_values_and_grads(
        inputs: &[Tensor],
        f: &dyn Fn(&[Tensor]) -> Tensor,
        g: &dyn Fn(&[Tensor]) -> Tensor,
        tol: f32,
    ) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let yf = f(&ts);
        let yg = g(&ts);
        assert_eq!(yf.dims(), yg.dims());
        let e = rel(&yf, &yg);
        assert!(e <= tol, "values differ by {e} relative (> {tol})");
        let r = data(yf.dims(), 99);
        let gf = (&yf * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gg = (&yg * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, v) in vars.iter().enumerate() {
            let a = gf
                .get(v)
                .unwrap_or_else(|| panic!("no fused gradient for input {i}"));
            let b = gg.get(v).unwrap();
            let e = rel(a, b);
            assert!(
                e <= 10.0 * tol,
                "gradient of input {i} differs by {e} relative"
            );
        }
    }

    /// Checks the gradient of `sum(f(inputs) * r)` against central finite differences of the
    /// op itself (evaluated in float32 at `x ± h`, summed in float64) at a few coordinates of
    /// each input.
    fn finite_differences(inputs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Tensor) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts);
        let r = data(y.dims(), 77);
        let loss = |ts: &[Tensor]| -> f64 {
            (f(ts).to_dtype(DType::F64).unwrap() * r.to_dtype(DType::F64).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let h = 1e-2f32;
        for (i, v) in vars.iter().enumerate() {
            let g = grads
                .get(v)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let base = inputs[i].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let scale = g.iter().fold(0f32, |m, v| m.max(v.abs()));
            for j in (0..base.len()).step_by((base.len() / 7).max(1)) {
                let at = |delta: f32| -> f64 {
                    let mut v = base.clone();
                    v[j] += delta;
                    let mut moved = ts.to_vec();
                    moved[i] = Tensor::from_vec(v, inputs[i].dims(), &Device::Cpu).unwrap();
                    loss(&moved)
                };
                let fd = ((at(h) - at(-h)) / (2.0 * h as f64)) as f32;
                assert!(
                    (fd - g[j]).abs() <= 2e-2 * scale.max(1.0),
                    "input {i} element {j}: finite difference {fd}, backward {}",
                    g[j]
                );
            }
        }
    }

    #[test]
    fn fused_layer_norm_equals_the_composed_one_and_finite_differences() {
        let inputs = [data(&[3, 7, 24], 11), data(&[24], 12), data(&[24], 13)];
        let f = |t: &[Tensor]| layer_norm(&t[0], &t[1], &t[2], 1e-6).unwrap();
        let g = |t: &[Tensor]| composed::layer_norm(&t[0], &t[1], &t[2], 1e-6);
        same_values_and_grads(&inputs, &f, &g, 1e-6);
        finite_differences(&inputs, &f);
        // Odd widths take the scalar tails of the row sums.
        let inputs = [data(&[5, 13], 14), data(&[13], 15), data(&[13], 16)];
        same_values_and_grads(&inputs, &f, &g, 1e-6);
    }

    #[test]
    fn fused_rms_norm_equals_the_composed_one_and_finite_differences() {
        let inputs = [data(&[2, 9, 32], 21), data(&[32], 22)];
        let f = |t: &[Tensor]| rms_norm(&t[0], &t[1], 1e-5).unwrap();
        let g = |t: &[Tensor]| composed::rms_norm(&t[0], &t[1], 1e-5);
        same_values_and_grads(&inputs, &f, &g, 1e-6);
        finite_differences(&inputs, &f);
        let inputs = [data(&[70, 11], 23), data(&[11], 24)];
        same_values_and_grads(&inputs, &f, &g, 1e-6);
    }

    #[test]
    fn fused_gelu_and_silu_mul_equal_candle_and_finite_differences() {
        let x = (data(&[4, 5, 33], 31) * 2.0).unwrap();
        let f = |t: &[Tensor]| gelu_erf(&t[0]).unwrap();
        let g = |t: &[Tensor]| t[0].gelu_erf().unwrap();
        // candle's gelu_erf backward rounds 1/sqrt(2 pi) to 0.398942 (3e-7 relative).
        same_values_and_grads(std::slice::from_ref(&x), &f, &g, 1e-6);
        finite_differences(std::slice::from_ref(&x), &f);
        let f = |t: &[Tensor]| gelu_tanh(&t[0]).unwrap();
        let g = |t: &[Tensor]| t[0].gelu().unwrap();
        same_values_and_grads(std::slice::from_ref(&x), &f, &g, 1e-6);
        finite_differences(std::slice::from_ref(&x), &f);
        let inputs = [x.clone(), data(&[4, 5, 33], 32)];
        let f = |t: &[Tensor]| silu_mul(&t[0], &t[1]).unwrap();
        let g = |t: &[Tensor]| (t[0].silu().unwrap() * &t[1]).unwrap();
        same_values_and_grads(&inputs, &f, &g, 1e-6);
        finite_differences(&inputs, &f);
        assert!(silu_mul(&x, &data(&[4, 5, 32], 33)).is_err());
    }

    #[test]
    fn fused_rope_equals_the_composed_one_and_finite_differences() {
        let cos = data(&[6, 8], 41);
        let sin = data(&[6, 8], 42);
        let x = data(&[2, 3, 6, 8], 43);
        let f = |t: &[Tensor]| rope(&t[0], &cos, &sin).unwrap();
        let g = |t: &[Tensor]| composed::rope(&t[0], &cos, &sin);
        same_values_and_grads(std::slice::from_ref(&x), &f, &g, 1e-6);
        finite_differences(std::slice::from_ref(&x), &f);
        assert!(rope(&x, &data(&[5, 8], 44), &data(&[5, 8], 45)).is_err());
    }

    #[test]
    fn fused_linear_equals_matmul_for_every_operand_and_finite_differences() {
        // Ragged sizes (not multiples of the gemm's register tiles).
        let inputs = [data(&[3, 13, 37], 51), data(&[45, 37], 52), data(&[45], 53)];
        let f = |t: &[Tensor]| {
            linear(&t[0], &t[1], Some(&t[2]))
                .unwrap()
                .flatten_to(1)
                .unwrap()
        };
        let g = |t: &[Tensor]| composed::linear(&t[0], &t[1], Some(&t[2]));
        same_values_and_grads(&inputs, &f, &g, 1e-5);
        finite_differences(&inputs, &f);
        let f = |t: &[Tensor]| linear(&t[0], &t[1], None).unwrap().flatten_to(1).unwrap();
        let g = |t: &[Tensor]| composed::linear(&t[0], &t[1], None);
        same_values_and_grads(&inputs[..2], &f, &g, 1e-5);
        assert!(linear(&inputs[0], &data(&[45, 36], 54), None).is_err());
    }

    /// `t` with every element rounded to bf16 (to nearest even) and widened back: exact.
    fn bf16_rounded(t: &Tensor) -> Tensor {
        t.to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    }

    #[test]
    fn bf16_arithmetic_linear_equals_f32_products_of_rounded_operands() {
        use super::super::fused::BF16Matmuls;
        use openvla::kernels::ComputePrecision;
        // Enough rows for the many-row bf16 GEMM (the kernels' GEMM_MIN_ROWS), ragged sizes.
        let (x, w, b) = (data(&[3, 13, 37], 71), data(&[45, 37], 72), data(&[45], 73));
        let r = data(&[3, 13, 45], 74);
        let run = |x: &Tensor, w: &Tensor| {
            let (xv, wv) = (Var::from_tensor(x).unwrap(), Var::from_tensor(w).unwrap());
            let y = linear(xv.as_tensor(), wv.as_tensor(), Some(&b)).unwrap();
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let dx = g.get(&xv).unwrap().clone();
            let dw = g.get(&wv).unwrap().clone();
            (y, dx, dw)
        };
        let exact = run(&x, &w);
        let bf16 = {
            let _bf16 = BF16Matmuls::set(ComputePrecision::Bf16);
            run(&x, &w)
        };
        // The reference: the same three products in f32 on bf16-rounded operands (the upstream
        // gradient r is rounded too, as the backward's products round both operands).
        let (xr, wr, rr) = (bf16_rounded(&x), bf16_rounded(&w), bf16_rounded(&r));
        let y_ref = xr
            .broadcast_matmul(&wr.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        let dx_ref = rr.broadcast_matmul(&wr).unwrap();
        let dw_ref = rr
            .reshape((39, 45))
            .unwrap()
            .t()
            .unwrap()
            .matmul(&xr.reshape((39, 37)).unwrap())
            .unwrap();
        close(&bf16.0, &y_ref, 1e-4);
        close(&bf16.1, &dx_ref, 1e-4);
        close(&bf16.2, &dw_ref, 1e-4);
        // ... and not the float32 products (the guard took effect), which are within bf16's
        // precision of them.
        assert!(
            max_abs_diff(&bf16.0, &exact.0) > 1e-4,
            "bf16 forward equals f32's"
        );
        assert!(
            max_abs_diff(&bf16.2, &exact.2) > 1e-4,
            "bf16 dW equals f32's"
        );
        close(&bf16.0, &exact.0, 0.1);
        // Dropping the guard restores the exact products.
        let again = run(&x, &w);
        close(&again.0, &exact.0, 0.0);
        close(&again.2, &exact.2, 0.0);
    }

    #[test]
    fn fused_norm_weight_gradients_skip_frozen_operands() {
        let x = Var::from_tensor(&data(&[4, 16], 61)).unwrap();
        let w = data(&[16], 62);
        let b = data(&[16], 63);
        let y = layer_norm(x.as_tensor(), &w, &b, 1e-6).unwrap();
        let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(&x).is_some());
        assert!(
            g.get(&w).is_none() && g.get(&b).is_none(),
            "frozen w/b got gradients"
        );
        let y = rms_norm(x.as_tensor(), &w, 1e-6).unwrap();
        let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(&x).is_some() && g.get(&w).is_none());
        assert!(layer_norm(x.as_tensor(), &data(&[15], 64), &b, 1e-6).is_err());
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
