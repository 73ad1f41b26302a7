//! Hand-written CPU kernels where candle's are slow (measured in `docs/benchmarks.md`).
//!
//! Every kernel computes `y = x · Wᵀ` for f32 activations `x [m, k]` and a weight matrix
//! `W [n, k]` in some storage format, with two paths:
//! - a **dot-product path** for few rows (decode steps): each output element is computed by the
//!   same dot-product code whatever `m`, so a row's result never depends on the rest of the
//!   batch, and each weight row is read once for all rows (decode is bound by memory bandwidth);
//! - a **tiled-gemm path** for many rows (prefill, vision): a tile of weight rows is widened to
//!   f32 once and multiplied with the `gemm` crate, which runs at about 80 % of this CPU's FMA
//!   peak, so the conversion cost is spread over all rows.
//!
//! SIMD code uses `std::arch` intrinsics behind runtime feature detection (AVX2+FMA+F16C, or
//! AVX-512F where a kernel has it) with a portable fallback that computes the same function.

pub mod f32_matmul;
pub mod half_matmul;
pub mod int8_gemm;
pub mod probe;
pub mod quant_matmul;

use rayon::prelude::*;

/// Rows of `x` at or above which the tiled-gemm path is used (unless row-wise is forced).
pub const GEMM_MIN_ROWS: usize = 8;
/// Weight rows per task on the dot-product path.
pub const DOT_TILE_ROWS: usize = 64;
/// Weight rows widened per tile on the gemm path (large enough that re-packing the activations
/// for each tile stays a small fraction of the work).
pub const GEMM_TILE_ROWS: usize = 256;

/// Whether the CPU has AVX2, FMA and F16C (x86-64-v3), checked once.
#[inline]
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Runs `tile(j0, nb, out)` for blocks of `tile_rows` weight rows in parallel, where `out` is
/// the `[m, nb]` block of results for weight rows `j0 .. j0 + nb`, and scatters the blocks into
/// `y [m, n]`.
pub fn for_each_tile(
    m: usize,
    n: usize,
    tile_rows: usize,
    y: &mut [f32],
    tile: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    assert_eq!(y.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    let blocks: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(tile_rows))
        .into_par_iter()
        .map(|b| {
            let j0 = b * tile_rows;
            let nb = tile_rows.min(n - j0);
            let mut out = vec![0f32; m * nb];
            tile(j0, nb, &mut out);
            (j0, out)
        })
        .collect();
    for (j0, out) in blocks {
        let nb = out.len() / m;
        for i in 0..m {
            y[i * n + j0..i * n + j0 + nb].copy_from_slice(&out[i * nb..(i + 1) * nb]);
        }
    }
}

/// `out [m, nb] = x [m, k] · wideᵀ` for a widened f32 tile `wide [nb, k]` (single-threaded
/// `gemm`, called from inside a parallel tile loop).
pub fn gemm_tile(x: &[f32], wide: &[f32], out: &mut [f32], m: usize, nb: usize, k: usize) {
    assert!(x.len() >= m * k && wide.len() >= nb * k && out.len() >= m * nb);
    // SAFETY: the pointers cover exactly the m×k, nb×k and m×nb buffers checked above, with
    // the strides given (row-major x and out, transposed view of the tile).
    unsafe {
        gemm::gemm(
            m,
            nb,
            k,
            out.as_mut_ptr(),
            1,
            nb as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            wide.as_ptr(),
            k as isize,
            1,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// The tiled-gemm path: widens `GEMM_TILE_ROWS` weight rows at a time with
/// `widen(j0, nb, buf)` (filling `buf [nb, k]`) and multiplies them with `gemm`.
pub fn tiled_gemm(
    x: &[f32],
    y: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    widen: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    if k == 0 {
        y.fill(0.0);
        return;
    }
    for_each_tile(m, n, GEMM_TILE_ROWS, y, |j0, nb, out| {
        let mut wide = vec![0f32; nb * k];
        widen(j0, nb, &mut wide);
        gemm_tile(x, &wide, out, m, nb, k);
    });
}

#[cfg(test)]
pub(crate) mod test_util {
    /// Deterministic values in [-1, 1).
    pub fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// `y = x · wᵀ` in f64.
    pub fn reference(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k)
                    .map(|p| x[i * k + p] as f64 * w[j * k + p] as f64)
                    .sum();
            }
        }
        y
    }

    /// Shapes with ragged edges around the SIMD widths, block size and tile sizes.
    pub const SHAPES: &[(usize, usize, usize)] = &[
        (1, 1, 1),
        (1, 3, 31),
        (1, 130, 33),
        (2, 7, 64),
        (3, 65, 100),
        (4, 9, 95),
        (5, 66, 129),
        (7, 64, 64),
        (8, 1, 17),
        (9, 129, 47),
        (12, 300, 50),
        (40, 200, 96),
        (2, 200, 1000),
        (17, 257, 200),
    ];
}
