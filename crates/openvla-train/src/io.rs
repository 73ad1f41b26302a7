//! Durable file output: atomic writes (temporary file, fsync, rename, fsync of the directory)
//! and a safetensors writer that records `{"format": "pt"}` metadata, which transformers
//! requires when it loads a checkpoint.

use crate::error::{Result, TrainError};
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` atomically: a sibling temporary file is written and fsynced, then
/// renamed over `path`, then the directory is fsynced. A crash leaves either the old or the new
/// file, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// Like [`write_atomic`], with the content produced by `fill`.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut std::io::BufWriter<&File>) -> std::io::Result<()>,
) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| TrainError::Invalid(format!("{} is not a file path", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let file = File::create(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    {
        let mut w = std::io::BufWriter::new(&file);
        fill(&mut w).map_err(|e| TrainError::io(&tmp, e))?;
        w.flush().map_err(|e| TrainError::io(&tmp, e))?;
    }
    file.sync_all().map_err(|e| TrainError::io(&tmp, e))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(|e| TrainError::io(path, e))?;
    sync_dir(dir)
}

/// fsyncs a directory so that renames and creations inside it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    let d = File::open(dir).map_err(|e| TrainError::io(dir, e))?;
    // Some filesystems refuse fsync on directories; durability is then best effort.
    let _ = d.sync_all();
    Ok(())
}

fn dtype_name(d: DType) -> Result<&'static str> {
    Ok(match d {
        DType::F32 => "F32",
        DType::F64 => "F64",
        DType::BF16 => "BF16",
        DType::F16 => "F16",
        DType::I64 => "I64",
        DType::U32 => "U32",
        DType::U8 => "U8",
        other => {
            return Err(TrainError::Invalid(format!(
                "cannot write dtype {other:?} to safetensors"
            )))
        }
    })
}

/// Little-endian bytes of a tensor (any layout; copied to the host).
pub fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => t
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::F64 => t
            .to_vec1::<f64>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::BF16 => t
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|x| x.to_bits().to_le_bytes())
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|x| x.to_bits().to_le_bytes())
            .collect(),
        DType::I64 => t
            .to_vec1::<i64>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::U32 => t
            .to_vec1::<u32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::U8 => t.to_vec1::<u8>()?,
        other => {
            return Err(TrainError::Invalid(format!(
                "cannot write dtype {other:?} to safetensors"
            )))
        }
    })
}

/// Writes tensors (sorted by name) to a safetensors file atomically, with `metadata` (use
/// [`pt_metadata`] for files transformers/PEFT load).
pub fn write_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let metadata = if metadata.is_empty() {
        None
    } else {
        Some(serde_json::to_value(metadata).map_err(|e| TrainError::json(path, e))?)
    };
    let mut blobs = Vec::with_capacity(tensors.len());
    let mut described = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let bytes = tensor_bytes(t)?;
        described.push((
            name.as_str(),
            dtype_name(t.dtype())?,
            t.dims(),
            bytes.len() as u64,
        ));
        blobs.push(bytes);
    }
    let (h, _) = openvla::checkpoint::safetensors_header(metadata, described);
    write_atomic_with(path, |w| {
        w.write_all(&h)?;
        for b in &blobs {
            w.write_all(b)?;
        }
        Ok(())
    })
}

/// `{"format": "pt"}`.
pub fn pt_metadata() -> BTreeMap<String, String> {
    BTreeMap::from([("format".to_string(), "pt".to_string())])
}

/// Reads every tensor of a safetensors file onto `device`.
pub fn read_safetensors(
    path: &Path,
    device: &candle_core::Device,
) -> Result<BTreeMap<String, Tensor>> {
    if !path.is_file() {
        return Err(TrainError::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
        ));
    }
    let map = candle_core::safetensors::load(path, device).map_err(|e| {
        TrainError::Invalid(format!("{}: cannot read safetensors: {e}", path.display()))
    })?;
    Ok(map.into_iter().collect())
}

/// A path relative to `base` for messages.
pub fn display_rel(path: &Path, base: &Path) -> PathBuf {
    path.strip_prefix(base).unwrap_or(path).to_path_buf()
}
