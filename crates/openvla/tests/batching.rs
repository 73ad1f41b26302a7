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

fn tiny(precision: Precision) -> Policy {
    Policy::load(
        &root().join("models/openvla-tiny"),
        &LoadOptions {
            precision,
            progress: None,
            ..Default::default()
        },
    )
    .unwrap()
}

fn bits(t: &candle_core::Tensor) -> Vec<u32> {
    t.to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

/// The packed prefill of several sequences gives each one exactly the hidden states of its own
/// plain `forward` on an empty cache, and a cache from which the next step decodes the same.
#[test]
fn packed_prefill_equals_each_sequence_alone() {
    use candle_core::{Device, Tensor};
    use openvla::model::llama::KvCache;
    for precision in [Precision::F32, Precision::Bf16] {
        let policy = tiny(precision);
        let llm = &policy.model().llm;
        let d = llm.config().hidden_size;
        let lens = [5usize, 83, 17, 2];
        let seqs: Vec<Tensor> = lens
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                let v: Vec<f32> = (0..t * d)
                    .map(|j| ((j * 7 + i * 13) % 29) as f32 / 29.0 - 0.5)
                    .collect();
                Tensor::from_vec(v, (1, t, d), &Device::Cpu).unwrap()
            })
            .collect();
        let parts: Vec<&Tensor> = seqs.iter().collect();
        // The short sequences (5 and 2 positions) run alone; 83 and 17 share a pack.
        let groups = openvla::model::llama::packs(&lens, 4096);
        assert_eq!(groups, vec![0..1, 1..3, 3..4]);
        for pack in groups {
            let group_lens = &lens[pack.clone()];
            let (packed, mut cache) = llm
                .prefill_packed(&Tensor::cat(&parts[pack.clone()], 1).unwrap(), group_lens)
                .unwrap();
            assert_eq!(cache.rows(), group_lens.len());
            let step: Vec<Tensor> = pack
                .clone()
                .map(|i| llm.embed(&[100 + i as u32]).unwrap())
                .collect();
            let batched_next = llm
                .forward(&Tensor::cat(&step, 0).unwrap(), &mut cache)
                .unwrap();
            let mut start = 0;
            for (j, i) in pack.enumerate() {
                let (x, len) = (&seqs[i], lens[i]);
                let mut alone = KvCache::new(1);
                let want = llm.forward(x, &mut alone).unwrap();
                let got = packed.narrow(1, start, len).unwrap();
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "{precision:?}: sequence {i} ({len} positions): prefill hidden states differ when packed"
                );
                assert_eq!(cache.len(j), len + 1);
                let next = llm.forward(&step[j], &mut alone).unwrap();
                assert_eq!(
                    bits(&batched_next.narrow(0, j, 1).unwrap()),
                    bits(&next),
                    "{precision:?}: sequence {i}: the decode step after a packed prefill differs"
                );
                start += len;
            }
        }
        // A length that does not fill the packed positions is refused, not misread.
        let e = llm
            .prefill_packed(&Tensor::cat(&parts, 1).unwrap(), &[5, 83, 17])
            .unwrap_err()
            .to_string();
        assert!(e.contains("do not fill"), "{e}");
    }
}

/// The towers of several images stacked into one pass give each image the features it gets
/// alone, bit for bit.
#[test]
fn stacked_vision_equals_each_image_alone() {
    for precision in [Precision::F32, Precision::Bf16] {
        let policy = tiny(precision);
        let requests = mixed_requests();
        let pixels: Vec<candle_core::Tensor> = requests
            .iter()
            .map(|r| policy.preprocess_image(&r.observation.images[0].1).unwrap())
            .collect();
        let refs: Vec<&candle_core::Tensor> = pixels.iter().collect();
        // 16 x 16 patches per tower: the images really run as one stacked pass.
        assert!(openvla::kernels::stacks_bit_exactly(
            policy.config().num_patches()
        ));
        let vision = &policy.model().vision;
        let stacked = vision.forward_stacked(&refs, None).unwrap();
        assert_eq!(stacked.len(), pixels.len());
        for (i, (p, s)) in pixels.iter().zip(&stacked).enumerate() {
            let alone = vision.forward(p).unwrap();
            assert_eq!(s.per_tower.len(), alone.per_tower.len());
            for (t, (a, b)) in alone.per_tower.iter().zip(&s.per_tower).enumerate() {
                assert_eq!(
                    bits(a),
                    bits(b),
                    "{precision:?}: image {i}, tower {t}: features differ when stacked"
                );
            }
            assert_eq!(
                bits(&alone.fused),
                bits(&s.fused),
                "{precision:?}: image {i}"
            );
        }
    }
}
