//! Fused CPU float32 ops with hand-written backward passes (candle `CustomOp1/2/3::bwd`).
//!
//! candle 0.11.1's own fused kernels (`layer_norm`, `rms_norm`, `softmax_last_dim`, `rope`)
//! record no backward, so the trainer used to compose these ops from `mean`/`sqr`/`sqrt`/`exp`/
//! `narrow`/`cat`: a LayerNorm was about 10 graph nodes, each a fresh tensor in forward and two
//! more (a zero-filled gradient slot and the sum into it) in backward. Here each is one node:
//! one pass (or two) over the rows forward, one or two backward, and the backward's results
//! are plain tensors that record no graph of their own.
//!
//! All ops read contiguous float32 CPU tensors (the wrappers in [`super::ops`] make them so);
//! the training model runs on the CPU only. Row loops are split over rayon in fixed blocks of
//! rows, and the reductions over rows (weight and bias gradients) sum fixed blocks in order, so
//! results do not depend on the number of threads. No `mul_add`: the crate is built without a
//! target CPU, where it is a call to the software `fmaf`.

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Shape, Storage,
    Tensor,
};
use openvla::kernels::activation::{
    f32_contiguous, gelu_backward_slice, gelu_slice, silu_mul_backward_slice, silu_mul_slice,
};
use openvla::kernels::uninit_vec;
use rayon::prelude::*;
use std::borrow::Cow;

/// Rows per parallel task of the row-wise kernels (and per partial sum of the reductions).
const ROW_BLOCK: usize = 32;
/// Elements per parallel task of the element-wise kernels.
const ELEM_BLOCK: usize = 1 << 14;

/// `sqrt(2/pi)` (the tanh GELU's scale).
const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// Runs `f` on the float32 elements of `t` (made contiguous float32 first where needed).
pub(crate) fn with_f32<R>(
    t: &Tensor,
    op: &str,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let t = if t.dtype() == DType::F32 && t.is_contiguous() {
        t.clone()
    } else {
        t.to_dtype(DType::F32)?.contiguous()?
    };
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(c) => f(f32_contiguous(c, layout, op)?),
        _ => bail!("{op}: the fused training ops run on the CPU only"),
    }
}

/// A new float32 CPU tensor (records no op).
pub(crate) fn tensor(v: Vec<f32>, shape: &Shape) -> candle_core::Result<Tensor> {
    Tensor::from_vec(v, shape.clone(), &Device::Cpu)
}

/// Width of the last dimension and number of rows of `shape`.
fn rows_of(shape: &Shape, op: &str) -> candle_core::Result<(usize, usize)> {
    let d = *shape.dims().last().unwrap_or(&1);
    if d == 0 {
        bail!("{op}: the last dimension is empty")
    }
    Ok((shape.elem_count() / d, d))
}

/// `Σ a·b` with eight partial sums (vectorizes; a fixed summation order).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, ar) = a.split_at(a.len() - a.len() % 8);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

/// `Σ a` with eight partial sums.
#[inline]
fn sum(a: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, ar) = a.split_at(a.len() - a.len() % 8);
    for x in ac.chunks_exact(8) {
        for i in 0..8 {
            acc[i] += x[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for x in ar {
        s += x;
    }
    s
}

/// Sums the per-block partial vectors (each `width` long) in block order.
fn sum_partials(parts: Vec<Vec<f32>>, width: usize) -> Vec<f32> {
    let mut out = vec![0f32; width];
    for p in parts {
        for (o, v) in out.iter_mut().zip(p) {
            *o += v;
        }
    }
    out
}

/// A float32 matrix operand: pointer, row stride, column stride (elements).
type Operand = (*const f32, isize, isize);

thread_local! {
    /// Whether the linears' products on this thread run in bf16 arithmetic ([`BF16Matmuls`]).
    static BF16_MATMULS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// While alive, the training linears' products on this thread (forward `x·Wᵀ`, backward `g·W`
/// and `gᵀ·x`) run in bf16 arithmetic: both operands rounded to bf16 (to nearest even),
/// products summed in f32, as PyTorch's bf16 autocast computes them, on AMX or AVX512-BF16
/// where the CPU has them (`openvla::kernels::dispatch::bf16_path`). Weights, gradients,
/// optimizer state and every other op stay float32. Dropping it restores the exact float32
/// products. Thread-local, so concurrent trainers (tests) do not see each other's setting.
pub struct BF16Matmuls {
    previous: bool,
}

impl BF16Matmuls {
    /// Sets the arithmetic of this thread's linears until the guard is dropped.
    pub fn set(compute: openvla::kernels::ComputePrecision) -> BF16Matmuls {
        let on = compute == openvla::kernels::ComputePrecision::Bf16;
        BF16Matmuls {
            previous: BF16_MATMULS.with(|c| c.replace(on)),
        }
    }
}

impl Drop for BF16Matmuls {
    fn drop(&mut self) {
        BF16_MATMULS.with(|c| c.set(self.previous));
    }
}

/// The operand `o` as a row-major `[rows, cols]` matrix: itself where it is one, the kernels'
/// transpose where it is the transpose of one (the backward's `gᵀ`, `xᵀ` and `Wᵀ`), else copied
/// element by element (no [`LinearOp`] product passes such an operand).
///
/// # Safety
/// `o` must address `rows × cols` elements at its strides, alive for the result's lifetime.
unsafe fn as_rows<'a>(o: Operand, rows: usize, cols: usize) -> Cow<'a, [f32]> {
    if o.1 == cols as isize && o.2 == 1 {
        return std::slice::from_raw_parts(o.0, rows * cols).into();
    }
    // SAFETY: every element is written below before it is read.
    let mut out = unsafe { uninit_vec::<f32>(rows * cols) };
    if o.1 == 1 && o.2 >= rows as isize && rows > 0 && cols > 0 {
        // S [cols, rows] with row stride o.2, transposed.
        let ld = o.2 as usize;
        let src = std::slice::from_raw_parts(o.0, (cols - 1) * ld + rows);
        openvla::kernels::transpose::transpose(src, cols, rows, ld, &mut out);
    } else {
        for (i, v) in out.iter_mut().enumerate() {
            *v =
                *o.0.offset((i / cols) as isize * o.1 + (i % cols) as isize * o.2);
        }
    }
    out.into()
}

/// How a product's operands lie, as the kernels' packed GEMMs read them.
enum Operands<'a> {
    /// `lhs = xtᵀ` for a row-major `xt [k, m]` (row stride `ld`: the `gᵀ` of `dW = gᵀ·x`),
    /// `rhs` row-major `[k, n]`: both packed straight from their rows.
    TransposedLhs {
        xt: &'a [f32],
        ld: usize,
        w: &'a [f32],
    },
    /// `lhs` as rows `[m, k]`, `rhs` row-major `[k, n]`, depth-major (a linear's `W` in
    /// `dx = g·W`): packed straight from its rows, without a transposed copy.
    DepthMajor { x: Cow<'a, [f32]>, w: &'a [f32] },
    /// Both as rows: `x [m, k]` and weight rows `w [n, k]` (the forward's `x` and `W`).
    Rows {
        x: Cow<'a, [f32]>,
        w: Cow<'a, [f32]>,
    },
}

impl<'a> Operands<'a> {
    /// Classifies `lhs [m, k] · rhs [k, n]` (`k > 0`).
    ///
    /// # Safety
    /// The operands hold m×k and k×n elements at their strides, alive for `'a`.
    unsafe fn of(m: usize, n: usize, k: usize, lhs: Operand, rhs: Operand) -> Operands<'a> {
        let rhs_rows = rhs.1 == n as isize && rhs.2 == 1;
        if rhs_rows && lhs.1 == 1 && lhs.2 >= m as isize {
            let ld = lhs.2 as usize;
            Operands::TransposedLhs {
                xt: std::slice::from_raw_parts(lhs.0, (k - 1) * ld + m),
                ld,
                w: std::slice::from_raw_parts(rhs.0, k * n),
            }
        } else if rhs_rows {
            Operands::DepthMajor {
                x: as_rows(lhs, m, k),
                w: std::slice::from_raw_parts(rhs.0, k * n),
            }
        } else {
            Operands::Rows {
                x: as_rows(lhs, m, k),
                w: as_rows((rhs.0, rhs.2, rhs.1), n, k),
            }
        }
    }
}

/// [`gemm_f32`] on the kernels' packed GEMMs, every operand packed from where it lies (no
/// transposed copies): in bf16 arithmetic ([`BF16Matmuls`]; the kernels emulate it on the f32
/// GEMM where the CPU has no bf16 instruction) or on the f32 sgemm.
fn gemm_kernels(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    lhs: Operand,
    rhs: Operand,
    bf16: bool,
) {
    use openvla::kernels::{
        bf16_gemm as b, tiled_gemm_f32, tiled_gemm_f32_depth_major, tiled_gemm_f32_transposed_lhs,
    };
    let dst = &mut dst[..m * n];
    // SAFETY: the callers' operands hold m×k and k×n elements at their strides (k > 0).
    match (unsafe { Operands::of(m, n, k, lhs, rhs) }, bf16) {
        (Operands::TransposedLhs { xt, ld, w }, false) => {
            tiled_gemm_f32_transposed_lhs(xt, ld, w, dst, m, n, k)
        }
        (Operands::TransposedLhs { xt, ld, w }, true) => {
            b::tiled_gemm_bf16_transposed_lhs(xt, ld, w, dst, m, n, k)
        }
        (Operands::DepthMajor { x, w }, false) => tiled_gemm_f32_depth_major(&x, w, dst, m, n, k),
        (Operands::DepthMajor { x, w }, true) => {
            b::tiled_gemm_bf16_depth_major(&x, w, dst, m, n, k)
        }
        (Operands::Rows { x, w }, false) => tiled_gemm_f32(&x, &w, dst, m, n, k),
        (Operands::Rows { x, w }, true) => b::tiled_gemm_bf16(&x, dst, m, n, k, |j0, nb, t| {
            b::round_slice(&w[j0 * k..(j0 + nb) * k], t)
        }),
    }
}

/// `dst [m, n] = lhs [m, k] · rhs [k, n]` (strided operands), parallel on the rayon pool: on
/// the kernels' packed GEMMs ([`gemm_kernels`]) in bf16 arithmetic under [`BF16Matmuls`], or in
/// f32 on the packed sgemm (AVX-512F or AVX2+FMA, `openvla::kernels::dispatch::f32_gemm`) from
/// [`openvla::kernels::PACKED_MIN_COLS`] columns; both from [`openvla::kernels::GEMM_MIN_ROWS`]
/// rows. Else on the `gemm`
/// crate, candle's own CPU matmul path, without its graph node.
fn gemm_f32(m: usize, n: usize, k: usize, dst: &mut [f32], lhs: Operand, rhs: Operand) {
    assert!(dst.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        dst[..m * n].fill(0.0);
        return;
    }
    let bf16 = BF16_MATMULS.with(|c| c.get());
    let packed_f32 = n >= openvla::kernels::PACKED_MIN_COLS
        && openvla::kernels::dispatch::f32_gemm() != openvla::kernels::dispatch::GemmPath::Portable;
    if m >= openvla::kernels::GEMM_MIN_ROWS && (bf16 || packed_f32) {
        gemm_kernels(m, n, k, dst, lhs, rhs, bf16);
        return;
    }
    let threads = rayon::current_num_threads();
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the callers pass operands whose strides stay inside their slices for m×k and
    // k×n elements; dst holds m×n contiguous elements written by this call alone.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.0,
            lhs.2,
            lhs.1,
            rhs.0,
            rhs.2,
            rhs.1,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            par,
        )
    }
}

/// LayerNorm over the last dimension (biased variance, as torch) with weight and bias:
/// `apply_op3(x, w, b)`. Backward gives `dx`, and `dw`/`db` where those track gradients.
#[derive(Debug, Clone, Copy)]
pub struct LayerNormOp {
    /// Added to the variance.
    pub eps: f32,
}

/// Mean and `1/sqrt(var + eps)` of one row.
#[inline]
fn ln_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = sum(x) / n;
    let mut acc = [0f32; 8];
    let (xc, xr) = x.split_at(x.len() - x.len() % 8);
    for c in xc.chunks_exact(8) {
        for i in 0..8 {
            let d = c[i] - mean;
            acc[i] += d * d;
        }
    }
    let mut ss = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for v in xr {
        let d = v - mean;
        ss += d * d;
    }
    (mean, 1.0 / (ss / n + eps).sqrt())
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
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
        let x = f32_contiguous(s1, l1, self.name())?;
        let w = f32_contiguous(s2, l2, self.name())?;
        let b = f32_contiguous(s3, l3, self.name())?;
        let (_, d) = rows_of(l1.shape(), self.name())?;
        if w.len() != d || b.len() != d {
            bail!(
                "layer norm: weight {} / bias {} elements for rows of {d}",
                w.len(),
                b.len()
            )
        }
        // SAFETY: every element is written below before it is read.
        let mut y = unsafe { uninit_vec::<f32>(x.len()) };
        y.par_chunks_mut(d * ROW_BLOCK)
            .zip(x.par_chunks(d * ROW_BLOCK))
            .for_each(|(yb, xb)| {
                for (yr, xr) in yb.chunks_exact_mut(d).zip(xb.chunks_exact(d)) {
                    let (mean, rstd) = ln_stats(xr, self.eps);
                    for i in 0..d {
                        yr[i] = (xr[i] - mean) * rstd * w[i] + b[i];
                    }
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let name = self.name();
        let shape = x.shape().clone();
        let (_, d) = rows_of(&shape, name)?;
        let (want_x, want_w, want_b) = (x.track_op(), w.track_op(), b.track_op());
        let eps = self.eps;
        let (dx, dw, db) = with_f32(x, name, |x| {
            with_f32(w, name, |w| {
                with_f32(grad, name, |g| {
                    // SAFETY: every element is written below before it is read.
                    let mut dx = unsafe { uninit_vec::<f32>(if want_x { x.len() } else { 0 }) };
                    let want_wb = want_w || want_b;
                    // One task per block of rows: dx rows, and partial [dw | db] of the block.
                    let task = |xb: &[f32], gb: &[f32], dxb: Option<&mut [f32]>| -> Vec<f32> {
                        let mut part = vec![0f32; if want_wb { 2 * d } else { 0 }];
                        let mut dxb = dxb;
                        for (r, (xr, gr)) in xb.chunks_exact(d).zip(gb.chunks_exact(d)).enumerate()
                        {
                            let (mean, rstd) = ln_stats(xr, eps);
                            if want_wb {
                                let (pw, pb) = part.split_at_mut(d);
                                for i in 0..d {
                                    pw[i] += (xr[i] - mean) * rstd * gr[i];
                                    pb[i] += gr[i];
                                }
                            }
                            if let Some(dxb) = dxb.as_deref_mut() {
                                // dx = rstd (gw - mean(gw) - xhat mean(gw xhat))
                                let mut s1 = 0f32;
                                let mut s2 = 0f32;
                                for i in 0..d {
                                    let gw = gr[i] * w[i];
                                    s1 += gw;
                                    s2 += gw * ((xr[i] - mean) * rstd);
                                }
                                let (m1, m2) = (s1 / d as f32, s2 / d as f32);
                                let dr = &mut dxb[r * d..(r + 1) * d];
                                for i in 0..d {
                                    let xh = (xr[i] - mean) * rstd;
                                    dr[i] = rstd * (gr[i] * w[i] - m1 - xh * m2);
                                }
                            }
                        }
                        part
                    };
                    let parts: Vec<Vec<f32>> = if want_x {
                        dx.par_chunks_mut(d * ROW_BLOCK)
                            .zip(x.par_chunks(d * ROW_BLOCK).zip(g.par_chunks(d * ROW_BLOCK)))
                            .map(|(dxb, (xb, gb))| task(xb, gb, Some(dxb)))
                            .collect()
                    } else {
                        x.par_chunks(d * ROW_BLOCK)
                            .zip(g.par_chunks(d * ROW_BLOCK))
                            .map(|(xb, gb)| task(xb, gb, None))
                            .collect()
                    };
                    let wb = if want_wb {
                        sum_partials(parts, 2 * d)
                    } else {
                        Vec::new()
                    };
                    Ok((dx, wb))
                })
            })
        })
        .map(|(dx, wb)| {
            let (dw, db) = if wb.is_empty() {
                (Vec::new(), Vec::new())
            } else {
                (wb[..d].to_vec(), wb[d..].to_vec())
            };
            (dx, dw, db)
        })?;
        let dshape = Shape::from(d);
        Ok((
            if want_x {
                Some(tensor(dx, &shape)?)
            } else {
                None
            },
            if want_w {
                Some(tensor(dw, &dshape)?.to_dtype(w.dtype())?)
            } else {
                None
            },
            if want_b {
                Some(tensor(db, &dshape)?.to_dtype(b.dtype())?)
            } else {
                None
            },
        ))
    }
}

/// Llama RMSNorm `w · x / sqrt(mean(x²) + eps)` over the last dimension: `apply_op2(x, w)`.
#[derive(Debug, Clone, Copy)]
pub struct RmsNormOp {
    /// Added to the mean square.
    pub eps: f32,
}

#[inline]
fn rms_rstd(x: &[f32], eps: f32) -> f32 {
    1.0 / (dot(x, x) / x.len() as f32 + eps).sqrt()
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_contiguous(s1, l1, self.name())?;
        let w = f32_contiguous(s2, l2, self.name())?;
        let (_, d) = rows_of(l1.shape(), self.name())?;
        if w.len() != d {
            bail!("rms norm: weight of {} elements for rows of {d}", w.len())
        }
        // SAFETY: every element is written below before it is read.
        let mut y = unsafe { uninit_vec::<f32>(x.len()) };
        y.par_chunks_mut(d * ROW_BLOCK)
            .zip(x.par_chunks(d * ROW_BLOCK))
            .for_each(|(yb, xb)| {
                for (yr, xr) in yb.chunks_exact_mut(d).zip(xb.chunks_exact(d)) {
                    let rstd = rms_rstd(xr, self.eps);
                    for i in 0..d {
                        yr[i] = xr[i] * rstd * w[i];
                    }
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let name = self.name();
        let shape = x.shape().clone();
        let (_, d) = rows_of(&shape, name)?;
        let (want_x, want_w) = (x.track_op(), w.track_op());
        let eps = self.eps;
        let (dx, dw) = with_f32(x, name, |x| {
            with_f32(w, name, |w| {
                with_f32(grad, name, |g| {
                    // SAFETY: every element is written below before it is read.
                    let mut dx = unsafe { uninit_vec::<f32>(if want_x { x.len() } else { 0 }) };
                    let task = |xb: &[f32], gb: &[f32], dxb: Option<&mut [f32]>| -> Vec<f32> {
                        let mut pw = vec![0f32; if want_w { d } else { 0 }];
                        let mut dxb = dxb;
                        for (r, (xr, gr)) in xb.chunks_exact(d).zip(gb.chunks_exact(d)).enumerate()
                        {
                            let rstd = rms_rstd(xr, eps);
                            if want_w {
                                for i in 0..d {
                                    pw[i] += xr[i] * rstd * gr[i];
                                }
                            }
                            if let Some(dxb) = dxb.as_deref_mut() {
                                // dx = rstd (g w - xhat mean(g w xhat)), xhat = x rstd
                                let mut s = 0f32;
                                for i in 0..d {
                                    s += gr[i] * w[i] * xr[i];
                                }
                                let m = s * rstd * rstd / d as f32;
                                let dr = &mut dxb[r * d..(r + 1) * d];
                                for i in 0..d {
                                    dr[i] = rstd * (gr[i] * w[i] - xr[i] * m);
                                }
                            }
                        }
                        pw
                    };
                    let parts: Vec<Vec<f32>> = if want_x {
                        dx.par_chunks_mut(d * ROW_BLOCK)
                            .zip(x.par_chunks(d * ROW_BLOCK).zip(g.par_chunks(d * ROW_BLOCK)))
                            .map(|(dxb, (xb, gb))| task(xb, gb, Some(dxb)))
                            .collect()
                    } else {
                        x.par_chunks(d * ROW_BLOCK)
                            .zip(g.par_chunks(d * ROW_BLOCK))
                            .map(|(xb, gb)| task(xb, gb, None))
                            .collect()
                    };
                    let dw = if want_w {
                        sum_partials(parts, d)
                    } else {
                        Vec::new()
                    };
                    Ok((dx, dw))
                })
            })
        })?;
        Ok((
            if want_x {
                Some(tensor(dx, &shape)?)
            } else {
                None
            },
            if want_w {
                Some(tensor(dw, &Shape::from(d))?.to_dtype(w.dtype())?)
            } else {
                None
            },
        ))
    }
}

/// Which GELU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GeluKind {
    /// `x/2 · (1 + erf(x/√2))` (torch `nn.GELU()`, candle `gelu_erf`).
    Erf,
    /// `x/2 · (1 + tanh(√(2/π)(x + 0.044715 x³)))` (torch `approximate="tanh"`, candle `gelu`).
    Tanh,
}

/// Element-wise GELU with its analytic backward: `apply_op1(x)`.
#[derive(Debug, Clone, Copy)]
pub struct GeluOp {
    /// Which form.
    pub kind: GeluKind,
}

/// `gelu(x)` (tanh form), as candle computes it.
#[inline]
fn gelu_tanh(x: f32) -> f32 {
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + 0.044715 * x * x)).tanh())
}

/// `gelu'(x)` (tanh form).
#[inline]
fn gelu_tanh_grad(x: f32) -> f32 {
    let t = (SQRT_2_OVER_PI * x * (1.0 + 0.044715 * x * x)).tanh();
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x)
}

impl CustomOp1 for GeluOp {
    fn name(&self) -> &'static str {
        "fused-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_contiguous(s, l, self.name())?;
        // SAFETY: every element is written below before it is read.
        let mut y = unsafe { uninit_vec::<f32>(x.len()) };
        y.par_chunks_mut(ELEM_BLOCK)
            .zip(x.par_chunks(ELEM_BLOCK))
            .for_each(|(y, x)| match self.kind {
                GeluKind::Erf => gelu_slice(x, y),
                GeluKind::Tanh => {
                    for (y, &x) in y.iter_mut().zip(x) {
                        *y = gelu_tanh(x);
                    }
                }
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let name = self.name();
        let kind = self.kind;
        let dx = with_f32(x, name, |x| {
            with_f32(grad, name, |g| {
                // SAFETY: every element is written below before it is read.
                let mut dx = unsafe { uninit_vec::<f32>(x.len()) };
                dx.par_chunks_mut(ELEM_BLOCK)
                    .zip(x.par_chunks(ELEM_BLOCK).zip(g.par_chunks(ELEM_BLOCK)))
                    .for_each(|(d, (x, g))| match kind {
                        GeluKind::Erf => gelu_backward_slice(x, g, d),
                        GeluKind::Tanh => {
                            for ((d, &x), &g) in d.iter_mut().zip(x).zip(g) {
                                *d = g * gelu_tanh_grad(x);
                            }
                        }
                    });
                Ok(dx)
            })
        })?;
        Ok(Some(tensor(dx, x.shape())?))
    }
}

/// `silu(gate) · up` (Llama's SwiGLU product) with its backward: `apply_op2(gate, up)`.
#[derive(Debug, Clone, Copy)]
pub struct SiluMulOp;

impl CustomOp2 for SiluMulOp {
    fn name(&self) -> &'static str {
        "fused-silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = f32_contiguous(s1, l1, self.name())?;
        let u = f32_contiguous(s2, l2, self.name())?;
        if l1.shape() != l2.shape() {
            bail!(
                "silu-mul: gate {:?} and up {:?} differ",
                l1.shape(),
                l2.shape()
            )
        }
        // SAFETY: every element is written below before it is read.
        let mut y = unsafe { uninit_vec::<f32>(g.len()) };
        y.par_chunks_mut(ELEM_BLOCK)
            .zip(g.par_chunks(ELEM_BLOCK).zip(u.par_chunks(ELEM_BLOCK)))
            .for_each(|(y, (g, u))| silu_mul_slice(g, u, y));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let name = self.name();
        let (want_g, want_u) = (gate.track_op(), up.track_op());
        let (dg, du) = with_f32(gate, name, |a| {
            with_f32(up, name, |u| {
                with_f32(grad, name, |g| {
                    // SAFETY: every element is written below before it is read.
                    let mut dg = unsafe { uninit_vec::<f32>(a.len()) };
                    // SAFETY: every element is written below before it is read.
                    let mut du = unsafe { uninit_vec::<f32>(a.len()) };
                    dg.par_chunks_mut(ELEM_BLOCK)
                        .zip(du.par_chunks_mut(ELEM_BLOCK))
                        .zip(
                            a.par_chunks(ELEM_BLOCK)
                                .zip(u.par_chunks(ELEM_BLOCK).zip(g.par_chunks(ELEM_BLOCK))),
                        )
                        .for_each(|((dg, du), (a, (u, g)))| {
                            silu_mul_backward_slice(a, u, g, dg, du)
                        });
                    Ok((dg, du))
                })
            })
        })?;
        Ok((
            if want_g {
                Some(tensor(dg, gate.shape())?)
            } else {
                None
            },
            if want_u {
                Some(tensor(du, up.shape())?)
            } else {
                None
            },
        ))
    }
}

/// Half-rotation rotary embedding `x cos + rotate_half(x) sin` for `x [.., T, hd]` and tables
/// `[T, hd]` (constants: no gradient): `apply_op3(x, cos, sin)`.
#[derive(Debug, Clone, Copy)]
pub struct RopeOp;

/// `y = x c + rotate_half(x) s` (forward), or with `inverse` the transpose
/// `y = x c + rotate_halfᵀ(x s)` (backward) over rows of `hd` at positions `row % t`.
fn rope_rows(x: &[f32], cos: &[f32], sin: &[f32], hd: usize, t: usize, inverse: bool) -> Vec<f32> {
    let half = hd / 2;
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(hd * ROW_BLOCK)
        .zip(x.par_chunks(hd * ROW_BLOCK))
        .enumerate()
        .for_each(|(blk, (yb, xb))| {
            for (r, (yr, xr)) in yb.chunks_exact_mut(hd).zip(xb.chunks_exact(hd)).enumerate() {
                let pos = (blk * ROW_BLOCK + r) % t;
                let c = &cos[pos * hd..(pos + 1) * hd];
                let s = &sin[pos * hd..(pos + 1) * hd];
                if inverse {
                    for i in 0..half {
                        yr[i] = xr[i] * c[i] + xr[i + half] * s[i + half];
                        yr[i + half] = xr[i + half] * c[i + half] - xr[i] * s[i];
                    }
                } else {
                    for i in 0..half {
                        yr[i] = xr[i] * c[i] - xr[i + half] * s[i];
                        yr[i + half] = xr[i + half] * c[i + half] + xr[i] * s[i + half];
                    }
                }
            }
        });
    y
}

/// Checks `x [.., T, hd]` against tables `[T, hd]`; returns `(T, hd)`.
fn rope_dims(x: &Shape, cos: &Shape, sin: &Shape) -> candle_core::Result<(usize, usize)> {
    let dims = x.dims();
    if dims.len() < 2 || cos != sin || cos.dims().len() != 2 {
        bail!("rope: x {x:?} with tables {cos:?} / {sin:?}: expected x [.., T, hd], tables [T, hd]")
    }
    let (t, hd) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    if cos.dims() != [t, hd] || hd % 2 != 0 {
        bail!(
            "rope: x {x:?} with tables {cos:?}: expected tables [{t}, {hd}] and an even head size"
        )
    }
    Ok((t, hd))
}

impl CustomOp3 for RopeOp {
    fn name(&self) -> &'static str {
        "fused-rope"
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
        let (t, hd) = rope_dims(l1.shape(), l2.shape(), l3.shape())?;
        let x = f32_contiguous(s1, l1, self.name())?;
        let cos = f32_contiguous(s2, l2, self.name())?;
        let sin = f32_contiguous(s3, l3, self.name())?;
        Ok((
            CpuStorage::F32(rope_rows(x, cos, sin, hd, t, false)),
            l1.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let name = self.name();
        let (t, hd) = rope_dims(x.shape(), cos.shape(), sin.shape())?;
        let dx = with_f32(grad, name, |g| {
            with_f32(cos, name, |c| {
                with_f32(sin, name, |s| Ok(rope_rows(g, c, s, hd, t, true)))
            })
        })?;
        Ok((Some(tensor(dx, x.shape())?), None, None))
    }
}

/// `y = x Wᵀ (+ b)` for `x [.., k]` (as `m` rows; no reshape nodes in the graph), `W [n, k]`
/// (float32, or a frozen bf16/f16 weight widened for the call) and `b [n]`, through the `gemm`
/// crate as candle's matmul (the packed sgemm of `openvla-kernels` with the transposes the
/// backward needs measured 0.8-0.87x of it on the small-policy shapes): `apply_op2(x, w)` without a
/// bias, `apply_op3(x, w, b)` with one.
///
/// Backward gives `dx = g W`, `dW = gᵀ x` and `db = Σ_rows g`, each only where that operand
/// tracks gradients: a frozen weight costs no weight-sized product or gradient (as
/// [`super::ops::FrozenMatmul`]), and the input of the first layer none either.
#[derive(Debug, Clone, Copy)]
pub struct LinearOp;

/// The forward of [`LinearOp`].
pub(crate) fn linear_fwd(
    x: (&CpuStorage, &Layout),
    w: (&CpuStorage, &Layout),
    b: Option<(&CpuStorage, &Layout)>,
) -> candle_core::Result<(CpuStorage, Shape)> {
    const NAME: &str = "fused-linear";
    let xs = f32_contiguous(x.0, x.1, NAME)?;
    let (m, k) = rows_of(x.1.shape(), NAME)?;
    let (n, kw) = w.1.shape().dims2()?;
    if kw != k {
        bail!("linear: x [{m}, {k}] against weight [{n}, {kw}]")
    }
    let Some((a, e)) = w.1.contiguous_offsets() else {
        bail!("linear: the weight must be contiguous")
    };
    // Half-precision (frozen) weights are widened for this call only, so that every dtype
    // takes the same product (bf16 storage of a bf16 checkpoint gives float32's logits).
    let widened: Vec<f32>;
    let wv: &[f32] = match w.0 {
        CpuStorage::F32(v) => &v[a..e],
        CpuStorage::BF16(v) => {
            widened = v[a..e].iter().map(|x| x.to_f32()).collect();
            &widened
        }
        CpuStorage::F16(v) => {
            widened = v[a..e].iter().map(|x| x.to_f32()).collect();
            &widened
        }
        _ => bail!("linear: the weight must be float32, bf16 or f16"),
    };
    // SAFETY: every element is written below before it is read.
    let mut y = unsafe { uninit_vec::<f32>(m * n) };
    // y = x · Wᵀ: Wᵀ [k, n] read in place (row stride 1, column stride k).
    gemm_f32(
        m,
        n,
        k,
        &mut y,
        (xs.as_ptr(), k as isize, 1),
        (wv.as_ptr(), 1, k as isize),
    );
    if let Some((bs, bl)) = b {
        let bias = f32_contiguous(bs, bl, NAME)?;
        if bias.len() != n {
            bail!("linear: bias of {} elements for {n} outputs", bias.len())
        }
        y.par_chunks_mut(n * ROW_BLOCK).for_each(|yb| {
            for yr in yb.chunks_exact_mut(n) {
                for (y, b) in yr.iter_mut().zip(bias) {
                    *y += b;
                }
            }
        });
    }
    let mut dims = x.1.shape().dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    Ok((CpuStorage::F32(y), Shape::from(dims)))
}

/// The backward of [`LinearOp`]: `(dx, dW, db)` where wanted.
pub(crate) fn linear_bwd(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    want_b: bool,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    const NAME: &str = "fused-linear";
    let (m, k) = rows_of(x.shape(), NAME)?;
    let (n, _) = w.dims2()?;
    let dx = if x.track_op() {
        // dx [m, k] = g [m, n] · W [n, k]
        let dx = with_f32(grad, NAME, |g| {
            with_f32(w, NAME, |wv| {
                // SAFETY: every element is written below before it is read.
                let mut dx = unsafe { uninit_vec::<f32>(m * k) };
                gemm_f32(
                    m,
                    k,
                    n,
                    &mut dx,
                    (g.as_ptr(), n as isize, 1),
                    (wv.as_ptr(), k as isize, 1),
                );
                Ok(dx)
            })
        })?;
        Some(tensor(dx, x.shape())?)
    } else {
        None
    };
    let dw = if w.track_op() {
        // dW [n, k] = gᵀ [n, m] · x [m, k], gᵀ read in place.
        let dw = with_f32(grad, NAME, |g| {
            with_f32(x, NAME, |xs| {
                // SAFETY: every element is written below before it is read.
                let mut dw = unsafe { uninit_vec::<f32>(n * k) };
                gemm_f32(
                    n,
                    k,
                    m,
                    &mut dw,
                    (g.as_ptr(), 1, n as isize),
                    (xs.as_ptr(), k as isize, 1),
                );
                Ok(dw)
            })
        })?;
        Some(tensor(dw, w.shape())?.to_dtype(w.dtype())?)
    } else {
        None
    };
    let db = if want_b {
        let db = with_f32(grad, NAME, |g| {
            let parts: Vec<Vec<f32>> = g
                .par_chunks(n * ROW_BLOCK)
                .map(|gb| {
                    let mut p = vec![0f32; n];
                    for gr in gb.chunks_exact(n) {
                        for (p, g) in p.iter_mut().zip(gr) {
                            *p += g;
                        }
                    }
                    p
                })
                .collect();
            Ok(sum_partials(parts, n))
        })?;
        Some(tensor(db, &Shape::from(n))?)
    } else {
        None
    };
    Ok((dx, dw, db))
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        linear_fwd((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = linear_bwd(x, w, grad, false)?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "fused-linear-bias"
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
        linear_fwd((s1, l1), (s2, l2), Some((s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        linear_bwd(x, w, grad, b.track_op())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The three operand layouts `as_rows` reads: row-major (borrowed, not copied), the transpose
    /// of a row-major matrix with a wider row stride, and any other strides.
    #[test]
    fn as_rows_reads_every_layout_row_major() {
        let (rows, cols) = (5usize, 3usize);
        let want: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        // SAFETY (all three): the operands address rows × cols elements of their buffers.
        let same = unsafe { as_rows((want.as_ptr(), cols as isize, 1), rows, cols) };
        assert!(matches!(same, std::borrow::Cow::Borrowed(_)));
        assert_eq!(&*same, &want[..]);
        // S [cols, ld = 7] holding the transpose in its first `rows` columns.
        let ld = 7usize;
        let mut s = vec![f32::NAN; cols * ld];
        for r in 0..rows {
            for c in 0..cols {
                s[c * ld + r] = want[r * cols + c];
            }
        }
        let t = unsafe { as_rows((s.as_ptr(), 1, ld as isize), rows, cols) };
        assert_eq!(&*t, &want[..]);
        // Every other element of a row-major buffer twice as wide.
        let mut wide = vec![f32::NAN; rows * cols * 2];
        for (i, v) in want.iter().enumerate() {
            wide[2 * i] = *v;
        }
        let g = unsafe { as_rows((wide.as_ptr(), 2 * cols as isize, 2), rows, cols) };
        assert_eq!(&*g, &want[..]);
    }
}
