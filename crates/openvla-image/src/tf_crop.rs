//! OpenVLA-OFT's evaluation-time centre crop (`center_crop_image` in the OFT repo's
//! `experiments/robot/openvla_utils.py`), which runs in TensorFlow:
//!
//! 1. `tf.image.convert_image_dtype(uint8 → float32)`: `x · f32(1/255)`;
//! 2. `tf.image.crop_and_resize` of the central box of side `sqrt(scale)` (so `scale` of the
//!    *area*) back to the input size, bilinear, reproduced from TF's CPU kernel in `f32`;
//! 3. `clip(0, 1)`, then `convert_image_dtype(float32 → uint8, saturate=True)`:
//!    `uint8(trunc(x · 255.5))` with saturation.

use crate::image::RgbImage;
use crate::ImageError;

/// The crop scale OFT uses (`crop_scale=0.9`: 90 % of the area).
pub const OFT_CROP_SCALE: f32 = 0.9;

/// TF's `crop_and_resize` of the centred box keeping `scale` of the area, resized back to the
/// input size, with TF's float→uint8 conversion. See the module docs for the exact arithmetic.
pub fn tf_center_crop(img: &RgbImage, scale: f32) -> Result<RgbImage, ImageError> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    // convert_image_dtype: cast, then multiply by the f32 scale 1/255.
    let to_unit = (1.0f64 / 255.0) as f32;
    let src: Vec<f32> = img.data().iter().map(|&v| v as f32 * to_unit).collect();
    // crop_and_resize(image, boxes, crop_scale): side = clip(sqrt(scale), 0, 1) in f32.
    let side = scale.sqrt().clamp(0.0, 1.0);
    let off = (1.0f32 - side) / 2.0;
    let (y1, x1, y2, x2) = (off, off, off + side, off + side);
    let (crop_h, crop_w) = (h, w);
    let axis = |lo: f32, hi: f32, n_in: usize, n_out: usize| -> Vec<(usize, usize, f32)> {
        let last = (n_in - 1) as f32;
        let step = if n_out > 1 {
            (hi - lo) * last / (n_out - 1) as f32
        } else {
            0.0
        };
        (0..n_out)
            .map(|i| {
                let pos = if n_out > 1 {
                    lo * last + i as f32 * step
                } else {
                    0.5 * (lo + hi) * last
                };
                // The box lies inside the image, so no extrapolation happens.
                let pos = pos.clamp(0.0, last);
                let a = pos.floor();
                (a as usize, pos.ceil() as usize, pos - a)
            })
            .collect()
    };
    let ys = axis(y1, y2, h, crop_h);
    let xs = axis(x1, x2, w, crop_w);
    let mut out = Vec::with_capacity(crop_h * crop_w * 3);
    for &(top, bottom, y_lerp) in &ys {
        for &(left, right, x_lerp) in &xs {
            for d in 0..3 {
                let at = |y: usize, x: usize| src[(y * w + x) * 3 + d];
                let (tl, tr) = (at(top, left), at(top, right));
                let (bl, br) = (at(bottom, left), at(bottom, right));
                let t = tl + (tr - tl) * x_lerp;
                let b = bl + (br - bl) * x_lerp;
                let v = (t + (b - t) * y_lerp).clamp(0.0, 1.0);
                out.push((v * 255.5).clamp(0.0, 255.0) as u8);
            }
        }
    }
    RgbImage::from_raw(crop_w as u32, crop_h as u32, out)
}
