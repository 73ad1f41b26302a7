//! Merging LoRA into base weights, `W' = W + scaling * (B @ A)` (PEFT `merge_and_unload`), and
//! writing a merged HF model directory (`openvla merge`).
//!
//! Two recipes:
//! * [`MergeRecipe::Float32`]: `W' = W + (B @ A) * s` in float32 (the fixture's
//!   `merged_fp32_subset`).
//! * [`MergeRecipe::Bf16Reference`]: what `finetune.py` does on a bf16 base: PEFT casts A and B
//!   to bf16, computes `B @ A` with float32 accumulation and one rounding to bf16, multiplies by
//!   the scaling in bf16 and adds to W in bf16 (the fixture's `merged_model/`).
//!
//! A Conv2d delta is `B[:, :, 0, 0] @ A.reshape(r, -1)` reshaped to the kernel's shape (PEFT's
//! `conv2d(A.permute(1,0,2,3), B).permute(1,0,2,3)`).

use crate::error::{read_json, Result, TrainError};
use crate::io::{pt_metadata, sync_dir, write_atomic, write_safetensors};
use crate::lora::adapter::LoraAdapter;
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// How a merge rounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MergeRecipe {
    /// Exactly PEFT 0.11.1 on a bf16 base (the reference's released merges).
    #[default]
    Bf16Reference,
    /// Float32 arithmetic, rounded once to the checkpoint dtype.
    Float32,
}

/// `B @ A` as a `[out, in...]` tensor in the dtype of `a`/`b` (float32 accumulation).
fn b_times_a(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let r = a.dims()[0];
    let a2 = a.reshape((r, a.elem_count() / r))?;
    let out = b.dims()[0];
    let b2 = b.reshape((out, r))?;
    let d = b2.to_dtype(DType::F32)?.matmul(&a2.to_dtype(DType::F32)?)?;
    let mut shape = vec![out];
    shape.extend_from_slice(&a.dims()[1..]);
    Ok(d.reshape(shape)?)
}

/// The float32 delta `(B @ A) * scaling`, shaped like the base weight.
pub fn delta_weight_f32(a: &Tensor, b: &Tensor, scaling: f64) -> Result<Tensor> {
    let d = b_times_a(&a.to_dtype(DType::F32)?, &b.to_dtype(DType::F32)?)?;
    Ok((d * scaling)?)
}

/// Merges one weight. `w` may be any float dtype; the result has `w`'s dtype.
pub fn merge_weight(
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scaling: f64,
    recipe: MergeRecipe,
) -> Result<Tensor> {
    let (r, out) = (a.dims()[0], b.dims()[0]);
    let expect: usize = out * a.elem_count() / r.max(1);
    if w.dims()[0] != out || w.elem_count() != expect {
        return Err(TrainError::Invalid(format!(
            "cannot merge: base weight {:?} vs lora_A {:?} / lora_B {:?}",
            w.dims(),
            a.dims(),
            b.dims()
        )));
    }
    let merged = match recipe {
        MergeRecipe::Float32 => {
            let d = delta_weight_f32(a, b, scaling)?.reshape(w.shape())?;
            (w.to_dtype(DType::F32)? + d)?.to_dtype(w.dtype())?
        }
        MergeRecipe::Bf16Reference => {
            let ab = a.to_dtype(DType::BF16)?;
            let bb = b.to_dtype(DType::BF16)?;
            // bf16 matmul: float32 accumulation, one rounding.
            let d = b_times_a(&ab, &bb)?.to_dtype(DType::BF16)?;
            let d = bf16_scale(&d, scaling)?.reshape(w.shape())?;
            let wb = w.to_dtype(DType::BF16)?;
            (wb.to_dtype(DType::F32)? + d.to_dtype(DType::F32)?)?
                .to_dtype(DType::BF16)?
                .to_dtype(w.dtype())?
        }
    };
    Ok(merged)
}

/// `bf16(x * s)` for a bf16 tensor and a Python-float scalar (torch computes `x * s` in float32
/// and rounds once).
fn bf16_scale(x: &Tensor, s: f64) -> Result<Tensor> {
    Ok((x.to_dtype(DType::F32)? * (s as f32) as f64)?.to_dtype(DType::BF16)?)
}

/// Merges `adapter` into a state dict in place (module `m`'s `m.weight`). Returns the names of
/// the changed tensors. Every adapted module must be present.
pub fn merge_state_dict(
    tensors: &mut BTreeMap<String, Tensor>,
    adapter: &LoraAdapter,
    recipe: MergeRecipe,
) -> Result<Vec<String>> {
    let s = adapter.config.scaling();
    let mut changed = Vec::new();
    for (m, w) in &adapter.modules {
        let key = format!("{m}.weight");
        let base = tensors.get(&key).ok_or_else(|| {
            TrainError::Invalid(format!(
                "the adapter targets {m}, but {key} is not in the model"
            ))
        })?;
        let merged = merge_weight(base, w.a.as_tensor(), w.b.as_tensor(), s, recipe)?;
        tensors.insert(key.clone(), merged);
        changed.push(key);
    }
    Ok(changed)
}

/// The safetensors files of a model directory: the shards named by
/// `model.safetensors.index.json`, or `model.safetensors`.
pub fn model_shards(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let v: serde_json::Value = read_json(&index)?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| TrainError::json(&index, "no weight_map"))?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|f| f.as_str().map(str::to_string))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(TrainError::Invalid(format!(
        "{} has neither model.safetensors nor model.safetensors.index.json",
        dir.display()
    )))
}

/// Options of [`merge_model_dir`].
#[derive(Debug, Clone)]
pub struct MergeOptions {
    /// Base HF model directory.
    pub base: PathBuf,
    /// PEFT adapter directory.
    pub adapter: PathBuf,
    /// Output directory (created; must be empty or absent).
    pub out: PathBuf,
    /// Rounding recipe.
    pub recipe: MergeRecipe,
    /// Largest output shard in bytes (the reference's `save_pretrained` uses 5 GB).
    pub max_shard_bytes: u64,
    /// `dataset_statistics.json` content to write (the fine-tuning data's statistics under its
    /// dataset name); `None` copies the base directory's file if it has one.
    pub dataset_statistics: Option<serde_json::Value>,
}

/// Files copied from the base directory as they are.
const COPIED_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "added_tokens.json",
    "configuration_prismatic.py",
    "modeling_prismatic.py",
    "processing_prismatic.py",
];

/// What [`merge_model_dir`] wrote.
#[derive(Debug, Clone)]
pub struct MergeReport {
    /// Tensors changed by the merge.
    pub changed: Vec<String>,
    /// Shard files written.
    pub shards: Vec<PathBuf>,
}

/// Writes a merged HF model directory: sharded safetensors (`model-0000i-of-0000n`, plus the
/// index) or `model.safetensors` when it fits one shard, the base's config, tokenizer and
/// processor files, and `dataset_statistics.json`. Tensors keep the base checkpoint's dtype.
pub fn merge_model_dir(opts: &MergeOptions) -> Result<MergeReport> {
    let adapter = LoraAdapter::load(&opts.adapter, &Device::Cpu)?;
    if !opts.base.join("config.json").is_file() {
        return Err(TrainError::Invalid(format!(
            "{} has no config.json; --model must be an HF model directory",
            opts.base.display()
        )));
    }
    if opts.out.exists()
        && std::fs::read_dir(&opts.out)
            .map_err(|e| TrainError::io(&opts.out, e))?
            .next()
            .is_some()
    {
        return Err(TrainError::Invalid(format!(
            "output directory {} is not empty",
            opts.out.display()
        )));
    }
    std::fs::create_dir_all(&opts.out).map_err(|e| TrainError::io(&opts.out, e))?;
    let s = adapter.config.scaling();
    let expected: std::collections::BTreeSet<String> = adapter
        .modules
        .keys()
        .map(|m| format!("{m}.weight"))
        .collect();
    let mut changed = Vec::new();
    let shards = write_model_files(
        &ModelFiles {
            base: &opts.base,
            out: &opts.out,
            max_shard_bytes: opts.max_shard_bytes,
            dataset_statistics: opts.dataset_statistics.as_ref(),
        },
        &expected,
        &|name| {
            format!(
                "the adapter targets {}, which the base checkpoint does not have",
                name.strip_suffix(".weight").unwrap_or(name)
            )
        },
        &mut |name, t| {
            let Some(w) = name
                .strip_suffix(".weight")
                .and_then(|m| adapter.modules.get(m))
            else {
                return Ok(t);
            };
            changed.push(name.to_string());
            merge_weight(&t, w.a.as_tensor(), w.b.as_tensor(), s, opts.recipe)
        },
    )?;
    changed.sort();
    Ok(MergeReport { changed, shards })
}

/// Where [`write_model_files`] reads and writes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ModelFiles<'a> {
    /// Base HF model directory (safetensors, config, tokenizer and processor files).
    pub base: &'a Path,
    /// Existing directory the files are written into.
    pub out: &'a Path,
    /// Largest output shard in bytes.
    pub max_shard_bytes: u64,
    /// `dataset_statistics.json` content; `None` copies the base's file if it has one.
    pub dataset_statistics: Option<&'a serde_json::Value>,
}

/// Writes an HF model directory into `files.out`: every tensor of the base checkpoint (read
/// shard by shard, passed through `transform`, which returns the tensor to store), grouped into
/// `model.safetensors` or `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`
/// (`format: pt`), the base's config/tokenizer/processor files and `dataset_statistics.json`.
/// Every name in `expected` must be a base tensor (checked before anything is written;
/// `missing` words the error). Returns the shard paths.
pub(crate) fn write_model_files(
    files: &ModelFiles<'_>,
    expected: &std::collections::BTreeSet<String>,
    missing: &dyn Fn(&str) -> String,
    transform: &mut dyn FnMut(&str, Tensor) -> Result<Tensor>,
) -> Result<Vec<PathBuf>> {
    let out = files.out;
    let mut inputs = Vec::new();
    let mut present = std::collections::BTreeSet::new();
    for shard in model_shards(files.base)? {
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(&shard) }
            .map_err(|e| TrainError::Invalid(format!("{}: {e}", shard.display())))?;
        let mut names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
        names.sort();
        present.extend(names.iter().cloned());
        inputs.push((st, names));
    }
    if let Some(n) = expected.iter().find(|n| !present.contains(*n)) {
        return Err(TrainError::Invalid(missing(n)));
    }
    // Stream input shards; group tensors into output shards of at most max_shard_bytes.
    let mut pending: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut pending_bytes = 0u64;
    let mut groups: Vec<Vec<String>> = Vec::new();
    let mut tmp_files: Vec<PathBuf> = Vec::new();
    let mut total = 0u64;
    let mut flush =
        |pending: &mut BTreeMap<String, Tensor>, groups: &mut Vec<Vec<String>>| -> Result<()> {
            if pending.is_empty() {
                return Ok(());
            }
            let path = out.join(format!(".shard-{}.tmp", groups.len()));
            write_safetensors(&path, pending, &pt_metadata())?;
            groups.push(pending.keys().cloned().collect());
            tmp_files.push(path);
            pending.clear();
            Ok(())
        };
    for (st, names) in &inputs {
        for name in names {
            let t = transform(name, st.load(name, &Device::Cpu)?)?;
            let bytes = (t.elem_count() * t.dtype().size_in_bytes()) as u64;
            if pending_bytes + bytes > files.max_shard_bytes && !pending.is_empty() {
                flush(&mut pending, &mut groups)?;
                pending_bytes = 0;
            }
            pending_bytes += bytes;
            total += bytes;
            pending.insert(name.clone(), t);
        }
    }
    flush(&mut pending, &mut groups)?;
    // Name the shards now that their number is known.
    let n = groups.len();
    let mut shards = Vec::new();
    let mut weight_map = serde_json::Map::new();
    for (i, names) in groups.iter().enumerate() {
        let fname = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
        };
        let dst = out.join(&fname);
        std::fs::rename(&tmp_files[i], &dst).map_err(|e| TrainError::io(&dst, e))?;
        for name in names {
            weight_map.insert(name.clone(), serde_json::Value::String(fname.clone()));
        }
        shards.push(dst);
    }
    if n > 1 {
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let text = serde_json::to_string_pretty(&index).map_err(|e| TrainError::json(out, e))?;
        write_atomic(&out.join("model.safetensors.index.json"), text.as_bytes())?;
    }
    for f in COPIED_FILES {
        let src = files.base.join(f);
        if src.is_file() {
            let bytes = std::fs::read(&src).map_err(|e| TrainError::io(&src, e))?;
            write_atomic(&out.join(f), &bytes)?;
        }
    }
    let stats_dst = out.join("dataset_statistics.json");
    match files.dataset_statistics {
        Some(v) => {
            let text =
                serde_json::to_string_pretty(v).map_err(|e| TrainError::json(&stats_dst, e))?;
            write_atomic(&stats_dst, text.as_bytes())?;
        }
        None => {
            let src = files.base.join("dataset_statistics.json");
            if src.is_file() {
                let bytes = std::fs::read(&src).map_err(|e| TrainError::io(&src, e))?;
                write_atomic(&stats_dst, &bytes)?;
            }
        }
    }
    sync_dir(out)?;
    Ok(shards)
}
