//! Every error class of the API over real HTTP on loopback, backpressure, timeouts, panics
//! in the engine, and graceful shutdown (with a mock engine, so timings are controlled).

mod common;

use common::*;
use openvla_server::{BatchConfig, Engine, ServerConfig};
use serde_json::json;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config(max_batch: usize, wait_ms: u64, queue: usize) -> ServerConfig {
    ServerConfig {
        batch: BatchConfig {
            max_batch,
            batch_wait: Duration::from_millis(wait_ms),
            queue_size: queue,
        },
        ..ServerConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_error_has_its_status_and_json_body() {
    let mock = MockEngine::new(Duration::ZERO);
    let engine: Arc<dyn Engine> = mock.clone();
    let mut cfg = config(4, 0, 8);
    cfg.max_body_bytes = 64 * 1024;
    cfg.limits.max_image_pixels = 10_000;
    let server = TestServer::start(engine, cfg).await;
    let img = small_image(4, 3);
    let ok_arr = openvla_server::json_numpy::encode_u8(&[3, 4, 3], img.data());
    let cases: Vec<(String, u16, &str)> = vec![
        ("{\"image\": ".into(), 400, "malformed_json"),
        ("not json".into(), 400, "malformed_json"),
        (json!({"image": "%%%%", "instruction": "x", "unnorm_key": "three"}).to_string(), 400, "invalid_base64"),
        (json!({"image": {"__numpy__": "A*AA", "dtype": "|u1", "shape": [1, 1, 3]}, "instruction": "x", "unnorm_key": "three"}).to_string(), 400, "invalid_base64"),
        (json!({"image": {"__numpy__": "AAAA", "dtype": "<f8", "shape": [1, 1, 3]}, "instruction": "x", "unnorm_key": "three"}).to_string(), 400, "invalid_array"),
        (json!({"image": {"__numpy__": "AAAA", "dtype": "|u1", "shape": [2, 2, 3]}, "instruction": "x", "unnorm_key": "three"}).to_string(), 400, "invalid_array"),
        (json!({"image": {"__numpy__": "AAAAAAAA", "dtype": "|u1", "shape": [2, 4]}, "instruction": "x", "unnorm_key": "three"}).to_string(), 400, "invalid_array"),
        (json!({"image": {"__numpy__": "AAAAAAAA", "dtype": "|u1", "shape": [1, 3, 3]}, "instruction": "x", "unnorm_key": "three"}).to_string(), 400, "invalid_array"),
        (json!({"image": "iVBORw0KGgo=", "instruction": "x", "unnorm_key": "three"}).to_string(), 400, "invalid_image"),
        (json!({"image": ok_arr, "instruction": "x", "unnorm_key": "five"}).to_string(), 400, "unknown_unnorm_key"),
        (json!({"image": ok_arr, "instruction": "x"}).to_string(), 400, "unknown_unnorm_key"),
        (json!({"image": ok_arr, "instruction": "", "unnorm_key": "three"}).to_string(), 400, "invalid_request"),
        (json!({"encoded": "{}", "instruction": "x"}).to_string(), 400, "invalid_request"),
        (json!({"instruction": "x", "unnorm_key": "three"}).to_string(), 422, "missing_field"),
        (json!({"image": ok_arr, "unnorm_key": "three"}).to_string(), 422, "missing_field"),
        (json!({"encoded": json!({"image": ok_arr}).to_string()}).to_string(), 422, "missing_field"),
        (json!({"image": ok_arr, "instruction": ["x"], "unnorm_key": "three"}).to_string(), 422, "invalid_field"),
        (json!({"image": ok_arr, "instruction": "x", "unnorm_key": 7}).to_string(), 422, "invalid_field"),
        (json!({"image": [[[1, 2, 3]], [1]], "instruction": "x", "unnorm_key": "three"}).to_string(), 400, "invalid_array"),
        (json!({"image": 7, "instruction": "x", "unnorm_key": "three"}).to_string(), 422, "invalid_field"),
        ("[1, 2, 3]".into(), 422, "invalid_field"),
        (json!({"image": {"__numpy__": "", "dtype": "|u1", "shape": [101, 100, 3]}, "instruction": "x", "unnorm_key": "three"}).to_string(), 413, "image_too_large"),
        (json!({"image": "x".repeat(70_000), "instruction": "x"}).to_string(), 413, "body_too_large"),
    ];
    for (body, status, kind) in &cases {
        let r = server.post(body.clone()).await;
        assert_eq!(
            error_of(&r),
            (*status, kind.to_string()),
            "{}: {}",
            &body.chars().take(100).collect::<String>(),
            r.text()
        );
    }
    // The unknown key's error lists the available keys.
    let r = server
        .post(json!({"image": ok_arr, "instruction": "x", "unnorm_key": "five"}).to_string())
        .await;
    assert!(
        r.text().contains("\\\"four\\\", \\\"three\\\""),
        "{}",
        r.text()
    );
    // Routes and methods.
    let r = server.get("/nope").await;
    assert_eq!(error_of(&r), (404, "not_found".into()));
    let r = server.get("/act").await;
    assert_eq!(error_of(&r), (405, "method_not_allowed".into()));
    // After all that, a good request still works.
    let r = server
        .post(json!({"image": ok_arr, "instruction": "xy", "unnorm_key": "four"}).to_string())
        .await;
    assert_eq!(action_of(&r), vec![2.0, 4.0, 3.0, 1.0]);
    // Only the two valid-to-the-engine requests reached it ("" and "xy").
    assert_eq!(mock.batches.lock().unwrap().iter().sum::<usize>(), 2);
    let text = server.get("/metrics").await.text();
    assert!(
        text.contains("openvla_http_requests_total{endpoint=\"/act\",status=\"413\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("openvla_http_requests_total{endpoint=\"other\",status=\"404\"} 1"),
        "{text}"
    );
    server.stop().await.unwrap();
}

/// A body sent with chunked transfer encoding (no Content-Length) is cut off at the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_over_the_limit_gets_413() {
    let engine: Arc<dyn Engine> = MockEngine::new(Duration::ZERO);
    let mut cfg = config(4, 0, 8);
    cfg.max_body_bytes = 1000;
    let server = TestServer::start(engine, cfg).await;
    let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let head = "POST /act HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    s.write_all(head.as_bytes()).await.unwrap();
    let chunk = "a".repeat(600);
    for _ in 0..3 {
        // The server may answer and close before every chunk is written.
        if s.write_all(format!("{:x}\r\n{chunk}\r\n", chunk.len()).as_bytes())
            .await
            .is_err()
        {
            break;
        }
    }
    let _ = s.write_all(b"0\r\n\r\n").await;
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut reply)).await;
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(reply.contains("\"error\":\"body_too_large\""), "{reply}");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_queue_answers_503_with_retry_after() {
    // One request at a time, 400 ms each, one queue slot.
    let engine: Arc<dyn Engine> = MockEngine::new(Duration::from_millis(400));
    let server = Arc::new(TestServer::start(engine, config(1, 0, 1)).await);
    let body = act_body(&small_image(2, 2), "go", Some("three"));
    let mut tasks = Vec::new();
    for i in 0..6 {
        let (s, b) = (server.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            // Staggered, so the first is running and the second queued before the rest.
            tokio::time::sleep(Duration::from_millis(50 * i)).await;
            s.post(b).await
        }));
    }
    let mut ok = 0;
    let mut full = 0;
    for t in tasks {
        let r = t.await.unwrap();
        match r.status.as_u16() {
            200 => ok += 1,
            503 => {
                assert_eq!(error_of(&r), (503, "queue_full".into()));
                assert_eq!(r.headers.get("retry-after").unwrap(), "1");
                full += 1;
            }
            s => panic!("unexpected {s}: {}", r.text()),
        }
    }
    assert_eq!((ok, full), (2, 4));
    let text = server.get("/metrics").await.text();
    assert!(
        text.contains("openvla_http_requests_total{endpoint=\"/act\",status=\"503\"} 4"),
        "{text}"
    );
    Arc::into_inner(server).unwrap().stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queue_depth_is_reported_while_requests_wait() {
    let engine: Arc<dyn Engine> = MockEngine::new(Duration::from_millis(600));
    let server = Arc::new(TestServer::start(engine, config(1, 0, 8)).await);
    let body = act_body(&small_image(2, 2), "go", Some("three"));
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let (s, b) = (server.clone(), body.clone());
        tasks.push(tokio::spawn(async move { s.post(b).await }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = server.get("/metrics").await.text();
    assert!(text.contains("openvla_queue_depth 2\n"), "{text}");
    assert!(text.contains("openvla_in_flight_requests 3\n"), "{text}");
    assert_eq!(
        server.get("/health").await.json().unwrap()["queue_depth"],
        2
    );
    for t in tasks {
        assert_eq!(t.await.unwrap().status.as_u16(), 200);
    }
    Arc::into_inner(server).unwrap().stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_requests_time_out_with_504() {
    let engine: Arc<dyn Engine> = MockEngine::new(Duration::from_millis(700));
    let mut cfg = config(1, 0, 8);
    cfg.request_timeout = Duration::from_millis(300);
    let server = Arc::new(TestServer::start(engine, cfg).await);
    let body = act_body(&small_image(2, 2), "go", Some("three"));
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let (s, b) = (server.clone(), body.clone());
        tasks.push(tokio::spawn(async move { s.post(b).await }));
    }
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(error_of(&r), (504, "timeout".into()), "{}", r.text());
    }
    // Requests whose deadline passed in the queue were dropped without running.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(server.metrics.dropped.load(Ordering::Relaxed) >= 1);
    Arc::into_inner(server).unwrap().stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_panicking_or_failing_request_fails_alone() {
    let mock = MockEngine::new(Duration::ZERO);
    let engine: Arc<dyn Engine> = mock.clone();
    let server = Arc::new(TestServer::start(engine, config(8, 1000, 16)).await);
    let img = small_image(5, 4);
    let instructions = ["a", "panic", "abc", "fail batch", "", "abcd"];
    let mut tasks = Vec::new();
    for ins in instructions {
        let (s, b) = (server.clone(), act_body(&img, ins, Some("three")));
        tasks.push(tokio::spawn(async move { s.post(b).await }));
    }
    let mut replies = Vec::new();
    for t in tasks {
        replies.push(t.await.unwrap());
    }
    assert_eq!(action_of(&replies[0]), vec![1.0, 5.0, 4.0]);
    assert_eq!(error_of(&replies[1]), (500, "internal".into()));
    assert!(replies[1].text().contains("mock engine asked to panic"));
    assert_eq!(action_of(&replies[2]), vec![3.0, 5.0, 4.0]);
    assert_eq!(error_of(&replies[3]), (400, "invalid_request".into()));
    assert_eq!(error_of(&replies[4]), (400, "invalid_request".into()));
    assert_eq!(action_of(&replies[5]), vec![4.0, 5.0, 4.0]);
    // One batch of six that failed, then each request alone.
    assert_eq!(*mock.batches.lock().unwrap(), vec![6, 1, 1, 1, 1, 1, 1]);
    assert_eq!(batch_size_of(&replies[0]), 6);
    // The server is still up.
    let r = server.post(act_body(&img, "ok", Some("four"))).await;
    assert_eq!(action_of(&r), vec![2.0, 5.0, 4.0, 1.0]);
    Arc::into_inner(server).unwrap().stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graceful_shutdown_finishes_requests_in_flight() {
    let engine: Arc<dyn Engine> = MockEngine::new(Duration::from_millis(800));
    let mut server = TestServer::start(engine, config(1, 0, 8)).await;
    let addr = server.addr;
    let body = act_body(&small_image(3, 3), "go", Some("three"));
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let b = body.clone();
        tasks.push(tokio::spawn(async move {
            openvla_server::client::Connection::connect(addr)
                .await
                .unwrap()
                .post("/act", b)
                .await
                .unwrap()
        }));
    }
    // Both are in: one running, one queued. Now shut down.
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.signal_shutdown();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // New connections are refused while the two finish.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(action_of(&r), vec![2.0, 3.0, 3.0]);
    }
    server.join().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_leaves_is_dropped_from_the_queue() {
    let mock = MockEngine::new(Duration::from_millis(600));
    let engine: Arc<dyn Engine> = mock.clone();
    let server = Arc::new(TestServer::start(engine, config(1, 0, 8)).await);
    let body = act_body(&small_image(2, 2), "go", Some("three"));
    let (s, b) = (server.clone(), body.clone());
    let running = tokio::spawn(async move { s.post(b).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    // A second client sends its request, then hangs up while it waits in the queue.
    let mut c = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let req = format!(
        "POST /act HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    c.write_all(req.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    drop(c);
    assert_eq!(action_of(&running.await.unwrap()), vec![2.0, 2.0, 2.0]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // It never ran, and it is no longer counted as in flight.
    assert_eq!(*mock.batches.lock().unwrap(), vec![1]);
    assert_eq!(server.metrics.dropped.load(Ordering::Relaxed), 1);
    assert_eq!(server.metrics.in_flight.load(Ordering::Relaxed), 0);
    Arc::into_inner(server).unwrap().stop().await.unwrap();
}
