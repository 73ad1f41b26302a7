//! The differentiable OpenVLA used for fine-tuning: `openvla::model`'s own network definition
//! (DINOv2-reg + SigLIP towers stopping at block `len - 2`, projector, Llama decoder layers, OFT
//! head) run on the [`Train`] backend, whose ops all record a backward in candle
//! (rust-stack §1.7).
//!
//! * [`params`]: every checkpoint tensor by its HF name, trained ones as float32 `Var`s.
//! * [`ops`]: the differentiable building blocks (linear with LoRA, norms, softmax, rope).
//! * [`fused`]: fused CPU forward kernels with hand-written backwards behind `ops`.
//! * [`backend`]: [`Train`], the differentiable implementation of the one model definition's
//!   backend: the towers, backbone, projector, decoder layers, OFT head and proprio projector
//!   are `openvla`'s own (`VisionBackbone<Train>`, `Projector<Train>`, `DecoderLayer<Train>`,
//!   `MlpResNet<Train>`, `ProprioProjector<Train>`; docs/model.md).
//! * [`llama`]: the language model's training pass (masked batch attention, embeddings and
//!   `lm_head` as `Var`s) around the shared decoder layers.
//! * [`head`]: OFT's L1 action head and proprio projector (trained in full).
//! * [`vla`]: [`OpenVlaTrain`], the [`TrainModel`](crate::seam::TrainModel) implementation.

pub mod attention;
pub mod backend;
pub mod fused;
pub mod fused_reference;
pub mod head;
pub mod llama;
pub mod ops;
pub mod params;
pub mod vla;

pub use backend::Train;
pub use params::{Param, ParamStore, WeightStorage};
pub use vla::{LoadTrainOptions, OpenVlaTrain};
