//! `y = x · Wᵀ` with `x` in f32 and `W` stored in bf16 or f16, accumulated in f32.
//!
//! candle's CPU backend widens a bf16 weight to f32 on every call and then multiplies, which runs
//! at about 1 GFLOP/s for decode-shaped products. These kernels keep the weights in 16 bits (half
//! the memory of f32, so the 7B fits in 24 GiB) and widen them as they go:
//! - few rows (decode): fused widen + FMA dot products (AVX-512F or AVX2+F16C when present);
//! - many rows (prefill): each tile of weight rows is widened into a small f32 buffer and
//!   multiplied with the `gemm` crate ([`super::tiled_gemm`]).
//!
//! Widening bf16 or f16 to f32 is exact, so the result equals an f32 matmul over the upcast
//! weights up to summation order: the reference's float32 function at 16-bit memory cost.

use super::{for_each_tile, has_avx2, tiled_gemm, DOT_TILE_ROWS, GEMM_MIN_ROWS};
use crate::ComputePrecision;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape};
use half::{bf16, f16};

/// The storage format of a 16-bit weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    /// bfloat16 (the top 16 bits of an f32).
    Bf16,
    /// IEEE binary16.
    F16,
}

/// The candle op: `x [m, k] f32` times `w [n, k]` in bf16 or f16, giving `[m, n] f32`.
///
/// With `rowwise`, every output row is computed by the same dot-product kernel whatever the
/// number of rows, so a row's result does not depend on what else is in the batch.
///
/// With [`ComputePrecision::Bf16`], the many-row path computes in bf16 arithmetic
/// ([`crate::bf16_gemm`]; bf16 weights are used as stored, f16 ones rounded to bf16).
pub struct HalfMatmul {
    /// Force the row-independent dot-product path.
    pub rowwise: bool,
    /// The arithmetic of the many-row path.
    pub compute: ComputePrecision,
}

impl CustomOp2 for HalfMatmul {
    fn name(&self) -> &'static str {
        "half-weight-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("half-weight-matmul: inner dims differ ({k} vs {k2})");
        }
        let Some((xs, xe)) = l1.contiguous_offsets() else {
            candle_core::bail!("half-weight-matmul: activations must be contiguous")
        };
        let Some((ws, we)) = l2.contiguous_offsets() else {
            candle_core::bail!("half-weight-matmul: weights must be contiguous")
        };
        let CpuStorage::F32(x) = s1 else {
            candle_core::bail!("half-weight-matmul expects f32 activations")
        };
        let (bits, kind): (&[u16], Half) = match s2 {
            CpuStorage::BF16(w) => (bytemuck::cast_slice(&w[ws..we]), Half::Bf16),
            CpuStorage::F16(w) => (bytemuck::cast_slice(&w[ws..we]), Half::F16),
            _ => candle_core::bail!("half-weight-matmul expects bf16 or f16 weights"),
        };
        let mut y = vec![0f32; m * n];
        let x = &x[xs..xe];
        if self.compute == ComputePrecision::Bf16 && !self.rowwise && m >= GEMM_MIN_ROWS {
            assert_eq!(bits.len(), n * k);
            match kind {
                Half::Bf16 => crate::bf16_gemm::tiled_gemm_bf16_bits(x, bits, &mut y, m, n, k),
                Half::F16 => crate::bf16_gemm::tiled_gemm_bf16(x, &mut y, m, n, k, |j0, nb, t| {
                    let src = &bits[j0 * k..(j0 + nb) * k];
                    let mut wide = vec![0f32; src.len()];
                    widen(src, kind, &mut wide);
                    crate::bf16_gemm::round_slice(&wide, t)
                }),
            }
        } else {
            matmul(x, bits, kind, &mut y, m, n, k, self.rowwise);
        }
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }
}

/// `y[m, n] = x[m, k] · w[n, k]ᵀ` for 16-bit weights given as raw bits (row-major,
/// contiguous). `rowwise` forces the dot-product path for any `m`.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    x: &[f32],
    w: &[u16],
    kind: Half,
    y: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    rowwise: bool,
) {
    assert_eq!(x.len(), m * k);
    assert_eq!(w.len(), n * k);
    assert_eq!(y.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        y.fill(0.0);
        return;
    }
    if rowwise || m < GEMM_MIN_ROWS {
        #[cfg(target_arch = "x86_64")]
        if kind == Half::Bf16 && has_avx2() && !crate::has_avx512() {
            // Activations with even and odd elements of every 16 split, to meet bf16 weights
            // widened without shuffles (see `dot_bf16_avx2_split`).
            let xs: Vec<f32> = x.chunks(k).flat_map(split_even_odd).collect();
            for_each_tile(m, n, DOT_TILE_ROWS, y, |j0, nb, out| {
                for j in 0..nb {
                    let wj = &w[(j0 + j) * k..(j0 + j + 1) * k];
                    for i in 0..m {
                        // SAFETY: the CPU supports AVX2 and FMA (checked above).
                        out[i * nb + j] =
                            unsafe { dot_bf16_avx2_split(wj, &xs[i * k..(i + 1) * k]) };
                    }
                }
            });
            return;
        }
        for_each_tile(m, n, DOT_TILE_ROWS, y, |j0, nb, out| {
            for j in 0..nb {
                let wj = &w[(j0 + j) * k..(j0 + j + 1) * k];
                for i in 0..m {
                    out[i * nb + j] = dot(wj, &x[i * k..(i + 1) * k], kind);
                }
            }
        });
    } else {
        tiled_gemm(x, y, m, n, k, |j0, nb, buf| {
            widen(&w[j0 * k..(j0 + nb) * k], kind, buf)
        });
    }
}

/// Widens 16-bit values to f32.
pub fn widen(src: &[u16], kind: Half, dst: &mut [f32]) {
    match kind {
        Half::Bf16 => {
            for (d, &b) in dst.iter_mut().zip(src) {
                *d = f32::from_bits((b as u32) << 16);
            }
        }
        Half::F16 => {
            use half::slice::HalfFloatSliceExt;
            let src: &[f16] = bytemuck::cast_slice(src);
            src.convert_to_f32_slice(&mut dst[..src.len()]);
        }
    }
}

/// Dot product of 16-bit weights with f32 values, accumulated in f32.
pub fn dot(w: &[u16], x: &[f32], kind: Half) -> f32 {
    debug_assert_eq!(w.len(), x.len());
    #[cfg(target_arch = "x86_64")]
    {
        if kind == Half::Bf16 && crate::has_avx512() {
            // SAFETY: the CPU supports AVX-512F (checked above).
            return unsafe { dot_bf16_avx512(w, x) };
        }
        if has_avx2() {
            // SAFETY: the CPU supports AVX2, FMA and F16C (checked by has_avx2).
            return unsafe {
                match kind {
                    Half::Bf16 => dot_bf16_avx2(w, x),
                    Half::F16 => dot_f16_avx2(w, x),
                }
            };
        }
    }
    dot_portable(w, x, kind)
}

fn to_f32(b: u16, kind: Half) -> f32 {
    match kind {
        Half::Bf16 => f32::from_bits((b as u32) << 16),
        Half::F16 => f16::from_bits(b).to_f32(),
    }
}

/// Portable fallback with eight independent accumulators.
pub fn dot_portable(w: &[u16], x: &[f32], kind: Half) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = w.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += to_f32(w[c * 8 + l], kind) * x[c * 8 + l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..w.len() {
        s += to_f32(w[i], kind) * x[i];
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_bf16_avx512(w: &[u16], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = w.len();
    let mut acc0 = _mm512_setzero_ps();
    let mut acc1 = _mm512_setzero_ps();
    let mut i = 0;
    while i + 32 <= n {
        let wb = _mm512_loadu_si512(w.as_ptr().add(i) as *const __m512i);
        let lo = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(wb));
        let hi = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64::<1>(wb));
        let wlo = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(lo));
        let whi = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(hi));
        acc0 = _mm512_fmadd_ps(wlo, _mm512_loadu_ps(x.as_ptr().add(i)), acc0);
        acc1 = _mm512_fmadd_ps(whi, _mm512_loadu_ps(x.as_ptr().add(i + 16)), acc1);
        i += 32;
    }
    let mut s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
    while i < n {
        s += to_f32(*w.get_unchecked(i), Half::Bf16) * *x.get_unchecked(i);
        i += 1;
    }
    s
}

/// Horizontal sum of eight lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn hsum256(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// How far ahead (in 16-bit weights, 16 KiB) the decode dot products prefetch: a weight row's
/// successors follow it in memory, and the hardware prefetcher alone leaves some bandwidth
/// unused (`benches/kernels.rs`).
const PREFETCH_HALVES: usize = 8192;

/// Reorders every full chunk of 16 values as `[x0, x2, .., x14, x1, x3, .., x15]` (the tail is
/// kept as is).
fn split_even_odd(x: &[f32]) -> Vec<f32> {
    let mut out = x.to_vec();
    for (dst, src) in out.chunks_exact_mut(16).zip(x.chunks_exact(16)) {
        for l in 0..8 {
            dst[l] = src[2 * l];
            dst[8 + l] = src[2 * l + 1];
        }
    }
    out
}

/// bf16 dot product against activations reordered by [`split_even_odd`]: a 256-bit load of 16
/// bf16 values is 8 f32 lanes each holding two of them, so a shift left by 16 gives the even
/// elements as f32 and a mask the odd ones, with no cross-lane widening.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_bf16_avx2_split(w: &[u16], xs: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = w.len().min(xs.len());
    let mask = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        _mm_prefetch::<_MM_HINT_T0>(w.as_ptr().wrapping_add(i + PREFETCH_HALVES) as *const i8);
        for h in 0..2 {
            let v = _mm256_loadu_si256(w.as_ptr().add(i + 16 * h) as *const __m256i);
            let even = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v));
            let odd = _mm256_castsi256_ps(_mm256_and_si256(v, mask));
            let x = xs.as_ptr().add(i + 16 * h);
            acc[2 * h] = _mm256_fmadd_ps(even, _mm256_loadu_ps(x), acc[2 * h]);
            acc[2 * h + 1] = _mm256_fmadd_ps(odd, _mm256_loadu_ps(x.add(8)), acc[2 * h + 1]);
        }
        i += 32;
    }
    while i + 16 <= n {
        let v = _mm256_loadu_si256(w.as_ptr().add(i) as *const __m256i);
        let even = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v));
        let odd = _mm256_castsi256_ps(_mm256_and_si256(v, mask));
        acc[0] = _mm256_fmadd_ps(even, _mm256_loadu_ps(xs.as_ptr().add(i)), acc[0]);
        acc[1] = _mm256_fmadd_ps(odd, _mm256_loadu_ps(xs.as_ptr().add(i + 8)), acc[1]);
        i += 16;
    }
    let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut s = hsum256(v);
    while i < n {
        s += to_f32(*w.get_unchecked(i), Half::Bf16) * *xs.get_unchecked(i);
        i += 1;
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_bf16_avx2(w: &[u16], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = w.len();
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (h, a) in acc.iter_mut().enumerate() {
            let wb = _mm_loadu_si128(w.as_ptr().add(i + 8 * h) as *const __m128i);
            let wf = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(wb)));
            *a = _mm256_fmadd_ps(wf, _mm256_loadu_ps(x.as_ptr().add(i + 8 * h)), *a);
        }
        i += 32;
    }
    while i + 8 <= n {
        let wb = _mm_loadu_si128(w.as_ptr().add(i) as *const __m128i);
        let wf = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(wb)));
        acc[0] = _mm256_fmadd_ps(wf, _mm256_loadu_ps(x.as_ptr().add(i)), acc[0]);
        i += 8;
    }
    let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut s = hsum256(v);
    while i < n {
        s += to_f32(*w.get_unchecked(i), Half::Bf16) * *x.get_unchecked(i);
        i += 1;
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f16_avx2(w: &[u16], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = w.len();
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        _mm_prefetch::<_MM_HINT_T0>(w.as_ptr().wrapping_add(i + PREFETCH_HALVES) as *const i8);
        for (h, a) in acc.iter_mut().enumerate() {
            let wf = _mm256_cvtph_ps(_mm_loadu_si128(w.as_ptr().add(i + 8 * h) as *const __m128i));
            *a = _mm256_fmadd_ps(wf, _mm256_loadu_ps(x.as_ptr().add(i + 8 * h)), *a);
        }
        i += 32;
    }
    while i + 8 <= n {
        let wf = _mm256_cvtph_ps(_mm_loadu_si128(w.as_ptr().add(i) as *const __m128i));
        acc[0] = _mm256_fmadd_ps(wf, _mm256_loadu_ps(x.as_ptr().add(i)), acc[0]);
        i += 8;
    }
    let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut s = hsum256(v);
    while i < n {
        s += to_f32(*w.get_unchecked(i), Half::F16) * *x.get_unchecked(i);
        i += 1;
    }
    s
}

/// Rounds f32 values to bf16 bits (round to nearest even), for tests and conversions.
pub fn to_bf16_bits(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| bf16::from_f32(x).to_bits()).collect()
}

/// Rounds f32 values to f16 bits (round to nearest even).
pub fn to_f16_bits(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| f16::from_f32(x).to_bits()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{lcg, reference, SHAPES};

    #[test]
    fn matches_f64_reference_on_ragged_shapes() {
        let mut seed = 7u64;
        for kind in [Half::Bf16, Half::F16] {
            for &(m, n, k) in SHAPES {
                let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
                let wf: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
                let w = match kind {
                    Half::Bf16 => to_bf16_bits(&wf),
                    Half::F16 => to_f16_bits(&wf),
                };
                let mut wide = vec![0f32; n * k];
                widen(&w, kind, &mut wide);
                let r = reference(&x, &wide, m, n, k);
                let mut y = vec![0f32; m * n];
                matmul(&x, &w, kind, &mut y, m, n, k, false);
                let mut rows = vec![0f32; m * n];
                matmul(&x, &w, kind, &mut rows, m, n, k, true);
                // Row-wise results do not depend on the other rows.
                for i in 0..m {
                    let mut one = vec![0f32; n];
                    matmul(&x[i * k..(i + 1) * k], &w, kind, &mut one, 1, n, k, true);
                    assert_eq!(
                        &rows[i * n..(i + 1) * n],
                        &one[..],
                        "{kind:?} row {i} of m={m} n={n} k={k}"
                    );
                }
                let tol = 1e-5 * (k as f64).sqrt().max(1.0);
                for (idx, ((a, b), c)) in y.iter().zip(&rows).zip(&r).enumerate() {
                    assert!(
                        (*a as f64 - c).abs() <= tol && (*b as f64 - c).abs() <= tol,
                        "{kind:?} m={m} n={n} k={k} at {idx}: {a} / {b} vs {c}"
                    );
                }
            }
        }
    }

    #[test]
    fn simd_and_portable_dots_agree() {
        let mut seed = 11u64;
        for kind in [Half::Bf16, Half::F16] {
            for len in [0, 1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 100, 1000] {
                let x: Vec<f32> = (0..len).map(|_| lcg(&mut seed)).collect();
                let wf: Vec<f32> = (0..len).map(|_| lcg(&mut seed)).collect();
                let w = match kind {
                    Half::Bf16 => to_bf16_bits(&wf),
                    Half::F16 => to_f16_bits(&wf),
                };
                let a = dot(&w, &x, kind);
                let b = dot_portable(&w, &x, kind);
                assert!(
                    (a - b).abs() <= 1e-5 * (len as f32).max(1.0),
                    "{kind:?} len {len}: {a} vs {b}"
                );
            }
        }
    }
}
