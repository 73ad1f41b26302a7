//! `openvla serve` and `openvla loadtest`: argument structs and entry points for the
//! `openvla` binary.

use crate::app::{Server, ServerConfig};
use crate::batcher::BatchConfig;
use crate::engine::Engine;
use crate::json_numpy;
use crate::loadtest::{self, LoadPlan};
use crate::openpi::{KeyMap, OpenpiConfig, OpenpiServer};
use crate::request::ParseLimits;
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use openvla::quant::Quantization;
use openvla::{LoadOptions, Observation, Policy, Precision, Request};
use openvla_image::RgbImage;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Arguments of `openvla serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// HF model directory (config.json, preprocessor_config.json, tokenizer.json, safetensors).
    #[arg(long)]
    pub model: PathBuf,
    /// Address to listen on. The default is loopback only; 0.0.0.0 (or another interface's
    /// address) exposes the server, without authentication, to every machine that can reach
    /// this one.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 picks a free one; the address is printed on stderr).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Weight precision: f32, bf16 or auto (as for `openvla predict`).
    #[arg(long, default_value = "auto")]
    pub precision: Precision,
    /// Quantize the weights while loading: int8 or int4 (as for `openvla predict`; see
    /// docs/quantization.md).
    #[arg(long)]
    pub quantize: Option<Quantization>,
    /// Arithmetic of the many-row products (vision towers, projector, prefill): f32 (exact) or
    /// bf16 (bf16 operands, f32 sums, as PyTorch bf16; AMX or AVX512-BF16 where the CPU has
    /// them, docs/kernels.md). Default: the model's `inference_compute` (config.json), else f32.
    #[arg(long)]
    pub compute: Option<openvla::kernels::ComputePrecision>,
    /// Most requests run together in one forward pass.
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// Longest wait, after the first request of a batch arrives, for more to join it (skipped
    /// after 8 waits in a row that gathered nobody, until requests queue up again).
    #[arg(long, default_value_t = 5)]
    pub batch_wait_ms: u64,
    /// Most requests waiting for the model; past it, requests get 503 with Retry-After.
    #[arg(long, default_value_t = 64)]
    pub queue_size: usize,
    /// Longest time from a request's arrival to its reply; past it, the reply is 504.
    #[arg(long, default_value_t = 60_000)]
    pub request_timeout_ms: u64,
    /// Largest request body in bytes; past it, the reply is 413.
    #[arg(long, default_value_t = 32 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Largest image in pixels (height x width), checked before decoding; past it, 413.
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    pub max_image_pixels: u64,
    /// Longest instruction in bytes; past it, 400.
    #[arg(long, default_value_t = 4096)]
    pub max_instruction_bytes: usize,
    /// Skip the warm-up prediction run before the server starts listening.
    #[arg(long)]
    pub no_warmup: bool,
    /// OpenVLA-OFT constants.
    #[command(flatten)]
    pub oft: OftArgs,
    /// Wire protocol: rest (deploy.py's POST /act with json-numpy), openpi (openpi's
    /// websocket + msgpack-numpy policy server, for openpi-client; GET /healthz), or both
    /// (rest on --port, openpi on --openpi-port). See docs/python.md.
    #[arg(long, value_enum, default_value_t = Protocol::Rest)]
    pub protocol: Protocol,
    /// Port of the openpi websocket server with --protocol both.
    #[arg(long, default_value_t = 8001)]
    pub openpi_port: u16,
    /// openpi observation keys of the camera images, comma-separated, primary first; a model
    /// that takes N images reads the first N.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "observation/image,observation/wrist_image"
    )]
    pub openpi_image_keys: Vec<String>,
    /// openpi observation key of the proprio state (read only by models that take one).
    #[arg(long, default_value = "observation/state")]
    pub openpi_state_key: String,
    /// openpi observation key of the task instruction.
    #[arg(long, default_value = "prompt")]
    pub openpi_prompt_key: String,
    /// Dataset statistics for openpi observations without an "unnorm_key" entry (openpi
    /// clients send none). May be omitted when the model has exactly one dataset.
    #[arg(long)]
    pub openpi_unnorm_key: Option<String>,
}

/// OpenVLA-OFT constants a checkpoint does not store (chunk size, action and proprio
/// dimensions, image count, normalization). Each flag overrides `config.json`'s
/// `oft_constants` / `oft_eval_cfg` and the `--platform` preset; see docs/oft.md.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct OftArgs {
    /// OFT platform preset: libero (K=8, D=7, proprio 8, bounds_q99, 2 images), aloha (25, 14,
    /// 14, bounds, 3 images) or bridge (5, 7, 7, bounds_q99).
    #[arg(long)]
    pub platform: Option<openvla::oft::constants::Platform>,
    /// OFT: actions per chunk (NUM_ACTIONS_CHUNK).
    #[arg(long)]
    pub chunk: Option<usize>,
    /// OFT: action dimension (ACTION_DIM).
    #[arg(long)]
    pub action_dim: Option<usize>,
    /// OFT: proprio dimension (PROPRIO_DIM).
    #[arg(long)]
    pub proprio_dim: Option<usize>,
    /// OFT: images per observation (primary, then wrist views).
    #[arg(long)]
    pub num_images: Option<usize>,
    /// OFT: normalization of actions and proprio: bounds or bounds_q99.
    #[arg(long)]
    pub normalization: Option<openvla::oft::constants::NormalizationType>,
    /// OFT: the checkpoint is discrete-token OFT (parallel decoding of 256-bin tokens, no
    /// action_head file).
    #[arg(long)]
    pub oft_discrete: bool,
}

impl OftArgs {
    /// The load options these flags describe.
    pub fn options(&self) -> openvla::oft::constants::OftOptions {
        openvla::oft::constants::OftOptions {
            platform: self.platform,
            chunk: self.chunk,
            action_dim: self.action_dim,
            proprio_dim: self.proprio_dim,
            num_images: self.num_images,
            normalization: self.normalization,
            discrete: self.oft_discrete,
        }
    }
}

/// The wire protocols of `openvla serve`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// deploy.py's REST API: POST /act with json-numpy.
    Rest,
    /// openpi's websocket + msgpack-numpy policy protocol.
    Openpi,
    /// Both: REST on --port, openpi on --openpi-port.
    Both,
}

impl ServeArgs {
    /// The server configuration these flags describe.
    pub fn config(&self) -> Result<ServerConfig> {
        if self.max_batch == 0 {
            bail!("--max-batch must be at least 1");
        }
        if self.queue_size == 0 {
            bail!("--queue-size must be at least 1");
        }
        if self.request_timeout_ms == 0 {
            bail!("--request-timeout-ms must be at least 1");
        }
        Ok(ServerConfig {
            batch: BatchConfig {
                max_batch: self.max_batch,
                batch_wait: Duration::from_millis(self.batch_wait_ms),
                queue_size: self.queue_size,
            },
            request_timeout: Duration::from_millis(self.request_timeout_ms),
            max_body_bytes: self.max_body_bytes,
            limits: ParseLimits {
                max_image_pixels: self.max_image_pixels,
                max_instruction_bytes: self.max_instruction_bytes,
            },
        })
    }

    /// The openpi front end's configuration these flags describe.
    pub fn openpi_config(&self) -> Result<OpenpiConfig> {
        let images: Vec<String> = self
            .openpi_image_keys
            .iter()
            .map(|k| k.trim().to_string())
            .filter(|k| !k.is_empty())
            .collect();
        if images.is_empty() {
            bail!("--openpi-image-keys must name at least one key");
        }
        Ok(OpenpiConfig {
            server: self.config()?,
            keys: KeyMap {
                images,
                state: self.openpi_state_key.clone(),
                prompt: self.openpi_prompt_key.clone(),
                ..KeyMap::default()
            },
            default_unnorm_key: self.openpi_unnorm_key.clone(),
        })
    }
}

/// Resolves once SIGINT or SIGTERM arrives.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// `openvla serve`: loads the model, listens, and serves until SIGINT or SIGTERM; then
/// finishes the requests in flight and exits. A second signal exits at once.
pub fn run_serve(args: &ServeArgs) -> Result<()> {
    let config = args.config()?;
    eprintln!("openvla serve: loading {}", args.model.display());
    let t0 = Instant::now();
    let policy = Policy::load(
        &args.model,
        &LoadOptions {
            precision: args.precision,
            quantize: args.quantize,
            compute: args.compute,
            oft: args.oft.options(),
            ..Default::default()
        },
    )
    .with_context(|| format!("loading model from {}", args.model.display()))?;
    eprintln!(
        "openvla serve: loaded in {:.1} s ({:?} weights)",
        t0.elapsed().as_secs_f64(),
        policy.weight_dtype()
    );
    if !args.no_warmup {
        warm_up(&policy)?;
    }
    let engine: Arc<dyn Engine> = Arc::new(policy);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("openvla-http")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve_protocols(args, engine, config))
}

/// Binds `host:port` and warns when it is not loopback-only.
async fn bind(host: &str, port: u16) -> Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind((host, port))
        .await
        .with_context(|| format!("cannot listen on {host}:{port}"))?;
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() {
        eprintln!(
            "openvla serve: WARNING: listening on {} is not loopback-only: any machine that \
             can reach this one can send requests (there is no authentication)",
            addr.ip()
        );
    }
    Ok(listener)
}

/// Runs the REST and/or openpi servers of `--protocol` until SIGINT or SIGTERM.
async fn serve_protocols(
    args: &ServeArgs,
    engine: Arc<dyn Engine>,
    config: ServerConfig,
) -> Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let mut servers = tokio::task::JoinSet::new();
    let (rest_port, openpi_port) = match args.protocol {
        Protocol::Rest => (Some(args.port), None),
        Protocol::Openpi => (None, Some(args.port)),
        Protocol::Both => (Some(args.port), Some(args.openpi_port)),
    };
    if let Some(port) = rest_port {
        let listener = bind(&args.host, port).await?;
        let addr = listener.local_addr()?;
        let server = Server::new(engine.clone(), config).context("starting the model thread")?;
        eprintln!("openvla serve: listening on http://{addr}");
        servers.spawn(server.serve(listener, stopped()));
    }
    if let Some(port) = openpi_port {
        let openpi = args.openpi_config()?;
        let listener = bind(&args.host, port).await?;
        let addr = listener.local_addr()?;
        let server =
            OpenpiServer::new(engine.clone(), openpi).context("starting the openpi server")?;
        eprintln!("openvla serve: openpi websocket listening on ws://{addr}");
        servers.spawn(server.serve(listener, stopped()));
    }
    tokio::spawn(async move {
        shutdown_signal().await;
        eprintln!("openvla serve: shutting down, finishing requests in flight");
        let _ = stop_tx.send(true);
        shutdown_signal().await;
        eprintln!("openvla serve: second signal, exiting now");
        std::process::exit(130);
    });
    while let Some(done) = servers.join_next().await {
        done.context("a server task failed")??;
    }
    eprintln!("openvla serve: stopped");
    Ok(())
}

/// One prediction before listening, so that the first client does not pay for lazy setup.
fn warm_up(policy: &Policy) -> Result<()> {
    let Some(key) = policy.norm_stats().keys().next().cloned() else {
        return Ok(());
    };
    let t0 = Instant::now();
    let image = RgbImage::filled(224, 224, [128, 128, 128])?;
    let mut observation = Observation::new(image.clone(), "warm up");
    for i in 1..policy.num_images() {
        observation
            .images
            .push((format!("wrist_{i}"), image.clone()));
    }
    observation.proprio = policy.proprio_dim().map(|p| vec![0.0; p]);
    let out = policy.predict_batch(&[Request {
        observation,
        unnorm_key: Some(key),
    }]);
    for r in out {
        r.context("warm-up prediction")?;
    }
    eprintln!(
        "openvla serve: warm-up prediction in {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Arguments of `openvla loadtest`.
#[derive(clap::Args, Debug, Clone)]
pub struct LoadtestArgs {
    /// Server URL, e.g. http://127.0.0.1:8000 (the path defaults to /act).
    #[arg(long)]
    pub url: String,
    /// Concurrent clients, each with its own connection, each sending its next request as
    /// soon as the previous one is answered.
    #[arg(long, default_value_t = 1)]
    pub clients: usize,
    /// Requests in all, shared among the clients.
    #[arg(long, default_value_t = 100)]
    pub requests: usize,
    /// Image to send (PNG or JPEG); without it, a 224x224 synthetic image.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Instruction to send; give it several times to cycle through prompts of different
    /// lengths.
    #[arg(long, default_value = "pick up the red block")]
    pub instruction: Vec<String>,
    /// unnorm_key to send; give it several times to cycle through datasets.
    #[arg(long)]
    pub unnorm_key: Vec<String>,
    /// Robot state to send as `state` (a json-numpy float64 array, as OpenVLA-OFT's deploy.py
    /// clients send it), comma-separated; needed by OFT models with a proprio projector.
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    pub state: Option<Vec<f64>>,
    /// How the image travels: numpy (json-numpy, as deploy.py clients send it), png
    /// (base64 PNG string), or encoded (deploy.py's double-encoded form).
    #[arg(long, default_value = "numpy")]
    pub format: String,
    /// Requests sent one at a time before measuring, not counted.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Stop sending after this many seconds even if not all requests were sent.
    #[arg(long, default_value_t = 600)]
    pub max_seconds: u64,
    /// Allow a server that is not on a loopback address.
    #[arg(long)]
    pub allow_remote: bool,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// `openvla loadtest`.
pub fn run_loadtest(args: &LoadtestArgs) -> Result<()> {
    if args.clients == 0 {
        bail!("--clients must be at least 1");
    }
    let (host, port, path) = crate::client::parse_url(&args.url, "/act")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(async {
        let addr: SocketAddr = tokio::net::lookup_host((host.as_str(), port))
            .await
            .with_context(|| format!("resolving {host}"))?
            .next()
            .with_context(|| format!("{host} has no address"))?;
        if !addr.ip().is_loopback() && !args.allow_remote {
            bail!("{addr} is not a loopback address; pass --allow-remote to load-test it");
        }
        let bodies = request_bodies(args)?;
        if args.warmup > 0 {
            let warm = loadtest::run(LoadPlan {
                addr,
                path: path.clone(),
                bodies: bodies.clone(),
                clients: 1,
                requests: args.warmup,
                max_duration: Duration::from_secs(args.max_seconds),
            })
            .await;
            if warm.ok == 0 {
                bail!(
                    "warm-up failed: no successful reply from {} ({:?})",
                    args.url,
                    warm.errors
                );
            }
        }
        Ok(loadtest::run(LoadPlan {
            addr,
            path,
            bodies,
            clients: args.clients,
            requests: args.requests,
            max_duration: Duration::from_secs(args.max_seconds),
        })
        .await)
    })?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", loadtest::format_report(&report));
    }
    Ok(())
}

fn request_bodies(args: &LoadtestArgs) -> Result<Vec<Bytes>> {
    let (image, png) = match &args.image {
        Some(p) => (
            openvla_image::open(p)?,
            Some(std::fs::read(p).with_context(|| format!("reading {}", p.display()))?),
        ),
        None => {
            let (w, h) = (224u32, 224u32);
            let data = (0..h)
                .flat_map(|y| (0..w).flat_map(move |x| [x as u8, y as u8, (x ^ y) as u8]))
                .collect();
            (RgbImage::from_raw(w, h, data)?, None)
        }
    };
    let (w, h) = image.size();
    let array = json_numpy::encode_u8(&[h as usize, w as usize, 3], image.data());
    let image_value = match args.format.as_str() {
        "numpy" | "encoded" => array,
        "png" => {
            let Some(bytes) = png else {
                bail!("--format png needs --image with a PNG or JPEG file");
            };
            use base64::Engine as _;
            serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
        }
        f => bail!("unknown --format {f:?}; expected numpy, png or encoded"),
    };
    let keys: Vec<Option<&String>> = if args.unnorm_key.is_empty() {
        vec![None]
    } else {
        args.unnorm_key.iter().map(Some).collect()
    };
    let n = args.instruction.len().max(keys.len());
    let mut bodies = Vec::with_capacity(n);
    for i in 0..n {
        let mut obj = serde_json::json!({
            "image": image_value,
            "instruction": args.instruction[i % args.instruction.len()],
        });
        if let Some(k) = keys[i % keys.len()] {
            obj["unnorm_key"] = serde_json::Value::String(k.clone());
        }
        if let Some(state) = &args.state {
            obj["state"] = json_numpy::encode_f64(state);
        }
        let body = if args.format == "encoded" {
            serde_json::json!({ "encoded": obj.to_string() }).to_string()
        } else {
            obj.to_string()
        };
        bodies.push(Bytes::from(body));
    }
    Ok(bodies)
}
