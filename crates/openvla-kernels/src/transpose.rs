//! Matrix transpose: `dst [cols, rows] = srcᵀ` for a row-major `src [rows, cols]` with any row
//! stride. The training linears' backward needs the transposes of activations and gradients
//! (`dW = gᵀ·x` on a GEMM that reads row-major operands); a scalar strided copy of them was 7 %
//! of a small-policy training step.
//!
//! Stripes of 16 output rows run in parallel; inside a stripe, 8×8 blocks are transposed in
//! AVX2 registers where the CPU has AVX2, and the ragged edges element by element. Every path
//! moves the same values, so the result is the same everywhere.

use rayon::prelude::*;

/// Output rows (source columns) per parallel task.
const STRIPE: usize = 16;

/// `dst[c · rows + r] = src[r · ld + c]` for `r < rows`, `c < cols`: the transpose of the
/// `rows × cols` matrix whose rows start `ld` elements apart in `src`, written row-major.
///
/// # Panics
/// If `ld < cols` (with more than one row), or `src` or `dst` is too short.
pub fn transpose(src: &[f32], rows: usize, cols: usize, ld: usize, dst: &mut [f32]) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(
        rows == 1 || ld >= cols,
        "transpose: row stride {ld} < {cols} columns"
    );
    assert!(
        src.len() >= (rows - 1) * ld + cols,
        "transpose: src holds {} < {rows}×{cols} at stride {ld}",
        src.len()
    );
    assert!(
        dst.len() >= rows * cols,
        "transpose: dst holds {} < {rows}×{cols}",
        dst.len()
    );
    dst[..rows * cols]
        .par_chunks_mut(rows * STRIPE)
        .enumerate()
        .for_each(|(s, out)| {
            let (c0, nc) = (s * STRIPE, out.len() / rows);
            stripe(src, ld, rows, c0, nc, out);
        });
}

/// `out [nc, rows]` = source columns `c0 .. c0 + nc` of all `rows` rows, transposed on the
/// calling thread (for callers that parallelize over stripes themselves).
pub(crate) fn stripe(src: &[f32], ld: usize, rows: usize, c0: usize, nc: usize, out: &mut [f32]) {
    let done = blocks(src, ld, rows, c0, nc, out);
    scalar(src, ld, rows, c0, 0..nc, done..rows, out);
}

/// Transposes the leading rows of a stripe (all its columns) in AVX2 8×8 register blocks and
/// returns how many rows it did: `rows` rounded down to 8, or 0 without AVX2.
fn blocks(src: &[f32], ld: usize, rows: usize, c0: usize, nc: usize, out: &mut [f32]) -> usize {
    #[cfg(target_arch = "x86_64")]
    if crate::has_avx2() {
        let (full, nc8) = (rows / 8 * 8, nc / 8 * 8);
        // SAFETY: AVX2 detected; the blocks read rows < full at columns c0 + c .. c0 + c + 8
        // <= c0 + nc <= cols of src and write stripe rows < nc8 at columns < full of out.
        unsafe { blocks_avx2(src, ld, rows, c0, nc8, full, out) };
        // The stripe's last columns (fewer than 8) for these rows, element by element.
        scalar(src, ld, rows, c0, nc8..nc, 0..full, out);
        return full;
    }
    let _ = (src, ld, rows, c0, nc, out);
    0
}

/// The scalar transpose of source columns `c0 + cs` and rows `rs` into a stripe.
fn scalar(
    src: &[f32],
    ld: usize,
    rows: usize,
    c0: usize,
    cs: std::ops::Range<usize>,
    rs: std::ops::Range<usize>,
    out: &mut [f32],
) {
    for c in cs {
        let o = &mut out[c * rows..(c + 1) * rows];
        for r in rs.clone() {
            o[r] = src[r * ld + c0 + c];
        }
    }
}

/// 8×8 register transposes of source rows `0..full` and stripe columns `0..nc8` (multiples
/// of 8).
///
/// # Safety
/// The CPU must have AVX2; the ranges must lie inside `src` and `out` as [`transpose`] checks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn blocks_avx2(
    src: &[f32],
    ld: usize,
    rows: usize,
    c0: usize,
    nc8: usize,
    full: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (s, o) = (src.as_ptr(), out.as_mut_ptr());
    for r0 in (0..full).step_by(8) {
        for c in (0..nc8).step_by(8) {
            let r: [__m256; 8] =
                std::array::from_fn(|j| _mm256_loadu_ps(s.add((r0 + j) * ld + c0 + c)));
            let t = crate::sgemm::transpose8x8(r);
            for (i, v) in t.iter().enumerate() {
                _mm256_storeu_ps(o.add((c + i) * rows + r0), *v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equals_the_definition_on_ragged_shapes_and_strides() {
        for (rows, cols, ld) in [
            (1, 1, 1),
            (8, 8, 8),
            (37, 29, 29),
            (64, 16, 40),
            (3, 200, 201),
        ] {
            let src: Vec<f32> = (0..(rows - 1) * ld + cols).map(|i| i as f32).collect();
            let mut dst = vec![f32::NAN; rows * cols];
            transpose(&src, rows, cols, ld, &mut dst);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        dst[c * rows + r],
                        src[r * ld + c],
                        "{rows}×{cols}/{ld} ({r}, {c})"
                    );
                }
            }
        }
        if !crate::has_avx2() {
            eprintln!("SKIPPED: the AVX2 8×8 blocks (this CPU has no AVX2); scalar path checked");
        }
    }

    #[test]
    #[should_panic(expected = "row stride")]
    fn a_stride_shorter_than_a_row_is_refused() {
        transpose(&[0.0; 16], 2, 8, 4, &mut [0.0; 16]);
    }
}
