//! The projector from vision features into the LLM embedding space (spec §3), written once
//! for inference and training ([`Backend`]).

use crate::error::Result;
use crate::model::backend::{Backend, Infer, ParamSource};
use crate::model::checkpoint::WeightLoader;
use crate::model::linear::{LayerKind, WeightPolicy};
use crate::model::vit::Loading;
use candle_core::Tensor;

/// `fused-gelu-mlp` (fc1-GELU-fc2-GELU-fc3, width 4·vision_dim) for the fused backbone, or
/// `gelu-mlp` (fc1-GELU-fc2) for a single tower, as `PrismaticProjector` chooses.
#[derive(Debug, Clone)]
pub struct Projector<B: Backend = Infer> {
    layers: Vec<B::Linear>,
}

impl<B: Backend> Projector<B> {
    /// Loads `projector.fc*` from `w`.
    pub fn load_with(
        w: &dyn ParamSource<B>,
        fused: bool,
        vision_dim: usize,
        llm_dim: usize,
    ) -> Result<Self> {
        let linear =
            |name: &str, dims: (usize, usize)| w.linear(name, dims, true, LayerKind::Projector);
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

    /// The layers in order.
    pub fn linears(&self) -> &[B::Linear] {
        &self.layers
    }

    /// `[B, P, vision_dim]` -> `[B, P, llm_dim]`, exact (erf) GELU between layers.
    pub fn forward_with(&self, ctx: &B::Ctx, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            x = B::linear(ctx, layer, &x)?;
            if i < last {
                x = B::gelu_erf(&x)?;
            }
        }
        Ok(x)
    }
}

impl Projector<Infer> {
    /// Loads `projector.fc*` from the shards, the matrices held as `wp` says.
    pub fn load(
        w: &WeightLoader,
        fused: bool,
        vision_dim: usize,
        llm_dim: usize,
        wp: &WeightPolicy,
    ) -> Result<Self> {
        let source = Loading {
            source: w,
            policy: wp,
        };
        Self::load_with(&source, fused, vision_dim, llm_dim)
    }

    /// Bytes of the projector's weight matrices.
    pub fn weight_bytes(&self) -> usize {
        self.layers.iter().map(|l| l.storage_bytes()).sum()
    }

    /// `[B, P, vision_dim]` -> `[B, P, llm_dim]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(&(), x)
    }
}
