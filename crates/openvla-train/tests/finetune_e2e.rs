//! `finetune_with_model` end to end on real RLDS data with the toy model: statistics, stream,
//! LoRA init and injection, training, checkpoints with the PEFT adapter, final adapter with
//! statistics, and an exact resume of the whole pipeline.

mod common;

use candle_core::Device;
use common::toy::ToyVla;
use common::*;
use openvla_train::cli::{finetune_with_model, FinetuneArgs, Precision};
use openvla_train::log::read_metrics;
use openvla_train::TrainMode;
use std::path::Path;

fn args(out: &Path, max_steps: u64) -> FinetuneArgs {
    FinetuneArgs {
        model: tiny_model(),
        data: root().join("testdata/data/rlds/bridge_orig"),
        dataset: None,
        dataset_config: None,
        out: out.to_path_buf(),
        mode: TrainMode::Lora,
        lora_rank: 4,
        lora_alpha: None,
        lora_dropout: 0.1,
        target_modules: "all-linear".into(),
        lr: 1e-3,
        weight_decay: 0.01,
        batch_size: 2,
        grad_accumulation: 2,
        max_steps,
        save_interval: 2,
        keep_last: 1,
        image_aug: true,
        shuffle_buffer: 16,
        checkpointing: false,
        seed: 3,
        precision: Precision::F32,
        compute: Default::default(),
        resume: false,
        max_memory_gb: None,
        no_memory_check: false,
        export_dtype: Default::default(),
        export_max_shard_gb: 5.0,
        export_checkpoints: false,
        lr_schedule: openvla_train::schedule::LrScheduleKind::Constant,
        warmup_steps: 0,
        head: openvla_train::cli::HeadArg::Bins256,
        chunk: None,
        images: "primary".into(),
        proprio: false,
        normalization: openvla_train::cli::NormalizationArg::BoundsQ99,
        aux_environment_state: None,
    }
}

fn losses(dir: &Path) -> Vec<u64> {
    read_metrics(&dir.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .map(|r| r.loss.to_bits())
        .collect()
}

#[test]
fn finetune_runs_saves_peft_adapter_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("full");
    let out = finetune_with_model(&args(&full, 6), ToyVla::new(1, 14, 224), &Device::Cpu).unwrap();
    assert_eq!(out.step, 6);
    assert_eq!(losses(&full).len(), 6);
    assert_files(
        &full,
        &[
            "run.json",
            "metrics.jsonl",
            "curves.svg",
            "dataset_statistics.json",
            "adapter/adapter_config.json",
            "adapter/adapter_model.safetensors",
            "adapter/dataset_statistics.json",
            "checkpoints/step-00000006/adapter/adapter_model.safetensors",
            "checkpoints/step-00000006/state.json",
        ],
    );
    let stats: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(full.join("adapter/dataset_statistics.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        stats["bridge_orig"]["action"]["q01"]
            .as_array()
            .unwrap()
            .len(),
        7
    );
    let ad = openvla_train::lora::LoraAdapter::load(&full.join("adapter"), &Device::Cpu).unwrap();
    assert_eq!(ad.config.r, 4);
    assert_eq!(ad.config.lora_alpha, 4.0);

    // 4 steps, then resume to 6: the same curve, bit for bit (data stream, augmentation,
    // dropout masks, AdamW state).
    let part = tmp.path().join("part");
    finetune_with_model(&args(&part, 4), ToyVla::new(1, 14, 224), &Device::Cpu).unwrap();
    let mut a = args(&part, 6);
    a.resume = true;
    let out = finetune_with_model(&a, ToyVla::new(1, 14, 224), &Device::Cpu).unwrap();
    assert_eq!(out.resumed_from, 4);
    assert_eq!(losses(&part), losses(&full));
}
