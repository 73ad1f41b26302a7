//! `y = x · Wᵀ` for f32 weights.
//!
//! - Few rows (decode), or `rowwise`: every output element is one dot product computed the
//!   same way whatever the batch, so a request gets the same logits alone and in a batch, and
//!   each weight row is read once for all rows (decode is bound by memory bandwidth).
//! - Many rows (vision, projector, prefill): the tiled path ([`super::tiled_gemm_f32`]), which
//!   multiplies with the packed [`super::sgemm`] kernel where the CPU has AVX2+FMA.

use crate::ComputePrecision;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape};

/// Weight rows per task.
const TILE_ROWS: usize = 64;

/// The candle op: `x [m, k] f32` times `w [n, k] f32`, giving `[m, n] f32`.
///
/// With `rowwise`, every output row is computed by the same dot-product kernel whatever the
/// number of rows, so a row's result does not depend on what else is in the batch.
///
/// With [`ComputePrecision::Bf16`], the many-row path computes in bf16 arithmetic
/// ([`crate::bf16_gemm`]).
pub struct F32Matmul {
    /// Force the row-independent dot-product path.
    pub rowwise: bool,
    /// The arithmetic of the many-row path.
    pub compute: ComputePrecision,
}

impl CustomOp2 for F32Matmul {
    fn name(&self) -> &'static str {
        "f32-weight-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => (x, w),
            _ => candle_core::bail!("f32-weight-matmul expects f32 activations and weights"),
        };
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("f32-weight-matmul: inner dims differ ({k} vs {k2})");
        }
        let (Some((xs, xe)), Some((ws, we))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("f32-weight-matmul: inputs must be contiguous")
        };
        let mut y = vec![0f32; m * n];
        let (x, w) = (&x[xs..xe], &w[ws..we]);
        if self.rowwise || m < super::GEMM_MIN_ROWS {
            matmul(x, w, &mut y, m, n, k);
        } else if self.compute == ComputePrecision::Bf16 {
            crate::bf16_gemm::tiled_gemm_bf16(x, &mut y, m, n, k, |j0, nb, t| {
                crate::bf16_gemm::round_slice(&w[j0 * k..(j0 + nb) * k], t)
            });
        } else {
            super::tiled_gemm_f32(x, w, &mut y, m, n, k);
        }
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }
}

/// `y[m, n] = x[m, k] · w[n, k]ᵀ`, each element by [`dot`].
pub fn matmul(x: &[f32], w: &[f32], y: &mut [f32], m: usize, n: usize, k: usize) {
    assert_eq!(x.len(), m * k);
    assert_eq!(w.len(), n * k);
    crate::for_each_tile(m, n, TILE_ROWS, y, |j0, nb, out| {
        for j in 0..nb {
            let wj = &w[(j0 + j) * k..(j0 + j + 1) * k];
            for i in 0..m {
                out[i * nb + j] = dot(wj, &x[i * k..(i + 1) * k]);
            }
        }
    });
}

/// Dot product of two f32 slices with a fixed summation order.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::has_avx512() {
            // SAFETY: the CPU supports AVX-512F (checked above).
            return unsafe { dot_avx512(a, b) };
        }
        if super::has_avx2() {
            // SAFETY: the CPU supports AVX2 and FMA (checked by has_avx2).
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (h, acc) in acc.iter_mut().enumerate() {
            *acc = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i + 8 * h)),
                _mm256_loadu_ps(b.as_ptr().add(i + 8 * h)),
                *acc,
            );
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(
            _mm256_loadu_ps(a.as_ptr().add(i)),
            _mm256_loadu_ps(b.as_ptr().add(i)),
            acc[0],
        );
        i += 8;
    }
    let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut s = super::half_matmul::hsum256(v);
    while i < n {
        s += *a.get_unchecked(i) * *b.get_unchecked(i);
        i += 1;
    }
    s
}

/// Portable fallback.
pub fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = a.len() / 16;
    for c in 0..chunks {
        for l in 0..16 {
            acc[l] += a[c * 16 + l] * b[c * 16 + l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 16..a.len() {
        s += a[i] * b[i];
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len();
    let mut acc0 = _mm512_setzero_ps();
    let mut acc1 = _mm512_setzero_ps();
    let mut i = 0;
    while i + 32 <= n {
        acc0 = _mm512_fmadd_ps(
            _mm512_loadu_ps(a.as_ptr().add(i)),
            _mm512_loadu_ps(b.as_ptr().add(i)),
            acc0,
        );
        acc1 = _mm512_fmadd_ps(
            _mm512_loadu_ps(a.as_ptr().add(i + 16)),
            _mm512_loadu_ps(b.as_ptr().add(i + 16)),
            acc1,
        );
        i += 32;
    }
    let mut s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
    while i < n {
        s += *a.get_unchecked(i) * *b.get_unchecked(i);
        i += 1;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_f64_reference_and_is_row_independent() {
        let mut seed = 3u64;
        let mut r = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        for &(m, n, k) in &[(1, 1, 1), (3, 70, 33), (9, 130, 100), (16, 65, 31)] {
            let x: Vec<f32> = (0..m * k).map(|_| r()).collect();
            let w: Vec<f32> = (0..n * k).map(|_| r()).collect();
            let mut y = vec![0f32; m * n];
            matmul(&x, &w, &mut y, m, n, k);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|p| x[i * k + p] as f64 * w[j * k + p] as f64)
                        .sum();
                    assert!((y[i * n + j] as f64 - want).abs() < 1e-5 * (k as f64).sqrt());
                }
                let mut one = vec![0f32; n];
                matmul(&x[i * k..(i + 1) * k], &w, &mut one, 1, n, k);
                assert_eq!(&y[i * n..(i + 1) * n], &one[..]);
            }
            for len in [0usize, 5, 8, 9, 16, 31, 32, 33, 100] {
                let a: Vec<f32> = (0..len).map(|_| r()).collect();
                let b: Vec<f32> = (0..len).map(|_| r()).collect();
                assert!((dot(&a, &b) - dot_portable(&a, &b)).abs() < 1e-5 * (len as f32).max(1.0));
            }
        }
    }
}
