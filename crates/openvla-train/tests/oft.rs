//! The OpenVLA-OFT L1 objective (`openvla finetune --head l1`): parity with the reference's
//! loss and gradients, gradient checkpointing, learning, the exported OFT directory, errors.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use openvla::oft::pt::{find_component, StateDict};
use openvla::oft::{ACTION_HEAD, PROPRIO_PROJECTOR};
use openvla_data::source::DatasetSource;
use openvla_data::stats::{DatasetStatistics, StatsAccumulator};
use openvla_data::stream::StreamConfig;
use openvla_train::batch::{ExampleBuilder, TextBatch, PAD_TOKEN_ID};
use openvla_train::data::{first_frames_with, oft_sample};
use openvla_train::lora::targets::{select_targets, OPENVLA_OUTPUT_EMBEDDING};
use openvla_train::lora::{LoraAdapter, LoraConfig, TargetModules};
use openvla_train::model::head::{L1HeadTrain, ProprioProjectorTrain};
use openvla_train::model::{LoadTrainOptions, OpenVlaTrain, WeightStorage};
use openvla_train::oft::{make_oft_batch, OftBatch};
use openvla_train::optim::{AdamW, AdamWConfig};
use openvla_train::rng::TrainRng;
use openvla_train::seam::{L1Objective, TrainModel};
use openvla_train::trainer::Objective;
use openvla_train::TrainMode;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The tiny OFT checkpoint (2 images, 8-D proprio, K = 8, D = 7, LLM width 32).
fn oft_model() -> PathBuf {
    root().join("testdata/openvla-oft-tiny/model")
}

/// The L1 reference golden (made by `tools/reference/oft_l1_ref.py`).
fn ref_dir() -> PathBuf {
    root().join("testdata/oft-train-ref")
}

fn load(mode: TrainMode) -> OpenVlaTrain {
    OpenVlaTrain::load(
        &oft_model(),
        LoadTrainOptions {
            mode,
            storage: WeightStorage::F32,
        },
        &Device::Cpu,
    )
    .unwrap()
}

/// The fixture's action head and proprio projector.
fn fixture_components() -> (L1HeadTrain, ProprioProjectorTrain) {
    let dir = oft_model();
    let head = StateDict::read(&find_component(&dir, ACTION_HEAD).unwrap().unwrap()).unwrap();
    let proj = StateDict::read(&find_component(&dir, PROPRIO_PROJECTOR).unwrap().unwrap()).unwrap();
    (
        L1HeadTrain::from_state_dict(&head, 32, 7).unwrap(),
        ProprioProjectorTrain::from_state_dict(&proj, 8, 32).unwrap(),
    )
}

fn objective(mode: TrainMode, adapter: Option<LoraAdapter>) -> L1Objective<OpenVlaTrain> {
    let model = load(mode);
    let layers = model.config().text.num_hidden_layers;
    let (head, proj) = fixture_components();
    L1Objective::new(
        model,
        |n| openvla_train::mode::is_trainable(mode, n, layers),
        adapter,
        head,
        Some(proj),
        0,
    )
    .unwrap()
}

fn vec_f32(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn l2(a: &[f32]) -> f64 {
    a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt()
}

fn l2_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// The reference golden's batch (B = 2, one padded).
fn ref_batch() -> OftBatch {
    let raw = read_raw(&ref_dir().join("inputs.safetensors"));
    let f = |k: &str| {
        let r = &raw[k];
        Tensor::from_vec(f32s(r), r.1.clone(), &Device::Cpu).unwrap()
    };
    let ids = i64s(&raw["input_ids"]);
    let (b, t) = (raw["input_ids"].1[0], raw["input_ids"].1[1]);
    let text = TextBatch {
        batch: b,
        seq_len: t,
        input_ids: ids.iter().map(|&x| x as u32).collect(),
        labels: i64s(&raw["labels"]),
        attention_mask: ids.iter().map(|&x| x != PAD_TOKEN_ID as i64).collect(),
    };
    OftBatch::from_parts(
        f("pixel_values"),
        text,
        f("actions"),
        Some(f("proprio")),
        31743,
    )
    .unwrap()
}

fn ref_objective() -> L1Objective<OpenVlaTrain> {
    let ad = LoraAdapter::load(&ref_dir().join("lora_adapter"), &Device::Cpu).unwrap();
    assert_eq!(ad.config.scaling(), 2.0);
    objective(TrainMode::Lora, Some(ad))
}

/// Gradients by parameter name (those that got one).
fn grads_of(
    obj: &mut L1Objective<OpenVlaTrain>,
    batch: &OftBatch,
    checkpointing: bool,
) -> (f64, BTreeMap<String, Vec<f32>>) {
    obj.checkpointing = checkpointing;
    let (out, grads) = obj
        .forward_backward(batch, &mut TrainRng::new(1), 1)
        .unwrap();
    let loss = out.loss.to_scalar::<f32>().unwrap() as f64;
    let g = obj
        .params()
        .iter()
        .filter_map(|(n, v)| grads.get(v).map(|g| (n.clone(), vec_f32(g))))
        .collect();
    (loss, g)
}

#[test]
fn loss_and_gradients_match_the_reference() {
    if !ref_dir().join("inputs.safetensors").is_file() {
        panic!(
            "{} is missing (the golden of tools/reference/oft_l1_ref.py)",
            ref_dir().display()
        );
    }
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ref_dir().join("expected.json")).unwrap())
            .unwrap();
    let batch = ref_batch();
    let mut obj = ref_objective();
    let (loss, grads) = grads_of(&mut obj, &batch, false);
    let want = expected["loss"].as_f64().unwrap();
    let rel = ((loss - want) / want).abs();
    eprintln!("L1 loss {loss} vs reference {want} (relative {rel:e})");
    assert!(rel <= 1e-5, "loss {loss} vs {want}: {rel:e}");
    // The causal control is far away: the bidirectional mask matters.
    let causal = expected["causal_control_loss"].as_f64().unwrap();
    assert!(((loss - causal) / causal).abs() > 1e-2);

    let golden =
        candle_core::safetensors::load(ref_dir().join("grads.safetensors"), &Device::Cpu).unwrap();
    let without: Vec<String> = expected["trainable_without_grad"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let params = obj.params();
    assert_eq!(
        params.len(),
        golden.len() + without.len(),
        "every trainable tensor is in the golden (with a gradient or without)"
    );
    let mut worst = (0f64, String::new());
    for (name, _) in &params {
        match golden.get(name) {
            Some(g) => {
                let want = vec_f32(g);
                let got = grads
                    .get(name)
                    .unwrap_or_else(|| panic!("{name}: no gradient"));
                let r = l2_diff(got, &want) / l2(&want);
                if r > worst.0 {
                    worst = (r, name.clone());
                }
                assert!(r <= 1e-4, "{name}: gradient off by {r:e} of its norm");
            }
            None => {
                assert!(without.contains(name), "{name} is not in the golden");
                if let Some(g) = grads.get(name) {
                    assert_eq!(l2(g), 0.0, "{name} must get no gradient");
                }
            }
        }
    }
    eprintln!("worst gradient: {:e} of its norm ({})", worst.0, worst.1);
}

#[test]
fn checkpointing_gives_the_same_gradients() {
    let batch = ref_batch();
    let mut obj = ref_objective();
    let (plain_loss, plain) = grads_of(&mut obj, &batch, false);
    let (ck_loss, ck) = grads_of(&mut obj, &batch, true);
    assert_eq!(plain_loss.to_bits(), ck_loss.to_bits(), "same forward");
    assert_eq!(
        plain.keys().collect::<Vec<_>>(),
        ck.keys().collect::<Vec<_>>()
    );
    // Head, projector and LoRA of every stage (towers, projector, LLM) are compared.
    assert!(plain.keys().any(|k| k.starts_with("action_head.")));
    assert!(plain.keys().any(|k| k.starts_with("proprio_projector.")));
    assert!(plain.keys().any(|k| k.contains("featurizer.blocks.0")));
    assert!(plain
        .keys()
        .any(|k| k.contains("language_model.model.layers.0")));
    for (name, g) in &plain {
        let r = l2_diff(g, &ck[name]) / l2(g).max(1e-30);
        assert!(r <= 1e-5, "{name}: checkpointed gradient off by {r:e}");
    }
}

/// The LIBERO test data (RLDS, 12 episodes, with the wrist camera and the 8-D state).
fn libero() -> (DatasetSource, DatasetStatistics) {
    let source = DatasetSource::open(
        &root().join("testdata/data/rlds"),
        Some("libero_spatial_no_noops"),
        None,
    )
    .unwrap();
    let stats = source
        .compute_statistics(
            "all",
            false,
            None,
            None,
            StatsAccumulator::new().with_proprio(),
        )
        .unwrap();
    (source, stats)
}

/// The first frame of each of the first `n` LIBERO episodes with chunks of `k`, both cameras
/// and proprio, as one batch for the fixture model.
fn libero_batch(n: usize, k: usize) -> OftBatch {
    let (source, stats) = libero();
    let pre =
        openvla_image::PreprocessorConfig::from_file(&oft_model().join("preprocessor_config.json"))
            .unwrap();
    let samples: Vec<_> = first_frames_with(
        &source,
        stats,
        n,
        StreamConfig {
            action_chunk: k,
            wrist: true,
            proprio: true,
            ..Default::default()
        },
    )
    .unwrap()
    .into_iter()
    .map(|s| oft_sample(s, &pre).unwrap())
    .collect();
    let tok = openvla::processor::PromptTokenizer::from_file(&oft_model().join("tokenizer.json"))
        .unwrap();
    let builder = ExampleBuilder::new(&tok, openvla::config::PromptStyle::Pure, 256, 32000);
    make_oft_batch(&builder, &samples, k, &Device::Cpu).unwrap()
}

fn lora_adapter(model: &OpenVlaTrain, r: usize, seed: u64) -> LoraAdapter {
    let modules = model.modules();
    let t = TargetModules::Pattern("all-linear".into());
    let sel = select_targets(&modules, &t, Some(OPENVLA_OUTPUT_EMBEDDING)).unwrap();
    let mut lc = LoraConfig::finetune_default(r, None, 0.0);
    lc.target_modules = TargetModules::List(sel.iter().map(|m| m.name.clone()).collect());
    LoraAdapter::init(lc, &sel, &mut TrainRng::new(seed), &Device::Cpu).unwrap()
}

#[test]
fn the_l1_head_memorizes_eight_episodes() {
    let batch = libero_batch(8, 8);
    assert_eq!(batch.pixel_values.dims(), [8, 12, 224, 224]);
    assert_eq!(batch.actions.dims(), [8, 8, 7]);
    assert_eq!(batch.proprio.as_ref().unwrap().dims(), [8, 8]);
    let model = load(TrainMode::Lora);
    let ad = lora_adapter(&model, 8, 3);
    let mut rng = TrainRng::new(11);
    // A fresh head and projector, initialized as the reference's modules are.
    let proj = ProprioProjectorTrain::init(8, 32, &mut rng).unwrap();
    let head = L1HeadTrain::init(32, 7, &mut rng).unwrap();
    let mut obj = L1Objective::new(model, |_| false, Some(ad), head, Some(proj), 5).unwrap();
    let params = obj.params();
    let mut opt = AdamW::new(AdamWConfig {
        lr: 3e-3,
        ..AdamWConfig::default()
    });
    let mut losses = Vec::new();
    let t0 = std::time::Instant::now();
    for step in 1..=400 {
        let (out, grads) = obj.forward_backward(&batch, &mut rng, 1).unwrap();
        let loss = out.loss.to_scalar::<f32>().unwrap() as f64;
        losses.push(loss);
        if std::env::var_os("OPENVLA_TRAIN_VERBOSE").is_some() {
            eprintln!(
                "step {step}: L1 {loss:.4} (current {:.4}, next {:.4}) {:.1}s",
                out.action_l1_loss.unwrap(),
                out.next_actions_l1_loss.unwrap(),
                t0.elapsed().as_secs_f64()
            );
        }
        if loss < 0.01 {
            eprintln!(
                "L1 {:.4} -> {loss:.4} after {step} steps ({:.1} s)",
                losses[0],
                t0.elapsed().as_secs_f64()
            );
            return;
        }
        let g: BTreeMap<String, Tensor> = params
            .iter()
            .filter_map(|(n, v)| grads.get(v).map(|g| (n.clone(), g.clone())))
            .collect();
        opt.step(&params, &g).unwrap();
    }
    panic!("no L1 < 0.01 after 400 steps: {losses:?}");
}

#[allow(dead_code)]
fn var_names(v: &[(String, Var)]) -> Vec<&str> {
    v.iter().map(|(n, _)| n.as_str()).collect()
}
