//! Block-quantized weight matrices: `q8_0` (int8) and `q4_0` (int4).
//!
//! Both formats cut every row of a `[rows, cols]` (PyTorch `[out, in]`) weight matrix into blocks
//! of 32 consecutive input features, each with one f16 scale `d`, exactly as GGUF's `Q8_0` and
//! `Q4_0` blocks do:
//!
//! - `q8_0`: `w ≈ d · q`, `q ∈ [-127, 127]`, one byte per weight (8.5 bits with the scale);
//! - `q4_0`: `w ≈ d · (q - 8)`, `q ∈ [0, 15]`, two weights per byte (4.5 bits with the scale);
//!   byte `i` of a block holds element `i` in its low nibble and element `i + 16` in its high
//!   nibble (GGUF's layout, which unpacks to 32 bytes with two shifts and a mask).
//!
//! Unlike GGUF, the last block of a row may be partial: it is zero-padded, so any width works
//! (SigLIP's 1152 = 36·32 and 4304 = 134.5·32, the 588-wide patch embedding). Quants and scales
//! are kept in two separate arrays (row-major blocks), which the kernels load with plain vector
//! loads and which map one-to-one onto two safetensors tensors.

use half::f16;
use rayon::prelude::*;

/// Stored quants and scales that do not form a valid matrix ([`QuantMatrix::from_parts`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatError(pub String);

impl std::fmt::Display for FormatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FormatError {}

/// Weights per block.
pub const BLOCK: usize = 32;

/// A block quantization format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    /// 8-bit symmetric blocks of 32 with an f16 scale (GGUF `Q8_0` semantics).
    Q8_0,
    /// 4-bit blocks of 32 with an f16 scale, `w = d·(q - 8)` (GGUF `Q4_0` semantics).
    Q4_0,
}

impl QuantFormat {
    /// Bytes of quants per block.
    pub fn block_bytes(self) -> usize {
        match self {
            QuantFormat::Q8_0 => BLOCK,
            QuantFormat::Q4_0 => BLOCK / 2,
        }
    }

    /// The name used in tensor names and `quantization.json` (`q8_0`, `q4_0`).
    pub fn name(self) -> &'static str {
        match self {
            QuantFormat::Q8_0 => "q8_0",
            QuantFormat::Q4_0 => "q4_0",
        }
    }

    /// Parses [`QuantFormat::name`].
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "q8_0" => Some(QuantFormat::Q8_0),
            "q4_0" => Some(QuantFormat::Q4_0),
            _ => None,
        }
    }

    /// Storage bits per weight, scales included.
    pub fn bits_per_weight(self) -> f64 {
        (self.block_bytes() * 8 + 16) as f64 / BLOCK as f64
    }
}

/// A quantized `[rows, cols]` weight matrix.
#[derive(Clone)]
pub struct QuantMatrix {
    format: QuantFormat,
    rows: usize,
    cols: usize,
    blocks_per_row: usize,
    qs: Vec<u8>,
    scales: Vec<f16>,
}

impl std::fmt::Debug for QuantMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QuantMatrix({}, [{}, {}])",
            self.format.name(),
            self.rows,
            self.cols
        )
    }
}

impl QuantMatrix {
    /// Quantizes a row-major `[rows, cols]` f32 matrix.
    pub fn quantize(format: QuantFormat, data: &[f32], rows: usize, cols: usize) -> QuantMatrix {
        assert_eq!(
            data.len(),
            rows * cols,
            "quantize: data does not match shape"
        );
        let bpr = cols.div_ceil(BLOCK);
        let bb = format.block_bytes();
        let mut qs = vec![0u8; rows * bpr * bb];
        let mut scales = vec![f16::ZERO; rows * bpr];
        if cols > 0 {
            qs.par_chunks_mut(bpr * bb)
                .zip(scales.par_chunks_mut(bpr))
                .zip(data.par_chunks(cols))
                .for_each(|((q, s), row)| {
                    let mut block = [0f32; BLOCK];
                    for b in 0..bpr {
                        let src = &row[b * BLOCK..((b + 1) * BLOCK).min(cols)];
                        block[..src.len()].copy_from_slice(src);
                        block[src.len()..].fill(0.0);
                        let dst = &mut q[b * bb..(b + 1) * bb];
                        s[b] = match format {
                            QuantFormat::Q8_0 => quantize_q8_block(&block, dst),
                            QuantFormat::Q4_0 => quantize_q4_block(&block, dst),
                        };
                    }
                });
        }
        QuantMatrix {
            format,
            rows,
            cols,
            blocks_per_row: bpr,
            qs,
            scales,
        }
    }

    /// Wraps stored quants and scales (as written by [`QuantMatrix::qs`] and
    /// [`QuantMatrix::scales`]), checking their sizes.
    pub fn from_parts(
        format: QuantFormat,
        rows: usize,
        cols: usize,
        qs: Vec<u8>,
        scales: Vec<f16>,
    ) -> Result<QuantMatrix, FormatError> {
        let bpr = cols.div_ceil(BLOCK);
        if qs.len() != rows * bpr * format.block_bytes() || scales.len() != rows * bpr {
            return Err(FormatError(format!(
                "{} matrix [{rows}, {cols}] needs {} bytes of quants and {} scales, got {} and {}",
                format.name(),
                rows * bpr * format.block_bytes(),
                rows * bpr,
                qs.len(),
                scales.len()
            )));
        }
        if let Some(bad) = scales.iter().find(|s| !s.is_finite()) {
            return Err(FormatError(format!(
                "{} matrix [{rows}, {cols}] has a non-finite scale {bad}",
                format.name()
            )));
        }
        Ok(QuantMatrix {
            format,
            rows,
            cols,
            blocks_per_row: bpr,
            qs,
            scales,
        })
    }

    /// The block format.
    pub fn format(&self) -> QuantFormat {
        self.format
    }
    /// Output features (rows).
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Input features (columns, before padding).
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Blocks per row (`ceil(cols / 32)`).
    pub fn blocks_per_row(&self) -> usize {
        self.blocks_per_row
    }
    /// All quants, row by row, block by block.
    pub fn qs(&self) -> &[u8] {
        &self.qs
    }
    /// All scales, row by row.
    pub fn scales(&self) -> &[f16] {
        &self.scales
    }
    /// Bytes of quants and scales.
    pub fn storage_bytes(&self) -> usize {
        self.qs.len() + 2 * self.scales.len()
    }

    /// Quants of row `r`.
    pub fn row_qs(&self, r: usize) -> &[u8] {
        let n = self.blocks_per_row * self.format.block_bytes();
        &self.qs[r * n..(r + 1) * n]
    }
    /// Scales of row `r`.
    pub fn row_scales(&self, r: usize) -> &[f16] {
        &self.scales[r * self.blocks_per_row..(r + 1) * self.blocks_per_row]
    }

    /// Dequantizes rows `r0 .. r0 + out.len() / cols` into `out` (row-major, `cols` wide).
    pub fn dequantize_rows(&self, r0: usize, out: &mut [f32]) {
        if self.cols == 0 {
            return;
        }
        for (i, dst) in out.chunks_mut(self.cols).enumerate() {
            dequantize_row(
                self.format,
                self.row_qs(r0 + i),
                self.row_scales(r0 + i),
                dst,
            );
        }
    }

    /// The whole matrix in f32.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        if self.cols > 0 {
            out.par_chunks_mut(self.cols)
                .enumerate()
                .for_each(|(r, dst)| self.dequantize_rows(r, dst));
        }
        out
    }
}

/// Dequantizes one row (`dst.len()` = the matrix's `cols`).
pub fn dequantize_row(format: QuantFormat, qs: &[u8], scales: &[f16], dst: &mut [f32]) {
    let bb = format.block_bytes();
    for (b, chunk) in dst.chunks_mut(BLOCK).enumerate() {
        let d = scales[b].to_f32();
        let q = &qs[b * bb..(b + 1) * bb];
        match format {
            QuantFormat::Q8_0 => {
                for (o, &v) in chunk.iter_mut().zip(q) {
                    *o = d * (v as i8) as f32;
                }
            }
            QuantFormat::Q4_0 => {
                for (i, o) in chunk.iter_mut().enumerate() {
                    let byte = q[i % 16];
                    let v = if i < 16 { byte & 0x0F } else { byte >> 4 };
                    *o = d * (v as i32 - 8) as f32;
                }
            }
        }
    }
}

/// `q = round(x / d)` with `d = max|x| / 127` (rounded to f16 first, so that dequantization
/// uses exactly the scale the quants were computed with). Returns `d`.
fn quantize_q8_block(x: &[f32; BLOCK], dst: &mut [u8]) -> f16 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = f16::from_f32(amax / 127.0);
    let df = d.to_f32();
    let inv = if df > 0.0 { 1.0 / df } else { 0.0 };
    for (o, &v) in dst.iter_mut().zip(x) {
        *o = ((v * inv).round().clamp(-127.0, 127.0) as i8) as u8;
    }
    d
}

/// GGUF's `Q4_0` rule: the element of largest magnitude maps to -8 exactly (`d = max / -8`), so
/// the 16 levels are spent on the side that needs them. Returns `d`.
fn quantize_q4_block(x: &[f32; BLOCK], dst: &mut [u8]) -> f16 {
    let mut max = 0f32;
    for &v in x {
        if v.abs() > max.abs() {
            max = v;
        }
    }
    let d = f16::from_f32(max / -8.0);
    let df = d.to_f32();
    let inv = if df != 0.0 { 1.0 / df } else { 0.0 };
    let q = |v: f32| ((v * inv + 8.5).floor().clamp(0.0, 15.0)) as u8;
    for i in 0..BLOCK / 2 {
        dst[i] = q(x[i]) | (q(x[i + BLOCK / 2]) << 4);
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    #[test]
    fn round_trip_error_is_within_one_step() {
        let mut seed = 5;
        for format in [QuantFormat::Q8_0, QuantFormat::Q4_0] {
            for &(rows, cols) in &[(1, 1), (3, 31), (2, 32), (4, 33), (5, 100), (2, 4304)] {
                let x: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut seed)).collect();
                let q = QuantMatrix::quantize(format, &x, rows, cols);
                assert_eq!(q.blocks_per_row(), cols.div_ceil(32));
                let y = q.dequantize();
                for r in 0..rows {
                    for b in 0..q.blocks_per_row() {
                        let d = q.row_scales(r)[b].to_f32().abs();
                        // q8_0 rounds to the nearest level; q4_0 may clip the side opposite
                        // the largest magnitude by one level (GGUF's rule).
                        let tol = if format == QuantFormat::Q8_0 {
                            d * 0.501
                        } else {
                            d * 1.01
                        };
                        for c in b * 32..((b + 1) * 32).min(cols) {
                            let err = (x[r * cols + c] - y[r * cols + c]).abs();
                            assert!(
                                err <= tol + 1e-6,
                                "{format:?} [{rows},{cols}] at ({r},{c}): error {err} > {tol}"
                            );
                        }
                    }
                }
                let back = QuantMatrix::from_parts(
                    format,
                    rows,
                    cols,
                    q.qs().to_vec(),
                    q.scales().to_vec(),
                )
                .unwrap();
                assert_eq!(back.dequantize(), y);
            }
        }
    }

    #[test]
    fn q4_layout_is_gguf_q4_0() {
        // Element i in the low nibble of byte i, element i + 16 in the high nibble.
        let mut x = [0f32; 32];
        x[0] = -8.0;
        x[16] = 7.0;
        x[1] = 1.0;
        let q = QuantMatrix::quantize(QuantFormat::Q4_0, &x, 1, 32);
        assert_eq!(q.scales()[0].to_f32(), 1.0);
        assert_eq!(q.qs()[0], 15 << 4);
        assert_eq!(q.qs()[1], 9 | (8 << 4));
    }

    #[test]
    fn from_parts_rejects_bad_sizes_and_scales() {
        assert!(
            QuantMatrix::from_parts(QuantFormat::Q8_0, 2, 40, vec![0; 128], vec![f16::ONE; 4])
                .is_ok()
        );
        assert!(
            QuantMatrix::from_parts(QuantFormat::Q8_0, 2, 40, vec![0; 127], vec![f16::ONE; 4])
                .is_err()
        );
        assert!(
            QuantMatrix::from_parts(QuantFormat::Q4_0, 2, 40, vec![0; 64], vec![f16::ONE; 3])
                .is_err()
        );
        assert!(
            QuantMatrix::from_parts(QuantFormat::Q4_0, 2, 40, vec![0; 64], vec![f16::NAN; 4])
                .is_err()
        );
    }
}
