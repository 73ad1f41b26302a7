//! OFT's component checkpoints: `<component>--<step>_checkpoint.pt` files written by
//! `torch.save(state_dict)` of a DDP-wrapped module (oft-spec §1.2-1.3). They are read with
//! candle's pickle reader; the DDP `module.` prefix is stripped from every key, as the
//! reference's `load_component_state_dict` does.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The tensors of one component file, keyed without the `module.` prefix, as f32.
#[derive(Debug)]
pub struct StateDict {
    path: PathBuf,
    tensors: BTreeMap<String, Tensor>,
    stored: BTreeMap<String, DType>,
}

impl StateDict {
    /// Reads a torch `.pt` state dict (zip archive of a pickle and raw storages).
    pub fn read(path: &Path) -> Result<StateDict> {
        let all = candle_core::pickle::read_all(path).map_err(|e| {
            Error::checkpoint(
                path,
                format!("not a readable PyTorch state dict (torch.save zip archive): {e}"),
            )
        })?;
        if all.is_empty() {
            return Err(Error::checkpoint(path, "the file holds no tensors"));
        }
        let mut tensors = BTreeMap::new();
        let mut stored = BTreeMap::new();
        for (name, t) in all {
            let key = name.strip_prefix("module.").unwrap_or(&name).to_string();
            stored.insert(key.clone(), t.dtype());
            let t = t
                .to_dtype(DType::F32)
                .and_then(|t| t.to_device(&Device::Cpu))
                .map_err(|e| Error::checkpoint(path, format!("tensor {name}: {e}")))?;
            tensors.insert(key, t);
        }
        Ok(StateDict {
            path: path.to_path_buf(),
            tensors,
            stored,
        })
    }

    /// The file read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The dtype a tensor was stored in.
    pub fn stored_dtype(&self, name: &str) -> Option<DType> {
        self.stored.get(name).copied()
    }

    /// The shape of a tensor, if present.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|t| t.dims().to_vec())
    }

    /// A tensor (f32) that must exist; `rank` is its expected number of dimensions.
    pub fn get(&self, name: &str, rank: usize) -> Result<Tensor> {
        let t = self.tensors.get(name).ok_or_else(|| {
            let have: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
            Error::checkpoint(
                &self.path,
                format!(
                    "missing tensor {name:?} (keys after stripping `module.`: {})",
                    have.join(", ")
                ),
            )
        })?;
        if t.rank() != rank {
            return Err(Error::checkpoint(
                &self.path,
                format!(
                    "tensor {name:?} has shape {:?}, expected {rank} dimensions",
                    t.dims()
                ),
            ));
        }
        Ok(t.clone())
    }

    /// A tensor that must have exactly `shape`.
    pub fn get_shaped(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.get(name, shape.len())?;
        if t.dims() != shape {
            return Err(Error::checkpoint(
                &self.path,
                format!(
                    "tensor {name:?} has shape {:?}, expected {shape:?}",
                    t.dims()
                ),
            ));
        }
        Ok(t)
    }

    /// Names of all tensors (without the prefix).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }
}

/// The single file of `dir` whose name contains `component` and `checkpoint` and ends in
/// `.pt`, as the reference's `find_checkpoint_file` requires. `Ok(None)` when there is none;
/// more than one is an error naming them.
pub fn find_component(dir: &Path, component: &str) -> Result<Option<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.contains(component) && name.contains("checkpoint") && name.ends_with(".pt") {
            found.push(entry.path());
        }
    }
    found.sort();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(Error::config(
            dir,
            format!(
                "found {} {component} checkpoint files, expected exactly one: {} (remove all \
                 but the step you want to run)",
                found.len(),
                found
                    .iter()
                    .map(|p| p
                        .file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}
