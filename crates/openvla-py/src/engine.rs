//! The one place where the bindings call `openvla::Policy`.
//!
//! Everything else in this crate speaks [`Input`] and [`Output`], so a change of the engine's
//! `Observation` / `Prediction` types is absorbed here.

use openvla::quant::Quantization;
use openvla::{LoadOptions, Observation, Policy, Precision, Request};
use openvla_image::RgbImage;
use std::path::Path;

/// One observation as the Python caller gives it.
pub struct Input {
    /// Camera images, primary first, each with its name (`image`, `wrist_image`, ...).
    pub images: Vec<(String, RgbImage)>,
    /// The task.
    pub instruction: String,
    /// Proprioceptive state, for the families that take it.
    pub proprio: Option<Vec<f64>>,
    /// Dataset statistics to un-normalize with.
    pub unnorm_key: Option<String>,
}

/// The engine's answer for one observation.
pub struct Output {
    /// Un-normalized actions, `[K][D]` (K = 1 for the 256-bin family).
    pub actions: Vec<Vec<f64>>,
    /// Actions in [-1, 1] before un-normalization, `[K][D]`.
    pub normalized_actions: Vec<Vec<f64>>,
    /// Generated action token ids (empty for a family without action tokens).
    pub token_ids: Vec<u32>,
    /// The dataset statistics used.
    pub unnorm_key: String,
}

/// Loads a policy from an HF model directory.
pub fn load(
    dir: &Path,
    precision: Precision,
    quantize: Option<Quantization>,
    compute: Option<openvla::kernels::ComputePrecision>,
) -> openvla::Result<Policy> {
    Policy::load(
        dir,
        &LoadOptions {
            precision,
            quantize,
            compute,
            progress: None,
            ..Default::default()
        },
    )
}

/// The action head family, as `GET /metadata` names it: `openvla` (256-bin tokens),
/// `oft-l1` or `oft-discrete`.
pub fn family(policy: &Policy) -> &'static str {
    policy.head().family()
}

/// Actions per prediction (1 for the 256-bin family).
pub fn chunk_size(policy: &Policy) -> usize {
    policy.chunk_size()
}

/// The names of the images the model takes, primary first (the request keys of
/// `GET /metadata`: `image` for the 256-bin family, OFT deploy.py's keys otherwise).
pub fn image_names(policy: &Policy) -> Vec<String> {
    if policy.head().is_parallel() {
        openvla::oft::oft_image_keys(policy.num_images())
    } else {
        vec!["image".to_string()]
    }
}

/// Length of the proprio vector the model takes, `None` if it takes none.
pub fn proprio_dim(policy: &Policy) -> Option<usize> {
    policy.proprio_dim()
}

/// Checks an input against what the model takes and turns it into an engine request.
fn request(policy: &Policy, input: Input) -> openvla::Result<Request> {
    let Input {
        mut images,
        instruction,
        proprio,
        unnorm_key,
    } = input;
    let family = family(policy);
    let want = policy.num_images();
    if images.len() != want {
        let takes = match want {
            1 => "exactly one image".to_string(),
            n => format!("{n} images"),
        };
        return Err(openvla::Error::InvalidInput(format!(
            "a model of family {family} takes {takes} ({}); got {} ({})",
            image_names(policy).join(", "),
            images.len(),
            images
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    match (proprio_dim(policy), &proprio) {
        (None, Some(_)) => {
            return Err(openvla::Error::InvalidInput(format!(
                "a model of family {family} takes no proprio state; pass proprio=None"
            )))
        }
        (Some(d), None) => {
            return Err(openvla::Error::InvalidInput(format!(
                "this {family} model takes a {d}-dimensional proprio state; pass proprio=[...]"
            )))
        }
        _ => {}
    }
    images.truncate(want);
    Ok(Request {
        observation: Observation {
            images,
            instruction,
            proprio,
        },
        unnorm_key,
    })
}

/// Predicts every input; each gets its own result, as it would alone.
pub fn predict(policy: &Policy, inputs: Vec<Input>) -> Vec<openvla::Result<Output>> {
    let mut requests = Vec::with_capacity(inputs.len());
    let mut results: Vec<Option<openvla::Result<Output>>> = Vec::with_capacity(inputs.len());
    for input in inputs {
        match request(policy, input) {
            Ok(r) => {
                requests.push(r);
                results.push(None);
            }
            Err(e) => results.push(Some(Err(e))),
        }
    }
    let mut predictions = policy.predict_batch(&requests).into_iter();
    results
        .into_iter()
        .map(|slot| {
            slot.unwrap_or_else(|| {
                predictions
                    .next()
                    .ok_or_else(|| {
                        openvla::Error::InvalidInput(
                            "the engine returned too few predictions".into(),
                        )
                    })?
                    .map(|p| Output {
                        actions: p.actions,
                        normalized_actions: p.normalized_actions,
                        token_ids: p.token_ids,
                        unnorm_key: p.unnorm_key,
                    })
            })
        })
        .collect()
}
