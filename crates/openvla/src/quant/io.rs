//! Quantized matrices in safetensors files.
//!
//! A matrix `X.weight` quantized to `q8_0` is stored as two tensors in place of `X.weight`:
//! `X.weight.q8_0.qs` (`U8`, `[rows, blocks·32]`, the int8 quants as bytes) and
//! `X.weight.q8_0.d` (`F16`, `[rows, blocks]`, the block scales); `q4_0` likewise with
//! `[rows, blocks·16]` bytes of packed nibbles. Any safetensors reader can open the file.

use super::QuantFormat;

/// Names of the quants and scales tensors of matrix `name` in `format`.
pub fn tensor_names(name: &str, format: QuantFormat) -> (String, String) {
    (
        format!("{name}.{}.qs", format.name()),
        format!("{name}.{}.d", format.name()),
    )
}

use crate::error::{Error, Result};
use std::path::Path;

/// The file in a quantized model directory that records its quantization mode.
pub const MANIFEST: &str = "quantization.json";

/// Reads `quantization.json` of a model directory, if there is one.
pub fn read_manifest(dir: &Path) -> Result<Option<super::Quantization>> {
    let path = dir.join(MANIFEST);
    if !path.exists() {
        return Ok(None);
    }
    let v: serde_json::Value = crate::error::read_json(&path)?;
    let mode = v
        .get("quantization")
        .and_then(|m| m.as_str())
        .ok_or_else(|| Error::config(&path, "missing the \"quantization\" field (int8 or int4)"))?;
    mode.parse()
        .map(Some)
        .map_err(|e: String| Error::config(&path, e))
}

/// Parameters a stored tensor represents: its element count, except that the quants of a
/// quantized matrix count the weights they encode (including the zero padding of a partial last
/// block, at most 31 per row) and its scales count none.
pub fn stored_parameters(name: &str, shape: &[usize]) -> u64 {
    let numel: u64 = shape.iter().map(|&d| d as u64).product();
    for f in [QuantFormat::Q8_0, QuantFormat::Q4_0] {
        let suffix = format!(".{}", f.name());
        if name.ends_with(&format!("{suffix}.d")) {
            return 0;
        }
        if name.ends_with(&format!("{suffix}.qs")) {
            return numel * (super::BLOCK / f.block_bytes()) as u64;
        }
    }
    numel
}
