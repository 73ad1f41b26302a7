//! Property-based fuzzing (proptest) of the json-numpy decoder, the `/act` body parser and
//! the whole HTTP handler: no input panics, and every refusal is a documented client error.
//!
//! The case count is proptest's `PROPTEST_CASES` (default 256 per property here); the
//! longer runs recorded in docs/serving.md set it higher.

mod common;

use axum::body::Body;
use axum::http::Request as HttpRequest;
use base64::Engine as _;
use common::*;
use http_body_util::BodyExt;
use openvla_server::json_numpy::{self, decode_u8};
use openvla_server::request::{parse_act, ParseLimits};
use openvla_server::{Engine, Server, ServerConfig};
use proptest::prelude::*;
use serde_json::{json, Value};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Strings that are sometimes valid base64 of some length, sometimes not.
fn payload() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64).prop_map(|b| b64(&b)),
        "[A-Za-z0-9+/=]{0,40}",
        ".{0,20}",
    ]
}

fn dtype() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => prop::sample::select(vec!["|u1", "<u1", ">u1", "u1", "uint8", "<f8", "<i4", "|b1", "", "O"]).prop_map(Value::from),
        1 => any::<i64>().prop_map(Value::from),
        1 => Just(Value::Null),
    ]
}

fn shape() -> impl Strategy<Value = Value> {
    prop_oneof![
        6 => prop::collection::vec(0u64..12, 0..5).prop_map(|v| json!(v)),
        1 => prop::collection::vec(any::<u64>(), 0..5).prop_map(|v| json!(v)),
        1 => prop::collection::vec(any::<i64>(), 0..4).prop_map(|v| json!(v)),
        1 => Just(json!([1.5, 2])),
        1 => Just(json!("3")),
        1 => Just(Value::Null),
    ]
}

fn numpy_object() -> impl Strategy<Value = Value> {
    (
        prop::option::of(payload()),
        prop::option::of(dtype()),
        prop::option::of(shape()),
    )
        .prop_map(|(p, d, s)| {
            let mut o = serde_json::Map::new();
            if let Some(p) = p {
                o.insert("__numpy__".into(), Value::String(p));
            }
            if let Some(d) = d {
                o.insert("dtype".into(), d);
            }
            if let Some(s) = s {
                o.insert("shape".into(), s);
            }
            Value::Object(o)
        })
}

/// A structurally plausible `/act` body with random parts.
fn act_value() -> impl Strategy<Value = Value> {
    let image = prop_oneof![
        4 => numpy_object(),
        2 => (1usize..6, 1usize..6, prop::sample::select(vec![1usize, 3, 4]))
            .prop_map(|(h, w, c)| {
                let data: Vec<u8> = (0..h * w * c).map(|i| i as u8).collect();
                if c == 1 {
                    json_numpy::encode_u8(&[h, w], &data)
                } else {
                    json_numpy::encode_u8(&[h, w, c], &data)
                }
            }),
        1 => prop::collection::vec(any::<u8>(), 0..80).prop_map(|b| Value::String(b64(&b))),
        1 => Just(Value::String(b64(b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR\x00\x00\x00\x02\x00\x00\x00\x02\x08\x02"))),
        1 => any::<i32>().prop_map(Value::from),
        1 => Just(Value::Null),
    ];
    let instruction = prop_oneof![
        4 => ".{0,12}".prop_map(Value::from),
        1 => any::<bool>().prop_map(Value::from),
    ];
    let key = prop_oneof![
        Just(None),
        Just(Some(json!("three"))),
        Just(Some(json!("four"))),
        Just(Some(json!("nope"))),
        Just(Some(json!(3))),
        Just(Some(Value::Null)),
    ];
    (
        prop::option::of(image),
        prop::option::of(instruction),
        key,
        any::<bool>(),
    )
        .prop_map(|(image, instruction, key, encoded)| {
            let mut o = serde_json::Map::new();
            if let Some(i) = image {
                o.insert("image".into(), i);
            }
            if let Some(i) = instruction {
                o.insert("instruction".into(), i);
            }
            if let Some(k) = key {
                o.insert("unnorm_key".into(), k);
            }
            let v = Value::Object(o);
            if encoded {
                json!({"encoded": v.to_string()})
            } else {
                v
            }
        })
}

/// A valid body with a few random byte edits (flips, truncation, insertion).
fn mutated_body() -> impl Strategy<Value = Vec<u8>> {
    let img = small_image(3, 2);
    let base = act_body(&img, "pick it up", Some("three")).into_bytes();
    let n = base.len();
    (
        prop::collection::vec((0..n, any::<u8>()), 0..6),
        prop::option::of(0..n),
        prop::option::of((0..n, ".{0,8}")),
    )
        .prop_map(move |(flips, cut, insert)| {
            let mut b = base.clone();
            for (i, v) in flips {
                b[i] = v;
            }
            if let Some((i, s)) = insert {
                let i = i.min(b.len());
                b.splice(i..i, s.into_bytes());
            }
            if let Some(c) = cut {
                b.truncate(c);
            }
            b
        })
}

fn limits() -> ParseLimits {
    ParseLimits {
        max_image_pixels: 64,
        max_instruction_bytes: 64,
    }
}

fn check_parse(body: &[u8]) -> Result<(), TestCaseError> {
    match parse_act(body, &limits()) {
        Ok(r) => {
            let (w, h) = r.images[0].1.size();
            prop_assert!(u64::from(w) * u64::from(h) <= 64);
            prop_assert_eq!(r.images[0].1.data().len(), (w * h * 3) as usize);
        }
        Err(e) => {
            prop_assert!(
                [400, 413, 422].contains(&e.status.as_u16()),
                "unexpected status {}",
                e
            );
            prop_assert!(!e.detail.is_empty());
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256), ..ProptestConfig::default() })]

    #[test]
    fn json_numpy_decoder_never_panics(v in numpy_object(), limit in 0u64..200) {
        if let Ok(a) = decode_u8(&v, limit) {
            let n: usize = a.shape.iter().product();
            prop_assert_eq!(a.data.len(), n);
            prop_assert!(n as u64 <= limit);
        }
    }

    #[test]
    fn json_numpy_decoder_round_trips(shape in prop::collection::vec(0usize..5, 0..4), seed in any::<u8>()) {
        let n: usize = shape.iter().product();
        let data: Vec<u8> = (0..n).map(|i| (i as u8).wrapping_mul(seed)).collect();
        let a = decode_u8(&json_numpy::encode_u8(&shape, &data), 1000).unwrap();
        prop_assert_eq!(a.shape, shape);
        prop_assert_eq!(a.data, data);
    }

    #[test]
    fn parser_never_panics_on_bytes(body in prop::collection::vec(any::<u8>(), 0..200)) {
        check_parse(&body)?;
    }

    #[test]
    fn parser_never_panics_on_structured_bodies(v in act_value()) {
        check_parse(v.to_string().as_bytes())?;
    }

    #[test]
    fn parser_never_panics_on_mutated_bodies(body in mutated_body()) {
        check_parse(&body)?;
    }

    #[test]
    fn handler_answers_every_body_with_a_documented_status(
        body in prop_oneof![
            act_value().prop_map(|v| v.to_string().into_bytes()),
            mutated_body(),
            prop::collection::vec(any::<u8>(), 0..100),
        ]
    ) {
        let (status, text) = runtime().block_on(async {
            let req = HttpRequest::post("/act").body(Body::from(body)).unwrap();
            let resp = tower::ServiceExt::oneshot(router(), req).await.unwrap();
            let status = resp.status().as_u16();
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&bytes).into_owned())
        });
        let v: Value = serde_json::from_str(&text).unwrap();
        match status {
            200 => {
                let inner = match &v {
                    Value::String(s) => serde_json::from_str(s).unwrap(),
                    v => v.clone(),
                };
                let a = json_numpy::decode_f64(&inner).unwrap();
                prop_assert!(a.len() == 3 || a.len() == 4);
            }
            400 | 413 | 422 => {
                prop_assert!(v["error"].is_string() && v["detail"].is_string(), "{}", v);
            }
            s => prop_assert!(false, "unexpected status {}: {}", s, v),
        }
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static R: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    R.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

fn router() -> axum::Router {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| {
        let engine: Arc<dyn Engine> = MockEngine::new(Duration::ZERO);
        let cfg = ServerConfig {
            limits: limits(),
            ..ServerConfig::default()
        };
        Server::new(engine, cfg).unwrap()
    })
    .router()
}
