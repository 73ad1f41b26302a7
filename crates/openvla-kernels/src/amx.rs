//! Intel AMX (Advanced Matrix Extensions) for the bf16-arithmetic GEMM
//! ([`crate::ComputePrecision::Bf16`]): `tdpbf16ps` multiplies a 16×32 bf16 tile by a 32×16 one
//! and adds the 16×16 f32 result into an accumulator tile, 16,384 multiply-adds per
//! instruction. Sapphire Rapids and later Xeons have it; this machine measured about 8× its
//! AVX-512 f32 FMA rate (`openvla bench --limits`, docs/kernels.md).
//!
//! The arithmetic is the mode's: activations and weights rounded to bf16, every product exact in
//! f32, sums in f32 (the tile unit flushes f32 subnormal results and bf16 subnormal inputs to
//! zero, like PyTorch's oneDNN AMX path). Each output element is accumulated over the depth in a
//! fixed order whatever the number of rows, so a row's result does not depend on the rest of
//! the batch.
//!
//! The layout:
//! - activations `x [m, k]` are rounded to bf16 once per call into a row-major `[m↑32][k↑32]`
//!   array ([`PackedRowsAmx`]): an A tile is 16 rows of 32 bf16, one row stride apart;
//! - each thread packs 32 of its weight rows at a time into the pair panel of
//!   [`crate::bf16_gemm`] (`[k/2][32]` words `w[j][2q] | w[j][2q+1] << 16`): a B tile is 16 of its
//!   pair rows and 16 columns, 128 bytes apart;
//! - a 32×32 block of `y` lives in four accumulator tiles (`tmm0`-`tmm3`) for the whole depth;
//!   each step loads two A tiles (`tmm4`, `tmm5`) and two B tiles (`tmm6`, `tmm7`).
//!
//! The tile registers are written with inline assembly (the `std::arch` AMX intrinsics are not
//! stable). Linux hands the 8 KB tile state to a process only on request
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, Linux 5.16+); [`available`] asks once
//! and reports AMX missing when the request fails.

use crate::bf16_gemm::{pack_pairs, NR};
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::OnceLock;

/// Rows (and columns) of `y` per register block: two 16-row tiles by two 16-column tiles.
const BLOCK: usize = 32;
/// bf16 elements along the depth per tile step (16 pairs, 64 bytes per tile row).
const DEPTH: usize = 32;

/// Whether this process can run the AMX bf16 kernels: the CPU has AMX-TILE and AMX-BF16, the
/// OS saves the tile state (XCR0 bits 17 and 18), and Linux granted the tile data to this
/// process. Decided once.
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(detect)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    // CPUID leaves 0 and 1 exist on every x86-64 CPU; leaf 7 is checked against the maximum.
    let (max_leaf, osxsave) = (__cpuid(0).eax, __cpuid(1).ecx >> 27 & 1 == 1);
    if max_leaf < 7 || !osxsave {
        return false;
    }
    let l7 = __cpuid_count(7, 0);
    let (amx_bf16, amx_tile) = (l7.edx >> 22 & 1 == 1, l7.edx >> 24 & 1 == 1);
    if !(amx_bf16 && amx_tile) {
        return false;
    }
    // SAFETY: XGETBV exists where CPUID reports OSXSAVE (checked above).
    let xcr0 = unsafe { xgetbv0() };
    if xcr0 >> 17 & 3 != 3 {
        return false;
    }
    request_tile_permission()
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// XCR0, read with `xgetbv` (in assembly: the intrinsic needs the `xsave` target feature).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
unsafe fn xgetbv0() -> u64 {
    let (lo, hi): (u32, u32);
    std::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi,
        options(nomem, nostack, preserves_flags));
    (hi as u64) << 32 | lo as u64
}

/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: whether Linux lets this process (all
/// its threads) use the tile data registers.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_permission() -> bool {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: a plain Linux x86-64 system call; it reads no memory of ours and clobbers only
    // rcx and r11 (declared).
    unsafe {
        std::arch::asm!("syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _, lateout("r11") _,
            options(nostack));
    }
    ret == 0
}

/// Activations `x [m, k]` rounded to bf16 (to nearest even) in the order the tile loop reads
/// them: for each block of 32 rows and each depth step of 32, the 32 × 32 block row-major
/// ([`TILE_PAIR`] values, 2 KB: the step's two A tiles, 16 rows of 64 bytes each, one after
/// the other), the padding zero. Row-major rows `stride` long would put the 16 rows of an A
/// tile 2·k bytes apart: 32 interleaved streams per block that the hardware prefetchers do not
/// follow, where this layout reads one sequential stream.
pub struct PackedRowsAmx {
    data: Vec<u16>,
    m: usize,
    k: usize,
    /// Depth per row including the padding: `k` rounded up to [`DEPTH`] (at least one step).
    stride: usize,
}

/// bf16 values of one row block's depth step: two A tiles of 16 rows × 32.
const TILE_PAIR: usize = BLOCK * DEPTH;

impl PackedRowsAmx {
    /// Rounds and packs `x [m, k]` (row-major).
    pub fn pack(x: &[f32], m: usize, k: usize) -> PackedRowsAmx {
        assert!(x.len() >= m * k, "amx rows: x holds {} < {m}×{k}", x.len());
        Self::pack_blocks(m, k, |ib, valid, blk| {
            for rr in 0..valid {
                let row = &x[(ib * BLOCK + rr) * k..][..k];
                for (s, src) in row.chunks(DEPTH).enumerate() {
                    let dst = &mut blk[s * TILE_PAIR + rr * DEPTH..][..src.len()];
                    crate::bf16_gemm::round_slice(src, dst);
                }
            }
        })
    }

    /// The array for `m` rows of depth `k`: `fill(ib, valid, blk)` writes the values of row
    /// block `ib` (its first `valid` rows, depth `< k`), blocks in parallel; the padding is
    /// zeroed after (no zero-fill of the whole array first).
    fn pack_blocks(
        m: usize,
        k: usize,
        fill: impl Fn(usize, usize, &mut [u16]) + Sync,
    ) -> PackedRowsAmx {
        let stride = k.next_multiple_of(DEPTH).max(DEPTH);
        let rows = m.next_multiple_of(BLOCK);
        // SAFETY: every element is written below: `fill` writes each block's values (its
        // contract), zero_padding the rest.
        let mut data = unsafe { crate::uninit_vec::<u16>(rows * stride) };
        data.par_chunks_mut(BLOCK * stride)
            .enumerate()
            .for_each(|(ib, blk)| {
                let valid = BLOCK.min(m - ib * BLOCK);
                fill(ib, valid, blk);
                zero_padding(blk, valid, k, stride);
            });
        PackedRowsAmx { data, m, k, stride }
    }

    /// Packs `xᵀ` for a row-major `x [k, m]` (row stride `ld ≥ m`): the same array [`Self::pack`]
    /// builds from the transposed copy `[m, k]`, without that copy. Each task takes 32 columns
    /// of `x` (one block of 32 packed rows) and moves them 256 depth rows at a time through an
    /// L1-sized scratch: one read of `x` in f32 and one write in bf16, where the transposed copy
    /// read and wrote the whole matrix twice more (a linear's `dW = gᵀ·x` packs `gᵀ` this way).
    pub fn pack_transposed(x: &[f32], k: usize, m: usize, ld: usize) -> PackedRowsAmx {
        crate::check_transposed(x, k, m, ld);
        const SCRATCH_ROWS: usize = 256; // a multiple of DEPTH
        Self::pack_blocks(m, k, |ib, nc, blk| {
            let j0 = ib * BLOCK;
            let mut scratch = vec![0f32; nc * SCRATCH_ROWS.min(k)];
            for d0 in (0..k).step_by(SCRATCH_ROWS) {
                let dr = SCRATCH_ROWS.min(k - d0);
                let t = &mut scratch[..nc * dr];
                crate::transpose::stripe(&x[d0 * ld..], ld, dr, j0, nc, t);
                for (c, col) in t.chunks_exact(dr).enumerate() {
                    for (i, src) in col.chunks(DEPTH).enumerate() {
                        let s = d0 / DEPTH + i;
                        let dst = &mut blk[s * TILE_PAIR + c * DEPTH..][..src.len()];
                        crate::bf16_gemm::round_slice(src, dst);
                    }
                }
            }
        })
    }

    /// The packed bf16 bits of row `r`, depth `d` (zero in the padding).
    #[cfg(test)]
    fn at(&self, r: usize, d: usize) -> u16 {
        let steps = self.stride / DEPTH;
        self.data[((r / BLOCK) * steps + d / DEPTH) * TILE_PAIR + (r % BLOCK) * DEPTH + d % DEPTH]
    }

    /// Number of rows `m`.
    pub fn rows(&self) -> usize {
        self.m
    }
}

/// Zeroes the padding of one packed row block `blk` (its depth steps of [`TILE_PAIR`]): past
/// depth `k` in the first `valid` rows, everything in the others.
fn zero_padding(blk: &mut [u16], valid: usize, k: usize, stride: usize) {
    for (s, step) in blk
        .chunks_exact_mut(TILE_PAIR)
        .enumerate()
        .take(stride / DEPTH)
    {
        let len = k.saturating_sub(s * DEPTH).min(DEPTH);
        for (rr, row) in step.chunks_exact_mut(DEPTH).enumerate() {
            row[if rr < valid { len } else { 0 }..].fill(0);
        }
    }
}

/// The 64-byte tile configuration: palette 1, all eight tiles 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

const CONFIG: TileConfig = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = 64; // colsb, little-endian u16
        c[48 + t] = 16; // rows
        t += 1;
    }
    TileConfig(c)
};

thread_local! {
    /// The packed weight panel of the calling thread, reused across calls.
    static PANEL: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with the tile configuration [`CONFIG`] loaded on this thread, and releases the
/// tiles after (so that the kernel does not keep the 8 KB tile state on context switches).
///
/// # Safety
/// [`available`] must be true.
#[cfg(target_arch = "x86_64")]
unsafe fn with_tiles<R>(f: impl FnOnce() -> R) -> R {
    std::arch::asm!("ldtilecfg [{0}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly));
    let r = f();
    std::arch::asm!("tilerelease", options(nostack, nomem));
    r
}

/// `dst [m, nb] (row stride rs) = a · wᵀ` for bf16 weights `w [nb, k]` (raw bits, row-major),
/// single-threaded, on the AMX tile unit. Each call packs the weights into the tile layout
/// first; [`TiledWeights`] does that once, at load.
///
/// # Safety
/// [`available`] must be true, and `dst` be valid for writes of `a.rows()` rows of `nb`
/// elements, `rs` apart, not written by anyone else meanwhile.
#[cfg(target_arch = "x86_64")]
pub unsafe fn gemm(a: &PackedRowsAmx, w: &[u16], dst: *mut f32, rs: usize, nb: usize) {
    let (m, k) = (a.m, a.k);
    assert!(
        w.len() >= nb * k,
        "amx gemm: w holds {} < {nb}×{k}",
        w.len()
    );
    if crate::trivial_product(m, k, nb, dst, rs) {
        return;
    }
    let pairs = k.div_ceil(2);
    for_each_panel(a, nb, dst, rs, |jp, cols, panel| {
        pack_pairs(&w[jp * NR * k..], k, cols, 0, pairs, panel);
        panel[pairs * NR..].fill(0);
    });
}

/// `dst [m, nb] (row stride rs) = a · Wᵀ`, panel by panel of 32 columns: `fill(jp, cols,
/// panel)` packs columns `32·jp .. 32·jp + cols` of `W` into the calling thread's pair panel
/// (`[a.stride / 2][32]` words, zero past the depth and past `cols`), then the tiles multiply it.
///
/// # Safety
/// [`available`] must be true; `dst` as for [`gemm`].
#[cfg(target_arch = "x86_64")]
unsafe fn for_each_panel(
    a: &PackedRowsAmx,
    nb: usize,
    dst: *mut f32,
    rs: usize,
    mut fill: impl FnMut(usize, usize, &mut [u32]),
) {
    let panel_len = a.stride / 2 * NR;
    PANEL.with(|buf| {
        let mut buf = buf.borrow_mut();
        if buf.len() < panel_len {
            buf.resize(panel_len, 0);
        }
        let panel = &mut buf[..panel_len];
        panel_products(a, nb, dst, rs, |jp, cols| {
            fill(jp, cols, panel);
            panel.as_ptr()
        })
    });
}

/// The tile loop of every AMX product: with the tiles configured, for each panel of 32
/// columns of `dst [m, nb]` (row stride `rs`), `panel(jp, cols)` gives its packed weights
/// (`[a.stride / 2][32]` words) and [`panel_product`] multiplies them in.
///
/// # Safety
/// [`available`] must be true; each returned panel holds `a.stride / 2` pair rows of 32 words
/// and stays valid until the next call; `dst` as for [`gemm`].
#[cfg(target_arch = "x86_64")]
unsafe fn panel_products(
    a: &PackedRowsAmx,
    nb: usize,
    dst: *mut f32,
    rs: usize,
    mut panel: impl FnMut(usize, usize) -> *const u32,
) {
    with_tiles(|| {
        for jp in 0..nb.div_ceil(NR) {
            let cols = NR.min(nb - jp * NR);
            let p = panel(jp, cols);
            panel_product(a, p, cols, dst.add(jp * NR), rs);
        }
    })
}

/// `dst [m, nb] (row stride rs) = a · w[.., j0 .. j0 + nb]` for f32 weights stored depth-major,
/// `w [k, n]` row-major with row stride `ld` (a weight read transposed: `dx = g · W`, or the
/// activations of `dW = gᵀ · x`), single-threaded, on the AMX tile unit. Each panel is rounded
/// and packed straight from the depth-major rows (two depth rows interleave into the pair
/// words), with no transposed copy; the panels, and so the bits, are those [`gemm`] builds from
/// the rounded transpose.
///
/// # Safety
/// [`available`] must be true; `w` holds `k` rows of `ld ≥ j0 + nb` elements (the last row at
/// least `j0 + nb`); `dst` as for [`gemm`].
#[cfg(target_arch = "x86_64")]
pub unsafe fn gemm_depth_major(
    a: &PackedRowsAmx,
    w: &[f32],
    ld: usize,
    j0: usize,
    dst: *mut f32,
    rs: usize,
    nb: usize,
) {
    let (m, k) = (a.m, a.k);
    assert!(
        k == 0 || nb == 0 || w.len() >= (k - 1) * ld + j0 + nb,
        "amx gemm: depth-major w holds {} < {k} rows of {ld}",
        w.len()
    );
    if crate::trivial_product(m, k, nb, dst, rs) {
        return;
    }
    for_each_panel(a, nb, dst, rs, |jp, cols, panel| {
        pack_pairs_depth_major(w, ld, k, j0 + jp * NR, cols, panel)
    });
}

/// Packs columns `j0 .. j0 + cols` (≤ 32) of the depth-major `w [k, n]` (row stride `ld`),
/// rounded to bf16, into a pair panel `[panel.len() / 32][32]`: word `[q][j]` is
/// `bf16(w[2q][j0 + j]) | bf16(w[2q + 1][j0 + j]) << 16`, with zeros past `k` and past `cols`.
#[cfg(target_arch = "x86_64")]
fn pack_pairs_depth_major(
    w: &[f32],
    ld: usize,
    k: usize,
    j0: usize,
    cols: usize,
    panel: &mut [u32],
) {
    use crate::bf16_gemm::round_bf16;
    let full = k / 2;
    panel.fill(0);
    let mut q0 = 0;
    if cols == NR && crate::has_avx512() {
        // SAFETY: AVX-512F checked; rows 2q, 2q + 1 < k hold columns j0 .. j0 + 32 (asserted by
        // the caller's bound on w) and the panel holds `full` pair rows of 32 words.
        unsafe { pack_pairs_depth_major_avx512(w, ld, full, j0, panel) };
        q0 = full;
    }
    for q in q0..k.div_ceil(2) {
        let (r0, r1) = (2 * q, 2 * q + 1);
        for j in 0..cols {
            let lo = round_bf16(w[r0 * ld + j0 + j]) as u32;
            let hi = if r1 < k {
                round_bf16(w[r1 * ld + j0 + j]) as u32
            } else {
                0
            };
            panel[q * NR + j] = lo | hi << 16;
        }
    }
}

/// The whole pair rows of [`pack_pairs_depth_major`] for a full 32-column panel, 16 columns a
/// step: both depth rows rounded to nearest even in 32-bit lanes (NaN quieted, as
/// [`crate::bf16_gemm::round_bf16`]), the first into the low half of each word, the second
/// into the high half.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_pairs_depth_major_avx512(
    w: &[f32],
    ld: usize,
    pairs: usize,
    j0: usize,
    panel: &mut [u32],
) {
    use std::arch::x86_64::*;
    let bias = _mm512_set1_epi32(0x7fff);
    let one = _mm512_set1_epi32(1);
    let quiet = _mm512_set1_epi32(0x0040_0000);
    // Rounded bf16 bits in the high half of each 32-bit lane.
    let round = |v: __m512| -> __m512i {
        let b = _mm512_castps_si512(v);
        let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(b), one);
        let r = _mm512_add_epi32(b, _mm512_add_epi32(bias, lsb));
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
        _mm512_mask_or_epi32(r, nan, b, quiet)
    };
    let high = _mm512_set1_epi32(0xffff_0000u32 as i32);
    for q in 0..pairs {
        let r0 = w.as_ptr().add(2 * q * ld + j0);
        let r1 = r0.add(ld);
        for h in 0..2 {
            let lo = round(_mm512_loadu_ps(r0.add(16 * h)));
            let hi = round(_mm512_loadu_ps(r1.add(16 * h)));
            let word = _mm512_or_si512(_mm512_srli_epi32::<16>(lo), _mm512_and_si512(hi, high));
            _mm512_storeu_si512(panel.as_mut_ptr().add(q * NR + 16 * h) as *mut _, word);
        }
    }
}

/// `dst [m, cols] (row stride rs) = a · panelᵀ` for one packed weight panel of up to 32
/// columns (`[a.stride / 2][32]` words), block by block of 32 rows.
///
/// # Safety
/// The tile configuration is loaded on this thread ([`with_tiles`]); `panel` holds
/// `a.stride / 2` pair rows of 32 words, `dst` `a.rows()` rows of `cols` writable elements.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn panel_product(
    a: &PackedRowsAmx,
    panel: *const u32,
    cols: usize,
    dst: *mut f32,
    rs: usize,
) {
    let mut out = [0f32; BLOCK * BLOCK];
    let steps = a.stride / DEPTH;
    for ib in 0..a.m.div_ceil(BLOCK) {
        let rows = BLOCK.min(a.m - ib * BLOCK);
        let a_block = a.data.as_ptr().add(ib * BLOCK * a.stride);
        if rows == BLOCK && cols == NR {
            // A whole block: the tiles go straight to dst.
            let d = dst.add(ib * BLOCK * rs);
            block_32x32(a_block, panel, steps, true, d, rs);
            continue;
        }
        let o = out.as_mut_ptr();
        block_32x32(a_block, panel, steps, true, o, BLOCK);
        for r in 0..rows {
            std::ptr::copy_nonoverlapping(
                out.as_ptr().add(r * BLOCK),
                dst.add((ib * BLOCK + r) * rs),
                cols,
            );
        }
    }
}

/// A weight matrix `w [n, k]` rounded to bf16 and packed **once** (at load) into the tile
/// layout of the AMX kernel, so that a product pays neither the rounding nor the packing of
/// the weights: panel `p` holds columns `32p .. 32p + 32` as `[k↑32 / 2][32]` words
/// `w[j][2q] | w[j][2q+1] << 16` (the layout [`gemm`] builds per call), the padding zero.
/// [`gemm_tiled`] gives exactly the bits of [`gemm`] on the same rounded weights.
pub struct TiledWeights {
    data: Vec<u32>,
    n: usize,
    k: usize,
    /// Pair rows per panel: `k` rounded up to [`DEPTH`], halved.
    panel_pairs: usize,
}

impl std::fmt::Debug for TiledWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TiledWeights [{}, {}]", self.n, self.k)
    }
}

impl TiledWeights {
    /// Packs `w [n, k]`, where `to_bf16(j0, nb, tile)` fills `tile [nb, k]` with the bf16 bits
    /// of weight rows `j0 .. j0 + nb` (rounded to nearest even where they are wider, as
    /// [`crate::bf16_gemm::tiled_gemm_bf16`] asks). Panels are packed in parallel.
    pub fn pack(n: usize, k: usize, to_bf16: impl Fn(usize, usize, &mut [u16]) + Sync) -> Self {
        let panel_pairs = k.next_multiple_of(DEPTH).max(DEPTH) / 2;
        let panel_len = panel_pairs * NR;
        let mut data = vec![0u32; n.div_ceil(NR) * panel_len];
        let pairs = k.div_ceil(2);
        data.par_chunks_mut(panel_len)
            .enumerate()
            .for_each(|(p, panel)| {
                let (j0, cols) = (p * NR, NR.min(n - p * NR));
                let mut rows = vec![0u16; cols * k];
                to_bf16(j0, cols, &mut rows);
                if k > 0 {
                    pack_pairs(&rows, k, cols, 0, pairs, panel);
                }
            });
        TiledWeights {
            data,
            n,
            k,
            panel_pairs,
        }
    }

    /// Output width `n` (weight rows).
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Input width `k`.
    pub fn cols(&self) -> usize {
        self.k
    }

    /// Bytes held.
    pub fn storage_bytes(&self) -> usize {
        self.data.len() * 4
    }

    /// Stacks matrices of the same input width along the output dimension (a q/k/v or
    /// gate/up group): the panels side by side when every part but the last fills whole
    /// panels, else `None` (then pack the stacked weights instead).
    pub fn stack(parts: &[&TiledWeights]) -> Option<TiledWeights> {
        let first = parts.first()?;
        let aligned = parts[..parts.len() - 1].iter().all(|p| p.n % NR == 0);
        if !aligned || parts.iter().any(|p| p.k != first.k) {
            return None;
        }
        Some(TiledWeights {
            data: parts.iter().flat_map(|p| p.data.iter().copied()).collect(),
            n: parts.iter().map(|p| p.n).sum(),
            k: first.k,
            panel_pairs: first.panel_pairs,
        })
    }
}

/// `y [m, n] = bf16(x) · wᵀ` (f32 sums) with weights packed at load, on the AMX tile unit:
/// the activations are rounded and packed once, then column panels run in parallel. Each
/// output element is accumulated exactly as by [`gemm`] (and by
/// [`crate::bf16_gemm::tiled_gemm_bf16`] on the AMX path), so the bits are the same.
///
/// # Panics
/// Where the process cannot use AMX ([`available`]), or the shapes disagree.
pub fn gemm_tiled(x: &[f32], w: &TiledWeights, y: &mut [f32], m: usize) {
    let (n, k) = (w.n, w.k);
    assert!(
        available(),
        "AMX asked for where this process cannot use it"
    );
    assert!(
        x.len() >= m * k && y.len() == m * n,
        "amx tiled gemm: shapes"
    );
    let a = PackedRowsAmx::pack(x, m, k);
    debug_assert_eq!(a.stride / 2, w.panel_pairs);
    let panel_len = w.panel_pairs * NR;
    // Blocks of whole panels: each block's first column starts a panel.
    let width = crate::gemm_tile_rows(n).next_multiple_of(NR);
    crate::for_each_output_tile_of(y, m, n, k, width, |j0, nb, dst| {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AMX available (asserted); columns j0 .. j0 + nb of the m rows of y (row
        // stride n) belong to this block alone, and its panels start at panel j0 / 32.
        unsafe {
            panel_products(&a, nb, dst, n, |jp, _| {
                w.data.as_ptr().add((j0 / NR + jp) * panel_len)
            })
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (j0, nb, dst, panel_len, &a);
    });
}

/// One 32×32 block: `out [32][32] = Σ_s A_s · B_s` over `steps` depth steps of 32 bf16, where
/// `a` is the block's packed activations ([`PackedRowsAmx`]: per step 32 rows of 32 bf16, 64
/// bytes apart, [`TILE_PAIR`] values a step) and `b` the pair panel
/// (`[pairs][32]` words, 128 bytes between pair rows). Each step loads two A tiles (`tmm4`,
/// `tmm5`) and two B tiles (`tmm6`, `tmm7`) and issues four `tdpbf16ps` into `tmm0`-`tmm3`;
/// with `advance` false every step reads the same tiles (the peak probe).
///
/// The block is stored as 32 rows of 32 floats, `out_stride` floats apart.
///
/// # Safety
/// The tile configuration [`CONFIG`] is loaded on this thread ([`with_tiles`]); `a` holds
/// `steps` (1 when not advancing) steps of [`TILE_PAIR`] bf16, `b` `steps · 16` pair rows of 32 words
/// (16), `out` 32 rows of 32 floats `out_stride` apart.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn block_32x32(
    a: *const u16,
    b: *const u32,
    steps: usize,
    advance: bool,
    out: *mut f32,
    out_stride: usize,
) {
    use std::arch::asm;
    asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        options(nostack, nomem)
    );
    let (a_step, b_step) = if advance {
        (TILE_PAIR, 16 * NR)
    } else {
        (0, 0)
    };
    let a_stride = DEPTH * 2; // bytes between the rows of an A tile
    let a1 = a.add(16 * DEPTH);
    for s in 0..steps {
        let b0 = b.add(s * b_step);
        asm!(
            "tileloadd tmm4, [{a0} + {sa}*1]",
            "tileloadd tmm5, [{a1} + {sa}*1]",
            "tileloadd tmm6, [{b0} + {sb}*1]",
            "tileloadd tmm7, [{b1} + {sb}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            a0 = in(reg) a.add(s * a_step),
            a1 = in(reg) a1.add(s * a_step),
            b0 = in(reg) b0,
            b1 = in(reg) b0.add(16),
            sa = in(reg) a_stride,
            sb = in(reg) NR * 4,
            options(nostack, readonly),
        );
    }
    let row = out_stride * 4; // bytes between rows of out
    asm!(
        "tilestored [{o0} + {s}*1], tmm0",
        "tilestored [{o1} + {s}*1], tmm1",
        "tilestored [{o2} + {s}*1], tmm2",
        "tilestored [{o3} + {s}*1], tmm3",
        o0 = in(reg) out,
        o1 = in(reg) out.add(16),
        o2 = in(reg) out.add(16 * out_stride),
        o3 = in(reg) out.add(16 * out_stride + 16),
        s = in(reg) row,
        options(nostack),
    );
}

/// Multiply-adds per step of [`block_32x32`] times 2: the flops of one [`probe_loop`] step.
pub const FLOPS_PER_STEP: usize = 4 * 16 * 16 * DEPTH * 2;

/// The peak probe's loop: `steps` steps of the kernel's own [`block_32x32`] on L1-resident
/// tiles of ones; returns the first output element, checked against its exact value (32 per
/// step). 0 without AMX. `openvla_kernels::probe` times it.
pub fn probe_loop(steps: usize) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if available() {
        let a = vec![0x3f80u16; 2 * 16 * DEPTH]; // 1.0
        let b = vec![0x3f80_3f80u32; 16 * NR];
        let mut out = vec![0f32; BLOCK * BLOCK];
        // SAFETY: AMX available; a holds 32 rows of 32 bf16 (64 bytes apart), b 16 pair rows of
        // 32 words, out 1024 floats; the tiles are not advanced.
        unsafe {
            with_tiles(|| {
                block_32x32(
                    a.as_ptr(),
                    b.as_ptr(),
                    steps,
                    false,
                    out.as_mut_ptr(),
                    BLOCK,
                )
            })
        };
        let want = (steps * DEPTH) as f32;
        assert!(
            (out[0] - want).abs() <= want * 1e-3,
            "the AMX probe computed {} instead of {want}",
            out[0]
        );
        return out[0];
    }
    let _ = steps;
    0.0
}

/// The candle op of [`gemm_tiled`]: `y [m, n] = bf16(x [m, k]) · wᵀ` for contiguous f32
/// activations and weights packed at load (the model's linears with
/// [`crate::ComputePrecision::Bf16`] on AMX; the caller keeps rows fewer than
/// [`crate::GEMM_MIN_ROWS`] and row-independent calls on its dense kernels).
pub struct TiledMatmul {
    /// The packed weight matrix.
    pub weight: std::sync::Arc<TiledWeights>,
}

impl candle_core::CustomOp1 for TiledMatmul {
    fn name(&self) -> &'static str {
        "amx-tiled-matmul"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (m, k) = l.shape().dims2()?;
        if k != self.weight.k {
            candle_core::bail!(
                "{}: activations have {k} features, the weight {}",
                self.name(),
                self.weight.k
            );
        }
        let x = crate::activation::f32_contiguous(s, l, self.name())?;
        let mut y = vec![0f32; m * self.weight.n];
        gemm_tiled(x, &self.weight, &mut y, m);
        Ok((
            candle_core::CpuStorage::F32(y),
            candle_core::Shape::from((m, self.weight.n)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bf16_gemm::{round_slice, tiled_gemm_bf16_with};
    use crate::dispatch::Bf16Path;
    use crate::test_util::lcg;

    fn rounded(w: &[f32], k: usize) -> impl Fn(usize, usize, &mut [u16]) + Sync + '_ {
        move |j0, nb, t| round_slice(&w[j0 * k..(j0 + nb) * k], t)
    }

    /// The packed activations are not zero-filled before packing: each row's padding and the
    /// padding rows must still be zero (the tiles multiply them), even in memory the allocator
    /// hands back dirty. Packing runs on any CPU (it is not the tile unit).
    #[test]
    fn packed_rows_pad_with_zeros_in_reused_memory() {
        for (m, k) in [
            (1usize, 1usize),
            (5, 31),
            (33, 40),
            (40, 0),
            (64, 64),
            (3, 100),
        ] {
            let stride = k.next_multiple_of(DEPTH).max(DEPTH);
            let rows = m.next_multiple_of(BLOCK);
            // Leave a dirty block of the same size for the allocator to hand out again.
            drop(std::hint::black_box(vec![0xffffu16; rows * stride]));
            let mut seed = 7u64;
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
            let p = PackedRowsAmx::pack(&x, m, k);
            assert_eq!(p.data.len(), rows * stride);
            let mut want = [0u16; 1];
            for r in 0..rows {
                for d in 0..stride {
                    let v = p.at(r, d);
                    if r < m && d < k {
                        round_slice(&x[r * k + d..][..1], &mut want);
                        assert_eq!(v, want[0], "{m}x{k}: ({r}, {d}) value");
                    } else {
                        assert_eq!(v, 0, "{m}x{k}: ({r}, {d}) padding not zero");
                    }
                }
            }
        }
    }

    /// `pack_transposed` builds word for word the array `pack` builds from the transposed copy,
    /// on ragged shapes and row strides (depths across the 256-row scratch, partial blocks,
    /// NaN and infinities), and the transposed-left product gives the bits of the product on
    /// the copy (AMX where the process has it, else the portable path: both are checked
    /// against the same definition). Packing runs on any CPU.
    #[test]
    fn transposed_packing_equals_packing_the_transpose() {
        for (k, m, ld) in [
            (1usize, 1usize, 1usize),
            (7, 5, 9),
            (300, 33, 40),
            (513, 64, 64),
            (0, 3, 3),
        ] {
            let mut seed = 11u64;
            let mut xt: Vec<f32> = (0..k.saturating_sub(1) * ld + m)
                .map(|_| lcg(&mut seed))
                .collect();
            if xt.len() > 3 {
                xt[1] = f32::NAN;
                xt[2] = f32::NEG_INFINITY;
            }
            let x = crate::untranspose(&xt, ld, m, k);
            let want = PackedRowsAmx::pack(&x, m, k);
            let got = PackedRowsAmx::pack_transposed(&xt, k, m, ld);
            assert_eq!((got.m, got.k, got.stride), (want.m, want.k, want.stride));
            assert!(got.data == want.data, "{k}x{m}/{ld}: packed words differ");
            let n = 37;
            let w: Vec<f32> = (0..k * n).map(|_| lcg(&mut seed)).collect();
            let mut y_t = vec![f32::NAN; m * n];
            let mut y_c = vec![f32::NAN; m * n];
            crate::bf16_gemm::tiled_gemm_bf16_transposed_lhs(&xt, ld, &w, &mut y_t, m, n, k);
            crate::bf16_gemm::tiled_gemm_bf16_depth_major(&x, &w, &mut y_c, m, n, k);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&y_t), bits(&y_c), "{k}x{m}/{ld}: products differ");
        }
        if crate::dispatch::bf16_path() != Bf16Path::Amx {
            eprintln!(
                "skipped: the AMX product (not the dispatched bf16 path here); packing and the \
                 {:?} product checked",
                crate::dispatch::bf16_path()
            );
        }
    }

    /// Weights packed at load give the bits of the per-call packing, on ragged shapes (partial
    /// row blocks and column panels, odd depths, depths not a multiple of 32, no depth, no rows).
    #[test]
    fn tiled_weights_give_the_bits_of_the_per_call_packing() {
        if !available() {
            eprintln!("skipped: the AMX tdpbf16ps kernel (no AMX-BF16 usable by this process)");
            return;
        }
        let mut seed = 5u64;
        for (m, n, k) in [
            (8, 16, 4),
            (33, 70, 61),
            (64, 96, 256),
            (121, 768, 256),
            (40, 33, 1),
            (9, 40, 0),
            (0, 40, 8),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed) * 3.0).collect();
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
            let mut want = vec![0f32; m * n];
            tiled_gemm_bf16_with(Bf16Path::Amx, &x, &mut want, m, n, k, rounded(&w, k));
            let tiled = TiledWeights::pack(n, k, rounded(&w, k));
            assert_eq!((tiled.rows(), tiled.cols()), (n, k));
            let mut got = vec![f32::NAN; m * n];
            gemm_tiled(&x, &tiled, &mut got, m);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "m={m} n={n} k={k}");
        }
    }

    /// Packing straight from depth-major rows gives the panel of packing the rounded
    /// transpose, word for word: the AVX-512 body (whole 32-column panels) and the scalar rest
    /// (narrow panels, an odd depth's last row), NaN quieted and ±∞ kept as rounding does.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn depth_major_panels_are_the_panels_of_the_transpose() {
        if !crate::has_avx512() {
            eprintln!("skipped: the AVX-512 depth-major packer (no AVX-512F); scalar packer only");
        }
        let mut seed = 3u64;
        for (k, n, j0, cols) in [
            (64, 40, 0, 32),
            (7, 70, 33, 32),
            (33, 50, 10, 17),
            (1, 32, 0, 32),
        ] {
            let mut w: Vec<f32> = (0..k * n).map(|_| lcg(&mut seed) * 5.0).collect();
            w[0] = f32::NAN;
            w[(k - 1) * n + 1] = f32::from_bits(0x7f80_0001); // signalling NaN
            w[(k - 1) * n + j0 + 2] = f32::NEG_INFINITY;
            let panel_len = k.next_multiple_of(DEPTH).max(DEPTH) / 2 * NR;
            let mut got = vec![u32::MAX; panel_len];
            pack_pairs_depth_major(&w, n, k, j0, cols, &mut got);
            // The transpose of columns j0 .. j0 + cols, rounded, packed as gemm packs rows.
            let mut rows = vec![0u16; cols * k];
            for j in 0..cols {
                for q in 0..k {
                    rows[j * k + q] = crate::bf16_gemm::round_bf16(w[q * n + j0 + j]);
                }
            }
            let mut want = vec![0u32; panel_len];
            pack_pairs(&rows, k, cols, 0, k.div_ceil(2), &mut want);
            assert_eq!(got, want, "k={k} n={n} j0={j0} cols={cols}");
        }
    }

    /// Stacking packed matrices is packing the stacked matrix, when the panels line up; parts
    /// that end inside a panel are refused.
    #[test]
    fn stacking_tiled_weights_is_packing_the_stack() {
        let mut seed = 9u64;
        let k = 40;
        let (n1, n2) = (64, 20);
        let w: Vec<f32> = (0..(n1 + n2) * k).map(|_| lcg(&mut seed)).collect();
        let a = TiledWeights::pack(n1, k, rounded(&w[..n1 * k], k));
        let b = TiledWeights::pack(n2, k, rounded(&w[n1 * k..], k));
        let whole = TiledWeights::pack(n1 + n2, k, rounded(&w, k));
        let stacked = TiledWeights::stack(&[&a, &b]).expect("64 rows fill two panels");
        assert_eq!(stacked.rows(), n1 + n2);
        assert_eq!(stacked.data, whole.data);
        assert!(
            TiledWeights::stack(&[&b, &a]).is_none(),
            "20 rows end inside a panel"
        );
        let other_depth = TiledWeights::pack(32, 8, |_, _, t| t.fill(0));
        assert!(TiledWeights::stack(&[&a, &other_depth]).is_none());
    }
}
