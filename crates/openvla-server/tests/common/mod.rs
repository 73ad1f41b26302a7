//! Shared test helpers: servers on loopback ephemeral ports, a mock engine, the tiny model.
#![allow(dead_code)]

use openvla::{Observation, Policy, Prediction, Request};
use openvla_server::client::{Connection, Reply};
use openvla_server::metrics::Metrics;
use openvla_server::{Engine, ModelMetadata, Server, ServerConfig};
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The shipped tiny model, loaded once per test binary.
pub fn tiny() -> Arc<Policy> {
    static P: OnceLock<Arc<Policy>> = OnceLock::new();
    P.get_or_init(|| {
        Arc::new(
            Policy::load(&root().join("models/openvla-tiny"), &Default::default())
                .expect("loading models/openvla-tiny"),
        )
    })
    .clone()
}

/// A server on 127.0.0.1 with an ephemeral port.
pub struct TestServer {
    pub addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    pub async fn start(engine: Arc<dyn Engine>, config: ServerConfig) -> TestServer {
        let server = Server::new(engine, config).unwrap();
        let metrics = server.metrics();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(server.serve(listener, async {
            let _ = rx.await;
        }));
        TestServer {
            addr,
            metrics,
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }

    pub async fn connect(&self) -> Connection {
        Connection::connect(self.addr).await.unwrap()
    }

    pub async fn post(&self, body: impl Into<bytes::Bytes>) -> Reply {
        self.connect().await.post("/act", body).await.unwrap()
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.connect().await.get(path).await.unwrap()
    }

    /// Triggers graceful shutdown and waits (bounded) for the server to stop.
    pub async fn stop(mut self) -> std::io::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let handle = self.handle.take().unwrap();
        tokio::time::timeout(Duration::from_secs(60), handle)
            .await
            .expect("server did not stop within 60 s")
            .unwrap()
    }

    /// Sends the shutdown signal without waiting.
    pub fn signal_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    pub async fn join(mut self) -> std::io::Result<()> {
        let handle = self.handle.take().unwrap();
        tokio::time::timeout(Duration::from_secs(60), handle)
            .await
            .expect("server did not stop within 60 s")
            .unwrap()
    }
}

/// An engine without a model: the action is `[instruction length, width, height]` (and a
/// fourth value 1.0 for unnorm_key "four"); it sleeps `delay` per batch, panics on the
/// instruction "panic", fails the whole batch on "fail batch", and records batch sizes.
pub struct MockEngine {
    pub delay: Duration,
    pub batches: Mutex<Vec<usize>>,
}

impl MockEngine {
    pub fn new(delay: Duration) -> Arc<MockEngine> {
        Arc::new(MockEngine {
            delay,
            batches: Mutex::new(Vec::new()),
        })
    }

    pub fn action(obs: &Observation, key: Option<&str>) -> Vec<f64> {
        let (w, h) = obs.primary().map_or((0, 0), |i| i.size());
        let mut a = vec![obs.instruction.len() as f64, w as f64, h as f64];
        if key == Some("four") {
            a.push(1.0);
        }
        a
    }
}

impl Engine for MockEngine {
    fn run_batch(&self, requests: &[Request]) -> openvla::Result<Vec<openvla::Result<Prediction>>> {
        self.batches.lock().unwrap().push(requests.len());
        std::thread::sleep(self.delay);
        if requests
            .iter()
            .any(|r| r.observation.instruction == "fail batch")
        {
            return Err(openvla::Error::InvalidInput("this batch cannot run".into()));
        }
        Ok(requests
            .iter()
            .map(|r| {
                if r.observation.instruction == "panic" {
                    panic!("mock engine asked to panic");
                }
                if r.observation.instruction.is_empty() {
                    return Err(openvla::Error::InvalidInput("empty instruction".into()));
                }
                let action = MockEngine::action(&r.observation, r.unnorm_key.as_deref());
                Ok(Prediction {
                    normalized_actions: vec![action.clone()],
                    actions: vec![action],
                    token_ids: vec![],
                    unnorm_key: r.unnorm_key.clone().unwrap_or_default(),
                })
            })
            .collect())
    }

    fn metadata(&self) -> ModelMetadata {
        ModelMetadata {
            variant: "mock".into(),
            model_dir: "mock".into(),
            weight_dtype: "f32".into(),
            compute: "f32".into(),
            action_dims: BTreeMap::from([("three".into(), 3), ("four".into(), 4)]),
            norm_stats_source: "mock".into(),
            family: "openvla".into(),
            images: vec!["image".into()],
            proprio_dim: None,
            chunk_size: 1,
        }
    }
}

/// A json-numpy `/act` body for an image.
pub fn act_body(image: &openvla_image::RgbImage, instruction: &str, key: Option<&str>) -> String {
    let (w, h) = image.size();
    let mut v = serde_json::json!({
        "image": openvla_server::json_numpy::encode_u8(&[h as usize, w as usize, 3], image.data()),
        "instruction": instruction,
    });
    if let Some(k) = key {
        v["unnorm_key"] = Value::String(k.into());
    }
    v.to_string()
}

/// The action of a 200 json-numpy reply.
pub fn action_of(r: &Reply) -> Vec<f64> {
    assert_eq!(r.status.as_u16(), 200, "{}", r.text());
    openvla_server::json_numpy::decode_f64(&r.json().unwrap()).unwrap()
}

/// The `(status, error kind)` of a reply, checking the error body's shape.
pub fn error_of(r: &Reply) -> (u16, String) {
    let v: Value = r.json().unwrap_or_else(|e| panic!("{e}: {}", r.text()));
    let obj = v.as_object().expect("error body is an object");
    assert!(
        obj.get("detail").is_some_and(Value::is_string)
            && obj.get("error").is_some_and(Value::is_string),
        "status {}: {v}",
        r.status
    );
    assert_eq!(
        r.headers.get("content-type").unwrap(),
        "application/json",
        "{v}"
    );
    (
        r.status.as_u16(),
        obj["error"].as_str().unwrap().to_string(),
    )
}

pub fn batch_size_of(r: &Reply) -> usize {
    r.headers
        .get(openvla_server::BATCH_SIZE_HEADER)
        .expect("batch size header")
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

pub fn small_image(w: u32, h: u32) -> openvla_image::RgbImage {
    let data = (0..w * h * 3).map(|i| (i * 7 % 251) as u8).collect();
    openvla_image::RgbImage::from_raw(w, h, data).unwrap()
}
