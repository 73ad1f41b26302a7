//! What the server runs requests on: the [`Engine`] trait, implemented by [`openvla::Policy`].

use openvla::config::Variant;
use openvla::{Policy, Prediction, Request};
use serde::Serialize;
use std::collections::BTreeMap;

/// A batched predictor. The server calls [`Engine::run_batch`] from one dedicated thread,
/// never from the async runtime.
pub trait Engine: Send + Sync + 'static {
    /// Predicts every request of a batch. The outer error fails the whole batch; inner errors
    /// belong to single requests. A request must get the same answer alone or in any batch.
    fn run_batch(&self, requests: &[Request]) -> openvla::Result<Vec<openvla::Result<Prediction>>>;

    /// What `GET /metadata` reports about the model.
    fn metadata(&self) -> ModelMetadata;
}

/// Facts about the served model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelMetadata {
    /// `openvla` (fused DINOv2 + SigLIP, `In: ... Out:` prompt) or `openvla-v01`.
    pub variant: String,
    /// The model directory.
    pub model_dir: String,
    /// How weights are held in memory.
    pub weight_dtype: String,
    /// Arithmetic of the many-row products: `f32` (exact) or `bf16`.
    pub compute: String,
    /// Action dimension of each dataset (`unnorm_key`) in `norm_stats`.
    pub action_dims: BTreeMap<String, usize>,
    /// The file the statistics were read from.
    pub norm_stats_source: String,
    /// Action head family: `openvla` (256-bin), `oft-l1` or `oft-discrete`.
    pub family: String,
    /// The request keys of the images, primary first (`["image"]` for the 256-bin family).
    pub images: Vec<String>,
    /// Proprio dimension, if the model takes proprio (`state`).
    pub proprio_dim: Option<usize>,
    /// Actions per reply (1 for the 256-bin family).
    pub chunk_size: usize,
}

impl ModelMetadata {
    /// Metadata fields of the 256-bin family for an engine that has nothing else to say.
    pub fn openvla_inputs() -> (String, Vec<String>, Option<usize>, usize) {
        ("openvla".into(), vec!["image".into()], None, 1)
    }

    /// Whether the model answers in OFT's deploy.py format (a list of K arrays).
    pub fn is_oft(&self) -> bool {
        self.family != "openvla"
    }
}

pub use openvla::oft::oft_image_keys;

impl Engine for Policy {
    fn run_batch(&self, requests: &[Request]) -> openvla::Result<Vec<openvla::Result<Prediction>>> {
        if self.head().is_parallel() {
            return Ok(self.predict_batch(requests));
        }
        Ok(self
            .trace_batch(requests)?
            .into_iter()
            .map(|t| t.map(|t| t.prediction))
            .collect())
    }

    fn metadata(&self) -> ModelMetadata {
        ModelMetadata {
            variant: match self.config().variant {
                Variant::OpenVla => "openvla".into(),
                Variant::OpenVlaV01 => "openvla-v01".into(),
            },
            model_dir: self.dir().display().to_string(),
            weight_dtype: format!("{:?}", self.weight_dtype()).to_lowercase(),
            compute: self.compute().name().into(),
            action_dims: self
                .norm_stats()
                .iter()
                .map(|(k, s)| (k.clone(), s.action.action_dim()))
                .collect(),
            norm_stats_source: self.norm_stats_source().display().to_string(),
            family: self.head().family().into(),
            images: if self.head().is_parallel() {
                oft_image_keys(self.num_images())
            } else {
                vec!["image".into()]
            },
            proprio_dim: self.proprio_dim(),
            chunk_size: self.chunk_size(),
        }
    }
}
