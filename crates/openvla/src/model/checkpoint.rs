//! Safetensors checkpoints: a single `model.safetensors`, or shards behind
//! `model.safetensors.index.json` with any shard count (spec §1.1).
//!
//! Headers are parsed and validated up front, so a missing shard, a truncated file or a corrupt
//! header is reported before any weight is read, naming the file and the tensor. Tensor data is
//! read with positioned reads (not mmap), so the resident memory of a loaded model is the
//! weights in their compute dtype and nothing else.

use crate::error::{Error, Result};
use crate::model::linear::{LayerKind, Linear, Weight, WeightPolicy};
use crate::quant::{QuantFormat, QuantMatrix};
use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Storage dtypes the loader understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredDtype {
    /// bfloat16 (the dtype of every published OpenVLA checkpoint).
    BF16,
    /// IEEE half precision.
    F16,
    /// IEEE single precision.
    F32,
    /// Unsigned bytes (the quants of a quantized matrix, see [`crate::quant`]).
    U8,
}

impl StoredDtype {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "BF16" => Some(Self::BF16),
            "F16" => Some(Self::F16),
            "F32" => Some(Self::F32),
            "U8" => Some(Self::U8),
            _ => None,
        }
    }
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::BF16 | Self::F16 => 2,
            Self::F32 => 4,
            Self::U8 => 1,
        }
    }
    /// Name as written in safetensors headers.
    pub fn name(self) -> &'static str {
        match self {
            Self::BF16 => "BF16",
            Self::F16 => "F16",
            Self::F32 => "F32",
            Self::U8 => "U8",
        }
    }
}

/// The bytes a safetensors file starts with: the header's length (u64, little-endian), then the
/// JSON header (`__metadata__` if given, then each `(name, dtype, shape, bytes)` tensor with its
/// `data_offsets`, the tensors back to back in the order given), padded with spaces to a
/// multiple of 8 bytes, as the format asks. Also returns the data's total length.
pub fn safetensors_header<'a>(
    metadata: Option<serde_json::Value>,
    tensors: impl IntoIterator<Item = (&'a str, &'a str, &'a [usize], u64)>,
) -> (Vec<u8>, u64) {
    let mut header = serde_json::Map::new();
    if let Some(m) = metadata {
        header.insert("__metadata__".into(), m);
    }
    let mut offset = 0u64;
    for (name, dtype, shape, bytes) in tensors {
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut json = serde_json::Value::Object(header).to_string().into_bytes();
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    (out, offset)
}

/// Where one tensor lives.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Stored dtype.
    pub dtype: StoredDtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Index of the shard file in [`Checkpoint::files`].
    pub file: usize,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Number of data bytes.
    pub len: u64,
}

/// An opened checkpoint: validated headers of every shard and a tensor index.
#[derive(Debug)]
pub struct Checkpoint {
    files: Vec<(PathBuf, File)>,
    tensors: BTreeMap<String, TensorInfo>,
}

#[derive(serde::Deserialize)]
struct IndexJson {
    weight_map: BTreeMap<String, String>,
}

#[derive(serde::Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

impl Checkpoint {
    /// Opens the weights of an HF model directory: `model.safetensors.index.json` if present,
    /// otherwise `model.safetensors`.
    pub fn open_dir(dir: &Path) -> Result<Checkpoint> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        if index.exists() {
            Self::open_index(&index)
        } else if single.exists() {
            Self::open_files(&[single])
        } else {
            Err(Error::checkpoint(
                dir,
                "no weights found: expected model.safetensors or model.safetensors.index.json \
                 (with its shards) in the model directory",
            ))
        }
    }

    /// Opens a sharded checkpoint through its index file.
    pub fn open_index(index_path: &Path) -> Result<Checkpoint> {
        let index: IndexJson = crate::error::read_json(index_path)?;
        let dir = index_path.parent().unwrap_or(Path::new("."));
        let mut shard_names: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (tensor, shard) in &index.weight_map {
            if shard.contains('/') || shard.contains("..") {
                return Err(Error::checkpoint(
                    index_path,
                    format!("weight_map entry for {tensor:?} names an unsafe path {shard:?}"),
                ));
            }
            shard_names.entry(shard).or_default().push(tensor);
        }
        if shard_names.is_empty() {
            return Err(Error::checkpoint(index_path, "weight_map is empty"));
        }
        for (shard, tensors) in &shard_names {
            let path = dir.join(shard);
            if !path.exists() {
                return Err(Error::checkpoint(
                    index_path,
                    format!(
                        "shard {shard} is missing from {}; it should hold {} tensors, e.g. {:?}",
                        dir.display(),
                        tensors.len(),
                        tensors[0]
                    ),
                ));
            }
        }
        let paths: Vec<PathBuf> = shard_names.keys().map(|s| dir.join(s)).collect();
        let mut ckpt = Self::open_files(&paths)?;
        // Every tensor of the index must be in the shard the index names.
        for (tensor, shard) in &index.weight_map {
            let Some(info) = ckpt.tensors.get(tensor) else {
                return Err(Error::checkpoint(
                    dir.join(shard),
                    format!("tensor {tensor:?} is listed in the index but not in this shard"),
                ));
            };
            if ckpt.files[info.file].0 != dir.join(shard) {
                return Err(Error::checkpoint(
                    index_path,
                    format!(
                        "tensor {tensor:?} is mapped to {shard} but stored in {}",
                        ckpt.files[info.file].0.display()
                    ),
                ));
            }
        }
        ckpt.tensors.retain(|k, _| index.weight_map.contains_key(k));
        Ok(ckpt)
    }

    /// Opens one or more safetensors files as one checkpoint.
    pub fn open_files(paths: &[PathBuf]) -> Result<Checkpoint> {
        let mut files = Vec::new();
        let mut tensors = BTreeMap::new();
        for (fi, path) in paths.iter().enumerate() {
            let file = File::open(path).map_err(|e| Error::io(path, e))?;
            let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
            for (name, info) in read_header(path, &file, file_len, fi)? {
                if tensors.contains_key(&name) {
                    return Err(Error::checkpoint(
                        path,
                        format!("tensor {name:?} is stored in more than one shard"),
                    ));
                }
                tensors.insert(name, info);
            }
            files.push((path.clone(), file));
        }
        Ok(Checkpoint { files, tensors })
    }

    /// All tensor names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|s| s.as_str())
    }

    /// Shape and location of a tensor.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// The shard files.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|(p, _)| p.as_path())
    }

    /// Total bytes of tensor data.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.values().map(|t| t.len).sum()
    }

    /// The tensor `name`; an error naming it (with `detail` after the name) when it is missing.
    fn require(&self, name: &str, detail: &str) -> Result<&TensorInfo> {
        self.tensors.get(name).ok_or_else(|| {
            Error::checkpoint(
                self.files
                    .first()
                    .map(|f| f.0.as_path())
                    .unwrap_or(Path::new("")),
                format!("tensor {name:?}{detail} is missing"),
            )
        })
    }

    /// Looks up a tensor and checks its shape.
    fn locate(&self, name: &str, shape: &[usize]) -> Result<(&TensorInfo, &Path, &File)> {
        let info = self.require(name, &format!(" (expected shape {shape:?})"))?;
        let (path, file) = &self.files[info.file];
        if info.shape != shape {
            return Err(Error::checkpoint(
                path,
                format!(
                    "tensor {name:?} has shape {:?} but the config implies {shape:?}",
                    info.shape
                ),
            ));
        }
        Ok((info, path, file))
    }

    /// Reads a tensor stored as `stored` into a vector of `T` (whose size must match).
    pub fn read_raw<T: bytemuck::Pod + Default + Clone>(
        &self,
        name: &str,
        shape: &[usize],
        stored: StoredDtype,
    ) -> Result<Vec<T>> {
        let (info, path, file) = self.locate(name, shape)?;
        if info.dtype != stored || std::mem::size_of::<T>() != stored.size() {
            return Err(Error::checkpoint(
                path,
                format!(
                    "tensor {name:?} is stored as {} but {} was expected",
                    info.dtype.name(),
                    stored.name()
                ),
            ));
        }
        let mut v = vec![T::default(); shape.iter().product()];
        file.read_exact_at(bytemuck::cast_slice_mut(&mut v), info.offset)
            .map_err(|e| Error::checkpoint(path, format!("reading tensor {name:?} failed: {e}")))?;
        Ok(v)
    }

    /// The stored bytes of a tensor, whatever its dtype.
    pub fn read_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let info = self.require(name, "")?;
        let (path, file) = &self.files[info.file];
        let mut v = vec![0u8; info.len as usize];
        file.read_exact_at(&mut v, info.offset)
            .map_err(|e| Error::checkpoint(path, format!("reading tensor {name:?} failed: {e}")))?;
        Ok(v)
    }

    /// Reads a floating-point tensor (bf16, f16 or f32) as f32 values.
    pub fn read_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (info, path, _) = self.locate(name, shape)?;
        let n = shape.iter().product();
        match info.dtype {
            StoredDtype::F32 => self.read_raw(name, shape, StoredDtype::F32),
            StoredDtype::BF16 => {
                self.read_converted(info, n, path, name, |b: u16| bf16::from_bits(b).to_f32())
            }
            StoredDtype::F16 => {
                self.read_converted(info, n, path, name, |b: u16| f16::from_bits(b).to_f32())
            }
            StoredDtype::U8 => Err(Error::checkpoint(
                path,
                format!("tensor {name:?} is stored as U8, not as floating point"),
            )),
        }
    }

    /// Reads a tensor, checks its shape, and converts it to `dtype` on `device`.
    pub fn load(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let (info, path, file) = self.locate(name, shape)?;
        let n: usize = shape.iter().product();
        if (info.dtype == StoredDtype::U8) != (dtype == DType::U8) {
            return Err(Error::checkpoint(
                path,
                format!(
                    "tensor {name:?} is stored as {} and cannot be read as {dtype:?}",
                    info.dtype.name()
                ),
            ));
        }
        let read = |buf: &mut [u8]| {
            file.read_exact_at(buf, info.offset).map_err(|e| {
                Error::checkpoint(path, format!("reading tensor {name:?} failed: {e}"))
            })
        };
        let tensor = match (info.dtype, dtype) {
            (StoredDtype::BF16, DType::BF16) => {
                let mut v = vec![bf16::ZERO; n];
                read(bytemuck::cast_slice_mut(&mut v))?;
                Tensor::from_vec(v, shape, device)?
            }
            (StoredDtype::F16, DType::F16) => {
                let mut v = vec![f16::ZERO; n];
                read(bytemuck::cast_slice_mut(&mut v))?;
                Tensor::from_vec(v, shape, device)?
            }
            (StoredDtype::F32, DType::F32) => {
                let mut v = vec![0f32; n];
                read(bytemuck::cast_slice_mut(&mut v))?;
                Tensor::from_vec(v, shape, device)?
            }
            (StoredDtype::U8, DType::U8) => {
                let mut v = vec![0u8; n];
                read(&mut v)?;
                Tensor::from_vec(v, shape, device)?
            }
            (StoredDtype::BF16 | StoredDtype::F32, DType::F16) => {
                let wide = self.load(name, shape, DType::F32, device)?;
                let v: Vec<f32> = wide.flatten_all()?.to_vec1()?;
                if let Some(bad) = v.iter().find(|x| x.abs() > f16::MAX.to_f32()) {
                    return Err(Error::checkpoint(
                        path,
                        format!(
                            "tensor {name:?} holds {bad}, outside the f16 range (±65504); \
                             use bf16 or f32 precision"
                        ),
                    ));
                }
                let h: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
                Tensor::from_vec(h, shape, device)?
            }
            (StoredDtype::BF16, DType::F32) => {
                let v =
                    self.read_converted(info, n, path, name, |b: u16| bf16::from_bits(b).to_f32())?;
                Tensor::from_vec(v, shape, device)?
            }
            (StoredDtype::F16, DType::F32) => {
                let v =
                    self.read_converted(info, n, path, name, |b: u16| f16::from_bits(b).to_f32())?;
                Tensor::from_vec(v, shape, device)?
            }
            // Rare combinations go through f32.
            (_, _) => self
                .load(name, shape, DType::F32, device)?
                .to_dtype(dtype)?,
        };
        Ok(tensor)
    }

    /// Reads 16-bit data in chunks and converts it to f32 in parallel.
    fn read_converted(
        &self,
        info: &TensorInfo,
        n: usize,
        path: &Path,
        name: &str,
        convert: impl Fn(u16) -> f32 + Sync,
    ) -> Result<Vec<f32>> {
        const CHUNK: usize = 1 << 22;
        let file = &self.files[info.file].1;
        let mut out = vec![0f32; n];
        let mut buf = vec![0u16; CHUNK.min(n)];
        for (ci, dst) in out.chunks_mut(CHUNK).enumerate() {
            let src = &mut buf[..dst.len()];
            file.read_exact_at(
                bytemuck::cast_slice_mut(src),
                info.offset + (ci * CHUNK * 2) as u64,
            )
            .map_err(|e| Error::checkpoint(path, format!("reading tensor {name:?} failed: {e}")))?;
            dst.par_chunks_mut(1 << 14)
                .zip(src.par_chunks(1 << 14))
                .for_each(|(d, s)| {
                    for (d, &s) in d.iter_mut().zip(s) {
                        *d = convert(s);
                    }
                });
        }
        Ok(out)
    }
}

/// Parses and validates the header of one safetensors file.
fn read_header(
    path: &Path,
    file: &File,
    file_len: u64,
    fi: usize,
) -> Result<Vec<(String, TensorInfo)>> {
    let bad = |m: String| Error::checkpoint(path, m);
    if file_len < 8 {
        return Err(bad(format!(
            "not a safetensors file: {file_len} bytes, too short for the 8-byte header length"
        )));
    }
    let mut len_bytes = [0u8; 8];
    file.read_exact_at(&mut len_bytes, 0)
        .map_err(|e| Error::io(path, e))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len == 0 || header_len > 100_000_000 || 8 + header_len > file_len {
        return Err(bad(format!(
            "not a safetensors file or truncated: header length {header_len} does not fit in the \
             {file_len}-byte file"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact_at(&mut header, 8)
        .map_err(|e| Error::io(path, e))?;
    let json: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("corrupt safetensors header: {e}")))?;
    let data_start = 8 + header_len;
    let data_len = file_len - data_start;
    let mut out = Vec::new();
    let mut spans = Vec::new();
    for (name, value) in json {
        if name == "__metadata__" {
            continue;
        }
        let entry: HeaderEntry = serde_json::from_value(value)
            .map_err(|e| bad(format!("corrupt header entry for tensor {name:?}: {e}")))?;
        let dtype = StoredDtype::parse(&entry.dtype).ok_or_else(|| {
            bad(format!(
                "tensor {name:?} has dtype {}; supported: BF16, F16, F32, U8",
                entry.dtype
            ))
        })?;
        let [begin, end] = entry.data_offsets;
        let numel: u64 = entry.shape.iter().map(|&d| d as u64).product();
        if end < begin || end - begin != numel * dtype.size() as u64 {
            return Err(bad(format!(
                "tensor {name:?}: data_offsets [{begin}, {end}) do not match shape {:?} of {}",
                entry.shape, entry.dtype
            )));
        }
        if end > data_len {
            return Err(bad(format!(
                "truncated: tensor {name:?} needs data bytes [{begin}, {end}) but the file holds \
                 only {data_len} bytes of data"
            )));
        }
        spans.push((begin, end, name.clone()));
        out.push((
            name,
            TensorInfo {
                dtype,
                shape: entry.shape,
                file: fi,
                offset: data_start + begin,
                len: end - begin,
            },
        ));
    }
    spans.sort();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(bad(format!(
                "corrupt header: tensors {:?} and {:?} overlap",
                w[0].2, w[1].2
            )));
        }
    }
    Ok(out)
}

/// Progress of a model load: bytes of tensor data read so far and in total.
#[derive(Debug, Clone, Copy)]
pub struct LoadProgress {
    /// Bytes read.
    pub done: u64,
    /// Bytes to read.
    pub total: u64,
}

/// Loads the tensors a model asks for, tracks which were used, and reports progress.
///
/// After construction, [`WeightLoader::finish`] fails on any checkpoint tensor that was neither
/// loaded nor knowingly skipped, so a checkpoint of a different architecture cannot load silently.
pub struct WeightLoader<'a> {
    ckpt: &'a Checkpoint,
    device: Device,
    used: Mutex<BTreeSet<String>>,
    skipped_prefixes: Mutex<Vec<String>>,
    done: Mutex<u64>,
    progress: Option<&'a (dyn Fn(LoadProgress) + Sync)>,
}

impl<'a> WeightLoader<'a> {
    /// A loader over `ckpt` placing tensors on `device`.
    pub fn new(
        ckpt: &'a Checkpoint,
        device: Device,
        progress: Option<&'a (dyn Fn(LoadProgress) + Sync)>,
    ) -> Self {
        WeightLoader {
            ckpt,
            device,
            used: Mutex::new(BTreeSet::new()),
            skipped_prefixes: Mutex::new(Vec::new()),
            done: Mutex::new(0),
            progress,
        }
    }

    /// The device tensors are placed on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The checkpoint being read.
    pub fn checkpoint(&self) -> &Checkpoint {
        self.ckpt
    }

    /// Loads `name` with the given shape, converted to `dtype`.
    pub fn get(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let t = self.ckpt.load(name, shape, dtype, &self.device)?;
        if let Ok(mut used) = self.used.lock() {
            used.insert(name.to_string());
        }
        if let Some(info) = self.ckpt.info(name) {
            self.advance(info.len);
        }
        Ok(t)
    }

    fn mark_used(&self, name: &str) {
        if let Ok(mut used) = self.used.lock() {
            used.insert(name.to_string());
        }
        if let Some(info) = self.ckpt.info(name) {
            self.advance(info.len);
        }
    }

    /// Loads `{prefix}.weight` (`[out, in]`, stored as `policy` says for `kind`) and, if `bias`,
    /// `{prefix}.bias` (`[out]`, kept f32).
    pub fn linear(
        &self,
        prefix: &str,
        (in_dim, out_dim): (usize, usize),
        bias: bool,
        policy: &WeightPolicy,
        kind: LayerKind,
    ) -> Result<Linear> {
        let weight = self.get_weight(
            &format!("{prefix}.weight"),
            [out_dim, in_dim],
            policy.dtype.dtype(),
            policy.format_for(kind),
        )?;
        let bias = if bias {
            Some(self.get(&format!("{prefix}.bias"), &[out_dim], DType::F32)?)
        } else {
            None
        };
        Linear::with_policy(weight, bias, policy)
    }

    /// Loads the weight matrix `name` of shape `[rows, cols]`.
    ///
    /// A matrix the checkpoint stores quantized (`{name}.q8_0.qs` + `{name}.q8_0.d`, or the
    /// `q4_0` pair, see [`crate::quant::io`]) is read as stored, without re-quantization.
    /// Otherwise it is read in `dtype`, or, with `quant`, quantized while loading.
    pub fn get_weight(
        &self,
        name: &str,
        [rows, cols]: [usize; 2],
        dtype: DType,
        quant: Option<QuantFormat>,
    ) -> Result<Weight> {
        for format in [QuantFormat::Q8_0, QuantFormat::Q4_0] {
            let (qs_name, d_name) = crate::quant::io::tensor_names(name, format);
            if !self.contains(&qs_name) {
                continue;
            }
            let bpr = cols.div_ceil(crate::quant::BLOCK);
            let qs: Vec<u8> = self.ckpt.read_raw(
                &qs_name,
                &[rows, bpr * format.block_bytes()],
                StoredDtype::U8,
            )?;
            self.mark_used(&qs_name);
            let d: Vec<f16> = self
                .ckpt
                .read_raw(&d_name, &[rows, bpr], StoredDtype::F16)?;
            self.mark_used(&d_name);
            let q = QuantMatrix::from_parts(format, rows, cols, qs, d).map_err(|e| {
                let path = self
                    .ckpt
                    .info(&qs_name)
                    .map(|i| self.ckpt.files[i.file].0.clone());
                Error::checkpoint(path.unwrap_or_default(), format!("{qs_name}: {e}"))
            })?;
            return Ok(Weight::Quant(Arc::new(q)));
        }
        match quant {
            None => Ok(Weight::Dense(self.get(name, &[rows, cols], dtype)?)),
            Some(format) => {
                let v = self.ckpt.read_f32(name, &[rows, cols])?;
                self.mark_used(name);
                Ok(Weight::Quant(Arc::new(QuantMatrix::quantize(
                    format, &v, rows, cols,
                ))))
            }
        }
    }

    /// Whether the checkpoint holds weight matrix `name`, unquantized or quantized.
    pub fn has_weight(&self, name: &str) -> bool {
        self.contains(name)
            || [QuantFormat::Q8_0, QuantFormat::Q4_0]
                .iter()
                .any(|&f| self.contains(&crate::quant::io::tensor_names(name, f).0))
    }

    /// Whether the checkpoint holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.ckpt.info(name).is_some()
    }

    /// Marks every tensor under `prefix` as knowingly unused (stored by the reference, never
    /// read by its forward pass).
    pub fn skip_prefix(&self, prefix: &str) {
        let bytes: u64 = self
            .ckpt
            .tensors
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v.len)
            .sum();
        if let Ok(mut s) = self.skipped_prefixes.lock() {
            s.push(prefix.to_string());
        }
        self.advance(bytes);
    }

    fn advance(&self, bytes: u64) {
        if let Ok(mut done) = self.done.lock() {
            *done += bytes;
            if let Some(cb) = self.progress {
                cb(LoadProgress {
                    done: *done,
                    total: self.ckpt.total_bytes(),
                });
            }
        }
    }

    /// Fails if the checkpoint holds tensors that were neither loaded nor skipped.
    pub fn finish(self) -> Result<()> {
        let used = self.used.into_inner().unwrap_or_default();
        let skipped = self.skipped_prefixes.into_inner().unwrap_or_default();
        let unexpected: Vec<&str> = self
            .ckpt
            .names()
            .filter(|n| !used.contains(*n) && !skipped.iter().any(|p| n.starts_with(p.as_str())))
            .collect();
        if unexpected.is_empty() {
            Ok(())
        } else {
            let path = self.ckpt.files[0].0.clone();
            Err(Error::checkpoint(
                path,
                format!(
                    "{} tensors do not belong to the architecture described by config.json, \
                     e.g. {:?}",
                    unexpected.len(),
                    &unexpected[..unexpected.len().min(5)]
                ),
            ))
        }
    }
}
