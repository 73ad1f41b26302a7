//! Measurements of the machine's limits, for the efficiency figures of `openvla bench`:
//! memory bandwidth (a large streaming copy and a streaming read) and peak arithmetic rates
//! (register-resident loops of every instruction a kernel dispatches to: AVX2 and AVX-512 FMA,
//! `vdpbf16ps`, `vpdpbusd`, and large matmuls through each kernel). [`Peaks::path_peak`] gives
//! the peak of the path a product takes here, the ceiling its efficiency is reported against.

use rayon::prelude::*;
use std::time::Instant;

/// Memory bandwidth in GB/s (10⁹ bytes per second).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Bandwidth {
    /// Streaming copy of a buffer far larger than the caches, counting bytes read plus
    /// bytes written.
    pub copy_gbs: f64,
    /// Streaming read (a reduction) of the same buffer.
    pub read_gbs: f64,
}

fn best(reps: usize, f: &mut dyn FnMut()) -> f64 {
    f();
    let mut b = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        f();
        b = b.min(t.elapsed().as_secs_f64());
    }
    b
}

/// Measures memory bandwidth with all rayon threads over `bytes` (e.g. 1 GiB), best of 3.
pub fn memory_bandwidth(bytes: usize) -> Bandwidth {
    let n = bytes / 8;
    let src: Vec<u64> = (0..n as u64).into_par_iter().map(|i| i * 7).collect();
    let mut dst = vec![0u64; n];
    let chunk = 1 << 16;
    let t = best(3, &mut || {
        dst.par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .for_each(|(d, s)| d.copy_from_slice(s));
    });
    let copy_gbs = (2 * n * 8) as f64 / t / 1e9;
    let t = best(3, &mut || {
        let x = src
            .par_chunks(chunk)
            .map(|c| c.iter().fold(0u64, |a, &b| a ^ b))
            .reduce(|| 0, |a, b| a ^ b);
        std::hint::black_box(x);
    });
    let read_gbs = (n * 8) as f64 / t / 1e9;
    std::hint::black_box(&dst);
    Bandwidth { copy_gbs, read_gbs }
}

/// Peak f32 FMA rate in GFLOP/s (2 FLOP per multiply-add) of register-resident loops on all
/// rayon threads: the arithmetic ceiling of every f32 kernel (bf16, f16 and dequantized int8
/// and int4 weights are computed in f32 here).
pub fn fma_peak_gflops() -> f64 {
    fma_peak_with(20_000_000)
}

fn fma_peak_with(iters: usize) -> f64 {
    let threads = rayon::current_num_threads();
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2() {
        let t = best(2, &mut || {
            let s: f32 = (0..threads)
                .into_par_iter()
                // SAFETY: the CPU supports AVX2 and FMA (checked by has_avx2).
                .map(|_| unsafe { fma_loop_avx2(iters) })
                .sum();
            std::hint::black_box(s);
        });
        return (threads * iters * 12 * 16) as f64 / t / 1e9;
    }
    let t = best(2, &mut || {
        let s: f32 = (0..threads)
            .into_par_iter()
            .map(|_| fma_loop_portable(iters / 8))
            .sum();
        std::hint::black_box(s);
    });
    (threads * iters / 8 * 8 * 2) as f64 / t / 1e9
}

/// Peak rates of every arithmetic path this CPU has (`None`: the CPU lacks it), in GFLOP/s
/// (GOP/s for the integer ones), 2 operations per multiply-add, all rayon threads.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Peaks {
    /// `vfmadd` on ymm (AVX2+FMA), f32.
    pub avx2_fma: Option<f64>,
    /// `vfmadd` on zmm (AVX-512F), f32.
    pub avx512_fma: Option<f64>,
    /// `vdpbf16ps` on zmm (AVX512-BF16): bf16 pairs into f32.
    pub avx512_bf16_dot: Option<f64>,
    /// AMX `tdpbf16ps` (16×32 by 32×16 bf16 tiles into f32), the bf16 GEMM's own step.
    pub amx_bf16: Option<f64>,
    /// `vpdpbusd` on zmm (AVX512-VNNI): u8 × s8 quadruples into int32.
    pub avx512_vnni_dot: Option<f64>,
    /// `vpdpbusd` on ymm (AVX-VNNI).
    pub avx_vnni_dot: Option<f64>,
    /// `vpmaddubsw` + `vpmaddwd` + `vpaddd` on ymm (the AVX2 int8 decode kernels).
    pub avx2_int8_dot: Option<f64>,
}

impl Peaks {
    /// Measures every path [`crate::dispatch::Features::detect`] reports (about a second).
    pub fn measure() -> Peaks {
        Peaks::measure_with(20_000_000)
    }

    fn measure_with(iters: usize) -> Peaks {
        let f = crate::dispatch::Features::detect();
        let run = |on: bool, ops_per_iter: usize, kernel: fn(usize) -> f32| -> Option<f64> {
            on.then(|| {
                let threads = rayon::current_num_threads();
                let t = best(2, &mut || {
                    let s: f32 = (0..threads).into_par_iter().map(|_| kernel(iters)).sum();
                    std::hint::black_box(s);
                });
                (threads * iters * ops_per_iter) as f64 / t / 1e9
            })
        };
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY (each closure): called only where `run` was told the feature is present.
            Peaks {
                avx2_fma: run(f.avx2, 12 * 16, |n| unsafe { fma_loop_avx2(n) }),
                avx512_fma: run(f.avx512, 12 * 32, |n| unsafe { fma_loop_avx512(n) }),
                avx512_bf16_dot: run(f.avx512_bf16, 12 * 64, |n| unsafe { bf16_dot_loop(n) }),
                // One AMX step is 65,536 flops: a sixteenth of a step per iteration.
                amx_bf16: run(f.amx_bf16, crate::amx::FLOPS_PER_STEP / 16, |n| {
                    crate::amx::probe_loop(n / 16)
                }),
                avx512_vnni_dot: run(f.avx512_vnni, 12 * 128, |n| unsafe { vnni512_loop(n) }),
                avx_vnni_dot: run(f.avx_vnni, 12 * 64, |n| unsafe { avx_vnni_loop(n) }),
                avx2_int8_dot: run(f.avx2, 8 * 64, |n| unsafe { maddubs_loop_avx2(n) as f32 }),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (f, run);
            Peaks {
                avx2_fma: None,
                avx512_fma: None,
                avx512_bf16_dot: None,
                amx_bf16: None,
                avx512_vnni_dot: None,
                avx_vnni_dot: None,
                avx2_int8_dot: None,
            }
        }
    }

    /// The peak of the path the many-row products take here with `compute`
    /// ([`crate::dispatch`]): the ceiling their efficiency is reported against (NaN where the
    /// portable path runs).
    pub fn path_peak(&self, compute: crate::ComputePrecision) -> f64 {
        use crate::dispatch::{bf16_path, f32_gemm, Bf16Path, GemmPath};
        let f32_path = match f32_gemm() {
            GemmPath::Avx512 => self.avx512_fma,
            GemmPath::Avx2 => self.avx2_fma,
            GemmPath::Portable => None,
        };
        let peak = match compute {
            crate::ComputePrecision::Bf16 => match bf16_path() {
                Bf16Path::Amx => self.amx_bf16,
                Bf16Path::Dot => self.avx512_bf16_dot,
                Bf16Path::F32Gemm => f32_path,
            },
            _ => f32_path,
        };
        peak.unwrap_or(f64::NAN)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_loop_avx512(iters: usize) -> f32 {
    use std::arch::x86_64::*;
    let mut a = [_mm512_set1_ps(1.0); 12];
    let m = _mm512_set1_ps(std::hint::black_box(0.999_999));
    let c = _mm512_set1_ps(1e-7);
    for _ in 0..iters {
        for v in a.iter_mut() {
            *v = _mm512_fmadd_ps(*v, m, c);
        }
    }
    let mut s = _mm512_setzero_ps();
    for v in a {
        s = _mm512_add_ps(s, v);
    }
    _mm512_reduce_add_ps(s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn bf16_dot_loop(iters: usize) -> f32 {
    use std::arch::x86_64::*;
    let mut a = [_mm512_setzero_ps(); 12];
    let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(std::hint::black_box(0x3f80_3f80)));
    let y: __m512bh = std::mem::transmute(_mm512_set1_epi32(0x3380_3380));
    for _ in 0..iters {
        for v in a.iter_mut() {
            *v = _mm512_dpbf16_ps(*v, x, y);
        }
    }
    let mut s = _mm512_setzero_ps();
    for v in a {
        s = _mm512_add_ps(s, v);
    }
    _mm512_reduce_add_ps(s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn vnni512_loop(iters: usize) -> f32 {
    use std::arch::x86_64::*;
    let mut a = [_mm512_setzero_si512(); 12];
    let x = _mm512_set1_epi8(std::hint::black_box(3));
    let y = _mm512_set1_epi8(-2);
    for _ in 0..iters {
        for v in a.iter_mut() {
            *v = _mm512_dpbusd_epi32(*v, x, y);
        }
    }
    let mut s = _mm512_setzero_si512();
    for v in a {
        s = _mm512_add_epi32(s, v);
    }
    _mm512_reduce_add_epi32(s) as f32
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,avxvnni")]
unsafe fn avx_vnni_loop(iters: usize) -> f32 {
    use std::arch::x86_64::*;
    let mut a = [_mm256_setzero_si256(); 12];
    let x = _mm256_set1_epi8(std::hint::black_box(3));
    let y = _mm256_set1_epi8(-2);
    for _ in 0..iters {
        for v in a.iter_mut() {
            *v = _mm256_dpbusd_avx_epi32(*v, x, y);
        }
    }
    let mut s = _mm256_setzero_si256();
    for v in a {
        s = _mm256_add_epi32(s, v);
    }
    let mut out = [0i32; 8];
    _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, s);
    out.iter().fold(0i32, |a, &b| a.wrapping_add(b)) as f32
}

/// Peak int8 dot-product rate in GOP/s (2 operations per multiply-add) of register-resident
/// `vpmaddubsw` + `vpmaddwd` + `vpaddd` loops, the instructions the `q4_0` decode kernel uses
/// (0 where the CPU lacks AVX2).
pub fn int8_peak_gops() -> f64 {
    int8_peak_with(20_000_000)
}

fn int8_peak_with(iters: usize) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2() {
        let threads = rayon::current_num_threads();
        let t = best(2, &mut || {
            let s: i32 = (0..threads)
                .into_par_iter()
                // SAFETY: the CPU supports AVX2 (checked by has_avx2).
                .map(|_| unsafe { maddubs_loop_avx2(iters) })
                .sum();
            std::hint::black_box(s);
        });
        return (threads * iters * 8 * 64) as f64 / t / 1e9;
    }
    0.0
}

fn fma_loop_portable(iters: usize) -> f32 {
    let mut a = [1f32; 8];
    let m = std::hint::black_box(0.999_999f32);
    for _ in 0..iters {
        for v in a.iter_mut() {
            *v = v.mul_add(m, 1e-7);
        }
    }
    a.iter().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_loop_avx2(iters: usize) -> f32 {
    use std::arch::x86_64::*;
    let mut a = [_mm256_set1_ps(1.0); 12];
    let m = _mm256_set1_ps(std::hint::black_box(0.999_999));
    let c = _mm256_set1_ps(1e-7);
    for _ in 0..iters {
        for v in a.iter_mut() {
            *v = _mm256_fmadd_ps(*v, m, c);
        }
    }
    let mut s = _mm256_setzero_ps();
    for v in a {
        s = _mm256_add_ps(s, v);
    }
    super::half_matmul::hsum256(s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn maddubs_loop_avx2(iters: usize) -> i32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_si256(); 8];
    let one = _mm256_set1_epi16(1);
    let src: Vec<__m256i> = (0..64)
        .map(|i| _mm256_set1_epi8(std::hint::black_box(i as i8)))
        .collect();
    let ys: Vec<__m256i> = (0..8).map(|i| _mm256_set1_epi8(i as i8 + 3)).collect();
    for i in 0..iters {
        let v = src[i & 63];
        for (a, y) in acc.iter_mut().zip(&ys) {
            *a = _mm256_add_epi32(*a, _mm256_madd_epi16(_mm256_maddubs_epi16(v, *y), one));
        }
    }
    let mut s = _mm256_setzero_si256();
    for a in acc {
        s = _mm256_add_epi32(s, a);
    }
    let mut out = [0i32; 8];
    _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, s);
    out.iter().fold(0i32, |a, &b| a.wrapping_add(b))
}

/// GFLOP/s of an `m x n x k` matmul (f32 activations) through each weight format's kernel.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct MatmulRates {
    /// `[m, n, k]`.
    pub shape: [usize; 3],
    /// f32 weights (the model's path: [`super::tiled_gemm_f32`]).
    pub f32: f64,
    /// bf16 weights (widened tiles + [`super::sgemm`]).
    pub bf16: f64,
    /// `q8_0` weights (the dispatcher: [`super::i16_gemm`] on AVX2).
    pub q8_0: f64,
    /// `q4_0` weights (the same dispatcher).
    pub q4_0: f64,
    /// bf16 weights in bf16 arithmetic ([`crate::bf16_gemm`]).
    pub bf16_compute: f64,
}

/// Measures [`MatmulRates`] (best of 2 after a warm-up).
pub fn matmul_gflops(m: usize, n: usize, k: usize) -> MatmulRates {
    use super::{half_matmul, quant_matmul};
    use crate::format::{QuantFormat, QuantMatrix};
    let w: Vec<f32> = (0..n * k)
        .map(|i| (i.wrapping_mul(2654435761) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let x: Vec<f32> = (0..m * k)
        .map(|i| (i.wrapping_mul(40503) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let mut y = vec![0f32; m * n];
    let flops = 2.0 * (m * n * k) as f64;
    let rate = |f: &mut dyn FnMut()| flops / best(2, f) / 1e9;
    let f32 = rate(&mut || super::tiled_gemm_f32(&x, &w, &mut y, m, n, k));
    let bf = half_matmul::to_bf16_bits(&w);
    let bf16 =
        rate(&mut || half_matmul::matmul(&x, &bf, half_matmul::Half::Bf16, &mut y, m, n, k, false));
    let q8 = QuantMatrix::quantize(QuantFormat::Q8_0, &w, n, k);
    let q8_0 = rate(&mut || quant_matmul::matmul(&x, &q8, &mut y, m, false));
    let q4 = QuantMatrix::quantize(QuantFormat::Q4_0, &w, n, k);
    let q4_0 = rate(&mut || quant_matmul::matmul(&x, &q4, &mut y, m, false));
    let bf16_compute = rate(&mut || {
        crate::bf16_gemm::tiled_gemm_bf16(&x, &mut y, m, n, k, |j0, nb, t| {
            t.copy_from_slice(&bf[j0 * k..(j0 + nb) * k])
        })
    });
    MatmulRates {
        shape: [m, n, k],
        f32,
        bf16,
        q8_0,
        q4_0,
        bf16_compute,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn probes_return_positive_rates() {
        let b = super::memory_bandwidth(1 << 22);
        assert!(b.copy_gbs > 0.0 && b.read_gbs > 0.0);
        assert!(super::fma_peak_with(10_000) > 0.0);
        assert!(super::int8_peak_with(10_000) >= 0.0);
        let p = super::Peaks::measure_with(10_000);
        let f = crate::dispatch::Features::detect();
        for (name, has, rate) in [
            ("AVX2 FMA", f.avx2, p.avx2_fma),
            ("AVX-512 FMA", f.avx512, p.avx512_fma),
            ("vdpbf16ps", f.avx512_bf16, p.avx512_bf16_dot),
            ("AMX tdpbf16ps", f.amx_bf16, p.amx_bf16),
            ("vpdpbusd zmm", f.avx512_vnni, p.avx512_vnni_dot),
            ("vpdpbusd ymm", f.avx_vnni, p.avx_vnni_dot),
        ] {
            match rate {
                Some(r) => assert!(has && r > 0.0, "{name}: {r}"),
                None => {
                    assert!(!has, "{name} not measured on a CPU that has it");
                    eprintln!("skipped: the {name} peak (not on this CPU)");
                }
            }
        }
        // The dispatched paths' peaks follow the capped features (OPENVLA_ISA), not the CPU's.
        if crate::dispatch::Features::get().avx2 {
            assert!(p.path_peak(crate::ComputePrecision::Bf16) > 0.0);
        }
    }
}
