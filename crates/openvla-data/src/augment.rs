//! Training augmentations (spec §7.6, dlimp `augment_image` with OpenVLA's `image_aug` kwargs),
//! applied to the 224x224 uint8 image in this order, in `f32` in `[0, 1]` with a clip to `[0, 1]`
//! after each op, then converted back to uint8 as `tf.image.convert_image_dtype` does
//! (`trunc(x * 255.5)`):
//!
//! 1. random resized crop of area `scale` (0.9) and aspect `ratio` (1.0) at a uniform random
//!    offset, resampled back to the full size with TF's bilinear `crop_and_resize`;
//! 2. brightness `+ U(-0.2, 0.2)`;
//! 3. contrast `(x - mean_c) * U(0.8, 1.2) + mean_c` per channel;
//! 4. saturation: HSV `s * U(0.8, 1.2)` clipped to `[0, 1]`;
//! 5. hue: HSV `h + U(-0.05, 0.05)` wrapped.
//!
//! The draws come from this crate's seeded generator, so the distributions are the reference's
//! but the exact values are not TF's Philox stream. One quirk is kept on purpose: dlimp draws the
//! crop's height and width offsets from the *same* stateless seed, so with a square crop both
//! offsets are equal and the crop window slides along the image diagonal.
//! [`center_crop`] is the deterministic evaluation-time crop (spec §9.1).

use crate::decode::RgbImage;
use crate::rng::Rng;

/// Augmentation parameters (defaults = OpenVLA's `image_aug=True` settings).
#[derive(Debug, Clone, PartialEq)]
pub struct AugmentConfig {
    /// Crop area fraction range.
    pub crop_scale: (f32, f32),
    /// Crop aspect ratio range.
    pub crop_ratio: (f32, f32),
    /// Max brightness delta.
    pub brightness: f32,
    /// Contrast factor range.
    pub contrast: (f32, f32),
    /// Saturation factor range.
    pub saturation: (f32, f32),
    /// Max hue delta (fraction of a turn).
    pub hue: f32,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            crop_scale: (0.9, 0.9),
            crop_ratio: (1.0, 1.0),
            brightness: 0.2,
            contrast: (0.8, 1.2),
            saturation: (0.8, 1.2),
            hue: 0.05,
        }
    }
}

/// The random values drawn for one image (exposed for tests and logging).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AugmentDraw {
    /// Crop box `[y1, x1, y2, x2]` in normalized coordinates.
    pub crop_box: [f32; 4],
    /// Brightness delta.
    pub brightness: f32,
    /// Contrast factor.
    pub contrast: f32,
    /// Saturation factor.
    pub saturation: f32,
    /// Hue delta.
    pub hue: f32,
}

impl AugmentConfig {
    /// Draws the random parameters from `rng`.
    pub fn draw(&self, rng: &mut Rng) -> AugmentDraw {
        let u = |rng: &mut Rng, lo: f32, hi: f32| rng.uniform(lo as f64, hi as f64) as f32;
        // One uniform for the offsets, as dlimp's shared seed gives.
        let scale = u(rng, self.crop_scale.0, self.crop_scale.1);
        let ratio = u(rng, self.crop_ratio.0.ln(), self.crop_ratio.1.ln()).exp();
        let h = (scale / ratio).sqrt().clamp(0.0, 1.0);
        let w = (scale * ratio).sqrt().clamp(0.0, 1.0);
        let off = rng.next_f64() as f32;
        let (oy, ox) = (off * (1.0 - h), off * (1.0 - w));
        AugmentDraw {
            crop_box: [oy, ox, oy + h, ox + w],
            brightness: u(rng, -self.brightness, self.brightness),
            contrast: u(rng, self.contrast.0, self.contrast.1),
            saturation: u(rng, self.saturation.0, self.saturation.1),
            hue: u(rng, -self.hue, self.hue),
        }
    }
}

/// A float image `[H, W, 3]` in `[0, 1]`.
#[derive(Debug, Clone, PartialEq)]
pub struct FloatImage {
    /// Width.
    pub width: usize,
    /// Height.
    pub height: usize,
    /// Pixels.
    pub data: Vec<f32>,
}

/// `convert_image_dtype(uint8 -> float32)`: `x * (1/255)`.
#[inline]
pub fn to_float(img: &RgbImage) -> FloatImage {
    let s = (1.0f64 / 255.0) as f32;
    FloatImage {
        width: img.width as usize,
        height: img.height as usize,
        data: img.data.iter().map(|&v| v as f32 * s).collect(),
    }
}

/// `convert_image_dtype(float32 -> uint8, saturate=True)`: `trunc(clip(x * 255.5))`.
#[inline]
pub fn to_u8(img: &FloatImage) -> RgbImage {
    RgbImage {
        width: img.width as u32,
        height: img.height as u32,
        data: img
            .data
            .iter()
            .map(|&v| (v * 255.5).clamp(0.0, 255.0) as u8)
            .collect(),
    }
}

#[inline]
fn clip01(img: &mut FloatImage) {
    for v in &mut img.data {
        *v = v.clamp(0.0, 1.0);
    }
}

/// TF `crop_and_resize` (bilinear, extrapolation value 0) of one box to `out_h x out_w`.
#[inline]
pub fn crop_and_resize(img: &FloatImage, bx: [f32; 4], out_h: usize, out_w: usize) -> FloatImage {
    let (ih, iw) = (img.height, img.width);
    let [y1, x1, y2, x2] = bx;
    let hs = if out_h > 1 {
        (y2 - y1) * (ih as f32 - 1.0) / (out_h as f32 - 1.0)
    } else {
        0.0
    };
    let ws = if out_w > 1 {
        (x2 - x1) * (iw as f32 - 1.0) / (out_w as f32 - 1.0)
    } else {
        0.0
    };
    let mut out = vec![0f32; out_h * out_w * 3];
    let px = |y: usize, x: usize, c: usize| img.data[(y * iw + x) * 3 + c];
    for y in 0..out_h {
        let in_y = if out_h > 1 {
            y1 * (ih as f32 - 1.0) + y as f32 * hs
        } else {
            0.5 * (y1 + y2) * (ih as f32 - 1.0)
        };
        if in_y < 0.0 || in_y > ih as f32 - 1.0 {
            continue;
        }
        let (ty, by) = (in_y.floor() as usize, in_y.ceil() as usize);
        let yl = in_y - ty as f32;
        for x in 0..out_w {
            let in_x = if out_w > 1 {
                x1 * (iw as f32 - 1.0) + x as f32 * ws
            } else {
                0.5 * (x1 + x2) * (iw as f32 - 1.0)
            };
            if in_x < 0.0 || in_x > iw as f32 - 1.0 {
                continue;
            }
            let (lx, rx) = (in_x.floor() as usize, in_x.ceil() as usize);
            let xl = in_x - lx as f32;
            for c in 0..3 {
                let tl = px(ty, lx, c);
                let tr = px(ty, rx, c);
                let bl = px(by, lx, c);
                let br = px(by, rx, c);
                let top = tl + (tr - tl) * xl;
                let bottom = bl + (br - bl) * xl;
                out[(y * out_w + x) * 3 + c] = top + (bottom - top) * yl;
            }
        }
    }
    FloatImage {
        width: out_w,
        height: out_h,
        data: out,
    }
}

/// `adjust_brightness`: adds `delta`.
#[inline]
pub fn adjust_brightness(img: &mut FloatImage, delta: f32) {
    for v in &mut img.data {
        *v += delta;
    }
}

/// `adjust_contrast`: `(x - mean) * factor + mean`, per channel over the image.
#[inline]
pub fn adjust_contrast(img: &mut FloatImage, factor: f32) {
    let n = (img.width * img.height).max(1);
    let mut mean = [0f64; 3];
    for p in img.data.chunks_exact(3) {
        for c in 0..3 {
            mean[c] += p[c] as f64;
        }
    }
    let mean = mean.map(|m| (m / n as f64) as f32);
    for p in img.data.chunks_exact_mut(3) {
        for c in 0..3 {
            p[c] = (p[c] - mean[c]) * factor + mean[c];
        }
    }
}

#[inline]
fn rgb_to_hsv(r: f32, g: f32, b: f32) -> (f32, f32, f32) {
    let v = r.max(g).max(b);
    let range = v - r.min(g).min(b);
    let s = if v > 0.0 { range / v } else { 0.0 };
    let norm = 1.0 / (6.0 * range);
    let mut h = if r == v {
        norm * (g - b)
    } else if g == v {
        norm * (b - r) + 2.0 / 6.0
    } else {
        norm * (r - g) + 4.0 / 6.0
    };
    if range <= 0.0 {
        h = 0.0;
    }
    if h < 0.0 {
        h += 1.0;
    }
    (h, s, v)
}

#[inline]
fn hsv_to_rgb(h: f32, s: f32, v: f32) -> (f32, f32, f32) {
    let c = s * v;
    let m = v - c;
    let dh = h * 6.0;
    let cat = dh as i32;
    let mut f = dh;
    while f <= 0.0 {
        f += 2.0;
    }
    while f >= 2.0 {
        f -= 2.0;
    }
    let x = c * (1.0 - (f - 1.0).abs());
    let (r, g, b) = match cat {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        5 => (c, 0.0, x),
        _ => (0.0, 0.0, 0.0),
    };
    (r + m, g + m, b + m)
}

/// `adjust_saturation`: HSV `s = clip(s * factor, 0, 1)`.
#[inline]
pub fn adjust_saturation(img: &mut FloatImage, factor: f32) {
    for p in img.data.chunks_exact_mut(3) {
        let (h, s, v) = rgb_to_hsv(p[0], p[1], p[2]);
        let (r, g, b) = hsv_to_rgb(h, (s * factor).clamp(0.0, 1.0), v);
        p.copy_from_slice(&[r, g, b]);
    }
}

/// `adjust_hue`: HSV `h = (h + delta) mod 1`.
#[inline]
pub fn adjust_hue(img: &mut FloatImage, delta: f32) {
    for p in img.data.chunks_exact_mut(3) {
        let (h, s, v) = rgb_to_hsv(p[0], p[1], p[2]);
        let mut h = h + delta;
        h -= h.floor();
        let (r, g, b) = hsv_to_rgb(h, s, v);
        p.copy_from_slice(&[r, g, b]);
    }
}

/// Applies a drawn augmentation.
pub fn apply(img: &RgbImage, d: &AugmentDraw) -> RgbImage {
    // The passes below are inlined and built for AVX2 + FMA where the CPU has them (the same
    // bits; the baseline build calls libm for every floor of the crop's bilinear sampling).
    openvla_image::with_avx2_fma(|| apply_passes(img, d))
}

#[inline(always)]
fn apply_passes(img: &RgbImage, d: &AugmentDraw) -> RgbImage {
    let f = to_float(img);
    let (h, w) = (f.height, f.width);
    let mut f = crop_and_resize(&f, d.crop_box, h, w);
    clip01(&mut f);
    adjust_brightness(&mut f, d.brightness);
    clip01(&mut f);
    adjust_contrast(&mut f, d.contrast);
    clip01(&mut f);
    adjust_saturation(&mut f, d.saturation);
    clip01(&mut f);
    adjust_hue(&mut f, d.hue);
    clip01(&mut f);
    to_u8(&f)
}

/// Draws with `rng` and applies.
pub fn augment(img: &RgbImage, cfg: &AugmentConfig, rng: &mut Rng) -> RgbImage {
    let d = cfg.draw(rng);
    apply(img, &d)
}

/// The deterministic evaluation crop: the centered square-ish box of area `area`, resized back
/// to the input size with bilinear `crop_and_resize` (the reference eval scripts' `crop_scale`).
pub fn center_crop(img: &RgbImage, area: f32) -> RgbImage {
    let side = area.sqrt();
    let off = (1.0 - side) / 2.0;
    let f = to_float(img);
    let (h, w) = (f.height, f.width);
    let mut out = crop_and_resize(&f, [off, off, off + side, off + side], h, w);
    clip01(&mut out);
    to_u8(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_image() -> RgbImage {
        let (w, h) = (32u32, 24u32);
        let data = (0..w * h * 3)
            .map(|i| ((i * 37 + (i / 3) * 11) % 256) as u8)
            .collect();
        RgbImage {
            width: w,
            height: h,
            data,
        }
    }

    #[test]
    fn draws_in_range_and_deterministic() {
        let cfg = AugmentConfig::default();
        for s in 0..200 {
            let d = cfg.draw(&mut Rng::new(s));
            let [y1, x1, y2, x2] = d.crop_box;
            let area = (y2 - y1) * (x2 - x1);
            assert!((area - 0.9).abs() < 1e-5, "{area}");
            assert!(y1 >= 0.0 && x1 >= 0.0 && y2 <= 1.0 + 1e-6 && x2 <= 1.0 + 1e-6);
            assert_eq!(y1, x1); // dlimp's shared-seed quirk
            assert!(d.brightness.abs() <= 0.2);
            assert!((0.8..=1.2).contains(&d.contrast) && (0.8..=1.2).contains(&d.saturation));
            assert!(d.hue.abs() <= 0.05);
            assert_eq!(d, cfg.draw(&mut Rng::new(s)));
        }
        let img = test_image();
        let a = augment(&img, &cfg, &mut Rng::new(3));
        let b = augment(&img, &cfg, &mut Rng::new(3));
        let c = augment(&img, &cfg, &mut Rng::new(4));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!((a.width, a.height), (img.width, img.height));
    }

    #[test]
    fn identity_ops() {
        let img = test_image();
        let d = AugmentDraw {
            crop_box: [0.0, 0.0, 1.0, 1.0],
            brightness: 0.0,
            contrast: 1.0,
            saturation: 1.0,
            hue: 0.0,
        };
        let out = apply(&img, &d);
        let maxdiff = out
            .data
            .iter()
            .zip(&img.data)
            .map(|(&a, &b)| (a as i32 - b as i32).abs())
            .max()
            .unwrap();
        assert!(maxdiff <= 1, "{maxdiff}");
    }
}
