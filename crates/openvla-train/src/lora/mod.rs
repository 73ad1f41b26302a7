//! LoRA in PEFT 0.11.1's format and semantics: the adapter config (`adapter_config.json`), which
//! modules `all-linear` targets on OpenVLA, the adapter weights (`adapter_model.safetensors`
//! with PEFT key names), initialization, and the LoRA forward of a wrapped layer.

pub mod adapter;
pub mod config;
pub mod layer;
pub mod targets;

pub use adapter::{LoraAdapter, LoraWeights};
pub use config::{LoraConfig, TargetModules};
pub use layer::LoraLayer;

use std::sync::Arc;

/// Where a layer finds its LoRA branch, by module name: the model's parameter store, or
/// [`NoAdapters`] for modules trained in full (the OFT head and proprio projector).
pub trait Adapters {
    /// The LoRA branch of module `name`, if any.
    fn lora(&self, name: &str) -> Option<&Arc<LoraLayer>>;
}

/// No module has a LoRA branch.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoAdapters;

impl Adapters for NoAdapters {
    fn lora(&self, _: &str) -> Option<&Arc<LoraLayer>> {
        None
    }
}
pub use targets::{ModuleInfo, ModuleKind};
