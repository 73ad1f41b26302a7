//! `openvla loadtest`: real `POST /act` requests from N concurrent clients, each on its own
//! keep-alive connection, sending its next request as soon as the last one is answered (as a
//! robot control loop does). Reports throughput, latency percentiles and errors.

use crate::app::BATCH_SIZE_HEADER;
use crate::client::Connection;
use crate::json_numpy;
use bytes::Bytes;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What to send and how hard.
#[derive(Debug, Clone)]
pub struct LoadPlan {
    /// The server.
    pub addr: SocketAddr,
    /// The request path (`/act`).
    pub path: String,
    /// Request bodies; request `i` sends `bodies[i % len]`.
    pub bodies: Vec<Bytes>,
    /// Concurrent clients.
    pub clients: usize,
    /// Requests in all (shared among the clients).
    pub requests: usize,
    /// Stop sending new requests after this long.
    pub max_duration: Duration,
}

/// The outcome of a load test.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LoadReport {
    /// Concurrent clients.
    pub clients: usize,
    /// Requests sent.
    pub requests: usize,
    /// Replies with status 200 and a json-numpy float64 action (or, from an OpenVLA-OFT
    /// model, a list of them: the chunk).
    pub ok: usize,
    /// Failures by kind: the HTTP status (`"503"`), `"connection"` or `"bad_reply"`.
    pub errors: BTreeMap<String, usize>,
    /// Wall time from the first request to the last reply, seconds.
    pub wall_s: f64,
    /// Successful replies per second of wall time.
    pub throughput_rps: f64,
    /// Latency of successful requests, milliseconds.
    pub latency_ms: Percentiles,
    /// Mean of the server's `x-openvla-batch-size` over successful replies.
    pub mean_batch_size: f64,
}

/// Latency summary in milliseconds (nearest-rank percentiles).
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Default)]
pub struct Percentiles {
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl Percentiles {
    /// Summarises latencies in seconds.
    pub fn of(latencies_s: &[f64]) -> Percentiles {
        if latencies_s.is_empty() {
            return Percentiles::default();
        }
        let mut v: Vec<f64> = latencies_s.iter().map(|s| s * 1e3).collect();
        v.sort_by(f64::total_cmp);
        let rank = |p: f64| {
            let i = ((p / 100.0) * v.len() as f64).ceil() as usize;
            v[i.clamp(1, v.len()) - 1]
        };
        Percentiles {
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: rank(50.0),
            p95: rank(95.0),
            p99: rank(99.0),
            max: v[v.len() - 1],
        }
    }
}

#[derive(Default)]
struct Tally {
    latencies: Vec<f64>,
    batch_sizes: Vec<usize>,
    errors: BTreeMap<String, usize>,
    first_error: Option<String>,
}

/// Runs the plan and reports.
pub async fn run(plan: LoadPlan) -> LoadReport {
    let next = Arc::new(AtomicUsize::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let start = Instant::now();
    let end = start + plan.max_duration;
    let plan = Arc::new(plan);
    let mut tasks = Vec::new();
    for _ in 0..plan.clients.max(1) {
        let (next, tally, plan) = (next.clone(), tally.clone(), plan.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn: Option<Connection> = None;
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= plan.requests || Instant::now() >= end {
                    break;
                }
                let body = plan.bodies[i % plan.bodies.len()].clone();
                let t0 = Instant::now();
                let outcome = async {
                    if conn.is_none() {
                        conn = Some(Connection::connect(plan.addr).await?);
                    }
                    match conn.as_mut() {
                        Some(c) => c.post(&plan.path, body).await,
                        None => anyhow::bail!("no connection"),
                    }
                }
                .await;
                let dt = t0.elapsed().as_secs_f64();
                let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
                let err = match outcome {
                    Err(e) => {
                        conn = None;
                        Some(("connection".to_string(), e.to_string()))
                    }
                    Ok(r) if r.status.as_u16() != 200 => {
                        Some((r.status.as_u16().to_string(), r.text()))
                    }
                    Ok(r) => match r.json().ok().map(unwrap_encoded).as_ref().map(decode_reply) {
                        Some(Ok(_)) => {
                            t.latencies.push(dt);
                            t.batch_sizes.push(
                                r.headers
                                    .get(BATCH_SIZE_HEADER)
                                    .and_then(|v| v.to_str().ok())
                                    .and_then(|v| v.parse().ok())
                                    .unwrap_or(0),
                            );
                            None
                        }
                        _ => Some(("bad_reply".to_string(), r.text())),
                    },
                };
                if let Some((kind, detail)) = err {
                    *t.errors.entry(kind.clone()).or_insert(0) += 1;
                    if t.first_error.is_none() {
                        t.first_error =
                            Some(format!("{kind}: {}", json_numpy::truncate(&detail, 300)));
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let wall_s = start.elapsed().as_secs_f64();
    let t = tally.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = &t.first_error {
        tracing::warn!("first error: {e}");
    }
    let ok = t.latencies.len();
    let errors_n: usize = t.errors.values().sum();
    LoadReport {
        clients: plan.clients,
        requests: ok + errors_n,
        ok,
        errors: t.errors.clone(),
        wall_s,
        throughput_rps: if wall_s > 0.0 {
            ok as f64 / wall_s
        } else {
            0.0
        },
        latency_ms: Percentiles::of(&t.latencies),
        mean_batch_size: if ok > 0 {
            t.batch_sizes.iter().sum::<usize>() as f64 / ok as f64
        } else {
            0.0
        },
    }
}

/// A reply's actions: one json-numpy float64 array (the 256-bin family's single action) or a
/// list of them (an OpenVLA-OFT chunk, as OFT's deploy.py returns it).
fn decode_reply(v: &serde_json::Value) -> Result<Vec<Vec<f64>>, json_numpy::CodecError> {
    match v {
        serde_json::Value::Array(rows) if !rows.is_empty() => {
            rows.iter().map(json_numpy::decode_f64).collect()
        }
        v => Ok(vec![json_numpy::decode_f64(v)?]),
    }
}

/// A double-encoded reply is a JSON string holding the json-numpy object.
fn unwrap_encoded(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::String(s) => serde_json::from_str(&s).unwrap_or(serde_json::Value::Null),
        v => v,
    }
}

/// The first error message of a run is logged; this formats a report for people.
pub fn format_report(r: &LoadReport) -> String {
    let errors = if r.errors.is_empty() {
        "none".to_string()
    } else {
        r.errors
            .iter()
            .map(|(k, n)| format!("{k}: {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let l = r.latency_ms;
    format!(
        "clients:      {}\nrequests:     {} ({} ok)\nerrors:       {errors}\nwall time:    {:.2} s\nthroughput:   {:.2} req/s\nlatency (ms): mean {:.1}  p50 {:.1}  p95 {:.1}  p99 {:.1}  max {:.1}\nmean batch:   {:.2}",
        r.clients, r.requests, r.ok, r.wall_s, r.throughput_rps, l.mean, l.p50, l.p95, l.p99, l.max, r.mean_batch_size
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(|i| i as f64 / 1e3).collect();
        let p = Percentiles::of(&v);
        assert_eq!((p.p50, p.p95, p.p99, p.max), (50.0, 95.0, 99.0, 100.0));
        assert!((p.mean - 50.5).abs() < 1e-9);
        let one = Percentiles::of(&[0.002]);
        assert_eq!((one.p50, one.p99), (2.0, 2.0));
        assert_eq!(Percentiles::of(&[]), Percentiles::default());
    }
}
