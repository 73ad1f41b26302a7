//! # openvla-py
//!
//! The `openvla_rs` Python module (PyO3, abi3 for CPython >= 3.9), built into a wheel by
//! maturin from `python/pyproject.toml`. The Python package `openvla_rs` re-exports the
//! [`PyPolicy`] class of the native module `openvla_rs._native` as `openvla_rs.Policy`.
//!
//! - [`engine`]: the one module that calls `openvla::Policy`.
//! - [`convert`]: PIL images / numpy arrays in, numpy arrays out, engine errors as exceptions.
//!
//! See `docs/python.md`.

#![warn(missing_docs)]

pub mod convert;
pub mod engine;

use crate::convert::{to_py_err, OpenVLAError};
use crate::engine::{Input, Output};
use openvla::quant::Quantization;
use openvla::{Policy, Precision};
use pyo3::exceptions::{PyFileNotFoundError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyType};
use std::path::PathBuf;
use std::sync::Arc;

/// An OpenVLA policy loaded from a Hugging Face model directory, run by the openvla-rs engine.
///
/// Load one with ``Policy.from_pretrained(model_dir)``, then call ``predict_action(image,
/// instruction, unnorm_key=None)`` as with the reference ``OpenVLAForActionPrediction``. The
/// engine runs without holding the GIL, so several Python threads can share one policy; every
/// answer is the same as the one it gets alone.
#[pyclass(name = "Policy", module = "openvla_rs", frozen)]
pub struct PyPolicy {
    inner: Arc<Policy>,
    config: serde_json::Value,
}

/// The arguments of one observation, before conversion.
struct PyInput<'a, 'py> {
    image: &'a Bound<'py, PyAny>,
    instruction: &'a Bound<'py, PyAny>,
    unnorm_key: Option<String>,
    images: Option<&'a Bound<'py, PyAny>>,
    proprio: Option<&'a Bound<'py, PyAny>>,
}

impl PyPolicy {
    /// Converts the Python arguments of one observation (`at` prefixes error messages).
    fn input(&self, a: PyInput<'_, '_>, at: &str) -> PyResult<Input> {
        let primary = engine::image_names(&self.inner)
            .into_iter()
            .next()
            .unwrap_or_else(|| "image".to_string());
        let mut images = vec![(primary, convert::image(a.image, &format!("{at}image"))?)];
        if let Some(extra) = a.images {
            images.extend(convert::extra_images(extra)?);
        }
        let instruction: String = a.instruction.extract().map_err(|_| {
            PyTypeError::new_err(format!(
                "{at}instruction: expected str, got {}",
                a.instruction
                    .get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_default()
            ))
        })?;
        let proprio = a.proprio.map(convert::proprio).transpose()?;
        Ok(Input {
            images,
            instruction,
            proprio,
            unnorm_key: a.unnorm_key,
        })
    }

    /// Runs the inputs without the GIL; the first failure raises, naming its index when
    /// there are several.
    fn run(&self, py: Python<'_>, inputs: Vec<Input>) -> PyResult<Vec<Output>> {
        self.run_timed(py, inputs).map(|(out, _)| out)
    }

    /// [`Self::run`], also returning the seconds spent inside the engine call.
    fn run_timed(&self, py: Python<'_>, inputs: Vec<Input>) -> PyResult<(Vec<Output>, f64)> {
        let n = inputs.len();
        let policy = self.inner.clone();
        let (results, seconds) = py.detach(move || {
            let t0 = std::time::Instant::now();
            let results = engine::predict(&policy, inputs);
            (results, t0.elapsed().as_secs_f64())
        });
        let outputs = results
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                r.map_err(|e| {
                    let err = to_py_err(e);
                    if n > 1 {
                        let msg = err.value(py).to_string();
                        let prefixed = format!("observation {i}: {msg}");
                        rebuild(py, &err, prefixed)
                    } else {
                        err
                    }
                })
            })
            .collect::<PyResult<Vec<Output>>>()?;
        Ok((outputs, seconds))
    }

    fn flat(&self) -> bool {
        engine::chunk_size(&self.inner) == 1
    }
}

/// The same exception type with a new message.
fn rebuild(py: Python<'_>, err: &PyErr, msg: String) -> PyErr {
    match err.get_type(py).call1((msg,)) {
        Ok(value) => PyErr::from_value(value),
        Err(e) => e,
    }
}

#[pymethods]
impl PyPolicy {
    /// Loads a policy from a Hugging Face model directory (config.json,
    /// preprocessor_config.json, tokenizer.json, safetensors, dataset_statistics.json).
    ///
    /// Args:
    ///     model_dir: the directory (str or os.PathLike). Nothing is downloaded.
    ///     precision: "auto" (f32 if it fits comfortably in memory, else bf16), "f32"
    ///         (the reference's float32 run), "bf16" (same results, half the memory) or "f16".
    ///     quantize: None, "int8" or "int4" (weight-only quantization while loading).
    ///     compute: None (the model's ``inference_compute`` in config.json, else "f32"),
    ///         "f32" (exact) or "bf16": the arithmetic of the many-row products (bf16
    ///         operands, f32 sums, as PyTorch bf16; AMX or AVX512-BF16 where the CPU has them).
    ///
    /// Raises:
    ///     FileNotFoundError: the directory or one of its files does not exist.
    ///     ValueError: an unknown precision, quantization or compute precision.
    ///     OpenVLAError: a model file is invalid.
    #[classmethod]
    #[pyo3(signature = (model_dir, precision = "auto", quantize = None, compute = None))]
    fn from_pretrained(
        _cls: &Bound<'_, PyType>,
        py: Python<'_>,
        model_dir: PathBuf,
        precision: &str,
        quantize: Option<&str>,
        compute: Option<&str>,
    ) -> PyResult<Self> {
        let precision: Precision = precision.parse().map_err(PyValueError::new_err)?;
        let compute: Option<openvla::kernels::ComputePrecision> = compute
            .map(|c| c.parse().map_err(PyValueError::new_err))
            .transpose()?;
        let quantize: Option<Quantization> = quantize
            .map(|q| q.parse().map_err(PyValueError::new_err))
            .transpose()?;
        if !model_dir.is_dir() {
            return Err(PyFileNotFoundError::new_err(format!(
                "model directory {} does not exist or is not a directory",
                model_dir.display()
            )));
        }
        let dir = model_dir.clone();
        let policy = py
            .detach(move || engine::load(&dir, precision, quantize, compute))
            .map_err(to_py_err)?;
        let config_path = model_dir.join("config.json");
        let config = std::fs::read_to_string(&config_path)
            .map_err(|e| {
                to_py_err(openvla::Error::Io {
                    path: config_path.clone(),
                    source: e,
                })
            })
            .and_then(|text| {
                serde_json::from_str(&text).map_err(|e| {
                    OpenVLAError::new_err(format!("{}: invalid JSON: {e}", config_path.display()))
                })
            })?;
        Ok(PyPolicy {
            inner: Arc::new(policy),
            config,
        })
    }

    /// Predicts the robot action for one observation, like the reference's
    /// ``predict_action(**inputs, unnorm_key=..., do_sample=False)``.
    ///
    /// Args:
    ///     image: the camera image, a PIL.Image.Image (converted with convert("RGB")) or an
    ///         HxWx3 uint8 numpy array (RGB), any size.
    ///     instruction: the task, e.g. "pick up the red block".
    ///     unnorm_key: the dataset whose statistics un-normalize the action; may be None only
    ///         when the model has exactly one dataset (see ``unnorm_keys``).
    ///     images: more camera views for families that take them (OFT's wrist cameras), a dict
    ///         name -> image in model order, or a list.
    ///     proprio: the proprioceptive state for families that take it (OFT), a 1-D sequence.
    ///
    /// Returns:
    ///     numpy.ndarray of float64: shape [D] for the 256-bin family, [K, D] for a chunked
    ///     family (K = ``chunk_size``).
    ///
    /// Raises:
    ///     ValueError: an unknown unnorm_key, an image that is not HxWx3 uint8, an empty
    ///         instruction, or inputs the model does not take.
    ///     TypeError: an image or instruction of the wrong type.
    #[pyo3(signature = (image, instruction, unnorm_key = None, *, images = None, proprio = None))]
    fn predict_action<'py>(
        &self,
        py: Python<'py>,
        image: &Bound<'py, PyAny>,
        instruction: &Bound<'py, PyAny>,
        unnorm_key: Option<String>,
        images: Option<&Bound<'py, PyAny>>,
        proprio: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let input = self.input(
            PyInput {
                image,
                instruction,
                unnorm_key,
                images,
                proprio,
            },
            "",
        )?;
        let out = self.run(py, vec![input])?.remove(0);
        convert::actions_array(py, &out.actions, self.flat())
    }

    /// Predicts one observation and returns everything ``openvla predict --json`` prints.
    ///
    /// Same arguments as ``predict_action``.
    ///
    /// Returns:
    ///     dict with "action" (float64 array, as predict_action returns), "normalized_action"
    ///     (the same before un-normalization, in [-1, 1]), "token_ids" (list of the generated
    ///     action token ids) and "unnorm_key" (the dataset statistics used).
    #[pyo3(signature = (image, instruction, unnorm_key = None, *, images = None, proprio = None))]
    fn predict<'py>(
        &self,
        py: Python<'py>,
        image: &Bound<'py, PyAny>,
        instruction: &Bound<'py, PyAny>,
        unnorm_key: Option<String>,
        images: Option<&Bound<'py, PyAny>>,
        proprio: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let input = self.input(
            PyInput {
                image,
                instruction,
                unnorm_key,
                images,
                proprio,
            },
            "",
        )?;
        let out = self.run(py, vec![input])?.remove(0);
        let flat = self.flat();
        let d = PyDict::new(py);
        d.set_item("action", convert::actions_array(py, &out.actions, flat)?)?;
        d.set_item(
            "normalized_action",
            convert::actions_array(py, &out.normalized_actions, flat)?,
        )?;
        d.set_item("token_ids", PyList::new(py, &out.token_ids)?)?;
        d.set_item("unnorm_key", out.unnorm_key)?;
        Ok(d)
    }

    /// Predicts several observations in one batched run (the same answers as one at a time).
    ///
    /// Args:
    ///     images: a list of images (PIL.Image.Image or HxWx3 uint8 arrays).
    ///     instructions: a list of instructions of the same length, or one str for all.
    ///     unnorm_key: None, one key for all, or a list of keys (one per observation).
    ///
    /// Returns:
    ///     list of numpy.ndarray, one per observation, as predict_action returns.
    ///
    /// Raises:
    ///     ValueError / TypeError as predict_action, naming the observation's index.
    #[pyo3(signature = (images, instructions, unnorm_key = None))]
    fn predict_batch<'py>(
        &self,
        py: Python<'py>,
        images: &Bound<'py, PyAny>,
        instructions: &Bound<'py, PyAny>,
        unnorm_key: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        if images.is_instance_of::<PyString>()
            || images.hasattr("convert")?
            || images.hasattr("dtype")?
        {
            return Err(PyTypeError::new_err(
                "images: expected a list of images; for one image use predict_action",
            ));
        }
        let images: Vec<Bound<'py, PyAny>> = images.try_iter()?.collect::<PyResult<Vec<_>>>()?;
        let n = images.len();
        let instructions: Vec<Bound<'py, PyAny>> = if instructions.is_instance_of::<PyString>() {
            vec![instructions.clone(); n]
        } else {
            instructions.try_iter()?.collect::<PyResult<Vec<_>>>()?
        };
        if instructions.len() != n {
            return Err(PyValueError::new_err(format!(
                "instructions: expected {n} (one per image) or one str, got {}",
                instructions.len()
            )));
        }
        let keys: Vec<Option<String>> = match unnorm_key {
            None => vec![None; n],
            Some(k) if k.is_none() => vec![None; n],
            Some(k) if k.is_instance_of::<PyString>() => vec![Some(k.extract()?); n],
            Some(k) => {
                let keys: Vec<Option<String>> = k.extract().map_err(|_| {
                    PyTypeError::new_err("unnorm_key: expected None, a str or a list of str")
                })?;
                if keys.len() != n {
                    return Err(PyValueError::new_err(format!(
                        "unnorm_key: expected {n} keys (one per image) or one str, got {}",
                        keys.len()
                    )));
                }
                keys
            }
        };
        let mut inputs = Vec::with_capacity(n);
        for (i, ((image, instruction), unnorm_key)) in
            images.iter().zip(&instructions).zip(keys).enumerate()
        {
            inputs.push(self.input(
                PyInput {
                    image,
                    instruction,
                    unnorm_key,
                    images: None,
                    proprio: None,
                },
                &format!("observation {i}: "),
            )?);
        }
        let flat = self.flat();
        self.run(py, inputs)?
            .iter()
            .map(|o| convert::actions_array(py, &o.actions, flat))
            .collect()
    }

    /// Benchmark hook: ``predict_action(image, instruction, unnorm_key)`` that also returns the
    /// seconds spent inside the engine call, as ``(action, engine_seconds)``; the rest of the
    /// call's time is what the Python layer adds (python/bench/overhead.py).
    #[pyo3(signature = (image, instruction, unnorm_key = None))]
    fn _timed_predict_action<'py>(
        &self,
        py: Python<'py>,
        image: &Bound<'py, PyAny>,
        instruction: &Bound<'py, PyAny>,
        unnorm_key: Option<String>,
    ) -> PyResult<(Bound<'py, PyAny>, f64)> {
        let input = self.input(
            PyInput {
                image,
                instruction,
                unnorm_key,
                images: None,
                proprio: None,
            },
            "",
        )?;
        let (mut out, seconds) = self.run_timed(py, vec![input])?;
        let out = out.remove(0);
        Ok((
            convert::actions_array(py, &out.actions, self.flat())?,
            seconds,
        ))
    }

    /// The dataset statistics, as in dataset_statistics.json: {unnorm_key: {"action": {...},
    /// ...}}.
    #[getter]
    fn norm_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let value = serde_json::to_value(self.inner.norm_stats())
            .map_err(|e| OpenVLAError::new_err(format!("norm_stats: {e}")))?;
        convert::json_to_py(py, &value)
    }

    /// The dataset names ``predict_action`` accepts as ``unnorm_key``, sorted.
    #[getter]
    fn unnorm_keys(&self) -> Vec<String> {
        self.inner.norm_stats().keys().cloned().collect()
    }

    /// The model's config.json, as a dict.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        convert::json_to_py(py, &self.config)
    }

    /// The action head family: "openvla" (7 autoregressive 256-bin action tokens),
    /// "oft-l1" or "oft-discrete" (a chunk of actions in one pass).
    #[getter]
    fn family(&self) -> &'static str {
        engine::family(&self.inner)
    }

    /// Actions per prediction: 1 for the 256-bin family, K for a chunked one.
    #[getter]
    fn chunk_size(&self) -> usize {
        engine::chunk_size(&self.inner)
    }

    /// The names of the camera images the model takes, primary first.
    #[getter]
    fn image_keys(&self) -> Vec<String> {
        engine::image_names(&self.inner)
    }

    /// Length of the proprio state the model takes, or None.
    #[getter]
    fn proprio_dim(&self) -> Option<usize> {
        engine::proprio_dim(&self.inner)
    }

    /// Action dimension of a dataset (the only one when ``unnorm_key`` is None).
    #[pyo3(signature = (unnorm_key = None))]
    fn action_dim(&self, unnorm_key: Option<&str>) -> PyResult<usize> {
        self.inner.action_dim(unnorm_key).map_err(to_py_err)
    }

    /// The arithmetic of the many-row products: ``"f32"`` (exact) or ``"bf16"``
    /// (``from_pretrained(compute=...)``).
    #[getter]
    fn compute(&self) -> &'static str {
        self.inner.compute().name()
    }

    /// The model directory.
    #[getter]
    fn model_dir(&self) -> String {
        self.inner.dir().display().to_string()
    }

    fn __repr__(&self) -> String {
        format!(
            "Policy(model_dir={:?}, family={:?}, weights={:?}, unnorm_keys={:?})",
            self.inner.dir().display().to_string(),
            engine::family(&self.inner),
            format!("{:?}", self.inner.weight_dtype()).to_lowercase(),
            self.unnorm_keys()
        )
    }
}

/// The native part of the `openvla_rs` package.
#[pymodule]
#[pyo3(name = "_native")]
fn native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyPolicy>()?;
    m.add("OpenVLAError", m.py().get_type::<OpenVLAError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
