//! Running plain loops with the CPU's vector instructions without a build flag.

/// Runs `f` compiled for AVX2 + FMA where the CPU has them, else as built (baseline x86-64).
///
/// One binary serves every x86-64 CPU, so crates are built for the baseline, where
/// `f32::floor` and `f32::mul_add` are calls into libm and loops vectorize to SSE2 at most.
/// Code inlined into `f` (mark its helpers `#[inline]` or `#[inline(always)]`) is compiled
/// again with the features enabled: `floor` becomes one `vroundss`, `mul_add` one `vfmadd`, and
/// loops may use 256-bit vectors. Rust never fuses a separate multiply and add by itself, and
/// `floor` and a fused multiply-add have one correctly rounded result each, so both builds give
/// the same bits.
#[inline(always)]
pub fn with_avx2_fma<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn run<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        // SAFETY: the CPU has AVX2 and FMA (detected above).
        return unsafe { run(f) };
    }
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both builds give the same bits for the operations the doc names (floor, fused
    /// multiply-add, and a multiply followed by an add, which must stay unfused).
    #[test]
    fn same_bits_with_and_without_the_features() {
        let xs: Vec<f32> = (0..4099).map(|i| (i as f32 * 0.731).sin() * 1e3).collect();
        let work = |xs: &[f32]| -> Vec<u32> {
            xs.iter()
                .map(|&x| (x.floor() + x.mul_add(0.37, 1.1) + x * 0.1 + 0.3).to_bits())
                .collect()
        };
        assert_eq!(with_avx2_fma(|| work(&xs)), work(&xs));
        #[cfg(target_arch = "x86_64")]
        if !std::arch::is_x86_feature_detected!("avx2") {
            eprintln!("skipped: the AVX2+FMA build (this CPU lacks it); the baseline checked");
        }
    }
}
