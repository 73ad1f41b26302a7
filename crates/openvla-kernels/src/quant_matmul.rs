//! `y = x · Wᵀ` with `x` in f32 and `W` block-quantized ([`crate::format::QuantMatrix`]).
//!
//! - **Few rows (decode), `q8_0`:** the activations are quantized per block of 32 to int16
//!   (`d_x = max|x| / 32767`, a rounding error at most 1.5e-5 of the block maximum, far below
//!   the int8 weight rounding), the int8 weights are sign-extended to int16, and each block
//!   product is two `vpmaddwd`: `Σ d_w·d_x·Σ q_w·q_x`. One byte per weight is read.
//! - **Few rows (decode), `q4_0`:** the activations are quantized per row to int8 blocks of 32
//!   (`d_x = max|x| / 127`, as GGUF's `Q8_0` activations), and each block product is one
//!   `vpmaddubsw` of the unsigned nibbles `q ∈ [0, 15]` with the signed activations, then
//!   `vpmaddwd` to i32: `Σ d_w·d_x·(Σ q·x_q − 8·Σ x_q)`. Half a byte per weight is read, and
//!   unpacking nibbles to f32 would cost more than the memory time.
//! - Both decode kernels prefetch the weight stream 4 KiB ahead, and the activations are
//!   quantized with AVX2 (the scalar `round` of the first version cost a quarter of a
//!   MiniVLA-sized matmul at decode).
//! - **Many rows (prefill, vision), AVX2:** the activations are quantized to int16 blocks and
//!   multiplied with the weights widened to int16 by `vpmaddwd` in a packed 6×16 micro-kernel
//!   ([`super::i16_gemm`]): 158–184 GFLOP/s at the 7B's shapes, above the f32 GEMM, and
//!   1.2–1.4× the int8-activation kernel it replaced (`docs/kernels.md`, fourth pass).
//! - **Many rows without AVX2:** tiles of weight rows are dequantized to f32 and multiplied with
//!   `gemm` ([`super::tiled_gemm`]), i.e. exactly `x · dequant(W)ᵀ`.
//!
//! Every output element of the dot-product path is computed by the same code whatever the
//! number of rows (the activation quantization is per row), so batched decoding gives each
//! request the bits it gets alone.

use super::{for_each_tile, has_avx2, tiled_gemm, DOT_TILE_ROWS, GEMM_MIN_ROWS};
use crate::format::{QuantFormat, QuantMatrix, BLOCK};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use half::f16;
use std::sync::Arc;

/// How far ahead of the weight row being read the decode kernels prefetch (the next rows of
/// the tile are contiguous): 10-15 % more bandwidth at the 7B's shapes (`benches/kernels.rs`).
const PREFETCH_BYTES: usize = 4096;

/// The candle op: `x [m, k] f32` times a quantized `W [n, k]`, giving `[m, n] f32`.
pub struct QuantMatmul {
    /// The weight matrix.
    pub weight: Arc<QuantMatrix>,
    /// Force the row-independent dot-product path.
    pub rowwise: bool,
}

impl CustomOp1 for QuantMatmul {
    fn name(&self) -> &'static str {
        "quant-weight-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = l.shape().dims2()?;
        if k != self.weight.cols() {
            candle_core::bail!(
                "quant-weight-matmul: activations have {k} features, the weight {}",
                self.weight.cols()
            );
        }
        let Some((xs, xe)) = l.contiguous_offsets() else {
            candle_core::bail!("quant-weight-matmul: activations must be contiguous")
        };
        let CpuStorage::F32(x) = s else {
            candle_core::bail!("quant-weight-matmul expects f32 activations")
        };
        let n = self.weight.rows();
        let mut y = vec![0f32; m * n];
        matmul(&x[xs..xe], &self.weight, &mut y, m, self.rowwise);
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }
}

/// `y[m, n] = x[m, k] · W[n, k]ᵀ`. `rowwise` forces the dot-product path for any `m`.
pub fn matmul(x: &[f32], w: &QuantMatrix, y: &mut [f32], m: usize, rowwise: bool) {
    let (n, k) = (w.rows(), w.cols());
    assert_eq!(x.len(), m * k);
    assert_eq!(y.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        y.fill(0.0);
        return;
    }
    if rowwise || m < GEMM_MIN_ROWS {
        let acts = Activations::new(w.format(), x, m, k);
        for_each_tile(m, n, DOT_TILE_ROWS, y, |j0, nb, out| {
            dot_tile(w, j0, nb, &acts, out)
        });
    } else if super::i16_gemm::available() {
        // Both formats: int16 activations, `vpmaddwd` (docs/kernels.md, fourth pass).
        let acts = super::i16_gemm::PackedActs::new(x, m, k);
        super::i16_gemm::matmul(&acts, w, y);
    } else {
        matmul_dequant(x, w, y, m);
    }
}

/// The weight-only many-row path without AVX2: tiles of weight rows dequantized to f32 and
/// multiplied with `gemm`, exactly `x · dequant(W)ᵀ` up to summation order.
pub fn matmul_dequant(x: &[f32], w: &QuantMatrix, y: &mut [f32], m: usize) {
    let (n, k) = (w.rows(), w.cols());
    assert_eq!(x.len(), m * k);
    assert_eq!(y.len(), m * n);
    if k == 0 {
        y.fill(0.0);
        return;
    }
    tiled_gemm(x, y, m, n, k, |j0, _nb, buf| w.dequantize_rows(j0, buf));
}

/// Activations prepared for the dot-product path, row by row (so a row's preparation never
/// depends on the other rows).
///
/// - For `q8_0` weights, each block of 32 is quantized to int16 (`d = max|x| / 32767`, a
///   rounding error at most 1.5e-5 of the block maximum, far below the int8 weight rounding),
///   so the block product is two `vpmaddwd`.
/// - For `q4_0` weights, each block is quantized to int8 (`d = max|x| / 127`, GGUF's `Q8_0`
///   activations), laid out for two blocks per 256-bit step: blocks `b` and `b + 1` are stored
///   as `[b: 0..16, b+1: 0..16, b: 16..32, b+1: 16..32]` to match the nibble unpacking of two
///   consecutive weight blocks (an odd last block is paired with an all-zero block).
pub struct Activations {
    /// Rows.
    pub m: usize,
    /// Blocks per row.
    pub bpr: usize,
    /// Block pairs per row (`q4_0`).
    pub npairs: usize,
    /// `q8_0`: int16 rows `[m, bpr·32]`.
    pub q16: Vec<i16>,
    /// `q8_0`: block scales broadcast to 8 lanes `[m, bpr, 8]`.
    pub d16: Vec<f32>,
    /// `q4_0`: int8 rows in pair layout `[m, npairs·64]`.
    pub q8: Vec<i8>,
    /// `q4_0`: block scales, four lanes per block `[m, npairs, 8]`.
    pub dxe: Vec<f32>,
    /// `q4_0`: `2·Σ x_q` of each block, four lanes per block `[m, npairs, 8]`: subtracting it
    /// from each lane's `Σ q·x_q` removes the nibble offset 8 exactly, in integers.
    pub sxe: Vec<i32>,
}

impl Activations {
    /// Prepares `x [m, k]` for a weight in `format`.
    pub fn new(format: QuantFormat, x: &[f32], m: usize, k: usize) -> Activations {
        let bpr = k.div_ceil(BLOCK);
        let npairs = bpr.div_ceil(2);
        let mut a = Activations {
            m,
            bpr,
            npairs,
            q16: Vec::new(),
            d16: Vec::new(),
            q8: Vec::new(),
            dxe: Vec::new(),
            sxe: Vec::new(),
        };
        let block = |row: &[f32], b: usize| -> [f32; BLOCK] {
            let src = &row[b * BLOCK..((b + 1) * BLOCK).min(k)];
            let mut v = [0f32; BLOCK];
            v[..src.len()].copy_from_slice(src);
            v
        };
        match format {
            QuantFormat::Q8_0 => {
                let kp = bpr * BLOCK;
                a.q16 = vec![0i16; m * kp];
                a.d16 = vec![0f32; m * bpr * 8];
                for i in 0..m {
                    let row = &x[i * k..(i + 1) * k];
                    for b in 0..bpr {
                        let dst: &mut [i16; BLOCK] = (&mut a.q16
                            [i * kp + b * BLOCK..i * kp + (b + 1) * BLOCK])
                            .try_into()
                            .expect("a block is 32 long");
                        let d = quantize_block_i16(&block(row, b), dst);
                        a.d16[(i * bpr + b) * 8..(i * bpr + b + 1) * 8].fill(d);
                    }
                }
            }
            QuantFormat::Q4_0 => {
                let stride = npairs * 64;
                a.q8 = vec![0i8; m * stride];
                a.dxe = vec![0f32; m * npairs * 8];
                a.sxe = vec![0i32; m * npairs * 8];
                let mut q = [0i8; BLOCK];
                for i in 0..m {
                    let row = &x[i * k..(i + 1) * k];
                    for b in 0..bpr {
                        let mut d = 0f32;
                        let sum = quantize_block_i8(&block(row, b), &mut q, &mut d);
                        let (p, half) = (b / 2, b % 2);
                        let base = i * stride + p * 64 + half * 16;
                        a.q8[base..base + 16].copy_from_slice(&q[..16]);
                        a.q8[base + 32..base + 48].copy_from_slice(&q[16..]);
                        let lanes = (i * npairs + p) * 8 + half * 4;
                        a.dxe[lanes..lanes + 4].fill(d);
                        a.sxe[lanes..lanes + 4].fill(2 * sum);
                    }
                }
            }
        }
        a
    }
}

/// Quantizes one block of 32: `d = max|x| / 127`, `q = round_ties_even(x · (127 / max|x|))`
/// (the AVX2 conversion's rounding, so both paths give the same bits). Returns `Σ q`.
pub fn quantize_block_i8(v: &[f32; BLOCK], dst: &mut [i8; BLOCK], d: &mut f32) -> i32 {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() {
            // SAFETY: the CPU supports AVX2 (checked by has_avx2); the arrays have 32 elements.
            return unsafe { quantize_block_i8_avx2(v, dst, d) };
        }
    }
    quantize_block_i8_portable(v, dst, d)
}

/// Portable form of [`quantize_block_i8`] (the AVX2 form gives the same bits).
pub fn quantize_block_i8_portable(v: &[f32; BLOCK], dst: &mut [i8; BLOCK], d: &mut f32) -> i32 {
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
unsafe fn load_block_amax_avx2(v: &[f32; BLOCK]) -> ([std::arch::x86_64::__m256; 4], f32) {
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
unsafe fn quantize_block_i8_avx2(v: &[f32; BLOCK], dst: &mut [i8; BLOCK], d: &mut f32) -> i32 {
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

/// Quantizes one block of 32 to int16: `d = max|x| / 32767`,
/// `q = round_ties_even(x · (32767 / max|x|))` (the AVX2 conversion's rounding, so both paths
/// give the same bits). Returns `d`.
pub fn quantize_block_i16(v: &[f32; BLOCK], dst: &mut [i16; BLOCK]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() {
            // SAFETY: the CPU supports AVX2 (checked by has_avx2); the arrays have 32 elements.
            return unsafe { quantize_block_i16_avx2(v, dst) };
        }
    }
    quantize_block_i16_portable(v, dst)
}

/// Portable form of [`quantize_block_i16`].
pub fn quantize_block_i16_portable(v: &[f32; BLOCK], dst: &mut [i16; BLOCK]) -> f32 {
    let amax = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    let inv = if amax > 0.0 { 32767.0 / amax } else { 0.0 };
    for (o, &x) in dst.iter_mut().zip(v) {
        *o = (x * inv).round_ties_even().clamp(-32767.0, 32767.0) as i16;
    }
    amax / 32767.0
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_block_i16_avx2(v: &[f32; BLOCK], dst: &mut [i16; BLOCK]) -> f32 {
    use std::arch::x86_64::*;
    let (x, amax) = load_block_amax_avx2(v);
    let inv = _mm256_set1_ps(if amax > 0.0 { 32767.0 / amax } else { 0.0 });
    let (lim, nlim) = (_mm256_set1_ps(32767.0), _mm256_set1_ps(-32767.0));
    let q: [__m256i; 4] = std::array::from_fn(|i| {
        _mm256_cvtps_epi32(_mm256_min_ps(
            _mm256_max_ps(_mm256_mul_ps(x[i], inv), nlim),
            lim,
        ))
    });
    // Packing works per 128-bit lane; the permutation restores the element order.
    for h in 0..2 {
        let packed = _mm256_packs_epi32(q[2 * h], q[2 * h + 1]);
        let ordered = _mm256_permute4x64_epi64::<0b11_01_10_00>(packed);
        _mm256_storeu_si256(dst.as_mut_ptr().add(16 * h) as *mut __m256i, ordered);
    }
    amax / 32767.0
}

/// The `[m, nb]` block `out` of `x · Wᵀ` for weight rows `j0 .. j0 + nb` (the decode path).
pub fn dot_tile(w: &QuantMatrix, j0: usize, nb: usize, a: &Activations, out: &mut [f32]) {
    assert_eq!(out.len(), a.m * nb);
    assert!(j0 + nb <= w.rows() && a.bpr == w.blocks_per_row());
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() {
            // SAFETY: the CPU supports AVX2, FMA and F16C (checked by has_avx2); the shapes of
            // `w`, `a` and `out` were checked above.
            unsafe { dot_tile_avx2(w, j0, nb, a, out) };
            return;
        }
    }
    let mut res = vec![0f32; a.m];
    for j in 0..nb {
        dot_rows_portable(
            w.format(),
            w.row_qs(j0 + j),
            w.row_scales(j0 + j),
            a,
            &mut res,
        );
        for (i, r) in res.iter().enumerate() {
            out[i * nb + j] = *r;
        }
    }
}

/// Portable `res[i] = x_i · w` for one weight row (quants `qs`, scales `d`) and every
/// activation row: the same integer block products as the AVX2 kernels, summed in another
/// order.
pub fn dot_rows_portable(
    format: QuantFormat,
    qs: &[u8],
    d: &[f16],
    a: &Activations,
    res: &mut [f32],
) {
    let d: Vec<f32> = d.iter().map(|v| v.to_f32()).collect();
    for (i, r) in res.iter_mut().enumerate().take(a.m) {
        let mut acc = 0f32;
        match format {
            QuantFormat::Q8_0 => {
                let kp = a.bpr * BLOCK;
                let x = &a.q16[i * kp..(i + 1) * kp];
                for b in 0..a.bpr {
                    let s: i32 = (0..BLOCK)
                        .map(|e| (qs[b * BLOCK + e] as i8) as i32 * x[b * BLOCK + e] as i32)
                        .sum();
                    acc += s as f32 * (d[b] * a.d16[(i * a.bpr + b) * 8]);
                }
            }
            QuantFormat::Q4_0 => {
                let stride = a.npairs * 64;
                let x = &a.q8[i * stride..(i + 1) * stride];
                for b in 0..a.bpr {
                    let (p, half) = (b / 2, b % 2);
                    let xb = |e: usize| x[p * 64 + half * 16 + (e / 16) * 32 + e % 16] as i32;
                    let q = &qs[b * 16..(b + 1) * 16];
                    let mut s = 0i32;
                    for (l, &byte) in q.iter().enumerate() {
                        s += ((byte & 0x0F) as i32 - 8) * xb(l);
                        s += ((byte >> 4) as i32 - 8) * xb(l + 16);
                    }
                    acc += s as f32 * (d[b] * a.dxe[(i * a.npairs + p) * 8 + half * 4]);
                }
            }
        }
        *r = acc;
    }
}

/// The AVX2 decode tile. The tile's block scales (contiguous in the matrix) are widened to f32
/// once, then each weight row meets chunks of up to 4 activation rows; per row the work is only
/// the block loop, one horizontal sum per activation row and the stores (MiniVLA's rows are
/// 896 wide, 28 blocks, so per-row overhead is a large part of a decode matmul).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_tile_avx2(w: &QuantMatrix, j0: usize, nb: usize, a: &Activations, out: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    let format = w.format();
    match format {
        QuantFormat::Q8_0 => {
            assert!(a.q16.len() >= a.m * a.bpr * BLOCK && a.d16.len() >= a.m * a.bpr * 8)
        }
        QuantFormat::Q4_0 => assert!(
            a.q8.len() >= a.m * a.npairs * 64
                && a.dxe.len() >= a.m * a.npairs * 8
                && a.sxe.len() >= a.m * a.npairs * 8
        ),
    }
    let bpr = a.bpr;
    let row_bytes = bpr * format.block_bytes();
    let h = &w.scales()[j0 * bpr..(j0 + nb) * bpr];
    let mut scales = vec![0f32; h.len()];
    h.convert_to_f32_slice(&mut scales);
    let qs = &w.qs()[j0 * row_bytes..(j0 + nb) * row_bytes];
    let mut res = [0f32; 4];
    for j in 0..nb {
        let q = &qs[j * row_bytes..(j + 1) * row_bytes];
        let d = &scales[j * bpr..(j + 1) * bpr];
        let mut i = 0;
        while i < a.m {
            let r = (a.m - i).min(4);
            let dst = &mut res[..r];
            match (format, r) {
                (QuantFormat::Q8_0, 4) => q8_avx2::<4>(q, d, a, i, dst),
                (QuantFormat::Q8_0, 3) => q8_avx2::<3>(q, d, a, i, dst),
                (QuantFormat::Q8_0, 2) => q8_avx2::<2>(q, d, a, i, dst),
                (QuantFormat::Q8_0, _) => q8_avx2::<1>(q, d, a, i, dst),
                (QuantFormat::Q4_0, 4) => q4_avx2::<4>(q, d, a, i, dst),
                (QuantFormat::Q4_0, 3) => q4_avx2::<3>(q, d, a, i, dst),
                (QuantFormat::Q4_0, 2) => q4_avx2::<2>(q, d, a, i, dst),
                (QuantFormat::Q4_0, _) => q4_avx2::<1>(q, d, a, i, dst),
            }
            for (t, v) in dst.iter().enumerate() {
                out[(i + t) * nb + j] = *v;
            }
            i += r;
        }
    }
}

/// `R` activation rows starting at `i0` against one `q8_0` weight row: per block, the int8
/// weights are sign-extended to int16 and multiplied with the int16 activations by
/// `vpmaddwd`. Each row's arithmetic is the same for every `R`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q8_avx2<const R: usize>(
    qs: &[u8],
    d: &[f32],
    a: &Activations,
    i0: usize,
    res: &mut [f32],
) {
    use std::arch::x86_64::*;
    let kp = a.bpr * BLOCK;
    let mut acc = [_mm256_setzero_ps(); R];
    let q = qs.as_ptr();
    let x0 = a.q16.as_ptr().add(i0 * kp);
    let s0 = a.d16.as_ptr().add(i0 * a.bpr * 8);
    assert!(qs.len() >= a.bpr * BLOCK && d.len() >= a.bpr && res.len() >= R);
    for b in 0..a.bpr {
        // The hardware prefetcher alone leaves 10-15 % of the bandwidth unused here.
        _mm_prefetch::<_MM_HINT_T0>(q.wrapping_add(b * BLOCK + PREFETCH_BYTES) as *const i8);
        let p = q.add(b * BLOCK);
        let wa = _mm256_cvtepi8_epi16(_mm_loadu_si128(p as *const __m128i));
        let wb = _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(16) as *const __m128i));
        let db = _mm256_broadcast_ss(&*d.as_ptr().add(b));
        for (r, acc) in acc.iter_mut().enumerate() {
            let x = x0.add(r * kp + b * BLOCK);
            let s = _mm256_add_epi32(
                _mm256_madd_epi16(wa, _mm256_loadu_si256(x as *const __m256i)),
                _mm256_madd_epi16(wb, _mm256_loadu_si256(x.add(16) as *const __m256i)),
            );
            let scale = _mm256_mul_ps(db, _mm256_loadu_ps(s0.add((r * a.bpr + b) * 8)));
            *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, *acc);
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        res[r] = super::half_matmul::hsum256(*acc);
    }
}

/// `R` activation rows starting at `i0` against one `q4_0` weight row, two blocks per step:
/// the 32 bytes of blocks `b, b+1` unpack with one mask and one shift into the low and high
/// nibbles of both blocks, which meet the pair-laid-out int8 activations in `vpmaddubsw`
/// (unsigned nibble × signed activation, at most 2·15·127 per pair, no saturation).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q4_avx2<const R: usize>(
    qs: &[u8],
    d: &[f32],
    a: &Activations,
    i0: usize,
    res: &mut [f32],
) {
    use std::arch::x86_64::*;
    let stride = a.npairs * 64;
    let mask = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); R];
    let q = qs.as_ptr();
    let x0 = a.q8.as_ptr().add(i0 * stride);
    let dx0 = a.dxe.as_ptr().add(i0 * a.npairs * 8);
    let sx0 = a.sxe.as_ptr().add(i0 * a.npairs * 8);
    let spread = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    assert!(qs.len() >= a.bpr * 16 && d.len() >= a.bpr && res.len() >= R);
    for p in 0..a.npairs {
        _mm_prefetch::<_MM_HINT_T0>(q.wrapping_add(p * 32 + PREFETCH_BYTES) as *const i8);
        // Scales of blocks 2p and 2p+1, four lanes each (an odd last block pairs with zero).
        let (raw, pair) = if 2 * p + 1 < a.bpr {
            (
                _mm256_loadu_si256(q.add(p * 32) as *const __m256i),
                _mm_castpd_ps(_mm_load_sd(d.as_ptr().add(2 * p) as *const f64)),
            )
        } else {
            (
                _mm256_zextsi128_si256(_mm_loadu_si128(q.add(p * 32) as *const __m128i)),
                _mm_load_ss(d.as_ptr().add(2 * p)),
            )
        };
        let lo = _mm256_and_si256(raw, mask);
        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), mask);
        let dw = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(pair), spread);
        for (r, acc) in acc.iter_mut().enumerate() {
            let x = x0.add(r * stride + p * 64);
            let prod = _mm256_add_epi16(
                _mm256_maddubs_epi16(lo, _mm256_loadu_si256(x as *const __m256i)),
                _mm256_maddubs_epi16(hi, _mm256_loadu_si256(x.add(32) as *const __m256i)),
            );
            let off = (r * a.npairs + p) * 8;
            let s = _mm256_sub_epi32(
                _mm256_madd_epi16(prod, ones),
                _mm256_loadu_si256(sx0.add(off) as *const __m256i),
            );
            let scale = _mm256_mul_ps(dw, _mm256_loadu_ps(dx0.add(off)));
            *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, *acc);
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        res[r] = super::half_matmul::hsum256(*acc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{lcg, reference, SHAPES};

    /// Worst-case error of the int8 activation rounding: half a step of each block's scale
    /// times the weights' magnitudes.
    fn act_tolerance(x: &[f32], w: &[f32], k: usize, levels: f64) -> f64 {
        let mut t = 0f64;
        for b in 0..k.div_ceil(BLOCK) {
            let r = b * BLOCK..((b + 1) * BLOCK).min(k);
            let amax = x[r.clone()].iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
            let wsum: f64 = w[r].iter().map(|v| v.abs() as f64).sum();
            t += amax / levels * 0.5 * wsum;
        }
        t
    }

    #[test]
    fn int8_block_quantization_matches_portable_and_bounds_error() {
        let mut seed = 3u64;
        let mut blocks: Vec<[f32; BLOCK]> = (0..50)
            .map(|_| std::array::from_fn(|_| lcg(&mut seed) * 3.0))
            .collect();
        // A zero and the negated maximum in one block; an all-zero block.
        blocks[0][3] = 0.0;
        blocks[0][4] = -blocks[0].iter().fold(0f32, |m, v| m.max(v.abs())) * 2.0;
        blocks.push([0.0; BLOCK]);
        for (n, v) in blocks.iter().enumerate() {
            let (mut a, mut b) = ([0i8; BLOCK], [0i8; BLOCK]);
            let (mut da, mut db) = (0f32, 0f32);
            let sa = quantize_block_i8(v, &mut a, &mut da);
            let sb = quantize_block_i8_portable(v, &mut b, &mut db);
            assert_eq!((a, da.to_bits(), sa), (b, db.to_bits(), sb), "block {n}");
            assert_eq!(sa, a.iter().map(|&q| q as i32).sum::<i32>(), "block {n}");
            for (e, (&x, &q)) in v.iter().zip(&a).enumerate() {
                assert!((x - q as f32 * da).abs() <= 0.51 * da, "block {n} elem {e}");
            }
        }
        assert_eq!(blocks[0].iter().position(|&x| x == blocks[0][4]), Some(4));
        let (mut q, mut d) = ([0i8; BLOCK], 0f32);
        quantize_block_i8(&blocks[0], &mut q, &mut d);
        assert_eq!(q[4], -127, "the largest magnitude maps to -127");
        quantize_block_i8(&blocks[50], &mut q, &mut d);
        assert!(
            d == 0.0 && q.iter().all(|&x| x == 0),
            "a zero block has scale 0"
        );
    }

    #[test]
    fn int16_block_quantization_matches_portable_and_rounds_ties_to_even() {
        let mut seed = 5u64;
        let mut blocks: Vec<[f32; BLOCK]> = (0..50)
            .map(|_| std::array::from_fn(|_| lcg(&mut seed) * 3.0))
            .collect();
        // Exact ties: max 32767 makes the scale 1, so x.5 lands on a tie.
        blocks.push(std::array::from_fn(|e| {
            if e == 0 {
                32767.0
            } else {
                e as f32 + 0.5 - 16.0
            }
        }));
        blocks.push([0.0; BLOCK]);
        for (n, v) in blocks.iter().enumerate() {
            let (mut a, mut b) = ([0i16; BLOCK], [0i16; BLOCK]);
            let da = quantize_block_i16(v, &mut a);
            let db = quantize_block_i16_portable(v, &mut b);
            assert_eq!((a, da.to_bits()), (b, db.to_bits()), "block {n}");
            for (e, (&x, &q)) in v.iter().zip(&a).enumerate() {
                assert!((x - q as f32 * da).abs() <= 0.51 * da, "block {n} elem {e}");
            }
        }
        let tie = &blocks[50];
        let mut q = [0i16; BLOCK];
        quantize_block_i16(tie, &mut q);
        assert_eq!(
            &q[1..4],
            &[-14, -14, -12],
            "-14.5 -> -14, -13.5 -> -14, -12.5 -> -12"
        );
    }

    #[test]
    fn matches_dequantized_f64_reference_on_ragged_shapes() {
        let mut seed = 17u64;
        for format in [QuantFormat::Q8_0, QuantFormat::Q4_0] {
            for &(m, n, k) in SHAPES {
                let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
                let wf: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
                let w = QuantMatrix::quantize(format, &wf, n, k);
                let deq = w.dequantize();
                let r = reference(&x, &deq, m, n, k);
                let mut y = vec![0f32; m * n];
                matmul(&x, &w, &mut y, m, false);
                let mut rows = vec![0f32; m * n];
                matmul(&x, &w, &mut rows, m, true);
                for i in 0..m {
                    // Row-wise results do not depend on the other rows.
                    let xi = &x[i * k..(i + 1) * k];
                    let mut one = vec![0f32; n];
                    matmul(xi, &w, &mut one, 1, true);
                    assert_eq!(
                        &rows[i * n..(i + 1) * n],
                        &one[..],
                        "{format:?} row {i} of m={m} n={n} k={k}"
                    );
                    // The portable kernel computes the same function.
                    let acts = Activations::new(format, xi, 1, k);
                    for (j, simd) in one.iter().enumerate() {
                        let mut d = vec![f16::ZERO; w.blocks_per_row().div_ceil(8) * 8];
                        d[..w.blocks_per_row()].copy_from_slice(w.row_scales(j));
                        let mut p = [0f32];
                        dot_rows_portable(format, w.row_qs(j), &d, &acts, &mut p);
                        let tol = 1e-5 * (k as f32).sqrt().max(1.0);
                        assert!(
                            (p[0] - simd).abs() <= tol,
                            "{format:?} portable vs simd at ({i},{j}): {} vs {simd}",
                            p[0]
                        );
                    }
                    for j in 0..n {
                        let want = r[i * n + j];
                        let levels = if format == QuantFormat::Q4_0 {
                            127.0
                        } else {
                            32767.0
                        };
                        let tol = 1e-5 * (k as f64).sqrt().max(1.0)
                            + act_tolerance(xi, &deq[j * k..(j + 1) * k], k, levels);
                        let got = rows[i * n + j] as f64;
                        assert!((got - want).abs() <= tol, "{format:?} rowwise m={m} n={n} k={k} at ({i},{j}): {got} vs {want} (tol {tol})");
                        let got = y[i * n + j] as f64;
                        assert!((got - want).abs() <= tol, "{format:?} m={m} n={n} k={k} at ({i},{j}): {got} vs {want} (tol {tol})");
                    }
                }
            }
        }
    }
}
