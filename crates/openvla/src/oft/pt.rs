//! OFT's component checkpoints: `<component>--<step>_checkpoint.pt` files written by
//! `torch.save(state_dict)` of a DDP-wrapped module (oft-spec §1.2-1.3). They are read with
//! candle's pickle reader; the DDP `module.` prefix is stripped from every key, as the
//! reference's `load_component_state_dict` does. [`write_state_dict`] writes such files.

use crate::error::{Error, Result};
use crate::model::backend::{Infer, ParamSource};
use crate::model::linear::{LayerKind, Linear};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::io::Write;
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

/// Writes `tensors` as a PyTorch state dict file, in the format `torch.save` uses for an
/// `OrderedDict` of CPU tensors: a stored (uncompressed) zip archive with `archive/data.pkl`
/// (a protocol-2 pickle whose tensors are `torch._utils._rebuild_tensor_v2` calls on
/// persistent-id storages), one raw little-endian storage per tensor in `archive/data/<n>`
/// (64-byte aligned, as torch aligns them), `archive/version` (`3`) and `archive/byteorder`.
///
/// The result reads with `torch.load(path, weights_only=True)` and with [`StateDict::read`].
/// Keys are written as given (the reference's files carry DDP's `module.` prefix; the caller
/// passes it). Tensors must be f32 or bf16; each is written contiguous, with its own storage.
/// The file is written to a temporary name next to `path` and renamed into place, so a reader
/// never sees a half-written file.
pub fn write_state_dict(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let mut storages: Vec<Vec<u8>> = Vec::with_capacity(tensors.len());
    let mut entries: Vec<PickledTensor> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let bad = |e: candle_core::Error| Error::checkpoint(path, format!("tensor {name}: {e}"));
        let t = t.to_device(&Device::Cpu).map_err(bad)?;
        let flat = t.flatten_all().map_err(bad)?;
        let (storage_class, bytes) = match t.dtype() {
            DType::F32 => (
                "FloatStorage",
                flat.to_vec1::<f32>()
                    .map_err(bad)?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<u8>>(),
            ),
            DType::BF16 => (
                "BFloat16Storage",
                flat.to_vec1::<half::bf16>()
                    .map_err(bad)?
                    .iter()
                    .flat_map(|v| v.to_bits().to_le_bytes())
                    .collect::<Vec<u8>>(),
            ),
            other => {
                return Err(Error::checkpoint(
                    path,
                    format!("tensor {name} has dtype {other:?}; expected f32 or bf16"),
                ))
            }
        };
        entries.push(PickledTensor {
            name: name.clone(),
            storage_class,
            numel: t.elem_count(),
            shape: t.dims().to_vec(),
        });
        storages.push(bytes);
    }
    let pickle = state_dict_pickle(&entries);

    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "state_dict.pt".into());
    let tmp = path.with_file_name(format!(".{file_name}.tmp"));
    let write = || -> std::result::Result<(), zip::result::ZipError> {
        let file = std::fs::File::create(&tmp)?;
        let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(file));
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(storages.iter().any(|s| s.len() as u64 >= u32::MAX as u64))
            .with_alignment(64);
        zip.start_file("archive/data.pkl", options)?;
        zip.write_all(&pickle)?;
        zip.start_file("archive/byteorder", options)?;
        zip.write_all(b"little")?;
        for (i, bytes) in storages.iter().enumerate() {
            zip.start_file(format!("archive/data/{i}"), options)?;
            zip.write_all(bytes)?;
        }
        zip.start_file("archive/version", options)?;
        zip.write_all(b"3\n")?;
        let mut inner = zip.finish()?;
        inner.flush()?;
        inner.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::checkpoint(
            path,
            format!("cannot write the state dict archive: {e}"),
        ));
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// What the pickle says about one tensor.
struct PickledTensor {
    name: String,
    storage_class: &'static str,
    numel: usize,
    shape: Vec<usize>,
}

/// Pickle opcodes used by [`state_dict_pickle`] (names as in CPython's `pickletools`).
mod op {
    pub const PROTO: u8 = 0x80;
    pub const GLOBAL: u8 = b'c';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const REDUCE: u8 = b'R';
    pub const MARK: u8 = b'(';
    pub const TUPLE: u8 = b't';
    pub const BINUNICODE: u8 = b'X';
    pub const BINPERSID: u8 = b'Q';
    pub const BININT1: u8 = b'K';
    pub const BININT2: u8 = b'M';
    pub const BININT: u8 = b'J';
    pub const LONG1: u8 = 0x8a;
    pub const NEWFALSE: u8 = 0x89;
    pub const SETITEMS: u8 = b'u';
    pub const STOP: u8 = b'.';
}

/// The `data.pkl` of an `OrderedDict` state dict, as torch's pickler writes it (without the
/// memo, which the format does not require).
fn state_dict_pickle(entries: &[PickledTensor]) -> Vec<u8> {
    let mut p = vec![op::PROTO, 2];
    let global = |p: &mut Vec<u8>, module: &str, name: &str| {
        p.push(op::GLOBAL);
        p.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
    };
    let string = |p: &mut Vec<u8>, s: &str| {
        p.push(op::BINUNICODE);
        p.extend_from_slice(&(s.len() as u32).to_le_bytes());
        p.extend_from_slice(s.as_bytes());
    };
    let int = |p: &mut Vec<u8>, v: usize| {
        if v < 0x100 {
            p.extend_from_slice(&[op::BININT1, v as u8]);
        } else if v < 0x1_0000 {
            p.push(op::BININT2);
            p.extend_from_slice(&(v as u16).to_le_bytes());
        } else if v < 0x8000_0000 {
            p.push(op::BININT);
            p.extend_from_slice(&(v as u32).to_le_bytes());
        } else {
            // Two's complement little-endian, with a zero byte so that it stays positive.
            p.extend_from_slice(&[op::LONG1, 9]);
            p.extend_from_slice(&(v as u64).to_le_bytes());
            p.push(0);
        }
    };
    let tuple = |p: &mut Vec<u8>, items: &[usize]| {
        p.push(op::MARK);
        for &v in items {
            int(p, v);
        }
        p.push(op::TUPLE);
    };
    // OrderedDict()
    global(&mut p, "collections", "OrderedDict");
    p.extend_from_slice(&[op::EMPTY_TUPLE, op::REDUCE, op::MARK]);
    for (i, e) in entries.iter().enumerate() {
        string(&mut p, &e.name);
        global(&mut p, "torch._utils", "_rebuild_tensor_v2");
        p.push(op::MARK);
        // Persistent id: ('storage', torch.<Type>Storage, key, location, numel).
        p.push(op::MARK);
        string(&mut p, "storage");
        global(&mut p, "torch", e.storage_class);
        string(&mut p, &i.to_string());
        string(&mut p, "cpu");
        int(&mut p, e.numel);
        p.extend_from_slice(&[op::TUPLE, op::BINPERSID]);
        int(&mut p, 0); // storage offset
        tuple(&mut p, &e.shape);
        let mut strides = vec![1usize; e.shape.len()];
        for d in (0..e.shape.len().saturating_sub(1)).rev() {
            strides[d] = strides[d + 1] * e.shape[d + 1];
        }
        tuple(&mut p, &strides);
        p.push(op::NEWFALSE); // requires_grad
        global(&mut p, "collections", "OrderedDict"); // backward hooks
        p.extend_from_slice(&[op::EMPTY_TUPLE, op::REDUCE]);
        p.extend_from_slice(&[op::TUPLE, op::REDUCE]);
    }
    p.extend_from_slice(&[op::SETITEMS, op::STOP]);
    p
}

/// Tensors of a PyTorch `state_dict` (keys without `module.`) as an inference [`ParamSource`]:
/// weight matrices held in `dtype` (as stored when `None`), everything else as stored.
pub struct StateDictSource<'a> {
    /// The state dict.
    pub sd: &'a StateDict,
    /// The dtype weight matrices are converted to.
    pub dtype: Option<DType>,
}

impl ParamSource<Infer> for StateDictSource<'_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.sd.get_shaped(name, shape)
    }

    fn linear(
        &self,
        prefix: &str,
        (in_dim, out_dim): (usize, usize),
        bias: bool,
        _kind: LayerKind,
    ) -> Result<Linear> {
        let w = self
            .sd
            .get_shaped(&format!("{prefix}.weight"), &[out_dim, in_dim])?;
        let w = match self.dtype {
            Some(dtype) => w.to_dtype(dtype)?,
            None => w,
        };
        let b = if bias {
            Some(self.sd.get_shaped(&format!("{prefix}.bias"), &[out_dim])?)
        } else {
            None
        };
        Ok(Linear::from_tensors(w, b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dtype: DType) -> Vec<(String, Tensor)> {
        let dev = Device::Cpu;
        let w: Vec<f32> = (0..24).map(|i| i as f32 * 0.37 - 3.0).collect();
        let big: Vec<f32> = (0..70_000).map(|i| (i % 977) as f32 * 1e-3).collect();
        let mk = |v: &[f32], shape: &[usize]| {
            Tensor::from_slice(v, shape, &dev)
                .and_then(|t| t.to_dtype(dtype))
                .unwrap()
        };
        vec![
            ("module.fc1.weight".into(), mk(&w, &[4, 6])),
            ("module.fc1.bias".into(), mk(&w[..4], &[4])),
            ("module.block.0.w".into(), mk(&w, &[2, 3, 4])),
            ("module.big".into(), mk(&big, &[70_000])),
            ("module.scalar".into(), mk(&w[5..6], &[])),
        ]
    }

    fn roundtrip(dtype: DType) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("action_head--7_checkpoint.pt");
        let tensors = sample(dtype);
        write_state_dict(&path, &tensors).unwrap();
        // tools/reference/check_pt.py reads these with torch when this variable names a folder.
        if let Some(keep) = std::env::var_os("OPENVLA_PT_SAMPLE_DIR") {
            let name = format!("sample_{}.pt", dtype.as_str());
            std::fs::copy(&path, Path::new(&keep).join(name)).unwrap();
        }
        // candle's reader sees the keys as written, with dtype, shape and values intact.
        let back: BTreeMap<String, Tensor> = candle_core::pickle::read_all(&path)
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(back.len(), tensors.len());
        for (name, a) in &tensors {
            let b = &back[name];
            assert_eq!(b.dtype(), dtype, "{name}");
            assert_eq!(a.dims(), b.dims(), "{name}");
            let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
            let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
            assert_eq!(
                a.to_vec1::<f32>().unwrap(),
                b.to_vec1::<f32>().unwrap(),
                "{name}"
            );
        }
        // The engine's reader strips `module.`.
        let sd = StateDict::read(&path).unwrap();
        assert_eq!(sd.shape("fc1.weight"), Some(vec![4, 6]));
        assert_eq!(sd.stored_dtype("big"), Some(dtype));
        // No temporary file is left behind.
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1);
    }

    #[test]
    fn state_dict_roundtrips_f32() {
        roundtrip(DType::F32);
    }

    #[test]
    fn state_dict_roundtrips_bf16() {
        roundtrip(DType::BF16);
    }

    #[test]
    fn archive_has_torch_layout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.pt");
        write_state_dict(&path, &sample(DType::F32)).unwrap();
        let mut zip = zip::ZipArchive::new(std::fs::File::open(&path).unwrap()).unwrap();
        let names: Vec<String> = zip
            .file_names()
            .map(|n| n.map(|n| n.into_owned()))
            .collect::<std::result::Result<_, _>>()
            .unwrap();
        for want in ["archive/data.pkl", "archive/byteorder", "archive/version"] {
            assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
        }
        for i in 0..5 {
            let f = zip.by_name(&format!("archive/data/{i}")).unwrap();
            assert_eq!(f.compression(), zip::CompressionMethod::Stored);
            assert_eq!(
                f.data_start().unwrap() % 64,
                0,
                "storage {i} not 64-byte aligned"
            );
        }
        let mut pkl = Vec::new();
        std::io::Read::read_to_end(&mut zip.by_name("archive/data.pkl").unwrap(), &mut pkl)
            .unwrap();
        assert!(pkl.starts_with(b"\x80\x02ccollections\nOrderedDict\n)R("));
        assert_eq!(pkl.last(), Some(&b'.'));
        let text = String::from_utf8_lossy(&pkl);
        assert!(text.contains("torch._utils\n_rebuild_tensor_v2\n"));
        assert!(text.contains("torch\nFloatStorage\n"));
    }

    #[test]
    fn state_dict_rejects_other_dtypes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.pt");
        let t = Tensor::new(&[1u32, 2], &Device::Cpu).unwrap();
        let err = write_state_dict(&path, &[("module.ids".into(), t)]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("module.ids") && msg.contains("f32 or bf16"),
            "{msg}"
        );
        assert!(!path.exists());
    }
}
