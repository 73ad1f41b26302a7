//! `openvla quantize`: a quantized copy of a model directory, written tensor by tensor in the
//! layout of [`crate::quant::io`]. A job over whole checkpoints, so it sits above both the
//! quantization formats and the checkpoint reader (neither imports it).

use crate::error::{Error, Result};
use crate::model::checkpoint::{Checkpoint, StoredDtype};
use crate::quant::io::{read_manifest, tensor_names, MANIFEST};
use crate::quant::{QuantFormat, QuantMatrix, Quantization, BLOCK};
use serde_json::json;
use std::io::{BufWriter, Write};
use std::path::Path;

/// Progress of [`quantize_model_dir`]: bytes of source tensors processed and in total.
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

/// Summary of a quantized model directory.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QuantizeReport {
    /// The mode.
    pub quantization: String,
    /// Matrices written per format (`q8_0`, `q4_0`).
    pub matrices: std::collections::BTreeMap<String, usize>,
    /// Bytes of tensor data in the source checkpoint.
    pub source_bytes: u64,
    /// Bytes of tensor data written.
    pub output_bytes: u64,
}

/// Writes a quantized copy of the HF model directory `src` to `out` (`openvla quantize`).
///
/// `out` gets every file of `src` except the weights (config, tokenizer files, preprocessor
/// config, dataset statistics, ...), one `model.safetensors` in which each matrix that `mode`
/// quantizes ([`crate::quant::Quantization::format_for`] of [`crate::quant::plan::kind_of`]) is replaced by its
/// quants and scales ([`tensor_names`]) and every other tensor is copied as stored, and
/// `quantization.json`. Tensors are read, quantized and written one at a time.
pub fn quantize_model_dir(
    src: &Path,
    out: &Path,
    mode: Quantization,
    progress: Option<Progress>,
) -> Result<QuantizeReport> {
    if read_manifest(src)?.is_some() {
        return Err(Error::config(
            src.join(MANIFEST),
            "the source model directory is already quantized; quantize the original checkpoint",
        ));
    }
    // Fails early on a directory that is not a model.
    crate::config::ModelConfig::from_file(&src.join("config.json"))?;
    let ckpt = Checkpoint::open_dir(src)?;
    if let (Ok(a), Ok(b)) = (src.canonicalize(), out.canonicalize()) {
        if a == b {
            return Err(Error::config(
                out,
                "the output directory is the source directory",
            ));
        }
    }
    if out.exists() {
        let mut entries = std::fs::read_dir(out).map_err(|e| Error::io(out, e))?;
        if entries.next().is_some() {
            return Err(Error::config(
                out,
                "the output directory exists and is not empty; choose a new directory",
            ));
        }
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;

    // Plan every output tensor: (name, dtype, shape, source tensor, format).
    struct Entry {
        name: String,
        dtype: &'static str,
        shape: Vec<usize>,
        bytes: u64,
        source: String,
        quant: Option<(QuantFormat, bool)>, // (format, is the quants part)
    }
    let mut entries = Vec::new();
    let mut matrices = std::collections::BTreeMap::new();
    let names: Vec<String> = ckpt.names().map(str::to_string).collect();
    for name in &names {
        let Some(info) = ckpt.info(name) else {
            continue;
        };
        let format = crate::quant::plan::kind_of(name)
            .and_then(|k| mode.format_for(k))
            .filter(|_| info.shape.len() == 2 && info.dtype != StoredDtype::U8);
        match format {
            Some(f) => {
                let (rows, cols) = (info.shape[0], info.shape[1]);
                let bpr = cols.div_ceil(BLOCK);
                let (qs, d) = tensor_names(name, f);
                let qs_shape = vec![rows, bpr * f.block_bytes()];
                entries.push(Entry {
                    bytes: (rows * bpr * f.block_bytes()) as u64,
                    name: qs,
                    dtype: "U8",
                    shape: qs_shape,
                    source: name.clone(),
                    quant: Some((f, true)),
                });
                entries.push(Entry {
                    bytes: (rows * bpr * 2) as u64,
                    name: d,
                    dtype: "F16",
                    shape: vec![rows, bpr],
                    source: name.clone(),
                    quant: Some((f, false)),
                });
                *matrices.entry(f.name().to_string()).or_insert(0) += 1;
            }
            None => entries.push(Entry {
                name: name.clone(),
                dtype: info.dtype.name(),
                shape: info.shape.clone(),
                bytes: info.len,
                source: name.clone(),
                quant: None,
            }),
        }
    }
    let (header, output_bytes) = crate::checkpoint::safetensors_header(
        Some(json!({"format": "pt", "openvla.quantization": mode.name()})),
        entries
            .iter()
            .map(|e| (e.name.as_str(), e.dtype, e.shape.as_slice(), e.bytes)),
    );
    // Write to a temporary name and rename at the end, so an interrupted run leaves no
    // loadable half-written model.
    let tmp = out.join("model.safetensors.partial");
    let path = out.join("model.safetensors");
    let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut w = BufWriter::with_capacity(1 << 22, file);
    let io = |e| Error::io(&tmp, e);
    w.write_all(&header).map_err(io)?;
    let total = ckpt.total_bytes();
    let mut done = 0u64;
    let mut pending: Option<QuantMatrix> = None;
    for e in &entries {
        match e.quant {
            None => {
                w.write_all(&ckpt.read_bytes(&e.source)?).map_err(io)?;
            }
            Some((f, true)) => {
                let info = ckpt.info(&e.source).ok_or_else(|| {
                    Error::checkpoint(&path, format!("tensor {:?} vanished", e.source))
                })?;
                let (rows, cols) = (info.shape[0], info.shape[1]);
                let v = ckpt.read_f32(&e.source, &[rows, cols])?;
                let q = QuantMatrix::quantize(f, &v, rows, cols);
                w.write_all(q.qs()).map_err(io)?;
                pending = Some(q);
            }
            Some((_, false)) => {
                let q = pending.take().ok_or_else(|| {
                    Error::InvalidInput(format!("scales of {:?} before its quants", e.source))
                })?;
                w.write_all(bytemuck::cast_slice(q.scales())).map_err(io)?;
            }
        }
        if e.quant.is_none_or(|(_, qs)| !qs) {
            done += ckpt.info(&e.source).map(|i| i.len).unwrap_or(0);
            if let Some(p) = progress {
                p(done, total);
            }
        }
    }
    w.flush().map_err(io)?;
    drop(w);
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;

    // Every other file of the model directory, as is.
    for entry in std::fs::read_dir(src).map_err(|e| Error::io(src, e))? {
        let entry = entry.map_err(|e| Error::io(src, e))?;
        let name = entry.file_name();
        let name_str = name.to_string_lossy();
        let is_weights = name_str.ends_with(".safetensors")
            || name_str == "model.safetensors.index.json"
            || name_str == MANIFEST;
        if is_weights || !entry.path().is_file() {
            continue;
        }
        std::fs::copy(entry.path(), out.join(&name)).map_err(|e| Error::io(entry.path(), e))?;
    }
    let report = QuantizeReport {
        quantization: mode.name().to_string(),
        matrices,
        source_bytes: total,
        output_bytes,
    };
    let manifest = json!({
        "quantization": mode.name(),
        "block_size": BLOCK,
        "formats": {
            "q8_0": "int8, blocks of 32 along in_features, f16 scale: w = d*q",
            "q4_0": "int4, blocks of 32 along in_features, f16 scale: w = d*(q-8)"
        },
        "layers": {
            "vision": mode.format_for(crate::model::linear::LayerKind::Vision).map(|f| f.name()),
            "projector": mode.format_for(crate::model::linear::LayerKind::Projector).map(|f| f.name()),
            "llm": mode.format_for(crate::model::linear::LayerKind::Llm).map(|f| f.name()),
            "lm_head": mode.format_for(crate::model::linear::LayerKind::LmHead).map(|f| f.name()),
            "embed_tokens": mode.format_for(crate::model::linear::LayerKind::Embedding).map(|f| f.name()),
            "patch_embed": mode.format_for(crate::model::linear::LayerKind::PatchEmbed).map(|f| f.name()),
        },
        "matrices": report.matrices,
        "source_bytes": report.source_bytes,
        "output_bytes": report.output_bytes,
    });
    let text =
        serde_json::to_string_pretty(&manifest).map_err(|e| Error::InvalidInput(e.to_string()))?;
    let mpath = out.join(MANIFEST);
    std::fs::write(&mpath, text).map_err(|e| Error::io(&mpath, e))?;
    Ok(report)
}
