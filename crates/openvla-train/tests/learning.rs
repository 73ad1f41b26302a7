//! Learning works: LoRA and full fine-tuning of the tiny OpenVLA memorize one frame of each of
//! 16 episodes of a real RLDS dataset (fractal, BOUNDS_Q99-normalized with its own statistics)
//! to 100% action-token accuracy.

mod common;

use candle_core::Device;
use common::*;
use openvla::processor::PromptTokenizer;
use openvla_data::source::DatasetSource;
use openvla_data::stats::StatsAccumulator;
use openvla_train::batch::ExampleBuilder;
use openvla_train::data::first_frames;
use openvla_train::lora::targets::{select_targets, OPENVLA_OUTPUT_EMBEDDING};
use openvla_train::lora::{LoraAdapter, LoraConfig, TargetModules};
use openvla_train::model::{LoadTrainOptions, OpenVlaTrain, WeightStorage};
use openvla_train::optim::{AdamW, AdamWConfig};
use openvla_train::rng::TrainRng;
use openvla_train::seam::{make_batch, TrainModel, VlaBatch, VlaObjective, VlaSample};
use openvla_train::trainer::Objective;
use openvla_train::TrainMode;
use std::collections::BTreeMap;

/// The first frame of each of the first 16 episodes, as one batch.
fn sixteen_episodes() -> VlaBatch {
    let source = DatasetSource::open(
        &root().join("testdata/data/rlds/fractal20220817_data"),
        None,
        None,
    )
    .unwrap();
    let stats = source
        .compute_statistics("all", false, None, None, StatsAccumulator::new())
        .unwrap();
    let pre = openvla_image::PreprocessorConfig::from_file(
        &tiny_model().join("preprocessor_config.json"),
    )
    .unwrap();
    let samples: Vec<VlaSample> = first_frames(&source, stats, 16)
        .unwrap()
        .into_iter()
        .map(|s| {
            let img =
                openvla_image::RgbImage::from_raw(s.image.width, s.image.height, s.image.data)
                    .unwrap();
            VlaSample {
                pixel_values: openvla_image::preprocess(&img, &pre).unwrap(),
                instruction: s.instruction,
                action: s.action,
            }
        })
        .collect();
    let tok = PromptTokenizer::from_file(&tiny_model().join("tokenizer.json")).unwrap();
    let builder = ExampleBuilder::new(&tok, openvla::config::PromptStyle::Pure, 256, 32000);
    make_batch(&builder, &samples, &Device::Cpu).unwrap()
}

/// Trains on the batch until every action token is predicted; returns the steps taken.
fn overfit(mode: TrainMode, lr: f64, max_steps: usize) -> (usize, Vec<f64>) {
    let batch = sixteen_episodes();
    let model = OpenVlaTrain::load(
        &tiny_model(),
        LoadTrainOptions {
            mode,
            storage: WeightStorage::F32,
        },
        &Device::Cpu,
    )
    .unwrap();
    let cfg = model.config().clone();
    let adapter = (mode == TrainMode::Lora).then(|| {
        let modules = model.modules();
        let t = TargetModules::Pattern("all-linear".into());
        let sel = select_targets(&modules, &t, Some(OPENVLA_OUTPUT_EMBEDDING)).unwrap();
        let mut lc = LoraConfig::finetune_default(32, None, 0.0);
        lc.target_modules = TargetModules::List(sel.iter().map(|m| m.name.clone()).collect());
        LoraAdapter::init(lc, &sel, &mut TrainRng::new(5), &Device::Cpu).unwrap()
    });
    let mut obj = VlaObjective::new(
        model,
        |n| openvla_train::mode::is_trainable(mode, n, cfg.text.num_hidden_layers),
        adapter,
        openvla::action::ActionTokenizer::new(cfg.n_action_bins, cfg.action_vocab_size),
        1,
    )
    .unwrap();
    let params = obj.params();
    let mut opt = AdamW::new(AdamWConfig {
        lr,
        ..AdamWConfig::default()
    });
    let mut rng = TrainRng::new(2);
    let mut losses = Vec::new();
    for step in 1..=max_steps {
        let out = obj.forward(&batch, &mut rng).unwrap();
        let loss = out.loss.to_scalar::<f32>().unwrap() as f64;
        losses.push(loss);
        let acc = out.action_accuracy.unwrap();
        if std::env::var_os("OPENVLA_TRAIN_VERBOSE").is_some() {
            eprintln!("{mode} step {step}: loss {loss:.4} acc {acc:.3}");
        }
        if acc == 1.0 {
            return (step, losses);
        }
        let grads = out.loss.backward().unwrap();
        let g: BTreeMap<_, _> = params
            .iter()
            .filter_map(|(n, v)| grads.get(v).map(|g| (n.clone(), g.clone())))
            .collect();
        opt.step(&params, &g).unwrap();
    }
    panic!("{mode}: no 100% action accuracy after {max_steps} steps; losses {losses:?}");
}

#[test]
fn lora_memorizes_sixteen_episodes() {
    let (steps, losses) = overfit(TrainMode::Lora, 6e-3, 150);
    eprintln!(
        "LoRA: 100% action accuracy after {steps} steps, loss {:.3} -> {:.3}",
        losses[0],
        losses[losses.len() - 1]
    );
    assert!(losses[losses.len() - 1] < losses[0] / 3.0);
}

#[test]
fn full_finetuning_memorizes_sixteen_episodes() {
    let (steps, losses) = overfit(TrainMode::Full, 2e-3, 150);
    eprintln!(
        "full: 100% action accuracy after {steps} steps, loss {:.3} -> {:.3}",
        losses[0],
        losses[losses.len() - 1]
    );
    assert!(losses[losses.len() - 1] < losses[0] / 3.0);
}
