//! The VLA objective end to end on a toy stand-in model that implements the model seam
//! (`TrainModel`): real batches (tokenizer, action ids, collator), real loss and metrics,
//! LoRA injection into Linear and Conv2d modules, AdamW, the trainer. Proves that every LoRA
//! parameter receives a gradient and that LoRA and full fine-tuning overfit a few samples to
//! 100% action-token accuracy. The real model replaces `ToyVla` later.

mod common;

use common::toy::ToyVla;

const PATCH: usize = 4;
const IMG: usize = 8;
const NP: usize = (IMG / PATCH) * (IMG / PATCH);

use candle_core::{DType, Device, Tensor, D};
use common::*;
use openvla::action::ActionTokenizer;
use openvla::config::PromptStyle;
use openvla::processor::PromptTokenizer;
use openvla_image::PixelValues;
use openvla_train::batch::ExampleBuilder;
use openvla_train::lora::targets::{select_targets, OPENVLA_OUTPUT_EMBEDDING};
use openvla_train::lora::{LoraAdapter, LoraConfig, TargetModules};
use openvla_train::rng::TrainRng;
use openvla_train::seam::{make_batch, TrainModel, VlaBatch, VlaObjective, VlaSample};
use openvla_train::trainer::{train, zero_gradient_params, DataSource, Objective, TrainerConfig};
use openvla_train::{AdamWConfig, Result, TrainMode};

fn samples() -> Vec<VlaSample> {
    let mut r = TrainRng::new(17);
    let ins = [
        "pick up the red block",
        "Put the Carrot in the Bowl",
        "open the drawer",
        "wipe the table",
    ];
    ins.iter()
        .map(|i| VlaSample {
            pixel_values: PixelValues {
                channels: 6,
                height: IMG,
                width: IMG,
                data: (0..6 * IMG * IMG).map(|_| r.normal() as f32).collect(),
            },
            instruction: i.to_string(),
            action: (0..7).map(|_| (r.next_f64() * 2.0 - 1.0) as f32).collect(),
        })
        .collect()
}

struct Fixed(VlaBatch, u64);

impl DataSource for Fixed {
    type Batch = VlaBatch;
    fn next_batch(&mut self) -> Result<VlaBatch> {
        self.1 += 1;
        Ok(self.0.clone())
    }
    fn position(&self) -> serde_json::Value {
        serde_json::json!(self.1)
    }
    fn seek(&mut self, p: &serde_json::Value) -> Result<()> {
        self.1 = p.as_u64().unwrap_or(0);
        Ok(())
    }
}

fn batch() -> VlaBatch {
    let tok = PromptTokenizer::from_file(&tiny_model().join("tokenizer.json")).unwrap();
    let builder = ExampleBuilder::new(&tok, PromptStyle::Pure, 256, 32000);
    make_batch(&builder, &samples(), &Device::Cpu).unwrap()
}

fn lora_objective(r: usize) -> VlaObjective<ToyVla> {
    let model = ToyVla::new(1, PATCH, IMG);
    let modules = model.modules();
    let targets = select_targets(
        &modules,
        &TargetModules::Pattern("all-linear".into()),
        Some(OPENVLA_OUTPUT_EMBEDDING),
    )
    .unwrap();
    assert_eq!(
        targets.len(),
        5,
        "conv `proj` (matched through the Linear `projector.proj`), projector, up, down, lm_head"
    );
    let mut cfg = LoraConfig::finetune_default(r, None, 0.0);
    cfg.target_modules = TargetModules::List(
        targets
            .iter()
            .map(|m| m.name.rsplit('.').next().unwrap().to_string())
            .collect(),
    );
    let adapter = LoraAdapter::init(cfg, &targets, &mut TrainRng::new(3), &Device::Cpu).unwrap();
    VlaObjective::new(
        model,
        |_| false,
        Some(adapter),
        ActionTokenizer::new(256, 32000),
        5,
    )
    .unwrap()
}

#[test]
fn every_lora_parameter_receives_a_gradient() {
    let mut obj = lora_objective(4);
    let b = batch();
    let mut rng = TrainRng::new(0);
    let params = obj.params();
    assert_eq!(params.len(), 10);
    // With B = 0 (PEFT init) only B gets a gradient; after one step A does too.
    let out = obj.forward(&b, &mut rng).unwrap();
    let grads = out.loss.backward().unwrap();
    let zero = zero_gradient_params(&params, &grads).unwrap();
    assert!(
        zero.iter().all(|n| n.ends_with("lora_A.weight")) && zero.len() == 5,
        "{zero:?}"
    );
    let mut opt = openvla_train::AdamW::new(AdamWConfig::default());
    let g: std::collections::BTreeMap<_, _> = params
        .iter()
        .filter_map(|(n, v)| grads.get(v).map(|g| (n.clone(), g.clone())))
        .collect();
    opt.step(&params, &g).unwrap();
    let out = obj.forward(&b, &mut rng).unwrap();
    let grads = out.loss.backward().unwrap();
    assert!(zero_gradient_params(&params, &grads).unwrap().is_empty());
    // The base stays frozen: no base Var is in the trained set.
    assert!(params.iter().all(|(n, _)| n.contains(".lora_")));
}

fn overfit(mut obj: VlaObjective<ToyVla>, lr: f64, steps: u64) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let mut data = Fixed(batch(), 0);
    let cfg = TrainerConfig {
        run_dir: dir.path().to_path_buf(),
        max_steps: steps,
        grad_accumulation: 1,
        save_interval: steps,
        keep_last: 1,
        adamw: AdamWConfig {
            lr,
            ..AdamWConfig::default()
        },
        schedule: openvla_train::schedule::LrSchedule::constant(),
        seed: 1,
        progress: false,
        fingerprint: serde_json::json!({}),
        stop_after: None,
    };
    train(&mut obj, &mut data, &cfg, false).unwrap();
    let recs = openvla_train::log::read_metrics(&dir.path().join("metrics.jsonl")).unwrap();
    let last = recs.last().unwrap();
    let first_full = recs
        .iter()
        .find(|r| r.action_accuracy == Some(1.0))
        .map(|r| r.step);
    eprintln!("first step at 100% accuracy: {first_full:?}");
    eprintln!(
        "step {} loss {:.4} acc {:?}",
        last.step, last.loss, last.action_accuracy
    );
    if obj.backbone.adapter.is_some() {
        // The checkpoint carries a PEFT adapter that loads back.
        let ck = openvla_train::checkpoint::latest_checkpoint(dir.path())
            .unwrap()
            .unwrap()
            .1;
        LoraAdapter::load(&ck.join("adapter"), &Device::Cpu).unwrap();
    }
    let b = batch();
    let out = obj
        .backbone
        .model
        .forward_train(
            &b.pixel_values,
            &b.text.input_ids_tensor(&Device::Cpu).unwrap(),
            &b.text.attention_mask_tensor(&Device::Cpu).unwrap(),
        )
        .unwrap();
    openvla_train::metrics::action_metrics(&out.logits, &b.text, NP, 0, &obj.action_tokenizer)
        .unwrap()
        .action_accuracy
}

#[test]
fn lora_overfits_to_full_action_accuracy() {
    let acc = overfit(lora_objective(16), 1e-2, 70);
    assert_eq!(acc, 1.0);
}

#[test]
fn full_finetuning_overfits_to_full_action_accuracy() {
    let model = ToyVla::new(1, PATCH, IMG);
    let obj = VlaObjective::new(
        model,
        |n| openvla_train::mode::is_trainable(TrainMode::Full, n, 1),
        None,
        ActionTokenizer::new(256, 32000),
        5,
    )
    .unwrap();
    assert_eq!(obj.params().len(), 7);
    let acc = overfit(obj, 5e-3, 70);
    assert_eq!(acc, 1.0);
}

#[test]
fn argmax_ignores_dtype() {
    // Metrics work on bf16 logits too (upcast only for the loss).
    let t = Tensor::new(&[[[0.0f32, 2.0, 1.0]]], &Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    assert_eq!(
        t.argmax(D::Minus1).unwrap().to_vec2::<u32>().unwrap(),
        vec![vec![1]]
    );
}
