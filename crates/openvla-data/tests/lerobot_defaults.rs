//! LeRobot v3 without a config file: the standardization comes from `meta/info.json` with
//! LeRobot's conventions, and small datasets stream without being re-read pass after pass.
//! Needs the system `ffmpeg` (tools/setup.sh); without it these tests fail with the install
//! hint, they do not skip.

#![cfg(feature = "lerobot")]

use std::path::{Path, PathBuf};

use openvla_data::lerobot::LeRobotDataset;
use openvla_data::oxe::configs::{ActionEncoding, GripperConvention};
use openvla_data::source::DatasetSource;
use openvla_data::stream::{effective_shuffle_buffer, stream, StreamConfig, StreamDataset};

fn tiny_libero() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/data/lerobot/tiny_libero")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).unwrap();
        }
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ovd-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn info_json_gives_the_config() {
    let src = DatasetSource::open(&tiny_libero(), None, None).unwrap();
    let c = &src.config;
    assert_eq!(c.name, "tiny_libero");
    assert_eq!(c.image_key, "observation.images.image");
    assert_eq!(c.wrist_image_key, None);
    assert_eq!(c.state_key.as_deref(), Some("observation.state"));
    assert_eq!(c.language_key, "task");
    assert_eq!(c.action_keys, vec!["action".to_string()]);
    assert_eq!(c.gripper, GripperConvention::AsIs);
    assert_eq!(c.action_encoding, ActionEncoding::Raw(7));
    // Every dimension is normalized in the dataset's own action space.
    assert_eq!(c.action_encoding.normalization_mask(), vec![true; 7]);

    // Actions come out exactly as stored (no gripper mapping, no no-op filter).
    let ds = LeRobotDataset::open(&tiny_libero()).unwrap();
    let stored = ds.read_data_file(0, 0).unwrap();
    let trajs: Vec<_> = src
        .trajectories("all", false, None)
        .unwrap()
        .map(|t| t.unwrap())
        .collect();
    assert_eq!(trajs.len(), ds.episodes.len());
    for t in &trajs {
        let raw = &stored[&(t.episode_index as i64)].columns["action"];
        assert_eq!(t.actions.data, raw.data, "episode {}", t.episode_index);
        let state = t.proprio.as_ref().expect("observation.state is read");
        assert_eq!(state.cols, 8);
        assert_eq!(state.rows, t.len());
    }
}

#[test]
fn a_config_file_still_wins() {
    let cfg = tiny_libero().join("../../lerobot_libero.toml");
    let src = DatasetSource::open(&tiny_libero(), None, Some(&cfg)).unwrap();
    assert_eq!(src.config.gripper, GripperConvention::Libero);
    assert_eq!(src.config.action_encoding, ActionEncoding::EefPos);
}

#[test]
fn info_json_without_action_or_camera_is_a_clear_error() {
    for (tag, drop, want) in [
        ("noact", "action", "no `action` feature"),
        ("nocam", "observation.images.image", "no camera feature"),
    ] {
        let root = temp_dir(tag);
        copy_dir(&tiny_libero(), &root);
        let info_path = root.join("meta/info.json");
        let mut info: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&info_path).unwrap()).unwrap();
        info["features"].as_object_mut().unwrap().remove(drop);
        std::fs::write(&info_path, info.to_string()).unwrap();
        let err = DatasetSource::open(&root, None, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{err}");
        assert!(err.contains("info.json"), "names the file: {err}");
        assert!(
            err.contains("--dataset-config"),
            "says how to fix it: {err}"
        );
        std::fs::remove_dir_all(&root).ok();
    }
}

#[test]
fn shuffle_buffer_is_clamped_to_one_pass() {
    let src = DatasetSource::open(&tiny_libero(), None, None).unwrap();
    let frames = src.num_frames("all").unwrap().unwrap();
    assert_eq!(frames, 36);
    let ds = vec![StreamDataset {
        source: src,
        split: "all".into(),
        weight: 1.0,
        statistics: None,
    }];
    assert_eq!(effective_shuffle_buffer(&ds, 100_000), 36);
    assert_eq!(effective_shuffle_buffer(&ds, 16), 16);
}

/// Pulls `n` samples, returning (episode, step) pairs.
fn pull(s: &mut openvla_data::stream::FrameStream, n: usize) -> Vec<(u64, usize)> {
    (0..n)
        .map(|_| {
            let x = s.next().expect("stream ended").expect("sample");
            (x.episode_index, x.step)
        })
        .collect()
}

#[test]
fn later_passes_replay_from_memory() {
    // Copy the dataset, read one pass, then delete its videos: the following passes must
    // still stream (from the replay cache), identically to the first.
    let root = temp_dir("replay");
    copy_dir(&tiny_libero(), &root);
    let src = DatasetSource::open(&root, None, None).unwrap();
    let cfg = StreamConfig {
        shuffle_buffer: 1,
        prefetch: 4,
        augment: None,
        ..StreamConfig::default()
    };
    let ds = || StreamDataset {
        source: src.clone(),
        split: "all".into(),
        weight: 1.0,
        statistics: None,
    };
    let mut s = stream(vec![ds()], cfg.clone()).unwrap();
    let first = pull(&mut s, 36);
    std::fs::remove_dir_all(root.join("videos")).unwrap();
    for pass in 0..3 {
        assert_eq!(pull(&mut s, 36), first, "pass {} from memory", pass + 2);
    }
    drop(s);

    // Without the cache the second pass needs the videos again, and says which file is gone.
    copy_dir(&tiny_libero(), &root);
    let mut s = stream(
        vec![ds()],
        StreamConfig {
            replay_cache_bytes: 0,
            ..cfg
        },
    )
    .unwrap();
    assert_eq!(pull(&mut s, 36), first);
    std::fs::remove_dir_all(root.join("videos")).unwrap();
    let err = (0..36 + 8)
        .find_map(|_| s.next().and_then(|r| r.err()))
        .expect("a re-read without videos fails");
    assert!(err.to_string().contains("video"), "{err}");
    std::fs::remove_dir_all(&root).ok();
}

fn all_samples(
    src: &DatasetSource,
    cfg: StreamConfig,
    stats: Option<openvla_data::stats::DatasetStatistics>,
) -> Vec<openvla_data::stream::Sample> {
    let s = stream(
        vec![StreamDataset {
            source: src.clone(),
            split: "all".into(),
            weight: 1.0,
            statistics: stats,
        }],
        StreamConfig {
            shuffle_buffer: 1,
            repeat: false,
            augment: None,
            ..cfg
        },
    )
    .unwrap();
    s.map(|x| x.unwrap()).collect()
}

#[test]
fn action_chunks_follow_the_reference_rule() {
    // OFT's chunk_act_obs: the chunk is the current action and the next K-1 of the episode;
    // frames whose chunk would run past the end are not sampled.
    let src = DatasetSource::open(&tiny_libero(), None, None).unwrap();
    let trajs: Vec<_> = src
        .trajectories("all", false, None)
        .unwrap()
        .map(|t| t.unwrap())
        .collect();
    let k = 3;
    let samples = all_samples(
        &src,
        StreamConfig {
            action_chunk: k,
            ..StreamConfig::default()
        },
        None,
    );
    let want: usize = trajs.iter().map(|t| t.len().saturating_sub(k - 1)).sum();
    assert_eq!(samples.len(), want);
    for s in &samples {
        let t = trajs
            .iter()
            .find(|t| t.episode_index == s.episode_index)
            .unwrap();
        assert!(
            s.step + k <= t.len(),
            "episode {} step {}",
            s.episode_index,
            s.step
        );
        assert_eq!(s.action_chunk.len(), k);
        assert_eq!(s.action, s.action_chunk[0]);
        for (j, row) in s.action_chunk.iter().enumerate() {
            assert_eq!(row.as_slice(), t.actions.row(s.step + j));
        }
        assert!(s.proprio.is_none() && s.wrist_image.is_none());
    }
}

#[test]
fn proprio_is_normalized_with_its_own_statistics() {
    use openvla_data::normalize::{normalize_bounds, Normalization};
    use openvla_data::stats::StatsAccumulator;
    let src = DatasetSource::open(&tiny_libero(), None, None).unwrap();
    let st = src
        .compute_statistics(
            "all",
            false,
            None,
            None,
            StatsAccumulator::new().with_proprio(),
        )
        .unwrap();
    let p = st.proprio.clone().unwrap();
    assert_eq!(p.q01.len(), 8, "proprio stats have the state's 8 dims");
    assert!(
        p.max.iter().zip(&p.min).any(|(a, b)| a > b),
        "real statistics, not zeros"
    );
    let plain = src
        .compute_statistics("all", false, None, None, StatsAccumulator::new())
        .unwrap();
    assert!(plain.proprio.unwrap().max.iter().all(|&x| x == 0.0));

    let trajs: Vec<_> = src
        .trajectories("all", false, None)
        .unwrap()
        .map(|t| t.unwrap())
        .collect();
    for kind in [Normalization::BoundsQ99, Normalization::Bounds] {
        let samples = all_samples(
            &src,
            StreamConfig {
                proprio: true,
                normalization: kind,
                ..StreamConfig::default()
            },
            Some(st.clone()),
        );
        assert_eq!(samples.len(), 36);
        for s in &samples {
            let t = trajs
                .iter()
                .find(|t| t.episode_index == s.episode_index)
                .unwrap();
            let mut want = t.proprio.as_ref().unwrap().row(s.step).to_vec();
            normalize_bounds(&mut want, &p, kind);
            assert_eq!(s.proprio.as_deref(), Some(want.as_slice()));
            let mut a = t.actions.row(s.step).to_vec();
            normalize_bounds(&mut a, &st.action, kind);
            assert_eq!(s.action, a);
        }
    }

    // Proprio without proprio statistics is an error naming the fix.
    let err = first_error(
        src.clone(),
        plain_stats(&src),
        StreamConfig {
            proprio: true,
            ..StreamConfig::default()
        },
    );
    assert!(err.contains("openvla stats --proprio"), "{err}");
}

/// The error of a stream's first item, read once over `src` with `stats`.
fn first_error(
    src: DatasetSource,
    stats: openvla_data::stats::DatasetStatistics,
    cfg: StreamConfig,
) -> String {
    let mut s = stream(
        vec![StreamDataset {
            source: src,
            split: "all".into(),
            weight: 1.0,
            statistics: Some(stats),
        }],
        StreamConfig {
            repeat: false,
            ..cfg
        },
    )
    .unwrap();
    s.next().unwrap().unwrap_err().to_string()
}

fn plain_stats(src: &DatasetSource) -> openvla_data::stats::DatasetStatistics {
    src.compute_statistics(
        "all",
        false,
        None,
        None,
        openvla_data::stats::StatsAccumulator::new(),
    )
    .unwrap()
}

#[test]
fn wrist_camera_is_an_error_when_the_config_has_none() {
    let src = DatasetSource::open(&tiny_libero(), None, None).unwrap();
    let mut s = stream(
        vec![StreamDataset {
            source: src,
            split: "all".into(),
            weight: 1.0,
            statistics: None,
        }],
        StreamConfig {
            wrist: true,
            repeat: false,
            ..StreamConfig::default()
        },
    )
    .unwrap();
    let err = s.next().unwrap().unwrap_err().to_string();
    assert!(err.contains("wrist_image_key"), "{err}");
}

/// Two reach and two push demonstrations from `openvla sim demos metaworld --image-size 64`,
/// with LeRobot's `observation.environment_state` (object and goal positions).
fn metaworld_env() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/data/lerobot/metaworld_env")
}

#[test]
fn environment_state_is_read_counted_and_streamed_normalized() {
    use openvla_data::normalize::{normalize_bounds, Normalization};
    use openvla_data::stats::StatsAccumulator;
    let src = DatasetSource::open(&metaworld_env(), None, None).unwrap();
    assert_eq!(src.environment_state_dim(), Some(6));
    let trajs: Vec<_> = src
        .trajectories("all", false, None)
        .unwrap()
        .map(|t| t.unwrap())
        .collect();
    assert_eq!(trajs.len(), 4);
    for t in &trajs {
        let e = t.environment_state.as_ref().expect("every episode has it");
        assert_eq!((e.rows, e.cols), (t.len(), 6));
        // The goal (columns 3..6) stays put through an episode.
        assert!((0..e.rows).all(|i| e.row(i)[3..] == e.row(0)[3..]));
    }
    // The two reach episodes have different goals.
    assert_ne!(
        trajs[0].environment_state.as_ref().unwrap().row(0)[3..],
        trajs[2].environment_state.as_ref().unwrap().row(0)[3..]
    );
    let st = src
        .compute_statistics("all", false, None, None, StatsAccumulator::new())
        .unwrap();
    let e = st
        .environment_state
        .clone()
        .expect("statistics of the column");
    assert_eq!(e.q01.len(), 6);
    assert!(e.max.iter().zip(&e.min).any(|(a, b)| a > b), "{e:?}");
    let samples = all_samples(
        &src,
        StreamConfig {
            environment_state: true,
            ..StreamConfig::default()
        },
        Some(st.clone()),
    );
    assert_eq!(samples.len(), trajs.iter().map(|t| t.len()).sum::<usize>());
    for s in &samples {
        let t = trajs
            .iter()
            .find(|t| t.episode_index == s.episode_index)
            .unwrap();
        let mut want = t.environment_state.as_ref().unwrap().row(s.step).to_vec();
        normalize_bounds(&mut want, &e, Normalization::BoundsQ99);
        assert_eq!(s.environment_state.as_deref(), Some(want.as_slice()));
    }
    // Not asked for: not delivered.
    let plain = all_samples(&src, StreamConfig::default(), Some(st.clone()));
    assert!(plain.iter().all(|s| s.environment_state.is_none()));
    // Statistics without the entry (written before it existed) are an error naming the fix.
    let mut old = st;
    old.environment_state = None;
    let err = first_error(
        src,
        old,
        StreamConfig {
            environment_state: true,
            ..StreamConfig::default()
        },
    );
    assert!(
        err.contains("environment_state") && err.contains("openvla stats"),
        "{err}"
    );
}

#[test]
fn environment_state_is_an_error_when_the_dataset_has_none() {
    let src = DatasetSource::open(&tiny_libero(), None, None).unwrap();
    assert_eq!(src.environment_state_dim(), None);
    let st = plain_stats(&src);
    assert!(st.environment_state.is_none());
    let err = first_error(
        src,
        st,
        StreamConfig {
            environment_state: true,
            ..StreamConfig::default()
        },
    );
    assert!(
        err.contains("observation.environment_state") && err.contains("has no environment state"),
        "{err}"
    );
}
