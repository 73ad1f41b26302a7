//! The server on the shipped tiny model: answers equal `Policy::predict` for every request
//! form, and batched requests (different prompt lengths, unnorm_keys and action dims, a bad
//! request among them) equal their single-request answers.

mod common;

use base64::Engine as _;
use common::*;
use openvla::Observation;
use openvla_server::json_numpy;
use openvla_server::{BatchConfig, Engine, ServerConfig};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

fn samples() -> Vec<(String, String, String)> {
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("testdata/openvla-tiny/manifest.json")).unwrap(),
    )
    .unwrap();
    manifest["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                format!(
                    "testdata/openvla-tiny/{}",
                    s["files"]["image"].as_str().unwrap()
                ),
                s["instruction"].as_str().unwrap().to_string(),
                s["unnorm_key"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn expected(image: &openvla_image::RgbImage, instruction: &str, key: &str) -> Vec<f64> {
    tiny()
        .predict(&[Observation::new(image.clone(), instruction)], Some(key))
        .unwrap()
        .remove(0)
        .action()
        .to_vec()
}

fn config(max_batch: usize, wait_ms: u64) -> ServerConfig {
    ServerConfig {
        batch: BatchConfig {
            max_batch,
            batch_wait: Duration::from_millis(wait_ms),
            queue_size: 64,
        },
        ..ServerConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn act_equals_predict_in_every_request_form() {
    let engine: Arc<dyn Engine> = tiny();
    let server = TestServer::start(engine, config(8, 0)).await;
    let samples = samples();
    assert_eq!(samples.len(), 4);
    for (path, instruction, key) in samples {
        let png = std::fs::read(root().join(&path)).unwrap();
        let image = openvla_image::decode(&png).unwrap();
        let want = expected(&image, &instruction, &key);

        // json-numpy, as deploy.py clients send it.
        let r = server
            .post(act_body(&image, &instruction, Some(&key)))
            .await;
        assert_eq!(r.headers.get("content-type").unwrap(), "application/json");
        let v = r.json().unwrap();
        assert_eq!(v["dtype"], "<f8");
        assert_eq!(v["shape"], json!([want.len()]));
        assert_eq!(action_of(&r), want, "{path}");

        // Double-encoded: the reply is a JSON string, json_numpy.dumps(action) byte for byte.
        let inner = act_body(&image, &instruction, Some(&key));
        let r = server.post(json!({ "encoded": inner }).to_string()).await;
        assert_eq!(r.status.as_u16(), 200, "{}", r.text());
        let Value::String(s) = r.json().unwrap() else {
            panic!("encoded reply is not a JSON string: {}", r.text());
        };
        assert_eq!(s, json_numpy::dumps_f64(&want));
        let decoded: Value = serde_json::from_str(&s).unwrap();
        assert_eq!(json_numpy::decode_f64(&decoded).unwrap(), want);

        // A base64 PNG instead of an array.
        let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
        let r = server
            .post(json!({"image": b64, "instruction": instruction, "unnorm_key": key}).to_string())
            .await;
        assert_eq!(action_of(&r), want, "{path} as PNG");

        // The 4-dimensional dataset on the same image.
        let want4 = expected(&image, &instruction, "fake_nomask_4d");
        let r = server
            .post(act_body(&image, &instruction, Some("fake_nomask_4d")))
            .await;
        assert_eq!(action_of(&r), want4);
        assert_eq!(want4.len(), 4);
    }
    assert!(server.metrics.requests("/act", 200) >= 16);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_client_stops_paying_the_batch_window() {
    // A client that sends its next request only after the answer never has company: after
    // FUTILE_WAITS_BEFORE_SKIPPING batch windows that gathered nothing, the server stops
    // waiting. A request that waited takes at least the whole window (600 ms), so the later
    // ones must come back sooner than that.
    let window = Duration::from_millis(600);
    let engine: Arc<dyn Engine> = tiny();
    let server = TestServer::start(engine, config(8, window.as_millis() as u64)).await;
    let (path, instruction, key) = samples().remove(0);
    let image = openvla_image::open(&root().join(&path)).unwrap();
    let want = expected(&image, &instruction, &key);
    let waits = openvla_server::batcher::FUTILE_WAITS_BEFORE_SKIPPING;
    for i in 0..waits + 3 {
        let t = std::time::Instant::now();
        let r = server
            .post(act_body(&image, &instruction, Some(&key)))
            .await;
        let took = t.elapsed();
        assert_eq!(action_of(&r), want);
        assert_eq!(batch_size_of(&r), 1);
        if i < waits {
            assert!(
                took >= window,
                "request {i} did not wait for company: {took:?}"
            );
        } else {
            assert!(
                took < window,
                "request {i} still waited the window: {took:?}"
            );
        }
    }
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mixed_batch_equals_single_requests() {
    let images: Vec<_> = samples()
        .iter()
        .map(|(p, _, _)| openvla_image::open(&root().join(p)).unwrap())
        .collect();
    let long = "carefully pick up the small red block next to the blue bowl on the left side \
                of the table and put it into the top drawer of the wooden cabinet, then close it";
    let cases: Vec<(usize, &str, &str)> = vec![
        (0, "pick up the red block", "fake_bridge_orig"),
        (1, long, "fake_libero_spatial"),
        (2, "go", "fake_nomask_4d"),
        (3, "open the drawer", "fake_bridge_orig"),
        (0, long, "fake_nomask_4d"),
        (1, "put the spoon on the towel", "fake_libero_spatial"),
    ];
    let wants: Vec<Vec<f64>> = cases
        .iter()
        .map(|&(i, ins, key)| expected(&images[i], ins, key))
        .collect();
    // Prompt lengths really differ.
    let lens: std::collections::BTreeSet<usize> = cases
        .iter()
        .map(|(_, ins, _)| tiny().prompt_ids(ins).unwrap().len())
        .collect();
    assert!(lens.len() >= 4, "{lens:?}");

    // A long batch window so that every request joins one batch.
    let engine: Arc<dyn Engine> = tiny();
    let server = Arc::new(TestServer::start(engine, config(16, 2000)).await);
    let mut tasks = Vec::new();
    for &(i, ins, key) in &cases {
        let body = act_body(&images[i], ins, Some(key));
        let s = server.clone();
        tasks.push(tokio::spawn(async move { s.post(body).await }));
    }
    // A bad request in the same batch: the model refuses an empty instruction.
    let s = server.clone();
    let bad_body = act_body(&images[0], "", Some("fake_bridge_orig"));
    let bad = tokio::spawn(async move { s.post(bad_body).await });
    let mut sizes = Vec::new();
    for (t, want) in tasks.into_iter().zip(&wants) {
        let r = t.await.unwrap();
        assert_eq!(&action_of(&r), want);
        sizes.push(batch_size_of(&r));
    }
    let bad = bad.await.unwrap();
    assert_eq!(
        error_of(&bad),
        (400, "invalid_request".to_string()),
        "{}",
        bad.text()
    );
    // All seven went through one forward pass.
    assert!(sizes.iter().all(|&s| s == cases.len() + 1), "{sizes:?}");
    let server = Arc::into_inner(server).unwrap();
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_that_breaks_the_batch_fails_alone() {
    // A prompt longer than max_position_embeddings: `Policy` rejects it while preparing the
    // request, before the batch runs, so only that request fails and the batch needs no
    // one-by-one re-run (the server's retry stays for failures of the batch as a whole).
    let image = openvla_image::open(&root().join("testdata/openvla-tiny/s0_image.png")).unwrap();
    let huge = "move ".repeat(2500);
    let mut cfg = config(8, 2000);
    cfg.limits.max_instruction_bytes = 1 << 20;
    let engine: Arc<dyn Engine> = tiny();
    let server = Arc::new(TestServer::start(engine, cfg).await);
    let good = ["pick up the red block", "open the drawer"];
    let mut tasks = Vec::new();
    for ins in good {
        let (s, body) = (
            server.clone(),
            act_body(&image, ins, Some("fake_bridge_orig")),
        );
        tasks.push(tokio::spawn(async move { s.post(body).await }));
    }
    let (s, body) = (
        server.clone(),
        act_body(&image, &huge, Some("fake_bridge_orig")),
    );
    let bad = tokio::spawn(async move { s.post(body).await });
    for (t, ins) in tasks.into_iter().zip(good) {
        let r = t.await.unwrap();
        assert_eq!(action_of(&r), expected(&image, ins, "fake_bridge_orig"));
    }
    let bad = bad.await.unwrap();
    let (status, kind) = error_of(&bad);
    assert_eq!(
        (status, kind.as_str()),
        (400, "invalid_request"),
        "{}",
        bad.text()
    );
    assert!(
        bad.text().contains("max_position_embeddings"),
        "{}",
        bad.text()
    );
    assert_eq!(
        server
            .metrics
            .batch_retries
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    // The server still answers.
    let r = server
        .post(act_body(&image, "go", Some("fake_bridge_orig")))
        .await;
    assert_eq!(action_of(&r), expected(&image, "go", "fake_bridge_orig"));
    Arc::into_inner(server).unwrap().stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unnorm_key_errors_and_operational_endpoints() {
    let engine: Arc<dyn Engine> = tiny();
    let server = TestServer::start(engine, config(8, 0)).await;
    let image = small_image(32, 24);

    let r = server
        .post(act_body(&image, "go", Some("bridge_orig")))
        .await;
    assert_eq!(error_of(&r), (400, "unknown_unnorm_key".into()));
    for k in ["fake_bridge_orig", "fake_libero_spatial", "fake_nomask_4d"] {
        assert!(r.text().contains(k), "{}", r.text());
    }
    // Three datasets: the key may not be omitted.
    let r = server.post(act_body(&image, "go", None)).await;
    assert_eq!(error_of(&r), (400, "unknown_unnorm_key".into()));
    assert!(r.text().contains("fake_nomask_4d"), "{}", r.text());
    let r = server
        .post(act_body(&image, "go", Some("fake_bridge_orig")))
        .await;
    assert_eq!(action_of(&r).len(), 7);

    let h = server.get("/health").await;
    assert_eq!(h.status.as_u16(), 200);
    assert_eq!(h.json().unwrap()["status"], "ok");

    let m = server.get("/metadata").await.json().unwrap();
    assert_eq!(m["variant"], "openvla");
    assert_eq!(m["compute"], "f32");
    assert_eq!(
        m["action_dims"],
        json!({"fake_bridge_orig": 7, "fake_libero_spatial": 7, "fake_nomask_4d": 4})
    );
    assert_eq!(
        m["norm_stats_keys"],
        json!(["fake_bridge_orig", "fake_libero_spatial", "fake_nomask_4d"])
    );
    assert_eq!(m["server_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(m["limits"]["max_batch"], 8);

    let text = server.get("/metrics").await.text();
    for line in [
        "openvla_http_requests_total{endpoint=\"/act\",status=\"200\"} 1\n",
        "openvla_http_requests_total{endpoint=\"/act\",status=\"400\"} 2\n",
        "openvla_http_requests_total{endpoint=\"/health\",status=\"200\"} 1\n",
        "openvla_batch_size_count 1\n",
        "openvla_batch_size_bucket{le=\"1\"} 1\n",
        "openvla_act_latency_seconds_count 3\n",
        "openvla_queue_depth 0\n",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    server.stop().await.unwrap();
}
