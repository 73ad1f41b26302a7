//! Forward + backward time of the fused training ops against the compositions of candle ops
//! they replaced ([`openvla_train::model::fused_reference`]), on the shapes of the
//! from-scratch small policy (issue 15: ViT width 192 on 64 patches, Llama width 256 / 688 on
//! 93 positions, batch 32).
//!
//!     cargo bench -p openvla-train --bench fused_ops
//!
//! Prints one line per op: milliseconds per forward + backward, composed and fused, and the
//! ratio. `OPENVLA_BENCH_ITERS` sets the repetitions (default 10). `-- --gemm-only` compares
//! the float32 forward products of the `gemm` crate and the kernels' sgemm; `-- --compute`
//! times linears (forward + the three backward products) in f32 and in bf16 arithmetic
//! (`finetune --compute bf16`, AMX or AVX512-BF16 where the CPU has them).

use candle_core::{Device, Tensor, Var};
use openvla_train::model::{attention, fused_reference as reference, ops};
use std::time::Instant;

fn data(shape: &[usize], seed: u64) -> Tensor {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("bench tensor")
}

/// Milliseconds per forward + backward of `sum(f(inputs) * r)` with every input a `Var`.
fn time(inputs: &[Tensor], iters: usize, f: &dyn Fn(&[Tensor]) -> Tensor) -> f64 {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).expect("var"))
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let r = data(f(&ts).dims(), 7);
    let run = || {
        let y = f(&ts);
        let g = (y * &r)
            .and_then(|t| t.sum_all())
            .and_then(|t| t.backward())
            .expect("backward");
        std::hint::black_box(g);
    };
    run();
    let t0 = Instant::now();
    for _ in 0..iters {
        run();
    }
    t0.elapsed().as_secs_f64() * 1e3 / iters as f64
}

fn report(
    name: &str,
    inputs: &[Tensor],
    iters: usize,
    old: &dyn Fn(&[Tensor]) -> Tensor,
    new: &dyn Fn(&[Tensor]) -> Tensor,
) {
    let a = time(inputs, iters, old);
    let b = time(inputs, iters, new);
    println!(
        "{name:<44} composed {a:8.2} ms  fused {b:8.2} ms  {:5.2}x",
        a / b
    );
}

fn main() {
    let iters = std::env::var("OPENVLA_BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    println!("threads: {}", rayon::current_num_threads());
    if std::env::args().any(|a| a == "--gemm-only") {
        gemm_paths(iters);
        return;
    }
    if std::env::args().any(|a| a == "--compute") {
        compute_paths(iters);
        return;
    }
    let (b, n, d, h) = (32, 64, 192, 768);
    let x = data(&[b, n, d], 1);
    let (w, bias) = (data(&[d], 2), data(&[d], 3));
    report(
        "layer_norm [32, 64, 192] (x, w, b grads)",
        &[x.clone(), w.clone(), bias.clone()],
        iters,
        &|t| reference::layer_norm(&t[0], &t[1], &t[2], 1e-6).expect("ln"),
        &|t| ops::layer_norm(&t[0], &t[1], &t[2], 1e-6).expect("ln"),
    );
    let xh = data(&[b, n, h], 4);
    report(
        "gelu_erf [32, 64, 768]",
        std::slice::from_ref(&xh),
        iters,
        &|t| t[0].gelu_erf().expect("gelu"),
        &|t| ops::gelu_erf(&t[0]).expect("gelu"),
    );
    let (s, dl, il) = (93, 256, 688);
    let xl = data(&[b, s, dl], 5);
    report(
        "rms_norm [32, 93, 256] (x, w grads)",
        &[xl.clone(), data(&[dl], 6)],
        iters,
        &|t| reference::rms_norm(&t[0], &t[1], 1e-6).expect("rms"),
        &|t| ops::rms_norm(&t[0], &t[1], 1e-6).expect("rms"),
    );
    report(
        "silu(gate) * up [32, 93, 688]",
        &[data(&[b, s, il], 8), data(&[b, s, il], 9)],
        iters,
        &|t| (t[0].silu().expect("silu") * &t[1]).expect("mul"),
        &|t| ops::silu_mul(&t[0], &t[1]).expect("silu_mul"),
    );
    let (cos, sin) = (data(&[s, 64], 10), data(&[s, 64], 11));
    report(
        "rope [32, 4, 93, 64]",
        &[data(&[b, 4, s, 64], 12)],
        iters,
        &|t| reference::rope(&t[0], &cos, &sin).expect("rope"),
        &|t| ops::rope(&t[0], &cos, &sin).expect("rope"),
    );
    let mask = data(&[b, 1, s, s], 13);
    let scale = 64f64.powf(-0.5);
    report(
        "masked attention [32, 4, 93, 64] (q, k, v grads)",
        &[
            data(&[b, 4, s, 64], 14),
            data(&[b, 4, s, 64], 18),
            data(&[b, 4, s, 64], 19),
        ],
        iters,
        &|t| reference::attention(&t[0], &t[1], &t[2], Some(&mask), scale).expect("attention"),
        &|t| {
            attention::attention(&t[0], &t[1], &t[2], Some(&mask), scale as f32).expect("attention")
        },
    );
    for (name, m, k, nout) in [
        ("linear fc1 [2048, 192] x [768, 192]^T + b", b * n, d, h),
        ("linear down [2976, 688] x [256, 688]^T", b * s, il, dl),
        (
            "linear lm_head [928, 256] x [32064, 256]^T",
            b * 29,
            dl,
            32064,
        ),
    ] {
        let xs = data(&[m, k], 15);
        let ws = data(&[nout, k], 16);
        let bs = data(&[nout], 17);
        let with_bias = name.contains("+ b");
        let inputs = if with_bias {
            vec![xs, ws, bs]
        } else {
            vec![xs, ws]
        };
        report(
            name,
            &inputs,
            iters.div_ceil(2),
            &|t| reference::linear(&t[0], &t[1], t.get(2)).expect("linear"),
            &|t| ops::linear(&t[0], &t[1], t.get(2)).expect("linear"),
        );
    }
}

/// Forward products `x [m, k] · W [n, k]ᵀ` alone: the `gemm` crate (candle's matmul path, which
/// [`ops::linear`] takes) against the packed AVX-512/AVX2 sgemm of `openvla-kernels`.
fn gemm_paths(iters: usize) {
    for (name, m, k, n) in [
        ("fc1 [2048, 192] x [768, 192]^T", 2048, 192, 768),
        ("down [2976, 688] x [256, 688]^T", 2976, 688, 256),
        ("lm_head [928, 256] x [32064, 256]^T", 928, 256, 32064),
        ("dW lm_head [32064, 928] x [256, 928]^T", 32064, 928, 256),
    ] {
        let x = data(&[m, k], 21);
        let w = data(&[n, k], 22);
        let xs = x.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("x");
        let ws = w.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("w");
        let mut y = vec![0f32; m * n];
        let t0 = Instant::now();
        for _ in 0..iters {
            std::hint::black_box(ops::linear(&x, &w, None).expect("linear"));
        }
        let a = t0.elapsed().as_secs_f64() * 1e3 / iters as f64;
        let t0 = Instant::now();
        for _ in 0..iters {
            openvla::kernels::tiled_gemm_f32(&xs, &ws, &mut y, m, n, k);
            std::hint::black_box(&y);
        }
        let b = t0.elapsed().as_secs_f64() * 1e3 / iters as f64;
        let gf = 2.0 * (m * n * k) as f64 / 1e6;
        println!(
            "{name:<44} gemm crate {a:8.2} ms ({:5.1} GF/s)  kernels sgemm {b:8.2} ms ({:5.1} GF/s)",
            gf / a,
            gf / b
        );
    }
}

/// Linear forward + backward (`dx`, `dW`, `db`) in float32 and in bf16 arithmetic
/// ([`openvla_train::model::fused::BF16Matmuls`]) on the small policy's shapes, with the bf16
/// path the kernels choose on this CPU.
fn compute_paths(iters: usize) {
    use openvla::kernels::ComputePrecision;
    use openvla_train::model::fused::BF16Matmuls;
    println!(
        "bf16 path on this CPU: {:?}",
        openvla::kernels::dispatch::bf16_path()
    );
    for (name, m, k, n) in [
        ("qkv [2048, 192] x [576, 192]^T + b", 2048, 192, 576),
        ("fc1 [2048, 192] x [768, 192]^T + b", 2048, 192, 768),
        ("fc2 [2048, 768] x [192, 768]^T + b", 2048, 768, 192),
        ("gate [2976, 256] x [688, 256]^T", 2976, 256, 688),
        ("down [2976, 688] x [256, 688]^T", 2976, 688, 256),
        ("o [2976, 256] x [256, 256]^T", 2976, 256, 256),
    ] {
        let inputs = vec![data(&[m, k], 31), data(&[n, k], 32), data(&[n], 33)];
        let with_bias = name.contains("+ b");
        let f = |t: &[Tensor]| {
            ops::linear(&t[0], &t[1], if with_bias { t.get(2) } else { None }).expect("linear")
        };
        // On the rayon pool, as `openvla finetune` runs its steps.
        let timed = |compute| {
            openvla::kernels::in_pool(|| {
                let _compute = BF16Matmuls::set(compute);
                time(&inputs, iters, &f)
            })
        };
        let (a, b) = (timed(ComputePrecision::F32), timed(ComputePrecision::Bf16));
        let gf = 3.0 * 2.0 * (m * n * k) as f64 / 1e6;
        println!(
            "{name:<44} f32 {a:7.2} ms ({:5.1} GF/s)  bf16 {b:7.2} ms ({:5.1} GF/s)  {:5.2}x",
            gf / a,
            gf / b,
            a / b
        );
    }
}
