//! The differentiable OpenVLA used for fine-tuning: the same network as `openvla::model`
//! (DINOv2-reg + SigLIP towers stopping at block `len - 2`, projector, Llama), written only
//! with ops that record a backward in candle (rust-stack §1.7): explicit LayerNorm / RMSNorm
//! from `mean`/`sqr`/`sqrt`, softmax from `exp`/`sum`, rotary embeddings by `narrow`/`cat`,
//! patch embedding as unfold + matmul.
//!
//! * [`params`]: every checkpoint tensor by its HF name, trained ones as float32 `Var`s.
//! * [`ops`]: the differentiable building blocks (linear with LoRA, norms, softmax, rope).
//! * [`fused`]: fused CPU forward kernels with hand-written backwards behind `ops`.
//! * [`backend`]: [`Train`], the differentiable implementation of the one model definition's
//!   backend: the towers, backbone and projector are `openvla::model`'s own
//!   (`VisionBackbone<Train>`, `Projector<Train>`).
//! * [`llama`]: the language model.
//! * [`head`]: OFT's L1 action head and proprio projector (trained in full).
//! * [`vla`]: [`OpenVlaTrain`], the [`TrainModel`](crate::seam::TrainModel) implementation.

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
