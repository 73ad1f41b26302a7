//! TensorFlow's image resizing as OpenVLA's data pipelines and OFT's evaluation use it:
//! `tf.image.resize(method="lanczos3", antialias=True)` followed by round, clip and cast to
//! uint8 (dlimp's `resize_image`), reproduced from TensorFlow's `ScaleAndTranslate` CPU kernel:
//! separable spans with the kernel stretched by `1/scale` when downsampling, weights normalized
//! per output pixel, rows filtered first into a float buffer, then columns, all in `f32`; and
//! OFT's `resize_image_for_policy`, which puts a JPEG round trip in front of it.

use crate::decode::{decode_with, JpegIdct};
use crate::image::RgbImage;
use crate::ImageError;

/// TF's `LanczosKernelFunc` with radius 3 (in `f32`, with its `kPI` constant).
fn lanczos3(x: f32) -> f32 {
    // TF's kPI = 3.14159265359 rounds to the same f32 as PI.
    const PI: f32 = std::f32::consts::PI;
    const R: f32 = 3.0;
    let x = x.abs();
    if x > R {
        return 0.0;
    }
    if x <= 1e-3 {
        return 1.0;
    }
    R * (PI * x).sin() * (PI * x / R).sin() / (PI * PI * x * x)
}

/// Precomputed span weights along one dimension.
struct Spans {
    size: usize,
    starts: Vec<usize>,
    weights: Vec<f32>,
}

fn compute_spans(output_size: usize, input_size: usize, antialias: bool) -> Spans {
    let scale = output_size as f32 / input_size as f32;
    let inv_scale = 1.0f32 / scale;
    let kernel_scale = if antialias { inv_scale.max(1.0) } else { 1.0 };
    let radius = 3.0f32;
    let size = ((2.0 * (radius * kernel_scale).ceil()) as usize + 1).min(input_size);
    let mut starts = vec![0usize; output_size];
    let mut weights = vec![0f32; size * output_size];
    let one_over_kernel_scale = 1.0f32 / kernel_scale;
    let mut temp = Vec::with_capacity(size);
    for x in 0..output_size {
        let sample_f = (x as f32 + 0.5) * inv_scale;
        if sample_f < 0.0 || sample_f > input_size as f32 {
            continue;
        }
        let last = input_size as i64 - 1;
        let span_start = ((sample_f - radius * kernel_scale - 0.5).ceil() as i64).clamp(0, last);
        let span_end = ((sample_f + radius * kernel_scale - 0.5).floor() as i64).clamp(0, last) + 1;
        temp.clear();
        let mut total = 0.0f32;
        for source in span_start..span_end {
            let pos = source as f32 + 0.5 - sample_f;
            let w = lanczos3((pos * one_over_kernel_scale).abs());
            total += w;
            temp.push(w);
        }
        if total.abs() >= 1000.0 * f32::MIN_POSITIVE {
            let inv = 1.0 / total;
            for (j, w) in temp.iter().enumerate().take(size) {
                weights[x * size + j] = w * inv;
            }
        }
        starts[x] = span_start as usize;
    }
    Spans {
        size,
        starts,
        weights,
    }
}

/// Resizes interleaved RGB8 `data` of size `in_w x in_h` to `out_w x out_h` and returns the
/// float result (before rounding), `[H, W, C]`.
pub fn resize_lanczos3_f32(
    data: &[u8],
    (in_w, in_h): (u32, u32),
    (out_w, out_h): (u32, u32),
) -> Vec<f32> {
    let (in_w, in_h) = (in_w as usize, in_h as usize);
    let (out_w, out_h) = (out_w as usize, out_h as usize);
    let c = 3usize;
    if in_w == 0 || in_h == 0 || out_w == 0 || out_h == 0 {
        return vec![0.0; out_w * out_h * c];
    }
    let rows = compute_spans(out_h, in_h, true);
    let cols = compute_spans(out_w, in_w, true);
    // Rows: intermediate [out_h, in_w, c].
    let in_row = in_w * c;
    let mut inter = vec![0f32; out_h * in_row];
    for y in 0..out_h {
        let out = &mut inter[y * in_row..(y + 1) * in_row];
        let start = rows.starts[y];
        let real = (start + rows.size).min(in_h) - start;
        for j in 0..real {
            let w = rows.weights[y * rows.size + j];
            let src = &data[(start + j) * in_row..(start + j + 1) * in_row];
            for (o, &s) in out.iter_mut().zip(src) {
                *o += w * s as f32;
            }
        }
    }
    // Columns.
    let out_row = out_w * c;
    let mut out = vec![0f32; out_h * out_row];
    for y in 0..out_h {
        let src_row = &inter[y * in_row..(y + 1) * in_row];
        for x in 0..out_w {
            let start = cols.starts[x];
            let real = (start + cols.size).min(in_w) - start;
            let mut acc = [0f32; 3];
            for j in 0..real {
                let w = cols.weights[x * cols.size + j];
                let p = &src_row[(start + j) * c..(start + j) * c + c];
                for k in 0..c {
                    acc[k] += w * p[k];
                }
            }
            out[y * out_row + x * c..y * out_row + x * c + c].copy_from_slice(&acc);
        }
    }
    out
}

/// dlimp's `resize_image`: lanczos3 + antialias, round (half to even, as `tf.round`), clip to
/// [0, 255], uint8. Returns the interleaved RGB8 result.
pub fn resize_lanczos3_u8(data: &[u8], input: (u32, u32), output: (u32, u32)) -> Vec<u8> {
    resize_lanczos3_f32(data, input, output)
        .into_iter()
        .map(|v| v.round_ties_even().clamp(0.0, 255.0) as u8)
        .collect()
}

/// OFT's `resize_image_for_policy` (`experiments/robot/openvla_utils.py`): `tf.image.encode_jpeg`
/// with its defaults (baseline, quality 95, 4:2:0), `tf.io.decode_image` (fast integer IDCT,
/// fancy upsampling), then lanczos3 with antialiasing to `size x size` (non-square inputs are
/// squashed), round, clip, uint8.
pub fn tf_resize_for_policy(img: &RgbImage, size: u32) -> Result<RgbImage, ImageError> {
    let jpeg = crate::decode::encode_jpeg_baseline(img, 95)?;
    let decoded = decode_with(&jpeg, JpegIdct::Fast)?;
    RgbImage::from_raw(
        size,
        size,
        resize_lanczos3_u8(decoded.data(), decoded.size(), (size, size)),
    )
}
