//! AdamW exactly as `torch.optim.AdamW` (torch 2.2, single-tensor CPU path) computes it, in
//! float32 (spec §7.3: lr 5e-4, betas (0.9, 0.999), eps 1e-8, weight decay 0.01, constant LR).
//!
//! Per parameter with a gradient, at its step `t` (1-based, counted per parameter):
//!
//! ```text
//! p.mul_(1 - lr*wd)                                    # decoupled weight decay
//! m.lerp_(g, 1 - b1)                                   # m + w (g - m), FMA as torch's vector path
//! v.mul_(b2).addcmul_(g, g, value=1 - b2)              # v*b2 + ((1-b2) g) g
//! denom = (v.sqrt() / sqrt(1 - b2^t)).add_(eps)
//! p.addcdiv_(m, denom, value=-lr / (1 - b1^t))         # p + ((-step) m) / denom
//! ```
//!
//! The Python-float scalars are computed in float64 and rounded to float32 once, as torch's
//! kernels do. Parameters without a gradient (not on the loss path) are skipped entirely, as
//! torch skips `grad is None`: no decay, no state.
//!
//! On the CPU the update runs in place on the parameter's storage (no copies). Other devices
//! round-trip through the host (exact, slower; a device kernel can replace it later).

use crate::error::{Result, TrainError};
use candle_core::{CpuStorage, DType, Layout, Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// AdamW hyper-parameters (torch defaults except lr and weight decay, which follow
/// `finetune.py`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// Learning rate (constant).
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 5e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// The float32 scalars of one update at step `t`.
#[derive(Debug, Clone, Copy)]
struct StepScalars {
    decay: f32,
    lerp_w: f32,
    beta2: f32,
    one_minus_beta2: f32,
    bc2_sqrt: f32,
    eps: f32,
    neg_step_size: f32,
}

impl StepScalars {
    fn new(c: &AdamWConfig, t: u64) -> Self {
        let t = t as f64;
        let bc1 = 1.0 - c.beta1.powf(t);
        let bc2 = 1.0 - c.beta2.powf(t);
        Self {
            decay: (1.0 - c.lr * c.weight_decay) as f32,
            lerp_w: (1.0 - c.beta1) as f32,
            beta2: c.beta2 as f32,
            one_minus_beta2: (1.0 - c.beta2) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            eps: c.eps as f32,
            neg_step_size: (-(c.lr / bc1)) as f32,
        }
    }
}

/// torch's vectorized `lerp` (`fmadd(coeff, end - start, base)`).
#[inline(always)]
fn lerp(start: f32, end: f32, w: f32) -> f32 {
    if w.abs() < 0.5 {
        w.mul_add(end - start, start)
    } else {
        (w - 1.0).mul_add(end - start, end)
    }
}

/// One AdamW update of float32 slices in torch's operation order, on the calling thread as
/// built (the host path of non-CPU devices): the in-place ops' [`moments`] and [`params`].
fn update_slices(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], s: &StepScalars) {
    moments(m, g, s, false);
    moments(v, g, s, true);
    params(p, m, v, s);
}

/// Optimizer state of one parameter.
#[derive(Debug, Clone)]
pub struct ParamState {
    /// First moment (`exp_avg`), float32, same shape as the parameter.
    pub exp_avg: Tensor,
    /// Second moment (`exp_avg_sq`).
    pub exp_avg_sq: Tensor,
    /// Number of updates this parameter received.
    pub step: u64,
}

/// AdamW over named float32 parameters.
#[derive(Debug, Clone)]
pub struct AdamW {
    /// Hyper-parameters.
    pub config: AdamWConfig,
    /// State by parameter name (absent until the parameter first gets a gradient).
    pub state: BTreeMap<String, ParamState>,
}

impl AdamW {
    /// A fresh optimizer.
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            state: BTreeMap::new(),
        }
    }

    /// Applies one update to every parameter of `params` that has a gradient in `grads`.
    /// Parameters must be float32 and contiguous; each gradient must match its shape.
    pub fn step(
        &mut self,
        params: &[(String, Var)],
        grads: &BTreeMap<String, Tensor>,
    ) -> Result<()> {
        for (name, var) in params {
            let Some(g) = grads.get(name) else { continue };
            self.step_one(name, var, g)?;
        }
        Ok(())
    }

    /// Updates one parameter with gradient `g`.
    pub fn step_one(&mut self, name: &str, var: &Var, g: &Tensor) -> Result<()> {
        if var.dtype() != DType::F32 {
            return Err(TrainError::Invalid(format!(
                "parameter {name} is {:?}; trainable weights are kept in float32",
                var.dtype()
            )));
        }
        if g.shape() != var.shape() {
            return Err(TrainError::Invalid(format!(
                "gradient of {name} has shape {:?} but the parameter has {:?}",
                g.shape(),
                var.shape()
            )));
        }
        if !var.is_contiguous() {
            return Err(TrainError::Invalid(format!(
                "parameter {name} is not contiguous"
            )));
        }
        let g = g.to_dtype(DType::F32)?.contiguous()?;
        let st = match self.state.get_mut(name) {
            Some(s) => s,
            None => {
                let z = || Tensor::zeros(var.shape(), DType::F32, var.device());
                self.state.insert(
                    name.to_string(),
                    ParamState {
                        exp_avg: z()?,
                        exp_avg_sq: z()?,
                        step: 0,
                    },
                );
                self.state.get_mut(name).ok_or_else(|| {
                    TrainError::Invalid(format!("optimizer state for {name} vanished"))
                })?
            }
        };
        st.step += 1;
        let s = StepScalars::new(&self.config, st.step);
        if var.device().is_cpu() {
            st.exp_avg
                .inplace_op2(&g, &MomentsOp { s, second: false })?;
            st.exp_avg_sq
                .inplace_op2(&g, &MomentsOp { s, second: true })?;
            var.as_tensor()
                .inplace_op3(&st.exp_avg, &st.exp_avg_sq, &ParamOp { s })?;
        } else {
            let dev = var.device().clone();
            let mut p: Vec<f32> = var.as_tensor().flatten_all()?.to_vec1()?;
            let mut m: Vec<f32> = st.exp_avg.flatten_all()?.to_vec1()?;
            let mut v: Vec<f32> = st.exp_avg_sq.flatten_all()?.to_vec1()?;
            let gv: Vec<f32> = g.flatten_all()?.to_vec1()?;
            update_slices(&mut p, &mut m, &mut v, &gv, &s);
            let shape = var.shape().clone();
            var.set(&Tensor::from_vec(p, shape.clone(), &dev)?)?;
            st.exp_avg = Tensor::from_vec(m, shape.clone(), &dev)?;
            st.exp_avg_sq = Tensor::from_vec(v, shape, &dev)?;
        }
        Ok(())
    }
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("adamw: {what} is not contiguous"),
    }
}

fn f32_slice_mut<'a>(
    s: &'a mut CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a mut [f32]> {
    let CpuStorage::F32(data) = s else {
        candle_core::bail!("adamw: {what} is not float32")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&mut data[a..b]),
        None => candle_core::bail!("adamw: {what} is not contiguous"),
    }
}

/// Elements per parallel task of the in-place updates (each element's arithmetic is the same
/// whatever the split, so the thread count does not change the bits).
const CHUNK: usize = 1 << 15;

/// `m = lerp(m, g, 1-b1)` (first moment) or `v = v*b2 + ((1-b2) g) g` (second), in place.
#[inline(always)]
fn moments(d: &mut [f32], g: &[f32], s: &StepScalars, second: bool) {
    if second {
        for (v, &gi) in d.iter_mut().zip(g) {
            *v = *v * s.beta2 + s.one_minus_beta2 * gi * gi;
        }
    } else {
        for (m, &gi) in d.iter_mut().zip(g) {
            *m = lerp(*m, gi, s.lerp_w);
        }
    }
}

/// `p = p·decay − lr/bc1 · m / (√v / √bc2 + eps)` from the updated moments, in place.
#[inline(always)]
fn params(p: &mut [f32], m: &[f32], v: &[f32], s: &StepScalars) {
    for i in 0..p.len() {
        let pi = p[i] * s.decay;
        let denom = v[i].sqrt() / s.bc2_sqrt + s.eps;
        p[i] = pi + s.neg_step_size * m[i] / denom;
    }
}

/// In-place moment update: `m = lerp(m, g, 1-b1)` or `v = v*b2 + ((1-b2) g) g`.
struct MomentsOp {
    s: StepScalars,
    second: bool,
}

impl candle_core::InplaceOp2 for MomentsOp {
    fn name(&self) -> &'static str {
        "adamw-moments"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        g: &CpuStorage,
        g_l: &Layout,
    ) -> candle_core::Result<()> {
        let g = f32_slice(g, g_l, "gradient")?;
        let d = f32_slice_mut(dst, dst_l, "moment")?;
        if d.len() != g.len() {
            candle_core::bail!("adamw: moment/gradient size mismatch")
        }
        let (s, second) = (self.s, self.second);
        d.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .for_each(|(d, g)| openvla_image::with_avx2_fma(|| moments(d, g, &s, second)));
        Ok(())
    }
}

/// In-place parameter update from the already updated moments.
struct ParamOp {
    s: StepScalars,
}

impl candle_core::InplaceOp3 for ParamOp {
    fn name(&self) -> &'static str {
        "adamw-param"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        m: &CpuStorage,
        m_l: &Layout,
        v: &CpuStorage,
        v_l: &Layout,
    ) -> candle_core::Result<()> {
        let m = f32_slice(m, m_l, "exp_avg")?;
        let v = f32_slice(v, v_l, "exp_avg_sq")?;
        let p = f32_slice_mut(dst, dst_l, "parameter")?;
        if p.len() != m.len() || p.len() != v.len() {
            candle_core::bail!("adamw: parameter/moment size mismatch")
        }
        let s = self.s;
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
            .for_each(|(p, (m, v))| openvla_image::with_avx2_fma(|| params(p, m, v, &s)));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn in_place_and_host_paths_agree() {
        // Several parallel chunks and a ragged tail; the in-place path runs the FMA build
        // where the CPU has it, the host path the portable one: the bits must agree.
        const N: usize = 3 * CHUNK + 37;
        let dev = Device::Cpu;
        let init: Vec<f32> = (0..N).map(|i| (i as f32 * 0.37).sin()).collect();
        let var = Var::from_vec(init.clone(), N, &dev).unwrap();
        let mut opt = AdamW::new(AdamWConfig::default());
        let mut p = init.clone();
        let mut m = vec![0f32; N];
        let mut v = vec![0f32; N];
        for t in 1..=5u64 {
            let g: Vec<f32> = (0..N)
                .map(|i| ((i as f32 + t as f32) * 1.3).cos())
                .collect();
            let gt = Tensor::from_vec(g.clone(), N, &dev).unwrap();
            opt.step_one("w", &var, &gt).unwrap();
            update_slices(
                &mut p,
                &mut m,
                &mut v,
                &g,
                &StepScalars::new(&opt.config, t),
            );
        }
        let got: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        assert_eq!(got, p);
        assert_eq!(opt.state["w"].step, 5);
    }

    #[test]
    fn missing_gradient_skips_parameter() {
        let dev = Device::Cpu;
        let var = Var::from_vec(vec![1f32, 2.0], 2, &dev).unwrap();
        let mut opt = AdamW::new(AdamWConfig::default());
        opt.step(&[("w".into(), var.clone())], &BTreeMap::new())
            .unwrap();
        assert_eq!(var.as_tensor().to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
        assert!(opt.state.is_empty());
    }
}
