//! The projector from vision features into the LLM embedding space (spec §3).

use crate::checkpoint::WeightLoader;
use crate::error::Result;
use crate::model::linear::{LayerKind, Linear, WeightPolicy};
use candle_core::Tensor;

/// `fused-gelu-mlp` (fc1-GELU-fc2-GELU-fc3, width 4·vision_dim) for the fused backbone, or
/// `gelu-mlp` (fc1-GELU-fc2) for a single tower, as `PrismaticProjector` chooses.
#[derive(Debug, Clone)]
pub struct Projector {
    layers: Vec<Linear>,
}

impl Projector {
    /// Loads `projector.fc*`.
    pub fn load(
        w: &WeightLoader,
        fused: bool,
        vision_dim: usize,
        llm_dim: usize,
        wp: &WeightPolicy,
    ) -> Result<Self> {
        let linear = |name: &str, dims: (usize, usize)| {
            Linear::load(w, name, dims, true, wp, LayerKind::Projector)
        };
        let layers = if fused {
            let hidden = 4 * vision_dim;
            vec![
                linear("projector.fc1", (vision_dim, hidden))?,
                linear("projector.fc2", (hidden, llm_dim))?,
                linear("projector.fc3", (llm_dim, llm_dim))?,
            ]
        } else {
            vec![
                linear("projector.fc1", (vision_dim, llm_dim))?,
                linear("projector.fc2", (llm_dim, llm_dim))?,
            ]
        };
        Ok(Projector { layers })
    }

    /// Bytes of the projector's weight matrices.
    pub fn weight_bytes(&self) -> usize {
        self.layers.iter().map(|l| l.weight().storage_bytes()).sum()
    }

    /// `[B, P, vision_dim]` -> `[B, P, llm_dim]`, exact (erf) GELU between layers.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x)?;
            if i < last {
                x = crate::kernels::activation::gelu_erf(&x)?;
            }
        }
        Ok(x)
    }
}
