//! Many-row (prefill, vision) `y = x · Wᵀ` for block-quantized weights (`q8_0`, `q4_0`) with
//! **int16 activations**, multiplied in integers by `vpmaddwd`.
//!
//! On AVX2 without VNNI the f32 FMA units give 16 multiply-adds per cycle; `vpmaddwd` does 16
//! int16 multiply-adds per instruction and Zen 3 issues two per cycle, so an integer product with
//! exact int32 sums can run up to twice as fast as the f32 `sgemm` on dequantized weights, while
//! the activations lose nothing that matters: each block of 32 is rounded to int16 with its own
//! scale (`d_x = max|x| / 32767`, an error of at most 1.5e-5 of the block's largest value, far
//! below the int8 or int4 rounding of the weights).
//!
//! Layout (the BLIS scheme of [`super::sgemm`], on pairs of int16):
//! - the activations are quantized per row and block ([`super::quant_matmul::quantize_block_i16`])
//!   and packed once per call into panels of [`MR`] rows: for every block and each of its 16
//!   k-pairs, the six rows' `(x[k], x[k+1])` pairs as six 32-bit words, plus the six rows' block
//!   scales ([`PackedActs`]);
//! - each task packs [`KC_BLOCKS`] blocks of its [`NR`] weight rows at a time into `[block][16
//!   k-pairs][16 weights]` pairs of int16 (sign-extended `q8_0` bytes or `q4_0` nibbles minus 8,
//!   by 8×8 register transposes) and the blocks' scales;
//! - the micro-kernel keeps a 6×16 tile of int32 sums in twelve registers for one block (16 steps
//!   of two weight loads, six broadcasts, twelve `vpmaddwd` and twelve `vpaddd`), then adds
//!   `Σ · d_w · d_x` to the f32 output tile in memory with one FMA per 8 outputs.
//!
//! With AVX512-VNNI, two adjacent 16-column micro-panels go through one 6×32 kernel on zmm
//! registers whose `vpdpwssd` does the `vpmaddwd` + `vpaddd` pair in one instruction
//! ([`kernel_6x32_vnni`]): 12 instructions per step instead of 48, the same int32 sums.
//!
//! Every output is accumulated block by block in the same order with exact int32 block sums,
//! so the result of a row does not depend on the other rows, and the portable fallback
//! ([`matmul_portable`]) gives the same bits as the AVX2 and AVX512-VNNI kernels.

use super::quant_matmul::quantize_block_i16;
use super::OutPtr;
use crate::format::{QuantFormat, QuantMatrix, BLOCK};
use rayon::prelude::*;

/// Activation rows per micro-panel.
pub const MR: usize = 6;
/// Weight rows (output columns) per micro-panel.
pub const NR: usize = 16;
/// k-pairs per block of 32.
const PAIRS: usize = BLOCK / 2;
/// Blocks per packed weight chunk: 16 blocks (512 deep) × 16 weights × 2 bytes = 16 KiB per
/// micro-panel, which stays in L1 while the activation panels stream past it (8 blocks measured
/// the same, 4 blocks 20 % slower).
pub const KC_BLOCKS: usize = 16;
/// Output columns per parallel task (four micro-panels).
pub const TASK_COLS: usize = 64;

/// Activations quantized to int16 blocks and packed into panels of [`MR`] rows.
pub struct PackedActs {
    /// Rows.
    pub m: usize,
    /// Blocks per row.
    pub bpr: usize,
    /// Panel `p`, block `b`, pair `kk`, row `r`: the 32-bit word `(x[k], x[k+1])` of row
    /// `p·MR + r` at `k = 32b + 2kk` (rows past `m` zero).
    words: Vec<i32>,
    /// Panel `p`, block `b`, row `r`: the block scale.
    scales: Vec<f32>,
}

impl PackedActs {
    /// Quantizes and packs `x [m, k]` (row panels in parallel).
    pub fn new(x: &[f32], m: usize, k: usize) -> PackedActs {
        assert!(x.len() >= m * k, "x holds {} < {m}×{k}", x.len());
        let bpr = k.div_ceil(BLOCK);
        let panels = m.div_ceil(MR);
        let mut words = vec![0i32; panels * bpr * PAIRS * MR];
        let mut scales = vec![0f32; panels * bpr * MR];
        let per_panel = (bpr * PAIRS * MR).max(1);
        words
            .par_chunks_mut(per_panel)
            .zip(scales.par_chunks_mut((bpr * MR).max(1)))
            .enumerate()
            .for_each(|(p, (wp, sp))| {
                let mut q = [0i16; BLOCK];
                for r in 0..MR.min(m - p * MR) {
                    let row = &x[(p * MR + r) * k..(p * MR + r + 1) * k];
                    for b in 0..bpr {
                        let src = &row[b * BLOCK..((b + 1) * BLOCK).min(k)];
                        let mut v = [0f32; BLOCK];
                        v[..src.len()].copy_from_slice(src);
                        sp[b * MR + r] = quantize_block_i16(&v, &mut q);
                        for kk in 0..PAIRS {
                            let pair =
                                (q[2 * kk] as u16 as u32) | ((q[2 * kk + 1] as u16 as u32) << 16);
                            wp[(b * PAIRS + kk) * MR + r] = pair as i32;
                        }
                    }
                }
            });
        PackedActs {
            m,
            bpr,
            words,
            scales,
        }
    }

    fn panel_words(&self, p: usize, b0: usize) -> &[i32] {
        &self.words[(p * self.bpr + b0) * PAIRS * MR..]
    }

    fn panel_scales(&self, p: usize, b0: usize) -> &[f32] {
        &self.scales[(p * self.bpr + b0) * MR..]
    }
}

/// Whether the AVX2 kernel can run here (otherwise callers keep their f32 paths).
pub fn available() -> bool {
    cfg!(target_arch = "x86_64") && super::has_avx2()
}

/// `y [m, n] = x · Wᵀ` (overwrites `y`) with the AVX2 kernel; see [`available`].
pub fn matmul(a: &PackedActs, w: &QuantMatrix, y: &mut [f32]) {
    assert!(available(), "the int16 kernel needs AVX2");
    run(a, w, y, true)
}

/// The same function as [`matmul`] without SIMD, giving the same bits (for tests).
pub fn matmul_portable(a: &PackedActs, w: &QuantMatrix, y: &mut [f32]) {
    run(a, w, y, false)
}

/// Which micro-kernel [`task`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Simd {
    Portable,
    Avx2,
    /// AVX512-VNNI for pairs of micro-panels, AVX2 for a lone or ragged one.
    Vnni512,
}

/// [`matmul`] with the AVX2 kernel only (the AVX512-VNNI one not used), for tests and the
/// kernel bench.
pub fn matmul_avx2(a: &PackedActs, w: &QuantMatrix, y: &mut [f32]) {
    assert!(available(), "the int16 kernel needs AVX2");
    run_with(a, w, y, Simd::Avx2)
}

/// Whether [`matmul`] uses the AVX512-VNNI `vpdpwssd` kernel here.
pub fn uses_vnni() -> bool {
    let f = crate::dispatch::Features::get();
    cfg!(target_arch = "x86_64") && f.avx512 && f.avx512_vnni
}

fn run(a: &PackedActs, w: &QuantMatrix, y: &mut [f32], simd: bool) {
    let kind = match (simd, uses_vnni()) {
        (false, _) => Simd::Portable,
        (true, false) => Simd::Avx2,
        (true, true) => Simd::Vnni512,
    };
    run_with(a, w, y, kind)
}

fn run_with(a: &PackedActs, w: &QuantMatrix, y: &mut [f32], simd: Simd) {
    let (m, n) = (a.m, w.rows());
    assert_eq!(
        a.bpr,
        w.blocks_per_row(),
        "activation and weight widths differ"
    );
    assert_eq!(y.len(), m * n);
    y.fill(0.0);
    if m == 0 || n == 0 || a.bpr == 0 {
        return;
    }
    super::for_each_column_panel(y, n, TASK_COLS, |j0, cols, out| {
        // SAFETY: the task touches columns j0 .. j0 + cols of the m rows of y only.
        unsafe { task(a, w, j0, cols, out, n, simd) };
    });
}

/// Output columns `j0 .. j0 + cols` for every row.
///
/// # Safety
/// `out` points to an `[a.m, n]` buffer of which no one else touches these columns meanwhile.
unsafe fn task(
    a: &PackedActs,
    w: &QuantMatrix,
    j0: usize,
    cols: usize,
    out: OutPtr,
    n: usize,
    kind: Simd,
) {
    let simd = kind != Simd::Portable;
    let subpanels = cols.div_ceil(NR);
    let mut wq = vec![0i32; subpanels * KC_BLOCKS * PAIRS * NR];
    let mut ws = vec![0f32; subpanels * KC_BLOCKS * NR];
    let panels = a.m.div_ceil(MR);
    let mut b0 = 0;
    while b0 < a.bpr {
        let kb = KC_BLOCKS.min(a.bpr - b0);
        for s in 0..subpanels {
            let c0 = s * NR;
            pack_weights(
                w,
                j0 + c0,
                NR.min(cols - c0),
                b0,
                kb,
                &mut wq[s * KC_BLOCKS * PAIRS * NR..(s + 1) * KC_BLOCKS * PAIRS * NR],
                &mut ws[s * KC_BLOCKS * NR..(s + 1) * KC_BLOCKS * NR],
                simd,
            );
        }
        for p in 0..panels {
            let aw = a.panel_words(p, b0);
            let asc = a.panel_scales(p, b0);
            let rows = MR.min(a.m - p * MR);
            let mut s = 0;
            while s < subpanels {
                let c0 = s * NR;
                #[cfg(target_arch = "x86_64")]
                if kind == Simd::Vnni512 && rows == MR && cols >= c0 + 2 * NR {
                    let len = KC_BLOCKS * PAIRS * NR;
                    kernel_6x32_vnni(
                        kb,
                        aw.as_ptr(),
                        asc.as_ptr(),
                        [wq[s * len..].as_ptr(), wq[(s + 1) * len..].as_ptr()],
                        [
                            ws[s * KC_BLOCKS * NR..].as_ptr(),
                            ws[(s + 1) * KC_BLOCKS * NR..].as_ptr(),
                        ],
                        out.0.add(p * MR * n + j0 + c0),
                        n,
                    );
                    s += 2;
                    continue;
                }
                let cc = NR.min(cols - c0);
                let bw = &wq[s * KC_BLOCKS * PAIRS * NR..];
                let bs = &ws[s * KC_BLOCKS * NR..];
                let dst = out.0.add(p * MR * n + j0 + c0);
                if rows == MR && cc == NR {
                    micro(kb, aw, asc, bw, bs, dst, n, simd);
                } else {
                    // Edge tile: through a full 6×16 buffer.
                    let mut tile = [0f32; MR * NR];
                    for r in 0..rows {
                        for c in 0..cc {
                            tile[r * NR + c] = *dst.add(r * n + c);
                        }
                    }
                    micro(kb, aw, asc, bw, bs, tile.as_mut_ptr(), NR, simd);
                    for r in 0..rows {
                        for c in 0..cc {
                            *dst.add(r * n + c) = tile[r * NR + c];
                        }
                    }
                }
                s += 1;
            }
        }
        b0 += kb;
    }
}

/// Packs blocks `b0 .. b0 + kb` of weight rows `j0 .. j0 + cc` (`cc <= NR`, the missing rows
/// zero) as `[block][pair][16]` 32-bit pairs of int16, and their scales as `[block][16]`.
#[allow(clippy::too_many_arguments)]
fn pack_weights(
    w: &QuantMatrix,
    j0: usize,
    cc: usize,
    b0: usize,
    kb: usize,
    dst: &mut [i32],
    scales: &mut [f32],
    simd: bool,
) {
    let fmt = w.format();
    let bb = fmt.block_bytes();
    #[cfg(target_arch = "x86_64")]
    if simd && cc == NR {
        for b in 0..kb {
            let rows: [&[u8]; NR] =
                std::array::from_fn(|c| &w.row_qs(j0 + c)[(b0 + b) * bb..(b0 + b + 1) * bb]);
            // SAFETY: AVX2 was checked by the caller (`simd`); each row holds one block and
            // `dst` the block's 16 × 16 words.
            unsafe { pack_block_avx2(fmt, &rows, &mut dst[b * PAIRS * NR..(b + 1) * PAIRS * NR]) };
        }
    } else {
        pack_portable(w, j0, cc, b0, kb, dst);
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = simd;
        pack_portable(w, j0, cc, b0, kb, dst);
    }
    for b in 0..kb {
        for c in 0..NR {
            scales[b * NR + c] = if c < cc {
                w.row_scales(j0 + c)[b0 + b].to_f32()
            } else {
                0.0
            };
        }
    }
}

/// One block of one weight row as 32 int16 values.
fn block_values(fmt: QuantFormat, q: &[u8]) -> [i16; BLOCK] {
    match fmt {
        QuantFormat::Q8_0 => std::array::from_fn(|e| q[e] as i8 as i16),
        QuantFormat::Q4_0 => std::array::from_fn(|e| {
            let nib = if e < 16 { q[e] & 0x0F } else { q[e - 16] >> 4 };
            nib as i16 - 8
        }),
    }
}

fn pack_portable(w: &QuantMatrix, j0: usize, cc: usize, b0: usize, kb: usize, dst: &mut [i32]) {
    let fmt = w.format();
    let bb = fmt.block_bytes();
    for b in 0..kb {
        for c in 0..NR {
            let v = if c < cc {
                block_values(fmt, &w.row_qs(j0 + c)[(b0 + b) * bb..(b0 + b + 1) * bb])
            } else {
                [0i16; BLOCK]
            };
            for kk in 0..PAIRS {
                let pair = (v[2 * kk] as u16 as u32) | ((v[2 * kk + 1] as u16 as u32) << 16);
                dst[(b * PAIRS + kk) * NR + c] = pair as i32;
            }
        }
    }
}

/// [`pack_portable`] for one block of 16 rows: each row's block widened to two vectors of
/// eight int16 pairs, then 8×8 transposes of 32-bit words.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::needless_range_loop)] // `half` picks the inner vector of each row.
unsafe fn pack_block_avx2(fmt: QuantFormat, rows: &[&[u8]; NR], dst: &mut [i32]) {
    use std::arch::x86_64::*;
    assert!(dst.len() >= PAIRS * NR);
    let widen = |q: &[u8]| -> [__m256; 2] {
        match fmt {
            QuantFormat::Q8_0 => {
                assert!(q.len() >= 32);
                let lo = _mm256_cvtepi8_epi16(_mm_loadu_si128(q.as_ptr() as *const __m128i));
                let hi =
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(q.as_ptr().add(16) as *const __m128i));
                [_mm256_castsi256_ps(lo), _mm256_castsi256_ps(hi)]
            }
            QuantFormat::Q4_0 => {
                assert!(q.len() >= 16);
                let raw = _mm_loadu_si128(q.as_ptr() as *const __m128i);
                let mask = _mm_set1_epi8(0x0F);
                let eight = _mm256_set1_epi16(8);
                let lo = _mm256_cvtepu8_epi16(_mm_and_si128(raw, mask));
                let hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(raw), mask));
                [
                    _mm256_castsi256_ps(_mm256_sub_epi16(lo, eight)),
                    _mm256_castsi256_ps(_mm256_sub_epi16(hi, eight)),
                ]
            }
        }
    };
    let v: [[__m256; 2]; NR] = std::array::from_fn(|c| widen(rows[c]));
    let out = dst.as_mut_ptr() as *mut f32;
    for half in 0..2 {
        // Pairs 8·half .. 8·half + 8 of rows 8g .. 8g + 8.
        for g in 0..2 {
            let r: [__m256; 8] = std::array::from_fn(|j| v[8 * g + j][half]);
            let t = super::sgemm::transpose8x8(r);
            for (j, col) in t.iter().enumerate() {
                _mm256_storeu_ps(out.add((8 * half + j) * NR + 8 * g), *col);
            }
        }
    }
}

/// `c[6, 16] (row stride rs) += Σ_blocks (Σ_pairs a · b) · d_a · d_b` over `kb` blocks.
#[allow(clippy::too_many_arguments)]
unsafe fn micro(
    kb: usize,
    a: &[i32],
    da: &[f32],
    b: &[i32],
    db: &[f32],
    c: *mut f32,
    rs: usize,
    simd: bool,
) {
    assert!(a.len() >= kb * PAIRS * MR && da.len() >= kb * MR);
    assert!(b.len() >= kb * PAIRS * NR && db.len() >= kb * NR);
    #[cfg(target_arch = "x86_64")]
    if simd {
        kernel_6x16_avx2(kb, a.as_ptr(), da.as_ptr(), b.as_ptr(), db.as_ptr(), c, rs);
        return;
    }
    let _ = simd;
    for blk in 0..kb {
        for r in 0..MR {
            for j in 0..NR {
                let mut s = 0i32;
                for kk in 0..PAIRS {
                    let x = a[(blk * PAIRS + kk) * MR + r];
                    let w = b[(blk * PAIRS + kk) * NR + j];
                    s += (x as i16 as i32) * (w as i16 as i32) + ((x >> 16) * (w >> 16));
                }
                let scale = db[blk * NR + j] * da[blk * MR + r];
                let o = c.add(r * rs + j);
                *o = (s as f32).mul_add(scale, *o);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_6x16_avx2(
    kb: usize,
    a: *const i32,
    da: *const f32,
    b: *const i32,
    db: *const f32,
    c: *mut f32,
    rs: usize,
) {
    use std::arch::x86_64::*;
    let (mut a, mut b) = (a, b);
    for blk in 0..kb {
        let mut acc = [[_mm256_setzero_si256(); 2]; MR];
        for _ in 0..PAIRS {
            let b0 = _mm256_loadu_si256(b as *const __m256i);
            let b1 = _mm256_loadu_si256(b.add(8) as *const __m256i);
            for (r, acc) in acc.iter_mut().enumerate() {
                let ar = _mm256_set1_epi32(*a.add(r));
                acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(ar, b0));
                acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(ar, b1));
            }
            a = a.add(MR);
            b = b.add(NR);
        }
        let d0 = _mm256_loadu_ps(db.add(blk * NR));
        let d1 = _mm256_loadu_ps(db.add(blk * NR + 8));
        for (r, acc) in acc.iter().enumerate() {
            let s = _mm256_set1_ps(*da.add(blk * MR + r));
            let row = c.add(r * rs);
            let v0 = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(acc[0]),
                _mm256_mul_ps(d0, s),
                _mm256_loadu_ps(row),
            );
            let v1 = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(acc[1]),
                _mm256_mul_ps(d1, s),
                _mm256_loadu_ps(row.add(8)),
            );
            _mm256_storeu_ps(row, v0);
            _mm256_storeu_ps(row.add(8), v1);
        }
    }
}

/// Two adjacent micro-panels at once: `c[6, 32] (row stride rs) += Σ_blocks (Σ_pairs a · b) ·
/// d_a · d_b`, where columns `16h .. 16h + 16` come from panel `b[h]` with scales `db[h]`; the
/// int32 sums by `vpdpwssd` (AVX512-VNNI), then the same f32 update as the AVX2 kernel.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn kernel_6x32_vnni(
    kb: usize,
    a: *const i32,
    da: *const f32,
    b: [*const i32; 2],
    db: [*const f32; 2],
    c: *mut f32,
    rs: usize,
) {
    use std::arch::x86_64::*;
    let mut a = a;
    let [mut b0p, mut b1p] = b;
    for blk in 0..kb {
        let mut acc = [[_mm512_setzero_si512(); 2]; MR];
        for _ in 0..PAIRS {
            let b0 = _mm512_loadu_si512(b0p as *const __m512i);
            let b1 = _mm512_loadu_si512(b1p as *const __m512i);
            for (r, acc) in acc.iter_mut().enumerate() {
                let ar = _mm512_set1_epi32(*a.add(r));
                acc[0] = _mm512_dpwssd_epi32(acc[0], ar, b0);
                acc[1] = _mm512_dpwssd_epi32(acc[1], ar, b1);
            }
            a = a.add(MR);
            b0p = b0p.add(NR);
            b1p = b1p.add(NR);
        }
        let d0 = _mm512_loadu_ps(db[0].add(blk * NR));
        let d1 = _mm512_loadu_ps(db[1].add(blk * NR));
        for (r, acc) in acc.iter().enumerate() {
            let s = _mm512_set1_ps(*da.add(blk * MR + r));
            let row = c.add(r * rs);
            let v0 = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(acc[0]),
                _mm512_mul_ps(d0, s),
                _mm512_loadu_ps(row),
            );
            let v1 = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(acc[1]),
                _mm512_mul_ps(d1, s),
                _mm512_loadu_ps(row.add(NR)),
            );
            _mm512_storeu_ps(row, v0);
            _mm512_storeu_ps(row.add(NR), v1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{lcg, reference, SHAPES};

    #[test]
    fn matches_f64_reference_and_portable_bits_and_rows_alone() {
        let mut seed = 23u64;
        let mut shapes: Vec<(usize, usize, usize)> = SHAPES.to_vec();
        shapes.extend([
            (13, 70, 300),
            (6, 16, 32),
            (7, 33, 1000),
            (12, 64, 600),
            (18, 96, 64),
        ]);
        if !uses_vnni() {
            eprintln!("skipped: the AVX512-VNNI vpdpwssd int16 kernel (not on this CPU)");
        }
        for format in [QuantFormat::Q8_0, QuantFormat::Q4_0] {
            for &(m, n, k) in &shapes {
                let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed) * 2.0).collect();
                let wf: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
                let w = QuantMatrix::quantize(format, &wf, n, k);
                let deq = w.dequantize();
                let want = reference(&x, &deq, m, n, k);
                let a = PackedActs::new(&x, m, k);
                let mut port = vec![f32::NAN; m * n];
                matmul_portable(&a, &w, &mut port);
                if available() {
                    // The dispatched kernel (AVX512-VNNI where present) and AVX2 alone.
                    let mut y = vec![f32::NAN; m * n];
                    matmul(&a, &w, &mut y);
                    let mut y2 = vec![f32::NAN; m * n];
                    matmul_avx2(&a, &w, &mut y2);
                    for (name, got) in [("dispatched", &y), ("AVX2", &y2)] {
                        assert_eq!(
                            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            port.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            "{format:?} m={m} n={n} k={k}: {name} and portable bits differ"
                        );
                    }
                }
                for i in 0..m {
                    let xi = &x[i * k..(i + 1) * k];
                    // A row alone gives the same bits.
                    let mut one = vec![0f32; n];
                    matmul_portable(&PackedActs::new(xi, 1, k), &w, &mut one);
                    assert_eq!(&one[..], &port[i * n..(i + 1) * n], "{format:?} row {i}");
                    for j in 0..n {
                        // Activation rounding: half a step of each block's scale.
                        let mut tol = 1e-5 * (k as f64).sqrt().max(1.0);
                        for b in 0..k.div_ceil(BLOCK) {
                            let r = b * BLOCK..((b + 1) * BLOCK).min(k);
                            let amax = xi[r.clone()].iter().fold(0f32, |m, v| m.max(v.abs()));
                            let wsum: f64 = deq[j * k..][r].iter().map(|v| v.abs() as f64).sum();
                            tol += amax as f64 / 32767.0 * 0.5 * wsum;
                        }
                        let got = port[i * n + j] as f64;
                        let want = want[i * n + j];
                        assert!(
                            (got - want).abs() <= tol,
                            "{format:?} m={m} n={n} k={k} at ({i},{j}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn packed_weights_match_the_portable_layout() {
        if !available() {
            return;
        }
        let mut seed = 3u64;
        for format in [QuantFormat::Q8_0, QuantFormat::Q4_0] {
            let (n, k) = (16, 96);
            let wf: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
            let w = QuantMatrix::quantize(format, &wf, n, k);
            let (mut s, mut p) = (vec![0i32; 3 * PAIRS * NR], vec![0i32; 3 * PAIRS * NR]);
            let mut sc = vec![0f32; 3 * NR];
            pack_weights(&w, 0, NR, 0, 3, &mut s, &mut sc, true);
            pack_portable(&w, 0, NR, 0, 3, &mut p);
            assert_eq!(s, p, "{format:?}");
        }
    }
}
