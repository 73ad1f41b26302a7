//! Microbenchmarks of the matmul kernels at the model's shapes:
//! `cargo bench -p openvla-kernels --bench kernels` (env `SHAPES=n,k;n,k`, `MS=1,4,279`, `ONLY=a,b`
//! to select kernels, `REPS` rounds). `f32avx2`/`f32avx512` run one sgemm micro-kernel each,
//! `bf16c`/`bf16dot` the bf16-arithmetic GEMM through the f32 GEMM / `vdpbf16ps`, `q8_0avx2` the int16 kernel without AVX512-VNNI.
//!
//! The kernels are timed **interleaved**: each round runs every selected kernel once, and the
//! best round of each is reported, so ratios between kernels are taken under the same machine
//! load (the benchmark machine is shared and noisy).

use openvla_kernels::{half_matmul, quant_matmul};
use openvla_kernels::{QuantFormat, QuantMatrix};
use std::time::Instant;

type Kernel<'a> = (&'static str, usize, Box<dyn FnMut() + 'a>);

fn main() {
    let shapes: Vec<(usize, usize)> = std::env::var("SHAPES")
        .unwrap_or("4096,4096;11008,4096;4096,11008".into())
        .split(';')
        .map(|s| {
            let v: Vec<usize> = s.split(',').map(|x| x.parse().unwrap()).collect();
            (v[0], v[1])
        })
        .collect();
    let ms: Vec<usize> = std::env::var("MS")
        .unwrap_or("1,4,279".into())
        .split(',')
        .map(|x| x.parse().unwrap())
        .collect();
    let only: Option<Vec<String>> = std::env::var("ONLY")
        .ok()
        .map(|o| o.split(',').map(String::from).collect());
    let run = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == name));
    println!("threads {}", rayon::current_num_threads());
    for (n, k) in shapes {
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 2654435761) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        // Four copies, used in turn, so the working set exceeds the last-level cache as the
        // model's weights do.
        let bfs: Vec<Vec<u16>> = (0..4).map(|_| half_matmul::to_bf16_bits(&w)).collect();
        let q8s: Vec<QuantMatrix> = (0..4)
            .map(|_| QuantMatrix::quantize(QuantFormat::Q8_0, &w, n, k))
            .collect();
        let q4s: Vec<QuantMatrix> = (0..4)
            .map(|_| QuantMatrix::quantize(QuantFormat::Q4_0, &w, n, k))
            .collect();
        let ws: Vec<Vec<f32>> = (0..4).map(|_| w.clone()).collect();
        let turn = std::cell::Cell::new(0usize);
        let next = || {
            turn.set((turn.get() + 1) % 4);
            turn.get()
        };
        let wt = candle_core::Tensor::from_slice(&w, (n, k), &candle_core::Device::Cpu).unwrap();
        let wtt = wt.t().unwrap();
        for &m in &ms {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 40503) % 1000) as f32 / 1000.0 - 0.5)
                .collect();
            let xt =
                candle_core::Tensor::from_slice(&x, (m, k), &candle_core::Device::Cpu).unwrap();
            let y = std::cell::RefCell::new(vec![0f32; m * n]);
            let reps = std::env::var("REPS")
                .ok()
                .and_then(|r| r.parse().ok())
                .unwrap_or(if m > 16 { 3 } else { 10 });
            let fl = 2.0 * (m * n * k) as f64;
            let mut kernels: Vec<Kernel> = Vec::new();
            let (x, xt, wtt, ws, bfs, q8s, q4s, y, next) =
                (&x, &xt, &wtt, &ws, &bfs, &q8s, &q4s, &y, &next);
            if run("f32") {
                kernels.push((
                    "f32 candle",
                    n * k * 4,
                    Box::new(move || {
                        std::hint::black_box(xt.matmul(wtt).unwrap());
                    }),
                ));
            }
            if run("f32tiled") {
                kernels.push((
                    "f32 tiled",
                    n * k * 4,
                    Box::new(move || {
                        openvla_kernels::tiled_gemm_f32(
                            x,
                            &ws[next()],
                            &mut y.borrow_mut(),
                            m,
                            n,
                            k,
                        )
                    }),
                ));
            }
            #[cfg(target_arch = "x86_64")]
            for (name, kernel) in [
                ("f32avx2", openvla_kernels::sgemm::Kernel::Avx2),
                ("f32avx512", openvla_kernels::sgemm::Kernel::Avx512),
            ] {
                let f = openvla_kernels::dispatch::Features::detect();
                let can = f.avx2 && (kernel == openvla_kernels::sgemm::Kernel::Avx2 || f.avx512);
                if run(name) && m >= 8 && can {
                    kernels.push((
                        name,
                        n * k * 4,
                        Box::new(move || {
                            openvla_kernels::tiled_gemm_f32_with(
                                kernel,
                                x,
                                &ws[next()],
                                &mut y.borrow_mut(),
                                m,
                                n,
                                k,
                            )
                        }),
                    ));
                }
            }
            use openvla_kernels::dispatch::Bf16Path;
            let has_dot = openvla_kernels::dispatch::Features::detect().avx512_bf16;
            let has_amx = openvla_kernels::amx::available();
            for (name, path, ok) in [
                ("bf16c", Bf16Path::F32Gemm, true),
                ("bf16dot", Bf16Path::Dot, has_dot),
                ("bf16amx", Bf16Path::Amx, has_amx),
            ] {
                if run(name) && m >= 8 && ok {
                    kernels.push((
                        name,
                        n * k * 2,
                        Box::new(move || {
                            let w = &bfs[next()];
                            openvla_kernels::bf16_gemm::tiled_gemm_bf16_with(
                                path,
                                x,
                                &mut y.borrow_mut(),
                                m,
                                n,
                                k,
                                |j0, nb, t| t.copy_from_slice(&w[j0 * k..(j0 + nb) * k]),
                            )
                        }),
                    ));
                }
            }
            if run("q8_0avx2") && m >= 8 && openvla_kernels::i16_gemm::available() {
                kernels.push((
                    "q8_0avx2",
                    q8s[0].storage_bytes(),
                    Box::new(move || {
                        let a = openvla_kernels::i16_gemm::PackedActs::new(x, m, k);
                        openvla_kernels::i16_gemm::matmul_avx2(
                            &a,
                            &q8s[next()],
                            &mut y.borrow_mut(),
                        )
                    }),
                ));
            }
            if run("bf16v0") && m >= 8 {
                kernels.push((
                    "bf16 v0",
                    n * k * 2,
                    Box::new(move || {
                        let w = &bfs[next()];
                        openvla_kernels::tiled_gemm_v0(
                            x,
                            &mut y.borrow_mut(),
                            m,
                            n,
                            k,
                            |j0, nb, buf| {
                                half_matmul::widen(
                                    &w[j0 * k..(j0 + nb) * k],
                                    half_matmul::Half::Bf16,
                                    buf,
                                )
                            },
                        )
                    }),
                ));
            }
            if run("f32rows") {
                kernels.push((
                    "f32 rows",
                    n * k * 4,
                    Box::new(move || {
                        openvla_kernels::f32_matmul::matmul(
                            x,
                            &ws[next()],
                            &mut y.borrow_mut(),
                            m,
                            n,
                            k,
                        )
                    }),
                ));
            }
            if run("bf16") {
                kernels.push((
                    "bf16",
                    n * k * 2,
                    Box::new(move || {
                        half_matmul::matmul(
                            x,
                            &bfs[next()],
                            half_matmul::Half::Bf16,
                            &mut y.borrow_mut(),
                            m,
                            n,
                            k,
                            false,
                        )
                    }),
                ));
            }
            // "q8_0"/"q4_0": what the dispatcher runs (the int16 kernel at many rows on AVX2);
            // "...deq": dequantized tiles + gemm (weight-only); "...v0": the same with the
            // previous tiling (the many-row path before this work).
            for (name, qs, path) in [
                ("q8_0", q8s, 0),
                ("q8_0deq", q8s, 1),
                ("q8_0v0", q8s, 2),
                ("q4_0", q4s, 0),
                ("q4_0deq", q4s, 1),
                ("q4_0v0", q4s, 2),
            ] {
                if run(name) && (path == 0 || m >= 8) {
                    kernels.push((
                        name,
                        qs[0].storage_bytes(),
                        Box::new(move || {
                            let w = &qs[next()];
                            let y = &mut y.borrow_mut();
                            match path {
                                0 => quant_matmul::matmul(x, w, y, m, false),
                                1 => quant_matmul::matmul_dequant(x, w, y, m),
                                _ => openvla_kernels::tiled_gemm_v0(x, y, m, n, k, |j0, _, b| {
                                    w.dequantize_rows(j0, b)
                                }),
                            }
                        }),
                    ));
                }
            }
            let mut best = vec![f64::MAX; kernels.len()];
            for round in 0..=reps {
                for (b, (_, _, f)) in best.iter_mut().zip(kernels.iter_mut()) {
                    let t = Instant::now();
                    f();
                    if round > 0 {
                        *b = b.min(t.elapsed().as_secs_f64());
                    }
                }
            }
            for ((name, bytes, _), t) in kernels.iter().zip(&best) {
                println!(
                    "n={n:5} k={k:5} m={m:3} {name:10} {:8.2} ms {:6.1} GF/s {:5.1} GB/s",
                    t * 1e3,
                    fl / t / 1e9,
                    *bytes as f64 / t / 1e9
                );
            }
        }
    }
}
