//! bf16 arithmetic for the many-row products ([`crate::ComputePrecision::Bf16`]):
//! `dst [m, nb] = bf16(x) · bf16(w)ᵀ`, products of bf16 pairs accumulated in f32.
//!
//! This is what PyTorch bf16 (oneDNN) and the GPU reference compute: both operands rounded to
//! bf16 (round to nearest even), every product exact in f32 (8 × 8 significant bits), sums in
//! f32. With AVX512-BF16 it runs on `vdpbf16ps`, which multiplies 32 bf16 pairs and adds them
//! into 16 f32 lanes per instruction, twice the f32 FMA's multiplies per instruction:
//! - the activations are rounded and packed once per call into panels of [`MR`] rows of 32-bit
//!   words, each word the bf16 pair `(x[2q], x[2q + 1])` ([`PackedRowsBf16`]);
//! - each thread packs [`KCP`] pairs of its weight rows into panels of [`NR`] columns of the
//!   same words (`[kcp][NR]`; a weight row's bf16 pairs are already adjacent in memory, so this is
//!   a transpose of 32-bit words);
//! - the 6×32 micro-kernel holds twelve zmm accumulators and does twelve `vdpbf16ps` per two
//!   weight loads and six broadcasts.
//!
//! Without AVX512-BF16 the same operands (bf16-rounded activations and weights, widened back to
//! f32 exactly) go through the f32 GEMM ([`crate::tiled_gemm`]): the same products, summed in
//! another order, so the mode means the same arithmetic on every CPU.

use crate::dispatch::Bf16Path;
use crate::half_matmul::{widen, Half};
use rayon::prelude::*;
use std::cell::RefCell;

/// Rows of `x` per micro-panel.
pub const MR: usize = 6;
/// Weight rows (output columns) per micro-panel.
pub const NR: usize = 32;
/// bf16 pairs (32-bit words) per packed depth block: a 32-wide weight panel of this depth is
/// 32 KiB, inside the 48 KiB L1 of the AVX512-BF16 cores it targets.
pub const KCP: usize = 256;

/// `x` rounded to bf16, to nearest even (NaN stays NaN, quieted), as raw bits.
#[inline]
pub fn round_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        ((b >> 16) | 0x40) as u16
    } else {
        ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
    }
}

/// Rounds `src` to bf16 bits into `dst` ([`round_bf16`] element-wise, the same bits on every
/// path): 16 lanes at a time with AVX-512F, 8 with AVX2, else one by one.
pub fn round_slice(src: &[f32], dst: &mut [u16]) {
    let n = src.len().min(dst.len());
    let (src, dst) = (&src[..n], &mut dst[..n]);
    #[cfg(target_arch = "x86_64")]
    let done = {
        let f = crate::dispatch::Features::get();
        // SAFETY: the instructions each path uses were detected on this CPU.
        if f.avx512 {
            unsafe { round_slice_avx512(src, dst) }
        } else if f.avx2 {
            unsafe { round_slice_avx2(src, dst) }
        } else {
            0
        }
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    for (d, &v) in dst[done..].iter_mut().zip(&src[done..]) {
        *d = round_bf16(v);
    }
}

/// `src` rounded to bf16 and widened back to f32 into `dst` (the values the bf16 products
/// multiply, [`round_slice`] then widened), through an L1-sized scratch of bits: one pass over
/// the operands, for the paths that emulate bf16 arithmetic on the f32 GEMM.
fn round_slice_f32(src: &[f32], dst: &mut [f32]) {
    const CHUNK: usize = 2048;
    let n = src.len().min(dst.len());
    let mut bits = [0u16; CHUNK];
    for (s, d) in src[..n].chunks(CHUNK).zip(dst[..n].chunks_mut(CHUNK)) {
        let b = &mut bits[..s.len()];
        round_slice(s, b);
        widen(b, Half::Bf16, d);
    }
}

/// [`round_bf16`] on the leading multiple of 16 elements; returns how many it rounded.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn round_slice_avx512(src: &[f32], dst: &mut [u16]) -> usize {
    use std::arch::x86_64::*;
    let n = src.len() / 16 * 16;
    let bias = _mm512_set1_epi32(0x7fff);
    let one = _mm512_set1_epi32(1);
    let quiet = _mm512_set1_epi32(0x40);
    for i in (0..n).step_by(16) {
        let v = _mm512_loadu_ps(src.as_ptr().add(i));
        let b = _mm512_castps_si512(v);
        let hi = _mm512_srli_epi32::<16>(b);
        let lsb = _mm512_and_si512(hi, one);
        let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(_mm512_add_epi32(b, bias), lsb));
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
        let out = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(hi, quiet));
        _mm256_storeu_si256(
            dst.as_mut_ptr().add(i) as *mut __m256i,
            _mm512_cvtepi32_epi16(out),
        );
    }
    n
}

/// [`round_bf16`] on the leading multiple of 8 elements; returns how many it rounded.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn round_slice_avx2(src: &[f32], dst: &mut [u16]) -> usize {
    use std::arch::x86_64::*;
    let n = src.len() / 8 * 8;
    let bias = _mm256_set1_epi32(0x7fff);
    let one = _mm256_set1_epi32(1);
    let quiet = _mm256_set1_epi32(0x40);
    for i in (0..n).step_by(8) {
        let v = _mm256_loadu_ps(src.as_ptr().add(i));
        let b = _mm256_castps_si256(v);
        let hi = _mm256_srli_epi32::<16>(b);
        let lsb = _mm256_and_si256(hi, one);
        let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(_mm256_add_epi32(b, bias), lsb));
        let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
        let out = _mm256_blendv_epi8(rounded, _mm256_or_si256(hi, quiet), nan);
        // Every lane is below 2^16: the unsigned saturating pack keeps it; the pack works per
        // 128-bit half, so the two halves are joined from the low quadwords.
        let packed = _mm256_packus_epi32(out, out);
        let joined = _mm256_permute4x64_epi64::<0b1000>(packed);
        _mm_storeu_si128(
            dst.as_mut_ptr().add(i) as *mut __m128i,
            _mm256_castsi256_si128(joined),
        );
    }
    n
}

/// Activations `x [m, k]` rounded to bf16 and packed into panels of [`MR`] rows: panel `p` holds
/// rows `p·MR .. p·MR + MR` as `[k/2 rounded up][MR]` words `bf16(x[2q]) | bf16(x[2q+1]) << 16`,
/// rows past `m` and the odd last element's partner zero.
pub struct PackedRowsBf16 {
    data: Vec<u32>,
    m: usize,
    k: usize,
}

impl PackedRowsBf16 {
    /// Rounds and packs `x [m, k]` (row-major).
    pub fn pack(x: &[f32], m: usize, k: usize) -> PackedRowsBf16 {
        assert!(x.len() >= m * k, "bf16 rows: x holds {} < {m}×{k}", x.len());
        let kp = k.div_ceil(2);
        let panels = m.div_ceil(MR);
        let mut data = vec![0u32; panels * kp * MR];
        data.par_chunks_mut((kp * MR).max(1))
            .enumerate()
            .for_each(|(p, panel)| {
                // Each row rounded into contiguous words first (a loop the compiler
                // vectorizes), then spread into the panel.
                let mut words = vec![0u32; kp];
                for r in 0..MR.min(m.saturating_sub(p * MR)) {
                    let row = &x[(p * MR + r) * k..(p * MR + r + 1) * k];
                    for (w, pair) in words.iter_mut().zip(row.chunks_exact(2)) {
                        *w = round_bf16(pair[0]) as u32 | (round_bf16(pair[1]) as u32) << 16;
                    }
                    if k % 2 == 1 {
                        words[kp - 1] = round_bf16(row[k - 1]) as u32;
                    }
                    for (q, &w) in words.iter().enumerate() {
                        panel[q * MR + r] = w;
                    }
                }
            });
        PackedRowsBf16 { data, m, k }
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.m
    }

    /// Depth (elements, not pairs).
    pub fn depth(&self) -> usize {
        self.k
    }

    /// Panel `p`'s pairs `q0 .. q0 + kcp` (`[kcp][MR]`).
    fn block(&self, p: usize, q0: usize, kcp: usize) -> &[u32] {
        let start = p * self.k.div_ceil(2) * MR + q0 * MR;
        &self.data[start..start + kcp * MR]
    }
}

thread_local! {
    /// The calling thread's packed weight panel, reused across tiles and calls.
    static PANEL: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    /// The calling thread's bf16 weight tile, reused across tiles and calls.
    static TILE: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
    /// The fallback path's widened tile.
    static WIDE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The many-row product in bf16 arithmetic: `y [m, n] = bf16(x) · bf16(W)ᵀ` with f32 sums, where
/// `to_bf16(j0, nb, tile)` fills `tile [nb, k]` with the bf16 bits of weight rows
/// `j0 .. j0 + nb` (rounded to nearest even where they are wider). Tiles of
/// [`crate::gemm_tile_rows`] weight rows run in parallel.
pub fn tiled_gemm_bf16(
    x: &[f32],
    y: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    to_bf16: impl Fn(usize, usize, &mut [u16]) + Sync,
) {
    tiled_gemm_bf16_with(crate::dispatch::bf16_path(), x, y, m, n, k, to_bf16)
}

/// [`tiled_gemm_bf16`] with the path chosen by the caller: AMX `tdpbf16ps` (panics where the
/// process cannot use AMX), `vdpbf16ps` (panics where the CPU lacks AVX512-BF16) or the rounded
/// operands through the f32 GEMM (the kernel bench and tests compare them).
pub fn tiled_gemm_bf16_with(
    path: Bf16Path,
    x: &[f32],
    y: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    to_bf16: impl Fn(usize, usize, &mut [u16]) + Sync,
) {
    let with_tile = |j0: usize, nb: usize, f: &mut dyn FnMut(&[u16])| {
        TILE.with(|buf| {
            let mut buf = buf.borrow_mut();
            if buf.len() < nb * k {
                buf.resize(nb * k, 0);
            }
            to_bf16(j0, nb, &mut buf[..nb * k]);
            f(&buf[..nb * k]);
        })
    };
    gemm_bf16_rows(path, x, y, m, n, k, &with_tile)
}

/// [`tiled_gemm_bf16`] for weights stored as bf16, `w [n, k]` (raw bits, row-major): the
/// packed kernels read each tile's rows where they are, without copying them into a tile
/// first (a copy of the whole weight matrix per product: 10 % of a MiniVLA call's time).
pub fn tiled_gemm_bf16_bits(x: &[f32], w: &[u16], y: &mut [f32], m: usize, n: usize, k: usize) {
    assert!(w.len() >= n * k, "bf16 gemm: w holds {} < {n}×{k}", w.len());
    let rows = |j0: usize, nb: usize, f: &mut dyn FnMut(&[u16])| f(&w[j0 * k..(j0 + nb) * k]);
    gemm_bf16_rows(crate::dispatch::bf16_path(), x, y, m, n, k, &rows)
}

/// The body of [`tiled_gemm_bf16_with`]: `rows(j0, nb, f)` calls `f` with the bf16 bits of
/// weight rows `j0 .. j0 + nb` (`[nb, k]`).
#[allow(clippy::type_complexity)]
fn gemm_bf16_rows(
    path: Bf16Path,
    x: &[f32],
    y: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    with_tile: &(dyn Fn(usize, usize, &mut dyn FnMut(&[u16])) + Sync),
) {
    assert!(x.len() >= m * k);
    assert!(
        path != Bf16Path::Dot || crate::dispatch::Features::detect().avx512_bf16,
        "vdpbf16ps asked for on a CPU without AVX512-BF16"
    );
    assert!(
        path != Bf16Path::Amx || crate::amx::available(),
        "AMX asked for where this process cannot use it"
    );
    // The packed kernels: the activations packed once, each thread's weight tile multiplied
    // into its columns of y.
    #[cfg(target_arch = "x86_64")]
    {
        type Kernel<'a> = Box<dyn Fn(&[u16], *mut f32, usize) + Sync + 'a>;
        // SAFETY (both kernels): the path's instructions were checked above, and columns
        // j0 .. j0 + nb of the m rows of y (row stride n) belong to the tile alone.
        let kernel: Option<Kernel> = match path {
            Bf16Path::Amx => {
                let a = crate::amx::PackedRowsAmx::pack(x, m, k);
                Some(Box::new(move |t, dst, nb| unsafe {
                    crate::amx::gemm(&a, t, dst, n, nb)
                }))
            }
            Bf16Path::Dot => {
                let a = PackedRowsBf16::pack(x, m, k);
                Some(Box::new(move |t, dst, nb| unsafe {
                    gemm_packed(&a, t, dst, n, nb)
                }))
            }
            Bf16Path::F32Gemm => None,
        };
        if let Some(kernel) = kernel {
            crate::for_each_output_tile(y, m, n, k, |j0, nb, dst| {
                with_tile(j0, nb, &mut |tile| kernel(tile, dst, nb))
            });
            return;
        }
    }
    // The same operands through the f32 GEMM.
    // SAFETY: round_slice_f32 writes all m·k elements.
    let mut xw = unsafe { crate::uninit_vec::<f32>(m * k) };
    round_slice_f32(&x[..m * k], &mut xw);
    crate::tiled_gemm(&xw, y, m, n, k, |j0, nb, wide| {
        with_tile(j0, nb, &mut |tile| widen(tile, Half::Bf16, wide))
    });
}

/// [`tiled_gemm_bf16`] for f32 weights stored depth-major, `w [k, n]` row-major (`y = x · w`,
/// a weight read transposed as in a linear's `dx = g · W`, or the activations of its
/// `dW = gᵀ · x`). On the AMX path each panel is rounded and packed straight from `w`
/// ([`crate::amx::gemm_depth_major`]), without the transposed copy; elsewhere `w` is transposed
/// once and multiplied as [`tiled_gemm_bf16`] does. The bits are those of [`tiled_gemm_bf16`]
/// on the transpose.
pub fn tiled_gemm_bf16_depth_major(
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
) {
    assert!(x.len() >= m * k && w.len() >= k * n);
    #[cfg(target_arch = "x86_64")]
    if crate::dispatch::bf16_path() == Bf16Path::Amx {
        let a = crate::amx::PackedRowsAmx::pack(x, m, k);
        crate::for_each_output_tile(y, m, n, k, |j0, nb, dst| {
            // SAFETY: AMX is the dispatched path (so available); w holds k rows of n ≥ j0 + nb
            // columns; columns j0 .. j0 + nb of the m rows of y (row stride n) belong to this
            // tile alone.
            unsafe { crate::amx::gemm_depth_major(&a, w, n, j0, dst, n, nb) }
        });
        return;
    }
    let wt = crate::untranspose(w, n, n, k);
    tiled_gemm_bf16(x, y, m, n, k, |j0, nb, t| {
        round_slice(&wt[j0 * k..(j0 + nb) * k], t)
    });
}

/// [`tiled_gemm_bf16_depth_major`] with the left operand stored transposed too: `y [m, n] =
/// xtᵀ · w` for `xt [k, m]` (row stride `ld ≥ m`) and `w [k, n]`, both row-major with the
/// depth as their rows (a linear's weight gradient `dW = gᵀ·x`). On the AMX path `xtᵀ` is
/// packed straight from `xt` ([`crate::amx::PackedRowsAmx::pack_transposed`]); elsewhere it
/// is transposed once. The bits are those of [`tiled_gemm_bf16_depth_major`] on the transpose.
pub fn tiled_gemm_bf16_transposed_lhs(
    xt: &[f32],
    ld: usize,
    w: &[f32],
    y: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
) {
    crate::check_transposed_lhs(xt, ld, w, m, n, k);
    #[cfg(target_arch = "x86_64")]
    if crate::dispatch::bf16_path() == Bf16Path::Amx {
        let a = crate::amx::PackedRowsAmx::pack_transposed(xt, k, m, ld);
        crate::for_each_output_tile(y, m, n, k, |j0, nb, dst| {
            // SAFETY: as in tiled_gemm_bf16_depth_major.
            unsafe { crate::amx::gemm_depth_major(&a, w, n, j0, dst, n, nb) }
        });
        return;
    }
    tiled_gemm_bf16_depth_major(&crate::untranspose(xt, ld, m, k), w, y, m, n, k);
}

/// `dst [m, nb] (row stride rs) = a · wᵀ` for bf16 weights `w [nb, k]` (raw bits, row-major),
/// single-threaded.
///
/// # Safety
/// The CPU must have AVX512-BF16 ([`crate::dispatch::Features::detect`]), and `dst` be valid for
/// writes of `a.rows()` rows of `nb` elements, `rs` apart, not written by anyone else meanwhile.
#[cfg(target_arch = "x86_64")]
pub unsafe fn gemm_packed(a: &PackedRowsBf16, w: &[u16], dst: *mut f32, rs: usize, nb: usize) {
    let (m, k) = (a.m, a.k);
    assert!(
        w.len() >= nb * k,
        "bf16 gemm: w holds {} < {nb}×{k}",
        w.len()
    );
    if crate::trivial_product(m, k, nb, dst, rs) {
        return;
    }
    let kp = k.div_ceil(2);
    let col_panels = nb.div_ceil(NR);
    let row_panels = m.div_ceil(MR);
    PANEL.with(|buf| {
        let mut buf = buf.borrow_mut();
        if buf.len() < KCP * NR {
            buf.resize(KCP * NR, 0);
        }
        let mut q0 = 0;
        while q0 < kp {
            let kcp = KCP.min(kp - q0);
            let first = q0 == 0;
            for jp in 0..col_panels {
                let cols = NR.min(nb - jp * NR);
                let bp = &mut buf[..kcp * NR];
                pack_pairs(&w[jp * NR * k..], k, cols, q0, kcp, bp);
                for ip in 0..row_panels {
                    let ap = a.block(ip, q0, kcp);
                    let rows = MR.min(m - ip * MR);
                    let c = dst.add(ip * MR * rs + jp * NR);
                    if rows == MR && cols == NR {
                        kernel_6x32(kcp, ap.as_ptr(), bp.as_ptr(), c, rs, !first);
                    } else {
                        let mut tile = [0f32; MR * NR];
                        kernel_6x32(kcp, ap.as_ptr(), bp.as_ptr(), tile.as_mut_ptr(), NR, false);
                        for r in 0..rows {
                            for j in 0..cols {
                                let o = c.add(r * rs + j);
                                let v = tile[r * NR + j];
                                *o = if first { v } else { *o + v };
                            }
                        }
                    }
                }
            }
            q0 += kcp;
        }
    });
}

/// Packs pairs `q0 .. q0 + kcp` of the first `cols` (≤ [`NR`]) rows of `w` (bf16 bits, row
/// length `k`) into one panel `[kcp][NR]` of words `w[j][2q] | w[j][2q+1] << 16`, the partner of
/// an odd `k`'s last element and the columns past `cols` zero.
pub(crate) fn pack_pairs(
    w: &[u16],
    k: usize,
    cols: usize,
    q0: usize,
    kcp: usize,
    panel: &mut [u32],
) {
    assert!(panel.len() >= kcp * NR && cols <= NR);
    assert!(cols == 0 || w.len() >= (cols - 1) * k + (2 * (q0 + kcp)).min(k));
    for g in 0..NR / 16 {
        let gc = cols.saturating_sub(g * 16).min(16);
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if gc == 16 && k.is_multiple_of(2) && crate::has_avx2() {
            done = kcp - kcp % 8;
            // SAFETY: AVX2 checked; rows g·16 .. g·16 + 16 of w hold pairs q0 .. q0 + kcp (k
            // even, so every pair is whole) and the panel kcp × NR words (asserted above);
            // the transpose only moves 32-bit lanes, whatever their bits.
            unsafe {
                crate::sgemm::transpose_16xk_avx2(
                    w.as_ptr().add(g * 16 * k + 2 * q0) as *const f32,
                    k / 2,
                    done,
                    panel.as_mut_ptr().add(g * 16) as *mut f32,
                    NR,
                )
            };
        }
        for j in g * 16..g * 16 + gc {
            let row = &w[j * k..(j + 1) * k];
            for q in done..kcp {
                let e = 2 * (q0 + q);
                let lo = row[e] as u32;
                let hi = row.get(e + 1).map_or(0, |&v| v as u32);
                panel[q * NR + j] = lo | hi << 16;
            }
        }
    }
    if cols < NR {
        for q in 0..kcp {
            panel[q * NR + cols..(q + 1) * NR].fill(0);
        }
    }
}

/// The 6×32 micro-kernel: `c[6, 32] (row stride rs) (+)= Σ_q a[q][r] · b[q][j]` over bf16
/// pairs, `vdpbf16ps`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel_6x32(
    kcp: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    rs: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    let (mut a, mut b) = (a, b);
    for _ in 0..kcp {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b as *const __m512i));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(16) as *const __m512i));
        for (r, acc) in acc.iter_mut().enumerate() {
            let ar: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(r) as i32));
            acc[0] = _mm512_dpbf16_ps(acc[0], ar, b0);
            acc[1] = _mm512_dpbf16_ps(acc[1], ar, b1);
        }
        a = a.add(MR);
        b = b.add(NR);
    }
    for (r, acc) in acc.iter().enumerate() {
        let row = c.add(r * rs);
        let (mut v0, mut v1) = (acc[0], acc[1]);
        if accumulate {
            v0 = _mm512_add_ps(v0, _mm512_loadu_ps(row));
            v1 = _mm512_add_ps(v1, _mm512_loadu_ps(row.add(16)));
        }
        _mm512_storeu_ps(row, v0);
        _mm512_storeu_ps(row.add(16), v1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::Features;
    use crate::test_util::{lcg, SHAPES};

    fn widen1(b: u16) -> f64 {
        f32::from_bits((b as u32) << 16) as f64
    }

    /// `bf16(x) · bf16(w)ᵀ` in f64.
    fn reference(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k)
                    .map(|p| widen1(round_bf16(x[i * k + p])) * widen1(round_bf16(w[j * k + p])))
                    .sum();
            }
        }
        y
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        // 1 + 2⁻⁸ lies halfway between 1 and 1 + 2⁻⁷: ties go to the even mantissa (1).
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3·2⁻⁸ lies halfway between 1 + 2⁻⁷ (odd) and 1 + 2⁻⁶: up to the even one.
        assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        // Just above the tie rounds up.
        assert_eq!(round_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(round_bf16(-2.0), 0xc000);
        assert_eq!(round_bf16(f32::INFINITY), 0x7f80);
        assert_eq!(round_bf16(f32::MAX), 0x7f80, "overflow rounds to infinity");
        assert!(f32::from_bits((round_bf16(f32::NAN) as u32) << 16).is_nan());
        // Agrees with the half crate's conversion on ordinary values.
        let mut seed = 3u64;
        for _ in 0..10_000 {
            let v = lcg(&mut seed) * 1e3;
            assert_eq!(round_bf16(v), half::bf16::from_f32(v).to_bits(), "{v}");
        }
    }

    /// The vector rounding paths give the scalar rule's bits on ties, infinities, NaNs (both
    /// signs, signalling and payloads), denormals and ordinary values, with ragged tails.
    #[test]
    fn vector_rounding_equals_the_scalar_rule() {
        let mut seed = 9u64;
        let mut src: Vec<f32> = [
            0x3f80_8000u32, // tie to even (down)
            0x3f81_8000,    // tie to even (up)
            0x7f80_0000,    // +inf
            0xff80_0000,    // -inf
            0x7fc0_0000,    // quiet NaN
            0x7f80_0001,    // signalling NaN
            0xffa0_1234,    // negative NaN with a payload
            0x0000_0001,    // smallest denormal
            0x807f_ffff,    // largest negative denormal
            0x7f7f_ffff,    // f32::MAX: rounds to +inf
            0x0000_0000,
            0x8000_0000,
        ]
        .iter()
        .map(|&b| f32::from_bits(b))
        .collect();
        src.extend((0..1000).map(|_| lcg(&mut seed) * 1e4));
        src.extend((0..1000).map(|_| f32::from_bits(lcg(&mut seed).to_bits() ^ 0x5a5a)));
        let want: Vec<u16> = src.iter().map(|&v| round_bf16(v)).collect();
        for n in [0, 1, 7, 8, 15, 16, 17, 33, src.len()] {
            let mut got = vec![0u16; n];
            round_slice(&src[..n], &mut got);
            assert_eq!(got, want[..n], "round_slice, {n} elements");
        }
        #[cfg(target_arch = "x86_64")]
        {
            let f = crate::dispatch::Features::detect();
            let check = |name: &str, path: unsafe fn(&[f32], &mut [u16]) -> usize| {
                let mut got = vec![0u16; src.len()];
                // SAFETY: called only where the CPU has the path's instructions.
                let done = unsafe { path(&src, &mut got) };
                assert!(done + 16 > src.len(), "{name} left {done} of {}", src.len());
                assert_eq!(got[..done], want[..done], "{name}");
            };
            if f.avx512 {
                check("avx-512", round_slice_avx512);
            } else {
                eprintln!("SKIPPED: AVX-512F rounding (this CPU has no AVX-512F)");
            }
            if f.avx2 {
                check("avx2", round_slice_avx2);
            } else {
                eprintln!("SKIPPED: AVX2 rounding (this CPU has no AVX2)");
            }
        }
    }

    #[test]
    fn packed_pairs_match_the_scalar_layout() {
        let mut seed = 5u64;
        for k in [77usize, 64, 530] {
            let w: Vec<u16> = (0..NR * k).map(|_| round_bf16(lcg(&mut seed))).collect();
            let kp = k.div_ceil(2);
            for (cols, q0, kcp) in [
                (32, 0, kp),
                (32, 3, kp - 3),
                (20, 1, 9),
                (16, 0, 8),
                (5, 2, 7),
            ] {
                let mut panel = vec![u32::MAX; kcp * NR];
                pack_pairs(&w, k, cols, q0, kcp, &mut panel);
                for q in 0..kcp {
                    for j in 0..NR {
                        let e = 2 * (q0 + q);
                        let want = if j < cols {
                            let hi = if e + 1 < k {
                                w[j * k + e + 1] as u32
                            } else {
                                0
                            };
                            w[j * k + e] as u32 | hi << 16
                        } else {
                            0
                        };
                        assert_eq!(
                            panel[q * NR + j],
                            want,
                            "k={k} cols={cols} q0={q0} ({q},{j})"
                        );
                    }
                }
            }
        }
    }

    /// The dispatched product (vdpbf16ps where the CPU has it, else the f32 fallback, which is
    /// also checked explicitly) against the f64 product of the bf16-rounded operands.
    #[test]
    fn matches_f64_reference_of_rounded_operands_on_ragged_shapes() {
        let mut seed = 11u64;
        let mut shapes = SHAPES.to_vec();
        shapes.extend([(6, 32, 512), (13, 70, 600), (257, 48, 301), (30, 1152, 20)]);
        let native = Features::detect().avx512_bf16;
        if !native {
            eprintln!("skipped: the AVX512-BF16 vdpbf16ps kernel (no avx512_bf16 on this CPU); testing the f32 fallback only");
        }
        let amx = crate::amx::available();
        if !amx {
            eprintln!("skipped: the AMX tdpbf16ps kernel (no AMX-BF16 usable by this process)");
        }
        for (m, n, k) in shapes {
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed) * 3.0).collect();
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
            let want = reference(&x, &w, m, n, k);
            let tol = 3e-5 * (k as f64).sqrt().max(1.0) * 3.0;
            let mut paths = vec![("dispatched", None), ("f32 GEMM", Some(Bf16Path::F32Gemm))];
            if native {
                paths.push(("vdpbf16ps", Some(Bf16Path::Dot)));
            }
            if amx {
                paths.push(("AMX", Some(Bf16Path::Amx)));
            }
            for (name, path) in paths {
                let mut y = vec![f32::NAN; m * n];
                let tile =
                    |j0: usize, nb: usize, t: &mut [u16]| round_slice(&w[j0 * k..(j0 + nb) * k], t);
                match path {
                    None => tiled_gemm_bf16(&x, &mut y, m, n, k, tile),
                    Some(path) => tiled_gemm_bf16_with(path, &x, &mut y, m, n, k, tile),
                }
                for (idx, (got, want)) in y.iter().zip(&want).enumerate() {
                    assert!(
                        (*got as f64 - want).abs() <= tol,
                        "{name} m={m} n={n} k={k} at {idx}: {got} vs {want}"
                    );
                }
            }
            let mut wb = vec![0u16; n * k];
            round_slice(&w, &mut wb);
            // A kernel called directly, into a strided destination whose gaps must survive.
            let rs = n + 3;
            let check_strided = |name: &str, y: &[f32]| {
                for i in 0..m {
                    for j in 0..n {
                        let got = y[i * rs + j] as f64;
                        assert!(
                            (got - want[i * n + j]).abs() <= tol,
                            "{name} m={m} n={n} k={k} ({i},{j}): {got} vs {}",
                            want[i * n + j]
                        );
                    }
                    for j in n..rs {
                        assert!(y[i * rs + j].is_nan(), "{name}: gap ({i},{j}) written");
                    }
                }
            };
            #[cfg(target_arch = "x86_64")]
            if native {
                let mut y = vec![f32::NAN; m * rs];
                let a = PackedRowsBf16::pack(&x, m, k);
                // SAFETY: AVX512-BF16 checked; y holds m rows of stride rs ≥ n.
                unsafe { gemm_packed(&a, &wb, y.as_mut_ptr(), rs, n) };
                check_strided("vdpbf16ps", &y);
            }
            #[cfg(target_arch = "x86_64")]
            if amx {
                let mut y = vec![f32::NAN; m * rs];
                let a = crate::amx::PackedRowsAmx::pack(&x, m, k);
                // SAFETY: AMX available; y holds m rows of stride rs ≥ n.
                unsafe { crate::amx::gemm(&a, &wb, y.as_mut_ptr(), rs, n) };
                check_strided("AMX", &y);
                // Each row alone gives the bits it gets in the whole block.
                for i in [0, m / 2, m - 1] {
                    let one = crate::amx::PackedRowsAmx::pack(&x[i * k..(i + 1) * k], 1, k);
                    let mut row = vec![0f32; n];
                    // SAFETY: as above, one row.
                    unsafe { crate::amx::gemm(&one, &wb, row.as_mut_ptr(), n, n) };
                    let block: Vec<u32> =
                        y[i * rs..i * rs + n].iter().map(|v| v.to_bits()).collect();
                    let alone: Vec<u32> = row.iter().map(|v| v.to_bits()).collect();
                    assert_eq!(block, alone, "AMX m={m} n={n} k={k}: row {i} differs alone");
                }
            }
        }
    }

    /// Depth-major weights (`w [k, n]`) give the bits of the row-major product on their
    /// transpose, on ragged shapes, with NaN and infinite weights in the mix; on the AMX path
    /// this checks the packing straight from the depth-major rows (vector and scalar parts).
    #[test]
    fn depth_major_weights_give_the_bits_of_the_transpose() {
        if crate::dispatch::bf16_path() != Bf16Path::Amx {
            eprintln!("skipped: AMX packing from depth-major rows (not the dispatched path here); checking the transposing fallback");
        }
        let mut seed = 21u64;
        for (m, n, k) in [
            (8, 32, 4),
            (33, 70, 61),
            (40, 96, 256),
            (9, 33, 1),
            (64, 200, 77),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed) * 3.0).collect();
            let mut w: Vec<f32> = (0..k * n).map(|_| lcg(&mut seed)).collect();
            if k > 2 {
                w[n + 3] = f32::NAN;
                w[2 * n + 5] = f32::INFINITY;
            }
            let mut wt = vec![0f32; n * k];
            crate::transpose::transpose(&w, k, n, n, &mut wt);
            let mut want = vec![0f32; m * n];
            tiled_gemm_bf16(&x, &mut want, m, n, k, |j0, nb, t| {
                round_slice(&wt[j0 * k..(j0 + nb) * k], t)
            });
            let mut got = vec![0f32; m * n];
            tiled_gemm_bf16_depth_major(&x, &w, &mut got, m, n, k);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "m={m} n={n} k={k}");
        }
    }

    /// Stored bf16 weights read in place give the bits of the same weights copied into tiles
    /// first, on ragged shapes (partial tiles and panels, odd depths), on the dispatched path.
    #[test]
    fn bf16_weights_read_in_place_give_the_bits_of_the_copied_tiles() {
        let mut seed = 31u64;
        for (m, n, k) in [
            (8, 1, 1),
            (33, 70, 61),
            (40, 300, 256),
            (9, 33, 3),
            (64, 513, 77),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed) * 3.0).collect();
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
            let mut wb = vec![0u16; n * k];
            round_slice(&w, &mut wb);
            let mut want = vec![0f32; m * n];
            tiled_gemm_bf16(&x, &mut want, m, n, k, |j0, nb, t| {
                t.copy_from_slice(&wb[j0 * k..(j0 + nb) * k])
            });
            let mut got = vec![f32::NAN; m * n];
            tiled_gemm_bf16_bits(&x, &wb, &mut got, m, n, k);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "m={m} n={n} k={k}");
        }
        eprintln!("checked on the {:?} path", crate::dispatch::bf16_path());
    }

    /// Rounding really happens: with operands that bf16 cannot hold, the result differs from the
    /// f32 product and equals the product of the rounded operands.
    #[test]
    fn rounds_operands_that_bf16_cannot_hold() {
        let (m, n, k) = (8, 16, 4);
        let x = vec![1.0 + 1.0 / 512.0; m * k]; // rounds to 1.0
        let w = vec![1.0f32; n * k];
        let mut y = vec![0f32; m * n];
        tiled_gemm_bf16(&x, &mut y, m, n, k, |j0, nb, t| {
            round_slice(&w[j0 * k..(j0 + nb) * k], t)
        });
        assert!(y.iter().all(|&v| v == 4.0), "{y:?}");
    }
}
