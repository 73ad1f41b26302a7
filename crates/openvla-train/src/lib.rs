//! OpenVLA fine-tuning (issue 6): everything around the model's differentiable forward.
//!
//! * [`batch`]: examples and right-padded batches exactly as `RLDSBatchTransform` +
//!   `PaddedCollatorForActionPrediction` build them, with action ids placed directly.
//! * [`loss`], [`metrics`]: the shifted float32 cross-entropy (differentiable in candle) and the
//!   action accuracy / L1 that `finetune.py` logs.
//! * [`optim`]: AdamW, bit-exact with torch's float32 operation sequence.
//! * [`lora`]: PEFT 0.11.1 adapters (config, `all-linear` targeting, weights, the LoRA branch).
//! * [`merge`]: `W + s·B·A` (float32 and the reference's bf16 recipe) and merged HF directories.
//! * [`export`]: the HF model directory a full / frozen-vision / last-layer / sandwich run
//!   ends with (`<run>/model/`).
//! * [`mode`]: which parameters each mode trains (full, frozen-vision, last-layer, sandwich).
//! * [`checkpoint`], [`trainer`], [`log`], [`plot`], [`progress`]: resumable training runs
//!   (atomic checkpoints, keep-last-N, NaN stop, JSONL metrics, SVG curves, progress bar).
//! * [`memory`]: up-front memory estimates.
//! * [`model`]: the differentiable OpenVLA ([`model::OpenVlaTrain`]) implementing the seam.
//! * [`oft`]: OpenVLA-OFT training batches (several images, action chunks, proprio) for the
//!   L1 objective ([`seam::L1Objective`]).
//! * [`seam`]: what the model must provide ([`seam::TrainModel`]) and the objective built on it.
//! * [`cli`]: `openvla finetune` / `openvla merge` arguments and runners.

pub mod batch;
pub mod checkpoint;
pub mod cli;
pub mod data;
pub mod error;
pub mod export;
pub mod io;
pub mod log;
pub mod lora;
pub mod loss;
pub mod memory;
pub mod merge;
pub mod metrics;
pub mod mode;
pub mod model;
pub mod oft;
pub mod optim;
pub mod plot;
pub mod progress;
pub mod recompute;
pub mod rng;
pub mod schedule;
pub mod seam;
pub mod trainer;

pub use error::{Result, TrainError};
pub use mode::TrainMode;
pub use optim::{AdamW, AdamWConfig};
