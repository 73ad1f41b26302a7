//! Decoding PNG and JPEG files to RGB8, with Pillow's `Image.open(...).convert("RGB")`
//! semantics.

mod jpeg;
mod png;

pub(crate) use jpeg::encode_jpeg_baseline;

use std::path::Path;

use crate::image::RgbImage;
use crate::ImageError;

/// The container formats this crate decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// PNG (any colour type and bit depth, interlaced or not; first frame of an APNG).
    Png,
    /// JPEG (baseline, progressive or arithmetic; greyscale, YCbCr/RGB or CMYK/YCCK).
    Jpeg,
}

const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1A, b'\n'];

/// Recognises the format from the first bytes, as Pillow's `_accept` functions do
/// (the 8-byte PNG signature; `FF D8 FF` for JPEG).
pub fn detect_format(bytes: &[u8]) -> Result<ImageFormat, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    if bytes.starts_with(&PNG_SIGNATURE) {
        return Ok(ImageFormat::Png);
    }
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return Ok(ImageFormat::Jpeg);
    }
    let magic = bytes
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ");
    Err(ImageError::UnknownFormat { magic })
}

/// Decodes a PNG or JPEG held in memory to RGB8, giving the same pixels as Pillow's
/// `Image.open(io.BytesIO(bytes)).convert("RGB")`.
///
/// Greyscale is replicated to the three channels, alpha is dropped (not composited),
/// palettes are looked up, 16-bit samples are reduced the way Pillow does, CMYK JPEGs are
/// converted with Pillow's formula. See the crate documentation for the exact rules and
/// the measured agreement with Pillow.
///
/// Errors: [`ImageError::Empty`], [`ImageError::UnknownFormat`], [`ImageError::Corrupt`]
/// (including truncated data), [`ImageError::Unsupported`], [`ImageError::ZeroSize`],
/// [`ImageError::TooLarge`].
pub fn decode(bytes: &[u8]) -> Result<RgbImage, ImageError> {
    decode_with(bytes, JpegIdct::Accurate)
}

/// The inverse DCT libjpeg uses for JPEG data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum JpegIdct {
    /// `JDCT_ISLOW`, the accurate integer IDCT: what Pillow uses (inference path).
    #[default]
    Accurate,
    /// `JDCT_IFAST`, the fast integer IDCT: what TensorFlow's `tf.io.decode_jpeg` /
    /// `decode_image` use by default (`dct_method=""` means `INTEGER_FAST`), i.e. the
    /// reference's RLDS training pipeline.
    Fast,
}

/// Like [`decode`], choosing the JPEG IDCT (PNG decoding is unaffected).
pub fn decode_with(bytes: &[u8], idct: JpegIdct) -> Result<RgbImage, ImageError> {
    match detect_format(bytes)? {
        ImageFormat::Png => png::decode_png(bytes),
        ImageFormat::Jpeg => jpeg::decode_jpeg(bytes, idct),
    }
}

/// Reads and decodes an image file; see [`decode`]. Every error names the path.
pub fn open(path: &Path) -> Result<RgbImage, ImageError> {
    let bytes = std::fs::read(path).map_err(|source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode(&bytes).map_err(|e| ImageError::File {
        path: path.to_path_buf(),
        source: Box::new(e),
    })
}
