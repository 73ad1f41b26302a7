//! JPEG decoding with libjpeg-turbo's decoder (the copy vendored by MozJPEG, built by the
//! `mozjpeg-sys` crate from C sources without SIMD), configured as Pillow configures the
//! libjpeg-turbo it ships: accurate integer IDCT (`JDCT_ISLOW`), fancy upsampling,
//! libjpeg's own colour conversion to RGB or greyscale. CMYK images are decoded to raw
//! CMYK, inverted (Pillow assumes Adobe polarity, rawmode `CMYK;I`) and converted with
//! Pillow's `cmyk2rgb`.
//!
//! Errors from libjpeg (`error_exit`) unwind out of the C code (it is compiled with
//! `-fexceptions`) and are caught at the boundary of [`decode_jpeg`]. Warnings are ignored
//! like Pillow ignores them, except running out of data: Pillow reports a truncated file
//! as an error (`image file is truncated`), and so does this decoder.

use std::os::raw::{c_int, c_ulong};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

use mozjpeg_sys as ffi;

use super::JpegIdct;
use crate::image::{checked_len, RgbImage};
use crate::ImageError;

const FORMAT: &str = "JPEG";

/// libjpeg's error manager followed by our own state. `cinfo.err` points at `mgr`, the
/// first field of this `repr(C)` struct, so callbacks can reach `hit_eof` from it.
#[repr(C)]
struct ErrorState {
    mgr: ffi::jpeg_error_mgr,
    /// Set when the decoder ran past the end of the data (JWRN_JPEG_EOF).
    hit_eof: bool,
}

/// The panic payload carrying a libjpeg error out of the C code.
struct JpegFatal {
    /// libjpeg's message.
    message: String,
    /// Whether the decoder had already run out of data (the error is then a consequence
    /// of the truncation, e.g. a half-read marker segment).
    hit_eof: bool,
}

/// libjpeg's message for the current `msg_code`, via its `format_message`.
///
/// # Safety
/// `cinfo.err` must point at a live `jpeg_error_mgr` initialised by `jpeg_std_error`.
unsafe fn libjpeg_message(cinfo: &mut ffi::jpeg_common_struct) -> String {
    // SAFETY: guaranteed by the caller.
    let err = unsafe { &*cinfo.err };
    let code = err.msg_code;
    match err.format_message {
        Some(format_message) => {
            let mut buffer = [0u8; 80];
            // SAFETY: the binding declares the output buffer as `&[u8; 80]`, but libjpeg
            // writes into it (it is a `char *` in C); pass a pointer to a mutable buffer
            // through an ABI-identical signature.
            unsafe {
                let write: unsafe extern "C-unwind" fn(
                    &mut ffi::jpeg_common_struct,
                    *mut [u8; 80],
                ) = std::mem::transmute(format_message);
                write(cinfo, &mut buffer);
            }
            let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
            let msg = String::from_utf8_lossy(&buffer[..end]).into_owned();
            if msg.is_empty() {
                format!("libjpeg error {code}")
            } else {
                msg
            }
        }
        None => format!("libjpeg error {code}"),
    }
}

/// `error_exit`: must not return to libjpeg, so it unwinds to [`decode_jpeg`].
unsafe extern "C-unwind" fn error_exit(cinfo: &mut ffi::jpeg_common_struct) {
    // SAFETY: libjpeg calls this with the cinfo whose `err` we installed, the `mgr`
    // field of a live `ErrorState`.
    let (message, hit_eof) = unsafe {
        let message = libjpeg_message(cinfo);
        (message, (*(cinfo.err as *const ErrorState)).hit_eof)
    };
    // resume_unwind does not run the panic hook, so nothing is printed.
    resume_unwind(Box::new(JpegFatal { message, hit_eof }));
}

/// `emit_message`: records warnings silently; notes running out of input.
unsafe extern "C-unwind" fn emit_message(cinfo: &mut ffi::jpeg_common_struct, level: c_int) {
    if level < 0 {
        // SAFETY: `cinfo.err` points at the `mgr` field of a live `ErrorState`.
        let state = unsafe { &mut *(cinfo.err as *mut ErrorState) };
        state.mgr.num_warnings += 1;
        if state.mgr.msg_code == ffi::JWRN_JPEG_EOF as c_int {
            state.hit_eof = true;
        }
    }
}

/// `output_message`: libjpeg would print to stderr; stay silent.
unsafe extern "C-unwind" fn output_message(_cinfo: &mut ffi::jpeg_common_struct) {}

/// Owns the libjpeg objects; destroys the decompressor on drop (also while unwinding).
struct Decompressor {
    cinfo: Box<ffi::jpeg_decompress_struct>,
    // Referenced by `cinfo.common.err`; boxed so that its address never changes.
    err: Box<ErrorState>,
}

impl Decompressor {
    fn new() -> Self {
        // SAFETY: both are plain C structs for which all-zero is a valid "not yet
        // initialised" state; jpeg_std_error and jpeg_create_decompress fill them in.
        let mut err: Box<ErrorState> = Box::new(unsafe { std::mem::zeroed() });
        let mut cinfo: Box<ffi::jpeg_decompress_struct> = Box::new(unsafe { std::mem::zeroed() });
        unsafe {
            ffi::jpeg_std_error(&mut err.mgr);
        }
        err.mgr.error_exit = Some(error_exit);
        err.mgr.emit_message = Some(emit_message);
        err.mgr.output_message = Some(output_message);
        err.hit_eof = false;
        cinfo.common.err = &mut err.mgr;
        // SAFETY: cinfo is zeroed with a valid error manager installed, as
        // jpeg_create_decompress requires.
        unsafe {
            ffi::jpeg_create_decompress(&mut *cinfo);
        }
        Decompressor { cinfo, err }
    }
}

impl Drop for Decompressor {
    fn drop(&mut self) {
        // SAFETY: jpeg_destroy_decompress accepts an object in any state after
        // jpeg_create_decompress (and a zeroed one: it only frees the memory pools).
        unsafe { ffi::jpeg_destroy_decompress(&mut self.cinfo) };
    }
}

fn truncated() -> ImageError {
    ImageError::corrupt(FORMAT, "truncated file (premature end of JPEG data)")
}

/// The body of [`decode_jpeg`]; libjpeg errors unwind out of it.
fn decode_unwinding(bytes: &[u8], idct: JpegIdct) -> Result<RgbImage, ImageError> {
    let mut d = Decompressor::new();
    let len = c_ulong::try_from(bytes.len())
        .map_err(|_| ImageError::unsupported(FORMAT, "data larger than libjpeg can address"))?;
    // SAFETY: `bytes` outlives `d` (both live until the end of this function) and
    // jpeg_mem_src only reads from it.
    unsafe {
        ffi::jpeg_mem_src(&mut d.cinfo, bytes.as_ptr(), len);
        ffi::jpeg_read_header(&mut d.cinfo, 1);
    }
    if d.err.hit_eof {
        return Err(truncated());
    }
    let (width, height) = (d.cinfo.image_width, d.cinfo.image_height);
    let out_len = checked_len(width.into(), height.into())?;
    let components = d.cinfo.num_components;
    let out_space = match components {
        1 => ffi::J_COLOR_SPACE::JCS_GRAYSCALE,
        3 => ffi::J_COLOR_SPACE::JCS_RGB,
        4 => ffi::J_COLOR_SPACE::JCS_CMYK,
        n => {
            return Err(ImageError::unsupported(
                FORMAT,
                format!("cannot handle {n}-layer images (Pillow supports 1, 3 and 4)"),
            ))
        }
    };
    d.cinfo.out_color_space = out_space;
    d.cinfo.dct_method = match idct {
        JpegIdct::Accurate => ffi::J_DCT_METHOD::JDCT_ISLOW,
        JpegIdct::Fast => ffi::J_DCT_METHOD::JDCT_IFAST,
    };
    d.cinfo.do_fancy_upsampling = 1;
    d.cinfo.scale_num = 1;
    d.cinfo.scale_denom = 1;
    // SAFETY: header read, parameters set; jpeg_start_decompress is the next legal call.
    unsafe {
        ffi::jpeg_start_decompress(&mut d.cinfo);
    }
    if d.err.hit_eof {
        return Err(truncated());
    }
    let out_w = d.cinfo.output_width as usize;
    let out_h = d.cinfo.output_height as usize;
    let n = d.cinfo.output_components as usize;
    if (out_w, out_h) != (width as usize, height as usize) || n != components as usize {
        return Err(ImageError::corrupt(
            FORMAT,
            format!(
                "decoder produced {out_w}x{out_h}x{n} for a {width}x{height}x{components} image"
            ),
        ));
    }
    let stride = out_w * n;
    let mut raw = vec![0u8; stride * out_h];
    for row in raw.chunks_exact_mut(stride) {
        let mut row_ptr = row.as_mut_ptr();
        // SAFETY: `row` has room for one scanline of output_width * output_components
        // samples, which is what jpeg_read_scanlines writes for max_lines = 1.
        let read = unsafe { ffi::jpeg_read_scanlines(&mut d.cinfo, &mut row_ptr, 1) };
        if read != 1 || d.err.hit_eof {
            return Err(truncated());
        }
    }
    // Like Pillow, do not require the data after the last scanline (EOI) to be intact.

    let data = match n {
        1 => raw.iter().flat_map(|&v| [v, v, v]).collect(),
        3 => raw,
        _ => cmyk_inverted_to_rgb(&raw),
    };
    debug_assert_eq!(data.len(), out_len);
    Ok(RgbImage::from_parts_unchecked(width, height, data))
}

/// Pillow's `CMYK;I` unpacking (inverts every sample) followed by `cmyk2rgb`
/// (`nk - MULDIV255(c, nk)` with `nk = 255 - k`).
fn cmyk_inverted_to_rgb(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() / 4 * 3);
    for px in raw.chunks_exact(4) {
        let nk = 255 - i32::from(255 - px[3]);
        for &v in &px[..3] {
            let c = i32::from(255 - v);
            let tmp = c * nk + 128;
            let muldiv = ((tmp >> 8) + tmp) >> 8;
            out.push((nk - muldiv).clamp(0, 255) as u8);
        }
    }
    out
}

/// Decodes JPEG bytes to RGB8 as Pillow's `Image.open(...).convert("RGB")` does.
pub(crate) fn decode_jpeg(bytes: &[u8], idct: JpegIdct) -> Result<RgbImage, ImageError> {
    match catch_unwind(AssertUnwindSafe(|| decode_unwinding(bytes, idct))) {
        Ok(result) => result,
        Err(payload) => match payload.downcast::<JpegFatal>() {
            Ok(fatal) if fatal.hit_eof => Err(ImageError::corrupt(
                FORMAT,
                format!(
                    "truncated file (premature end of JPEG data; then: {})",
                    fatal.message
                ),
            )),
            Ok(fatal) => Err(ImageError::corrupt(FORMAT, fatal.message)),
            // A panic of our own (a bug): keep unwinding.
            Err(other) => resume_unwind(other),
        },
    }
}

/// Owns a libjpeg compressor; destroys it on drop (also while unwinding).
struct Compressor {
    cinfo: Box<ffi::jpeg_compress_struct>,
    // Referenced by `cinfo.common.err`; boxed so that its address never changes.
    _err: Box<ErrorState>,
}

impl Compressor {
    fn new() -> Self {
        // SAFETY: as for `Decompressor::new`: zeroed C structs, then libjpeg initialises them.
        let mut err: Box<ErrorState> = Box::new(unsafe { std::mem::zeroed() });
        let mut cinfo: Box<ffi::jpeg_compress_struct> = Box::new(unsafe { std::mem::zeroed() });
        unsafe {
            ffi::jpeg_std_error(&mut err.mgr);
        }
        err.mgr.error_exit = Some(error_exit);
        err.mgr.emit_message = Some(emit_message);
        err.mgr.output_message = Some(output_message);
        cinfo.common.err = &mut err.mgr;
        // SAFETY: zeroed struct with a valid error manager, as jpeg_create_compress requires.
        unsafe {
            ffi::jpeg_create_compress(&mut *cinfo);
        }
        Compressor { cinfo, _err: err }
    }
}

impl Drop for Compressor {
    fn drop(&mut self) {
        // SAFETY: valid in any state after jpeg_create_compress.
        unsafe { ffi::jpeg_destroy_compress(&mut self.cinfo) };
    }
}

/// The body of [`encode_jpeg_baseline`]; libjpeg errors unwind out of it.
fn encode_unwinding(img: &RgbImage, quality: i32) -> Result<Vec<u8>, ImageError> {
    let mut c = Compressor::new();
    let mut buf: *mut u8 = std::ptr::null_mut();
    let mut size: c_ulong = 0;
    c.cinfo.image_width = img.width();
    c.cinfo.image_height = img.height();
    c.cinfo.input_components = 3;
    c.cinfo.in_color_space = ffi::J_COLOR_SPACE::JCS_RGB;
    // SAFETY: the compressor is created; the profile must be chosen before
    // jpeg_set_defaults, which then applies libjpeg(-turbo)'s defaults (baseline, Annex K
    // tables, 2x2 luma sampling, ISLOW forward DCT, no mozjpeg extensions).
    unsafe {
        ffi::jpeg_c_set_int_param(
            &mut c.cinfo,
            ffi::J_INT_PARAM::JINT_COMPRESS_PROFILE,
            ffi::JINT_COMPRESS_PROFILE_VALUE::JCP_FASTEST as c_int,
        );
        ffi::jpeg_set_defaults(&mut c.cinfo);
        ffi::jpeg_set_quality(&mut c.cinfo, quality, 1);
        ffi::jpeg_mem_dest(&mut c.cinfo, &mut buf, &mut size);
        ffi::jpeg_start_compress(&mut c.cinfo, 1);
    }
    let stride = img.width() as usize * 3;
    for row in img.data().chunks_exact(stride) {
        let row_ptr: ffi::JSAMPROW = row.as_ptr();
        // SAFETY: one scanline of width * 3 samples, which libjpeg only reads.
        unsafe {
            ffi::jpeg_write_scanlines(&mut c.cinfo, &row_ptr, 1);
        }
    }
    // SAFETY: all scanlines written; the memory destination then holds `size` bytes at `buf`,
    // allocated with malloc by libjpeg and freed here after copying.
    unsafe {
        ffi::jpeg_finish_compress(&mut c.cinfo);
        let out = std::slice::from_raw_parts(buf, size as usize).to_vec();
        libc_free(buf);
        Ok(out)
    }
}

extern "C" {
    #[link_name = "free"]
    fn libc_free(ptr: *mut u8);
}

/// Encodes RGB8 as a baseline JPEG the way libjpeg(-turbo)'s defaults do at `quality`
/// (Annex K tables scaled by quality, 4:2:0 chroma, accurate forward DCT, standard Huffman
/// tables), which is what `tf.image.encode_jpeg` produces with its default arguments
/// (`quality=95`).
pub(crate) fn encode_jpeg_baseline(img: &RgbImage, quality: i32) -> Result<Vec<u8>, ImageError> {
    match catch_unwind(AssertUnwindSafe(|| encode_unwinding(img, quality))) {
        Ok(result) => result,
        Err(payload) => match payload.downcast::<JpegFatal>() {
            Ok(fatal) => Err(ImageError::corrupt(FORMAT, fatal.message)),
            Err(other) => resume_unwind(other),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::JpegIdct;
    use super::*;

    #[test]
    fn cmyk_white_and_black() {
        // Stored (Adobe-inverted) CMYK: 255 everywhere is "no ink" -> white.
        assert_eq!(
            cmyk_inverted_to_rgb(&[255, 255, 255, 255]),
            vec![255, 255, 255]
        );
        // Full black ink.
        assert_eq!(cmyk_inverted_to_rgb(&[255, 255, 255, 0]), vec![0, 0, 0]);
        // Full cyan, no black.
        assert_eq!(cmyk_inverted_to_rgb(&[0, 255, 255, 255]), vec![0, 255, 255]);
    }

    #[test]
    fn garbage_after_soi_is_an_error() {
        let e = decode_jpeg(&[0xFF, 0xD8, 0xFF, 0x00, 1, 2, 3], JpegIdct::Accurate).unwrap_err();
        assert!(
            matches!(e, ImageError::Corrupt { format: "JPEG", .. }),
            "{e}"
        );
    }
}
