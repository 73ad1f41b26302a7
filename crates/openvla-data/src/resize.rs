//! dlimp's `resize_image` for dataset frames: TensorFlow's lanczos3 resize (implemented in
//! `openvla-image`, shared with OFT's evaluation-time resize) on this crate's [`RgbImage`].

use crate::decode::RgbImage;

/// Resizes to `out_w x out_h` and returns the float result (before rounding), `[H, W, C]`.
pub fn resize_lanczos3_f32(img: &RgbImage, out_w: u32, out_h: u32) -> Vec<f32> {
    openvla_image::resize_lanczos3_f32(&img.data, (img.width, img.height), (out_w, out_h))
}

/// dlimp's `resize_image`: lanczos3 + antialias, round (half to even), clip to [0, 255], uint8.
pub fn resize_lanczos3(img: &RgbImage, out_w: u32, out_h: u32) -> RgbImage {
    RgbImage {
        width: out_w,
        height: out_h,
        data: openvla_image::resize_lanczos3_u8(&img.data, (img.width, img.height), (out_w, out_h)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_size_keeps_pixels() {
        let img = RgbImage {
            width: 5,
            height: 4,
            data: (0..60).map(|i| (i * 4) as u8).collect(),
        };
        assert_eq!(resize_lanczos3(&img, 5, 4), img);
    }

    #[test]
    fn constant_stays_constant() {
        let img = RgbImage {
            width: 30,
            height: 17,
            data: vec![77; 30 * 17 * 3],
        };
        let out = resize_lanczos3(&img, 224, 224);
        assert!(out.data.iter().all(|&v| v == 77));
        let out = resize_lanczos3(&img, 7, 9);
        assert!(out.data.iter().all(|&v| v == 77));
    }
}
