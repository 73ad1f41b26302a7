//! Parsing a `POST /act` body into an observation, as `deploy.py` reads it.
//!
//! Accepted bodies (spec §8):
//!
//! - `{"image": <json-numpy uint8 array>, "instruction": str, "unnorm_key": str | null}`, the
//!   array of shape `[H, W, 3]` (also `[H, W]`, replicated to RGB, and `[H, W, 4]`, alpha
//!   dropped, as `Image.fromarray(a).convert("RGB")` does);
//! - the same with `"image"` a base64 string of a PNG or JPEG file (an optional
//!   `data:image/...;base64,` prefix is allowed), for clients without numpy;
//! - OpenVLA-OFT's deploy.py format: `{"full_image": <uint8 array>, <every key containing
//!   "wrist">: <uint8 array> (in the order of the body), "state": <float array>, "instruction":
//!   str, "unnorm_key": str}`; the images are taken primary first, then the wrist keys in key
//!   order, as the reference's `get_vla_action` does;
//! - any of these with an image as a plain JSON nested list `[H][W][3]` of integers 0-255 (what
//!   `numpy.ndarray.tolist()` gives), for clients that send JSON without json-numpy;
//! - `{"encoded": "<one of the above as a JSON string>"}`, deploy.py's double-encoded mode,
//!   whose reply is a JSON string too.
//!
//! Keys other than these are ignored, as deploy.py ignores them. Every failure is an
//! [`ApiError`] with the status the API documents; nothing here panics on any input.

use crate::error::ApiError;
use crate::image_header;
use crate::json_numpy::{self, truncate, CodecError, B64};
use axum::http::StatusCode;
use base64::Engine as _;
use openvla_image::RgbImage;
use serde_json::{Map, Value};

/// Limits applied while parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseLimits {
    /// Largest image in pixels (`H * W`), checked from the declared shape or the PNG/JPEG
    /// header before any pixel is decoded.
    pub max_image_pixels: u64,
    /// Longest instruction in bytes (UTF-8).
    pub max_instruction_bytes: usize,
}

impl Default for ParseLimits {
    fn default() -> Self {
        ParseLimits {
            max_image_pixels: 16 * 1024 * 1024,
            max_instruction_bytes: 4096,
        }
    }
}

/// A parsed `/act` request.
#[derive(Debug, Clone, PartialEq)]
pub struct ActRequest {
    /// The camera images with their request keys, primary first (`image`, or OFT's
    /// `full_image` followed by the wrist keys).
    pub images: Vec<(String, RgbImage)>,
    /// The raw robot state (OFT's `state`), if given.
    pub proprio: Option<Vec<f64>>,
    /// The task instruction.
    pub instruction: String,
    /// The dataset statistics to un-normalize with, if given.
    pub unnorm_key: Option<String>,
    /// Whether the request came double-encoded (`{"encoded": "..."}`), so the reply must be a
    /// JSON string.
    pub encoded: bool,
}

/// Parses an `/act` body.
pub fn parse_act(body: &[u8], limits: &ParseLimits) -> Result<ActRequest, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request("malformed_json", format!("the body is not valid JSON: {e}"))
    })?;
    let Value::Object(mut obj) = value else {
        return Err(ApiError::invalid_field(format!(
            "the body must be a JSON object, got {}",
            type_name(&value)
        )));
    };
    let mut encoded = false;
    if obj.contains_key("encoded") {
        if obj.len() != 1 {
            return Err(ApiError::bad_request(
                "invalid_request",
                "a double-encoded request must have \"encoded\" as its only key",
            ));
        }
        let inner = match obj.remove("encoded") {
            Some(Value::String(s)) => s,
            Some(v) => {
                return Err(ApiError::invalid_field(format!(
                    "\"encoded\" must be a string holding the JSON request, got {}",
                    type_name(&v)
                )))
            }
            None => return Err(ApiError::missing_field("encoded")),
        };
        let value: Value = serde_json::from_str(&inner).map_err(|e| {
            ApiError::bad_request(
                "malformed_json",
                format!("the \"encoded\" string is not valid JSON: {e}"),
            )
        })?;
        obj = match value {
            Value::Object(o) => o,
            v => {
                return Err(ApiError::invalid_field(format!(
                    "the \"encoded\" string must hold a JSON object, got {}",
                    type_name(&v)
                )))
            }
        };
        encoded = true;
        let order = key_order(inner.as_bytes());
        return parse_fields(obj, &order, limits, encoded);
    }
    parse_fields(obj, &key_order(body), limits, encoded)
}

/// The top-level keys of a JSON object in the order they appear (the parsed map is sorted;
/// OFT's wrist images are taken in the order the client wrote them).
fn key_order(json: &[u8]) -> Vec<String> {
    use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
    struct Keys;
    impl<'de> Visitor<'de> for Keys {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Vec<String>, A::Error> {
            let mut keys = Vec::new();
            while let Some(k) = map.next_key::<String>()? {
                map.next_value::<IgnoredAny>()?;
                keys.push(k);
            }
            Ok(keys)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(json);
    (&mut de).deserialize_map(Keys).unwrap_or_default()
}

fn parse_fields(
    mut obj: Map<String, Value>,
    order: &[String],
    limits: &ParseLimits,
    encoded: bool,
) -> Result<ActRequest, ApiError> {
    // Check the cheap fields first, so that a request with a huge image and a bad
    // instruction is refused before the image is decoded.
    let instruction = match obj.remove("instruction") {
        Some(Value::String(s)) => s,
        Some(v) => {
            return Err(ApiError::invalid_field(format!(
                "\"instruction\" must be a string, got {}",
                type_name(&v)
            )))
        }
        None => return Err(ApiError::missing_field("instruction")),
    };
    if instruction.len() > limits.max_instruction_bytes {
        return Err(ApiError::bad_request(
            "invalid_request",
            format!(
                "the instruction has {} bytes, more than the limit of {}",
                instruction.len(),
                limits.max_instruction_bytes
            ),
        ));
    }
    let unnorm_key = match obj.remove("unnorm_key") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(v) => {
            return Err(ApiError::invalid_field(format!(
                "\"unnorm_key\" must be a string or null, got {}",
                type_name(&v)
            )))
        }
    };
    let proprio = match obj.remove("state") {
        None | Some(Value::Null) => None,
        Some(v) => Some(parse_state(&v)?),
    };
    let images = if let Some(full) = obj.remove("full_image") {
        let mut images = vec![(
            "full_image".to_string(),
            parse_named_image("full_image", &full, limits)?,
        )];
        let mut wrist: Vec<&String> = obj.keys().filter(|k| k.contains("wrist")).collect();
        wrist.sort_by_key(|k| order.iter().position(|o| o == *k).unwrap_or(usize::MAX));
        for k in wrist {
            images.push((k.clone(), parse_named_image(k, &obj[k.as_str()], limits)?));
        }
        images
    } else {
        match obj.remove("image") {
            None => return Err(ApiError::missing_field("image")),
            Some(v) => vec![("image".to_string(), parse_image(&v, limits)?)],
        }
    };
    Ok(ActRequest {
        images,
        proprio,
        instruction,
        unnorm_key,
        encoded,
    })
}

/// Decodes one image field, naming the key in errors.
fn parse_named_image(key: &str, v: &Value, limits: &ParseLimits) -> Result<RgbImage, ApiError> {
    parse_image(v, limits).map_err(|mut e| {
        e.detail = format!("{key:?}: {}", e.detail);
        e
    })
}

/// OFT's `state`: a json-numpy float64 vector or a plain list of numbers.
fn parse_state(v: &Value) -> Result<Vec<f64>, ApiError> {
    if json_numpy::is_numpy(v) {
        return json_numpy::decode_f64(v)
            .map_err(|e| ApiError::bad_request("invalid_array", format!("\"state\": {e}")));
    }
    match v {
        Value::Array(items) => items
            .iter()
            .map(|x| {
                x.as_f64().ok_or_else(|| {
                    ApiError::invalid_field(format!(
                        "\"state\" must hold numbers, got {}",
                        type_name(x)
                    ))
                })
            })
            .collect(),
        other => Err(ApiError::invalid_field(format!(
            "\"state\" must be a json-numpy float array or a list of numbers, got {}",
            type_name(other)
        ))),
    }
}

/// Decodes the `"image"` field: a json-numpy array, a base64 PNG/JPEG string, or a plain
/// nested list of uint8 values.
pub fn parse_image(v: &Value, limits: &ParseLimits) -> Result<RgbImage, ApiError> {
    match v {
        Value::Object(_) if json_numpy::is_numpy(v) => image_from_numpy(v, limits),
        Value::String(s) => image_from_file_b64(s, limits),
        Value::Array(rows) => image_from_nested_list(rows, limits),
        other => Err(ApiError::invalid_field(format!(
            "\"image\" must be a json-numpy uint8 array of shape [H, W, 3], a base64 PNG/JPEG \
             string or a nested list [H][W][3] of integers 0-255, got {}",
            type_name(other)
        ))),
    }
}

/// A plain nested list `[H][W][3]` (also `[H][W]` and `[H][W][4]`) of integers 0-255, as
/// `numpy.ndarray.tolist()` gives it. The size is checked before any pixel is read.
fn image_from_nested_list(rows: &[Value], limits: &ParseLimits) -> Result<RgbImage, ApiError> {
    let bad = |detail: String| ApiError::bad_request("invalid_array", detail);
    let w = match rows.first() {
        Some(Value::Array(row)) => row.len(),
        Some(other) => {
            return Err(bad(format!(
                "\"image\" as a list must be [H][W][3] of integers 0-255; its first row is {}",
                type_name(other)
            )))
        }
        None => return Err(bad("\"image\" is an empty list".into())),
    };
    let h = rows.len();
    if (h as u64).saturating_mul(w as u64) > limits.max_image_pixels {
        return Err(too_large(w as u64, h as u64, limits.max_image_pixels));
    }
    let channels = match rows[0].get(0) {
        Some(Value::Array(p)) => p.len(),
        Some(Value::Number(_)) => 1,
        _ => {
            return Err(bad(
                "\"image\" as a list: pixel [0][0] is not a number or a list".into(),
            ))
        }
    };
    let byte = |v: &Value, y: usize, x: usize| -> Result<u8, ApiError> {
        v.as_u64()
            .and_then(|n| u8::try_from(n).ok())
            .ok_or_else(|| {
                bad(format!(
                    "\"image\" pixel [{y}][{x}] holds {v}, expected integers 0-255 (uint8)"
                ))
            })
    };
    let mut data = Vec::with_capacity(h * w * channels);
    for (y, row) in rows.iter().enumerate() {
        let row = match row {
            Value::Array(r) if r.len() == w => r,
            Value::Array(r) => {
                return Err(bad(format!(
                    "\"image\" row {y} has {} pixels, row 0 has {w}",
                    r.len()
                )))
            }
            other => return Err(bad(format!("\"image\" row {y} is {}", type_name(other)))),
        };
        for (x, px) in row.iter().enumerate() {
            match px {
                Value::Array(p) if channels > 1 && p.len() == channels => {
                    for v in p {
                        data.push(byte(v, y, x)?);
                    }
                }
                v @ Value::Number(_) if channels == 1 => data.push(byte(v, y, x)?),
                _ => {
                    return Err(bad(format!(
                        "\"image\" pixel [{y}][{x}] must hold {channels} value(s) like pixel [0][0]"
                    )))
                }
            }
        }
    }
    let shape = if channels == 1 {
        vec![h, w]
    } else {
        vec![h, w, channels]
    };
    image_from_hwc(&shape, data)
}

fn too_large(w: u64, h: u64, limit: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "image_too_large",
        format!(
            "the image is {w}x{h} = {} pixels, more than the limit of {limit} (--max-image-pixels)",
            w.saturating_mul(h)
        ),
    )
}

fn image_from_numpy(v: &Value, limits: &ParseLimits) -> Result<RgbImage, ApiError> {
    // Check the declared height and width before touching the payload.
    if let Some(Value::Array(shape)) = v.get("shape") {
        if let (Some(h), Some(w)) = (
            shape.first().and_then(Value::as_u64),
            shape.get(1).and_then(Value::as_u64),
        ) {
            if (shape.len() == 2 || shape.len() == 3)
                && h.saturating_mul(w) > limits.max_image_pixels
            {
                return Err(too_large(w, h, limits.max_image_pixels));
            }
        }
    }
    let arr =
        json_numpy::decode_u8(v, limits.max_image_pixels.saturating_mul(4)).map_err(
            |e| match e {
                CodecError::Base64(_) => ApiError::bad_request("invalid_base64", e.to_string()),
                CodecError::TooLarge { .. } => ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "image_too_large",
                    e.to_string(),
                ),
                _ => ApiError::bad_request("invalid_array", e.to_string()),
            },
        )?;
    image_from_hwc(&arr.shape, arr.data)
}

/// An image from `data` laid out as `shape` ([H, W, 3], or [H, W] grey, or [H, W, 4] with the
/// alpha dropped, as Pillow's `convert("RGB")`).
fn image_from_hwc(shape: &[usize], data: Vec<u8>) -> Result<RgbImage, ApiError> {
    let shape_err = || {
        ApiError::bad_request(
            "invalid_array",
            format!(
                "the image must have shape [H, W, 3] (or [H, W] or [H, W, 4]) with H, W >= 1, \
                 got {shape:?}"
            ),
        )
    };
    let (h, w, c) = match *shape {
        [h, w] => (h, w, 1),
        [h, w, c] if c == 3 || c == 4 => (h, w, c),
        _ => return Err(shape_err()),
    };
    let (Ok(h32), Ok(w32)) = (u32::try_from(h), u32::try_from(w)) else {
        return Err(shape_err());
    };
    if h == 0 || w == 0 {
        return Err(shape_err());
    }
    let data = match c {
        3 => data,
        1 => data.iter().flat_map(|&g| [g, g, g]).collect(),
        _ => data
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
    };
    RgbImage::from_raw(w32, h32, data)
        .map_err(|e| ApiError::bad_request("invalid_array", e.to_string()))
}

fn image_from_file_b64(s: &str, limits: &ParseLimits) -> Result<RgbImage, ApiError> {
    let b64 = match s.strip_prefix("data:") {
        Some(rest) => match rest.split_once(";base64,") {
            Some((_, data)) => data,
            None => {
                return Err(ApiError::bad_request(
                    "invalid_base64",
                    "a data URL image must be base64 (data:image/png;base64,...)",
                ))
            }
        },
        None => s,
    };
    let bytes = B64.decode(b64.as_bytes()).map_err(|e| {
        ApiError::bad_request(
            "invalid_base64",
            format!("\"image\" is a string but not valid base64 of a PNG or JPEG file: {e}"),
        )
    })?;
    if let Some((w, h)) = image_header::dimensions(&bytes) {
        if u64::from(w) * u64::from(h) > limits.max_image_pixels {
            return Err(too_large(w.into(), h.into(), limits.max_image_pixels));
        }
    }
    openvla_image::decode(&bytes).map_err(|e| {
        ApiError::bad_request(
            "invalid_image",
            format!("\"image\" could not be decoded: {e}"),
        )
    })
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Checks an `unnorm_key` against the model's datasets, as the library would, so that an
/// unknown key is refused before the request is queued. `keys` are the model's datasets.
pub fn check_unnorm_key<'a>(
    unnorm_key: Option<&str>,
    keys: impl Iterator<Item = &'a String> + Clone,
) -> Result<(), ApiError> {
    let list = || {
        keys.clone()
            .map(|k| format!("{k:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let n = keys.clone().count();
    match unnorm_key {
        Some(k) if keys.clone().any(|x| x == k) => Ok(()),
        Some(k) => Err(ApiError::bad_request(
            "unknown_unnorm_key",
            format!(
                "unnorm_key {:?} is not one of the model's datasets; available keys: {}",
                truncate(k, 200),
                list()
            ),
        )),
        None if n == 1 => Ok(()),
        None => Err(ApiError::bad_request(
            "unknown_unnorm_key",
            format!(
                "the model has {n} datasets, so an unnorm_key is required; available keys: {}",
                list()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn png_b64() -> String {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let png = std::fs::read(root.join("testdata/openvla-tiny/s0_image.png")).unwrap();
        base64::engine::general_purpose::STANDARD.encode(png)
    }

    fn parse(v: Value) -> Result<ActRequest, ApiError> {
        parse_act(v.to_string().as_bytes(), &ParseLimits::default())
    }

    #[test]
    fn numpy_png_and_encoded_forms_give_the_same_image() {
        let b64 = png_b64();
        let from_png = parse(json!({"image": b64, "instruction": "go"})).unwrap();
        let img = from_png.images[0].1.clone();
        let (w, h) = img.size();
        let arr = json_numpy::encode_u8(&[h as usize, w as usize, 3], img.data());
        let from_np = parse(json!({"image": arr, "instruction": "go", "unnorm_key": "k"})).unwrap();
        assert_eq!(from_np.images[0].1, img);
        assert_eq!(from_np.unnorm_key.as_deref(), Some("k"));
        assert!(!from_np.encoded);
        let inner = json!({"image": arr, "instruction": "go"}).to_string();
        let enc = parse(json!({ "encoded": inner })).unwrap();
        assert_eq!(enc.images[0].1, img);
        assert!(enc.encoded);
        let data_url =
            parse(json!({"image": format!("data:image/png;base64,{b64}"), "instruction": "go"}))
                .unwrap();
        assert_eq!(data_url.images[0].1, img);
    }

    #[test]
    fn a_nested_list_image_equals_the_json_numpy_one() {
        let b64 = png_b64();
        let img = parse(json!({"image": b64, "instruction": "go"}))
            .unwrap()
            .images[0]
            .1
            .clone();
        let (w, h) = img.size();
        let rows: Vec<Vec<Vec<u8>>> = img
            .data()
            .chunks_exact(3 * w as usize)
            .map(|r| r.chunks_exact(3).map(<[u8]>::to_vec).collect())
            .collect();
        assert_eq!(rows.len(), h as usize);
        let r = parse(json!({"image": rows, "instruction": "go"})).unwrap();
        assert_eq!(r.images[0].1, img);
        // Grey and RGBA lists convert as arrays do.
        let grey = parse(json!({"image": [[10, 20]], "instruction": "x"})).unwrap();
        assert_eq!(grey.images[0].1.data(), &[10, 10, 10, 20, 20, 20]);
        let rgba = parse(json!({"image": [[[1, 2, 3, 4]]], "instruction": "x"})).unwrap();
        assert_eq!(rgba.images[0].1.data(), &[1, 2, 3]);
    }

    #[test]
    fn bad_nested_list_images_are_clear_errors() {
        let cases = [
            (json!([]), "empty list"),
            (
                json!([[[1, 2, 3]], [[1, 2, 3], [4, 5, 6]]]),
                "row 1 has 2 pixels, row 0 has 1",
            ),
            (
                json!([[[1, 2, 3], [4, 5]]]),
                "pixel [0][1] must hold 3 value(s)",
            ),
            (
                json!([[[1, 2, 300]]]),
                "pixel [0][0] holds 300, expected integers 0-255",
            ),
            (json!([[[0.5, 2, 3]]]), "pixel [0][0] holds 0.5"),
            (json!([[[1, 2]]]), "must have shape [H, W, 3]"),
            (json!(["abc"]), "first row is a string"),
        ];
        for (image, want) in cases {
            let e = parse(json!({"image": image, "instruction": "x"})).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{image}");
            assert!(e.detail.contains(want), "{image}: {}", e.detail);
        }
        // The size is checked before the pixels are read.
        let limits = ParseLimits {
            max_image_pixels: 3,
            ..ParseLimits::default()
        };
        let big = json!({"image": [[0, 0], [0, 0]], "instruction": "x"});
        let e = parse_act(big.to_string().as_bytes(), &limits).unwrap_err();
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[test]
    fn grey_and_rgba_arrays_convert_like_pillow() {
        let grey = json_numpy::encode_u8(&[1, 2], &[10, 20]);
        let r = parse(json!({"image": grey, "instruction": "x"})).unwrap();
        assert_eq!(r.images[0].1.data(), &[10, 10, 10, 20, 20, 20]);
        let rgba = json_numpy::encode_u8(&[1, 1, 4], &[1, 2, 3, 4]);
        let r = parse(json!({"image": rgba, "instruction": "x"})).unwrap();
        assert_eq!(r.images[0].1.data(), &[1, 2, 3]);
    }

    #[test]
    fn every_error_has_its_status() {
        let ok_img = json_numpy::encode_u8(&[1, 1, 3], &[1, 2, 3]);
        let cases: Vec<(Vec<u8>, u16, &str)> = vec![
            (b"{".to_vec(), 400, "malformed_json"),
            (b"".to_vec(), 400, "malformed_json"),
            (b"[1]".to_vec(), 422, "invalid_field"),
            (json!({"instruction": "x"}).to_string().into_bytes(), 422, "missing_field"),
            (json!({"image": ok_img}).to_string().into_bytes(), 422, "missing_field"),
            (json!({"image": ok_img, "instruction": 3}).to_string().into_bytes(), 422, "invalid_field"),
            (json!({"image": ok_img, "instruction": "x", "unnorm_key": 1}).to_string().into_bytes(), 422, "invalid_field"),
            // A list is an image form now ([H][W][3]); a flat one is a malformed array.
            (json!({"image": [1, 2], "instruction": "x"}).to_string().into_bytes(), 400, "invalid_array"),
            (json!({"image": true, "instruction": "x"}).to_string().into_bytes(), 422, "invalid_field"),
            (json!({"image": {"a": 1}, "instruction": "x"}).to_string().into_bytes(), 422, "invalid_field"),
            (json!({"image": "@@@", "instruction": "x"}).to_string().into_bytes(), 400, "invalid_base64"),
            (json!({"image": "AAAA", "instruction": "x"}).to_string().into_bytes(), 400, "invalid_image"),
            (json!({"image": {"__numpy__": "AA!A", "dtype": "|u1", "shape": [1, 1, 3]}, "instruction": "x"}).to_string().into_bytes(), 400, "invalid_base64"),
            (json!({"image": {"__numpy__": "AAAA", "dtype": "<f4", "shape": [1, 1, 3]}, "instruction": "x"}).to_string().into_bytes(), 400, "invalid_array"),
            (json!({"image": {"__numpy__": "AAAA", "dtype": "|u1", "shape": [1, 2, 3]}, "instruction": "x"}).to_string().into_bytes(), 400, "invalid_array"),
            (json!({"image": {"__numpy__": "AAAA", "dtype": "|u1", "shape": [3, 1, 1]}, "instruction": "x"}).to_string().into_bytes(), 400, "invalid_array"),
            (json!({"image": {"__numpy__": "", "dtype": "|u1", "shape": [0, 5, 3]}, "instruction": "x"}).to_string().into_bytes(), 400, "invalid_array"),
            (json!({"image": {"__numpy__": "", "dtype": "|u1", "shape": [100000, 100000, 3]}, "instruction": "x"}).to_string().into_bytes(), 413, "image_too_large"),
            (json!({"encoded": "{}", "image": 1}).to_string().into_bytes(), 400, "invalid_request"),
            (json!({"encoded": 5}).to_string().into_bytes(), 422, "invalid_field"),
            (json!({"encoded": "{nope"}).to_string().into_bytes(), 400, "malformed_json"),
            (json!({"encoded": "[]"}).to_string().into_bytes(), 422, "invalid_field"),
            (json!({"encoded": "{\"instruction\": \"x\"}"}).to_string().into_bytes(), 422, "missing_field"),
            (json!({"image": ok_img, "instruction": "x".repeat(5000)}).to_string().into_bytes(), 400, "invalid_request"),
        ];
        for (body, status, kind) in cases {
            let e = parse_act(&body, &ParseLimits::default()).unwrap_err();
            assert_eq!(
                (e.status.as_u16(), e.kind),
                (status, kind),
                "{}: {e}",
                String::from_utf8_lossy(&body)
                    .chars()
                    .take(120)
                    .collect::<String>()
            );
        }
    }

    #[test]
    fn png_header_is_checked_before_decoding() {
        let limits = ParseLimits {
            max_image_pixels: 100,
            ..ParseLimits::default()
        };
        let e = parse_act(
            json!({"image": png_b64(), "instruction": "x"})
                .to_string()
                .as_bytes(),
            &limits,
        )
        .unwrap_err();
        assert_eq!((e.status.as_u16(), e.kind), (413, "image_too_large"));
        // A forged header claiming 100000x100000 is refused from the header alone.
        let mut png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR".to_vec();
        png.extend(100_000u32.to_be_bytes());
        png.extend(100_000u32.to_be_bytes());
        let b64 = base64::engine::general_purpose::STANDARD.encode(png);
        let e = parse(json!({"image": b64, "instruction": "x"})).unwrap_err();
        assert_eq!((e.status.as_u16(), e.kind), (413, "image_too_large"));
    }

    #[test]
    fn unnorm_key_check_lists_the_keys() {
        let keys = ["a".to_string(), "b".to_string()];
        assert!(check_unnorm_key(Some("a"), keys.iter()).is_ok());
        let e = check_unnorm_key(Some("zz"), keys.iter()).unwrap_err();
        assert_eq!(e.status.as_u16(), 400);
        assert!(e.detail.contains("\"a\", \"b\""), "{}", e.detail);
        assert!(check_unnorm_key(None, keys.iter()).is_err());
        assert!(check_unnorm_key(None, keys[..1].iter()).is_ok());
    }
}
