//! The vision backbone: one timm tower (`featurizer`), or DINOv2 + SigLIP fused on the feature
//! dimension (`featurizer` + `fused_featurizer`, spec §2.3), optionally FiLM-conditioned on the
//! language (OFT, oft-spec §3: the same average embedding for every tower and image).
//! Written once for inference and training ([`Backend`]).

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::backend::{Backend, Infer, ParamSource};
use crate::model::checkpoint::WeightLoader;
use crate::model::linear::WeightPolicy;
use crate::model::vit::{Loading, TowerSource, VisionTransformer};
use candle_core::Tensor;

/// Checkpoint prefixes of the towers, in order.
pub const TOWER_PREFIXES: [&str; 2] = [
    "vision_backbone.featurizer",
    "vision_backbone.fused_featurizer",
];

/// Patch features of every tower, concatenated as the reference does.
#[derive(Debug, Clone)]
pub struct VisionBackbone<B: Backend = Infer> {
    towers: Vec<VisionTransformer<B>>,
}

/// Per-tower and fused outputs of the backbone.
#[derive(Debug, Clone)]
pub struct VisionFeatures {
    /// Each tower's patch features `[B, P, D_i]` (featurizer first).
    pub per_tower: Vec<Tensor>,
    /// Concatenated features `[B, P, sum D_i]`.
    pub fused: Tensor,
}

impl VisionFeatures {
    /// The features of each tower, and their concatenation on the feature dimension.
    pub fn fuse(per_tower: Vec<Tensor>) -> candle_core::Result<VisionFeatures> {
        let fused = if per_tower.len() == 1 {
            per_tower[0].clone()
        } else {
            Tensor::cat(&per_tower, 2)?
        };
        Ok(VisionFeatures { per_tower, fused })
    }

    /// The features of batch row `i`, `[1, P, ·]` (views of this batch's tensors).
    pub fn row(&self, i: usize) -> Result<VisionFeatures> {
        Ok(VisionFeatures {
            per_tower: self
                .per_tower
                .iter()
                .map(|t| t.narrow(0, i, 1))
                .collect::<candle_core::Result<_>>()?,
            fused: self.fused.narrow(0, i, 1)?,
        })
    }
}

/// Images a stacked tower pass takes at most: bounds the activations of a large batch (16
/// MiniVLA images: about 270 MB of MLP activations in f32).
pub const MAX_STACKED_IMAGES: usize = 16;

impl<B: Backend> VisionBackbone<B> {
    /// Loads the towers named by `cfg` (under [`TOWER_PREFIXES`]) from `w`.
    pub fn load_with(w: &dyn ParamSource<B>, cfg: &ModelConfig) -> Result<Self> {
        let towers = cfg
            .towers
            .iter()
            .zip(TOWER_PREFIXES)
            .map(|(t, prefix)| VisionTransformer::load_with(w, prefix, t))
            .collect::<Result<Vec<_>>>()?;
        Ok(VisionBackbone { towers })
    }

    /// The towers, featurizer first.
    pub fn towers(&self) -> &[VisionTransformer<B>] {
        &self.towers
    }

    /// Number of input channels (3 per tower).
    pub fn in_channels(&self) -> usize {
        3 * self.towers.len()
    }

    /// Whether the towers are FiLM-conditioned (an OFT FiLM checkpoint).
    pub fn is_film(&self) -> bool {
        self.towers.iter().any(VisionTransformer::is_film)
    }

    /// `pixel_values [B, 3·towers, H, W]` -> features, with the average language embedding
    /// `language [B, llm_dim]` that FiLM towers are conditioned on.
    pub fn forward_with(
        &self,
        ctx: &B::Ctx,
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
            .map(|(i, t)| t.forward_with(ctx, &pixel_values.narrow(1, 3 * i, 3)?, language))
            .collect::<Result<Vec<_>>>()?;
        Ok(VisionFeatures::fuse(per_tower)?)
    }
}

impl VisionBackbone<Infer> {
    /// The towers over several images `[1, C, H, W]` stacked into batches of up to
    /// [`MAX_STACKED_IMAGES`], one result `[1, P, ·]` per image. Every kernel of the towers
    /// computes each patch row on its own, so an image's features are the bits it gets alone.
    /// `language [1, llm_dim]` conditions every image of a FiLM backbone (the images of one
    /// sample share their prompt).
    pub fn forward_stacked(
        &self,
        images: &[&Tensor],
        language: Option<&Tensor>,
    ) -> Result<Vec<VisionFeatures>> {
        let stack = if self
            .towers
            .iter()
            .all(|t| crate::kernels::stacks_bit_exactly(t.config().num_patches()))
        {
            MAX_STACKED_IMAGES
        } else {
            1
        };
        let mut out = Vec::with_capacity(images.len());
        for group in images.chunks(stack) {
            let stacked = if group.len() == 1 {
                group[0].clone()
            } else {
                Tensor::cat(group, 0)?
            };
            let features = self.forward_film(&stacked, language)?;
            for i in 0..group.len() {
                out.push(features.row(i)?);
            }
        }
        Ok(out)
    }

    /// Loads the towers named by `config.json` from the model's shards.
    pub fn load(w: &WeightLoader, cfg: &ModelConfig, wp: &WeightPolicy) -> Result<Self> {
        Self::load_from(w, cfg, wp)
    }

    /// Loads the towers named by `config.json` from `w` (the shards, or an OFT FiLM file).
    pub fn load_from(w: &dyn TowerSource, cfg: &ModelConfig, wp: &WeightPolicy) -> Result<Self> {
        Self::load_with(
            &Loading {
                source: w,
                policy: wp,
            },
            cfg,
        )
    }

    /// Bytes of the towers' weight matrices.
    pub fn weight_bytes(&self) -> usize {
        self.towers.iter().map(|t| t.weight_bytes()).sum()
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
        self.forward_with(&(), pixel_values, language)
    }
}
