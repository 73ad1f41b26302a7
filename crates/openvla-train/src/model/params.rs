//! Every checkpoint tensor of the model by its HF name: trained ones as float32 [`Var`]s,
//! frozen ones as plain tensors, and the frozen tensors no forward uses (the towers' blocks
//! after `len - 2`, their final norms, SigLIP's attention pool) by shape only.

use crate::error::{Result, TrainError};
use crate::lora::targets::modules_from_tensors;
use crate::lora::{LoraLayer, ModuleInfo};
use candle_core::{DType, Device, Tensor, Var};
use openvla::checkpoint::{Checkpoint, StoredDtype};
use openvla::ModelConfig;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use openvla::model::vision::TOWER_PREFIXES;

/// The output projection that tied embeddings replace by `embed_tokens`.
const TIED_LM_HEAD: &str = "language_model.lm_head.weight";

/// How frozen weight matrices are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightStorage {
    /// float32.
    F32,
    /// bf16 (half the memory; widened to float32 for each product).
    Bf16,
}

/// One checkpoint tensor.
#[derive(Debug, Clone)]
pub enum Param {
    /// Trained: a float32 variable whose tensor is the one the forward uses.
    Trainable(Var),
    /// Frozen, in float32 or (weight matrices with [`WeightStorage::Bf16`]) bf16.
    Frozen(Tensor),
    /// Frozen and unused by the forward: only its shape is kept.
    Unused(Vec<usize>),
}

impl Param {
    /// The tensor's shape.
    pub fn shape(&self) -> Vec<usize> {
        match self {
            Param::Trainable(v) => v.dims().to_vec(),
            Param::Frozen(t) => t.dims().to_vec(),
            Param::Unused(s) => s.clone(),
        }
    }
}

/// The model's tensors by checkpoint name and the LoRA branches attached to its modules.
#[derive(Debug)]
pub struct ParamStore {
    params: BTreeMap<String, Param>,
    /// Names in model order (the order of `openvla::synth::checkpoint_tensors`).
    order: Vec<String>,
    lora: HashMap<String, Arc<LoraLayer>>,
    used: Mutex<BTreeSet<String>>,
    storage: WeightStorage,
}

/// Whether tensor `name` is one the reference stores but never uses in its forward: tower
/// blocks after `len - 2`, a tower's final `norm`, SigLIP's `attn_pool`.
pub fn is_unused(name: &str, config: &ModelConfig) -> bool {
    for (prefix, tower) in TOWER_PREFIXES.iter().zip(&config.towers) {
        let Some(rest) = name.strip_prefix(prefix).and_then(|r| r.strip_prefix('.')) else {
            continue;
        };
        if rest.starts_with("norm.") || rest.starts_with("attn_pool.") {
            return true;
        }
        if let Some(b) = rest.strip_prefix("blocks.") {
            let idx = b.split('.').next().and_then(|i| i.parse::<usize>().ok());
            return idx.is_some_and(|i| i > tower.selected_block());
        }
    }
    false
}

impl ParamStore {
    /// Reads the checkpoint in `dir`. Tensors whose name `trainable` accepts become float32
    /// `Var`s (unused ones too, so the optimizer sees them and leaves them alone); the others
    /// are frozen tensors in `storage` (weight matrices) or float32 (vectors), or shape-only
    /// entries when the forward never reads them.
    ///
    /// With `text_config.tie_word_embeddings` the output projection is the embedding matrix
    /// (HF semantics): the store holds `embed_tokens` alone, the model reads it for both, and
    /// training updates that one shared tensor. A stored `lm_head.weight` is dropped, as
    /// transformers' `tie_weights` replaces it; exports then omit it too.
    pub fn load(
        dir: &Path,
        config: &ModelConfig,
        trainable: &dyn Fn(&str) -> bool,
        storage: WeightStorage,
        device: &Device,
    ) -> Result<Self> {
        let ckpt = Checkpoint::open_dir(dir)?;
        let mut params = BTreeMap::new();
        let tied = config.text.tie_word_embeddings;
        for name in ckpt.names() {
            if tied && name == TIED_LM_HEAD {
                continue;
            }
            let info = ckpt.info(name).ok_or_else(|| {
                TrainError::Invalid(format!("checkpoint tensor {name} vanished from its index"))
            })?;
            if info.dtype == StoredDtype::U8 || name.contains(".q8_0.") || name.contains(".q4_0.") {
                return Err(TrainError::Invalid(format!(
                    "{}: tensor {name} is quantized; fine-tuning needs a floating-point \
                     checkpoint (the original HF model directory)",
                    dir.display()
                )));
            }
            let shape = info.shape.clone();
            let p = if trainable(name) {
                Param::Trainable(Var::from_tensor(&ckpt.load(
                    name,
                    &shape,
                    DType::F32,
                    device,
                )?)?)
            } else if is_unused(name, config) {
                Param::Unused(shape)
            } else {
                let dtype = match storage {
                    WeightStorage::Bf16 if shape.len() >= 2 && name.ends_with(".weight") => {
                        DType::BF16
                    }
                    _ => DType::F32,
                };
                Param::Frozen(ckpt.load(name, &shape, dtype, device)?)
            };
            params.insert(name.to_string(), p);
        }
        let mut order: Vec<String> = openvla::synth::checkpoint_tensors(config)
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| params.contains_key(n))
            .collect();
        let known: BTreeSet<&String> = order.iter().collect();
        let extra: Vec<String> = params
            .keys()
            .filter(|n| !known.contains(n))
            .cloned()
            .collect();
        order.extend(extra);
        Ok(Self {
            params,
            order,
            lora: HashMap::new(),
            used: Mutex::new(BTreeSet::new()),
            storage,
        })
    }

    /// How frozen weight matrices are held.
    pub fn storage(&self) -> WeightStorage {
        self.storage
    }

    /// Whether the checkpoint has tensor `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.params.contains_key(name)
    }

    /// The tensor `name`, checked against `shape` (the forward's view of a trainable `Var`).
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = match self.params.get(name) {
            Some(Param::Trainable(v)) => v.as_tensor().clone(),
            Some(Param::Frozen(t)) => t.clone(),
            Some(Param::Unused(_)) => {
                return Err(TrainError::Invalid(format!(
                    "tensor {name} was loaded as unused but the model reads it"
                )))
            }
            None => {
                return Err(TrainError::Invalid(format!(
                    "the checkpoint has no tensor {name} (expected shape {shape:?})"
                )))
            }
        };
        if t.dims() != shape {
            return Err(TrainError::Invalid(format!(
                "checkpoint tensor {name} has shape {:?}; the config implies {shape:?}",
                t.dims()
            )));
        }
        if let Ok(mut u) = self.used.lock() {
            u.insert(name.to_string());
        }
        Ok(t)
    }

    /// Fails on any tensor that is neither read by the model nor knowingly unused (a checkpoint
    /// of a different architecture).
    pub fn check_all_used(&self, config: &ModelConfig) -> Result<()> {
        let used = self
            .used
            .lock()
            .map_err(|_| TrainError::Invalid("parameter bookkeeping poisoned".into()))?;
        let extra: Vec<&str> = self
            .params
            .keys()
            .filter(|n| !used.contains(*n) && !is_unused(n, config))
            .map(|s| s.as_str())
            .take(5)
            .collect();
        if extra.is_empty() {
            Ok(())
        } else {
            Err(TrainError::Invalid(format!(
                "the checkpoint holds tensors this model does not use: {}",
                extra.join(", ")
            )))
        }
    }

    /// Trainable parameters by checkpoint name, in model order.
    pub fn named_parameters(&self) -> Vec<(String, Var)> {
        self.iter()
            .filter_map(|(n, p)| match p {
                Param::Trainable(v) => Some((n.clone(), v.clone())),
                _ => None,
            })
            .collect()
    }

    /// Every tensor with its state, in model order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Param)> {
        self.order
            .iter()
            .filter_map(|n| self.params.get_key_value(n))
    }

    /// Every Linear / Conv2d / Embedding module (from the weight tensors' names and shapes).
    pub fn modules(&self) -> Vec<ModuleInfo> {
        let tensors: Vec<(String, Vec<usize>)> =
            self.iter().map(|(n, p)| (n.clone(), p.shape())).collect();
        modules_from_tensors(&tensors)
    }

    /// Attaches a LoRA branch to module `name` (which must have a weight matrix).
    pub fn attach_lora(&mut self, name: &str, layer: Arc<LoraLayer>) -> Result<()> {
        let w = format!("{name}.weight");
        match self.params.get(&w) {
            Some(p) if p.shape().len() >= 2 => {
                self.lora.insert(name.to_string(), layer);
                Ok(())
            }
            _ => Err(TrainError::Invalid(format!(
                "cannot attach LoRA to {name}: the model has no such Linear or Conv2d"
            ))),
        }
    }

    /// The LoRA branch of module `name`, if any.
    pub fn lora(&self, name: &str) -> Option<&Arc<LoraLayer>> {
        self.lora.get(name)
    }
}

impl crate::lora::Adapters for ParamStore {
    fn lora(&self, name: &str) -> Option<&Arc<LoraLayer>> {
        ParamStore::lora(self, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::llama::LlamaTrain;
    use openvla::init::{InitConfig, InitOptions};
    use openvla::synth::SavedDtype;

    /// A tiny from-scratch model (one SigLIP-like tower, 256-bin head) with tied embeddings.
    fn tiny_tied(dir: &Path, tie: bool) -> ModelConfig {
        let text = format!(
            r#"
            [vision]
            image_size = 32
            [[vision.towers]]
            kind = "siglip"
            width = 16
            depth = 2
            heads = 2
            patch_size = 16
            [llm]
            width = 16
            depth = 1
            heads = 2
            intermediate = 32
            tie_word_embeddings = {tie}
            [head]
            kind = "bins"
            "#
        );
        let cfg = InitConfig::from_toml(&text, Path::new("tiny.toml")).unwrap();
        let tokenizer =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/openvla-tiny/tokenizer.json");
        openvla::init::write_initialized(
            dir,
            &cfg,
            &InitOptions {
                seed: 3,
                dtype: SavedDtype::F32,
                tokenizer,
                stats: None,
                max_shard_bytes: u64::MAX,
            },
            &|_, _| {},
        )
        .unwrap();
        ModelConfig::from_file(&dir.join("config.json")).unwrap()
    }

    #[test]
    fn tied_embeddings_train_one_shared_tensor() {
        let tmp = tempfile::tempdir().unwrap();
        let config = tiny_tied(tmp.path(), true);
        let dev = Device::Cpu;
        let store =
            ParamStore::load(tmp.path(), &config, &|_| true, WeightStorage::F32, &dev).unwrap();
        let names: Vec<String> = store
            .named_parameters()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert!(names
            .iter()
            .any(|n| n == "language_model.model.embed_tokens.weight"));
        assert!(!store.contains(TIED_LM_HEAD));
        let llm = LlamaTrain::load(&store, &config.text).unwrap();
        // The logits read every row of the shared matrix, the embedding only rows 5 and 7: a
        // gradient on row 100 can only come through the output projection.
        let ids = Tensor::new(&[[5u32, 7]], &dev).unwrap();
        let h = llm.embed(&ids).unwrap();
        let loss = llm.logits(&store, &h).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let (_, var) = store
            .named_parameters()
            .into_iter()
            .find(|(n, _)| n == "language_model.model.embed_tokens.weight")
            .unwrap();
        let g = grads
            .get(var.as_tensor())
            .expect("embed_tokens gets a gradient");
        let row = |r: usize| g.get(r).unwrap().abs().unwrap().sum_all().unwrap();
        assert!(row(100).to_scalar::<f32>().unwrap() > 0.0);
        assert!(row(5).to_scalar::<f32>().unwrap() > 0.0);
        // The whole training model loads (every stored tensor used or knowingly unused).
        crate::model::OpenVlaTrain::load(
            tmp.path(),
            crate::model::LoadTrainOptions {
                mode: crate::TrainMode::Full,
                storage: WeightStorage::F32,
            },
            &dev,
        )
        .unwrap();
    }

    #[test]
    fn a_stored_lm_head_is_dropped_when_tied() {
        let tmp = tempfile::tempdir().unwrap();
        let mut config = tiny_tied(tmp.path(), false);
        let dev = Device::Cpu;
        let untied =
            ParamStore::load(tmp.path(), &config, &|_| true, WeightStorage::F32, &dev).unwrap();
        assert!(untied.contains(TIED_LM_HEAD));
        config.text.tie_word_embeddings = true;
        let tied =
            ParamStore::load(tmp.path(), &config, &|_| true, WeightStorage::F32, &dev).unwrap();
        assert!(!tied.contains(TIED_LM_HEAD));
        assert_eq!(
            tied.named_parameters().len() + 1,
            untied.named_parameters().len()
        );
    }
}
