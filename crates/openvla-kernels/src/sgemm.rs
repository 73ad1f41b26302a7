//! A packed f32 GEMM for `dst [m, nb] = x [m, k] · wᵀ` (`w [nb, k]` row-major), AVX-512F or
//! AVX2+FMA ([`crate::dispatch::f32_gemm`]).
//!
//! The many-row products (vision towers, projector, prefill) are compute-bound. The `gemm`
//! crate reaches about 45 % of this machine's measured f32 FMA peak on these shapes
//! (`docs/kernels.md`); this kernel is the classic BLIS/GotoBLAS layout:
//! - the activations are packed once per call into panels of [`MR`] rows (`[k][MR]`, zero padded),
//!   shared read-only by all threads ([`PackedRows`]);
//! - each thread packs `KC`-deep blocks of its weight rows into panels of [`NR`] columns
//!   (`[kc][NR]`), one panel of which (16 KiB) stays in L1 while every row panel streams past it
//!   from L2;
//! - the micro-kernel keeps a 6×16 block of `dst` in twelve AVX registers and does twelve FMAs
//!   per two weight loads and six broadcasts; with AVX-512F the panels are [`NR512`] = 32 columns
//!   wide and the same twelve accumulators are zmm registers (6×32, twice the work per
//!   instruction).
//!
//! Each output element is a sum over `k` in blocks of `KC`, in order, so the result differs from
//! a plain dot product only by rounding (tests compare with an f64 reference on ragged shapes).
//! Without AVX2+FMA the caller falls back to the `gemm` crate.

use std::cell::RefCell;

/// Rows of `x` per micro-panel.
pub const MR: usize = 6;
/// Weight rows (output columns) per micro-panel.
pub const NR: usize = 16;
/// Weight rows per micro-panel of the AVX-512F kernel.
pub const NR512: usize = 32;
/// Depth of a packed block (a 16-wide weight panel of this depth is 16 KiB, half of L1).
pub const KC: usize = 256;
/// Panels [`PackedRows::pack_transposed`] fills per pass over the depth rows (96 contiguous
/// floats read per row).
pub const TRANSPOSED_GROUP: usize = 16;
/// Depth rows per block of [`PackedRows::pack_transposed`] (64 rows of a group: 24 KiB).
pub const TRANSPOSED_DEPTH: usize = 64;

/// Activations `x [m, k]` packed into panels of [`MR`] rows: panel `p` holds rows
/// `p·MR .. p·MR + MR` as `[k][MR]`, rows past `m` zero.
pub struct PackedRows {
    data: Vec<f32>,
    m: usize,
    k: usize,
}

impl PackedRows {
    /// Packs `x [m, k]` (row-major).
    pub fn pack(x: &[f32], m: usize, k: usize) -> PackedRows {
        assert!(
            x.len() >= m * k,
            "packed rows: x holds {} < {m}×{k}",
            x.len()
        );
        Self::pack_groups(m, k, 1, |p, panel| {
            let rows = MR.min(m - p * MR);
            let row = |i: usize| &x[(p * MR + i) * k..(p * MR + i + 1) * k];
            if rows == MR {
                // Written in order, six rows read side by side.
                let r: [&[f32]; MR] = std::array::from_fn(row);
                for (kk, o) in panel.chunks_exact_mut(MR).enumerate() {
                    o.copy_from_slice(&[
                        r[0][kk], r[1][kk], r[2][kk], r[3][kk], r[4][kk], r[5][kk],
                    ]);
                }
            } else {
                panel.fill(0.0);
                for r in 0..rows {
                    for (kk, &v) in row(r).iter().enumerate() {
                        panel[kk * MR + r] = v;
                    }
                }
            }
        })
    }

    /// Packs `x = xtᵀ [m, k]` from its transpose `xt [k, m]` (row-major, row stride `ld ≥ m`;
    /// a linear's `gᵀ` in `dW = gᵀ·x`): element `[kk][r]` of panel `p` is `xt[kk][p·MR + r]`.
    /// [`TRANSPOSED_GROUP`] panels are filled in one pass over the depth rows, so each row of
    /// `xt` is read as one contiguous run of `TRANSPOSED_GROUP · MR` floats (one panel at a time
    /// read 24 bytes of a cache line per row and ran about 3x slower). The panels equal
    /// [`PackedRows::pack`]'s of the transpose.
    pub fn pack_transposed(xt: &[f32], k: usize, m: usize, ld: usize) -> PackedRows {
        crate::check_transposed(xt, k, m, ld);
        Self::pack_groups(m, k, TRANSPOSED_GROUP, |p0, group| {
            let panels = group.len() / (k * MR);
            let c0 = p0 * MR;
            let cols = (m - c0).min(panels * MR);
            let full = cols / MR;
            // Blocks of TRANSPOSED_DEPTH rows: read once into L1, then written panel by panel
            // as contiguous runs.
            for k0 in (0..k).step_by(TRANSPOSED_DEPTH) {
                let kb = TRANSPOSED_DEPTH.min(k - k0);
                for g in 0..full {
                    let out = &mut group[g * k * MR + k0 * MR..][..kb * MR];
                    for (kk, o) in out.chunks_exact_mut(MR).enumerate() {
                        o.copy_from_slice(&xt[(k0 + kk) * ld + c0 + g * MR..][..MR]);
                    }
                }
                if full < panels {
                    // The matrix's last, ragged panel: its rows past `m` are zero.
                    let rows = cols - full * MR;
                    let out = &mut group[full * k * MR + k0 * MR..][..kb * MR];
                    for (kk, o) in out.chunks_exact_mut(MR).enumerate() {
                        o[..rows].copy_from_slice(&xt[(k0 + kk) * ld + c0 + full * MR..][..rows]);
                        o[rows..].fill(0.0);
                    }
                }
            }
        })
    }

    /// The array for `m` rows of depth `k`, filled by groups of panels: `fill(p0, group)` writes
    /// every element of panels `p0 .. p0 + group.len() / (k·MR)` (at most `per_group`, each
    /// `[k][MR]` with its rows past `m` zero, contiguous in `group`), groups in parallel where
    /// there is enough to split. No zero-fill of the whole array first.
    fn pack_groups(
        m: usize,
        k: usize,
        per_group: usize,
        fill: impl Fn(usize, &mut [f32]) + Sync,
    ) -> PackedRows {
        use rayon::prelude::*;
        let panels = m.div_ceil(MR);
        // SAFETY: `fill` writes every element of each group (its contract) before any read.
        let mut data = unsafe { crate::uninit_vec::<f32>(panels * k * MR) };
        if k > 0 {
            let size = per_group * k * MR;
            let pack = |(g, group): (usize, &mut [f32])| fill(g * per_group, group);
            if panels * k * MR >= 1 << 16 {
                data.par_chunks_mut(size).enumerate().for_each(pack);
            } else {
                data.chunks_mut(size).enumerate().for_each(pack);
            }
        }
        PackedRows { data, m, k }
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.m
    }

    /// Depth.
    pub fn depth(&self) -> usize {
        self.k
    }

    /// Panel `p`'s block `k0 .. k0 + kc` (`[kc][MR]`).
    fn block(&self, p: usize, k0: usize, kc: usize) -> &[f32] {
        let start = p * self.k * MR + k0 * MR;
        &self.data[start..start + kc * MR]
    }
}

thread_local! {
    /// The calling thread's packed weight block, reused across tiles and calls.
    static PACKED_W: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Whether this kernel can run here (AVX2 and FMA, or AVX-512F).
pub fn available() -> bool {
    super::has_avx2()
}

/// The micro-kernel of [`gemm_packed`]: the 6×32 zmm one where [`crate::dispatch::f32_gemm`]
/// says AVX-512, else the 6×16 ymm one. Tests call [`gemm_packed_with`] to run both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// 6×16, AVX2+FMA.
    Avx2,
    /// 6×32, AVX-512F.
    Avx512,
}

impl Kernel {
    /// The kernel the dispatcher picks.
    pub fn dispatched() -> Kernel {
        if crate::dispatch::f32_gemm() == crate::dispatch::GemmPath::Avx512 {
            Kernel::Avx512
        } else {
            Kernel::Avx2
        }
    }

    fn nr(self) -> usize {
        match self {
            Kernel::Avx2 => NR,
            Kernel::Avx512 => NR512,
        }
    }
}

/// `dst [m, nb] (row stride rs) = a · wᵀ` for `w [nb, k]` row-major f32 (single-threaded; the
/// callers run one tile of weight rows per thread), with the dispatched micro-kernel.
///
/// # Safety
/// [`available`] must be true, and `dst` valid for writes of `a.rows()` rows of `nb` elements,
/// `rs` apart, not written by anyone else meanwhile.
#[cfg(target_arch = "x86_64")]
pub unsafe fn gemm_packed(a: &PackedRows, w: &[f32], dst: *mut f32, rs: usize, nb: usize) {
    gemm_packed_with(Kernel::dispatched(), a, w, dst, rs, nb)
}

/// [`gemm_packed`] with a chosen micro-kernel.
///
/// # Safety
/// As [`gemm_packed`]; for [`Kernel::Avx512`] the CPU must also have AVX-512F
/// ([`crate::has_avx512`]).
#[cfg(target_arch = "x86_64")]
pub unsafe fn gemm_packed_with(
    kernel: Kernel,
    a: &PackedRows,
    w: &[f32],
    dst: *mut f32,
    rs: usize,
    nb: usize,
) {
    let k = a.k;
    assert!(w.len() >= nb * k, "sgemm: w holds {} < {nb}×{k}", w.len());
    let nr = kernel.nr();
    gemm_panels(kernel, a, dst, rs, nb, |jp, cols, k0, kc, bp| {
        pack_weights_nr(&w[jp * nr * k..], k, cols, k0, kc, bp, nr)
    })
}

/// [`gemm_packed`] for weights stored depth-major, `w [k, n]` row-major with row stride `ld`
/// (`dst = a · w[.., j0 .. j0 + nb]`: a linear's `W` in `dx = g·W`, or the `x` of
/// `dW = gᵀ·x`): each panel row is a contiguous run of `w`, copied without a transpose. The
/// sums are those of [`gemm_packed`] on the transpose.
///
/// # Safety
/// As [`gemm_packed`]; `w` holds `k` rows of `ld ≥ j0 + nb` elements (the last at least
/// `j0 + nb`).
#[cfg(target_arch = "x86_64")]
pub unsafe fn gemm_packed_depth_major(
    a: &PackedRows,
    w: &[f32],
    ld: usize,
    j0: usize,
    dst: *mut f32,
    rs: usize,
    nb: usize,
) {
    let k = a.k;
    assert!(
        k == 0 || nb == 0 || w.len() >= (k - 1) * ld + j0 + nb,
        "sgemm: depth-major w holds {} < {k} rows of {ld}",
        w.len()
    );
    let kernel = Kernel::dispatched();
    let nr = kernel.nr();
    gemm_panels(kernel, a, dst, rs, nb, |jp, cols, k0, kc, bp| {
        let c0 = j0 + jp * nr;
        for (kk, row) in bp[..kc * nr].chunks_exact_mut(nr).enumerate() {
            let src = &w[(k0 + kk) * ld + c0..(k0 + kk) * ld + c0 + cols];
            row[..cols].copy_from_slice(src);
            row[cols..].fill(0.0);
        }
    })
}

/// The blocked loop of [`gemm_packed_with`] and [`gemm_packed_depth_major`]: for each depth
/// block and each panel of `nr` weight columns, `fill(jp, cols, k0, kc, panel)` packs columns
/// `jp·nr .. jp·nr + cols` at depths `k0 .. k0 + kc` into `panel [kc][nr]` (zero past
/// `cols`), which the micro-kernel multiplies into every row panel of `a`.
///
/// # Safety
/// As [`gemm_packed_with`].
#[cfg(target_arch = "x86_64")]
unsafe fn gemm_panels(
    kernel: Kernel,
    a: &PackedRows,
    dst: *mut f32,
    rs: usize,
    nb: usize,
    fill: impl Fn(usize, usize, usize, usize, &mut [f32]),
) {
    let (m, k) = (a.m, a.k);
    if crate::trivial_product(m, k, nb, dst, rs) {
        return;
    }
    let nr = kernel.nr();
    let col_panels = nb.div_ceil(nr);
    let row_panels = m.div_ceil(MR);
    PACKED_W.with(|buf| {
        let mut buf = buf.borrow_mut();
        if buf.len() < KC * nr {
            buf.resize(KC * nr, 0.0);
        }
        let mut k0 = 0;
        while k0 < k {
            let kc = KC.min(k - k0);
            let first = k0 == 0;
            for jp in 0..col_panels {
                // One panel of weights at a time: it stays in L1 while the packed activations
                // of this depth block stream past it from L2.
                let cols = nr.min(nb - jp * nr);
                let bp = &mut buf[..kc * nr];
                fill(jp, cols, k0, kc, bp);
                for ip in 0..row_panels {
                    let ap = a.block(ip, k0, kc);
                    let rows = MR.min(m - ip * MR);
                    let c = dst.add(ip * MR * rs + jp * nr);
                    let micro = |c: *mut f32, rs: usize, acc: bool| match kernel {
                        Kernel::Avx2 => kernel_6x16(kc, ap.as_ptr(), bp.as_ptr(), c, rs, acc),
                        Kernel::Avx512 => kernel_6x32(kc, ap.as_ptr(), bp.as_ptr(), c, rs, acc),
                    };
                    if rows == MR && cols == nr {
                        micro(c, rs, !first);
                    } else {
                        // A ragged edge: the full block into a scratch tile, then its valid part.
                        let mut tile = [0f32; MR * NR512];
                        micro(tile.as_mut_ptr(), nr, false);
                        for r in 0..rows {
                            for j in 0..cols {
                                let o = c.add(r * rs + j);
                                let v = tile[r * nr + j];
                                *o = if first { v } else { *o + v };
                            }
                        }
                    }
                }
            }
            k0 += kc;
        }
    });
}

/// Packs columns `k0 .. k0 + kc` of the first `cols` (≤ [`NR`]) rows of `w` (row length `k`)
/// into one panel `[kc][NR]`, columns past `cols` zero.
#[cfg(test)]
fn pack_weights(w: &[f32], k: usize, cols: usize, k0: usize, kc: usize, panel: &mut [f32]) {
    pack_weights_nr(w, k, cols, k0, kc, panel, NR)
}

/// Packs columns `k0 .. k0 + kc` of the first `cols` (≤ `nr`, a multiple of 16) rows of `w`
/// (row length `k`) into one panel `[kc][nr]`, columns past `cols` zero.
fn pack_weights_nr(
    w: &[f32],
    k: usize,
    cols: usize,
    k0: usize,
    kc: usize,
    panel: &mut [f32],
    nr: usize,
) {
    assert!(panel.len() >= kc * nr && cols <= nr && nr.is_multiple_of(16));
    assert!(cols == 0 || w.len() >= (cols - 1) * k + k0 + kc);
    for g in 0..nr / 16 {
        let gc = cols.saturating_sub(g * 16).min(16);
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if gc == 16 && super::has_avx2() {
            done = kc - kc % 8;
            // SAFETY: AVX2 checked; rows g·16 .. g·16 + 16 of w hold columns k0 .. k0 + kc
            // and the panel kc × nr (asserted above).
            unsafe {
                transpose_16xk_avx2(
                    w.as_ptr().add(g * 16 * k + k0),
                    k,
                    done,
                    panel.as_mut_ptr().add(g * 16),
                    nr,
                )
            };
        }
        for j in g * 16..g * 16 + gc {
            let row = &w[j * k + k0..j * k + k0 + kc];
            for (kk, &v) in row.iter().enumerate().skip(done) {
                panel[kk * nr + j] = v;
            }
        }
    }
    if cols < nr {
        for kk in 0..kc {
            panel[kk * nr + cols..(kk + 1) * nr].fill(0.0);
        }
    }
}

/// `panel[kk][j] = w[j][kk]` for 16 rows `j` (row stride `k`) and `kk < kc` (a multiple of 8),
/// by 8×8 register transposes; panel rows are `stride` apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn transpose_16xk_avx2(
    w: *const f32,
    k: usize,
    kc: usize,
    panel: *mut f32,
    stride: usize,
) {
    use std::arch::x86_64::*;
    for half in 0..2 {
        let rows = w.add(half * 8 * k);
        let mut kk = 0;
        while kk < kc {
            let r: [__m256; 8] = std::array::from_fn(|j| _mm256_loadu_ps(rows.add(j * k + kk)));
            let cols = transpose8x8(r);
            for (c, v) in cols.iter().enumerate() {
                _mm256_storeu_ps(panel.add((kk + c) * stride + half * 8), *v);
            }
            kk += 8;
        }
    }
}

/// The 8×8 transpose of 32-bit lanes: `out[c]` lane `j` is `r[j]` lane `c`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) unsafe fn transpose8x8(
    r: [std::arch::x86_64::__m256; 8],
) -> [std::arch::x86_64::__m256; 8] {
    use std::arch::x86_64::*;
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ]
}

/// The 6×16 micro-kernel: `c[6, 16] (row stride rs) (+)= a[kc][6] · b[kc][16]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_6x16(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    rs: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    let (mut a, mut b) = (a, b);
    for _ in 0..kc {
        let b0 = _mm256_loadu_ps(b);
        let b1 = _mm256_loadu_ps(b.add(8));
        for (r, acc) in acc.iter_mut().enumerate() {
            let ar = _mm256_broadcast_ss(&*a.add(r));
            acc[0] = _mm256_fmadd_ps(ar, b0, acc[0]);
            acc[1] = _mm256_fmadd_ps(ar, b1, acc[1]);
        }
        a = a.add(MR);
        b = b.add(NR);
    }
    for (r, acc) in acc.iter().enumerate() {
        let row = c.add(r * rs);
        let (mut v0, mut v1) = (acc[0], acc[1]);
        if accumulate {
            v0 = _mm256_add_ps(v0, _mm256_loadu_ps(row));
            v1 = _mm256_add_ps(v1, _mm256_loadu_ps(row.add(8)));
        }
        _mm256_storeu_ps(row, v0);
        _mm256_storeu_ps(row.add(8), v1);
    }
}

/// The 6×32 micro-kernel: `c[6, 32] (row stride rs) (+)= a[kc][6] · b[kc][32]`, AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel_6x32(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    rs: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    let (mut a, mut b) = (a, b);
    for _ in 0..kc {
        let b0 = _mm512_loadu_ps(b);
        let b1 = _mm512_loadu_ps(b.add(16));
        for (r, acc) in acc.iter_mut().enumerate() {
            let ar = _mm512_set1_ps(*a.add(r));
            acc[0] = _mm512_fmadd_ps(ar, b0, acc[0]);
            acc[1] = _mm512_fmadd_ps(ar, b1, acc[1]);
        }
        a = a.add(MR);
        b = b.add(NR512);
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

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::dispatch::Features;
    use crate::test_util::{lcg, reference, SHAPES};

    #[test]
    fn pack_transposed_equals_pack_of_the_transpose() {
        let mut seed = 3u64;
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        // One panel, ragged panels, one group and a bit, several groups in parallel with a
        // ragged last group and a ragged last panel.
        for (m, k) in [
            (1, 5),
            (6, 1),
            (7, 3),
            (95, 17),
            (96, 40),
            (97, 9),
            (200, 33),
            (300, 700),
            (301, 300),
        ] {
            let ld = m + 5;
            let xt: Vec<f32> = (0..k * ld).map(|_| lcg(&mut seed)).collect();
            let x = crate::untranspose(&xt, ld, m, k);
            let want = PackedRows::pack(&x, m, k);
            let got = PackedRows::pack_transposed(&xt, k, m, ld);
            assert_eq!((got.rows(), got.depth()), (m, k));
            assert_eq!(bits(&got.data), bits(&want.data), "m={m} k={k}");
        }
    }

    #[test]
    fn matches_f64_reference_on_ragged_shapes() {
        if !available() {
            eprintln!("skipped: no AVX2+FMA on this CPU");
            return;
        }
        let mut kernels = vec![Kernel::Avx2];
        if Features::detect().avx512 {
            kernels.push(Kernel::Avx512);
        } else {
            eprintln!("skipped: the AVX-512F 6x32 sgemm kernel (no AVX-512 F/BW/VL on this CPU)");
        }
        for kernel in kernels {
            check_kernel(kernel);
        }
    }

    fn check_kernel(kernel: Kernel) {
        let mut seed = 7u64;
        let mut shapes = SHAPES.to_vec();
        // Deeper than one KC block (and not a multiple of it), rows and columns off the panels.
        shapes.extend([
            (13, 35, 600),
            (6, 16, 256),
            (6, 16, 512),
            (6, 32, 256),
            (12, 64, 300),
            (257, 48, 300),
        ]);
        for (m, n, k) in shapes {
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
            let want = reference(&x, &w, m, n, k);
            // A row stride wider than nb, with sentinels in the gaps that must survive.
            let rs = n + 3;
            let mut y = vec![f32::NAN; m * rs];
            let a = PackedRows::pack(&x, m, k);
            // SAFETY: AVX2 checked (and AVX-512F for that kernel); y holds m rows of stride
            // rs ≥ n.
            unsafe { gemm_packed_with(kernel, &a, &w, y.as_mut_ptr(), rs, n) };
            let tol = 2e-5 * (k as f64).sqrt().max(1.0);
            for i in 0..m {
                for j in 0..n {
                    let got = y[i * rs + j] as f64;
                    assert!(
                        (got - want[i * n + j]).abs() <= tol,
                        "{kernel:?} m={m} n={n} k={k} at ({i},{j}): {got} vs {}",
                        want[i * n + j]
                    );
                }
                for j in n..rs {
                    assert!(
                        y[i * rs + j].is_nan(),
                        "m={m} n={n} k={k}: gap ({i},{j}) written"
                    );
                }
            }
        }
    }

    #[test]
    fn packed_weight_panels_match_the_scalar_transpose() {
        let mut seed = 9u64;
        let k = 77;
        let w: Vec<f32> = (0..NR512 * k).map(|_| lcg(&mut seed)).collect();
        for (nr, cols, k0, kc) in [
            (NR, 16, 0, 64),
            (NR, 16, 3, 70),
            (NR, 16, 5, 7),
            (NR, 11, 1, 40),
            (NR, 1, 0, 77),
            (NR512, 32, 0, 64),
            (NR512, 32, 3, 70),
            (NR512, 20, 5, 17),
            (NR512, 16, 1, 40),
            (NR512, 7, 0, 77),
        ] {
            let mut panel = vec![f32::NAN; kc * nr];
            if nr == NR {
                pack_weights(&w, k, cols, k0, kc, &mut panel);
            } else {
                pack_weights_nr(&w, k, cols, k0, kc, &mut panel, nr);
            }
            for kk in 0..kc {
                for j in 0..nr {
                    let want = if j < cols { w[j * k + k0 + kk] } else { 0.0 };
                    assert_eq!(
                        panel[kk * nr + j],
                        want,
                        "nr={nr} cols={cols} k0={k0} kc={kc} ({kk},{j})"
                    );
                }
            }
        }
    }

    #[test]
    fn zero_depth_gives_zeros() {
        if !available() {
            return;
        }
        let a = PackedRows::pack(&[], 3, 0);
        let mut y = vec![f32::NAN; 3 * 5];
        // SAFETY: AVX2 checked; y holds 3 rows of 5.
        unsafe { gemm_packed(&a, &[], y.as_mut_ptr(), 5, 5) };
        assert!(y.iter().all(|&v| v == 0.0));
    }
}
