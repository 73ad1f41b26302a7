//! Shared helpers of the integration tests.
#![allow(dead_code)]

pub mod toy;

use std::collections::BTreeMap;
use std::path::PathBuf;

/// Repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `testdata/train`.
pub fn td() -> PathBuf {
    root().join("testdata/train")
}

/// The tiny model directory.
pub fn tiny_model() -> PathBuf {
    root().join("models/openvla-tiny")
}

/// Asserts that each of `files` (relative to `dir`) is a file, naming the first missing one.
pub fn assert_files(dir: &std::path::Path, files: &[&str]) {
    for f in files {
        assert!(dir.join(f).is_file(), "{} has no {f}", dir.display());
    }
}

/// A raw safetensors tensor: dtype name, shape, bytes.
pub type Raw = (String, Vec<usize>, Vec<u8>);

/// Reads a safetensors file without candle (for dtypes like BOOL).
pub fn read_raw(path: &std::path::Path) -> BTreeMap<String, Raw> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut out = BTreeMap::new();
    for (k, v) in header.as_object().unwrap() {
        if k == "__metadata__" {
            continue;
        }
        let off = v["data_offsets"].as_array().unwrap();
        let (a, b) = (
            off[0].as_u64().unwrap() as usize,
            off[1].as_u64().unwrap() as usize,
        );
        let shape = v["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        out.insert(
            k.clone(),
            (
                v["dtype"].as_str().unwrap().to_string(),
                shape,
                data[a..b].to_vec(),
            ),
        );
    }
    out
}

/// i64 values of a raw tensor.
pub fn i64s(r: &Raw) -> Vec<i64> {
    assert_eq!(r.0, "I64");
    r.2.chunks(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// f32 values of a raw tensor.
pub fn f32s(r: &Raw) -> Vec<f32> {
    assert_eq!(r.0, "F32");
    r.2.chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// `expected.json`.
pub fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(td().join("expected.json")).unwrap()).unwrap()
}

/// Reads a little-endian `.npy` file: (dtype descr such as `<f4`, shape, raw bytes).
pub fn npy(path: &std::path::Path) -> (String, Vec<usize>, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{}", path.display());
    let (hlen, start) = if bytes[6] == 1 {
        (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10)
    } else {
        (
            u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize,
            12,
        )
    };
    let header = std::str::from_utf8(&bytes[start..start + hlen]).unwrap();
    assert!(header.contains("'fortran_order': False"), "{header}");
    let descr = header.split("'descr': '").nth(1).unwrap();
    let descr = descr[..descr.find('\'').unwrap()].to_string();
    let shape_s = header.split("'shape': (").nth(1).unwrap();
    let shape: Vec<usize> = shape_s[..shape_s.find(')').unwrap()]
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().unwrap())
        .collect();
    (descr, shape, bytes[start + hlen..].to_vec())
}

/// A float32 `.npy` file: shape and values.
pub fn npy_f32(path: &std::path::Path) -> (Vec<usize>, Vec<f32>) {
    let (d, shape, raw) = npy(path);
    assert_eq!(d, "<f4", "{}", path.display());
    let v = raw
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (shape, v)
}

/// An int64 `.npy` file: shape and values.
pub fn npy_i64(path: &std::path::Path) -> (Vec<usize>, Vec<i64>) {
    let (d, shape, raw) = npy(path);
    assert_eq!(d, "<i8", "{}", path.display());
    let v = raw
        .chunks(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (shape, v)
}

/// A tensor's values as float32, flattened.
pub fn vec_f32(t: &candle_core::Tensor) -> Vec<f32> {
    t.to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}
