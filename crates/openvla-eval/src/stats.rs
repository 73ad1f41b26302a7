//! Success-rate intervals and latency percentiles.

/// z for a two-sided 95% interval.
pub const Z95: f64 = 1.959_963_984_540_054;

/// The 95% Wilson score interval of a proportion `p` observed over `n` trials (`n` may be an
/// effective, non-integer sample size). `(0, 1)` when `n` is 0.
pub fn wilson(p: f64, n: f64) -> (f64, f64) {
    if n <= 0.0 {
        return (0.0, 1.0);
    }
    let z2 = Z95 * Z95;
    let denom = 1.0 + z2 / n;
    let center = (p + z2 / (2.0 * n)) / denom;
    let half = Z95 * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / denom;
    ((center - half).max(0.0), (center + half).min(1.0))
}

/// A weighted mean of proportions with its Wilson interval at Kish's effective sample size
/// `(Σw)² / Σw²` over the episodes (each episode of part `i` weighs `weight_i / n_i`).
/// `parts` are `(successes, episodes, weight)`; parts without episodes are skipped.
pub fn weighted_rate(parts: &[(u64, u64, f64)]) -> Option<(f64, (f64, f64))> {
    let used: Vec<_> = parts.iter().filter(|p| p.1 > 0 && p.2 > 0.0).collect();
    if used.is_empty() {
        return None;
    }
    let wsum: f64 = used.iter().map(|p| p.2).sum();
    let mean = used
        .iter()
        .map(|p| p.2 / wsum * p.0 as f64 / p.1 as f64)
        .sum::<f64>();
    // Per-episode weights w_i / n_i (normalized): Σ over episodes of (w/n)² = w² / n.
    let sq: f64 = used.iter().map(|p| (p.2 / wsum).powi(2) / p.1 as f64).sum();
    let n_eff = 1.0 / sq;
    Some((mean, wilson(mean, n_eff)))
}

/// The `q`-quantile (0..=1) of `values` by linear interpolation (numpy's default); `None` if
/// empty.
pub fn quantile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let pos = q.clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    Some(v[lo] + (v[hi] - v[lo]) * (pos - lo as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_known_values() {
        // 8/10: Wilson 95% = (0.4902, 0.9433).
        let (lo, hi) = wilson(0.8, 10.0);
        assert!(
            (lo - 0.4902).abs() < 1e-3 && (hi - 0.9433).abs() < 1e-3,
            "{lo} {hi}"
        );
        // 0/10 has a non-zero upper bound; 10/10 a lower bound below 1.
        let (lo, hi) = wilson(0.0, 10.0);
        assert_eq!(lo, 0.0);
        assert!((hi - 0.2775).abs() < 1e-3, "{hi}");
        assert!(wilson(1.0, 10.0).0 < 0.75);
        assert_eq!(wilson(0.5, 0.0), (0.0, 1.0));
    }

    #[test]
    fn weighted_rate_macro_and_pooled() {
        // Equal weights over groups of different sizes: the macro mean, not the pooled rate.
        let (m, _) = weighted_rate(&[(28, 28, 1.0), (0, 2, 1.0)]).unwrap();
        assert!((m - 0.5).abs() < 1e-12);
        // Weights proportional to episodes: the pooled rate and its plain Wilson interval.
        let (m, ci) = weighted_rate(&[(8, 10, 10.0), (2, 10, 10.0)]).unwrap();
        assert!((m - 0.5).abs() < 1e-12);
        let plain = wilson(0.5, 20.0);
        assert!((ci.0 - plain.0).abs() < 1e-12 && (ci.1 - plain.1).abs() < 1e-12);
        assert!(weighted_rate(&[(0, 0, 1.0)]).is_none());
    }

    #[test]
    fn quantiles() {
        let v = [4.0, 1.0, 3.0, 2.0];
        assert_eq!(quantile(&v, 0.5), Some(2.5));
        assert_eq!(quantile(&v, 0.0), Some(1.0));
        assert_eq!(quantile(&v, 1.0), Some(4.0));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
