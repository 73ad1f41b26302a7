//! glibc malloc settings for a process that allocates and frees the same large tensors over
//! and over (training steps, inference calls).
//!
//! By default glibc serves every block above a dynamic threshold (128 KiB at first) with its own
//! `mmap` and returns it with `munmap` when freed, and trims the heap top above 128 KiB. A
//! training step of the Meta-World policy allocates hundreds of activation and gradient tensors
//! of 1-30 MB, so each step paid for fresh zeroed pages (page faults, `clear_page`, TLB
//! shootdowns across the rayon threads): about a quarter of the step. Raising the mmap
//! threshold to glibc's maximum (32 MiB) and keeping freed memory in the heap (trim threshold
//! 2 GiB, top pad 256 MiB) lets later steps reuse it: measured on 2026-12-06 (Xeon Sapphire
//! Rapids, 2 cores, `metaworld-small`, `--mode full --head l1`, batch 32) 1.94 -> 1.49 s per
//! step (1.34x), peak RSS 1.61 -> 1.68 GB (docs/training-speed.md). mimalloc measured 1.73 s.
//!
//! The cost: memory freed by a step stays in the process (its peak RSS is what it keeps). Set
//! `OPENVLA_MALLOC=default` to keep glibc's defaults; settings given through `GLIBC_TUNABLES`
//! or `MALLOC_*` variables are left alone.

/// Applies the settings above unless the environment asks otherwise. Call it first in `main`.
pub fn tune() {
    let env_says = |k: &str| std::env::var_os(k).is_some();
    if std::env::var("OPENVLA_MALLOC").is_ok_and(|v| v == "default")
        || env_says("GLIBC_TUNABLES")
        || env_says("MALLOC_MMAP_THRESHOLD_")
        || env_says("MALLOC_TRIM_THRESHOLD_")
        || env_says("MALLOC_TOP_PAD_")
    {
        return;
    }
    apply();
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply() {
    const MMAP_THRESHOLD: libc::c_int = 32 << 20;
    const TRIM_THRESHOLD: libc::c_int = libc::c_int::MAX;
    const TOP_PAD: libc::c_int = 256 << 20;
    // SAFETY: mallopt only changes allocator parameters; it is called before any other thread
    // exists. A refused setting (return 0) leaves glibc's default, which is only slower.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        libc::mallopt(libc::M_TOP_PAD, TOP_PAD);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() {}
