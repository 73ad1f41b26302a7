//! Trainable-parameter selection per mode and the memory estimate.

mod common;

use common::*;
use openvla::ModelConfig;
use openvla_train::lora::TargetModules;
use openvla_train::memory::{check_fits, estimate, MemoryInputs};
use openvla_train::mode::{is_trainable, trainable_names};
use openvla_train::TrainMode;

fn names(cfg: &ModelConfig) -> Vec<String> {
    openvla::synth::checkpoint_tensors(cfg)
        .into_iter()
        .map(|t| t.0)
        .collect()
}

fn config_7b() -> ModelConfig {
    let raw: openvla::config::RawConfig =
        serde_json::from_value(openvla::synth::SynthShape::OpenVla7b.config_json()).unwrap();
    ModelConfig::from_raw(std::path::Path::new("7b/config.json"), raw).unwrap()
}

#[test]
fn modes_select_prismatic_stage_parameters() {
    let cfg = ModelConfig::from_file(&tiny_model().join("config.json")).unwrap();
    let all = names(&cfg);
    let layers = cfg.text.num_hidden_layers;
    assert_eq!(all.len(), 156);
    let sel = |m| trainable_names(m, all.iter().map(|s| s.as_str()), layers);
    assert!(sel(TrainMode::Lora).is_empty());
    assert_eq!(sel(TrainMode::Full).len(), 156);
    let fv = sel(TrainMode::FrozenVision);
    assert!(fv
        .iter()
        .all(|n| n.starts_with("projector.") || n.starts_with("language_model.")));
    assert!(fv.contains(&"language_model.model.embed_tokens.weight"));
    assert_eq!(fv.len(), 6 + 1 + 2 * 9 + 2);
    let ll = sel(TrainMode::LastLayer);
    let mut want_ll: Vec<&str> = vec![
        "language_model.model.embed_tokens.weight",
        "language_model.lm_head.weight",
    ];
    for p in [
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
    ] {
        want_ll.push(Box::leak(
            format!("language_model.model.layers.1.{p}").into_boxed_str(),
        ));
    }
    let mut a = ll.clone();
    a.sort();
    want_ll.sort();
    assert_eq!(a, want_ll);
    assert!(!is_trainable(
        TrainMode::LastLayer,
        "language_model.model.layers.0.mlp.up_proj.weight",
        layers
    ));
    assert!(!is_trainable(
        TrainMode::LastLayer,
        "language_model.model.norm.weight",
        layers
    ));
    let sw = sel(TrainMode::Sandwich);
    let vision = all
        .iter()
        .filter(|n| n.starts_with("vision_backbone."))
        .count();
    assert_eq!(sw.len(), vision + 6 + ll.len());
    assert!(sw.contains(&"vision_backbone.fused_featurizer.attn_pool.q.weight"));
    // layers.1 must not match layers.10+ of a deeper model.
    assert!(!is_trainable(
        TrainMode::LastLayer,
        "language_model.model.layers.10.mlp.up_proj.weight",
        2
    ));
}

#[test]
fn memory_estimate_of_the_7b() {
    let cfg = config_7b();
    let inp = |mode, batch| MemoryInputs {
        config: &cfg,
        mode,
        lora_rank: 32,
        lora_targets: TargetModules::Pattern("all-linear".into()),
        batch_size: batch,
        text_tokens: 40,
        images: 1,
        weight_bytes: 2,
        activation_bytes: 2,
        checkpointing: false,
    };
    let lora = estimate(&inp(TrainMode::Lora, 16)).unwrap();
    assert_eq!(lora.total_params, 7_541_237_184);
    assert_eq!(lora.trainable_params, 110_828_288);
    assert_eq!(lora.gradients, 110_828_288 * 4);
    assert_eq!(lora.optimizer, 110_828_288 * 8);
    eprintln!("7B LoRA r=32 b16 bf16: {}", lora.describe());
    let full = estimate(&inp(TrainMode::Full, 1)).unwrap();
    assert_eq!(full.trainable_params, full.total_params);
    eprintln!("7B full b1: {}", full.describe());
    // Frozen vision keeps no vision activations; more samples, more activations.
    let fv = estimate(&inp(TrainMode::FrozenVision, 16)).unwrap();
    let lora1 = estimate(&inp(TrainMode::Lora, 1)).unwrap();
    assert!(fv.activations < lora.activations);
    let diff = lora.activations as i64 - 16 * lora1.activations as i64;
    assert!(
        diff.abs() <= 16,
        "activations scale with the batch ({diff} bytes off)"
    );
    let e = check_fits(&full, 80 << 30, "7B full fine-tuning")
        .unwrap_err()
        .to_string();
    assert!(e.contains("7B full fine-tuning needs about"), "{e}");
    check_fits(&lora1, 80 << 30, "7B LoRA b1").unwrap();
}

#[test]
fn checkpointing_shrinks_the_activation_estimate() {
    let cfg = config_7b();
    let inp = |batch, checkpointing| MemoryInputs {
        config: &cfg,
        mode: TrainMode::Lora,
        lora_rank: 32,
        lora_targets: TargetModules::Pattern("all-linear".into()),
        batch_size: batch,
        text_tokens: 40,
        images: 1,
        weight_bytes: 2,
        activation_bytes: 4,
        checkpointing,
    };
    let plain = estimate(&inp(1, false)).unwrap();
    let ckpt = estimate(&inp(1, true)).unwrap();
    eprintln!("7B LoRA b1 bf16 plain:         {}", plain.describe());
    eprintln!("7B LoRA b1 bf16 checkpointing: {}", ckpt.describe());
    // Same weights, gradients and moments; activations: block inputs + one block's graph.
    assert_eq!(
        (ckpt.weights, ckpt.gradients, ckpt.optimizer),
        (plain.weights, plain.gradients, plain.optimizer)
    );
    assert!(ckpt.activations * 10 < plain.activations);
    let (v, l) = openvla_train::memory::checkpointed_activation_elems(&cfg, 40);
    let (pv, pl) = openvla_train::memory::activation_elems(&cfg, 40);
    assert!(v < pv && l < pl);
    // The 7B LoRA step at batch 1 fits a 24 GiB machine only with checkpointing.
    assert!(check_fits(&plain, 24 << 30, "7B LoRA b1").is_err());
    check_fits(&ckpt, 24 << 30, "7B LoRA b1 with --checkpointing").unwrap();
}
