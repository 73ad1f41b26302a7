//! The wrist camera (OFT's second image) from an RLDS dataset whose config names one: the
//! LIBERO test data, written by the real TFDS builder.

use std::path::Path;

use openvla_data::source::DatasetSource;
use openvla_data::stream::{stream, StreamConfig, StreamDataset};

#[test]
fn wrist_images_come_with_the_primary_ones() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/data/rlds");
    let src = DatasetSource::open(&data, Some("libero_spatial_no_noops"), None).unwrap();
    assert_eq!(
        src.config.wrist_image_key.as_deref(),
        Some("observation/wrist_image")
    );
    // Trajectories carry the wrist camera only when asked.
    let plain = src
        .trajectories("train", false, None)
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    assert!(plain.wrist_images.is_none());
    let mut with = src.clone();
    with.load_wrist = true;
    let t = with
        .trajectories("train", false, None)
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let w = t.wrist_images.as_ref().expect("wrist images loaded");
    assert_eq!(w.len(), t.len());
    assert_ne!(w, &t.images, "the wrist camera is not the primary one");

    let samples: Vec<_> = stream(
        vec![StreamDataset {
            source: src,
            split: "train".into(),
            weight: 1.0,
            statistics: None,
        }],
        StreamConfig {
            wrist: true,
            shuffle_buffer: 1,
            repeat: false,
            augment: None,
            image_size: Some((32, 24)),
            ..StreamConfig::default()
        },
    )
    .unwrap()
    .take(5)
    .map(|s| s.unwrap())
    .collect();
    assert_eq!(samples.len(), 5);
    for s in &samples {
        let wi = s.wrist_image.as_ref().expect("wrist image in the sample");
        assert_eq!((wi.width, wi.height), (32, 24), "resized like the primary");
        assert_eq!((s.image.width, s.image.height), (32, 24));
    }
}
