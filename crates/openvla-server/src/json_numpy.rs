//! The [json-numpy](https://pypi.org/project/json-numpy/) wire format (version 2.1.1), which
//! `deploy.py` and its clients use for arrays.
//!
//! An array is the JSON object
//! `{"__numpy__": <base64 of the C-order bytes>, "dtype": <numpy descr>, "shape": [..]}`.
//! `json_numpy.dumps` writes the descr with `numpy.lib.format.dtype_to_descr`, so a `uint8`
//! image arrives as `"|u1"` and a `float64` action leaves as `"<f8"`;
//! `json_numpy.loads` reads any descr `numpy.dtype` accepts and reshapes the bytes with
//! `numpy.frombuffer(...).reshape(shape)`.
//!
//! This module decodes `uint8` arrays (images) and encodes `float64` vectors (actions).
//! Decoding checks everything numpy would refuse (a bad base64 string, a dtype other than
//! an unsigned byte, a shape whose product does not match the number of bytes) and returns
//! a [`CodecError`], never panics, and checks the size declared by `shape` against a limit
//! *before* decoding the base64 payload.

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use serde_json::{Map, Value};

/// The key that marks a JSON object as a json-numpy array.
pub const NUMPY_KEY: &str = "__numpy__";

/// Base64 as Python's `base64.b64encode` writes it (standard alphabet); padding is accepted
/// whether present or not.
pub(crate) const B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The numpy descrs this module accepts for an unsigned 8-bit array. Byte order means nothing
/// for one byte, so `"|u1"` (what json-numpy writes), `"<u1"` (what deploy.py's docstring
/// shows), `">u1"` and `"=u1"` are all `uint8`, as are numpy's other spellings of it.
pub const UINT8_DESCRS: &[&str] = &["|u1", "<u1", ">u1", "=u1", "u1", "uint8", "B", "|B"];

/// A json-numpy payload that cannot be turned into the requested array.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The object lacks a key or a key has the wrong JSON type.
    #[error("json-numpy array: {0}")]
    Structure(String),
    /// The `__numpy__` string is not valid base64.
    #[error("json-numpy array: invalid base64 in \"__numpy__\": {0}")]
    Base64(String),
    /// The dtype is not the one expected.
    #[error("json-numpy array: unsupported dtype {found:?}; expected uint8 (\"|u1\" or \"<u1\")")]
    Dtype {
        /// The descr that was sent.
        found: String,
    },
    /// The shape is not allowed, or does not match the number of bytes.
    #[error("json-numpy array: {0}")]
    Shape(String),
    /// The array declares more elements than the configured limit.
    #[error("json-numpy array of shape {shape:?} has {elements} elements, more than the limit of {limit}")]
    TooLarge {
        /// The declared shape.
        shape: Vec<u64>,
        /// The product of the shape (saturating).
        elements: u64,
        /// The limit.
        limit: u64,
    },
}

/// A decoded `uint8` array: its shape and its C-order bytes (`data.len()` is the product of
/// `shape`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct U8Array {
    /// The array's shape.
    pub shape: Vec<usize>,
    /// The bytes, C order.
    pub data: Vec<u8>,
}

/// Whether a JSON value is a json-numpy array (an object with a `"__numpy__"` key), as
/// json-numpy's `object_hook` decides it.
pub fn is_numpy(value: &Value) -> bool {
    value.as_object().is_some_and(|o| o.contains_key(NUMPY_KEY))
}

/// Decodes a json-numpy `uint8` array.
///
/// `max_elements` bounds the product of the declared shape; it is checked before the base64
/// payload is decoded. The payload must then hold exactly that many bytes.
pub fn decode_u8(value: &Value, max_elements: u64) -> Result<U8Array, CodecError> {
    let obj = value
        .as_object()
        .ok_or_else(|| CodecError::Structure("expected a JSON object".into()))?;
    let b64 = match obj.get(NUMPY_KEY) {
        Some(Value::String(s)) => s,
        Some(_) => {
            return Err(CodecError::Structure(
                "\"__numpy__\" must be a base64 string".into(),
            ))
        }
        None => return Err(CodecError::Structure("missing \"__numpy__\"".into())),
    };
    let dtype = match obj.get("dtype") {
        Some(Value::String(s)) => s,
        Some(_) => return Err(CodecError::Structure("\"dtype\" must be a string".into())),
        None => return Err(CodecError::Structure("missing \"dtype\"".into())),
    };
    if !UINT8_DESCRS.contains(&dtype.as_str()) {
        return Err(CodecError::Dtype {
            found: truncate(dtype, 64),
        });
    }
    let shape = parse_shape(obj)?;
    let elements = shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .unwrap_or(u64::MAX);
    if elements > max_elements {
        return Err(CodecError::TooLarge {
            shape,
            elements,
            limit: max_elements,
        });
    }
    // Cheap length check before decoding: n bytes take ceil(n / 3) * 4 characters with
    // padding, or that minus the padding without.
    let n = elements;
    let padded = n.div_ceil(3) * 4;
    let unpadded = padded - (3 - n % 3) % 3;
    let len = b64.len() as u64;
    if len != padded && len != unpadded {
        return Err(CodecError::Shape(format!(
            "the base64 payload has {len} characters, which cannot hold the {n} bytes of \
             shape {shape:?} with dtype uint8 (expected {padded})"
        )));
    }
    let data = B64
        .decode(b64.as_bytes())
        .map_err(|e| CodecError::Base64(e.to_string()))?;
    if data.len() as u64 != n {
        return Err(CodecError::Shape(format!(
            "{} bytes cannot be reshaped to {shape:?} ({n} bytes)",
            data.len()
        )));
    }
    let shape = shape
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| CodecError::Shape("shape does not fit in memory".into()))?;
    Ok(U8Array { shape, data })
}

fn parse_shape(obj: &Map<String, Value>) -> Result<Vec<u64>, CodecError> {
    let arr = match obj.get("shape") {
        Some(Value::Array(a)) => a,
        Some(_) => {
            return Err(CodecError::Structure(
                "\"shape\" must be a list of integers".into(),
            ))
        }
        None => return Err(CodecError::Structure("missing \"shape\"".into())),
    };
    if arr.len() > 32 {
        return Err(CodecError::Shape(format!(
            "shape has {} dimensions; numpy allows at most 32",
            arr.len()
        )));
    }
    arr.iter()
        .map(|d| {
            d.as_u64().ok_or_else(|| {
                CodecError::Shape(format!(
                    "shape entries must be non-negative integers, got {d}"
                ))
            })
        })
        .collect()
}

/// The json-numpy object of a `float64` vector, as `json_numpy.dumps(np.asarray(v))` writes
/// it: `{"__numpy__": ..., "dtype": "<f8", "shape": [len]}`.
pub fn encode_f64(values: &[f64]) -> Value {
    let bytes = f64_le_bytes(values);
    let mut obj = Map::new();
    obj.insert(NUMPY_KEY.into(), Value::String(STANDARD.encode(&bytes)));
    obj.insert("dtype".into(), Value::String("<f8".into()));
    obj.insert(
        "shape".into(),
        Value::Array(vec![Value::from(values.len())]),
    );
    Value::Object(obj)
}

/// `json_numpy.dumps(action)` for a `float64` vector, byte for byte: Python's `json.dumps`
/// with its default separators (`", "` and `": "`). This is the string `deploy.py` returns in
/// the double-encoded mode.
pub fn dumps_f64(values: &[f64]) -> String {
    let bytes = f64_le_bytes(values);
    format!(
        "{{\"{NUMPY_KEY}\": \"{}\", \"dtype\": \"<f8\", \"shape\": [{}]}}",
        STANDARD.encode(&bytes),
        values.len()
    )
}

/// `json_numpy.dumps(actions)` for a list of `float64` vectors (OFT's deploy.py reply in the
/// double-encoded mode): `[<dumps of each>]` joined with Python's `", "`.
pub fn dumps_f64_list(rows: &[Vec<f64>]) -> String {
    let parts: Vec<String> = rows.iter().map(|r| dumps_f64(r)).collect();
    format!("[{}]", parts.join(", "))
}

/// The little-endian bytes of a `float64` vector (numpy's `"<f8"`).
fn f64_le_bytes(values: &[f64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Decodes a json-numpy `float64` vector (for clients such as `openvla loadtest`).
pub fn decode_f64(value: &Value) -> Result<Vec<f64>, CodecError> {
    let obj = value
        .as_object()
        .ok_or_else(|| CodecError::Structure("expected a JSON object".into()))?;
    let b64 = obj
        .get(NUMPY_KEY)
        .and_then(Value::as_str)
        .ok_or_else(|| CodecError::Structure("missing or non-string \"__numpy__\"".into()))?;
    let dtype = obj
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| CodecError::Structure("missing or non-string \"dtype\"".into()))?;
    if dtype != "<f8" {
        return Err(CodecError::Dtype {
            found: truncate(dtype, 64),
        });
    }
    let shape = parse_shape(obj)?;
    let data = B64
        .decode(b64.as_bytes())
        .map_err(|e| CodecError::Base64(e.to_string()))?;
    let n = shape.iter().product::<u64>();
    if shape.len() != 1 || data.len() as u64 != n.saturating_mul(8) {
        return Err(CodecError::Shape(format!(
            "{} bytes do not make a float64 vector of shape {shape:?}",
            data.len()
        )));
    }
    Ok(data
        .chunks_exact(8)
        .map(|c| {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            f64::from_le_bytes(b)
        })
        .collect())
}

/// The json-numpy object of a `uint8` array (for clients such as `openvla loadtest`).
pub fn encode_u8(shape: &[usize], data: &[u8]) -> Value {
    let mut obj = Map::new();
    obj.insert(NUMPY_KEY.into(), Value::String(STANDARD.encode(data)));
    obj.insert("dtype".into(), Value::String("|u1".into()));
    obj.insert(
        "shape".into(),
        Value::Array(shape.iter().map(|&d| Value::from(d)).collect()),
    );
    Value::Object(obj)
}

/// At most `max` characters of `s`, for echoing client input in an error message.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max).collect();
        t.push('…');
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn decodes_what_json_numpy_writes() {
        // json_numpy.dumps(np.arange(6, dtype=np.uint8).reshape(1, 2, 3)) with json-numpy 2.1.1.
        let v: Value = serde_json::from_str(
            r#"{"__numpy__": "AAECAwQF", "dtype": "|u1", "shape": [1, 2, 3]}"#,
        )
        .unwrap();
        assert!(is_numpy(&v));
        let a = decode_u8(&v, 100).unwrap();
        assert_eq!(a.shape, vec![1, 2, 3]);
        assert_eq!(a.data, vec![0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn encodes_as_json_numpy_dumps() {
        // json_numpy.dumps(np.array([1.5, -2.0])) with json-numpy 2.1.1.
        assert_eq!(
            dumps_f64(&[1.5, -2.0]),
            r#"{"__numpy__": "AAAAAAAA+D8AAAAAAAAAwA==", "dtype": "<f8", "shape": [2]}"#
        );
        let v = encode_f64(&[1.5, -2.0]);
        assert_eq!(decode_f64(&v).unwrap(), vec![1.5, -2.0]);
        let s: Value = serde_json::from_str(&dumps_f64(&[0.1, 7.0])).unwrap();
        assert_eq!(decode_f64(&s).unwrap(), vec![0.1, 7.0]);
    }

    #[test]
    fn every_uint8_spelling_and_padding() {
        for d in UINT8_DESCRS {
            let v = json!({"__numpy__": "AAEC", "dtype": d, "shape": [3]});
            assert_eq!(decode_u8(&v, 10).unwrap().data, vec![0, 1, 2]);
        }
        let padded = json!({"__numpy__": "AAE=", "dtype": "|u1", "shape": [2]});
        let bare = json!({"__numpy__": "AAE", "dtype": "|u1", "shape": [2]});
        assert_eq!(decode_u8(&padded, 10).unwrap().data, vec![0, 1]);
        assert_eq!(decode_u8(&bare, 10).unwrap().data, vec![0, 1]);
    }

    #[test]
    fn rejects_what_numpy_rejects() {
        let cases = [
            (
                json!({"dtype": "|u1", "shape": [1]}),
                "missing \"__numpy__\"",
            ),
            (
                json!({"__numpy__": 3, "dtype": "|u1", "shape": [1]}),
                "base64 string",
            ),
            (
                json!({"__numpy__": "AA==", "shape": [1]}),
                "missing \"dtype\"",
            ),
            (
                json!({"__numpy__": "AA==", "dtype": "<f4", "shape": [1]}),
                "unsupported dtype",
            ),
            (
                json!({"__numpy__": "AA==", "dtype": "|u1"}),
                "missing \"shape\"",
            ),
            (
                json!({"__numpy__": "AA==", "dtype": "|u1", "shape": "1"}),
                "list of integers",
            ),
            (
                json!({"__numpy__": "AA==", "dtype": "|u1", "shape": [-1]}),
                "non-negative",
            ),
            (
                json!({"__numpy__": "AA==", "dtype": "|u1", "shape": [1.5]}),
                "non-negative",
            ),
            (
                json!({"__numpy__": "AA==", "dtype": "|u1", "shape": [2]}),
                "cannot be reshaped",
            ),
            (
                json!({"__numpy__": "AAEC", "dtype": "|u1", "shape": [2, 2]}),
                "cannot hold",
            ),
            (
                json!({"__numpy__": "AA!=", "dtype": "|u1", "shape": [1]}),
                "invalid base64",
            ),
            (
                json!({"__numpy__": "A===", "dtype": "|u1", "shape": [1]}),
                "invalid base64",
            ),
            (
                json!({"__numpy__": "", "dtype": "|u1", "shape": [4294967296u64, 4294967296u64]}),
                "more than the limit",
            ),
            (json!([1, 2]), "expected a JSON object"),
        ];
        for (v, want) in cases {
            let e = decode_u8(&v, 1 << 20).unwrap_err().to_string();
            assert!(e.contains(want), "{v}: {e}");
        }
    }

    #[test]
    fn size_limit_is_checked_before_base64() {
        // The payload is garbage, but the declared size is over the limit: that is reported.
        let v = json!({"__numpy__": "!!!!", "dtype": "|u1", "shape": [100, 100, 3]});
        assert!(matches!(
            decode_u8(&v, 1000),
            Err(CodecError::TooLarge {
                elements: 30000,
                ..
            })
        ));
    }
}
