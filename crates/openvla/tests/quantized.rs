//! Quantized weights: `openvla quantize` round trip (quantize, load, predict), bit-identical
//! batching in every format, f16 weights, and the errors of quantized model directories.

use openvla::quant::io::{tensor_names, MANIFEST};
use openvla::quant::{QuantFormat, Quantization};
use openvla::quantize::quantize_model_dir;
use openvla::{LoadOptions, Observation, Policy, Precision, Request};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tiny() -> PathBuf {
    root().join("models/openvla-tiny")
}

fn load(
    dir: &Path,
    precision: Precision,
    quantize: Option<Quantization>,
) -> openvla::Result<Policy> {
    Policy::load(
        dir,
        &LoadOptions {
            precision,
            quantize,
            ..Default::default()
        },
    )
}

fn request(image: &str, instruction: &str, key: &str) -> Request {
    Request {
        observation: Observation::new(
            openvla_image::open(&root().join(image)).unwrap(),
            instruction,
        ),
        unnorm_key: Some(key.to_string()),
    }
}

fn requests() -> Vec<Request> {
    vec![
        request(
            "testdata/openvla-tiny/s0_image.png",
            "pick up the red block",
            "fake_bridge_orig",
        ),
        request(
            "testdata/openvla-tiny/s2_image.png",
            "open the top drawer of the cabinet",
            "fake_nomask_4d",
        ),
        request(
            "testdata/openvla-tiny/s1_image.png",
            &"move the cup slowly to the left ".repeat(12),
            "fake_libero_spatial",
        ),
        request(
            "testdata/openvla-tiny/s3_image.png",
            "wipe",
            "fake_bridge_orig",
        ),
    ]
}

#[test]
fn quantized_directory_round_trip() {
    for mode in [Quantization::Int8, Quantization::Int4] {
        let out = tempfile::tempdir().unwrap();
        let dir = out.path().join("q");
        let report = quantize_model_dir(&tiny(), &dir, mode, None).unwrap();
        assert!(
            report.output_bytes < report.source_bytes,
            "{mode}: not smaller"
        );
        // Everything but the weights is carried over.
        for f in [
            "config.json",
            "preprocessor_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "dataset_statistics.json",
            MANIFEST,
            "model.safetensors",
        ] {
            assert!(dir.join(f).exists(), "{mode}: {f} missing");
        }
        let stored = load(&dir, Precision::Auto, None).unwrap();
        assert_eq!(stored.weight_policy().quantization, Some(mode));
        let at_load = load(&tiny(), Precision::Auto, Some(mode)).unwrap();
        // The stored directory computes exactly what quantizing at load time computes.
        let reqs = requests();
        let a = stored.predict_batch(&reqs);
        let b = at_load.predict_batch(&reqs);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.as_ref().unwrap(), y.as_ref().unwrap(), "{mode}");
        }
        // Same mode again is fine; another mode is an error naming both.
        assert!(load(&dir, Precision::Auto, Some(mode)).is_ok());
        let other = match mode {
            Quantization::Int8 => Quantization::Int4,
            Quantization::Int4 => Quantization::Int8,
        };
        let e = load(&dir, Precision::Auto, Some(other))
            .unwrap_err()
            .to_string();
        assert!(e.contains("already quantized"), "{e}");
        // A quantized directory cannot be quantized again, nor written into a full directory.
        let e = quantize_model_dir(&dir, &out.path().join("again"), mode, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("already quantized"), "{e}");
        let e = quantize_model_dir(&tiny(), &dir, mode, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not empty"), "{e}");
    }
}

#[test]
fn batched_equals_alone_in_every_format() {
    let cases = [
        (Precision::F16, None),
        (Precision::F32, Some(Quantization::Int8)),
        (Precision::F32, Some(Quantization::Int4)),
        (Precision::Bf16, Some(Quantization::Int4)),
    ];
    for (precision, quantize) in cases {
        let policy = load(&tiny(), precision, quantize).unwrap();
        let reqs = requests();
        let alone: Vec<_> = reqs
            .iter()
            .map(|r| {
                policy
                    .trace(&r.observation, r.unnorm_key.as_deref())
                    .unwrap()
            })
            .collect();
        let batched = policy.trace_batch(&reqs).unwrap();
        for (i, (a, b)) in alone.iter().zip(batched).enumerate() {
            let b = b.unwrap();
            assert_eq!(
                a.prediction, b.prediction,
                "{precision:?}/{quantize:?} request {i}"
            );
            assert_eq!(
                a.generation.step_logits, b.generation.step_logits,
                "{precision:?}/{quantize:?} request {i}: logits differ when batched"
            );
        }
    }
}

#[test]
fn f16_weights_compute_close_to_f32() {
    let f32p = load(&tiny(), Precision::F32, None).unwrap();
    let f16p = load(&tiny(), Precision::F16, None).unwrap();
    let r = &requests()[0];
    let a = f32p.trace(&r.observation, r.unnorm_key.as_deref()).unwrap();
    let b = f16p.trace(&r.observation, r.unnorm_key.as_deref()).unwrap();
    let (x, y) = (&a.generation.step_logits[0], &b.generation.step_logits[0]);
    let max = x
        .iter()
        .zip(y)
        .map(|(p, q)| (p - q).abs())
        .fold(0f32, f32::max);
    // f16 keeps 11 mantissa bits of the bf16 weights' 8: the weights are exactly the
    // checkpoint's whenever they are in f16's normal range.
    assert!(max < 1e-3, "f16 logits differ from f32 by {max}");
}

#[test]
fn damaged_quantized_directories_are_errors() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("q");
    quantize_model_dir(&tiny(), &dir, Quantization::Int8, None).unwrap();
    // A bad manifest.
    std::fs::write(dir.join(MANIFEST), r#"{"quantization": "int3"}"#).unwrap();
    let e = load(&dir, Precision::Auto, None).unwrap_err().to_string();
    assert!(e.contains("int3"), "{e}");
    std::fs::write(dir.join(MANIFEST), r#"{"quantization": "int8"}"#).unwrap();
    assert!(load(&dir, Precision::Auto, None).is_ok());
    // A truncated weights file.
    let w = dir.join("model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() - 100]).unwrap();
    let e = load(&dir, Precision::Auto, None).unwrap_err().to_string();
    assert!(e.contains("truncated"), "{e}");
    // The quants of a matrix without its scales: the scales tensor is named in the error.
    let (qs, d) = tensor_names("projector.fc1.weight", QuantFormat::Q8_0);
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + header_len]).unwrap();
    assert!(header.contains(&qs) && header.contains(&d));
    let renamed = header.replacen(&d, &d.replace(".d", ".x"), 1);
    let mut patched = bytes[..8].to_vec();
    patched.extend_from_slice(renamed.as_bytes());
    patched.extend_from_slice(&bytes[8 + header_len..]);
    std::fs::write(&w, &patched).unwrap();
    let e = load(&dir, Precision::Auto, None).unwrap_err().to_string();
    assert!(e.contains(&d), "{e}");
}
