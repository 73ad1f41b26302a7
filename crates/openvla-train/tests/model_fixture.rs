//! The differentiable OpenVLA (`openvla_train::model`) against the reference training fixture
//! (testdata/train, from `finetune.py` + PEFT 0.11.1 in float32 on the tiny model): base and
//! LoRA forwards, loss, every LoRA gradient, one AdamW step, the loss after it, and the full
//! fine-tuning gradients.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use openvla_train::batch::TextBatch;
use openvla_train::io::read_safetensors;
use openvla_train::lora::adapter::PEFT_PREFIX;
use openvla_train::lora::LoraAdapter;
use openvla_train::model::{LoadTrainOptions, OpenVlaTrain, WeightStorage};
use openvla_train::optim::{AdamW, AdamWConfig};
use openvla_train::rng::TrainRng;
use openvla_train::seam::{TrainModel, VlaBatch, VlaObjective};
use openvla_train::trainer::Objective;
use openvla_train::TrainMode;
use std::collections::{BTreeMap, BTreeSet};

/// The fixture batch: pixel values (= the tiny fixture's s0/s1) and the collated text.
fn fixture_batch() -> VlaBatch {
    let raw = read_raw(&td().join("batch.safetensors"));
    let ids = i64s(&raw["input_ids"]);
    let labels = i64s(&raw["labels"]);
    let mask: Vec<bool> = raw["attention_mask"].2.iter().map(|&b| b != 0).collect();
    let (b, t) = (raw["input_ids"].1[0], raw["input_ids"].1[1]);
    let text = TextBatch {
        batch: b,
        seq_len: t,
        input_ids: ids.iter().map(|&i| i as u32).collect(),
        labels,
        attention_mask: mask,
    };
    let mut px = Vec::new();
    for s in 0..b {
        let (shape, data) = npy_f32(
            &root()
                .join("testdata/openvla-tiny")
                .join(format!("s{s}_pixel_values.npy")),
        );
        assert_eq!(shape, vec![1, 6, 224, 224]);
        px.extend(data);
    }
    VlaBatch {
        pixel_values: Tensor::from_vec(px, (b, 6, 224, 224), &Device::Cpu).unwrap(),
        text,
    }
}

fn load(mode: TrainMode) -> OpenVlaTrain {
    OpenVlaTrain::load(
        &tiny_model(),
        LoadTrainOptions {
            mode,
            storage: WeightStorage::F32,
        },
        &Device::Cpu,
    )
    .unwrap()
}

fn objective(mode: TrainMode, adapter: Option<LoraAdapter>) -> VlaObjective<OpenVlaTrain> {
    let model = load(mode);
    let cfg = model.config().clone();
    VlaObjective::new(
        model,
        |n| openvla_train::mode::is_trainable(mode, n, cfg.text.num_hidden_layers),
        adapter,
        openvla::action::ActionTokenizer::new(cfg.n_action_bins, cfg.action_vocab_size),
        0,
    )
    .unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// `|a - b|_2 / |b|_2` (0 when both are zero).
fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let d: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| ((*x as f64) - (*y as f64)).powi(2))
        .sum::<f64>()
        .sqrt();
    let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt();
    if n == 0.0 {
        d
    } else {
        d / n
    }
}

fn assert_rel(name: &str, got: f64, want: f64, tol: f64) {
    let r = ((got - want) / want).abs();
    assert!(
        r <= tol,
        "{name}: got {got}, reference {want}, relative error {r:e} > {tol:e}"
    );
}

/// Logits rows at the reference's supervised positions: `[B, 8, V]` values and the row count.
fn supervised_logits(logits: &Tensor, offset: usize, positions: &[i64], b: usize) -> Vec<Tensor> {
    let per = positions.len() / b;
    (0..b)
        .map(|r| {
            let rows: Vec<u32> = positions[r * per..(r + 1) * per]
                .iter()
                .map(|&p| (p as usize - offset) as u32)
                .collect();
            let idx = Tensor::new(rows.as_slice(), &Device::Cpu).unwrap();
            logits.get(r).unwrap().index_select(&idx, 0).unwrap()
        })
        .collect()
}

#[test]
fn base_forward_and_loss_match_the_reference() {
    let batch = fixture_batch();
    let mut obj = objective(TrainMode::Lora, None);
    let dev = Device::Cpu;
    let out = obj
        .backbone
        .model
        .forward_train(
            &batch.pixel_values,
            &batch.text.input_ids_tensor(&dev).unwrap(),
            &batch.text.attention_mask_tensor(&dev).unwrap(),
        )
        .unwrap();
    assert_eq!(out.offset, 256, "patch-position logits are skipped");
    let fb = read_raw(&td().join("forward_base.safetensors"));
    let pos = i64s(&fb["supervised_positions"]);
    let want = f32s(&fb["logits_supervised"]);
    let got: Vec<f32> = supervised_logits(&out.logits, out.offset, &pos, 2)
        .iter()
        .flat_map(vec_f32)
        .collect();
    let max_abs = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let err = rel_l2(&got, &want);
    eprintln!("base logits: rel-L2 {err:e}, max abs {max_abs:e}");
    assert!(
        err < 1e-5 && max_abs < 1e-4,
        "base logits: rel-L2 {err:e}, max abs {max_abs:e}"
    );
    // argmax over the vocabulary, as the reference's metrics use it
    let am: Vec<i64> = supervised_logits(&out.logits, out.offset, &pos, 2)
        .iter()
        .flat_map(|t| t.argmax(1).unwrap().to_vec1::<u32>().unwrap())
        .map(|x| x as i64)
        .collect();
    assert_eq!(am, i64s(&fb["argmax_supervised"]));
    let step = obj.forward(&batch, &mut TrainRng::new(0)).unwrap();
    let loss = scalar(&step.loss);
    let want = expected()["loss_base"].as_f64().unwrap();
    eprintln!("base loss {loss} vs {want}");
    assert_rel("base loss", loss, want, 1e-5);
    let acc = step.action_accuracy.unwrap();
    let m = &expected()["metrics_base"];
    assert!((acc - m["action_accuracy"].as_f64().unwrap()).abs() < 1e-6);
    assert!((step.action_l1_loss.unwrap() - m["action_l1_loss"].as_f64().unwrap()).abs() < 1e-9);
}

#[test]
fn lora_forward_gradients_and_adamw_step_match_the_reference() {
    let batch = fixture_batch();
    let adapter = LoraAdapter::load(&td().join("lora_init"), &Device::Cpu).unwrap();
    let mut obj = objective(TrainMode::Lora, Some(adapter));
    assert!(
        obj.backbone.base_params.is_empty(),
        "LoRA trains no base weight"
    );
    let params = obj.params();
    assert_eq!(params.len(), 2 * 57);
    let mut rng = TrainRng::new(0);
    let out = obj.forward(&batch, &mut rng).unwrap();
    let loss = scalar(&out.loss);
    let exp = expected();
    eprintln!("LoRA init loss {loss}");
    assert_rel(
        "LoRA loss at init",
        loss,
        exp["lora_loss_init"].as_f64().unwrap(),
        1e-5,
    );
    assert_eq!(out.action_accuracy, Some(0.0));

    // Forward: action-row logits and logsumexp at the supervised positions.
    let dev = Device::Cpu;
    let lo = obj
        .backbone
        .model
        .forward_train(
            &batch.pixel_values,
            &batch.text.input_ids_tensor(&dev).unwrap(),
            &batch.text.attention_mask_tensor(&dev).unwrap(),
        )
        .unwrap();
    let fb = read_raw(&td().join("forward_base.safetensors"));
    let fl = read_raw(&td().join("forward_lora.safetensors"));
    let pos = i64s(&fb["supervised_positions"]);
    let sup = supervised_logits(&lo.logits, lo.offset, &pos, 2);
    let rows: Vec<f32> = sup
        .iter()
        .flat_map(|t| vec_f32(&t.narrow(1, 31744, 256).unwrap()))
        .collect();
    let err = rel_l2(&rows, &f32s(&fl["logits_supervised_init_action_rows"]));
    eprintln!("LoRA action-row logits rel-L2 {err:e}");
    assert!(err < 1e-5, "LoRA action-row logits: rel-L2 {err:e}");
    let eos: Vec<f32> = sup
        .iter()
        .flat_map(|t| vec_f32(&t.narrow(1, 2, 1).unwrap()))
        .collect();
    assert!(rel_l2(&eos, &f32s(&fl["logits_supervised_init_eos"])) < 1e-5);
    let lse: Vec<f32> = sup
        .iter()
        .flat_map(|t| {
            let m = t.max_keepdim(1).unwrap();
            let z = t
                .broadcast_sub(&m)
                .unwrap()
                .exp()
                .unwrap()
                .sum_keepdim(1)
                .unwrap();
            vec_f32(&(z.log().unwrap() + m).unwrap())
        })
        .collect();
    assert!(rel_l2(&lse, &f32s(&fl["logsumexp_init"])) < 1e-6);

    // Gradients of every LoRA matrix.
    let grads = out.loss.backward().unwrap();
    let want = read_safetensors(&td().join("lora_grads.safetensors"), &dev).unwrap();
    let none: BTreeSet<String> = exp["lora_grad_none"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let mut worst = (0f64, String::new());
    let mut gmap = BTreeMap::new();
    for (name, var) in &params {
        match (grads.get(var), want.get(name)) {
            (Some(g), Some(w)) => {
                let e = rel_l2(&vec_f32(g), &vec_f32(w));
                assert!(e <= 1e-4, "gradient of {name}: rel-L2 {e:e} > 1e-4");
                if e > worst.0 {
                    worst = (e, name.clone());
                }
                assert!(
                    g.abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap()
                        > 0.0,
                    "{name} got an all-zero gradient"
                );
                gmap.insert(name.clone(), g.clone());
            }
            (None, None) => assert!(
                none.contains(name),
                "{name}: no gradient, not in lora_grad_none"
            ),
            (g, w) => panic!(
                "{name}: gradient present here {} but in the reference {}",
                g.is_some(),
                w.is_some()
            ),
        }
    }
    eprintln!(
        "LoRA grads: {} tensors, worst rel-L2 {:e} ({})",
        gmap.len(),
        worst.0,
        worst.1
    );
    assert_eq!(gmap.len(), 88);
    assert_eq!(none.len(), 26);

    // One AdamW step with our gradients.
    let before: BTreeMap<String, Vec<f32>> = params
        .iter()
        .map(|(n, v)| (n.clone(), vec_f32(v.as_tensor())))
        .collect();
    let mut opt = AdamW::new(AdamWConfig::default());
    opt.step(&params, &gmap).unwrap();
    let step1 = LoraAdapter::load(&td().join("lora_step1"), &dev).unwrap();
    let step1: BTreeMap<String, Tensor> = step1.state_dict();
    let (mut outliers, mut n, mut max_in) = (0usize, 0usize, 0f32);
    for (name, var) in &params {
        let got = vec_f32(var.as_tensor());
        let w = vec_f32(&step1[name]);
        if !gmap.contains_key(name) {
            assert_eq!(
                got, before[name],
                "{name} has no gradient but AdamW changed it"
            );
            assert_eq!(got, w, "{name}: the reference leaves it untouched too");
            continue;
        }
        let gref = vec_f32(&want[name]);
        for ((a, b), g) in got.iter().zip(&w).zip(&gref) {
            n += 1;
            let d = (a - b).abs();
            if d > 1e-5 {
                // Adam's first step is ~lr·sign(g): only a gradient within the float32 noise
                // of zero may flip.
                assert!(
                    g.abs() < 1e-6,
                    "{name}: updated weight off by {d:e} where the reference gradient is {g:e}"
                );
                outliers += 1;
            } else {
                max_in = max_in.max(d);
            }
        }
    }
    eprintln!(
        "AdamW step: {n} elements, {outliers} sign-noise outliers, max diff otherwise {max_in:e}"
    );
    assert!(
        outliers * 1000 < n,
        "{outliers} of {n} updated weights differ by > 1e-5"
    );

    // Loss after the step.
    let after = obj.forward(&batch, &mut rng).unwrap();
    let l = scalar(&after.loss);
    eprintln!("LoRA loss after one step {l}");
    assert_rel(
        "LoRA loss after one AdamW step",
        l,
        exp["lora_loss_after_step"].as_f64().unwrap(),
        1e-5,
    );
    assert_rel("LoRA loss after one AdamW step", l, 7.69845724105835, 1e-5);
}

#[test]
fn full_finetuning_gradients_match_the_reference() {
    let batch = fixture_batch();
    let mut obj = objective(TrainMode::Full, None);
    let params = obj.params();
    assert_eq!(params.len(), 156, "every checkpoint tensor is a parameter");
    let out = obj.forward(&batch, &mut TrainRng::new(0)).unwrap();
    assert_rel(
        "full-FT loss",
        scalar(&out.loss),
        expected()["loss_base"].as_f64().unwrap(),
        1e-5,
    );
    let grads = out.loss.backward().unwrap();
    let g = |name: &str| -> Option<Tensor> {
        let v = &params.iter().find(|(n, _)| n == name).unwrap().1;
        grads.get(v).cloned()
    };
    // Every tensor's gradient norm (and None where the reference has None).
    let stats: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(td().join("full_ft_grad_stats.json")).unwrap(),
    )
    .unwrap();
    let mut worst = (0f64, String::new());
    for (name, _) in &params {
        let st = &stats[name.as_str()];
        match (g(name), st.is_null()) {
            (None, true) => {}
            (Some(t), false) => {
                let l2 = scalar(&t.sqr().unwrap().sum_all().unwrap()).sqrt();
                let want = st["l2"].as_f64().unwrap();
                let e = ((l2 - want) / want).abs();
                assert!(e < 1e-4, "gradient norm of {name}: {l2} vs {want} ({e:e})");
                assert!(l2 > 0.0, "{name} got an all-zero gradient");
            }
            (t, null) => panic!(
                "{name}: gradient here {}, reference gradient is None {null}",
                t.is_some()
            ),
        }
    }
    // The stored gradient subset, element by element.
    let want = read_raw(&td().join("full_ft_grads.safetensors"));
    for (key, raw) in &want {
        if key.ends_with(".nonzero_row_ids") {
            continue;
        }
        let (name, got) = if let Some(base) = key.strip_suffix(".nonzero_rows") {
            let ids: Vec<u32> = i64s(&want[&format!("{base}.nonzero_row_ids")])
                .iter()
                .map(|&i| i as u32)
                .collect();
            let idx = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap();
            (base, g(base).unwrap().index_select(&idx, 0).unwrap())
        } else if let Some((base, range)) = key.split_once('[') {
            let (a, b) = range.trim_end_matches(']').split_once(':').unwrap();
            let (a, b): (usize, usize) = (a.parse().unwrap(), b.parse().unwrap());
            (base, g(base).unwrap().narrow(0, a, b - a).unwrap())
        } else {
            (key.as_str(), g(key).unwrap())
        };
        assert_eq!(got.dims(), raw.1.as_slice(), "{key}");
        let e = rel_l2(&vec_f32(&got), &f32s(raw));
        assert!(
            e <= 1e-4,
            "full-FT gradient {key} ({name}): rel-L2 {e:e} > 1e-4"
        );
        if e > worst.0 {
            worst = (e, key.clone());
        }
    }
    eprintln!("full-FT grads: worst rel-L2 {:e} ({})", worst.0, worst.1);
    // The reference's grad-None parameters: the blocks after len-2, final norms, attn_pool.
    let none: Vec<String> = expected()["full_ft_grad_none_params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(none.len(), 43);
    for n in &none {
        assert!(g(n).is_none(), "{n} must get no gradient");
    }
    // AdamW skips them entirely (no weight decay either) and moves everything else.
    let mut gmap = BTreeMap::new();
    for (n, v) in &params {
        if let Some(t) = grads.get(v) {
            gmap.insert(n.clone(), t.clone());
        }
    }
    let before: BTreeMap<String, Vec<f32>> = params
        .iter()
        .map(|(n, v)| (n.clone(), vec_f32(v.as_tensor())))
        .collect();
    let mut opt = AdamW::new(AdamWConfig::default());
    opt.step(&params, &gmap).unwrap();
    for (n, v) in &params {
        let same = vec_f32(v.as_tensor()) == before[n];
        assert_eq!(
            same,
            none.contains(n),
            "{n}: unchanged after the step = {same}, grad None in the reference = {}",
            none.contains(n)
        );
    }
}

#[test]
fn frozen_modes_make_only_their_parameters_trainable_and_every_one_gets_a_gradient() {
    let batch = fixture_batch();
    for mode in [TrainMode::FrozenVision, TrainMode::LastLayer] {
        let mut obj = objective(mode, None);
        let params: Vec<(String, Var)> = obj.params();
        assert!(!params.is_empty());
        for (n, _) in &params {
            assert!(openvla_train::mode::is_trainable(mode, n, 2), "{mode}: {n}");
        }
        let out = obj.forward(&batch, &mut TrainRng::new(0)).unwrap();
        let grads = out.loss.backward().unwrap();
        let zero = openvla_train::trainer::zero_gradient_params(&params, &grads).unwrap();
        assert!(zero.is_empty(), "{mode}: no gradient for {zero:?}");
    }
}

#[test]
fn modules_agree_with_peft_targeting() {
    let model = load(TrainMode::Lora);
    let modules = model.modules();
    let cfg = model.config().clone();
    let from_names = openvla_train::lora::targets::modules_from_tensors(
        &openvla::synth::checkpoint_tensors(&cfg),
    );
    assert_eq!(modules, from_names, "same modules, same order, same shapes");
    let sel = openvla_train::lora::targets::select_targets(
        &modules,
        &openvla_train::lora::TargetModules::Pattern("all-linear".into()),
        Some(openvla_train::lora::targets::OPENVLA_OUTPUT_EMBEDDING),
    )
    .unwrap();
    assert_eq!(sel.len(), 57);
    assert!(PEFT_PREFIX.starts_with("base_model"));
}

#[test]
fn bf16_storage_stays_close_to_float32() {
    let batch = fixture_batch();
    let dev = Device::Cpu;
    let ids = batch.text.input_ids_tensor(&dev).unwrap();
    let mask = batch.text.attention_mask_tensor(&dev).unwrap();
    let f = load(TrainMode::Lora)
        .forward_train(&batch.pixel_values, &ids, &mask)
        .unwrap();
    let b = OpenVlaTrain::load(
        &tiny_model(),
        LoadTrainOptions {
            mode: TrainMode::Lora,
            storage: WeightStorage::Bf16,
        },
        &dev,
    )
    .unwrap()
    .forward_train(&batch.pixel_values, &ids, &mask)
    .unwrap();
    // The tiny checkpoint is stored in bf16, so bf16 storage loses nothing.
    let e = rel_l2(&vec_f32(&b.logits), &vec_f32(&f.logits));
    assert!(e < 1e-6, "bf16 storage changed the logits: rel-L2 {e:e}");
}

/// `--checkpointing` changes memory, not gradients: for LoRA (with dropout, whose masks the
/// recomputation must replay), full fine-tuning and a frozen-vision mode, the loss and every
/// parameter's gradient equal the plain backward's (to summation order), over two micro-batches
/// of gradient accumulation; and the checkpointed LoRA gradients still match the reference.
#[test]
fn gradient_checkpointing_leaves_gradients_unchanged() {
    let batch = fixture_batch();
    let dev = Device::Cpu;
    let cases: Vec<(&str, TrainMode, Option<f64>)> = vec![
        ("LoRA", TrainMode::Lora, Some(0.0)),
        ("LoRA with dropout", TrainMode::Lora, Some(0.25)),
        ("full", TrainMode::Full, None),
        ("frozen vision", TrainMode::FrozenVision, None),
    ];
    for (what, mode, dropout) in cases {
        let make = || {
            let adapter = dropout.map(|d| {
                let mut a = LoraAdapter::load(&td().join("lora_init"), &dev).unwrap();
                a.config.lora_dropout = d;
                a
            });
            objective(mode, adapter)
        };
        let mut plain = make();
        let mut ckpt = make();
        ckpt.checkpointing = true;
        let (po, pg) = plain
            .forward_backward(&batch, &mut TrainRng::new(5), 2)
            .unwrap();
        let (co, cg) = ckpt
            .forward_backward(&batch, &mut TrainRng::new(5), 2)
            .unwrap();
        assert_rel(
            &format!("{what}: loss"),
            scalar(&co.loss),
            scalar(&po.loss),
            1e-7,
        );
        assert_eq!(co.action_accuracy, po.action_accuracy, "{what}");
        let (pp, cp) = (plain.params(), ckpt.params());
        assert_eq!(pp.len(), cp.len());
        let mut worst = 0f64;
        for ((name, pv), (_, cv)) in pp.iter().zip(&cp) {
            match (pg.get(pv), cg.get(cv)) {
                (Some(a), Some(b)) => {
                    let e = rel_l2(&vec_f32(b), &vec_f32(a));
                    worst = worst.max(e);
                    assert!(e <= 1e-5, "{what}: gradient of {name}: rel-L2 {e:e}");
                }
                (None, None) => {}
                (a, b) => panic!(
                    "{what}: {name} has a gradient plain {} / checkpointed {}",
                    a.is_some(),
                    b.is_some()
                ),
            }
        }
        eprintln!("{what}: worst gradient rel-L2 plain vs checkpointed {worst:e}");
        if dropout == Some(0.0) {
            // Accumulation over 2 halves the gradients; the reference's are for one batch.
            let want = read_safetensors(&td().join("lora_grads.safetensors"), &dev).unwrap();
            for (name, var) in &cp {
                if let (Some(g), Some(w)) = (cg.get(var), want.get(name)) {
                    let g = (g * 2.0).unwrap();
                    let e = rel_l2(&vec_f32(&g), &vec_f32(w));
                    assert!(e <= 1e-4, "checkpointed gradient of {name}: rel-L2 {e:e}");
                }
            }
        }
    }
}
