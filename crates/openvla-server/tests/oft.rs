//! The server on the tiny OpenVLA-OFT checkpoint (testdata/openvla-oft-tiny): OFT's deploy.py
//! wire format (full_image + wrist keys in key order + state; a list of K float64 arrays back),
//! the double-encoded mode, concurrent requests equal to single ones, and /metadata.

mod common;

use common::*;
use openvla::{LoadOptions, Observation, Policy, Precision};
use openvla_server::client::Reply;
use openvla_server::json_numpy;
use openvla_server::{BatchConfig, Engine, ServerConfig};
use serde_json::{json, Value};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

fn oft() -> Arc<Policy> {
    static P: OnceLock<Arc<Policy>> = OnceLock::new();
    P.get_or_init(|| {
        Arc::new(
            Policy::load(
                &root().join("testdata/openvla-oft-tiny/model"),
                &LoadOptions {
                    precision: Precision::F32,
                    ..Default::default()
                },
            )
            .unwrap(),
        )
    })
    .clone()
}

fn image(sample: &str, i: usize) -> openvla_image::RgbImage {
    openvla_image::open(&root().join(format!(
        "testdata/openvla-oft-tiny/{sample}img{i}_input.png"
    )))
    .unwrap()
}

const STATE: [f64; 8] = [
    -0.21124162683394807,
    -0.011090601889321502,
    1.1742495176982402,
    3.140895396142254,
    -0.002847819833825949,
    -0.08773931027790592,
    0.03872336505859045,
    -0.0387222020954563,
];
const KEY: &str = "fake_libero_spatial_no_noops";

fn u8_array(img: &openvla_image::RgbImage) -> Value {
    let (w, h) = img.size();
    json_numpy::encode_u8(&[h as usize, w as usize, 3], img.data())
}

/// OFT deploy.py's request, with the wrist image under `wrist_key`.
fn oft_body(
    full: &openvla_image::RgbImage,
    wrist: &openvla_image::RgbImage,
    instruction: &str,
) -> Value {
    json!({
        "full_image": u8_array(full),
        "wrist_image": u8_array(wrist),
        "state": json_numpy::encode_f64(&STATE),
        "instruction": instruction,
        "unnorm_key": KEY,
    })
}

fn expected(
    full: &openvla_image::RgbImage,
    wrist: &openvla_image::RgbImage,
    instruction: &str,
) -> Vec<Vec<f64>> {
    let obs = Observation {
        images: vec![
            ("full_image".into(), full.clone()),
            ("wrist_image".into(), wrist.clone()),
        ],
        instruction: instruction.into(),
        proprio: Some(STATE.to_vec()),
    };
    oft().predict(&[obs], Some(KEY)).unwrap().remove(0).actions
}

fn chunk_of(r: &Reply) -> Vec<Vec<f64>> {
    assert_eq!(r.status.as_u16(), 200, "{}", r.text());
    let v = r.json().unwrap();
    let rows = v.as_array().unwrap_or_else(|| panic!("not a list: {v}"));
    rows.iter()
        .map(|a| {
            assert_eq!(a["dtype"], "<f8");
            json_numpy::decode_f64(a).unwrap()
        })
        .collect()
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
async fn deploy_py_format_answers_the_chunk() {
    let engine: Arc<dyn Engine> = oft();
    let server = TestServer::start(engine, config(8, 0)).await;
    let (full, wrist) = (image("s0_", 0), image("s0_", 1));
    let instruction =
        "pick up the black bowl between the plate and the ramekin and place it on the plate";
    let want = expected(&full, &wrist, instruction);
    assert_eq!(want.len(), 8);
    let body = oft_body(&full, &wrist, instruction);
    let r = server.post(body.to_string()).await;
    assert_eq!(chunk_of(&r), want);

    // The wrist images are taken in key order: swapping the two images changes the answer.
    let swapped = oft_body(&wrist, &full, instruction);
    assert_ne!(chunk_of(&server.post(swapped.to_string()).await), want);

    // Double-encoded: a JSON string, json_numpy.dumps(list of arrays).
    let r = server
        .post(json!({ "encoded": body.to_string() }).to_string())
        .await;
    let Value::String(s) = r.json().unwrap() else {
        panic!("encoded reply is not a JSON string: {}", r.text());
    };
    let rows: Vec<f64> = serde_json::from_str::<Value>(&s)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|a| json_numpy::decode_f64(a).unwrap())
        .collect();
    assert_eq!(rows, want.concat());

    // Errors: no state, a missing wrist image.
    let mut no_state = body.clone();
    no_state.as_object_mut().unwrap().remove("state");
    let (status, _) = error_of(&server.post(no_state.to_string()).await);
    assert!(status >= 400, "missing state: {status}");
    let mut one_image = body.clone();
    one_image.as_object_mut().unwrap().remove("wrist_image");
    let r = server.post(one_image.to_string()).await;
    let (status, _) = error_of(&r);
    assert!(
        status >= 400 && r.text().contains("2 images"),
        "{}",
        r.text()
    );

    // /metadata names the OFT inputs.
    let m = server.get("/metadata").await.json().unwrap();
    assert_eq!(m["family"], "oft-l1");
    assert_eq!(m["chunk_size"], 8);
    assert_eq!(
        m["inputs"],
        json!({"images": ["full_image", "wrist_image"], "proprio_dim": 8})
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_equal_single_ones() {
    let samples = [
        ("s0_", "pick up the black bowl"),
        ("s3_", "turn on the stove and put the moka pot on it"),
        ("s0_", "open the top drawer of the cabinet"),
    ];
    let inputs: Vec<_> = samples
        .iter()
        .map(|(s, ins)| (image(s, 0), image(s, 1), *ins))
        .collect();
    let wants: Vec<_> = inputs.iter().map(|(f, w, i)| expected(f, w, i)).collect();
    let engine: Arc<dyn Engine> = oft();
    let server = Arc::new(TestServer::start(engine, config(8, 300)).await);
    let mut handles = Vec::new();
    for (f, w, i) in &inputs {
        let body = oft_body(f, w, i).to_string();
        let s = server.clone();
        handles.push(tokio::spawn(async move { s.post(body).await }));
    }
    let mut batched = false;
    for (h, want) in handles.into_iter().zip(&wants) {
        let r = h.await.unwrap();
        batched |= batch_size_of(&r) > 1;
        assert_eq!(&chunk_of(&r), want);
    }
    assert!(batched, "the requests should have run as one batch");
    Arc::try_unwrap(server).ok().unwrap().stop().await.unwrap();
}

/// The 256-bin family's /metadata carries the defaults.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openvla_metadata_has_the_256_bin_defaults() {
    let engine: Arc<dyn Engine> = tiny();
    let server = TestServer::start(engine, config(8, 0)).await;
    let m = server.get("/metadata").await.json().unwrap();
    assert_eq!(m["family"], "openvla");
    assert_eq!(m["chunk_size"], 1);
    assert_eq!(
        m["inputs"],
        json!({"images": ["image"], "proprio_dim": null})
    );
    server.stop().await.unwrap();
}
