//! Many-row (prefill, vision) `y = x · Wᵀ` for block-quantized weights with **int8
//! activations**: the integer dot-product path of llama.cpp's `Q8_0 × Q8_0` and `Q4_0 × Q8_0`.
//!
//! 1. The activations are quantized once per matmul, row by row, to int8 blocks of 32
//!    (`d_x = max|x| / 127`, round to nearest even, the last block zero-padded), as GGUF's `Q8_0`
//!    activations ([`QuantActs`]).
//! 2. Every (activation row, weight row, block) triple is one integer dot product of 32 int8
//!    pairs, done with `vpmaddubsw` (unsigned × signed bytes → pairs summed in int16) and
//!    `vpmaddwd` by ones (→ int32), then converted to f32 and accumulated with the product of the
//!    two block scales by one FMA:
//!    - `q8_0` weights use the sign trick (`|w| · sign(x, w)`, as llama.cpp's AVX2
//!      `mul_sum_i8_pairs`): at most `2·127·127 = 32258` per int16 pair, no saturation;
//!    - `q4_0` weights meet the activations as their unsigned nibbles `q ∈ [0, 15]` (at most
//!      `2·15·127` per pair), **two blocks per step**: the 32 bytes of blocks `2p, 2p+1` unpack
//!      with one mask and one shift, meet pair-interleaved activations in two `vpmaddubsw` whose
//!      int16 results can be added, and one `vpmaddwd`/convert/FMA serves both blocks (lanes
//!      0..4 and 4..8). The offset 8 is removed afterwards in f32 with the activation block sums:
//!      `Σ_b d_w·d_x·(Σ q·x_q) − 8·Σ_b d_w·(d_x·Σ x_q)`, the second term a matmul over blocks
//!      (32× fewer operations).
//! 3. A register-blocked micro-kernel takes [`MR`] activation rows × [`NR`] weight rows per step
//!    (8 vector accumulators): 5 vector instructions per (row, weight, block) for `q8_0` (the
//!    block-scale products precomputed into a small buffer), 3.5 for `q4_0` (plus the nibble
//!    unpacking, shared by the rows), against 4 f32 FMAs for the same 32 products. Work is split
//!    over weight-row panels ([`panel_rows`]) with rayon; within a panel the inner dimension is
//!    cut into chunks of [`KC_BLOCKS`] blocks so the micro-tile's activations stay in L1 and the
//!    panel's weights in L2; results are written straight into `y` (each panel owns its
//!    columns).
//!
//! On AVX2 without VNNI (Zen 3) the `q4_0` kernel beats dequantize + f32 `gemm` by 1.25–1.4×;
//! the `q8_0` kernel is 5–20 % slower than it. The int16 kernel of [`super::i16_gemm`] beats
//! both by 1.2–1.4×, so the dispatcher ([`super::quant_matmul::matmul`]) uses this module only
//! for `q4_0` on CPUs without AVX2, through its portable micro-kernel (`docs/kernels.md`).
//!
//! For `q8_0`, each output element is computed by the same instruction sequence whatever `m`
//! and whatever the other rows (the quantization is per row), so the path is row-independent;
//! for `q4_0` the offset term goes through `gemm`, whose summation order depends on `m` (only the
//! decode path promises row independence).
//!
//! Runtime dispatch: AVX2 when the CPU has it, otherwise a portable kernel with the same integer
//! block products (the f32 summation order differs).

use super::OutPtr;
use crate::quant::{QuantFormat, QuantMatrix, BLOCK};
use rayon::prelude::*;

/// Activation rows per micro-tile.
pub const MR: usize = 4;
/// Weight rows per micro-tile.
pub const NR: usize = 2;
/// Blocks of 32 per inner-dimension chunk (`4 rows × 128 × 32` bytes = 16 KiB of activations,
/// half of L1).
pub const KC_BLOCKS: usize = 128;
/// The largest weight-row panel of one task (64 rows × 4096 bytes = 256 KiB of `q8_0` weights
/// per chunk, half of a Zen 3 core's L2).
pub const MAX_PANEL_ROWS: usize = 64;

/// Activations quantized to int8 blocks of 32 (GGUF `Q8_0` semantics, f32 scales), laid out for
/// the weight format they will meet.
#[derive(Debug, Clone)]
pub struct QuantActs {
    /// The weight format the layout is for.
    pub format: QuantFormat,
    /// Rows.
    pub m: usize,
    /// Blocks per row (`ceil(k / 32)`).
    pub bpr: usize,
    /// Bytes per row of `qs`: `bpr·32` for `q8_0`, `ceil(bpr / 2)·64` for `q4_0`.
    pub stride: usize,
    /// Quants, `m` rows of `stride` bytes, the padding zero. For `q8_0` block `b` is bytes
    /// `32b .. 32b + 32`; for `q4_0`, blocks `2p` and `2p + 1` are interleaved as
    /// `[2p: 0..16, 2p+1: 0..16, 2p: 16..32, 2p+1: 16..32]` to meet the nibbles of two
    /// consecutive weight blocks unpacked by one mask and one shift (an odd last block is
    /// paired with zeros).
    pub qs: Vec<i8>,
    /// Block scales `d = max|x| / 127`, `[m, bpr]`.
    pub d: Vec<f32>,
    /// `d · Σ q` of each block, `[m, bpr]` (removes the `q4_0` nibble offset).
    pub dsum: Vec<f32>,
    /// `q4_0` only: the scales of each block pair spread over 8 lanes (`d[2p]` ×4, `d[2p+1]`
    /// ×4), `[m, ceil(bpr / 2)·8]`, to meet the lanes of a pair's block sums.
    pub dxe: Vec<f32>,
}

impl QuantActs {
    /// Quantizes `x [m, k]` row by row (rows in parallel) for weights in `format`.
    pub fn new(format: QuantFormat, x: &[f32], m: usize, k: usize) -> QuantActs {
        assert_eq!(x.len(), m * k);
        let bpr = k.div_ceil(BLOCK);
        let stride = match format {
            QuantFormat::Q8_0 => bpr * BLOCK,
            QuantFormat::Q4_0 => bpr.div_ceil(2) * 2 * BLOCK,
        };
        let mut a = QuantActs {
            format,
            m,
            bpr,
            stride,
            qs: vec![0i8; m * stride],
            d: vec![0f32; m * bpr],
            dsum: vec![0f32; m * bpr],
            dxe: Vec::new(),
        };
        if k == 0 || m == 0 {
            return a;
        }
        a.qs.par_chunks_mut(stride)
            .zip(a.d.par_chunks_mut(bpr))
            .zip(a.dsum.par_chunks_mut(bpr))
            .zip(x.par_chunks(k))
            .for_each(|(((q, d), ds), row)| {
                quantize_row(row, q, d, ds);
                if format == QuantFormat::Q4_0 {
                    interleave_pairs(q);
                }
            });
        if format == QuantFormat::Q4_0 {
            a.dxe = a.d.chunks(bpr).flat_map(spread_pairs).collect();
        }
        a
    }
}

/// Per block pair, 8 lanes: the first block's value ×4, then the second's (0 past the end).
fn spread_pairs(d: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; d.len().div_ceil(2) * 8];
    for (b, &v) in d.iter().enumerate() {
        out[(b / 2) * 8 + (b % 2) * 4..][..4].fill(v);
    }
    out
}

/// Reorders a row of plain blocks (`q.len()` a multiple of 64) into the `q4_0` pair layout.
fn interleave_pairs(q: &mut [i8]) {
    for pair in q.chunks_exact_mut(2 * BLOCK) {
        let mut t = [0i8; 2 * BLOCK];
        for h in 0..2 {
            t[h * 16..h * 16 + 16].copy_from_slice(&pair[h * 32..h * 32 + 16]);
            t[32 + h * 16..32 + h * 16 + 16].copy_from_slice(&pair[h * 32 + 16..h * 32 + 32]);
        }
        pair.copy_from_slice(&t);
    }
}

/// Quantizes one row (`q` is at least `bpr·32` long, `d` and `dsum` `bpr`).
pub fn quantize_row(row: &[f32], q: &mut [i8], d: &mut [f32], dsum: &mut [f32]) {
    let k = row.len();
    for b in 0..d.len() {
        let src = &row[b * BLOCK..((b + 1) * BLOCK).min(k)];
        let mut v = [0f32; BLOCK];
        v[..src.len()].copy_from_slice(src);
        let dst: &mut [i8; BLOCK] = (&mut q[b * BLOCK..(b + 1) * BLOCK]).try_into().unwrap();
        let sum = quantize_block(&v, dst, &mut d[b]);
        dsum[b] = d[b] * sum as f32;
    }
}

/// Quantizes one block of 32: `d = max|x| / 127`, `q = round_ties_even(x · (127 / max|x|))`
/// (the AVX2 conversion's rounding, so both paths give the same bits). Returns `Σ q`.
pub(crate) fn quantize_block(v: &[f32; BLOCK], dst: &mut [i8; BLOCK], d: &mut f32) -> i32 {
    #[cfg(target_arch = "x86_64")]
    {
        if super::has_avx2() {
            // SAFETY: the CPU supports AVX2 (checked by has_avx2); the arrays have 32 elements.
            return unsafe { quantize_block_avx2(v, dst, d) };
        }
    }
    quantize_block_portable(v, dst, d)
}

/// Portable form of the block quantization (the AVX2 form gives the same bits).
pub fn quantize_block_portable(v: &[f32; BLOCK], dst: &mut [i8; BLOCK], d: &mut f32) -> i32 {
    let amax = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    *d = amax / 127.0;
    let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for (o, &x) in dst.iter_mut().zip(v) {
        let q = (x * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
        sum += q as i32;
        *o = q;
    }
    sum
}

/// A block of 32 in four vectors, and its largest magnitude.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub(super) unsafe fn load_block_amax_avx2(
    v: &[f32; BLOCK],
) -> ([std::arch::x86_64::__m256; 4], f32) {
    use std::arch::x86_64::*;
    let p = v.as_ptr();
    let x: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(p.add(8 * i)));
    let absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let m = _mm256_max_ps(
        _mm256_max_ps(_mm256_and_ps(x[0], absmask), _mm256_and_ps(x[1], absmask)),
        _mm256_max_ps(_mm256_and_ps(x[2], absmask), _mm256_and_ps(x[3], absmask)),
    );
    let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    (x, _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2))))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_block_avx2(v: &[f32; BLOCK], dst: &mut [i8; BLOCK], d: &mut f32) -> i32 {
    use std::arch::x86_64::*;
    let (x, amax) = load_block_amax_avx2(v);
    *d = amax / 127.0;
    let inv = _mm256_set1_ps(if amax > 0.0 { 127.0 / amax } else { 0.0 });
    let (lim, nlim) = (_mm256_set1_ps(127.0), _mm256_set1_ps(-127.0));
    let q: [__m256i; 4] = std::array::from_fn(|i| {
        let s = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(x[i], inv), nlim), lim);
        _mm256_cvtps_epi32(s)
    });
    let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    let s4 = _mm_add_epi32(
        _mm256_castsi256_si128(sum),
        _mm256_extracti128_si256::<1>(sum),
    );
    let s2 = _mm_add_epi32(s4, _mm_shuffle_epi32::<0b01_00_11_10>(s4));
    let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32::<0b10_11_00_01>(s2));
    // Packing works per 128-bit lane; the permutation restores the element order.
    let p16 = _mm256_packs_epi16(
        _mm256_packs_epi32(q[0], q[1]),
        _mm256_packs_epi32(q[2], q[3]),
    );
    let out = _mm256_permutevar8x32_epi32(p16, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(dst.as_mut_ptr() as *mut __m256i, out);
    _mm_cvtsi128_si32(s1)
}

/// Rows of a weight panel (one parallel task) for `n` weight rows: at most
/// [`MAX_PANEL_ROWS`], at least two panels per thread, and the number of panels a multiple of
/// the thread count (so that the threads finish together).
pub fn panel_rows(n: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let panels = n
        .div_ceil(MAX_PANEL_ROWS)
        .max(2 * threads)
        .next_multiple_of(threads);
    n.div_ceil(panels)
        .next_multiple_of(NR)
        .clamp(NR, MAX_PANEL_ROWS)
}

/// `y [m, n] = x · Wᵀ` for activations quantized by [`QuantActs::new`] (overwrites `y`).
pub fn matmul(a: &QuantActs, w: &QuantMatrix, y: &mut [f32]) {
    let (m, n) = (a.m, w.rows());
    assert_eq!(
        a.bpr,
        w.blocks_per_row(),
        "activation and weight widths differ"
    );
    assert_eq!(y.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    y.fill(0.0);
    if a.bpr == 0 {
        return;
    }
    let simd = cfg!(target_arch = "x86_64") && super::has_avx2();
    super::for_each_column_panel(y, n, panel_rows(n), |j0, ncur, out| {
        // SAFETY: the panel only touches columns j0 .. j0 + ncur of the m rows of y.
        unsafe { panel(a, w, j0, ncur, out, n, simd) };
    });
}

/// One weight panel: rows `j0 .. j0 + nc` of `w` against all activation rows.
///
/// # Safety
/// `out` must point to an `[a.m, n]` buffer of which no one else touches columns
/// `j0 .. j0 + nc` meanwhile.
unsafe fn panel(
    a: &QuantActs,
    w: &QuantMatrix,
    j0: usize,
    nc: usize,
    out: OutPtr,
    n: usize,
    simd: bool,
) {
    let (m, bpr, fmt) = (a.m, a.bpr, w.format());
    let bb = fmt.block_bytes();
    // The panel's weight scales in f32, each row padded to a multiple of 8 blocks.
    let bp8 = bpr.next_multiple_of(8);
    let mut dw = vec![0f32; nc * bp8];
    for c in 0..nc {
        for (o, v) in dw[c * bp8..].iter_mut().zip(w.row_scales(j0 + c)) {
            *o = v.to_f32();
        }
    }
    if fmt == QuantFormat::Q4_0 {
        // The nibble offset: out[r, c] = −8 · Σ_b d_w[c, b] · (d_x · Σ x_q)[r, b], a matmul over
        // blocks, written first; the block products are added to it below.
        let mut corr = vec![0f32; m * nc];
        super::gemm_single(
            &a.dsum,
            &dw_unpadded(&dw, nc, bp8, bpr),
            &mut corr,
            nc,
            m,
            nc,
            bpr,
        );
        for r in 0..m {
            let row = out.0.add(r * n + j0);
            for c in 0..nc {
                *row.add(c) = -8.0 * corr[r * nc + c];
            }
        }
    }
    if fmt == QuantFormat::Q4_0 {
        panel_q4(a, w, j0, nc, &dw, bp8, out, n, simd);
        return;
    }
    let kp = a.stride;
    let mut sc = vec![0f32; MR * NR * KC_BLOCKS];
    let mut kb0 = 0;
    while kb0 < bpr {
        let kb = KC_BLOCKS.min(bpr - kb0);
        let kb8 = kb.next_multiple_of(8);
        let mut r0 = 0;
        while r0 < m {
            let rr = MR.min(m - r0);
            // This row group's activation scales for the chunk, zero-padded to kb8.
            let mut dx = [[0f32; KC_BLOCKS]; MR];
            for (r, d) in dx.iter_mut().enumerate().take(rr) {
                d[..kb].copy_from_slice(&a.d[(r0 + r) * bpr + kb0..][..kb]);
            }
            let mut c0 = 0;
            while c0 < nc {
                let cc = NR.min(nc - c0);
                // Block-scale products, laid out [r][c][b] with a stride of kb8.
                for (r, dxr) in dx.iter().enumerate().take(rr) {
                    for c in 0..cc {
                        let dwc = &dw[(c0 + c) * bp8 + kb0..][..kb8];
                        let dst = &mut sc[(r * NR + c) * kb8..][..kb8];
                        for ((o, x), w) in dst.iter_mut().zip(&dxr[..kb8]).zip(dwc) {
                            *o = x * w;
                        }
                    }
                }
                let xp = a.qs.as_ptr().add(r0 * kp + kb0 * BLOCK);
                let wp = w.qs().as_ptr().add((j0 + c0) * bpr * bb + kb0 * bb);
                let ws = bpr * bb;
                let mut res = [[0f32; NR]; MR];
                micro(rr, cc, xp, kp, wp, ws, kb, kb8, &sc, &mut res, simd);
                for (r, res) in res.iter().enumerate().take(rr) {
                    let row = out.0.add((r0 + r) * n + j0 + c0);
                    for (c, v) in res.iter().enumerate().take(cc) {
                        *row.add(c) += v;
                    }
                }
                c0 += cc;
            }
            r0 += rr;
        }
        kb0 += kb;
    }
}

/// The `q4_0` panel: two blocks per step (see [`micro_q4_avx2`]), the scales multiplied in the
/// kernel from their 8-lane spread forms.
///
/// # Safety
/// As [`panel`].
#[allow(clippy::too_many_arguments)]
unsafe fn panel_q4(
    a: &QuantActs,
    w: &QuantMatrix,
    j0: usize,
    nc: usize,
    dw: &[f32],
    bp8: usize,
    out: OutPtr,
    n: usize,
    simd: bool,
) {
    let (m, bpr) = (a.m, a.bpr);
    let np = bpr.div_ceil(2);
    let dwe: Vec<f32> = (0..nc)
        .flat_map(|c| spread_pairs(&dw[c * bp8..c * bp8 + bpr]))
        .collect();
    let ws = bpr * (BLOCK / 2);
    let mut kb0 = 0;
    while kb0 < bpr {
        let kb = KC_BLOCKS.min(bpr - kb0);
        let p0 = kb0 / 2;
        let mut r0 = 0;
        while r0 < m {
            let rr = MR.min(m - r0);
            let mut c0 = 0;
            while c0 < nc {
                let cc = NR.min(nc - c0);
                let k = Q4Tile {
                    xp: a.qs.as_ptr().add(r0 * a.stride + p0 * 2 * BLOCK),
                    xs: a.stride,
                    dxe: a.dxe.as_ptr().add(r0 * np * 8 + p0 * 8),
                    wp: w.qs().as_ptr().add((j0 + c0) * ws + kb0 * (BLOCK / 2)),
                    ws,
                    dwe: dwe.as_ptr().add(c0 * np * 8 + p0 * 8),
                    es: np * 8,
                    kb,
                };
                let mut res = [[0f32; NR]; MR];
                micro_q4(&k, rr, cc, &mut res, simd);
                for (r, res) in res.iter().enumerate().take(rr) {
                    let row = out.0.add((r0 + r) * n + j0 + c0);
                    for (c, v) in res.iter().enumerate().take(cc) {
                        *row.add(c) += v;
                    }
                }
                c0 += cc;
            }
            r0 += rr;
        }
        kb0 += kb;
    }
}

/// A `q4_0` micro-tile's operands: activation rows at `xp` (pair layout, `xs` bytes apart) with
/// spread scales at `dxe`, weight rows at `wp` (`ws` bytes apart) with spread scales at `dwe`
/// (both scale arrays `es` floats apart), over `kb` blocks (`kb` odd only at the row's end).
struct Q4Tile {
    xp: *const i8,
    xs: usize,
    dxe: *const f32,
    wp: *const u8,
    ws: usize,
    dwe: *const f32,
    es: usize,
    kb: usize,
}

/// Dispatches the `q4_0` micro-kernel for an `rr × cc` micro-tile: `res[r][c] = Σ_b d_x·d_w ·
/// Σ_e nibble[c, b, e] · x_q[r, b, e]`.
///
/// # Safety
/// `k` must describe `rr` activation rows and `cc` weight rows of `k.kb` blocks.
unsafe fn micro_q4(k: &Q4Tile, rr: usize, cc: usize, res: &mut [[f32; NR]; MR], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        match (rr, cc) {
            (4, 2) => micro_q4_avx2::<4, 2>(k, res),
            (3, 2) => micro_q4_avx2::<3, 2>(k, res),
            (2, 2) => micro_q4_avx2::<2, 2>(k, res),
            (1, 2) => micro_q4_avx2::<1, 2>(k, res),
            (4, _) => micro_q4_avx2::<4, 1>(k, res),
            (3, _) => micro_q4_avx2::<3, 1>(k, res),
            (2, _) => micro_q4_avx2::<2, 1>(k, res),
            _ => micro_q4_avx2::<1, 1>(k, res),
        }
        return;
    }
    let _ = simd;
    for (r, res) in res.iter_mut().enumerate().take(rr) {
        for (c, res) in res.iter_mut().enumerate().take(cc) {
            let mut acc = 0f32;
            for b in 0..k.kb {
                let (p, h) = (b / 2, b % 2);
                let x = k.xp.add(r * k.xs + p * 2 * BLOCK + h * 16);
                let wq = k.wp.add(c * k.ws + b * (BLOCK / 2));
                let mut s = 0i32;
                for e in 0..BLOCK / 2 {
                    let byte = *wq.add(e);
                    s += (byte & 0x0F) as i32 * *x.add(e) as i32;
                    s += (byte >> 4) as i32 * *x.add(32 + e) as i32;
                }
                let lane = p * 8 + h * 4;
                acc += s as f32 * (*k.dxe.add(r * k.es + lane) * *k.dwe.add(c * k.es + lane));
            }
            *res = acc;
        }
    }
}

/// `dw [nc, bp8]` without its padding, `[nc, bpr]`.
fn dw_unpadded(dw: &[f32], nc: usize, bp8: usize, bpr: usize) -> Vec<f32> {
    (0..nc)
        .flat_map(|c| dw[c * bp8..c * bp8 + bpr].iter().copied())
        .collect()
}

/// Dispatches the `q8_0` micro-kernel for an `rr × cc` micro-tile (`rr ≤ MR`, `cc ≤ NR`) over
/// `kb` blocks: `res[r][c] = Σ_b sc[(r·NR + c)·ss + b] · Σ_e w_q[c, b, e] · x_q[r, b, e]`.
///
/// # Safety
/// `xp` must address `rr` rows (stride `xs` bytes) and `wp` `cc` rows (stride `ws` bytes) of
/// `kb` blocks each, and `sc` hold the `rr·NR·ss` products laid out as above (`ss ≥ kb`).
#[allow(clippy::too_many_arguments)]
unsafe fn micro(
    rr: usize,
    cc: usize,
    xp: *const i8,
    xs: usize,
    wp: *const u8,
    ws: usize,
    kb: usize,
    ss: usize,
    sc: &[f32],
    res: &mut [[f32; NR]; MR],
    simd: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        macro_rules! go {
            ($f:ident) => {
                match (rr, cc) {
                    (4, 2) => $f::<4, 2>(xp, xs, wp, ws, kb, ss, sc.as_ptr(), res),
                    (3, 2) => $f::<3, 2>(xp, xs, wp, ws, kb, ss, sc.as_ptr(), res),
                    (2, 2) => $f::<2, 2>(xp, xs, wp, ws, kb, ss, sc.as_ptr(), res),
                    (1, 2) => $f::<1, 2>(xp, xs, wp, ws, kb, ss, sc.as_ptr(), res),
                    (4, _) => $f::<4, 1>(xp, xs, wp, ws, kb, ss, sc.as_ptr(), res),
                    (3, _) => $f::<3, 1>(xp, xs, wp, ws, kb, ss, sc.as_ptr(), res),
                    (2, _) => $f::<2, 1>(xp, xs, wp, ws, kb, ss, sc.as_ptr(), res),
                    _ => $f::<1, 1>(xp, xs, wp, ws, kb, ss, sc.as_ptr(), res),
                }
            };
        }
        go!(micro_q8_avx2);
        return;
    }
    let _ = simd;
    micro_portable(rr, cc, xp, xs, wp, ws, kb, ss, sc, res);
}

/// Portable `q8_0` micro-kernel: the same integer block products as the AVX2 kernel.
///
/// # Safety
/// As [`micro`].
#[allow(clippy::too_many_arguments)]
unsafe fn micro_portable(
    rr: usize,
    cc: usize,
    xp: *const i8,
    xs: usize,
    wp: *const u8,
    ws: usize,
    kb: usize,
    ss: usize,
    sc: &[f32],
    res: &mut [[f32; NR]; MR],
) {
    let bb = BLOCK;
    for r in 0..rr {
        let x = std::slice::from_raw_parts(xp.add(r * xs), kb * BLOCK);
        for c in 0..cc {
            let w = std::slice::from_raw_parts(wp.add(c * ws), kb * bb);
            let mut acc = 0f32;
            for b in 0..kb {
                let xb = &x[b * BLOCK..(b + 1) * BLOCK];
                let wb = &w[b * bb..(b + 1) * bb];
                let s: i32 = xb
                    .iter()
                    .zip(wb)
                    .map(|(&x, &w)| x as i32 * (w as i8) as i32)
                    .sum();
                acc += s as f32 * sc[(r * NR + c) * ss + b];
            }
            res[r][c] = acc;
        }
    }
}

/// `q8_0` micro-kernel: per block and weight row, `|w|` once; per activation row,
/// `sign(x, w)`, `vpmaddubsw`, `vpmaddwd` by ones, convert, FMA with the scale product.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
unsafe fn micro_q8_avx2<const R: usize, const C: usize>(
    xp: *const i8,
    xs: usize,
    wp: *const u8,
    ws: usize,
    kb: usize,
    ss: usize,
    sc: *const f32,
    res: &mut [[f32; NR]; MR],
) {
    use std::arch::x86_64::*;
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    for b in 0..kb {
        for c in 0..C {
            let wv = _mm256_loadu_si256(wp.add(c * ws + b * BLOCK) as *const __m256i);
            let aw = _mm256_sign_epi8(wv, wv);
            for r in 0..R {
                let xv = _mm256_loadu_si256(xp.add(r * xs + b * BLOCK) as *const __m256i);
                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, wv)), ones);
                let s = _mm256_broadcast_ss(&*sc.add((r * NR + c) * ss + b));
                acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, acc[r][c]);
            }
        }
    }
    for r in 0..R {
        for c in 0..C {
            res[r][c] = super::half_matmul::hsum256(acc[r][c]);
        }
    }
}

/// `q4_0` micro-kernel, two blocks per step: the 32 bytes of weight blocks `2p, 2p+1` unpack
/// with one mask and one shift into their low nibbles (elements 0..16 of both) and high nibbles
/// (16..32), which meet the pair-laid-out activations in two `vpmaddubsw` (at most
/// `2·15·127` per int16 lane each, so their sum cannot overflow); one `vpmaddwd` by ones gives
/// the sums of block `2p` in lanes 0..4 and of `2p+1` in lanes 4..8, converted and accumulated
/// with the product of the spread scales: 7 instructions per two block pairs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)]
unsafe fn micro_q4_avx2<const R: usize, const C: usize>(k: &Q4Tile, res: &mut [[f32; NR]; MR]) {
    use std::arch::x86_64::*;
    let ones = _mm256_set1_epi16(1);
    let mask = _mm256_set1_epi8(0x0F);
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let full = k.kb / 2;
    let step = |p: usize, raw: [__m256i; C], acc: &mut [[__m256; C]; R]| {
        for c in 0..C {
            let lo = _mm256_and_si256(raw[c], mask);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw[c]), mask);
            let dw = _mm256_loadu_ps(k.dwe.add(c * k.es + p * 8));
            for r in 0..R {
                let x = k.xp.add(r * k.xs + p * 2 * BLOCK);
                let prod = _mm256_add_epi16(
                    _mm256_maddubs_epi16(lo, _mm256_loadu_si256(x as *const __m256i)),
                    _mm256_maddubs_epi16(hi, _mm256_loadu_si256(x.add(32) as *const __m256i)),
                );
                let s = _mm256_madd_epi16(prod, ones);
                let scale = _mm256_mul_ps(_mm256_loadu_ps(k.dxe.add(r * k.es + p * 8)), dw);
                acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc[r][c]);
            }
        }
    };
    for p in 0..full {
        let raw: [__m256i; C] = std::array::from_fn(|c| {
            _mm256_loadu_si256(k.wp.add(c * k.ws + p * BLOCK) as *const __m256i)
        });
        step(p, raw, &mut acc);
    }
    if k.kb % 2 == 1 {
        // The row's odd last block, paired with zero weights (and zero activations).
        let raw: [__m256i; C] = std::array::from_fn(|c| {
            _mm256_zextsi128_si256(_mm_loadu_si128(
                k.wp.add(c * k.ws + full * BLOCK) as *const __m128i
            ))
        });
        step(full, raw, &mut acc);
    }
    for r in 0..R {
        for c in 0..C {
            res[r][c] = super::half_matmul::hsum256(acc[r][c]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{lcg, reference, SHAPES};

    /// The error bound of int8 activation rounding: half a step of each block's scale times the
    /// weights' magnitudes, plus f32 summation slack.
    fn tolerance(x: &[f32], w: &[f32], k: usize) -> f64 {
        let mut t = 1e-5 * (k as f64).sqrt().max(1.0);
        for b in 0..k.div_ceil(BLOCK) {
            let r = b * BLOCK..((b + 1) * BLOCK).min(k);
            let amax = x[r.clone()].iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
            let wsum: f64 = w[r].iter().map(|v| v.abs() as f64).sum();
            t += amax / 127.0 * 0.5 * wsum * (1.0 + 1e-6);
        }
        t
    }

    fn shapes() -> Vec<(usize, usize, usize)> {
        let mut s = SHAPES.to_vec();
        // Many rows: several micro-tile rows and weight panels, ragged k, several k chunks.
        s.extend([
            (8, 2, 32),
            (13, 131, 70),
            (33, 67, 4200),
            (279, 96, 288),
            (21, 3, 1),
        ]);
        s
    }

    #[test]
    fn activation_quantization_matches_portable_and_bounds_error() {
        let mut seed = 3u64;
        for k in [1usize, 5, 31, 32, 33, 64, 100] {
            let mut x: Vec<f32> = (0..k).map(|_| lcg(&mut seed) * 3.0).collect();
            if k > 4 {
                x[3] = 0.0;
                x[4] = -x.iter().fold(0f32, |m, v| m.max(v.abs()));
            }
            let a = QuantActs::new(QuantFormat::Q8_0, &x, 1, k);
            for b in 0..a.bpr {
                let mut v = [0f32; BLOCK];
                let src = &x[b * BLOCK..((b + 1) * BLOCK).min(k)];
                v[..src.len()].copy_from_slice(src);
                let (mut q, mut d) = ([0i8; BLOCK], 0f32);
                let sum = quantize_block_portable(&v, &mut q, &mut d);
                assert_eq!(&a.qs[b * BLOCK..(b + 1) * BLOCK], &q[..], "k={k} block {b}");
                assert_eq!(a.d[b], d);
                assert_eq!(a.dsum[b], d * sum as f32);
                for (e, &xv) in src.iter().enumerate() {
                    assert!((q[e] as f32 * d - xv).abs() <= d * 0.5 + 1e-6);
                }
                assert!(q[src.len()..].iter().all(|&z| z == 0));
            }
        }
        // An all-zero block has scale 0 and zero quants.
        let a = QuantActs::new(QuantFormat::Q8_0, &[0.0; 40], 1, 40);
        assert!(a.d.iter().all(|&d| d == 0.0) && a.qs.iter().all(|&q| q == 0));
    }

    #[test]
    fn matches_f64_reference_and_portable_and_rows_alone() {
        let mut seed = 29u64;
        for format in [QuantFormat::Q8_0, QuantFormat::Q4_0] {
            for (m, n, k) in shapes() {
                let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
                let wf: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
                let w = QuantMatrix::quantize(format, &wf, n, k);
                let deq = w.dequantize();
                let r = reference(&x, &deq, m, n, k);
                let a = QuantActs::new(format, &x, m, k);
                let mut y = vec![f32::NAN; m * n];
                matmul(&a, &w, &mut y);
                // The portable kernel, called directly on the same tiles.
                let mut yp = vec![0f32; m * n];
                let out = OutPtr(yp.as_mut_ptr());
                let nc = panel_rows(n);
                for j0 in (0..n).step_by(nc) {
                    // SAFETY: single-threaded, yp is [m, n].
                    unsafe { panel(&a, &w, j0, nc.min(n - j0), out, n, false) };
                }
                for i in 0..m {
                    let xi = &x[i * k..(i + 1) * k];
                    let mut one = vec![0f32; n];
                    matmul(&QuantActs::new(format, xi, 1, k), &w, &mut one);
                    if format == QuantFormat::Q8_0 {
                        // q8_0 has no gemm-computed offset term: bit-identical alone.
                        assert_eq!(&y[i * n..(i + 1) * n], &one[..], "{format:?} row {i}");
                    }
                    for j in 0..n {
                        assert!((y[i * n + j] - one[j]).abs() <= 1e-5 * (k as f32).sqrt().max(1.0));
                        let want = r[i * n + j];
                        let tol = tolerance(xi, &deq[j * k..(j + 1) * k], k);
                        let got = y[i * n + j] as f64;
                        assert!(
                            (got - want).abs() <= tol,
                            "{format:?} m={m} n={n} k={k} at ({i},{j}): {got} vs {want} (tol {tol})"
                        );
                        let p = yp[i * n + j];
                        assert!(
                            (p - y[i * n + j]).abs() <= 1e-5 * (k as f32).sqrt().max(1.0),
                            "{format:?} portable vs simd at ({i},{j}): {p} vs {}",
                            y[i * n + j]
                        );
                    }
                }
            }
        }
    }
}
