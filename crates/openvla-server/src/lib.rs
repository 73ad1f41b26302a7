//! # openvla-server
//!
//! HTTP serving of OpenVLA policies, a drop-in replacement for OpenVLA's
//! `vla-scripts/deploy.py` (spec §8) that batches concurrent requests.
//!
//! - [`json_numpy`]: the json-numpy array format deploy.py clients speak.
//! - [`request`]: parsing a `POST /act` body (json-numpy image, base64 PNG/JPEG, or the
//!   double-encoded form) with limits checked before decoding.
//! - [`batcher`]: the bounded queue and the model thread that gathers requests into batches
//!   and runs them through an [`Engine`] (implemented by [`openvla::Policy`]).
//! - [`app`]: the routes (`POST /act`, `GET /health`, `GET /metadata`, `GET /metrics`),
//!   errors as status codes with `{"error", "detail"}`, graceful shutdown.
//! - [`metrics`]: Prometheus text metrics.
//! - [`openpi`]: openpi's websocket + msgpack-numpy policy protocol (`openvla serve
//!   --protocol openpi`), for `openpi-client`.
//! - [`client`], [`loadtest`]: the HTTP client and load generator of `openvla loadtest`.
//! - [`cli`]: `openvla serve` and `openvla loadtest`.
//!
//! ```no_run
//! use openvla_server::{Engine, Server, ServerConfig};
//! use std::sync::Arc;
//! # async fn f() -> anyhow::Result<()> {
//! let policy = openvla::Policy::load("models/openvla-tiny".as_ref(), &Default::default())?;
//! let engine: Arc<dyn Engine> = Arc::new(policy);
//! let server = Server::new(engine, ServerConfig::default())?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8000").await?;
//! server.serve(listener, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```
//!
//! See `docs/serving.md` for the API, the differences from deploy.py and measurements.

#![warn(missing_docs)]

pub mod app;
pub mod batcher;
pub mod cli;
pub mod client;
pub mod engine;
pub mod error;
pub mod image_header;
pub mod json_numpy;
pub mod loadtest;
pub mod metrics;
pub mod openpi;
pub mod request;

pub use app::{Server, ServerConfig, BATCH_SIZE_HEADER};
pub use batcher::BatchConfig;
pub use engine::{Engine, ModelMetadata};
pub use error::ApiError;
pub use openpi::{KeyMap, OpenpiConfig, OpenpiServer};
pub use request::ParseLimits;
