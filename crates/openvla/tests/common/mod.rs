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
