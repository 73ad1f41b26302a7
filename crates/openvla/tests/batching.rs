//! Batched prediction gives every request exactly what it gets alone.

use openvla::{LoadOptions, Observation, Policy, Precision, Request};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn request(image: &str, instruction: &str, key: Option<&str>) -> Request {
    Request {
        observation: Observation::new(
            openvla_image::open(&root().join(image)).unwrap(),
            instruction,
        ),
        unnorm_key: key.map(str::to_string),
    }
}

fn mixed_requests() -> Vec<Request> {
    vec![
        // Different prompt lengths, unnorm keys with 7-D and 4-D actions, and a 100+ token one.
        request(
            "testdata/openvla-tiny/s0_image.png",
            "pick up the red block",
            Some("fake_bridge_orig"),
        ),
        request(
            "testdata/openvla-tiny/s2_image.png",
            "open the top drawer of the cabinet",
            Some("fake_nomask_4d"),
        ),
        request(
            "testdata/ref-odd-inputs/s3_image.jpg",
            &"move the cup slowly to the left ".repeat(15),
            Some("fake_libero_spatial"),
        ),
        request(
            "testdata/openvla-tiny/s1_image.png",
            "Put the Carrot in the Bowl",
            Some("fake_libero_spatial"),
        ),
        request(
            "testdata/openvla-tiny/s3_image.png",
            "wipe",
            Some("fake_nomask_4d"),
        ),
    ]
}

fn check(precision: Precision) {
    let policy = Policy::load(
        &root().join("models/openvla-tiny"),
        &LoadOptions {
            precision,
            progress: None,
            ..Default::default()
        },
    )
    .unwrap();
    let requests = mixed_requests();
    let alone: Vec<_> = requests
        .iter()
        .map(|r| {
            policy
                .trace(&r.observation, r.unnorm_key.as_deref())
                .unwrap()
        })
        .collect();
    let batched = policy.trace_batch(&requests).unwrap();
    assert_eq!(batched.len(), requests.len());
    for (i, (a, b)) in alone.iter().zip(batched).enumerate() {
        let b = b.unwrap();
        assert_eq!(
            a.prediction, b.prediction,
            "request {i}: prediction differs when batched"
        );
        assert_eq!(
            a.generation.step_logits, b.generation.step_logits,
            "request {i}: logits differ when batched"
        );
        assert_eq!(
            a.prediction.token_ids.len(),
            if i == 1 || i == 4 { 4 } else { 7 }
        );
    }
}

#[test]
fn batched_equals_alone_f32() {
    check(Precision::F32);
}

#[test]
fn batched_equals_alone_bf16() {
    check(Precision::Bf16);
}

#[test]
fn a_bad_request_does_not_disturb_the_batch() {
    let policy =
        Policy::load(&root().join("models/openvla-tiny"), &LoadOptions::default()).unwrap();
    let mut requests = mixed_requests();
    let good = policy.predict_batch(&requests);
    requests.insert(
        1,
        request(
            "testdata/openvla-tiny/s0_image.png",
            "pick",
            Some("no_such_key"),
        ),
    );
    requests.insert(
        3,
        request(
            "testdata/openvla-tiny/s0_image.png",
            " ",
            Some("fake_bridge_orig"),
        ),
    );
    let out = policy.predict_batch(&requests);
    assert_eq!(out.len(), 7);
    assert!(out[1]
        .as_ref()
        .unwrap_err()
        .to_string()
        .contains("no_such_key"));
    assert!(out[3]
        .as_ref()
        .unwrap_err()
        .to_string()
        .contains("instruction is empty"));
    let rest: Vec<_> = out
        .into_iter()
        .enumerate()
        .filter(|(i, _)| *i != 1 && *i != 3)
        .map(|(_, r)| r.unwrap())
        .collect();
    let good: Vec<_> = good.into_iter().map(|r| r.unwrap()).collect();
    assert_eq!(rest, good);
}
