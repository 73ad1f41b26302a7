//! The training forward computes the same function as the reference's inference on the other
//! model layouts: OpenVLA v0.1 (SigLIP only, 2-layer projector, Vicuna prompt), a grouped-query
//! LLM in a sharded checkpoint, and the tiny fused model, each against the reference's greedy
//! step logits (fixtures under testdata/, the ones the inference engine's golden tests use).

mod common;

use candle_core::{Device, Tensor};
use common::*;
use openvla_train::model::{LoadTrainOptions, OpenVlaTrain, WeightStorage};
use openvla_train::seam::TrainModel;
use openvla_train::TrainMode;

fn check(fixture: &str) {
    let dir = root().join("testdata").join(fixture);
    let model_dir = if dir.join("model").is_dir() {
        dir.join("model")
    } else {
        tiny_model()
    };
    let model = OpenVlaTrain::load(
        &model_dir,
        LoadTrainOptions {
            mode: TrainMode::Full,
            storage: WeightStorage::F32,
        },
        &Device::Cpu,
    )
    .unwrap();
    let (pshape, px) = npy_f32(&dir.join("s0_pixel_values.npy"));
    let (_, prompt) = npy_i64(&dir.join("s0_input_ids.npy"));
    let (_, full) = npy_i64(&dir.join("s0_full_sequence_ids.npy"));
    let (lshape, want) = npy_f32(&dir.join("s0_step_logits.npy"));
    // Teacher-forced: prompt + 29871 + generated[..-1]; the logits at the last 7 text
    // positions are the reference's greedy step logits.
    let ids: Vec<u32> = full[..full.len() - 1].iter().map(|&i| i as u32).collect();
    let t = ids.len();
    let steps = lshape[0];
    assert_eq!(t, prompt.len() + steps);
    let dev = Device::Cpu;
    let out = model
        .forward_train(
            &Tensor::from_vec(px, pshape, &dev).unwrap(),
            &Tensor::from_vec(ids, (1, t), &dev).unwrap(),
            &Tensor::ones((1, t), candle_core::DType::U8, &dev).unwrap(),
        )
        .unwrap();
    assert_eq!(out.offset, model.num_patches());
    let got: Vec<f32> = out
        .logits
        .narrow(1, t - steps, steps)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let max_abs = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("{fixture}: step logits max abs diff {max_abs:e}");
    assert!(
        max_abs < 1e-3,
        "{fixture}: step logits differ by {max_abs:e}"
    );
}

#[test]
fn v01_siglip_only_matches_the_reference() {
    check("ref-v01");
}

#[test]
fn grouped_query_sharded_matches_the_reference() {
    check("ref-gqa-sharded");
}

#[test]
fn tiny_fused_matches_the_reference() {
    check("openvla-tiny");
}

/// One model definition, two code paths: the training forward (explicit norms, softmax, rope)
/// and the inference engine (fused kernels, KV cache) give the same prefill logits.
#[test]
fn training_forward_equals_the_inference_engine() {
    use openvla::checkpoint::{Checkpoint, WeightLoader};
    use openvla::model::linear::{WeightDtype, WeightPolicy};
    for fixture in ["openvla-tiny", "ref-gqa-sharded", "ref-v01"] {
        let dir = root().join("testdata").join(fixture);
        let model_dir = dir.join("model");
        let cfg = openvla::ModelConfig::from_file(&model_dir.join("config.json")).unwrap();
        let ckpt = Checkpoint::open_dir(&model_dir).unwrap();
        let w = WeightLoader::new(&ckpt, Device::Cpu, None);
        let engine =
            openvla::model::OpenVla::load(&w, &cfg, &WeightPolicy::dense(WeightDtype::F32))
                .unwrap();
        let train = OpenVlaTrain::load(
            &model_dir,
            LoadTrainOptions {
                mode: TrainMode::Lora,
                storage: WeightStorage::F32,
            },
            &Device::Cpu,
        )
        .unwrap();
        let (pshape, px) = npy_f32(&dir.join("s0_pixel_values.npy"));
        let px = Tensor::from_vec(px, pshape, &Device::Cpu).unwrap();
        let (_, prompt) = npy_i64(&dir.join("s0_input_ids.npy"));
        let mut ids: Vec<u32> = prompt.iter().map(|&i| i as u32).collect();
        ids.push(29871);
        let t = ids.len();
        let want = engine.generate(&px, &ids, 1).unwrap().step_logits[0].clone();
        let out = train
            .forward_train(
                &px,
                &Tensor::from_vec(ids, (1, t), &Device::Cpu).unwrap(),
                &Tensor::ones((1, t), candle_core::DType::U8, &Device::Cpu).unwrap(),
            )
            .unwrap();
        let got: Vec<f32> = out
            .logits
            .narrow(1, t - 1, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let max_abs = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!("{fixture}: training vs inference prefill logits max abs {max_abs:e}");
        assert!(
            max_abs < 1e-4,
            "{fixture}: training vs inference differ by {max_abs:e}"
        );
    }
}
