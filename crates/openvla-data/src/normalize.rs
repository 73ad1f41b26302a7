//! BOUNDS_Q99 and BOUNDS normalization and the inverse (spec §7.5, §6.4; OFT's
//! `normalize_action_and_proprio`).
//!
//! Forward (training, float32 as TF computes it), with `(lo, hi)` = `(q01, q99)` for
//! BOUNDS_Q99 and `(min, max)` for BOUNDS:
//! `where(mask, clip(2 (x - lo) / (hi - lo + 1e-8) - 1, -1, 1), x)`, then dimensions whose
//! `min == max` are set to 0. Inverse (inference, float64):
//! `where(mask, 0.5 (a + 1) (q99 - q01) + q01, a)`, without clipping.

use crate::stats::ArrayStats;

/// Which bounds normalize a vector (the reference's `ACTION_PROPRIO_NORMALIZATION_TYPE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Normalization {
    /// `(q01, q99)`: OpenVLA, OFT's LIBERO and Bridge constants.
    #[default]
    BoundsQ99,
    /// `(min, max)`: OFT's ALOHA constants.
    Bounds,
}

/// Normalizes one action vector in place with BOUNDS_Q99.
pub fn normalize_bounds_q99(x: &mut [f32], st: &ArrayStats) {
    normalize_bounds(x, st, Normalization::BoundsQ99)
}

/// Normalizes one vector (action or proprio) in place with the given bounds.
pub fn normalize_bounds(x: &mut [f32], st: &ArrayStats, kind: Normalization) {
    let mask = st.mask.as_deref();
    let (los, his) = match kind {
        Normalization::BoundsQ99 => (&st.q01, &st.q99),
        Normalization::Bounds => (&st.min, &st.max),
    };
    for (d, v) in x.iter_mut().enumerate() {
        let m = mask.and_then(|m| m.get(d).copied()).unwrap_or(true);
        let (Some(&lo), Some(&hi)) = (los.get(d), his.get(d)) else {
            continue;
        };
        if m {
            // As TF evaluates it: numpy computes the float64 denominator, TF casts both
            // constants to the tensor's float32.
            let den = (hi - lo + 1e-8) as f32;
            let y = 2.0 * (*v - lo as f32) / den - 1.0;
            *v = y.clamp(-1.0, 1.0);
        }
        if st.min.get(d) == st.max.get(d) {
            *v = 0.0;
        }
    }
}

/// Normalizes every row of a `[rows, dim]` row-major buffer.
pub fn normalize_rows(data: &mut [f32], dim: usize, st: &ArrayStats, kind: Normalization) {
    if dim == 0 {
        return;
    }
    for row in data.chunks_exact_mut(dim) {
        normalize_bounds(row, st, kind);
    }
}

/// Un-normalizes a model output in `[-1, 1]` (the reference's `predict_action` tail).
pub fn unnormalize_bounds_q99(a: &[f64], st: &ArrayStats) -> Vec<f64> {
    let mask = st.mask.as_deref();
    a.iter()
        .enumerate()
        .map(|(d, &v)| {
            let m = mask.and_then(|m| m.get(d).copied()).unwrap_or(true);
            match (m, st.q01.get(d), st.q99.get(d)) {
                (true, Some(&lo), Some(&hi)) => 0.5 * (v + 1.0) * (hi - lo) + lo,
                _ => v,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_inside_bounds() {
        let mut st = ArrayStats::zeros(3);
        st.q01 = vec![-1.0, 0.0, 0.0];
        st.q99 = vec![1.0, 2.0, 1.0];
        st.min = vec![-2.0, 0.0, 0.0];
        st.max = vec![2.0, 3.0, 1.0];
        st.mask = Some(vec![true, true, false]);
        let mut x = [0.5f32, 1.0, 1.0];
        normalize_bounds_q99(&mut x, &st);
        assert!((x[0] - 0.5).abs() < 1e-6 && x[1].abs() < 1e-6 && x[2] == 1.0);
        let back = unnormalize_bounds_q99(&[0.5, 0.0, 1.0], &st);
        assert!((back[0] - 0.5).abs() < 1e-9 && (back[1] - 1.0).abs() < 1e-9 && back[2] == 1.0);
        let mut y = [5.0f32, -3.0, 0.0];
        normalize_bounds_q99(&mut y, &st);
        assert_eq!(&y[..2], &[1.0, -1.0]);
        // min == max -> 0
        st.min[2] = 1.0;
        let mut z = [0.0f32, 0.0, 1.0];
        normalize_bounds_q99(&mut z, &st);
        assert_eq!(z[2], 0.0);
    }

    #[test]
    fn bounds_uses_min_max() {
        let mut st = ArrayStats::zeros(2);
        st.q01 = vec![-1.0, -1.0];
        st.q99 = vec![1.0, 1.0];
        st.min = vec![-4.0, 0.0];
        st.max = vec![4.0, 2.0];
        let mut x = [2.0f32, 1.5];
        normalize_bounds(&mut x, &st, Normalization::Bounds);
        assert!(
            (x[0] - 0.5).abs() < 1e-6 && (x[1] - 0.5).abs() < 1e-6,
            "{x:?}"
        );
        let mut y = [2.0f32, 1.5];
        normalize_bounds(&mut y, &st, Normalization::BoundsQ99);
        assert_eq!(y, [1.0, 1.0], "clipped at q99");
    }
}
