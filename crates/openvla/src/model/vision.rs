//! The vision backbone: one timm tower (`featurizer`), or DINOv2 + SigLIP fused on the feature
//! dimension (`featurizer` + `fused_featurizer`, spec §2.3), optionally FiLM-conditioned on the
//! language (OFT, oft-spec §3: the same average embedding for every tower and image).

use crate::checkpoint::WeightLoader;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::linear::WeightPolicy;
use crate::model::vit::{TowerSource, VisionTransformer};
use candle_core::Tensor;

/// Checkpoint prefixes of the towers, in order.
pub const TOWER_PREFIXES: [&str; 2] = [
    "vision_backbone.featurizer",
    "vision_backbone.fused_featurizer",
];

/// Patch features of every tower, concatenated as the reference does.
#[derive(Debug, Clone)]
pub struct VisionBackbone {
    towers: Vec<VisionTransformer>,
}

/// Per-tower and fused outputs of the backbone.
#[derive(Debug, Clone)]
pub struct VisionFeatures {
    /// Each tower's patch features `[B, P, D_i]` (featurizer first).
    pub per_tower: Vec<Tensor>,
    /// Concatenated features `[B, P, sum D_i]`.
    pub fused: Tensor,
}

impl VisionBackbone {
    /// Loads the towers named by `config.json` from the model's shards.
    pub fn load(w: &WeightLoader, cfg: &ModelConfig, wp: &WeightPolicy) -> Result<Self> {
        Self::load_from(w, cfg, wp)
    }

    /// Loads the towers named by `config.json` from `w` (the shards, or an OFT FiLM file).
    pub fn load_from(w: &dyn TowerSource, cfg: &ModelConfig, wp: &WeightPolicy) -> Result<Self> {
        let towers = cfg
            .towers
            .iter()
            .zip(TOWER_PREFIXES)
            .map(|(t, prefix)| VisionTransformer::load(w, prefix, t, wp))
            .collect::<Result<Vec<_>>>()?;
        Ok(VisionBackbone { towers })
    }

    /// Bytes of the towers' weight matrices.
    pub fn weight_bytes(&self) -> usize {
        self.towers.iter().map(|t| t.weight_bytes()).sum()
    }

    /// Number of input channels (3 per tower).
    pub fn in_channels(&self) -> usize {
        3 * self.towers.len()
    }

    /// Whether the towers are FiLM-conditioned (an OFT FiLM checkpoint).
    pub fn is_film(&self) -> bool {
        self.towers.iter().any(VisionTransformer::is_film)
    }

    /// `pixel_values [B, 3·towers, H, W]` -> features. A FiLM backbone needs
    /// [`VisionBackbone::forward_film`].
    pub fn forward(&self, pixel_values: &Tensor) -> Result<VisionFeatures> {
        self.forward_film(pixel_values, None)
    }

    /// Like [`VisionBackbone::forward`], with the average language embedding
    /// `language [B, llm_dim]` that FiLM towers are conditioned on.
    pub fn forward_film(
        &self,
        pixel_values: &Tensor,
        language: Option<&Tensor>,
    ) -> Result<VisionFeatures> {
        let c = pixel_values.dim(1)?;
        if c != self.in_channels() {
            return Err(Error::InvalidInput(format!(
                "pixel_values have {c} channels; this backbone expects {}",
                self.in_channels()
            )));
        }
        let per_tower = self
            .towers
            .iter()
            .enumerate()
            .map(|(i, t)| t.forward_film(&pixel_values.narrow(1, 3 * i, 3)?, language))
            .collect::<Result<Vec<_>>>()?;
        let fused = if per_tower.len() == 1 {
            per_tower[0].clone()
        } else {
            Tensor::cat(&per_tower, 2)?
        };
        Ok(VisionFeatures { per_tower, fused })
    }
}
