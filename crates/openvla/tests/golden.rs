//! Golden tests against the reference implementation, stage by stage.
//!
//! Each fixture directory under `testdata/` holds an HF model directory and, per sample, the
//! reference's outputs at every stage (see its `manifest.json`). Every stage is fed the
//! reference's own input for that stage, so a failure names the stage that is wrong:
//!
//! | stage | tolerance |
//! |---|---|
//! | tokenizer (prompt ids) | identical |
//! | pixel_values | max abs diff <= 1e-6 |
//! | DINO / SigLIP / fused / projector features, LLM input embeddings | max abs diff <= 1e-4 x max abs |
//! | per-step logits | max abs diff <= 1e-3 |
//! | generated ids | identical |
//! | actions (end to end) | max abs diff <= 1e-9 |

use candle_core::{DType, Device, Tensor};
use openvla::{LoadOptions, Observation, Policy, Precision};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata")
        .join(name)
}

fn npy(dir: &Path, file: &str) -> Tensor {
    Tensor::read_npy(dir.join(file)).unwrap_or_else(|e| panic!("reading {file}: {e}"))
}

fn max_abs(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor, what: &str) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    assert_eq!(a.dims(), b.dims(), "{what}: element counts differ");
    max_abs(&(a - b).unwrap())
}

/// Asserts `max|a-b| <= rel * max|b|`.
fn assert_rel(a: &Tensor, golden: &Tensor, rel: f64, what: &str) {
    let d = max_abs_diff(a, golden, what);
    let scale = max_abs(golden).max(1e-12);
    assert!(
        d <= rel * scale,
        "stage {what}: max abs diff {d:.3e} exceeds {rel:e} x max abs {scale:.3e}"
    );
}

fn assert_abs(a: &Tensor, golden: &Tensor, tol: f64, what: &str) {
    let d = max_abs_diff(a, golden, what);
    assert!(
        d <= tol,
        "stage {what}: max abs diff {d:.3e} exceeds {tol:e}"
    );
}

fn ids(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect()
}

/// Runs every sample of a fixture through every stage.
fn check_fixture(name: &str, precision: Precision) {
    let dir = testdata(name);
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let policy = Policy::load(
        &dir.join("model"),
        &LoadOptions {
            precision,
            progress: None,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{name}: loading the model failed: {e}"));
    let model = policy.model();
    let samples = manifest["samples"].as_array().expect("samples");
    assert!(!samples.is_empty());
    for s in samples {
        let i = s["index"].as_u64().unwrap();
        let files = &s["files"];
        let f = |k: &str| files[k].as_str().map(|x| x.to_string());
        let tag = |stage: &str| format!("{name} sample {i}: {stage}");
        let instruction = s["instruction"].as_str().unwrap();
        let unnorm_key = s["unnorm_key"].as_str();

        // Tokenizer.
        let golden_ids = ids(&npy(&dir, &f("input_ids").unwrap()));
        assert_eq!(
            policy.prompt_ids(instruction).unwrap(),
            golden_ids,
            "{}",
            tag("tokenizer")
        );

        // Processor.
        let image = openvla_image::open(&dir.join(f("image").unwrap())).unwrap();
        let golden_pixels = npy(&dir, &f("pixel_values").unwrap());
        let pixels = policy.preprocess_image(&image).unwrap();
        assert_abs(&pixels, &golden_pixels, 1e-6, &tag("pixel_values"));

        // Vision towers, from the reference's pixel_values.
        let features = model.vision.forward(&golden_pixels).unwrap();
        let tower_files: Vec<&str> = if features.per_tower.len() == 2 {
            vec!["dino_features", "siglip_features"]
        } else {
            vec!["siglip_features"]
        };
        for (t, file) in features.per_tower.iter().zip(&tower_files) {
            assert_rel(t, &npy(&dir, &f(file).unwrap()), 1e-4, &tag(file));
        }
        let golden_vision = npy(&dir, &f("vision_features").unwrap());
        assert_rel(
            &features.fused,
            &golden_vision,
            1e-4,
            &tag("fused vision_features"),
        );

        // Projector, from the reference's vision features.
        let projected = model.projector.forward(&golden_vision).unwrap();
        let golden_projected = npy(&dir, &f("projector_features").unwrap());
        assert_rel(
            &projected,
            &golden_projected,
            1e-4,
            &tag("projector_features"),
        );

        // Multimodal splice.
        let mut input_ids = golden_ids.clone();
        if input_ids.last() != Some(&29871) {
            input_ids.push(29871);
        }
        let embeds = model.splice(&golden_projected, &input_ids).unwrap();
        let golden_embeds = npy(&dir, &f("llm_inputs_embeds").unwrap());
        assert_rel(&embeds, &golden_embeds, 1e-4, &tag("llm_inputs_embeds"));

        // LLM greedy decoding, from the reference's embeddings.
        let action_dim = s["action_dim"].as_u64().unwrap() as usize;
        let out = model.decode_greedy(&golden_embeds, action_dim).unwrap();
        let (step_logits, generated) = (out.step_logits, out.generated);
        let golden_logits = npy(&dir, &f("step_logits").unwrap());
        let flat: Vec<f32> = step_logits.concat();
        let ours = Tensor::from_vec(flat, golden_logits.dims(), &Device::Cpu).unwrap();
        assert_abs(&ours, &golden_logits, 1e-3, &tag("step_logits"));
        let golden_generated = ids(&npy(&dir, &f("generated_ids").unwrap()));
        assert_eq!(generated, golden_generated, "{}", tag("generated ids"));

        // End to end: image + instruction -> actions.
        let prediction = policy
            .predict(
                &[Observation::new(image, instruction.to_string())],
                unnorm_key,
            )
            .unwrap()
            .remove(0);
        assert_eq!(
            prediction.token_ids,
            golden_generated,
            "{}",
            tag("end-to-end token ids")
        );
        let golden_norm = npy(&dir, &f("normalized_actions").unwrap());
        let golden_actions = npy(&dir, &f("actions").unwrap());
        let t = |v: &[f64]| Tensor::from_slice(v, v.len(), &Device::Cpu).unwrap();
        assert_abs(
            &t(prediction.normalized_action()),
            &golden_norm,
            1e-9,
            &tag("normalized_actions"),
        );
        assert_abs(
            &t(prediction.action()),
            &golden_actions,
            1e-9,
            &tag("actions"),
        );
        if let Some(key) = s.get("resolved_unnorm_key").and_then(|k| k.as_str()) {
            assert_eq!(prediction.unnorm_key, key, "{}", tag("resolved unnorm_key"));
        }
    }
}

#[test]
fn openvla_tiny_f32_matches_reference() {
    check_fixture("openvla-tiny", Precision::F32);
}

#[test]
fn openvla_tiny_bf16_weights_match_reference() {
    check_fixture("openvla-tiny", Precision::Bf16);
}

#[test]
fn odd_inputs_match_reference() {
    check_fixture("ref-odd-inputs", Precision::F32);
}

#[test]
fn gqa_sharded_eps_1e5_matches_reference() {
    check_fixture("ref-gqa-sharded", Precision::F32);
}

#[test]
fn v01_siglip_letterbox_vicuna_matches_reference() {
    check_fixture("ref-v01", Precision::F32);
}

#[test]
fn bin_centers_match_numpy() {
    let golden = npy(&testdata("openvla-tiny"), "bin_centers.npy");
    let ours = openvla::action::ActionTokenizer::new(256, 32000).bin_centers;
    let ours = Tensor::from_slice(&ours, ours.len(), &Device::Cpu).unwrap();
    assert_abs(&ours, &golden, 0.0, "bin_centers");
}

#[test]
fn tokenizer_cases_match_reference() {
    let dir = testdata("openvla-tiny");
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_cases.json")).unwrap())
            .unwrap();
    let tok = openvla::processor::PromptTokenizer::from_file(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/openvla-tiny/tokenizer.json"),
    )
    .unwrap();
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() >= 3);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(text).unwrap(), want, "tokenizer case {text:?}");
    }
}
