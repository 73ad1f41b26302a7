//! The policy the workers talk to, always over real HTTP:
//! - `model`: an OpenVLA model served in this process on loopback by `openvla serve`'s own code
//!   ([`openvla_server::Server`]), batching the workers' concurrent requests;
//! - `--url`: a server already running elsewhere (whatever answers there is evaluated);
//! - `expert` / `random`: Meta-World's scripted experts or a seeded random policy behind the same
//!   routes (`python -m openvla_sim.policy_server`), given the privileged observation;
//! - `local-expert`: the experts called inside the workers (no HTTP): the baseline of the speed
//!   benchmark only.

use crate::worker::{truncate, PythonEnv};
use anyhow::{anyhow, bail, Context, Result};
use openvla_server::client::{parse_url, Connection};
use openvla_server::{Engine, Server, ServerConfig};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Which policy acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    /// An OpenVLA model (`--model`, or whatever answers at `--url`).
    Model,
    /// Meta-World's scripted experts (metaworld.policies), over HTTP.
    Expert,
    /// Uniform random actions in [-1, 1], over HTTP.
    Random,
    /// The scripted experts called inside the workers, without HTTP (speed baseline).
    LocalExpert,
}

/// The action dimension of Meta-World.
pub const ACTION_DIM: usize = 4;

/// What the policy takes and answers, from its `/metadata` (CONTRACTS.md; missing fields are the
/// 256-bin family's defaults).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PolicyInputs {
    /// Image keys of a request, primary first.
    pub images: Vec<String>,
    /// Proprio (state) dimension, if the policy takes it.
    pub proprio_dim: Option<usize>,
    /// Actions per answer.
    pub chunk_size: usize,
    /// Whether requests carry the privileged observation (scripted experts only).
    pub privileged_obs: bool,
}

impl PolicyInputs {
    /// Reads the inputs from a `/metadata` document.
    pub fn from_metadata(meta: &Value) -> Result<PolicyInputs> {
        let inputs = meta.get("inputs");
        let images = match inputs.and_then(|i| i.get("images")) {
            None | Some(Value::Null) => vec!["image".to_string()],
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| anyhow!("/metadata inputs.images holds a non-string: {v}"))
                })
                .collect::<Result<_>>()?,
            Some(other) => bail!("/metadata inputs.images is not a list: {other}"),
        };
        let proprio_dim = inputs
            .and_then(|i| i.get("proprio_dim"))
            .and_then(Value::as_u64)
            .map(|d| d as usize);
        Ok(PolicyInputs {
            images,
            proprio_dim,
            chunk_size: meta
                .get("chunk_size")
                .and_then(Value::as_u64)
                .unwrap_or(1)
                .max(1) as usize,
            privileged_obs: meta
                .get("privileged_obs")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        })
    }

    /// Checks that Meta-World can feed this policy.
    pub fn check(&self) -> Result<()> {
        if let Some(p) = self.proprio_dim {
            if p != 4 {
                bail!(
                    "the policy takes a proprio state of dimension {p}; Meta-World's robot state \
                     is 4 (obs[:4]: hand xyz, gripper opening)"
                );
            }
        }
        if self.images.is_empty() && !self.privileged_obs {
            bail!("the policy takes no image (/metadata inputs.images is empty)");
        }
        Ok(())
    }
}

/// Picks the `unnorm_key` whose action dimension is 4: the one given (checked), else the only
/// such key. An error names every key and its dimension otherwise.
pub fn choose_unnorm_key(meta: &Value, requested: Option<&str>) -> Result<Option<String>> {
    let dims: Vec<(String, u64)> = meta
        .get("action_dims")
        .and_then(Value::as_object)
        .map(|o| {
            o.iter()
                .filter_map(|(k, v)| v.as_u64().map(|d| (k.clone(), d)))
                .collect()
        })
        .unwrap_or_default();
    let listing = || {
        dims.iter()
            .map(|(k, d)| format!("{k}: {d}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if dims.is_empty() {
        // A server that does not say: trust it, the workers check every action's dimension.
        return Ok(requested.map(str::to_string));
    }
    if let Some(k) = requested {
        return match dims.iter().find(|(n, _)| n == k) {
            Some((_, d)) if *d as usize == ACTION_DIM => Ok(Some(k.to_string())),
            Some((_, d)) => bail!(
                "--unnorm-key {k} has action dimension {d}; Meta-World takes {ACTION_DIM} \
                 (dx, dy, dz, gripper). The model's keys: {}",
                listing()
            ),
            None => bail!(
                "--unnorm-key {k} is not one of the model's keys ({})",
                listing()
            ),
        };
    }
    let four: Vec<&String> = dims
        .iter()
        .filter(|(_, d)| *d as usize == ACTION_DIM)
        .map(|(k, _)| k)
        .collect();
    match four.as_slice() {
        [] => bail!(
            "the model's actions have dimension(s) {}; Meta-World takes {ACTION_DIM} \
             (dx, dy, dz, gripper): fine-tune it on Meta-World first",
            listing()
        ),
        [k] => Ok(Some((*k).clone())),
        _ => bail!(
            "several of the model's datasets have {ACTION_DIM}-D actions ({}); choose one with \
             --unnorm-key",
            four.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

enum Guard {
    InProcess {
        runtime: tokio::runtime::Runtime,
        shutdown: Option<tokio::sync::oneshot::Sender<()>>,
        done: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    },
    Python(Child),
    None,
}

/// A running (or reachable) policy server.
pub struct Endpoint {
    /// `http://host:port`.
    pub url: String,
    /// Its `/metadata` (for `local-expert`, a description of the in-process expert).
    pub metadata: Value,
    guard: Guard,
}

impl Endpoint {
    /// Serves an OpenVLA model directory on 127.0.0.1 (ephemeral port) with `openvla serve`'s
    /// code; `max_batch` concurrent requests may share a forward pass; `compute` is the
    /// arithmetic of its many-row products (resolved by the caller: the flag, else the model's
    /// `inference_compute`).
    pub fn serve_model(
        dir: &Path,
        max_batch: usize,
        compute: openvla::kernels::ComputePrecision,
    ) -> Result<Endpoint> {
        let options = openvla::LoadOptions {
            compute: Some(compute),
            ..Default::default()
        };
        let policy = openvla::Policy::load(dir, &options)
            .with_context(|| format!("loading model from {}", dir.display()))?;
        let engine: Arc<dyn Engine> = Arc::new(policy);
        let mut config = ServerConfig::default();
        config.batch.max_batch = max_batch.max(1);
        config.batch.queue_size = config.batch.queue_size.max(4 * max_batch);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("openvla-eval-http")
            .build()
            .context("starting the async runtime")?;
        let server = Server::new(engine, config).context("starting the model thread")?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (addr, done) = runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let done = tokio::spawn(server.serve(listener, async {
                let _ = rx.await;
            }));
            Ok::<_, std::io::Error>((addr, done))
        })?;
        let url = format!("http://{addr}");
        let metadata = fetch_metadata_with(&runtime, &url)?;
        Ok(Endpoint {
            url,
            metadata,
            guard: Guard::InProcess {
                runtime,
                shutdown: Some(tx),
                done: Some(done),
            },
        })
    }

    /// A server already running at `url`.
    pub fn remote(url: &str) -> Result<Endpoint> {
        let runtime = small_runtime()?;
        let metadata = fetch_metadata_with(&runtime, url)?;
        Ok(Endpoint {
            url: url.trim_end_matches('/').to_string(),
            metadata,
            guard: Guard::None,
        })
    }

    /// Starts `python -m openvla_sim.policy_server` for `expert` or `random`.
    /// With `images` false it declares no image input (the workers then do not render).
    pub fn python_policy(
        env: &PythonEnv,
        kind: PolicyKind,
        seed: u64,
        images: bool,
    ) -> Result<Endpoint> {
        let name = match kind {
            PolicyKind::Expert => "expert",
            PolicyKind::Random => "random",
            other => bail!("{other:?} is not served by the Python policy server"),
        };
        let mut child = env
            .module("openvla_sim.policy_server")
            .args(["--policy", name, "--port", "0", "--seed", &seed.to_string()])
            .args(["--images", if images { "image" } else { "none" }])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting the {name} policy server"))?;
        let pipe = child.stderr.take().context("policy server stderr")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut seen = String::new();
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if let Some(url) = line.split("listening on ").nth(1) {
                    let _ = tx.send(Ok(url.trim().to_string()));
                } else {
                    seen.push_str(&line);
                    seen.push('\n');
                    tracing::debug!("policy server: {line}");
                }
            }
            let _ = tx.send(Err(seen));
        });
        let url = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(Ok(url)) => url,
            Ok(Err(out)) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the {name} policy server exited: {}", truncate(&out, 2000))
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the {name} policy server did not start within 120 s")
            }
        };
        let runtime = small_runtime()?;
        let metadata = fetch_metadata_with(&runtime, &url)?;
        Ok(Endpoint {
            url,
            metadata,
            guard: Guard::Python(child),
        })
    }

    /// The in-worker expert (no server).
    pub fn local_expert() -> Endpoint {
        Endpoint {
            url: String::new(),
            metadata: json!({
                "variant": "metaworld-expert (in-process, no HTTP)",
                "inputs": {"images": ["image"], "proprio_dim": null},
                "chunk_size": 1,
                "action_dims": {"metaworld": 4},
            }),
            guard: Guard::None,
        }
    }

    /// Stops whatever this endpoint started.
    pub fn shutdown(&mut self) {
        match std::mem::replace(&mut self.guard, Guard::None) {
            Guard::InProcess {
                runtime,
                mut shutdown,
                mut done,
            } => {
                if let Some(tx) = shutdown.take() {
                    let _ = tx.send(());
                }
                if let Some(done) = done.take() {
                    let _ = runtime.block_on(async {
                        tokio::time::timeout(Duration::from_secs(30), done).await
                    });
                }
                runtime.shutdown_timeout(Duration::from_secs(5));
            }
            Guard::Python(mut child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            Guard::None => {}
        }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn small_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn resolve(url: &str) -> Result<SocketAddr> {
    let (host, port, _) = parse_url(url, "/")?;
    (host.as_str(), port)
        .to_socket_addrs()
        .with_context(|| format!("resolving {url}"))?
        .next()
        .ok_or_else(|| anyhow!("{url} resolves to no address"))
}

fn fetch_metadata_with(runtime: &tokio::runtime::Runtime, url: &str) -> Result<Value> {
    let addr = resolve(url)?;
    let started = Instant::now();
    let reply = runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(30), async {
            let mut c = Connection::connect(addr).await?;
            c.get("/metadata").await
        })
        .await
    });
    let reply = match reply {
        Ok(r) => r.with_context(|| format!("GET {url}/metadata"))?,
        Err(_) => bail!(
            "GET {url}/metadata: no answer within {} s",
            started.elapsed().as_secs()
        ),
    };
    if !reply.status.is_success() {
        bail!(
            "GET {url}/metadata: HTTP {}: {}",
            reply.status,
            truncate(&reply.text(), 300)
        );
    }
    reply
        .json()
        .with_context(|| format!("GET {url}/metadata: not JSON"))
}

/// A model directory as written into the results (absolute when it can be).
pub fn model_path(dir: &Path) -> PathBuf {
    std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_default_to_the_256_bin_family() {
        let i = PolicyInputs::from_metadata(&json!({"variant": "openvla"})).unwrap();
        assert_eq!(i.images, ["image"]);
        assert_eq!(i.proprio_dim, None);
        assert_eq!(i.chunk_size, 1);
        assert!(!i.privileged_obs);
        let oft = json!({"inputs": {"images": ["full_image", "wrist_image"], "proprio_dim": 4},
                         "chunk_size": 8});
        let i = PolicyInputs::from_metadata(&oft).unwrap();
        assert_eq!(i.images, ["full_image", "wrist_image"]);
        assert_eq!(i.chunk_size, 8);
        i.check().unwrap();
        let bad = json!({"inputs": {"images": ["full_image"], "proprio_dim": 8}});
        let e = PolicyInputs::from_metadata(&bad)
            .unwrap()
            .check()
            .unwrap_err();
        assert!(e.to_string().contains("dimension 8"), "{e}");
    }

    #[test]
    fn unnorm_key_choice() {
        let meta = json!({"action_dims": {"bridge_orig": 7, "mw": 4}});
        assert_eq!(
            choose_unnorm_key(&meta, None).unwrap().as_deref(),
            Some("mw")
        );
        let e = choose_unnorm_key(&meta, Some("bridge_orig")).unwrap_err();
        assert!(e.to_string().contains("action dimension 7"), "{e}");
        let e = choose_unnorm_key(&json!({"action_dims": {"a": 7}}), None).unwrap_err();
        assert!(e.to_string().contains("Meta-World takes 4"), "{e}");
        let two = json!({"action_dims": {"a": 4, "b": 4}});
        assert!(choose_unnorm_key(&two, None)
            .unwrap_err()
            .to_string()
            .contains("--unnorm-key"));
        assert!(choose_unnorm_key(&two, Some("c")).is_err());
    }
}
