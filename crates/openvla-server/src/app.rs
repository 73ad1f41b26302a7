//! The HTTP application: routes, handlers, limits and graceful shutdown.

use crate::batcher::{timeout_error, BatchConfig, Batcher};
use crate::engine::{Engine, ModelMetadata};
use crate::error::ApiError;
use crate::json_numpy;
use crate::metrics::Metrics;
use crate::request::{check_unnorm_key, parse_act, ParseLimits};
use axum::extract::{Request as HttpRequest, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use openvla::{Observation, Request};
use serde_json::json;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Everything the server can be configured with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerConfig {
    /// Batching and queueing.
    pub batch: BatchConfig,
    /// Longest time from a request's arrival to its reply (body upload, queue, model);
    /// past it the reply is 504.
    pub request_timeout: Duration,
    /// Largest request body in bytes; past it the reply is 413.
    pub max_body_bytes: usize,
    /// Image and instruction limits.
    pub limits: ParseLimits,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            batch: BatchConfig {
                max_batch: 8,
                batch_wait: Duration::from_millis(5),
                queue_size: 64,
            },
            request_timeout: Duration::from_secs(60),
            max_body_bytes: 32 * 1024 * 1024,
            limits: ParseLimits::default(),
        }
    }
}

/// Response header carrying the number of requests that shared the forward pass.
pub const BATCH_SIZE_HEADER: &str = "x-openvla-batch-size";

struct AppState {
    config: ServerConfig,
    metadata: ModelMetadata,
    batcher: Batcher,
    metrics: Arc<Metrics>,
}

/// A server: the router and the model thread behind it.
pub struct Server {
    state: Arc<AppState>,
}

impl Server {
    /// Starts the model thread for `engine` and builds the routes.
    pub fn new(engine: Arc<dyn Engine>, config: ServerConfig) -> std::io::Result<Server> {
        let metrics = Arc::new(Metrics::default());
        let metadata = engine.metadata();
        let batcher = Batcher::start(engine, config.batch, metrics.clone())?;
        Ok(Server {
            state: Arc::new(AppState {
                config,
                metadata,
                batcher,
                metrics,
            }),
        })
    }

    /// The server's metrics.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.state.metrics.clone()
    }

    /// The routes: `POST /act`, `GET /health`, `GET /metadata`, `GET /metrics`.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/act", post(act))
            .route("/health", get(health))
            .route("/metadata", get(metadata))
            .route("/metrics", get(metrics))
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            .layer(middleware::from_fn_with_state(self.state.clone(), count))
            .with_state(self.state.clone())
    }

    /// Serves on `listener` until `shutdown` resolves, then stops accepting connections,
    /// finishes every request already received, and stops the model thread.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let router = self.router();
        let result = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await;
        // Every connection is closed; let the model thread drain its queue and stop.
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || state.batcher.shutdown())
            .await
            .map_err(std::io::Error::other)?;
        result
    }
}

/// Counts every reply by endpoint and status.
async fn count(State(state): State<Arc<AppState>>, req: HttpRequest, next: Next) -> Response {
    let endpoint = match req.uri().path() {
        "/act" => "/act",
        "/health" => "/health",
        "/metadata" => "/metadata",
        "/metrics" => "/metrics",
        _ => "other",
    };
    let resp = next.run(req).await;
    state
        .metrics
        .count_request(endpoint, resp.status().as_u16());
    resp
}

/// Counts a `/act` request as in flight and records its latency when it ends, also when the
/// handler is dropped because the client went away.
struct InFlight {
    metrics: Arc<Metrics>,
    start: Instant,
}

impl InFlight {
    fn new(metrics: Arc<Metrics>) -> Self {
        metrics.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight {
            metrics,
            start: Instant::now(),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.metrics
            .act_latency
            .observe(self.start.elapsed().as_secs_f64());
        self.metrics.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn act(State(state): State<Arc<AppState>>, req: HttpRequest) -> Response {
    let start = Instant::now();
    let _in_flight = InFlight::new(state.metrics.clone());
    let deadline = start + state.config.request_timeout;
    let result = tokio::time::timeout_at(deadline.into(), handle_act(&state, req, deadline))
        .await
        .unwrap_or_else(|_| Err(timeout_error()));
    let resp = match result {
        Ok(resp) => resp,
        Err(e) => {
            if e.status.is_server_error() {
                tracing::warn!("POST /act: {e}");
            } else {
                tracing::debug!("POST /act: {e}");
            }
            e.into_response()
        }
    };
    resp
}

async fn handle_act(
    state: &Arc<AppState>,
    req: HttpRequest,
    deadline: Instant,
) -> Result<Response, ApiError> {
    let max = state.config.max_body_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body is larger than the limit of {max} bytes (--max-body-bytes)"),
        )
    };
    // Refuse a declared oversize body before reading it.
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > max as u64 {
            return Err(too_large());
        }
    }
    let body = Limited::new(req.into_body(), max)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<LengthLimitError>().is_some() {
                too_large()
            } else {
                ApiError::bad_request(
                    "invalid_request",
                    format!("could not read the request body: {e}"),
                )
            }
        })?
        .to_bytes();
    // JSON and image decoding are CPU work: keep them off the async workers.
    let limits = state.config.limits;
    let parsed = tokio::task::spawn_blocking(move || parse_act(&body, &limits))
        .await
        .map_err(|e| ApiError::internal(format!("request parsing failed: {e}")))??;
    check_unnorm_key(
        parsed.unnorm_key.as_deref(),
        state.metadata.action_dims.keys(),
    )?;
    let encoded = parsed.encoded;
    let request = Request {
        observation: Observation {
            images: parsed.images,
            instruction: parsed.instruction,
            proprio: parsed.proprio,
        },
        unnorm_key: parsed.unnorm_key,
    };
    let rx = state.batcher.submit(request, deadline)?;
    let reply = rx
        .await
        .map_err(|_| ApiError::internal("the model thread dropped the request"))?;
    let prediction = reply.outcome?;
    let body = if state.metadata.is_oft() {
        // OFT deploy.py: JSONResponse(action), a list of K float64 arrays; double-encoded
        // requests get json_numpy.dumps(action), a JSON string.
        if encoded {
            serde_json::Value::String(json_numpy::dumps_f64_list(&prediction.actions)).to_string()
        } else {
            serde_json::Value::Array(
                prediction
                    .actions
                    .iter()
                    .map(|a| json_numpy::encode_f64(a))
                    .collect(),
            )
            .to_string()
        }
    } else if encoded {
        // deploy.py: JSONResponse(json_numpy.dumps(action)), a JSON string.
        serde_json::Value::String(json_numpy::dumps_f64(prediction.action())).to_string()
    } else {
        json_numpy::encode_f64(prediction.action()).to_string()
    };
    let mut resp = (StatusCode::OK, body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(BATCH_SIZE_HEADER, HeaderValue::from(reply.batch_size));
    Ok(resp)
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response {
    let mut resp = (status, body.to_string()).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    json_response(
        StatusCode::OK,
        json!({
            "status": "ok",
            "queue_depth": state.metrics.queue_depth.load(Ordering::Relaxed),
        }),
    )
}

async fn metadata(State(state): State<Arc<AppState>>) -> Response {
    let m = &state.metadata;
    let c = &state.config;
    json_response(
        StatusCode::OK,
        json!({
            "variant": m.variant,
            "model_dir": m.model_dir,
            "weight_dtype": m.weight_dtype,
            "compute": m.compute,
            "action_dims": m.action_dims,
            "norm_stats_keys": m.action_dims.keys().collect::<Vec<_>>(),
            "norm_stats_source": m.norm_stats_source,
            "family": m.family,
            "inputs": {"images": m.images, "proprio_dim": m.proprio_dim},
            "chunk_size": m.chunk_size,
            "server": "openvla-rs",
            "server_version": env!("CARGO_PKG_VERSION"),
            "limits": {
                "max_batch": c.batch.max_batch,
                "batch_wait_ms": c.batch.batch_wait.as_millis() as u64,
                "queue_size": c.batch.queue_size,
                "request_timeout_ms": c.request_timeout.as_millis() as u64,
                "max_body_bytes": c.max_body_bytes,
                "max_image_pixels": c.limits.max_image_pixels,
                "max_instruction_bytes": c.limits.max_instruction_bytes,
            },
        }),
    )
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let mut resp = (StatusCode::OK, state.metrics.render()).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!(
            "no route for {method} {}; the routes are POST /act, GET /health, GET /metadata, GET /metrics",
            crate::json_numpy::truncate(uri.path(), 200)
        ),
    )
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{method} is not allowed on {}",
            crate::json_numpy::truncate(uri.path(), 200)
        ),
    )
}
