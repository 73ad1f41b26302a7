//! The projector from vision features into the LLM width (as `openvla::model::projector`):
//! `fused-gelu-mlp` (fc1-GELU-fc2-GELU-fc3, width 4·vision_dim) for the fused backbone, or
//! `gelu-mlp` (fc1-GELU-fc2) for a single tower (OpenVLA v0.1).

use super::ops::Linear;
use super::params::ParamStore;
use crate::error::Result;
use candle_core::Tensor;

/// The projector's Linears in order.
#[derive(Debug, Clone)]
pub struct Projector {
    layers: Vec<Linear>,
}

impl Projector {
    /// Reads `projector.fc*`.
    pub fn load(p: &ParamStore, fused: bool, vision_dim: usize, llm_dim: usize) -> Result<Self> {
        let lin = |n: &str, dims| Linear::load(p, n, dims, true);
        let layers = if fused {
            let hidden = 4 * vision_dim;
            vec![
                lin("projector.fc1", (vision_dim, hidden))?,
                lin("projector.fc2", (hidden, llm_dim))?,
                lin("projector.fc3", (llm_dim, llm_dim))?,
            ]
        } else {
            vec![
                lin("projector.fc1", (vision_dim, llm_dim))?,
                lin("projector.fc2", (llm_dim, llm_dim))?,
            ]
        };
        Ok(Self { layers })
    }

    /// `[B, P, vision_dim]` -> `[B, P, llm_dim]`, exact (erf) GELU between layers.
    pub fn forward(&self, p: &ParamStore, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(p, &x)?;
            if i < last {
                x = x.gelu_erf()?;
            }
        }
        Ok(x)
    }
}
