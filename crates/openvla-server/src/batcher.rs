//! Dynamic batching: a bounded queue in front of one model thread.
//!
//! Handlers [`Batcher::submit`] a request and await its reply. The model thread takes the
//! first waiting request, then gathers more until it has `max_batch` of them or
//! `batch_wait` has passed since it took the first, and runs them as one
//! [`Engine::run_batch`] call. The wait adapts to the traffic: after
//! [`FUTILE_WAITS_BEFORE_SKIPPING`] waits in a row that gathered nothing (a lone client, who
//! only sends its next request after the answer), the model thread stops waiting and runs each
//! request as soon as it arrives; it waits again as soon as requests queue up behind a running
//! batch (several clients). Requests whose client has gone away or whose deadline has
//! passed are dropped before the model runs. If a batch fails as a whole (an error or a
//! panic in the engine), its requests are run again one at a time, so that a request that
//! breaks a batch fails alone and the others still get their answer.

use crate::engine::Engine;
use crate::error::{from_policy_error, ApiError};
use crate::metrics::Metrics;
use axum::http::StatusCode;
use openvla::{Prediction, Request};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Batching settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// Most requests in one forward pass (at least 1).
    pub max_batch: usize,
    /// Longest wait for more requests after the first of a batch arrives.
    pub batch_wait: Duration,
    /// Most requests waiting in the queue (at least 1); past that, submissions get 503.
    pub queue_size: usize,
}

/// What a queued request gets back.
#[derive(Debug)]
pub struct JobReply {
    /// The prediction, or why there is none.
    pub outcome: Result<Prediction, ApiError>,
    /// How many requests ran in the same forward pass (0 if it never ran).
    pub batch_size: usize,
}

struct Job {
    request: Request,
    deadline: Instant,
    reply: oneshot::Sender<JobReply>,
}

/// The queue and its model thread.
pub struct Batcher {
    sender: Mutex<Option<SyncSender<Job>>>,
    worker: Mutex<Option<JoinHandle<()>>>,
    metrics: Arc<Metrics>,
}

impl Batcher {
    /// Starts the model thread.
    pub fn start(
        engine: Arc<dyn Engine>,
        config: BatchConfig,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Batcher> {
        let config = BatchConfig {
            max_batch: config.max_batch.max(1),
            queue_size: config.queue_size.max(1),
            ..config
        };
        let (tx, rx) = mpsc::sync_channel::<Job>(config.queue_size);
        let m = metrics.clone();
        let worker = std::thread::Builder::new()
            .name("openvla-model".into())
            .spawn(move || worker_loop(engine.as_ref(), config, rx, &m))?;
        Ok(Batcher {
            sender: Mutex::new(Some(tx)),
            worker: Mutex::new(Some(worker)),
            metrics,
        })
    }

    /// Queues a request; the receiver yields its reply. Fails at once with 503 (and
    /// `Retry-After`) when the queue is full or the server is shutting down.
    pub fn submit(
        &self,
        request: Request,
        deadline: Instant,
    ) -> Result<oneshot::Receiver<JobReply>, ApiError> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            request,
            deadline,
            reply,
        };
        let guard = self.sender.lock().unwrap_or_else(|p| p.into_inner());
        let Some(sender) = guard.as_ref() else {
            let mut e = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the server is shutting down",
            );
            e.retry_after = Some(1);
            return Err(e);
        };
        self.metrics.queue_depth.fetch_add(1, Ordering::SeqCst);
        match sender.try_send(job) {
            Ok(()) => Ok(rx),
            Err(err) => {
                self.metrics.queue_depth.fetch_sub(1, Ordering::SeqCst);
                let (kind, detail) = match err {
                    TrySendError::Full(_) => (
                        "queue_full",
                        "the request queue is full (--queue-size); retry later",
                    ),
                    TrySendError::Disconnected(_) => {
                        ("shutting_down", "the model thread has stopped")
                    }
                };
                let mut e = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, kind, detail);
                e.retry_after = Some(1);
                Err(e)
            }
        }
    }

    /// Stops taking requests, lets the model thread finish every queued request, and waits
    /// for it. Idempotent.
    pub fn shutdown(&self) {
        drop(self.sender.lock().unwrap_or_else(|p| p.into_inner()).take());
        let worker = self.worker.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(w) = worker {
            if w.join().is_err() {
                tracing::error!("the model thread panicked");
            }
        }
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn worker_loop(
    engine: &dyn Engine,
    config: BatchConfig,
    rx: mpsc::Receiver<Job>,
    metrics: &Metrics,
) {
    let take = |job: Job, batch: &mut Vec<Job>| {
        metrics.queue_depth.fetch_sub(1, Ordering::SeqCst);
        batch.push(job);
    };
    let mut policy = WaitPolicy::default();
    // `recv` fails only when every sender is gone and the queue is empty.
    while let Ok(first) = rx.recv() {
        let mut batch = Vec::with_capacity(config.max_batch);
        take(first, &mut batch);
        let wait = config.max_batch > 1 && !config.batch_wait.is_zero() && policy.should_wait();
        let until = Instant::now()
            + if wait {
                config.batch_wait
            } else {
                Duration::ZERO
            };
        while batch.len() < config.max_batch {
            match rx.try_recv() {
                Ok(job) => {
                    take(job, &mut batch);
                    continue;
                }
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => {}
            }
            let now = Instant::now();
            if now >= until {
                break;
            }
            match rx.recv_timeout(until - now) {
                Ok(job) => take(job, &mut batch),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        policy.gathered(batch.len(), wait);
        let now = Instant::now();
        let mut live = Vec::with_capacity(batch.len());
        for job in batch {
            if job.reply.is_closed() {
                metrics.dropped.fetch_add(1, Ordering::Relaxed);
            } else if now >= job.deadline {
                metrics.dropped.fetch_add(1, Ordering::Relaxed);
                let _ = job.reply.send(JobReply {
                    outcome: Err(timeout_error()),
                    batch_size: 0,
                });
            } else {
                live.push(job);
            }
        }
        if live.is_empty() {
            continue;
        }
        let (requests, replies): (Vec<Request>, Vec<oneshot::Sender<JobReply>>) =
            live.into_iter().map(|j| (j.request, j.reply)).unzip();
        let n = requests.len();
        let t0 = Instant::now();
        let outcomes = run_isolated(engine, &requests, metrics);
        metrics.batch_size.observe(n as f64);
        metrics.batch_duration.observe(t0.elapsed().as_secs_f64());
        if metrics.queue_depth.load(Ordering::SeqCst) > 0 {
            policy.queued_behind();
        }
        for (reply, outcome) in replies.into_iter().zip(outcomes) {
            // The client may have gone away meanwhile; nothing to do then.
            let _ = reply.send(JobReply {
                outcome,
                batch_size: n,
            });
        }
    }
}

/// Consecutive batch waits that gathered no second request after which the model thread
/// stops waiting (until requests queue up again): a single client then pays no batching delay.
pub const FUTILE_WAITS_BEFORE_SKIPPING: usize = 8;

/// Whether the model thread waits for more requests before running a batch: it waits until
/// [`FUTILE_WAITS_BEFORE_SKIPPING`] waits in a row found nobody to batch with, and starts
/// waiting again when requests pile up behind a running batch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WaitPolicy {
    futile: usize,
}

impl WaitPolicy {
    /// Whether to wait for more requests now.
    pub fn should_wait(&self) -> bool {
        self.futile < FUTILE_WAITS_BEFORE_SKIPPING
    }

    /// Records a gathered batch of `size` requests (`waited`: whether the thread waited).
    pub fn gathered(&mut self, size: usize, waited: bool) {
        if size > 1 {
            self.futile = 0;
        } else if waited {
            self.futile += 1;
        }
    }

    /// Records that requests were queued when a batch finished (clients are overlapping).
    pub fn queued_behind(&mut self) {
        self.futile = 0;
    }
}

/// The error a request gets when its deadline passes.
pub fn timeout_error() -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        "timeout",
        "the request did not finish within --request-timeout-ms",
    )
}

/// Runs a batch; if it fails as a whole, runs each request alone so that only the bad ones
/// fail. Always returns one outcome per request.
fn run_isolated(
    engine: &dyn Engine,
    requests: &[Request],
    metrics: &Metrics,
) -> Vec<Result<Prediction, ApiError>> {
    let result = catch_unwind(AssertUnwindSafe(|| engine.run_batch(requests)));
    match result {
        Ok(Ok(outcomes)) if outcomes.len() == requests.len() => outcomes
            .into_iter()
            .map(|o| o.map_err(|e| from_policy_error(&e)))
            .collect(),
        failed if requests.len() > 1 => {
            let why = match &failed {
                Ok(Ok(_)) => "wrong number of outcomes".to_string(),
                Ok(Err(e)) => e.to_string(),
                Err(p) => panic_message(p.as_ref()),
            };
            tracing::warn!(
                "a batch of {} failed as a whole ({why}); running its requests one at a time",
                requests.len()
            );
            metrics.batch_retries.fetch_add(1, Ordering::Relaxed);
            requests
                .iter()
                .flat_map(|r| run_isolated(engine, std::slice::from_ref(r), metrics))
                .collect()
        }
        Ok(Ok(_)) => vec![Err(ApiError::internal(
            "the engine returned the wrong number of outcomes",
        ))],
        Ok(Err(e)) => vec![Err(from_policy_error(&e))],
        Err(p) => {
            let msg = panic_message(p.as_ref());
            tracing::error!("the engine panicked on a request: {msg}");
            vec![Err(ApiError::internal(format!(
                "the model failed on this request: {msg}"
            )))]
        }
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::{WaitPolicy, FUTILE_WAITS_BEFORE_SKIPPING};

    #[test]
    fn waits_until_waiting_stops_paying_then_resumes_when_requests_queue() {
        let mut p = WaitPolicy::default();
        for _ in 0..FUTILE_WAITS_BEFORE_SKIPPING {
            assert!(p.should_wait());
            p.gathered(1, true);
        }
        // A lone client: no more waiting.
        assert!(!p.should_wait());
        p.gathered(1, false);
        assert!(!p.should_wait());
        // Requests piled up behind a batch: several clients, wait again.
        p.queued_behind();
        assert!(p.should_wait());
        // A batch of several also resets the count.
        for _ in 0..FUTILE_WAITS_BEFORE_SKIPPING - 1 {
            p.gathered(1, true);
        }
        p.gathered(3, true);
        for _ in 0..FUTILE_WAITS_BEFORE_SKIPPING - 1 {
            p.gathered(1, true);
        }
        assert!(p.should_wait());
    }
}
