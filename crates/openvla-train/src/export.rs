//! Exporting the weights of a non-LoRA run (`full`, `frozen-vision`, `last-layer`, `sandwich`)
//! as a complete HF model directory (`<run>/model/`) that `openvla predict` / `serve`
//! (`openvla::Policy::load`) and transformers load.
//!
//! The trained tensors come from the objective's float32 `Var`s; every other tensor is copied
//! from the base checkpoint as stored. The directory is written next to its destination under a
//! temporary name (`.model.tmp-<pid>`) and renamed into place only once complete, so a killed
//! export never leaves a partial model at `<run>/model`; an existing export (a resumed run) is
//! replaced by rename, then deleted.
//!
//! An OFT run (`--head l1`) ends with [`export_oft_dir`]: the same directory with any LoRA
//! merged in, plus the OFT constants in `config.json` and the action head and proprio projector
//! files, which is the layout of a published OpenVLA-OFT checkpoint.

use crate::error::{Result, TrainError};
use crate::io::sync_dir;
use crate::lora::LoraAdapter;
use crate::merge::{merge_weight, write_model_files, MergeRecipe, ModelFiles};
use crate::model::head::{L1HeadTrain, ProprioProjectorTrain};
use crate::oft::{component_file_name, write_component};
use candle_core::{DType, Tensor, Var};
use openvla::oft::{ACTION_HEAD, PROPRIO_PROJECTOR};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The dtype of the exported tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ExportDtype {
    /// Each tensor in the base checkpoint's dtype (bf16 for the released OpenVLA checkpoints):
    /// trained float32 weights are rounded once (to nearest even), untouched tensors are copied
    /// bit for bit.
    #[default]
    Base,
    /// Every floating-point tensor in float32: trained weights exactly as trained, untouched
    /// ones widened (exactly) from the base's bf16/f16.
    Float32,
    /// Every floating-point tensor in bf16, rounded once to nearest even (as torch's
    /// `.to(torch.bfloat16)`): half of float32's size, for shipping a model trained from a
    /// float32 `openvla init`.
    Bf16,
}

/// What [`export_model_dir`] writes.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Base HF model directory the run started from.
    pub base: PathBuf,
    /// Destination directory (`<run>/model`); replaced atomically if it exists.
    pub out: PathBuf,
    /// Dtype of the written tensors.
    pub dtype: ExportDtype,
    /// Largest shard in bytes (the reference's `save_pretrained` uses 5 GB).
    pub max_shard_bytes: u64,
    /// `dataset_statistics.json` content (the fine-tuning data's statistics under its dataset
    /// name); `None` copies the base's file if it has one.
    pub dataset_statistics: Option<serde_json::Value>,
}

/// What [`export_model_dir`] wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    /// The model directory.
    pub dir: PathBuf,
    /// Names of the tensors taken from the trained `Var`s or merged with LoRA (sorted).
    pub trained: Vec<String>,
    /// Shard files, under `dir`.
    pub shards: Vec<PathBuf>,
}

/// Removes leftovers of an interrupted export of `out` (`.model.tmp-*`, `.model.old-*`).
fn clean_leftovers(parent: &Path, name: &str) -> Result<()> {
    let tmp = format!(".{name}.tmp-");
    let old = format!(".{name}.old-");
    for e in std::fs::read_dir(parent).map_err(|e| TrainError::io(parent, e))? {
        let e = e.map_err(|e| TrainError::io(parent, e))?;
        let n = e.file_name().to_string_lossy().to_string();
        if n.starts_with(&tmp) || n.starts_with(&old) {
            std::fs::remove_dir_all(e.path()).map_err(|err| TrainError::io(e.path(), err))?;
        }
    }
    Ok(())
}

/// Writes the HF model directory `opts.out`: the base checkpoint's tensors with those named in
/// `trained` replaced by the `Var`s' values (in the dtype [`ExportDtype`] says), sharded like
/// `openvla merge`, plus the base's config, tokenizer and processor files and
/// `dataset_statistics.json`. Every trained name must be a base tensor of the same shape.
pub fn export_model_dir(opts: &ExportOptions, trained: &[(String, Var)]) -> Result<ExportReport> {
    export_dir(opts, trained, None, &mut |_| Ok(()))
}

/// What [`export_oft_dir`] writes besides the weights: the OFT constants (they are not stored
/// in a checkpoint; the engine reads them from `config.json`'s `oft_constants` and
/// `oft_eval_cfg`) and the component files.
#[derive(Debug, Clone, Copy)]
pub struct OftExport<'a> {
    /// Actions per chunk (K).
    pub chunk: usize,
    /// Images per observation.
    pub num_images: usize,
    /// `bounds` or `bounds_q99`.
    pub normalization: openvla::oft::constants::NormalizationType,
    /// Whether the policy centre-crops its images (the reference's eval default, for models
    /// trained with random-crop augmentation).
    pub center_crop: bool,
    /// The LoRA rank, for `oft_eval_cfg.lora_rank` (LoRA runs).
    pub lora_rank: Option<usize>,
    /// The arithmetic the policy was trained with, when not f32: written as `config.json`'s
    /// `inference_compute`, so that serving it uses the same by default
    /// ([`openvla::ModelConfig::inference_compute`]).
    pub inference_compute: Option<openvla::kernels::ComputePrecision>,
    /// The optimizer step, in the component file names.
    pub step: u64,
    /// The action head.
    pub head: &'a L1HeadTrain,
    /// The proprio projector, if the model takes proprio.
    pub proprio: Option<&'a ProprioProjectorTrain>,
}

/// Writes an OpenVLA-OFT checkpoint directory (the layout of the published ones, oft-spec
/// §1.1) at `opts.out`: the backbone with `adapter` merged in float32 (or the trained base
/// `Var`s), sharded; `config.json` with `oft_constants` / `oft_eval_cfg`;
/// `dataset_statistics.json` (action and proprio statistics);
/// `action_head--<step>_checkpoint.pt` and `proprio_projector--<step>_checkpoint.pt`.
/// Published atomically as [`export_model_dir`] is.
pub fn export_oft_dir(
    opts: &ExportOptions,
    trained: &[(String, Var)],
    adapter: Option<&LoraAdapter>,
    oft: &OftExport<'_>,
) -> Result<ExportReport> {
    export_dir(opts, trained, adapter, &mut |dir| {
        write_oft_components(dir, oft.step, oft.head, oft.proprio)?;
        let path = dir.join("config.json");
        let mut config: serde_json::Value = crate::error::read_json(&path)?;
        let obj = config.as_object_mut().ok_or_else(|| {
            TrainError::json(&path, "config.json of the base model is not an object")
        })?;
        let mut constants = serde_json::json!({
            "NUM_ACTIONS_CHUNK": oft.chunk,
            "ACTION_DIM": oft.head.action_dim(),
            "ACTION_PROPRIO_NORMALIZATION_TYPE": oft.normalization.to_string(),
        });
        if let Some(p) = oft.proprio {
            constants["PROPRIO_DIM"] = p.proprio_dim().into();
        }
        let mut eval_cfg = serde_json::json!({
            "num_images_in_input": oft.num_images,
            "use_proprio": oft.proprio.is_some(),
            "use_l1_regression": true,
            "use_diffusion": false,
            "use_film": false,
            "center_crop": oft.center_crop,
        });
        if let Some(r) = oft.lora_rank {
            eval_cfg["lora_rank"] = r.into();
        }
        obj.insert("oft_constants".into(), constants);
        obj.insert("oft_eval_cfg".into(), eval_cfg);
        match oft.inference_compute {
            Some(c) => obj.insert("inference_compute".into(), c.name().into()),
            None => obj.remove("inference_compute"),
        };
        let text = serde_json::to_string_pretty(&config).map_err(|e| TrainError::json(&path, e))?;
        crate::io::write_atomic(&path, text.as_bytes())
    })
}

/// Writes `action_head--<step>_checkpoint.pt` and, with a projector,
/// `proprio_projector--<step>_checkpoint.pt` into `dir` (float32, `module.`-prefixed keys).
pub fn write_oft_components(
    dir: &Path,
    step: u64,
    head: &L1HeadTrain,
    proprio: Option<&ProprioProjectorTrain>,
) -> Result<()> {
    let tensors = |p: Vec<(String, Var)>| -> Vec<(String, Tensor)> {
        p.into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect()
    };
    write_component(
        &dir.join(component_file_name(ACTION_HEAD, step)),
        &tensors(head.named_parameters()),
    )?;
    if let Some(p) = proprio {
        write_component(
            &dir.join(component_file_name(PROPRIO_PROJECTOR, step)),
            &tensors(p.named_parameters()),
        )?;
    }
    Ok(())
}

/// The body of [`export_model_dir`] and [`export_oft_dir`]: `adapter`'s LoRA is merged in
/// float32 into the modules it targets; `finish` writes extra files into the directory before
/// it is published.
fn export_dir(
    opts: &ExportOptions,
    trained: &[(String, Var)],
    adapter: Option<&LoraAdapter>,
    finish: &mut dyn FnMut(&Path) -> Result<()>,
) -> Result<ExportReport> {
    if !opts.base.join("config.json").is_file() {
        return Err(TrainError::Invalid(format!(
            "{} has no config.json; the export needs the base HF model directory",
            opts.base.display()
        )));
    }
    let name = opts
        .out
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .ok_or_else(|| {
            TrainError::Invalid(format!("{} is not a directory path", opts.out.display()))
        })?;
    let parent = opts
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    std::fs::create_dir_all(&parent).map_err(|e| TrainError::io(&parent, e))?;
    clean_leftovers(&parent, &name)?;
    let vars: BTreeMap<&str, &Var> = trained.iter().map(|(n, v)| (n.as_str(), v)).collect();
    let mut expected: BTreeSet<String> = vars.keys().map(|n| n.to_string()).collect();
    let lora: BTreeMap<String, _> = adapter
        .map(|ad| {
            ad.modules
                .iter()
                .map(|(m, w)| (format!("{m}.weight"), w))
                .collect()
        })
        .unwrap_or_default();
    let scaling = adapter.map(|ad| ad.config.scaling()).unwrap_or(1.0);
    expected.extend(lora.keys().cloned());
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::create_dir(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    let dtype = opts.dtype;
    let written = write_model_files(
        &ModelFiles {
            base: &opts.base,
            out: &tmp,
            max_shard_bytes: opts.max_shard_bytes,
            dataset_statistics: opts.dataset_statistics.as_ref(),
        },
        &expected,
        &|n| format!("trained tensor {n} is not in the base checkpoint"),
        &mut |n, stored: Tensor| {
            // The dtype each tensor is written in: floating-point tensors follow `dtype`.
            let target = |stored: DType| match (dtype, stored) {
                (ExportDtype::Float32, DType::BF16 | DType::F16) => DType::F32,
                (ExportDtype::Bf16, DType::F32 | DType::F16) => DType::BF16,
                _ => stored,
            };
            let stored_dtype = stored.dtype();
            if let Some(w) = lora.get(n) {
                let widened = match dtype {
                    ExportDtype::Float32 => stored.to_dtype(target(stored_dtype))?,
                    _ => stored,
                };
                let merged = merge_weight(
                    &widened,
                    w.a.as_tensor(),
                    w.b.as_tensor(),
                    scaling,
                    MergeRecipe::Float32,
                )?;
                return Ok(merged.to_dtype(target(merged.dtype()))?);
            }
            let Some(v) = vars.get(n) else {
                return Ok(stored.to_dtype(target(stored_dtype))?);
            };
            if v.dims() != stored.dims() {
                return Err(TrainError::Invalid(format!(
                    "trained tensor {n} has shape {:?}, the base checkpoint {:?}",
                    v.dims(),
                    stored.dims()
                )));
            }
            let target = target(stored_dtype);
            Ok(v.as_tensor().to_dtype(target)?)
        },
    );
    let written = written.and_then(|s| finish(&tmp).map(|_| s));
    let shards = match written {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    // Publish: move an older export aside, rename the new one into place, drop the old one.
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    let had_old = opts.out.exists();
    if had_old {
        std::fs::rename(&opts.out, &old).map_err(|e| TrainError::io(&opts.out, e))?;
    }
    std::fs::rename(&tmp, &opts.out).map_err(|e| TrainError::io(&opts.out, e))?;
    sync_dir(&parent)?;
    if had_old {
        std::fs::remove_dir_all(&old).map_err(|e| TrainError::io(&old, e))?;
    }
    let shards = shards
        .iter()
        .filter_map(|p| p.file_name())
        .map(|f| opts.out.join(f))
        .collect();
    Ok(ExportReport {
        dir: opts.out.clone(),
        trained: expected.into_iter().collect(),
        shards,
    })
}
