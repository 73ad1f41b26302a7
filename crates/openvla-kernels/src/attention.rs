//! Fused multi-head self-attention of the vision towers: `softmax(q·kᵀ·scale)·v` per head, read
//! straight from timm's fused `qkv` output and written in the `[tokens, heads·head_dim]` layout
//! the output projection takes.
//!
//! Through candle this was four copies (q, k, v made contiguous, the output transposed back), two
//! batched matmuls of 64-deep products that the `gemm` crate runs at about 25 GFLOP/s, a scale
//! pass and a softmax: 0.55 s of MiniVLA's ~4 s vision stage. Here each head is one task on the
//! rayon pool: it gathers its q, k and v into small contiguous buffers, computes the scores with
//! the packed [`super::sgemm`] kernel, applies the scaled softmax in place with the vectorized
//! `exp` of [`super::activation`], and multiplies by v.
//!
//! [`cache_attention`] does the same for the LLM, prefill and decode steps: grouped-query heads
//! over the KV cache (read in place, a strided view of the cache's buffers), a causal mask or
//! none (OFT's bidirectional pass), `[1, heads, t, head_dim]` in and out. Both run one head
//! through the same `Head::attend`, which reads keys and values in place for fewer than 8
//! queries (decode steps).
//!
//! The result equals the reference's attention up to summation order and `exp` rounding (tests
//! compare with an f64 computation).
//!
//! With `--compute bf16` on AMX ([`ComputePrecision::Bf16`], [`crate::dispatch::bf16_path`]),
//! a head of 8 or more queries computes its scores from bf16-rounded q and k and its output
//! from bf16-rounded probabilities and v on the tile unit, with f32 sums and an f32 softmax,
//! as PyTorch's bf16 attention rounds its operands. A query's result still depends on its own
//! row only, so batched answers equal single ones. Elsewhere (f32, other CPUs, decode steps)
//! every product is f32.

use super::activation::{exp_slice, f32_contiguous};
use crate::dispatch::ComputePrecision;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Self-attention over a fused `qkv [batch, tokens, 3·heads·head_dim]` (the `(3, heads,
/// head_dim)` order of timm's `Attention`), giving `[batch, tokens, heads·head_dim]`: this
/// module's kernel for f32 on CPU (its products in `compute`'s arithmetic where the tile unit
/// runs it), candle's ops otherwise.
pub fn fused_qkv_attention(
    qkv: &Tensor,
    heads: usize,
    compute: ComputePrecision,
) -> candle_core::Result<Tensor> {
    let (b, n, three_c) = qkv.dims3()?;
    if heads == 0 || three_c % (3 * heads) != 0 {
        candle_core::bail!("attention: width {three_c} is not 3 × {heads} heads × head_dim");
    }
    let hd = three_c / (3 * heads);
    if qkv.device().is_cpu() && qkv.dtype() == candle_core::DType::F32 {
        return qkv
            .contiguous()?
            .apply_op1_no_bwd(&FusedAttention { heads, compute });
    }
    let qkv = qkv
        .reshape((b, n, 3, heads, hd))?
        .permute((2, 0, 3, 1, 4))?;
    let q = qkv.get(0)?.contiguous()?;
    let k = qkv.get(1)?.contiguous()?;
    let v = qkv.get(2)?.contiguous()?;
    let attn = (q.matmul(&k.t()?)? * (hd as f64).powf(-0.5))?;
    let attn = candle_nn::ops::softmax_last_dim(&attn)?;
    attn.matmul(&v)?
        .transpose(1, 2)?
        .reshape((b, n, heads * hd))
}

struct FusedAttention {
    heads: usize,
    compute: ComputePrecision,
}

impl CustomOp1 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-qkv-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let qkv = f32_contiguous(s, l, "fused-qkv-attention")?;
        let (b, n, three_c) = l.shape().dims3()?;
        let c = three_c / 3;
        let mut out = vec![0f32; b * n * c];
        for (qkv, out) in qkv.chunks(n * three_c).zip(out.chunks_mut(n * c)) {
            attention(qkv, out, n, self.heads, c / self.heads, self.compute);
        }
        Ok((CpuStorage::F32(out), Shape::from((b, n, c))))
    }
}

/// One sequence: `qkv [n, 3·heads·hd]` → `out [n, heads·hd]`.
pub fn attention(
    qkv: &[f32],
    out: &mut [f32],
    n: usize,
    heads: usize,
    hd: usize,
    compute: ComputePrecision,
) {
    let c = heads * hd;
    assert_eq!(
        qkv.len(),
        n * 3 * c,
        "attention: qkv holds {} ≠ {n}×3×{c}",
        qkv.len()
    );
    assert_eq!(out.len(), n * c);
    if n == 0 || c == 0 {
        return;
    }
    let heads_out: Vec<Vec<f32>> = (0..heads)
        .into_par_iter()
        .map(|h| {
            let gather = |part: usize| -> Vec<f32> {
                let mut m = Vec::with_capacity(n * hd);
                for t in 0..n {
                    let o = t * 3 * c + part * c + h * hd;
                    m.extend_from_slice(&qkv[o..o + hd]);
                }
                m
            };
            let (q, k, v) = (gather(0), gather(1), gather(2));
            let head = Head {
                q: &q,
                k: &k,
                v: &v,
                causal: None,
                t: n,
                s: n,
                hd,
                compute,
            };
            let mut o = vec![0f32; n * hd];
            head.attend(&mut o);
            o
        })
        .collect();
    for (h, o) in heads_out.iter().enumerate() {
        for t in 0..n {
            out[t * c + h * hd..t * c + (h + 1) * hd].copy_from_slice(&o[t * hd..(t + 1) * hd]);
        }
    }
}

/// Grouped-query attention of `t` new queries over `s ≥ t` cached keys (the last `t` of which
/// are the queries' own positions), causal (query `i` sees keys up to its own position) or, with
/// `causal` false, over every key (OFT's bidirectional pass): `q [1, heads, t, hd]`, `k`,
/// `v [1, kv_heads, s, hd]` (f32 on
/// CPU; keys and values may be strided views as long as each position's row is contiguous),
/// query head `h` reading key head `h / (heads / kv_heads)`; gives
/// `[1, heads, t, hd]`, the products of a many-query step in `compute`'s arithmetic where the
/// tile unit runs it. `None` where this kernel does not apply (other dtypes or devices), for
/// the caller's generic path.
pub fn cache_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
    compute: ComputePrecision,
) -> candle_core::Result<Option<Tensor>> {
    let f32_cpu = |x: &Tensor| x.device().is_cpu() && x.dtype() == candle_core::DType::F32;
    if !(f32_cpu(q) && f32_cpu(k) && f32_cpu(v)) {
        return Ok(None);
    }
    // Keys and values may be views of a larger cache buffer (`[1, kv_heads, capacity, hd]`
    // narrowed to the filled positions): read in place as long as each position's row is
    // contiguous.
    let rows = |x: &Tensor| -> candle_core::Result<Tensor> {
        let st = x.stride();
        if st.len() == 4 && st[3] == 1 && st[2] == x.dim(3)? {
            Ok(x.clone())
        } else {
            x.contiguous()
        }
    };
    Ok(Some(q.contiguous()?.apply_op3_no_bwd(
        &rows(k)?,
        &rows(v)?,
        &CacheAttention { causal, compute },
    )?))
}

/// The f32 elements of `[1, heads, s, hd]` keys or values whose rows are contiguous, from the
/// first element of head 0 to the last of the last head, and the distance between heads.
fn head_rows<'a>(st: &'a CpuStorage, l: &Layout) -> candle_core::Result<(&'a [f32], usize)> {
    let CpuStorage::F32(v) = st else {
        candle_core::bail!("gqa-cache-attention expects f32")
    };
    let (_, heads, s, hd) = l.shape().dims4()?;
    let stride = l.stride();
    if stride[3] != 1 || stride[2] != hd || (heads > 1 && stride[1] < s * hd) {
        candle_core::bail!(
            "gqa-cache-attention: keys/values need contiguous rows, got strides {stride:?}"
        );
    }
    let start = l.start_offset();
    let end = if heads == 0 || s == 0 {
        start
    } else {
        start + (heads - 1) * stride[1] + s * hd
    };
    if end > v.len() {
        candle_core::bail!("gqa-cache-attention: view past the end of its storage");
    }
    Ok((&v[start..end], stride[1]))
}

struct CacheAttention {
    causal: bool,
    compute: ComputePrecision,
}

impl CustomOp3 for CacheAttention {
    fn name(&self) -> &'static str {
        "gqa-cache-attention"
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
        let q = f32_contiguous(s1, l1, "gqa-cache-attention")?;
        let (k, k_stride) = head_rows(s2, l2)?;
        let (v, v_stride) = head_rows(s3, l3)?;
        let (b, heads, t, hd) = l1.shape().dims4()?;
        let (bk, kv_heads, s, hdk) = l2.shape().dims4()?;
        if b != 1 || bk != 1 || l3.shape() != l2.shape() || hdk != hd {
            candle_core::bail!(
                "gqa-cache-attention: q {:?}, k {:?}, v {:?} (one row, matching head_dim)",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        if kv_heads == 0 || heads % kv_heads != 0 || s < t {
            candle_core::bail!(
                "gqa-cache-attention: {heads} query heads over {kv_heads} key heads, {t} queries \
                 over {s} keys"
            );
        }
        if k_stride != v_stride {
            candle_core::bail!("gqa-cache-attention: keys and values laid out differently");
        }
        let mut out = vec![0f32; heads * t * hd];
        let dims = (heads, kv_heads, t, s, hd);
        over_cache(
            q,
            (k, v, k_stride),
            &mut out,
            dims,
            self.causal,
            self.compute,
        );
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `out [heads, t, hd]` = attention (causal, or over every key) of `q [heads, t, hd]` over keys and values
/// `(k, v, head_stride)`: head `g`'s `s` positions start at `g · head_stride` (`s · hd` when
/// packed).
/// `dims` = `(heads, kv_heads, t, s, hd)`.
pub fn over_cache(
    q: &[f32],
    (k, v, hs): (&[f32], &[f32], usize),
    out: &mut [f32],
    (heads, kv_heads, t, s, hd): (usize, usize, usize, usize, usize),
    causal: bool,
    compute: ComputePrecision,
) {
    assert!(q.len() == heads * t * hd && out.len() == q.len());
    assert!(s >= t && hs >= s * hd && v.len() == k.len());
    assert!(kv_heads == 0 || k.len() >= (kv_heads - 1) * hs + s * hd);
    if t == 0 || hd == 0 {
        return;
    }
    let rep = heads / kv_heads;
    out.par_chunks_mut(t * hd).enumerate().for_each(|(h, o)| {
        let g = h / rep;
        let head = Head {
            q: &q[h * t * hd..(h + 1) * t * hd],
            k: &k[g * hs..g * hs + s * hd],
            v: &v[g * hs..g * hs + s * hd],
            causal: causal.then_some(s - t),
            t,
            s,
            hd,
            compute,
        };
        head.attend(o);
    });
}

/// One head's inputs: `q [t, hd]`, `k`, `v [s, hd]` (row-major). With `causal: Some(past)`,
/// query `i` sees keys `0 ..= past + i` only.
struct Head<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    causal: Option<usize>,
    t: usize,
    s: usize,
    hd: usize,
    /// The products' arithmetic where the tile unit runs them (many-query heads).
    compute: ComputePrecision,
}

impl Head<'_> {
    /// `out [t, hd] = softmax(q·kᵀ / √hd) · v`: row by row for a few queries (decode steps),
    /// with the packed matmul kernel for many.
    fn attend(&self, out: &mut [f32]) {
        if self.t < super::GEMM_MIN_ROWS {
            self.attend_rows(out)
        } else if self.compute == ComputePrecision::Bf16
            && crate::dispatch::bf16_path() == crate::dispatch::Bf16Path::Amx
        {
            self.attend_amx(out)
        } else {
            self.attend_packed(out)
        }
    }

    /// Scores and output on the AMX tile unit in bf16 arithmetic: `q·kᵀ` from rounded q and k
    /// (k rows are the product's weight rows), the f32 softmax, then the rounded probabilities
    /// times v (read depth-major, as a linear's `dx = g·W` reads its weight).
    fn attend_amx(&self, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            use crate::amx::{gemm, gemm_depth_major, PackedRowsAmx};
            let Head {
                q, k, v, t, s, hd, ..
            } = *self;
            let a = PackedRowsAmx::pack(q, t, hd);
            // SAFETY: round_slice writes all s·hd bits, the products all t·s scores and t·hd
            // outputs.
            let mut kb = unsafe { super::uninit_vec::<u16>(s * hd) };
            super::bf16_gemm::round_slice(&k[..s * hd], &mut kb);
            let mut scores = unsafe { super::uninit_vec::<f32>(t * s) };
            // SAFETY: AMX is the dispatched bf16 path (so usable); kb holds s rows of hd, scores
            // t rows of s, v s rows of hd, out t rows of hd.
            unsafe { gemm(&a, &kb, scores.as_mut_ptr(), s, s) };
            self.softmax_rows(&mut scores);
            let p = PackedRowsAmx::pack(&scores, t, s);
            unsafe { gemm_depth_major(&p, &v[..s * hd], hd, 0, out.as_mut_ptr(), hd, hd) };
        }
        #[cfg(not(target_arch = "x86_64"))]
        self.attend_packed(out)
    }

    /// The causal mask (where there is one) and the scaled softmax of each row of `scores`.
    fn softmax_rows(&self, scores: &mut [f32]) {
        for (i, row) in scores.chunks_mut(self.s).enumerate() {
            if let Some(past) = self.causal {
                row[past + i + 1..].fill(f32::NEG_INFINITY);
            }
            softmax_scaled(row, self.scale());
        }
    }

    fn scale(&self) -> f32 {
        (self.hd as f32).powf(-0.5)
    }

    /// Each query row's scores are dot products with the keys it may see, and its output is
    /// the probability-weighted sum of those value rows, both read in place: packing keys and
    /// values for the matmul kernel would cost as much as the products for a single query.
    fn attend_rows(&self, out: &mut [f32]) {
        let Head {
            q, k, v, t, s, hd, ..
        } = *self;
        let mut scores = vec![0f32; s];
        for (i, (qi, o)) in q
            .chunks_exact(hd)
            .zip(out.chunks_exact_mut(hd))
            .take(t)
            .enumerate()
        {
            let len = self.causal.map_or(s, |past| (past + i + 1).min(s));
            let row = &mut scores[..len];
            for (sc, kj) in row.iter_mut().zip(k.chunks_exact(hd)) {
                *sc = super::f32_matmul::dot(qi, kj);
            }
            softmax_scaled(row, self.scale());
            o.fill(0.0);
            for (&p, vj) in row.iter().zip(v.chunks_exact(hd)) {
                axpy(p, vj, o);
            }
        }
    }

    /// Scores and output through [`super::gemm_single`], with `vᵀ` as the second product's
    /// weight.
    fn attend_packed(&self, out: &mut [f32]) {
        let Head {
            q, k, v, t, s, hd, ..
        } = *self;
        let mut vt = vec![0f32; hd * s];
        for (j, row) in v.chunks(hd).enumerate() {
            for (d, &x) in row.iter().enumerate() {
                vt[d * s + j] = x;
            }
        }
        let mut scores = vec![0f32; t * s];
        super::gemm_single(q, k, &mut scores, s, t, s, hd);
        self.softmax_rows(&mut scores);
        super::gemm_single(&scores, &vt, out, hd, t, hd, s);
    }
}

/// `y += a · x`.
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len());
    #[cfg(target_arch = "x86_64")]
    {
        if super::has_avx2() {
            // SAFETY: the CPU supports AVX2 and FMA (checked by has_avx2); lengths are equal.
            unsafe { axpy_avx2(a, x, y) };
            return;
        }
    }
    for (y, &x) in y.iter_mut().zip(x) {
        *y = a.mul_add(x, *y);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_avx2(a: f32, x: &[f32], y: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = x.len();
    let av = _mm256_set1_ps(a);
    let mut i = 0;
    while i + 8 <= n {
        let p = y.as_mut_ptr().add(i);
        _mm256_storeu_ps(
            p,
            _mm256_fmadd_ps(av, _mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(p)),
        );
        i += 8;
    }
    for j in i..n {
        y[j] = a.mul_add(x[j], y[j]);
    }
}

/// `row = softmax(row · scale)` in place (max subtracted first, as PyTorch does).
pub fn softmax_scaled(row: &mut [f32], scale: f32) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    if !max.is_finite() {
        // All −∞ (fully masked) or NaN: PyTorch gives NaN; so do we.
        row.fill(f32::NAN);
        return;
    }
    for x in row.iter_mut() {
        *x = (*x - max) * scale;
    }
    exp_slice(row);
    let sum: f32 = row.iter().sum();
    let inv = 1.0 / sum;
    for x in row.iter_mut() {
        *x *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::lcg;

    fn reference(qkv: &[f32], n: usize, heads: usize, hd: usize) -> Vec<f64> {
        let c = heads * hd;
        let at = |t: usize, part: usize, h: usize, d: usize| {
            qkv[t * 3 * c + part * c + h * hd + d] as f64
        };
        let scale = (hd as f64).powf(-0.5);
        let mut out = vec![0f64; n * c];
        for h in 0..heads {
            for i in 0..n {
                let s: Vec<f64> = (0..n)
                    .map(|j| {
                        (0..hd)
                            .map(|d| at(i, 0, h, d) * at(j, 1, h, d))
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..hd {
                    out[i * c + h * hd + d] = (0..n).map(|j| e[j] / z * at(j, 2, h, d)).sum();
                }
            }
        }
        out
    }

    #[test]
    fn matches_f64_attention_on_ragged_shapes() {
        let mut seed = 5u64;
        for (n, heads, hd) in [(1, 1, 1), (7, 2, 3), (13, 3, 16), (40, 4, 64), (261, 2, 64)] {
            let qkv: Vec<f32> = (0..n * 3 * heads * hd)
                .map(|_| 2.0 * lcg(&mut seed))
                .collect();
            let mut out = vec![f32::NAN; n * heads * hd];
            attention(&qkv, &mut out, n, heads, hd, ComputePrecision::F32);
            let want = reference(&qkv, n, heads, hd);
            for (i, (&g, &w)) in out.iter().zip(&want).enumerate() {
                assert!(
                    (g as f64 - w).abs() <= 2e-6,
                    "n={n} heads={heads} hd={hd} at {i}: {g} vs {w}"
                );
            }
        }
    }

    /// bf16 arithmetic (`--compute bf16`): within bf16's precision of the f64 attention on
    /// ragged shapes; on AMX it is the tile path (its bits differ from the f32 path's), and a
    /// causal prefill's rows give the bits of the same queries in a longer prefill. Elsewhere
    /// bf16 takes the f32 path (checked equal).
    #[test]
    fn bf16_attention_is_within_bf16_precision_and_row_independent() {
        let amx = crate::dispatch::bf16_path() == crate::dispatch::Bf16Path::Amx;
        let mut seed = 15u64;
        for (n, heads, hd) in [(8, 1, 8), (13, 3, 16), (40, 4, 64), (261, 2, 64)] {
            let qkv: Vec<f32> = (0..n * 3 * heads * hd)
                .map(|_| 2.0 * lcg(&mut seed))
                .collect();
            let mut out = vec![f32::NAN; n * heads * hd];
            attention(&qkv, &mut out, n, heads, hd, ComputePrecision::Bf16);
            let want = reference(&qkv, n, heads, hd);
            for (i, (&g, &w)) in out.iter().zip(&want).enumerate() {
                assert!(
                    (g as f64 - w).abs() <= 2e-2 * (1.0 + w.abs()),
                    "n={n} heads={heads} hd={hd} at {i}: {g} vs {w}"
                );
            }
            let mut f32_out = vec![f32::NAN; n * heads * hd];
            attention(&qkv, &mut f32_out, n, heads, hd, ComputePrecision::F32);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&out) != bits(&f32_out),
                amx,
                "n={n}: the bf16 path {} the f32 one",
                if amx { "equals" } else { "differs from" }
            );
        }
        if !amx {
            eprintln!("skipped: AMX bf16 attention (not the dispatched bf16 path here); the f32 path checked");
        }
        if !crate::sgemm::available() {
            // The portable path multiplies on the `gemm` crate, whose sums depend on the
            // number of rows.
            eprintln!("skipped: causal rows independent of the prefill's length (portable path)");
            return;
        }
        // Causal: the first 16 queries of a 40-query prefill give the bits of a 16-query
        // prefill over the same keys (each row depends on its own queries and keys only).
        let (heads, kv, hd, s) = (4, 2, 32, 40);
        let q: Vec<f32> = (0..heads * s * hd).map(|_| lcg(&mut seed)).collect();
        let k: Vec<f32> = (0..kv * s * hd).map(|_| lcg(&mut seed)).collect();
        let v: Vec<f32> = (0..kv * s * hd).map(|_| lcg(&mut seed)).collect();
        let mut long = vec![0f32; heads * s * hd];
        over_cache(
            &q,
            (&k, &v, s * hd),
            &mut long,
            (heads, kv, s, s, hd),
            true,
            ComputePrecision::Bf16,
        );
        let t = 16;
        let mut q16 = vec![0f32; heads * t * hd];
        for h in 0..heads {
            q16[h * t * hd..(h + 1) * t * hd].copy_from_slice(&q[h * s * hd..][..t * hd]);
        }
        let (k16, v16): (Vec<f32>, Vec<f32>) = (
            (0..kv)
                .flat_map(|g| k[g * s * hd..][..t * hd].to_vec())
                .collect(),
            (0..kv)
                .flat_map(|g| v[g * s * hd..][..t * hd].to_vec())
                .collect(),
        );
        let mut short = vec![0f32; heads * t * hd];
        let dims = (heads, kv, t, t, hd);
        over_cache(
            &q16,
            (&k16, &v16, t * hd),
            &mut short,
            dims,
            true,
            ComputePrecision::Bf16,
        );
        for h in 0..heads {
            let a: Vec<u32> = long[h * s * hd..][..t * hd]
                .iter()
                .map(|x| x.to_bits())
                .collect();
            let b: Vec<u32> = short[h * t * hd..][..t * hd]
                .iter()
                .map(|x| x.to_bits())
                .collect();
            assert_eq!(a, b, "head {h}: rows differ between the prefills");
        }
    }

    /// Attention over a cache without the causal mask (OFT's bidirectional pass) is the vision
    /// kernel's attention: the same bits as [`attention`] on the same q, k, v, in both
    /// arithmetics and across the row-wise (decode-sized) and packed paths.
    #[test]
    fn bidirectional_cache_attention_is_the_vision_attention() {
        let mut seed = 23u64;
        for compute in [ComputePrecision::F32, ComputePrecision::Bf16] {
            for (n, heads, hd) in [(3, 2, 8), (21, 3, 16), (40, 2, 64)] {
                let c = heads * hd;
                let qkv: Vec<f32> = (0..n * 3 * c).map(|_| lcg(&mut seed)).collect();
                let mut want = vec![f32::NAN; n * c];
                attention(&qkv, &mut want, n, heads, hd, compute);
                // The same operands head-major, [heads, n, hd] each.
                let part = |p: usize| -> Vec<f32> {
                    (0..heads)
                        .flat_map(|h| (0..n).flat_map(move |t| (0..hd).map(move |d| (t, h, d))))
                        .map(|(t, h, d)| qkv[t * 3 * c + p * c + h * hd + d])
                        .collect()
                };
                let (q, k, v) = (part(0), part(1), part(2));
                let mut got = vec![f32::NAN; n * c];
                over_cache(
                    &q,
                    (&k, &v, n * hd),
                    &mut got,
                    (heads, heads, n, n, hd),
                    false,
                    compute,
                );
                for h in 0..heads {
                    for t in 0..n {
                        let g = &got[(h * n + t) * hd..][..hd];
                        let w = &want[t * c + h * hd..][..hd];
                        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(g), bits(w), "{compute:?} n={n} head {h} query {t}");
                    }
                }
            }
        }
    }

    #[test]
    fn op_matches_the_candle_path_and_checks_shapes() {
        let dev = candle_core::Device::Cpu;
        let mut seed = 8u64;
        let (b, n, heads, hd) = (2, 19, 3, 8);
        let v: Vec<f32> = (0..b * n * 3 * heads * hd)
            .map(|_| lcg(&mut seed))
            .collect();
        let qkv = Tensor::from_vec(v, (b, n, 3 * heads * hd), &dev).unwrap();
        let fused = fused_qkv_attention(&qkv, heads, ComputePrecision::F32).unwrap();
        // The candle path, through f64 (which takes the fallback branch).
        let slow = fused_qkv_attention(
            &qkv.to_dtype(candle_core::DType::F64).unwrap(),
            heads,
            ComputePrecision::F32,
        )
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap();
        assert_eq!(fused.dims(), &[b, n, heads * hd]);
        let d = (fused - slow).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-6);
        assert!(fused_qkv_attention(&qkv, 5, ComputePrecision::F32).is_err());
        assert!(fused_qkv_attention(&qkv, 0, ComputePrecision::F32).is_err());
    }

    #[test]
    fn causal_gqa_matches_f64_and_the_candle_path() {
        let dev = candle_core::Device::Cpu;
        let mut seed = 12u64;
        for (heads, kv_heads, t, s, hd) in [
            (4, 2, 5, 9, 8),
            (2, 2, 7, 7, 16),
            (6, 1, 1, 4, 3),
            (14, 2, 33, 33, 64),
            (8, 8, 1, 40, 128),
        ] {
            let q: Vec<f32> = (0..heads * t * hd).map(|_| lcg(&mut seed)).collect();
            let k: Vec<f32> = (0..kv_heads * s * hd).map(|_| lcg(&mut seed)).collect();
            let v: Vec<f32> = (0..kv_heads * s * hd).map(|_| lcg(&mut seed)).collect();
            let qt = Tensor::from_vec(q.clone(), (1, heads, t, hd), &dev).unwrap();
            let kt = Tensor::from_vec(k.clone(), (1, kv_heads, s, hd), &dev).unwrap();
            let vt = Tensor::from_vec(v.clone(), (1, kv_heads, s, hd), &dev).unwrap();
            let got = cache_attention(&qt, &kt, &vt, true, ComputePrecision::F32)
                .unwrap()
                .unwrap();
            assert_eq!(got.dims(), &[1, heads, t, hd]);
            let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let rep = heads / kv_heads;
            let past = s - t;
            let scale = (hd as f64).powf(-0.5);
            for h in 0..heads {
                let g = h / rep;
                for i in 0..t {
                    let sc: Vec<f64> = (0..=past + i)
                        .map(|j| {
                            (0..hd)
                                .map(|d| {
                                    q[(h * t + i) * hd + d] as f64 * k[(g * s + j) * hd + d] as f64
                                })
                                .sum::<f64>()
                                * scale
                        })
                        .collect();
                    let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                    for d in 0..hd {
                        let want: f64 = sc
                            .iter()
                            .enumerate()
                            .map(|(j, x)| (x - m).exp() / z * v[(g * s + j) * hd + d] as f64)
                            .sum();
                        let g = got[(h * t + i) * hd + d] as f64;
                        assert!((g - want).abs() <= 2e-6, "h={h} i={i} d={d}: {g} vs {want}");
                    }
                }
            }
        }
        // Keys and values as views into larger cache buffers (capacity 12 > s = 9) give the
        // same bits as packed copies.
        let (heads, kv_heads, t, s, hd) = (4, 2, 3, 9, 8);
        let q = Tensor::from_vec(
            (0..heads * t * hd)
                .map(|_| lcg(&mut seed))
                .collect::<Vec<f32>>(),
            (1, heads, t, hd),
            &dev,
        )
        .unwrap();
        let buf = |seed: &mut u64| {
            Tensor::from_vec(
                (0..kv_heads * 12 * hd)
                    .map(|_| lcg(seed))
                    .collect::<Vec<f32>>(),
                (1, kv_heads, 12, hd),
                &dev,
            )
            .unwrap()
            .narrow(2, 0, s)
            .unwrap()
        };
        let (kb, vb) = (buf(&mut seed), buf(&mut seed));
        assert!(!kb.is_contiguous());
        let strided = cache_attention(&q, &kb, &vb, true, ComputePrecision::F32)
            .unwrap()
            .unwrap();
        let (kc, vc) = (kb.contiguous().unwrap(), vb.contiguous().unwrap());
        let packed = cache_attention(&q, &kc, &vc, true, ComputePrecision::F32)
            .unwrap()
            .unwrap();
        assert_eq!(
            strided.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            packed.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        // Not f32: left to the caller's path.
        let x = Tensor::zeros((1, 2, 3, 4), candle_core::DType::F64, &dev).unwrap();
        assert!(cache_attention(&x, &x, &x, true, ComputePrecision::F32)
            .unwrap()
            .is_none());
        // Bad head grouping and more queries than keys are errors.
        let q = Tensor::zeros((1, 3, 2, 4), candle_core::DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 2, 2, 4), candle_core::DType::F32, &dev).unwrap();
        assert!(cache_attention(&q, &k, &k, true, ComputePrecision::F32).is_err());
        let q = Tensor::zeros((1, 2, 5, 4), candle_core::DType::F32, &dev).unwrap();
        assert!(cache_attention(&q, &k, &k, true, ComputePrecision::F32).is_err());
    }

    #[test]
    fn softmax_handles_masked_rows() {
        let mut r = vec![f32::NEG_INFINITY; 4];
        softmax_scaled(&mut r, 1.0);
        assert!(r.iter().all(|x| x.is_nan()));
        let mut r = vec![0.0, f32::NEG_INFINITY, 0.0];
        softmax_scaled(&mut r, 0.5);
        assert_eq!(r, vec![0.5, 0.0, 0.5]);
    }
}
