//! Stage comparisons shared by the golden tests: every failure names its stage.

#![allow(dead_code)]

use candle_core::{DType, Tensor};

/// The tensor's values as f64, flattened.
pub fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// Largest absolute difference; the element counts must agree.
pub fn max_abs_diff(a: &[f64], b: &[f64], what: &str) -> f64 {
    assert_eq!(a.len(), b.len(), "stage {what}: element counts differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Asserts `max |got - golden| <= rel * max |golden|`.
pub fn assert_rel(got: &Tensor, golden: &Tensor, rel: f64, what: &str) {
    let (a, b) = (f64s(got), f64s(golden));
    let d = max_abs_diff(&a, &b, what);
    let scale = b.iter().map(|v| v.abs()).fold(1e-12, f64::max);
    eprintln!("{what}: max abs diff {d:.3e} (max abs {scale:.3e})");
    assert!(
        d <= rel * scale,
        "stage {what}: max abs diff {d:.3e} exceeds {rel:e} x max abs {scale:.3e}"
    );
}

/// Asserts `max |got - golden| <= tol`.
pub fn assert_abs(got: &[f64], golden: &[f64], tol: f64, what: &str) {
    let d = max_abs_diff(got, golden, what);
    eprintln!("{what}: max abs diff {d:.3e}");
    assert!(
        d <= tol,
        "stage {what}: max abs diff {d:.3e} exceeds {tol:e}"
    );
}

/// Reads `dir/file` as a tensor.
pub fn npy(dir: &std::path::Path, file: &str) -> Tensor {
    Tensor::read_npy(dir.join(file)).unwrap_or_else(|e| panic!("reading {file}: {e}"))
}

/// The observation of an OFT fixture sample (`samples.json` entry) from the inputs in `dir`:
/// `<prefix>img<i>_input.png` under each image's `obs_key`, the instruction, and
/// `<prefix>proprio_raw.npy` when the sample has one.
pub fn oft_observation(dir: &std::path::Path, s: &serde_json::Value) -> openvla::Observation {
    let p = s["prefix"].as_str().unwrap();
    let images = s["images"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, img)| {
            let file = dir.join(format!("{p}img{i}_input.png"));
            (
                img["obs_key"].as_str().unwrap().to_string(),
                openvla_image::open(&file).unwrap(),
            )
        })
        .collect();
    let proprio_file = format!("{p}proprio_raw.npy");
    let proprio = dir
        .join(&proprio_file)
        .exists()
        .then(|| f64s(&npy(dir, &proprio_file)));
    openvla::Observation {
        images,
        instruction: s["instruction"].as_str().unwrap().to_string(),
        proprio,
    }
}
