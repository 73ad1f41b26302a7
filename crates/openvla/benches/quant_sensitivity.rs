//! Which component's quantization moves the action tokens: loads a model in f32 and with
//! several quantization plans, and reports token agreement and logit changes against f32.
//! `cargo bench -p openvla --bench quant_sensitivity -- MODEL_DIR [PAIRS]`

use openvla::checkpoint::{Checkpoint, WeightLoader};
use openvla::model::linear::{WeightDtype, WeightPolicy};
use openvla::model::OpenVla;
use openvla::quant::{QuantFormat, QuantPlan};
use openvla::{LoadOptions, Policy, Precision};
use std::path::PathBuf;

fn image(i: usize) -> openvla::processor::RgbImage {
    let (w, h) = (224u32, 224u32);
    let mut s = 0x9E37_79B9_7F4A_7C15u64 ^ (i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 33) as u32
    };
    let base = [next() % 256, next() % 256, next() % 256];
    let mut data = Vec::new();
    for y in 0..h {
        for x in 0..w {
            let n = next() % 32;
            data.extend(
                [
                    (base[0] + x + n) % 256,
                    (base[1] + y) % 256,
                    (base[2] + x * y / 64 + n) % 256,
                ]
                .map(|c| c as u8),
            );
        }
    }
    openvla::processor::RgbImage::from_raw(w, h, data).unwrap()
}

fn main() {
    let args: Vec<String> = std::env::args().filter(|a| a != "--bench").collect();
    let dir = PathBuf::from(
        args.get(1)
            .cloned()
            .unwrap_or("bench-models/minivla-random".into()),
    );
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(8);
    let tasks = [
        "put the carrot in the bowl",
        "pick up the red block",
        "open the drawer",
        "wipe the table",
    ];
    let policy = Policy::load(
        &dir,
        &LoadOptions {
            precision: Precision::F32,
            ..Default::default()
        },
    )
    .unwrap();
    let inputs: Vec<(candle_core::Tensor, Vec<u32>)> = (0..n)
        .map(|i| {
            let px = policy.preprocess_image(&image(i)).unwrap();
            let mut ids = policy.prompt_ids(tasks[i % tasks.len()]).unwrap();
            ids.push(29871);
            (px, ids)
        })
        .collect();
    let run = |m: &OpenVla| -> Vec<openvla::model::GenerationTrace> {
        inputs
            .iter()
            .map(|(px, ids)| m.generate(px, ids, 7).unwrap())
            .collect()
    };
    let reference = run(policy.model());
    let mut margins = Vec::new();
    for t in &reference {
        for l in &t.step_logits {
            let mut v: Vec<f32> = l[31744..32000].to_vec();
            v.sort_by(|a, b| b.total_cmp(a));
            margins.push(v[0] - v[1]);
        }
    }
    margins.sort_by(|a, b| a.total_cmp(b));
    println!(
        "f32 top1-top2 action-logit margins: median {:.4}, 10% {:.4}, 90% {:.4}",
        margins[margins.len() / 2],
        margins[margins.len() / 10],
        margins[margins.len() * 9 / 10]
    );
    drop(policy);
    let cfg = openvla::ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let ckpt = Checkpoint::open_dir(&dir).unwrap();
    let q8 = Some(QuantFormat::Q8_0);
    let q4 = Some(QuantFormat::Q4_0);
    let none = QuantPlan::default();
    let plans: Vec<(&str, QuantPlan)> = vec![
        ("bf16 weights (exact)", none),
        (
            "all q8_0",
            QuantPlan {
                vision: q8,
                projector: q8,
                llm: q8,
                lm_head: q8,
                embedding: q8,
            },
        ),
        ("vision q8_0", QuantPlan { vision: q8, ..none }),
        (
            "projector q8_0",
            QuantPlan {
                projector: q8,
                ..none
            },
        ),
        ("llm q8_0", QuantPlan { llm: q8, ..none }),
        (
            "lm_head q8_0",
            QuantPlan {
                lm_head: q8,
                ..none
            },
        ),
        (
            "embedding q8_0",
            QuantPlan {
                embedding: q8,
                ..none
            },
        ),
        ("llm q4_0", QuantPlan { llm: q4, ..none }),
    ];
    let only: Option<String> = std::env::var("PLANS").ok();
    for (name, plan) in plans {
        if let Some(o) = &only {
            if !o.split(',').any(|p| name.starts_with(p)) {
                continue;
            }
        }
        let dtype = if plan == none {
            WeightDtype::Bf16
        } else {
            WeightDtype::F32
        };
        let wp = WeightPolicy {
            tiles: false,
            dtype,
            quantization: None,
            plan,
            ..WeightPolicy::default()
        };
        let loader = WeightLoader::new(&ckpt, candle_core::Device::Cpu, None);
        let m = OpenVla::load(&loader, &cfg, &wp).unwrap();
        let got = run(&m);
        let (mut same, mut total, mut maxd, mut sumd, mut cnt) = (0, 0, 0f32, 0f64, 0usize);
        for (r, g) in reference.iter().zip(&got) {
            for (a, b) in r.generated.iter().zip(&g.generated) {
                total += 1;
                same += usize::from(a == b);
            }
            let (x, y) = (
                &r.step_logits[0][31744..32000],
                &g.step_logits[0][31744..32000],
            );
            for (p, q) in x.iter().zip(y) {
                maxd = maxd.max((p - q).abs());
                sumd += (p - q).abs() as f64;
                cnt += 1;
            }
        }
        println!("{name:<22} tokens {same}/{total} ({:.1}%)  step-0 action logits |Δ| max {maxd:.4} mean {:.4}", 100.0 * same as f64 / total as f64, sumd / cnt as f64);
    }
}
