//! Int8 and int4 weights: block formats, which layers are quantized, and quantized model
//! directories (see `docs/quantization.md`).

/// The block formats live with the kernels that read them (`crates/openvla-kernels`).
pub use openvla_kernels::format;
pub mod io;
pub mod plan;

pub use format::{QuantFormat, QuantMatrix, BLOCK};
pub use plan::{QuantPlan, Quantization};
