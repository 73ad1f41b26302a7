//! # openvla
//!
//! Inference for OpenVLA vision-language-action policies (Kim et al., 2024), reproducing the
//! reference PyTorch implementation's actions from an HF model directory.
//!
//! ```no_run
//! use openvla::{LoadOptions, Observation, Policy};
//! let policy = Policy::load("models/openvla-tiny".as_ref(), &LoadOptions::default())?;
//! let image = openvla::processor::RgbImage::from_raw(2, 1, vec![0, 0, 0, 255, 255, 255])?;
//! let obs = Observation::new(image, "pick up the red block");
//! let prediction = &policy.predict(&[obs], Some("fake_bridge_orig"))?[0];
//! println!("{:?}", prediction.action());
//! # Ok::<(), openvla::Error>(())
//! ```
//!
//! The stages follow the paper and the spec: [`processor`] (image and prompt), [`model`]
//! (vision backbone, projector, Llama), [`head`] (the action head seam: OpenVLA's 256-bin
//! autoregressive tokens, OpenVLA-OFT's parallel L1 and discrete heads), [`action`] (bins and
//! un-normalization), [`oft`] (OpenVLA-OFT's component files, constants and proprio), and
//! [`policy`], the single object every front end holds. Both families answer a chunk of
//! actions `[K][D]` (a chunk of one for OpenVLA); see docs/oft.md.

pub mod action;
pub mod config;
pub mod error;
pub mod head;
pub mod init;
pub mod inspect;
pub mod model;
pub mod oft;
pub mod policy;
pub mod processor;
pub mod quant;
pub mod quantize;
pub mod synth;

/// Safetensors checkpoints and weight loading, which sit under the model ([`model::checkpoint`]).
pub use model::checkpoint;
/// The CPU kernels, in their own crate (`crates/openvla-kernels`).
pub use openvla_kernels as kernels;

pub use action::{DatasetStatistics, NormStats};
pub use config::ModelConfig;
pub use error::{Error, Result};
pub use policy::{LoadOptions, Observation, Policy, Precision, Prediction, Request};
