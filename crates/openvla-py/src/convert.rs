//! Python values <-> engine values: images, instructions, proprio, numpy results, errors.

use openvla_image::RgbImage;
use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString};

pyo3::create_exception!(
    openvla_rs,
    OpenVLAError,
    PyRuntimeError,
    "A model file (config, checkpoint, tokenizer) is invalid, or the engine failed while running."
);

/// Maps an engine error to the Python exception a caller expects: `FileNotFoundError` for a
/// missing file, `ValueError` for a bad input or `unnorm_key`, `OpenVLAError` for a bad model.
pub fn to_py_err(e: openvla::Error) -> PyErr {
    use openvla::Error as E;
    let msg = e.to_string();
    match e {
        E::Io { ref source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            PyFileNotFoundError::new_err(msg)
        }
        E::Io { .. } => PyOSError::new_err(msg),
        E::UnnormKey(_) | E::InvalidInput(_) | E::Image(_) => PyValueError::new_err(msg),
        _ => OpenVLAError::new_err(msg),
    }
}

/// A short description of a Python value's type for error messages.
fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".to_string())
}

/// The contents of a `bytes` object (one copy; extracting a `Vec<u8>` would go item by item).
fn bytes(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<u8>> {
    let b = obj.cast::<PyBytes>().map_err(|_| {
        PyTypeError::new_err(format!(
            "{what}: tobytes() returned {}, not bytes",
            type_name(obj)
        ))
    })?;
    Ok(b.as_bytes().to_vec())
}

/// Reads an image: a `PIL.Image.Image` (converted with `convert("RGB")` unless it is RGB
/// already, as the engine's decoder does) or an `HxWx3` `uint8` array (numpy or anything with
/// `dtype`, `shape` and `tobytes`). `what` names the argument in errors.
pub fn image(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<RgbImage> {
    let is_pil = obj.hasattr("mode")? && obj.hasattr("convert")? && obj.hasattr("size")?;
    if is_pil {
        let mode: String = obj.getattr("mode")?.extract()?;
        let rgb = if mode == "RGB" {
            obj.clone()
        } else {
            obj.call_method1("convert", ("RGB",))?
        };
        let (w, h): (u32, u32) = rgb.getattr("size")?.extract()?;
        let data = bytes(&rgb.call_method0("tobytes")?, what)?;
        return RgbImage::from_raw(w, h, data)
            .map_err(|e| PyValueError::new_err(format!("{what}: {e}")));
    }
    if obj.hasattr("dtype")? && obj.hasattr("shape")? && obj.hasattr("tobytes")? {
        let dtype: String = obj.getattr("dtype")?.str()?.extract()?;
        let shape_obj = obj.getattr("shape")?;
        let shape: Vec<usize> = shape_obj.extract()?;
        if dtype != "uint8" || shape.len() != 3 || shape[2] != 3 {
            return Err(PyValueError::new_err(format!(
                "{what}: expected an HxWx3 uint8 array (RGB), got shape {} and dtype {dtype}",
                shape_obj.repr()?
            )));
        }
        let (h, w) = (shape[0], shape[1]);
        let (Ok(h), Ok(w)) = (u32::try_from(h), u32::try_from(w)) else {
            return Err(PyValueError::new_err(format!(
                "{what}: image of {h}x{w} pixels is too large"
            )));
        };
        // tobytes() returns C order whatever the strides are.
        let data = bytes(&obj.call_method0("tobytes")?, what)?;
        return RgbImage::from_raw(w, h, data)
            .map_err(|e| PyValueError::new_err(format!("{what}: {e}")));
    }
    Err(PyTypeError::new_err(format!(
        "{what}: expected a PIL.Image.Image or an HxWx3 uint8 numpy array, got {}",
        type_name(obj)
    )))
}

/// Reads the extra images of `images=`: a mapping name -> image (in its order) or a sequence
/// (named `image_1`, `image_2`, ...).
pub fn extra_images(obj: &Bound<'_, PyAny>) -> PyResult<Vec<(String, RgbImage)>> {
    let mut out = Vec::new();
    if let Ok(map) = obj.cast::<PyDict>() {
        for (k, v) in map.iter() {
            let name: String = k.extract().map_err(|_| {
                PyTypeError::new_err(format!("images: keys must be str, got {}", type_name(&k)))
            })?;
            let img = image(&v, &format!("images[{name:?}]"))?;
            out.push((name, img));
        }
        return Ok(out);
    }
    if obj.is_instance_of::<PyString>() {
        return Err(PyTypeError::new_err(
            "images: expected a dict of name -> image or a list of images, got str",
        ));
    }
    for (i, v) in obj.try_iter()?.enumerate() {
        let v = v?;
        out.push((
            format!("image_{}", i + 1),
            image(&v, &format!("images[{i}]"))?,
        ));
    }
    Ok(out)
}

/// Reads the proprio state: any sequence or 1-D array of numbers.
pub fn proprio(obj: &Bound<'_, PyAny>) -> PyResult<Vec<f64>> {
    let obj = if obj.hasattr("tolist")? {
        obj.call_method0("tolist")?
    } else {
        obj.clone()
    };
    obj.extract::<Vec<f64>>().map_err(|_| {
        PyValueError::new_err(format!(
            "proprio: expected a 1-D sequence or array of numbers, got {}",
            type_name(&obj)
        ))
    })
}

/// The actions as a float64 numpy array: `[D]` when `flat`, else `[K, D]`.
pub fn actions_array<'py>(
    py: Python<'py>,
    actions: &[Vec<f64>],
    flat: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let np = py.import("numpy")?;
    let float64 = np.getattr("float64")?;
    let list: Bound<'py, PyAny> = if flat && actions.len() == 1 {
        PyList::new(py, &actions[0])?.into_any()
    } else {
        PyList::new(py, actions)?.into_any()
    };
    np.call_method1("array", (list, float64))
}

/// A JSON value as Python objects (through the `json` module, so every type is a plain one).
pub fn json_to_py<'py>(py: Python<'py>, value: &serde_json::Value) -> PyResult<Bound<'py, PyAny>> {
    py.import("json")?
        .call_method1("loads", (value.to_string(),))
}
