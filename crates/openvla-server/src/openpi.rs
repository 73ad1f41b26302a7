//! openpi's websocket policy protocol, so that openpi's `openpi-client`
//! (`WebsocketClientPolicy`) and the robot runtimes built on it can talk to this engine.
//!
//! The protocol, as openpi's `websocket_policy_server.py` and `openpi_client/msgpack_numpy.py`
//! define it:
//! - a websocket on any path; `GET /healthz` answers `200 OK` without upgrading;
//! - on connect, the server sends one binary message: the metadata map;
//! - then, per step, the client sends one binary message, the observation map, and the
//!   server answers one binary message, the action map: `{"actions": float64 [K, D],
//!   "server_timing": {"infer_ms", "prev_total_ms"}}` (`prev_total_ms`, the whole previous
//!   step including its send, from the second step on);
//! - every message is msgpack; numpy arrays are maps with the binary keys `__ndarray__`
//!   (true), `data` (the raw bytes), `dtype` (numpy's `dtype.str`, e.g. `|u1`, `<f4`) and
//!   `shape`; numpy scalars are maps with `__npgeneric__`, `data` and `dtype`.
//!
//! A message the server cannot use (not msgpack, a missing key, a wrong shape) is answered
//! with a text message `openvla-rs: <what was wrong>`, which openpi's client raises as a
//! `RuntimeError`; the connection and the server stay up (openpi's own server closes the
//! connection instead).
//!
//! Observation keys reach the policy through a [`KeyMap`] (`openvla serve --openpi-*`
//! flags): which keys hold the camera images (primary first), the state and the prompt.

use crate::batcher::{timeout_error, Batcher};
use crate::engine::{Engine, ModelMetadata};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::request::{check_unnorm_key, ParseLimits};
use crate::ServerConfig;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing;
use axum::Router;
use openvla::{Observation, Request};
use openvla_image::RgbImage;
use rmpv::Value;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

/// Which observation keys feed which policy input.
///
/// The defaults are the keys of openpi's LIBERO example client (`observation/image`,
/// `observation/wrist_image`, `observation/state`, `prompt`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyMap {
    /// Keys of the camera images, in the model's order (primary first). A model that takes
    /// N images reads the first N; the others are ignored.
    pub images: Vec<String>,
    /// Key of the proprioceptive state; read only by a model that takes proprio.
    pub state: String,
    /// Key of the task instruction (a str).
    pub prompt: String,
    /// Key of an optional per-request `unnorm_key` (a str).
    pub unnorm_key: String,
}

impl Default for KeyMap {
    fn default() -> Self {
        KeyMap {
            images: vec!["observation/image".into(), "observation/wrist_image".into()],
            state: "observation/state".into(),
            prompt: "prompt".into(),
            unnorm_key: "unnorm_key".into(),
        }
    }
}

/// Configuration of the openpi front end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenpiConfig {
    /// Batching, timeouts and limits, shared with the REST server's flags.
    pub server: ServerConfig,
    /// Observation keys.
    pub keys: KeyMap,
    /// Dataset statistics for observations that carry no `unnorm_key` (openpi clients send
    /// none); `None` accepts only a model with exactly one dataset.
    pub default_unnorm_key: Option<String>,
}

struct OpenpiState {
    config: OpenpiConfig,
    model: ModelMetadata,
    metadata: Vec<u8>,
    batcher: Batcher,
}

/// The openpi websocket server: the route and the model thread behind it.
pub struct OpenpiServer {
    state: Arc<OpenpiState>,
}

impl OpenpiServer {
    /// Starts the model thread for `engine`. Fails if the default `unnorm_key` is not one of
    /// the model's datasets.
    pub fn new(engine: Arc<dyn Engine>, config: OpenpiConfig) -> std::io::Result<OpenpiServer> {
        let model = engine.metadata();
        if let Some(k) = &config.default_unnorm_key {
            check_unnorm_key(Some(k), model.action_dims.keys())
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.detail))?;
        }
        if config.keys.images.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the openpi key map names no image key",
            ));
        }
        let metadata = encode(&metadata_value(&model, &config));
        let batcher = Batcher::start(engine, config.server.batch, Arc::new(Metrics::default()))?;
        Ok(OpenpiServer {
            state: Arc::new(OpenpiState {
                config,
                model,
                metadata,
                batcher,
            }),
        })
    }

    /// The routes: `GET /healthz`, and the websocket on every other path.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/healthz", routing::get(healthz))
            .fallback(upgrade)
            .with_state(self.state.clone())
    }

    /// Serves on `listener` until `shutdown` resolves, then stops the model thread.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let result = axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await;
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || state.batcher.shutdown())
            .await
            .map_err(std::io::Error::other)?;
        result
    }
}

async fn healthz() -> &'static str {
    "OK\n"
}

async fn upgrade(State(state): State<Arc<OpenpiState>>, ws: WebSocketUpgrade) -> Response {
    let max = state.config.server.max_body_bytes;
    ws.max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| connection(socket, state))
        .into_response()
}

/// One client: the metadata first, then one action map (or text error) per observation.
async fn connection(mut socket: WebSocket, state: Arc<OpenpiState>) {
    if socket
        .send(Message::Binary(state.metadata.clone().into()))
        .await
        .is_err()
    {
        return;
    }
    let mut prev_total_ms: Option<f64> = None;
    while let Some(Ok(msg)) = socket.recv().await {
        let start = Instant::now();
        let reply = match msg {
            Message::Binary(data) => match infer(&state, &data).await {
                Ok((actions, infer_ms)) => {
                    Message::Binary(encode(&action_value(&actions, infer_ms, prev_total_ms)).into())
                }
                Err(e) => Message::Text(format!("openvla-rs: {e}").into()),
            },
            Message::Text(_) => Message::Text(
                "openvla-rs: expected a binary msgpack message (openpi_client.msgpack_numpy), \
                 got a text message"
                    .into(),
            ),
            Message::Close(_) => break,
            Message::Ping(_) | Message::Pong(_) => continue,
        };
        let ok = matches!(reply, Message::Binary(_));
        if socket.send(reply).await.is_err() {
            break;
        }
        prev_total_ms = if ok {
            Some(start.elapsed().as_secs_f64() * 1e3)
        } else {
            None
        };
    }
}

/// Decodes one observation, runs it, and returns the actions `[K][D]` and the model time.
async fn infer(state: &Arc<OpenpiState>, data: &[u8]) -> Result<(Vec<Vec<f64>>, f64), String> {
    let deadline = Instant::now() + state.config.server.request_timeout;
    let value = decode(data)?;
    let obs = parse_observation(&value, &state.config, state.model_inputs())?;
    let unnorm_key = obs
        .unnorm_key
        .clone()
        .or_else(|| state.config.default_unnorm_key.clone());
    check_unnorm_key(unnorm_key.as_deref(), state.model.action_dims.keys())
        .map_err(|e| e.detail)?;
    let request = to_request(obs, unnorm_key)?;
    let t0 = Instant::now();
    let rx = state
        .batcher
        .submit(request, deadline)
        .map_err(|e| e.detail)?;
    let reply = tokio::time::timeout_at(deadline.into(), rx)
        .await
        .map_err(|_| timeout_error().detail)?
        .map_err(|_| ApiError::internal("the model thread dropped the request").detail)?;
    let prediction = reply.outcome.map_err(|e| e.detail)?;
    let infer_ms = t0.elapsed().as_secs_f64() * 1e3;
    Ok((prediction_rows(prediction), infer_ms))
}

/// What the model takes, for reading observations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelInputs {
    /// Number of camera images.
    pub images: usize,
    /// Whether the model reads a proprio state.
    pub proprio: bool,
}

impl OpenpiState {
    fn model_inputs(&self) -> ModelInputs {
        ModelInputs {
            images: self.model.images.len().max(1),
            proprio: self.model.proprio_dim.is_some(),
        }
    }
}

/// An observation read through the key map.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenpiObservation {
    /// The images, in the key map's order, each with its key.
    pub images: Vec<(String, RgbImage)>,
    /// The state, when the model reads one.
    pub state: Option<Vec<f64>>,
    /// The instruction.
    pub prompt: String,
    /// The observation's own `unnorm_key`, if it carries one.
    pub unnorm_key: Option<String>,
}

/// The engine request of an observation (the one place this module builds engine types).
fn to_request(obs: OpenpiObservation, unnorm_key: Option<String>) -> Result<Request, String> {
    if obs.images.is_empty() {
        return Err("the observation has no image".to_string());
    }
    Ok(Request {
        observation: Observation {
            images: obs.images,
            instruction: obs.prompt,
            proprio: obs.state,
        },
        unnorm_key,
    })
}

/// The actions of a prediction as rows `[K][D]` (K = 1 for the 256-bin family).
fn prediction_rows(p: openvla::Prediction) -> Vec<Vec<f64>> {
    p.actions
}

/// Decodes one msgpack message.
pub fn decode(data: &[u8]) -> Result<Value, String> {
    let mut rest = data;
    let value = rmpv::decode::read_value(&mut rest)
        .map_err(|e| format!("the message is not msgpack: {e}"))?;
    if !rest.is_empty() {
        return Err(format!(
            "the message is not msgpack: {} bytes follow its first value",
            rest.len()
        ));
    }
    Ok(value)
}

/// Encodes one msgpack value.
pub fn encode(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing to a Vec cannot fail.
    let _ = rmpv::encode::write_value(&mut out, value);
    out
}

/// A map's entry by key, whether the key is a msgpack str or bin (Python str or bytes).
fn get<'a>(map: &'a [(Value, Value)], key: &str) -> Option<&'a Value> {
    map.iter()
        .find(|(k, _)| match k {
            Value::String(s) => s.as_str() == Some(key),
            Value::Binary(b) => b.as_slice() == key.as_bytes(),
            _ => false,
        })
        .map(|(_, v)| v)
}

fn key_text(k: &Value) -> String {
    match k {
        Value::String(s) => s.as_str().unwrap_or("?").to_string(),
        Value::Binary(b) => String::from_utf8_lossy(b).into_owned(),
        other => other.to_string(),
    }
}

/// A numpy array as openpi's `pack_array` writes it.
#[derive(Debug, Clone, PartialEq)]
pub struct NdArray<'a> {
    /// numpy's `dtype.str`, e.g. `|u1`, `<f4`.
    pub dtype: String,
    /// The shape.
    pub shape: Vec<usize>,
    /// The raw bytes, C order.
    pub data: &'a [u8],
}

/// Reads an `__ndarray__` map; `None` if `v` is not one. `what` names the key in errors.
pub fn ndarray<'a>(v: &'a Value, what: &str) -> Result<Option<NdArray<'a>>, String> {
    let Value::Map(m) = v else { return Ok(None) };
    if get(m, "__ndarray__").is_none() {
        return Ok(None);
    }
    let Some(Value::Binary(data)) = get(m, "data") else {
        return Err(format!("{what}: the __ndarray__ map has no binary 'data'"));
    };
    let dtype = match get(m, "dtype") {
        Some(Value::String(s)) => s.as_str().unwrap_or_default().to_string(),
        Some(Value::Binary(b)) => String::from_utf8_lossy(b).into_owned(),
        _ => return Err(format!("{what}: the __ndarray__ map has no 'dtype'")),
    };
    let Some(Value::Array(dims)) = get(m, "shape") else {
        return Err(format!("{what}: the __ndarray__ map has no 'shape' list"));
    };
    let shape = dims
        .iter()
        .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| format!("{what}: the shape {dims:?} is not a list of sizes"))?;
    let item = dtype_size(&dtype).ok_or_else(|| format!("{what}: unsupported dtype {dtype:?}"))?;
    let expected = shape
        .iter()
        .try_fold(item, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("{what}: the shape {shape:?} is too large"))?;
    if expected != data.len() {
        return Err(format!(
            "{what}: {} bytes of data for dtype {dtype} and shape {shape:?} (expected {expected})",
            data.len()
        ));
    }
    Ok(Some(NdArray { dtype, shape, data }))
}

/// Bytes per item of the numeric dtypes this server reads.
fn dtype_size(dtype: &str) -> Option<usize> {
    match dtype {
        "|u1" | "|i1" | "|b1" => Some(1),
        "<f2" | "<i2" | "<u2" => Some(2),
        "<f4" | "<i4" | "<u4" => Some(4),
        "<f8" | "<i8" | "<u8" => Some(8),
        _ => None,
    }
}

/// Reads a camera image: a uint8 array `HxWx3` (or `3xHxW`, which openpi's ALOHA clients
/// send), within the pixel limit.
pub fn parse_image(v: &Value, what: &str, limits: &ParseLimits) -> Result<RgbImage, String> {
    let a = ndarray(v, what)?.ok_or_else(|| {
        format!(
            "{what}: expected a numpy uint8 array (HxWx3), got {}",
            kind(v)
        )
    })?;
    if a.dtype != "|u1" {
        return Err(format!(
            "{what}: expected a uint8 image, got dtype {} (shape {:?})",
            a.dtype, a.shape
        ));
    }
    let (h, w, chw) = match a.shape.as_slice() {
        &[h, w, 3] => (h, w, false),
        &[3, h, w] => (h, w, true),
        other => {
            return Err(format!(
                "{what}: expected an HxWx3 (or 3xHxW) image, got shape {other:?}"
            ))
        }
    };
    let pixels = (h as u64).saturating_mul(w as u64);
    if pixels > limits.max_image_pixels {
        return Err(format!(
            "{what}: {h}x{w} image has more than the limit of {} pixels (--max-image-pixels)",
            limits.max_image_pixels
        ));
    }
    let data = if chw {
        let plane = h * w;
        let mut hwc = vec![0u8; plane * 3];
        for (i, px) in hwc.chunks_exact_mut(3).enumerate() {
            for (c, out) in px.iter_mut().enumerate() {
                *out = a.data[c * plane + i];
            }
        }
        hwc
    } else {
        a.data.to_vec()
    };
    let (Ok(w32), Ok(h32)) = (u32::try_from(w), u32::try_from(h)) else {
        return Err(format!("{what}: image of {h}x{w} pixels is too large"));
    };
    RgbImage::from_raw(w32, h32, data).map_err(|e| format!("{what}: {e}"))
}

/// Reads a 1-D numeric vector: a float or int array, or a list of numbers.
pub fn parse_vector(v: &Value, what: &str) -> Result<Vec<f64>, String> {
    if let Some(a) = ndarray(v, what)? {
        if a.shape.len() != 1 {
            return Err(format!(
                "{what}: expected a 1-D array, got shape {:?}",
                a.shape
            ));
        }
        let d = a.data;
        let out: Vec<f64> = match a.dtype.as_str() {
            "<f8" => d
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
            "<f4" => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap_or([0; 4])) as f64)
                .collect(),
            "<i8" => d
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f64)
                .collect(),
            "<i4" => d
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap_or([0; 4])) as f64)
                .collect(),
            other => {
                return Err(format!(
                    "{what}: expected a float or int array, got dtype {other}"
                ))
            }
        };
        return Ok(out);
    }
    match v {
        Value::Array(items) => items
            .iter()
            .map(|x| x.as_f64().or_else(|| x.as_i64().map(|i| i as f64)))
            .collect::<Option<Vec<f64>>>()
            .ok_or_else(|| format!("{what}: expected a list of numbers")),
        other => Err(format!(
            "{what}: expected a 1-D numeric array, got {}",
            kind(other)
        )),
    }
}

/// Reads a str: a msgpack str or a numpy str scalar (`__npgeneric__`).
fn parse_str(v: &Value, what: &str) -> Result<String, String> {
    match v {
        Value::String(s) => s
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("{what}: the string is not valid UTF-8")),
        Value::Map(m) if get(m, "__npgeneric__").is_some() => match get(m, "data") {
            Some(inner @ Value::String(_)) => parse_str(inner, what),
            _ => Err(format!(
                "{what}: expected a str, got a numpy scalar that is not one"
            )),
        },
        other => Err(format!("{what}: expected a str, got {}", kind(other))),
    }
}

/// A short name of a msgpack value's kind, for errors.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Nil => "None",
        Value::Boolean(_) => "a bool",
        Value::Integer(_) => "an int",
        Value::F32(_) | Value::F64(_) => "a float",
        Value::String(_) => "a str",
        Value::Binary(_) => "bytes",
        Value::Array(_) => "a list",
        Value::Map(_) => "a dict",
        Value::Ext(..) => "a msgpack extension",
    }
}

/// Reads an observation map through the key map.
pub fn parse_observation(
    v: &Value,
    config: &OpenpiConfig,
    inputs: ModelInputs,
) -> Result<OpenpiObservation, String> {
    let Value::Map(m) = v else {
        return Err(format!("the observation must be a dict, got {}", kind(v)));
    };
    let keys = &config.keys;
    let present = || {
        m.iter()
            .map(|(k, _)| format!("{:?}", key_text(k)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let missing = |key: &str, role: &str| {
        format!(
            "the observation has no {key:?} ({role}); it has: {}. Map other keys with \
             openvla serve --openpi-image-keys / --openpi-state-key / --openpi-prompt-key",
            present()
        )
    };
    if keys.images.len() < inputs.images {
        return Err(format!(
            "the model takes {} images but the key map names {} ({:?})",
            inputs.images,
            keys.images.len(),
            keys.images
        ));
    }
    let mut images = Vec::with_capacity(inputs.images);
    for key in keys.images.iter().take(inputs.images) {
        let value = get(m, key).ok_or_else(|| missing(key, "camera image"))?;
        images.push((key.clone(), parse_image(value, key, &config.server.limits)?));
    }
    let state = if inputs.proprio {
        let value = get(m, &keys.state).ok_or_else(|| missing(&keys.state, "state"))?;
        Some(parse_vector(value, &keys.state)?)
    } else {
        None
    };
    let prompt_value = get(m, &keys.prompt).ok_or_else(|| missing(&keys.prompt, "prompt"))?;
    let prompt = parse_str(prompt_value, &keys.prompt)?;
    let max = config.server.limits.max_instruction_bytes;
    if prompt.len() > max {
        return Err(format!(
            "{}: the prompt is {} bytes, more than the limit of {max} (--max-instruction-bytes)",
            keys.prompt,
            prompt.len()
        ));
    }
    let unnorm_key = match get(m, &keys.unnorm_key) {
        None | Some(Value::Nil) => None,
        Some(v) => Some(parse_str(v, &keys.unnorm_key)?),
    };
    Ok(OpenpiObservation {
        images,
        state,
        prompt,
        unnorm_key,
    })
}

fn s(text: &str) -> Value {
    Value::String(text.into())
}

fn bkey(text: &str) -> Value {
    Value::Binary(text.as_bytes().to_vec())
}

/// A float64 numpy array `[K, D]` as openpi's `pack_array` writes it (binary keys).
pub fn f64_array(rows: &[Vec<f64>]) -> Value {
    let cols = rows.first().map_or(0, Vec::len);
    let data: Vec<u8> = rows
        .iter()
        .flat_map(|r| r.iter().flat_map(|x| x.to_le_bytes()))
        .collect();
    Value::Map(vec![
        (bkey("__ndarray__"), Value::Boolean(true)),
        (bkey("data"), Value::Binary(data)),
        (bkey("dtype"), s("<f8")),
        (
            bkey("shape"),
            Value::Array(vec![(rows.len() as u64).into(), (cols as u64).into()]),
        ),
    ])
}

/// The action map sent for one observation.
pub fn action_value(actions: &[Vec<f64>], infer_ms: f64, prev_total_ms: Option<f64>) -> Value {
    let mut timing = vec![(s("infer_ms"), Value::F64(infer_ms))];
    if let Some(t) = prev_total_ms {
        timing.push((s("prev_total_ms"), Value::F64(t)));
    }
    Value::Map(vec![
        (s("actions"), f64_array(actions)),
        (s("server_timing"), Value::Map(timing)),
    ])
}

/// The metadata map sent first on every connection.
pub fn metadata_value(model: &ModelMetadata, config: &OpenpiConfig) -> Value {
    let strs = |v: &[String]| Value::Array(v.iter().map(|x| s(x)).collect());
    let keys: Vec<String> = model.action_dims.keys().cloned().collect();
    Value::Map(vec![
        (s("server"), s("openvla-rs")),
        (s("server_version"), s(env!("CARGO_PKG_VERSION"))),
        (s("protocol"), s("openpi")),
        (s("family"), s(&model.family)),
        (s("variant"), s(&model.variant)),
        (s("model_dir"), s(&model.model_dir)),
        (s("weight_dtype"), s(&model.weight_dtype)),
        (s("compute"), s(&model.compute)),
        (s("chunk_size"), Value::from(model.chunk_size as u64)),
        (
            s("action_dims"),
            Value::Map(
                model
                    .action_dims
                    .iter()
                    .map(|(k, d)| (s(k), Value::from(*d as u64)))
                    .collect(),
            ),
        ),
        (s("unnorm_keys"), strs(&keys)),
        (
            s("default_unnorm_key"),
            config.default_unnorm_key.as_deref().map_or(Value::Nil, s),
        ),
        (
            s("keys"),
            Value::Map(vec![
                (s("images"), strs(&config.keys.images)),
                (s("state"), s(&config.keys.state)),
                (s("prompt"), s(&config.keys.prompt)),
                (s("unnorm_key"), s(&config.keys.unnorm_key)),
            ]),
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> OpenpiConfig {
        OpenpiConfig {
            server: ServerConfig::default(),
            keys: KeyMap::default(),
            default_unnorm_key: None,
        }
    }

    const ONE_IMAGE: ModelInputs = ModelInputs {
        images: 1,
        proprio: false,
    };

    fn array(dtype: &str, shape: &[u64], data: Vec<u8>) -> Value {
        Value::Map(vec![
            (bkey("__ndarray__"), Value::Boolean(true)),
            (bkey("data"), Value::Binary(data)),
            (bkey("dtype"), s(dtype)),
            (
                bkey("shape"),
                Value::Array(shape.iter().map(|&d| d.into()).collect()),
            ),
        ])
    }

    fn obs(entries: Vec<(&str, Value)>) -> Value {
        Value::Map(entries.into_iter().map(|(k, v)| (s(k), v)).collect())
    }

    #[test]
    fn reads_an_hwc_image_the_prompt_and_a_key() {
        let pixels: Vec<u8> = (0..2 * 3 * 3).map(|i| i as u8).collect();
        let v = obs(vec![
            (
                "observation/image",
                array("|u1", &[2, 3, 3], pixels.clone()),
            ),
            ("observation/state", array("<f4", &[2], vec![0; 8])),
            ("prompt", s("pick up the red block")),
            ("unnorm_key", s("bridge_orig")),
        ]);
        let o = parse_observation(&decode(&encode(&v)).unwrap(), &config(), ONE_IMAGE).unwrap();
        assert_eq!(o.images.len(), 1);
        assert_eq!(o.images[0].1.size(), (3, 2));
        assert_eq!(o.images[0].1.data(), pixels.as_slice());
        assert_eq!(o.prompt, "pick up the red block");
        assert_eq!(o.unnorm_key.as_deref(), Some("bridge_orig"));
        assert_eq!(
            o.state, None,
            "a model without proprio does not read the state"
        );
    }

    #[test]
    fn a_chw_image_is_transposed() {
        // 3 planes of 1x2: R = [1, 2], G = [3, 4], B = [5, 6].
        let v = array("|u1", &[3, 1, 2], vec![1, 2, 3, 4, 5, 6]);
        let im = parse_image(&v, "img", &ParseLimits::default()).unwrap();
        assert_eq!(im.data(), &[1, 3, 5, 2, 4, 6]);
    }

    #[test]
    fn image_errors_name_the_key_and_what_was_expected() {
        let limits = ParseLimits::default();
        let e = parse_image(&array("<f4", &[2, 2, 3], vec![0; 48]), "cam", &limits).unwrap_err();
        assert!(
            e.contains("cam") && e.contains("uint8") && e.contains("<f4"),
            "{e}"
        );
        let e = parse_image(&array("|u1", &[2, 2, 4], vec![0; 16]), "cam", &limits).unwrap_err();
        assert!(e.contains("HxWx3") && e.contains("[2, 2, 4]"), "{e}");
        let e = parse_image(&array("|u1", &[2, 2, 3], vec![0; 5]), "cam", &limits).unwrap_err();
        assert!(e.contains("5 bytes") && e.contains("expected 12"), "{e}");
        let e = parse_image(&s("not an image"), "cam", &limits).unwrap_err();
        assert!(e.contains("a str"), "{e}");
        let small = ParseLimits {
            max_image_pixels: 3,
            ..limits
        };
        let e = parse_image(&array("|u1", &[2, 2, 3], vec![0; 12]), "cam", &small).unwrap_err();
        assert!(e.contains("limit"), "{e}");
    }

    #[test]
    fn missing_keys_list_what_the_observation_has() {
        let v = obs(vec![("image", array("|u1", &[1, 1, 3], vec![0; 3]))]);
        let e = parse_observation(&v, &config(), ONE_IMAGE).unwrap_err();
        assert!(
            e.contains("\"observation/image\"") && e.contains("\"image\""),
            "{e}"
        );
        assert!(e.contains("--openpi-image-keys"), "{e}");
        let mut c = config();
        c.keys.images = vec!["image".into()];
        let e = parse_observation(&v, &c, ONE_IMAGE).unwrap_err();
        assert!(e.contains("\"prompt\""), "{e}");
    }

    #[test]
    fn a_model_with_proprio_reads_the_state() {
        let state: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let v = obs(vec![
            ("observation/image", array("|u1", &[1, 1, 3], vec![0; 3])),
            (
                "observation/wrist_image",
                array("|u1", &[1, 1, 3], vec![9; 3]),
            ),
            ("observation/state", array("<f4", &[2], state)),
            ("prompt", s("x")),
        ]);
        let inputs = ModelInputs {
            images: 2,
            proprio: true,
        };
        let o = parse_observation(&v, &config(), inputs).unwrap();
        assert_eq!(o.images[1].0, "observation/wrist_image");
        assert_eq!(o.images[1].1.data(), &[9, 9, 9]);
        assert_eq!(o.state, Some(vec![1.5, -2.0]));
        let v = obs(vec![(
            "state",
            Value::Array(vec![1.into(), Value::F64(0.5)]),
        )]);
        let Value::Map(m) = &v else { unreachable!() };
        assert_eq!(parse_vector(&m[0].1, "state").unwrap(), vec![1.0, 0.5]);
        let e = parse_vector(&array("<f4", &[1, 2], vec![0; 8]), "state").unwrap_err();
        assert!(e.contains("1-D"), "{e}");
    }

    #[test]
    fn not_msgpack_and_not_a_dict_are_errors() {
        let e = decode(&[0x92, 0x01]).unwrap_err(); // a list of 2 with 1 item
        assert!(e.contains("not msgpack"), "{e}");
        let e = decode(&[0x01, 0x02]).unwrap_err();
        assert!(
            e.contains("not msgpack") && e.contains("1 bytes follow"),
            "{e}"
        );
        let e = parse_observation(&Value::from(3), &config(), ONE_IMAGE).unwrap_err();
        assert!(e.contains("dict") && e.contains("an int"), "{e}");
    }

    #[test]
    fn actions_are_a_float64_ndarray_with_binary_keys() {
        let v = action_value(&[vec![1.0, -0.5]], 2.5, Some(4.0));
        let back = decode(&encode(&v)).unwrap();
        let Value::Map(m) = &back else { panic!() };
        let a = ndarray(get(m, "actions").unwrap(), "actions")
            .unwrap()
            .unwrap();
        assert_eq!(a.dtype, "<f8");
        assert_eq!(a.shape, vec![1, 2]);
        assert_eq!(&a.data[..8], &1.0f64.to_le_bytes());
        // openpi's unpack_array looks the keys up as bytes.
        let Some(Value::Map(arr)) = get(m, "actions") else {
            panic!()
        };
        assert!(matches!(&arr[0].0, Value::Binary(b) if b == b"__ndarray__"));
        let Some(Value::Map(t)) = get(m, "server_timing") else {
            panic!()
        };
        assert_eq!(get(t, "infer_ms").and_then(Value::as_f64), Some(2.5));
        assert_eq!(get(t, "prev_total_ms").and_then(Value::as_f64), Some(4.0));
    }
}
