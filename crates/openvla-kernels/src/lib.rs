//! openvla-kernels: the CPU kernels of openvla-rs where candle's are slow (measured in
//! `docs/benchmarks.md`), and the block-quantized weight formats they read ([`format`]).
//! Nothing here depends on the model crate.
//!
//! Every kernel computes `y = x · Wᵀ` for f32 activations `x [m, k]` and a weight matrix
//! `W [n, k]` in some storage format, with two paths:
//! - a **dot-product path** for few rows (decode steps): each output element is computed by the
//!   same dot-product code whatever `m`, so a row's result never depends on the rest of the
//!   batch, and each weight row is read once for all rows (decode is bound by memory bandwidth);
//! - a **tiled-gemm path** for many rows (prefill, vision) of f32/bf16/f16 weights: a tile of
//!   weight rows is widened to f32 once (into a per-thread buffer) and multiplied with the packed
//!   [`sgemm`] kernel (the `gemm` crate without AVX2) straight into its columns of `y`, so the
//!   conversion cost is spread over all rows ([`tiled_gemm`]);
//! - an **int16 path** for many rows of `q8_0`/`q4_0` weights: activations rounded to int16
//!   blocks and multiplied in integers ([`i16_gemm`]; dequantized tiles without AVX2).
//!
//! Measurements and the reasons for each choice are in `docs/kernels.md`.
//!
//! SIMD code uses `std::arch` intrinsics behind runtime feature detection (AVX2+FMA+F16C, or
//! AVX-512F where a kernel has it) with a portable fallback that computes the same function.

pub mod activation;
pub mod amx;
pub mod attention;
pub mod bf16_gemm;
pub mod dispatch;
pub mod f32_matmul;
pub mod format;
pub mod half_matmul;
pub mod i16_gemm;
pub mod probe;
pub mod quant_matmul;
pub mod sgemm;
pub mod transpose;

pub use dispatch::ComputePrecision;
pub use format::{FormatError, QuantFormat, QuantMatrix, BLOCK};
use rayon::prelude::*;

/// Settles the shapes of a single-threaded product `dst [m, nb] (row stride rs) = a · wᵀ` that
/// need no arithmetic: nothing to write (`m` or `nb` zero) or zeros (`k` zero). Returns whether
/// it did.
///
/// # Safety
/// `dst` must be valid for writes of `m` rows of `nb` elements, `rs` apart.
pub(crate) unsafe fn trivial_product(
    m: usize,
    k: usize,
    nb: usize,
    dst: *mut f32,
    rs: usize,
) -> bool {
    if m == 0 || nb == 0 {
        return true;
    }
    if k == 0 {
        for r in 0..m {
            std::ptr::write_bytes(dst.add(r * rs), 0, nb);
        }
        return true;
    }
    false
}

/// A vector of `n` plain numbers whose contents are left as the allocator gives them, for an
/// output that its producer overwrites in full before anything reads it (a product, an
/// element-wise map, a transpose). `vec![0.0; n]` would zero it first: with the allocator's
/// memory reused from step to step (no fresh `mmap` pages), that `memset` was 9 % of a training
/// step. The same pattern as candle's CPU backend (`Vec::with_capacity` + `set_len`).
///
/// # Safety
/// Every element must be written before it is read, and the caller must not expose the vector
/// before that.
#[allow(clippy::uninit_vec)] // the point of the function; its callers carry the contract
pub unsafe fn uninit_vec<T: Copy>(n: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: capacity n; the caller writes every element before reading (contract above), and
    // `T: Copy` has no drop glue to run on unwritten values.
    unsafe { v.set_len(n) };
    v
}

/// Rows of `x` at or above which the tiled-gemm path is used (unless row-wise is forced).
pub const GEMM_MIN_ROWS: usize = 8;

/// Output columns from which the training linears' f32 products take the packed sgemm; narrower
/// ones (a LoRA rank's 4-32 columns) stay on the `gemm` crate, since the packed kernel computes
/// panels of 16-32 columns and would pack all of `x` for a few.
pub const PACKED_MIN_COLS: usize = 32;

/// Whether a block of `rows` rows keeps its bits when stacked with other rows into one product
/// (batched vision, packed prefills): it takes the tiled path alone as in any larger product.
/// Fewer than [`GEMM_MIN_ROWS`] rows take the dot-product kernels alone, whose sums differ.
pub fn stacks_bit_exactly(rows: usize) -> bool {
    rows >= GEMM_MIN_ROWS
}
/// Weight rows per task on the dot-product path.
pub const DOT_TILE_ROWS: usize = 64;
/// Weight rows widened per tile on the gemm path (large enough that re-packing the activations
/// for each tile stays a small fraction of the work).
pub const GEMM_TILE_ROWS: usize = 256;

/// Whether the kernels may use AVX2, FMA and F16C (x86-64-v3): [`dispatch::Features::get`].
#[inline]
pub fn has_avx2() -> bool {
    dispatch::Features::get().avx2
}

/// Whether the kernels may use AVX-512 F/BW/VL: [`dispatch::Features::get`].
#[inline]
pub fn has_avx512() -> bool {
    dispatch::Features::get().avx512
}

/// Runs `f` on a thread of the rayon pool (directly when already on one), so that the parallel
/// kernels inside split their work with `join` on the pool instead of each injecting a job from
/// outside and putting the caller to sleep until it is done: a decode step makes about 200
/// kernel calls, and each such hand-off costs two thread wake-ups.
pub fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}

/// A pointer to an `[m, n]` output shared by parallel tasks, each of which writes only its own
/// columns ([`for_each_column_panel`]).
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
// SAFETY: the tasks given an `OutPtr` write disjoint elements (their own columns of every row).
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

/// Runs `task(j0, cols, out)` in parallel for the column panels `j0 .. j0 + cols` (`width` wide,
/// the last one narrower) of `y [m, n]`; each task must write only its own columns.
pub(crate) fn for_each_column_panel(
    y: &mut [f32],
    n: usize,
    width: usize,
    task: impl Fn(usize, usize, OutPtr) + Sync,
) {
    let out = OutPtr(y.as_mut_ptr());
    (0..n.div_ceil(width.max(1))).into_par_iter().for_each(|t| {
        let j0 = t * width;
        task(j0, width.min(n - j0), out)
    });
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

/// Weight rows per tile of the tiled-gemm path for `n` weight rows: about
/// [`GEMM_TILE_ROWS`], with the number of tiles a multiple of the thread count (so that no
/// thread is left with one tile more than the others: 1152 rows are 6 tiles of 192 on 2 threads,
/// not 4 of 256 and one of 128) and a multiple of 16 rows.
pub fn gemm_tile_rows(n: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let tiles = n.div_ceil(GEMM_TILE_ROWS).next_multiple_of(threads);
    n.div_ceil(tiles).next_multiple_of(16).max(16)
}

impl OutPtr {
    /// The pointer (a method, so closures capture the `Sync` wrapper, not the raw field).
    fn at(self, j0: usize) -> *mut f32 {
        self.0.wrapping_add(j0)
    }
}

thread_local! {
    /// The widened tile of the calling thread, reused across tiles and calls.
    static WIDE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `tile(j0, nb, dst)` in parallel for the [`gemm_tile_rows`] column blocks of
/// `y [m, n]`, where `dst` points at column `j0` of row 0 (row stride `n`); handles the empty
/// shapes (`k == 0` gives zeros).
pub(crate) fn for_each_output_tile(
    y: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    tile: impl Fn(usize, usize, *mut f32) + Sync,
) {
    for_each_output_tile_of(y, m, n, k, gemm_tile_rows(n), tile)
}

/// [`for_each_output_tile`] with blocks of `width` columns (every `j0` a multiple of it).
pub(crate) fn for_each_output_tile_of(
    y: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    width: usize,
    tile: impl Fn(usize, usize, *mut f32) + Sync,
) {
    assert_eq!(y.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        y.fill(0.0);
        return;
    }
    for_each_column_panel(y, n, width, |j0, nb, out| tile(j0, nb, out.at(j0)));
}

/// The tiled-gemm path: widens [`gemm_tile_rows`] weight rows at a time with
/// `widen(j0, nb, buf)` (filling `buf [nb, k]`) into a per-thread buffer and multiplies them
/// ([`sgemm`] where the CPU has AVX2+FMA, else the `gemm` crate) straight into the tile's
/// columns of `y` (row stride `n`).
pub fn tiled_gemm(
    x: &[f32],
    y: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    widen: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    assert!(x.len() >= m * k);
    let packed = Rows::new(x, m, k);
    for_each_output_tile(y, m, n, k, |j0, nb, dst| {
        WIDE.with(|buf| {
            let mut buf = buf.borrow_mut();
            if buf.len() < nb * k {
                buf.resize(nb * k, 0.0);
            }
            let wide = &mut buf[..nb * k];
            widen(j0, nb, wide);
            // SAFETY: columns j0 .. j0 + nb of the m rows of y (row stride n) belong to this
            // tile alone; x is m×k and the tile nb×k, row-major.
            unsafe { packed.gemm(wide, dst, n, nb) };
        });
    });
}

/// [`tiled_gemm`] for f32 weights `w [n, k]`: the tiles are multiplied in place, without a
/// copy.
pub fn tiled_gemm_f32(x: &[f32], w: &[f32], y: &mut [f32], m: usize, n: usize, k: usize) {
    assert!(x.len() >= m * k && w.len() >= n * k);
    let packed = Rows::new(x, m, k);
    for_each_output_tile(y, m, n, k, |j0, nb, dst| {
        // SAFETY: as in tiled_gemm.
        unsafe { packed.gemm(&w[j0 * k..(j0 + nb) * k], dst, n, nb) };
    });
}

/// [`tiled_gemm_f32`] for weights stored depth-major, `w [k, n]` row-major (`y = x · w`: a
/// linear's `W` read transposed in `dx = g·W`): the packed kernel copies each panel row straight
/// from `w` ([`sgemm::gemm_packed_depth_major`]); without it `w` is transposed once. The sums are
/// those of [`tiled_gemm_f32`] on the transpose.
pub fn tiled_gemm_f32_depth_major(
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
) {
    assert!(x.len() >= m * k && w.len() >= k * n);
    tiled_gemm_f32_packed(Rows::new(x, m, k), w, y, m, n, k)
}

/// [`tiled_gemm_f32_depth_major`] with the left operand stored transposed too: `y [m, n] =
/// xtᵀ · w` for `xt [k, m]` (row stride `ld ≥ m`) and `w [k, n]`, both row-major with the depth
/// as their rows (a linear's weight gradient `dW = gᵀ·x`), packed without transposed copies
/// ([`sgemm::PackedRows::pack_transposed`]).
pub fn tiled_gemm_f32_transposed_lhs(
    xt: &[f32],
    ld: usize,
    w: &[f32],
    y: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
) {
    check_transposed_lhs(xt, ld, w, m, n, k);
    if sgemm::available() && m > 0 && k > 0 {
        let a = sgemm::PackedRows::pack_transposed(xt, k, m, ld);
        return tiled_gemm_f32_packed(Rows::Packed(a), w, y, m, n, k);
    }
    tiled_gemm_f32_depth_major(&untranspose(xt, ld, m, k), w, y, m, n, k)
}

/// Asserts that `xt` holds a row-major `[k, m]` matrix at row stride `ld ≥ m` (the transposed
/// operands every packing from a transpose reads).
pub(crate) fn check_transposed(xt: &[f32], k: usize, m: usize, ld: usize) {
    assert!(
        k == 0 || m == 0 || (ld >= m && xt.len() >= (k - 1) * ld + m),
        "gemm: xt holds {} < {k}×{m} at stride {ld}",
        xt.len()
    );
}

/// The bounds every `*_transposed_lhs` product asserts: `xt [k, m]` at row stride `ld ≥ m`,
/// `w [k, n]`.
pub(crate) fn check_transposed_lhs(xt: &[f32], ld: usize, w: &[f32], m: usize, n: usize, k: usize) {
    check_transposed(xt, k, m, ld);
    assert!(w.len() >= k * n, "gemm: w holds {} < {k}×{n}", w.len());
}

/// `xtᵀ [m, k]` row-major from `xt [k, m]` (row stride `ld`): the transposed copy the paths
/// that cannot pack from the transpose multiply (a transposed left operand, or depth-major
/// weights `w [k, n]` as `untranspose(w, n, n, k)`).
pub(crate) fn untranspose(xt: &[f32], ld: usize, m: usize, k: usize) -> Vec<f32> {
    // SAFETY: the transpose writes all m·k elements.
    let mut x = unsafe { uninit_vec::<f32>(m * k) };
    if m > 0 && k > 0 {
        transpose::transpose(xt, k, m, ld, &mut x);
    }
    x
}

/// The body of [`tiled_gemm_f32_depth_major`] on already packed rows.
fn tiled_gemm_f32_packed(a: Rows, w: &[f32], y: &mut [f32], m: usize, n: usize, k: usize) {
    #[cfg(target_arch = "x86_64")]
    if let Rows::Packed(p) = &a {
        for_each_output_tile(y, m, n, k, |j0, nb, dst| {
            // SAFETY: the packed kernel runs here (Rows::Packed); w holds k rows of n ≥ j0 + nb
            // columns; columns j0 .. j0 + nb of the m rows of y belong to this tile alone.
            unsafe { sgemm::gemm_packed_depth_major(p, w, n, j0, dst, n, nb) }
        });
        return;
    }
    let wt = untranspose(w, n, n, k);
    for_each_output_tile(y, m, n, k, |j0, nb, dst| {
        // SAFETY: as in tiled_gemm.
        unsafe { a.gemm(&wt[j0 * k..(j0 + nb) * k], dst, n, nb) };
    });
}

/// [`tiled_gemm_f32`] with a chosen [`sgemm`] micro-kernel (the kernel bench compares them in
/// one process). Panics where the CPU lacks the kernel's features.
#[cfg(target_arch = "x86_64")]
pub fn tiled_gemm_f32_with(
    kernel: sgemm::Kernel,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
) {
    let f = dispatch::Features::detect();
    assert!(
        f.avx2 && (kernel == sgemm::Kernel::Avx2 || f.avx512),
        "the {kernel:?} sgemm kernel cannot run on this CPU"
    );
    assert!(x.len() >= m * k && w.len() >= n * k);
    if m == 0 || k == 0 {
        return tiled_gemm_f32(x, w, y, m, n, k);
    }
    let packed = sgemm::PackedRows::pack(x, m, k);
    for_each_output_tile(y, m, n, k, |j0, nb, dst| {
        // SAFETY: features checked above; the tile's columns as in tiled_gemm.
        unsafe { sgemm::gemm_packed_with(kernel, &packed, &w[j0 * k..(j0 + nb) * k], dst, n, nb) };
    });
}

/// `dst [m, nb] (row stride rs) = x [m, k] · wᵀ` for `w [nb, k]`, on the calling thread (for
/// callers that parallelize over independent products, such as attention heads).
pub fn gemm_single(
    x: &[f32],
    w: &[f32],
    dst: &mut [f32],
    rs: usize,
    m: usize,
    nb: usize,
    k: usize,
) {
    assert!(x.len() >= m * k && w.len() >= nb * k && rs >= nb);
    if m == 0 || nb == 0 {
        return;
    }
    assert!(dst.len() >= (m - 1) * rs + nb);
    if k == 0 {
        for r in 0..m {
            dst[r * rs..r * rs + nb].fill(0.0);
        }
        return;
    }
    // SAFETY: dst holds m rows of nb elements, rs apart (checked above), and is borrowed
    // mutably here.
    unsafe { Rows::new(x, m, k).gemm(w, dst.as_mut_ptr(), rs, nb) };
}

/// The activations of a tiled product: packed once for [`sgemm`] where it runs, else as given
/// for the `gemm` crate.
enum Rows<'a> {
    Packed(sgemm::PackedRows),
    Plain(&'a [f32], usize, usize),
}

impl<'a> Rows<'a> {
    fn new(x: &'a [f32], m: usize, k: usize) -> Rows<'a> {
        if sgemm::available() && m > 0 && k > 0 {
            Rows::Packed(sgemm::PackedRows::pack(x, m, k))
        } else {
            Rows::Plain(x, m, k)
        }
    }

    /// `dst [m, nb] (row stride rs) = x · wideᵀ` for `wide [nb, k]`.
    ///
    /// # Safety
    /// `dst` must be valid for writes of `m` rows of `nb` elements, `rs` apart, written by no
    /// one else meanwhile.
    unsafe fn gemm(&self, wide: &[f32], dst: *mut f32, rs: usize, nb: usize) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Rows::Packed(a) => sgemm::gemm_packed(a, wide, dst, rs, nb),
            #[cfg(not(target_arch = "x86_64"))]
            Rows::Packed(_) => unreachable!("sgemm is x86-64 only"),
            Rows::Plain(x, m, k) => gemm_into(x, wide, dst, rs, *m, nb, *k),
        }
    }
}

/// `dst [m, nb] (row stride rs) = x [m, k] · wideᵀ` with single-threaded `gemm` (the portable
/// path where [`sgemm`] cannot run).
///
/// # Safety
/// `dst` must be valid for writes of `m` rows of `nb` elements, `rs` apart.
unsafe fn gemm_into(
    x: &[f32],
    wide: &[f32],
    dst: *mut f32,
    rs: usize,
    m: usize,
    nb: usize,
    k: usize,
) {
    gemm::gemm(
        m,
        nb,
        k,
        dst,
        1,
        rs as isize,
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

/// The previous tiled-gemm path (a fresh `Vec` per tile, results scattered into `y`), kept for
/// the kernel benchmark's before/after comparison.
pub fn tiled_gemm_v0(
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
        gemm_single(x, &wide, out, nb, m, nb, k);
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

#[cfg(test)]
mod tests {
    use super::test_util::{lcg, reference, SHAPES};
    use super::*;
    use crate::format::{QuantFormat, QuantMatrix};

    fn tol(k: usize) -> f64 {
        2e-5 * (k as f64).sqrt().max(1.0)
    }

    /// The f32 products from depth-major weights and from a transposed left operand (a
    /// linear's backward: `dx = g·W`, `dW = gᵀ·x`) give the bits of [`tiled_gemm_f32`] on the
    /// transposed copies, on ragged shapes (partial row and column panels, depths past one
    /// `KC` block, a row stride wider than the rows), with NaN and infinity in the mix.
    #[test]
    fn depth_major_and_transposed_operands_give_the_bits_of_the_copies() {
        if !sgemm::available() {
            eprintln!(
                "skipped: the packed sgemm (no AVX2+FMA here); checking the transposing fallback"
            );
        }
        let mut seed = 5u64;
        for (m, n, k) in [
            (8, 32, 4),
            (33, 70, 61),
            (40, 96, 300),
            (9, 33, 1),
            (70, 200, 517),
        ] {
            let ld = m + 3;
            let mut xt: Vec<f32> = (0..k * ld).map(|_| lcg(&mut seed) * 3.0).collect();
            let mut w: Vec<f32> = (0..k * n).map(|_| lcg(&mut seed)).collect();
            if k > 2 {
                w[n + 3] = f32::NAN;
                xt[2 * ld + 1] = f32::INFINITY;
            }
            let mut x = vec![0f32; m * k];
            transpose::transpose(&xt, k, m, ld, &mut x);
            let mut wt = vec![0f32; n * k];
            transpose::transpose(&w, k, n, n, &mut wt);
            let mut want = vec![0f32; m * n];
            tiled_gemm_f32(&x, &wt, &mut want, m, n, k);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            let mut got = vec![0f32; m * n];
            tiled_gemm_f32_depth_major(&x, &w, &mut got, m, n, k);
            assert_eq!(bits(&got), bits(&want), "depth-major m={m} n={n} k={k}");
            let mut got = vec![0f32; m * n];
            tiled_gemm_f32_transposed_lhs(&xt, ld, &w, &mut got, m, n, k);
            assert_eq!(bits(&got), bits(&want), "transposed lhs m={m} n={n} k={k}");
        }
    }

    #[test]
    fn in_pool_runs_on_a_pool_thread_and_returns_the_value() {
        assert!(rayon::current_thread_index().is_none());
        let (inside, v) = in_pool(|| (rayon::current_thread_index(), 41 + 1));
        assert!(inside.is_some(), "the closure ran outside the pool");
        assert_eq!(v, 42);
    }

    #[test]
    fn tile_rows_balance_threads() {
        let threads = rayon::current_num_threads().max(1);
        for n in [
            1usize, 15, 16, 17, 255, 256, 257, 896, 1152, 4096, 4304, 11008,
        ] {
            let t = gemm_tile_rows(n);
            assert!(t.is_multiple_of(16) && t >= 16, "n={n}: {t}");
            assert!(t <= GEMM_TILE_ROWS.max(16), "n={n}: {t}");
            let tiles = n.div_ceil(t);
            // Either one tile's worth of rows per thread at most, or a balanced split.
            assert!(
                tiles <= n.div_ceil(GEMM_TILE_ROWS).next_multiple_of(threads),
                "n={n}"
            );
        }
    }

    /// The tiled path (f32 in place, and widened through a closure) against the f64 reference,
    /// old and new tiling agreeing, on the ragged shapes and many-row shapes.
    #[test]
    fn tiled_gemm_matches_f64_reference() {
        let mut seed = 41u64;
        let mut shapes = SHAPES.to_vec();
        shapes.extend([(8, 300, 33), (279, 70, 96), (30, 1152, 20)]);
        for (m, n, k) in shapes {
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
            let r = reference(&x, &w, m, n, k);
            let mut a = vec![f32::NAN; m * n];
            tiled_gemm_f32(&x, &w, &mut a, m, n, k);
            let mut b = vec![f32::NAN; m * n];
            tiled_gemm(&x, &mut b, m, n, k, |j0, nb, buf| {
                buf.copy_from_slice(&w[j0 * k..(j0 + nb) * k])
            });
            let mut c = vec![f32::NAN; m * n];
            tiled_gemm_v0(&x, &mut c, m, n, k, |j0, nb, buf| {
                buf.copy_from_slice(&w[j0 * k..(j0 + nb) * k])
            });
            for (idx, want) in r.iter().enumerate() {
                for (name, got) in [("f32", a[idx]), ("widen", b[idx]), ("v0", c[idx])] {
                    assert!(
                        (got as f64 - want).abs() <= tol(k),
                        "{name} m={m} n={n} k={k} at {idx}: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// Both kinds of activations (packed for `sgemm`, plain for the portable `gemm` path, which
    /// an AVX2 machine would otherwise never run) against the f64 reference, into a strided
    /// destination.
    #[test]
    fn packed_and_plain_rows_give_the_reference_product() {
        let mut seed = 47u64;
        for &(m, n, k) in SHAPES {
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
            let r = reference(&x, &w, m, n, k);
            let rs = n + 2;
            let mut kinds = vec![("plain", Rows::Plain(&x, m, k))];
            if sgemm::available() {
                kinds.push(("packed", Rows::Packed(sgemm::PackedRows::pack(&x, m, k))));
            }
            for (name, rows) in kinds {
                let mut y = vec![f32::NAN; m * rs];
                // SAFETY: y holds m rows of stride rs ≥ n.
                unsafe { rows.gemm(&w, y.as_mut_ptr(), rs, n) };
                for i in 0..m {
                    for j in 0..n {
                        let got = y[i * rs + j] as f64;
                        assert!(
                            (got - r[i * n + j]).abs() <= tol(k),
                            "{name} m={m} n={n} k={k} ({i},{j})"
                        );
                    }
                }
            }
            // gemm_single takes the same path with a bounds-checked destination.
            let mut y = vec![0f32; m * n];
            gemm_single(&x, &w, &mut y, n, m, n, k);
            for (got, want) in y.iter().zip(&r) {
                assert!((*got as f64 - want).abs() <= tol(k));
            }
        }
    }

    /// On the decode path (fewer than `GEMM_MIN_ROWS` rows, or `rowwise`), every format's
    /// dispatcher gives a row alone exactly the bits it gets in a batch.
    #[test]
    fn decode_dispatch_is_row_independent_for_every_format() {
        let mut seed = 43u64;
        for &(m, n, k) in SHAPES {
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
            let wf: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
            let bf = half_matmul::to_bf16_bits(&wf);
            let hf = half_matmul::to_f16_bits(&wf);
            let q8 = QuantMatrix::quantize(QuantFormat::Q8_0, &wf, n, k);
            let q4 = QuantMatrix::quantize(QuantFormat::Q4_0, &wf, n, k);
            let run = |x: &[f32], rows: usize, rowwise: bool, f: usize| -> Vec<f32> {
                let mut y = vec![0f32; rows * n];
                match f {
                    0 => f32_matmul::matmul(x, &wf, &mut y, rows, n, k),
                    1 => half_matmul::matmul(
                        x,
                        &bf,
                        half_matmul::Half::Bf16,
                        &mut y,
                        rows,
                        n,
                        k,
                        rowwise,
                    ),
                    2 => half_matmul::matmul(
                        x,
                        &hf,
                        half_matmul::Half::F16,
                        &mut y,
                        rows,
                        n,
                        k,
                        rowwise,
                    ),
                    3 => quant_matmul::matmul(x, &q8, &mut y, rows, rowwise),
                    _ => quant_matmul::matmul(x, &q4, &mut y, rows, rowwise),
                }
                y
            };
            for f in 0..5 {
                // The forced row-wise path for any m, and the default dispatch below 8 rows.
                let mut modes = vec![true];
                if m < GEMM_MIN_ROWS {
                    modes.push(false);
                }
                for rowwise in modes {
                    let all = run(&x, m, rowwise, f);
                    for i in 0..m {
                        let one = run(&x[i * k..(i + 1) * k], 1, rowwise, f);
                        assert_eq!(
                            &all[i * n..(i + 1) * n],
                            &one[..],
                            "format {f} rowwise={rowwise} row {i} of m={m} n={n} k={k}"
                        );
                    }
                }
            }
        }
    }
}
