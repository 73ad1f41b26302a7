//! The one place that decides, at run time, which instruction set each kernel uses.
//!
//! One binary serves every x86-64 CPU: the CPU's features are detected once
//! ([`Features::get`]), each kernel asks this module for its path, and [`table`] prints the
//! choice per operation (`openvla bench` and `openvla inspect` show it).
//!
//! `OPENVLA_ISA` caps the detected features (`portable`, `avx2`, `avx512` (AVX-512 without
//! AMX); unset or `native`: everything the CPU has), so that one machine can measure the older paths against the new ones
//! in the same run, and a test can exercise a path the CPU would not pick.

use std::fmt::Write as _;
use std::sync::OnceLock;

/// The arithmetic of the many-row products (vision towers, projector, prefill, attention).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum ComputePrecision {
    /// f32 activations, weights widened exactly to f32, f32 products and sums: the reference's
    /// float32 function whatever the weights are stored in (the default).
    #[default]
    F32,
    /// bf16 arithmetic, as PyTorch bf16 and the GPU reference compute: activations and dense
    /// weights rounded to bf16 (round to nearest even), products accumulated in f32
    /// (AMX `tdpbf16ps` or `vdpbf16ps` where the CPU has them, [`bf16_path`]). Decode steps (fewer than
    /// [`crate::GEMM_MIN_ROWS`] rows) and quantized weights keep their exact f32 kernels.
    Bf16,
}

impl ComputePrecision {
    /// The name used on command lines (`f32`, `bf16`).
    pub fn name(self) -> &'static str {
        match self {
            ComputePrecision::F32 => "f32",
            ComputePrecision::Bf16 => "bf16",
        }
    }

    /// Parses [`ComputePrecision::name`].
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "f32" => Some(ComputePrecision::F32),
            "bf16" => Some(ComputePrecision::Bf16),
            _ => None,
        }
    }
}

impl std::str::FromStr for ComputePrecision {
    type Err = String;

    /// [`ComputePrecision::from_name`], with an error naming the choices.
    fn from_str(s: &str) -> Result<Self, String> {
        ComputePrecision::from_name(s)
            .ok_or_else(|| format!("unknown compute precision {s:?}; expected f32 or bf16"))
    }
}

impl std::fmt::Display for ComputePrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The CPU features the kernels dispatch on, after the `OPENVLA_ISA` cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features {
    /// AVX2 + FMA + F16C (x86-64-v3).
    pub avx2: bool,
    /// AVX-512 F, BW and VL (with `avx2`).
    pub avx512: bool,
    /// AVX512-BF16 (`vdpbf16ps`, `vcvtne2ps2bf16`; with `avx512`).
    pub avx512_bf16: bool,
    /// AVX512-VNNI (`vpdpbusd` on zmm; with `avx512`).
    pub avx512_vnni: bool,
    /// AVX-VNNI (`vpdpbusd` on ymm, VEX-encoded; with `avx2`).
    pub avx_vnni: bool,
    /// AMX-TILE and AMX-BF16 (`tdpbf16ps`), usable by this process ([`crate::amx::available`];
    /// with `avx512`).
    pub amx_bf16: bool,
}

/// How far `OPENVLA_ISA` lets the dispatcher go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Cap {
    Portable,
    Avx2,
    Avx512,
    Native,
}

fn cap_from_env() -> Cap {
    match std::env::var("OPENVLA_ISA").as_deref() {
        Ok("portable") => Cap::Portable,
        Ok("avx2") => Cap::Avx2,
        Ok("avx512") => Cap::Avx512,
        Ok("native") | Ok("") | Err(_) => Cap::Native,
        Ok(other) => {
            eprintln!(
                "warning: OPENVLA_ISA={other:?} is not one of portable, avx2, avx512, native; \
                 using every feature the CPU has"
            );
            Cap::Native
        }
    }
}

impl Features {
    /// The features of this CPU, detected once, capped by `OPENVLA_ISA`.
    pub fn get() -> Features {
        static F: OnceLock<Features> = OnceLock::new();
        *F.get_or_init(|| Features::detect().capped(cap_from_env()))
    }

    /// Everything the CPU reports, uncapped (the limits probe measures every path it has).
    pub fn detect() -> Features {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma") && has!("f16c");
            let avx512 = avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vl");
            Features {
                avx2,
                avx512,
                avx512_bf16: avx512 && has!("avx512bf16"),
                avx512_vnni: avx512 && has!("avx512vnni"),
                avx_vnni: avx2 && has!("avxvnni"),
                amx_bf16: avx512 && crate::amx::available(),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            Features::default()
        }
    }

    fn capped(self, cap: Cap) -> Features {
        let mut f = self;
        if cap < Cap::Native {
            f.amx_bf16 = false;
        }
        if cap < Cap::Avx512 {
            f.avx512 = false;
            f.avx512_bf16 = false;
            f.avx512_vnni = false;
        }
        if cap < Cap::Avx2 {
            f = Features::default();
        }
        f
    }

    /// The detected flags, as `/proc/cpuinfo` spells them.
    pub fn flags(&self) -> String {
        let names = [
            (self.avx2, "avx2 fma f16c"),
            (self.avx512, "avx512f avx512bw avx512vl"),
            (self.avx512_bf16, "avx512_bf16"),
            (self.avx512_vnni, "avx512_vnni"),
            (self.avx_vnni, "avx_vnni"),
            (self.amx_bf16, "amx_bf16 amx_tile"),
        ];
        let on: Vec<&str> = names.iter().filter(|(b, _)| *b).map(|(_, n)| *n).collect();
        if on.is_empty() {
            "none of avx2/avx512 (portable kernels)".into()
        } else {
            on.join(" ")
        }
    }
}

/// The path of the f32 packed GEMM ([`crate::sgemm`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmPath {
    /// 6×32 micro-kernel on zmm registers.
    Avx512,
    /// 6×16 micro-kernel on ymm registers.
    Avx2,
    /// The `gemm` crate.
    Portable,
}

/// Which f32 GEMM runs here.
pub fn f32_gemm() -> GemmPath {
    let f = Features::get();
    if f.avx512 {
        GemmPath::Avx512
    } else if f.avx2 {
        GemmPath::Avx2
    } else {
        GemmPath::Portable
    }
}

/// The kernel of the bf16-arithmetic GEMM ([`ComputePrecision::Bf16`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Path {
    /// AMX `tdpbf16ps` on 16×32 tiles ([`crate::amx`]).
    Amx,
    /// AVX512-BF16 `vdpbf16ps`, 6×32 packed micro-kernel ([`crate::bf16_gemm`]).
    Dot,
    /// The bf16-rounded operands widened back to f32 exactly, through the f32 GEMM: the same
    /// products, summed in another order.
    F32Gemm,
}

/// Which kernel the bf16-arithmetic GEMM runs here: AMX where the process can use it (about
/// 8× the AVX-512 FMA's rate on Sapphire Rapids), else `vdpbf16ps` on AMD CPUs (see below),
/// else the rounded operands through the f32 GEMM.
///
/// `vdpbf16ps` only on AMD CPUs: Zen 4 and Zen 5 execute it at the full vector rate (32 bf16
/// products per instruction, twice the f32 FMA's multiplies), but Intel's Sapphire Rapids runs
/// it at a quarter of its AVX-512 FMA instruction rate, i.e. half the products per second
/// (`openvla bench --limits` on 2026-12-06: vdpbf16ps 45 GFLOP/s against 93 for the AVX-512
/// FMA; `docs/kernels.md`). The choice depends on the CPU only, so a machine always computes the
/// same bits.
pub fn bf16_path() -> Bf16Path {
    let f = Features::get();
    if f.amx_bf16 {
        Bf16Path::Amx
    } else if f.avx512_bf16 && bf16_dot_is_fast() {
        Bf16Path::Dot
    } else {
        Bf16Path::F32Gemm
    }
}

/// Whether this CPU's `vdpbf16ps` is worth using (see [`bf16_path`]): an AMD CPU.
fn bf16_dot_is_fast() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // CPUID leaf 0 (the vendor string) exists on every x86-64 CPU.
        let r = std::arch::x86_64::__cpuid(0);
        let mut vendor = [0u8; 12];
        vendor[..4].copy_from_slice(&r.ebx.to_le_bytes());
        vendor[4..8].copy_from_slice(&r.edx.to_le_bytes());
        vendor[8..].copy_from_slice(&r.ecx.to_le_bytes());
        &vendor == b"AuthenticAMD"
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn f32_gemm_name(p: GemmPath) -> &'static str {
    match p {
        GemmPath::Avx512 => "AVX-512F FMA, 6x32 packed sgemm",
        GemmPath::Avx2 => "AVX2 FMA, 6x16 packed sgemm",
        GemmPath::Portable => "portable (gemm crate)",
    }
}

/// The dispatch table: which path each operation takes on this CPU, one line per operation.
pub fn table() -> String {
    let f = Features::get();
    let native = Features::detect();
    let gemm = f32_gemm_name(f32_gemm());
    let bf16 = match bf16_path() {
        Bf16Path::Amx => {
            "AMX tdpbf16ps, 32x32 blocks of 16x32 tiles (bf16 operands, f32 sums)".to_string()
        }
        Bf16Path::Dot => "AVX512-BF16 vdpbf16ps, 6x32 packed (bf16 operands, f32 sums)".to_string(),
        Bf16Path::F32Gemm if f.avx512_bf16 => {
            format!("bf16-rounded operands, f32 GEMM ({gemm}; this CPU's vdpbf16ps is slower)")
        }
        Bf16Path::F32Gemm => format!("bf16-rounded operands, then f32 GEMM: {gemm}"),
    };
    let int16 = if f.avx512 && f.avx512_vnni {
        "AVX512-VNNI vpdpwssd int16 GEMM 6x32 (int32 block sums)"
    } else if f.avx2 {
        "AVX2 vpmaddwd int16 GEMM 6x16 (int32 block sums)"
    } else {
        "dequantized tiles + gemm crate"
    };
    let dot = if f.avx512 {
        "AVX-512F (f32, bf16/f16 widened)"
    } else if f.avx2 {
        "AVX2+FMA+F16C"
    } else {
        "portable"
    };
    let qdot = if f.avx2 {
        "AVX2 (q8_0: int16 vpmaddwd, q4_0: int8 vpmaddubsw)"
    } else {
        "portable"
    };
    let mut s = String::new();
    let _ = writeln!(s, "CPU features: {}", f.flags());
    if f != native {
        let _ = writeln!(
            s,
            "  (capped by OPENVLA_ISA; the CPU has: {})",
            native.flags()
        );
    }
    let rows = [
        (
            "many-row f32/bf16/f16 weights, --compute f32",
            gemm.to_string(),
        ),
        ("many-row f32/bf16/f16 weights, --compute bf16", bf16),
        ("many-row q8_0/q4_0 weights", int16.to_string()),
        (
            "finetune linears (fwd, dx, dW), --compute f32",
            if f32_gemm() == GemmPath::Portable {
                "gemm crate on strided operands (candle's matmul path)".to_string()
            } else {
                format!(
                    "{gemm}; W of dx and x of dW packed depth-major, g^T of dW packed \
                     transposed (no transposed copies); under {} columns (LoRA ranks) or {} \
                     rows the gemm crate",
                    crate::PACKED_MIN_COLS,
                    crate::GEMM_MIN_ROWS
                )
            },
        ),
        (
            "finetune linears (fwd, dx, dW), --compute bf16",
            if bf16_path() == Bf16Path::Amx {
                "AMX as above; W of dx and x of dW packed depth-major, g^T of dW packed \
                 transposed (no transposed copies)"
                    .to_string()
            } else {
                "the many-row --compute bf16 path above, after transposing W (dx), g and x (dW) \
                 once"
                    .to_string()
            },
        ),
        ("attention QK^T, PV (prefill, vision)", gemm.to_string()),
        (
            "attention, --compute bf16 (8+ queries)",
            if bf16_path() == Bf16Path::Amx {
                "AMX tdpbf16ps (bf16 q, k, probabilities, v; f32 sums and softmax)".to_string()
            } else {
                "as --compute f32".to_string()
            },
        ),
        (
            "finetune attention (fwd, recomputed in bwd)",
            format!("{gemm}, one head per task (f32 in every mode)"),
        ),
        ("decode dot products, dense weights", dot.to_string()),
        ("decode dot products, q8_0/q4_0 weights", qdot.to_string()),
    ];
    for (op, path) in rows {
        let _ = writeln!(s, "  {op:<46} {path}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_remove_features_from_the_top() {
        let all = Features {
            avx2: true,
            avx512: true,
            avx512_bf16: true,
            avx512_vnni: true,
            avx_vnni: true,
            amx_bf16: true,
        };
        assert_eq!(all.capped(Cap::Native), all);
        let avx512 = all.capped(Cap::Avx512);
        assert!(avx512.avx512_bf16 && avx512.avx512_vnni && !avx512.amx_bf16);
        let avx2 = all.capped(Cap::Avx2);
        assert!(avx2.avx2 && avx2.avx_vnni && !avx2.avx512 && !avx2.avx512_bf16);
        assert_eq!(all.capped(Cap::Portable), Features::default());
    }

    #[test]
    fn table_names_every_operation_and_the_features() {
        let t = table();
        assert!(t.starts_with("CPU features: "), "{t}");
        for op in [
            "--compute f32",
            "--compute bf16",
            "q8_0/q4_0",
            "attention",
            "finetune",
        ] {
            assert!(t.contains(op), "{op} missing from\n{t}");
        }
        // The training linears' f32 line names the kernel they run on.
        let line = t
            .lines()
            .find(|l| l.contains("finetune linears") && l.contains("--compute f32"))
            .expect("a finetune f32 line");
        let want = match f32_gemm() {
            GemmPath::Portable => "gemm crate".to_string(),
            path => f32_gemm_name(path).to_string(),
        };
        assert!(line.contains(&want), "{line} does not name {want}");
        println!("{t}");
    }

    #[test]
    fn compute_precision_names_round_trip() {
        for c in [ComputePrecision::F32, ComputePrecision::Bf16] {
            assert_eq!(ComputePrecision::from_name(c.name()), Some(c));
        }
        assert_eq!(ComputePrecision::from_name("int8"), None);
        assert_eq!(ComputePrecision::default(), ComputePrecision::F32);
    }
}
