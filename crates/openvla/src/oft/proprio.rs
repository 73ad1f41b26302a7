//! Proprioception and OFT's (un-)normalization (oft-spec §2.3, §2.7).

use super::constants::NormalizationType;
use crate::action::ActionStatistics;
use crate::error::{Error, Result};
use crate::model::backend::{Backend, Infer, ParamSource};
use crate::model::linear::LayerKind;
use crate::oft::pt::{StateDict, StateDictSource};
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

/// Statistics of one quantity (`proprio` in `dataset_statistics.json`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Stats {
    /// Minimum per dimension (BOUNDS low).
    #[serde(default)]
    pub min: Option<Vec<f64>>,
    /// Maximum per dimension (BOUNDS high).
    #[serde(default)]
    pub max: Option<Vec<f64>>,
    /// 1st percentile (BOUNDS_Q99 low).
    #[serde(default)]
    pub q01: Option<Vec<f64>>,
    /// 99th percentile (BOUNDS_Q99 high).
    #[serde(default)]
    pub q99: Option<Vec<f64>>,
    /// Dimensions that are normalized; absent means all.
    #[serde(default)]
    pub mask: Option<Vec<bool>>,
}

/// The candidate bounds of a statistics record.
struct Candidates<'a> {
    min: Option<&'a [f64]>,
    max: Option<&'a [f64]>,
    q01: Option<&'a [f64]>,
    q99: Option<&'a [f64]>,
}

/// The (low, high) bounds a normalization type reads, checked to have `dim` entries.
fn bounds<'a>(
    what: &str,
    norm: NormalizationType,
    c: Candidates<'a>,
    dim: usize,
) -> Result<(&'a [f64], &'a [f64])> {
    let (lo, hi, names) = match norm {
        NormalizationType::Bounds => (c.min, c.max, ("min", "max")),
        NormalizationType::BoundsQ99 => (c.q01, c.q99, ("q01", "q99")),
    };
    let check = |v: Option<&'a [f64]>, name: &str| -> Result<&'a [f64]> {
        let v = v.ok_or_else(|| {
            Error::InvalidInput(format!(
                "{what} statistics have no {name:?}, which {norm} normalization needs"
            ))
        })?;
        if v.len() != dim {
            return Err(Error::InvalidInput(format!(
                "{what} statistics {name:?} have {} entries, expected {dim}",
                v.len()
            )));
        }
        Ok(v)
    };
    Ok((check(lo, names.0)?, check(hi, names.1)?))
}

/// `normalize_proprio`: `clip(mask ? 2(x-lo)/(hi-lo+1e-8) - 1 : x, -1, 1)` in f64.
pub fn normalize_proprio(x: &[f64], stats: &Stats, norm: NormalizationType) -> Result<Vec<f64>> {
    let (lo, hi) = bounds(
        "proprio",
        norm,
        Candidates {
            min: stats.min.as_deref(),
            max: stats.max.as_deref(),
            q01: stats.q01.as_deref(),
            q99: stats.q99.as_deref(),
        },
        x.len(),
    )?;
    Ok(x.iter()
        .enumerate()
        .map(|(i, &v)| {
            let on = stats
                .mask
                .as_ref()
                .is_none_or(|m| m.get(i).copied().unwrap_or(true));
            let n = if on {
                2.0 * (v - lo[i]) / (hi[i] - lo[i] + 1e-8) - 1.0
            } else {
                v
            };
            n.clamp(-1.0, 1.0)
        })
        .collect())
}

/// OFT's `_unnormalize_actions`: `mask ? 0.5·(n+1)·(hi-lo+1e-8) + lo : n`, no clipping.
///
/// `0.5·(n+1)` is evaluated in the precision of `n` (numpy keeps it at the array dtype): pass
/// `f32_head = true` for the L1 head's float32 output, `false` for the discrete head's float64
/// bin centres.
pub fn unnormalize_oft(
    normalized: &[f64],
    stats: &ActionStatistics,
    norm: NormalizationType,
    f32_head: bool,
) -> Result<Vec<f64>> {
    let (lo, hi) = bounds(
        "action",
        norm,
        Candidates {
            min: stats.min.as_deref(),
            max: stats.max.as_deref(),
            q01: Some(&stats.q01),
            q99: Some(&stats.q99),
        },
        normalized.len(),
    )?;
    Ok(normalized
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let on = stats
                .mask
                .as_ref()
                .is_none_or(|m| m.get(i).copied().unwrap_or(true));
            if !on {
                return n;
            }
            let half = if f32_head {
                (0.5f32 * (n as f32 + 1.0f32)) as f64
            } else {
                0.5 * (n + 1.0)
            };
            half * (hi[i] - lo[i] + 1e-8) + lo[i]
        })
        .collect())
}

/// OFT's `ProprioProjector` (action_heads.py): `fc1 (P → H) → GELU (exact) → fc2 (H → H)`,
/// one token per sample. Written once for inference and training ([`Backend`]).
#[derive(Debug, Clone)]
pub struct ProprioProjector<B: Backend = Infer> {
    fc1: B::Linear,
    fc2: B::Linear,
    proprio_dim: usize,
}

impl<B: Backend> ProprioProjector<B> {
    /// `fc1` (`[llm_dim, proprio_dim]`) and `fc2` (`[llm_dim, llm_dim]`) with biases from `w`.
    pub fn load_with(w: &dyn ParamSource<B>, proprio_dim: usize, llm_dim: usize) -> Result<Self> {
        Ok(ProprioProjector {
            fc1: w.linear("fc1", (proprio_dim, llm_dim), true, LayerKind::Projector)?,
            fc2: w.linear("fc2", (llm_dim, llm_dim), true, LayerKind::Projector)?,
            proprio_dim,
        })
    }

    /// Input width (`fc1.weight.shape[1]`).
    pub fn proprio_dim(&self) -> usize {
        self.proprio_dim
    }

    /// Normalized proprio `[B, P]` → one token per sample `[B, 1, H]`.
    pub fn forward_with(&self, ctx: &B::Ctx, proprio: &Tensor) -> Result<Tensor> {
        if proprio.rank() != 2 || proprio.dim(1)? != self.proprio_dim {
            return Err(Error::InvalidInput(format!(
                "proprio is {:?}; the proprio projector expects [B, {}]",
                proprio.dims(),
                self.proprio_dim
            )));
        }
        let h = B::gelu_erf(&B::linear_rowwise(ctx, &self.fc1, proprio)?)?;
        Ok(B::linear_rowwise(ctx, &self.fc2, &h)?.unsqueeze(1)?)
    }
}

impl ProprioProjector<Infer> {
    /// Loads `fc1`, `fc2` (keys without `module.`), checking the output width is `llm_dim`.
    pub fn load(sd: &StateDict, llm_dim: usize) -> Result<Self> {
        let fc1 = sd.get("fc1.weight", 2)?;
        let (h, p) = (fc1.dim(0)?, fc1.dim(1)?);
        if h != llm_dim {
            return Err(Error::checkpoint(
                sd.path(),
                format!("fc1.weight is [{h}, {p}], but the LLM hidden size is {llm_dim}"),
            ));
        }
        Self::load_with(&StateDictSource { sd, dtype: None }, p, h)
    }

    /// Normalized proprio (cast to f32 as the reference does) → one token `[1, 1, H]`.
    pub fn forward(&self, normalized: &[f64], device: &Device) -> Result<Tensor> {
        if normalized.len() != self.proprio_dim {
            return Err(Error::InvalidInput(format!(
                "proprio has {} values, the proprio projector expects {}",
                normalized.len(),
                self.proprio_dim
            )));
        }
        let x: Vec<f32> = normalized.iter().map(|&v| v as f32).collect();
        let x = Tensor::from_vec(x, (1, self.proprio_dim), device)?;
        Ok(self.forward_with(&(), &x)?.to_dtype(DType::F32)?)
    }
}
