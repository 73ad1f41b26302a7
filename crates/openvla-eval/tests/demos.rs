//! `openvla sim demos metaworld` writes a LeRobot v3 dataset that the project's own LeRobot
//! reader (openvla-data) reads back with exactly the frames, states, actions and instructions
//! the simulator produced (lossless video for the exact comparison).

mod common;

use clap::Parser;
use common::require_venv;
use openvla_data::lerobot::LeRobotDataset;
use openvla_eval::demos::{run, DemosArgs};
use serde_json::Value;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    a: DemosArgs,
}

#[test]
fn demo_dataset_reads_back_equal_to_what_the_simulator_produced() {
    require_venv();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demos");
    let raw = dir.path().join("raw");
    let args = Cli::parse_from([
        "x",
        "--tasks",
        "reach,drawer-close",
        "--per-task",
        "2",
        "--out",
        out.to_str().unwrap(),
        "--envs",
        "2",
        "--image-size",
        "64",
        "--lossless",
        "--keep-raw",
        raw.to_str().unwrap(),
    ])
    .a;
    let o = run(&args).unwrap();
    assert_eq!(o.episodes, 4);
    let ds = LeRobotDataset::open(&out).unwrap();
    assert_eq!(ds.info.fps, 80.0);
    assert_eq!(ds.info.total_episodes, 4);
    assert_eq!(ds.info.total_frames, o.frames);
    assert_eq!(ds.info.features["observation.state"].shape, [4]);
    assert_eq!(ds.info.features["observation.environment_state"].shape, [6]);
    assert_eq!(ds.info.features["action"].shape, [4]);
    assert_eq!(ds.info.features["observation.image"].shape, [64, 64, 3]);
    assert_eq!(ds.episodes.len(), 4);
    let data = ds.read_data_file(0, 0).unwrap();
    let instructions = ["Reach a goal position", "Push and close a drawer"];
    for (n, ep) in ds.episodes.iter().enumerate() {
        let sim: Value = serde_json::from_str(
            &std::fs::read_to_string(raw.join(format!("episode-{n}.json"))).unwrap(),
        )
        .unwrap();
        let frames = &data[&ep.episode_index];
        let len = ep.length as usize;
        // The episodes interleave the tasks: reach, drawer-close, reach, drawer-close.
        assert_eq!(ep.tasks, [instructions[n % 2]]);
        assert_eq!(ds.tasks[&frames.task_index[0]], instructions[n % 2]);
        assert!(len > 10 && len < 500, "{len}");
        for (key, col, width) in [
            ("state", "observation.state", 4),
            ("env_state", "observation.environment_state", 6),
            ("action", "action", 4),
        ] {
            let m = &frames.columns[col];
            assert_eq!((m.rows, m.cols), (len, width), "episode {n} {col}");
            let want: Vec<f32> = sim[key]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|r| {
                    r.as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_f64().unwrap() as f32)
                })
                .collect();
            assert_eq!(m.data, want, "episode {n} {col}");
            if key == "action" {
                assert!(m.data.iter().all(|a| (-1.0..=1.0).contains(a)));
            }
        }
        // The environment state is (object xyz, goal xyz): the goal stays put through the
        // episode, and reach succeeds when the hand is within 5 cm of it, so 10 steps after
        // success the hand is still close to the recorded goal.
        let env = &frames.columns["observation.environment_state"];
        let goal = &env.row(0)[3..6];
        assert!(
            (0..len).all(|t| &env.row(t)[3..6] == goal),
            "episode {n}: the goal moves"
        );
        if n % 2 == 0 {
            let hand = &frames.columns["observation.state"].row(len - 1)[..3];
            let d = hand
                .iter()
                .zip(goal)
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f32>()
                .sqrt();
            assert!(
                d < 0.07,
                "episode {n}: reach ends {d} m from the recorded goal"
            );
        }
        // The expert succeeded, and the episode stops 10 steps later.
        let images = ds
            .decode_frames("observation.image", ep, &frames.timestamps)
            .unwrap();
        let produced = std::fs::read(raw.join(format!("episode-{n}.rgb"))).unwrap();
        assert_eq!(produced.len(), len * 64 * 64 * 3);
        for (t, img) in images.iter().enumerate() {
            assert_eq!((img.width, img.height), (64, 64));
            assert!(
                img.data[..] == produced[t * 64 * 64 * 3..(t + 1) * 64 * 64 * 3],
                "episode {n} frame {t} differs from the rendered one"
            );
        }
    }
    let info: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("meta/info.json")).unwrap())
            .unwrap();
    let seeds = info["openvla_sim"]["episode_seeds"].as_array().unwrap();
    assert!(seeds.iter().all(|s| s.as_u64().unwrap() >= 1_000_000_000));
    assert!(out.join("meta/stats.json").is_file());
    assert!(!out.join(".staging").exists());
}

#[test]
fn demo_flags_are_checked() {
    let e = |v: &[&str]| {
        let a = Cli::parse_from(["x"].iter().chain(v)).a;
        run(&a).unwrap_err().to_string()
    };
    let dir = tempfile::tempdir().unwrap();
    let o = dir.path().join("o");
    let o = o.to_str().unwrap();
    assert!(e(&["--tasks", "nope", "--out", o]).contains("unknown Meta-World task"));
    assert!(e(&["--per-task", "0", "--out", o]).contains("--per-task"));
    assert!(e(&["--start-steps", "201", "--out", o]).contains("--start-steps 201"));
    assert!(e(&["--action-noise=-0.1", "--out", o]).contains("--action-noise -0.1"));
    assert!(e(&["--action-noise", "NaN", "--out", o]).contains("--action-noise NaN"));
    std::fs::write(dir.path().join("f"), b"x").unwrap();
    assert!(e(&["--out", dir.path().to_str().unwrap()]).contains("not empty"));
}

/// A recorded episode's rows, each `[frames][width]`, and the dataset's provenance.
struct Demo {
    state: Vec<Vec<f64>>,
    env: Vec<Vec<f64>>,
    action: Vec<Vec<f64>>,
    provenance: Value,
}

/// One reach demo (the task's first seed) recorded with `extra` flags at 32 px, read from the
/// `--keep-raw` copy.
fn reach_demo(extra: &[&str]) -> Demo {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demos");
    let raw = dir.path().join("raw");
    let (out_s, raw_s) = (out.to_str().unwrap(), raw.to_str().unwrap());
    let mut argv = vec!["x", "--tasks", "reach", "--per-task", "1", "--envs", "1"];
    argv.extend(["--image-size", "32", "--out", out_s, "--keep-raw", raw_s]);
    argv.extend(extra);
    run(&Cli::parse_from(argv).a).unwrap();
    let sim: Value =
        serde_json::from_str(&std::fs::read_to_string(raw.join("episode-0.json")).unwrap())
            .unwrap();
    let rows = |key: &str| -> Vec<Vec<f64>> {
        sim[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect()
            })
            .collect()
    };
    let info: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("meta/info.json")).unwrap())
            .unwrap();
    Demo {
        state: rows("state"),
        env: rows("env_state"),
        action: rows("action"),
        provenance: info["openvla_sim"].clone(),
    }
}

#[test]
fn random_starts_and_action_noise_keep_the_experts_labels() {
    require_venv();
    let dist = |a: &[f64], b: &[f64]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y) * (x - y))
            .sum::<f64>()
            .sqrt()
    };
    // reach's expert: xyz = clip(5 (goal - hand), -1, 1), gripper effort 0.
    let expert = |state: &[f64], env: &[f64]| -> Vec<f64> {
        (0..3)
            .map(|i| (5.0 * (env[3 + i] - state[i])).clamp(-1.0, 1.0))
            .chain([0.0])
            .collect()
    };
    // Every recorded action is the expert's at its frame.
    let clean_labels = |name: &str, d: &Demo| {
        for (t, a) in d.action.iter().enumerate() {
            let want = expert(&d.state[t], &d.env[t]);
            assert!(
                dist(a, &want) < 1e-3,
                "{name}: frame {t} records {a:?}, the expert's action is {want:?}"
            );
        }
    };
    let plain = reach_demo(&[]);
    let noisy = reach_demo(&["--action-noise", "0.5"]);
    let moved = reach_demo(&["--start-steps", "25"]);
    // The same seed: the same goal, recorded as such.
    assert_eq!(plain.env[0][3..6], noisy.env[0][3..6]);
    assert_eq!(plain.env[0][3..6], moved.env[0][3..6]);
    let p = &plain.provenance;
    assert_eq!(
        (p["start_steps"].as_u64(), p["action_noise"].as_f64()),
        (Some(0), Some(0.0))
    );
    assert_eq!(noisy.provenance["action_noise"].as_f64(), Some(0.5));
    assert_eq!(moved.provenance["start_steps"].as_u64(), Some(25));
    // Noise only: the same start and first label, then the executed (noisy) action moves the
    // hand elsewhere, while every recorded action stays the expert's at its frame.
    assert!(dist(&plain.state[0], &noisy.state[0]) < 1e-9);
    assert_eq!(plain.action[0], noisy.action[0]);
    assert!(
        dist(&plain.state[3][..3], &noisy.state[3][..3]) > 1e-3,
        "the noise did not move the hand: {:?} vs {:?}",
        plain.state[3],
        noisy.state[3]
    );
    clean_labels("plain", &plain);
    clean_labels("noisy", &noisy);
    // Random start: the first recorded frame is away from the fixed start.
    let d = dist(&plain.state[0][..3], &moved.state[0][..3]);
    assert!(d > 0.01, "the random start moved the hand {d} m");
    clean_labels("random start", &moved);
}

#[test]
fn resume_keeps_finished_attempts_and_records_only_the_missing_ones() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demos");
    let args = |extra: &[&str]| {
        let mut v = vec![
            "x",
            "--tasks",
            "reach",
            "--per-task",
            "1",
            "--image-size",
            "64",
            "--envs",
            "1",
            "--out",
            out.to_str().unwrap(),
        ];
        v.extend_from_slice(extra);
        Cli::parse_from(v).a
    };
    // Nothing to resume: a clear error, nothing written.
    let e = run(&args(&["--resume"])).unwrap_err().to_string();
    assert!(e.contains("no readable"), "{e}");
    // An interrupted run whose attempt 0 failed (journal written by the run itself).
    let staging = out.join(".staging");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::write(
        staging.join("run.json"),
        r#"{"tasks":"reach","per_task":1,"image_size":64,"extra_steps":10,"lossless":false}"#,
    )
    .unwrap();
    std::fs::write(
        staging.join("journal.jsonl"),
        "{\"task\":\"reach-v3\",\"attempt\":0,\"success\":false,\"answer\":{}}\n{\"task\":",
    )
    .unwrap();
    // Other flags than the interrupted run's are refused.
    let e = run(&Cli::parse_from([
        "x",
        "--tasks",
        "reach",
        "--per-task",
        "2",
        "--image-size",
        "64",
        "--out",
        out.to_str().unwrap(),
        "--resume",
    ])
    .a)
    .unwrap_err()
    .to_string();
    assert!(e.contains("used"), "{e}");
    // Without --resume the directory is not overwritten.
    assert!(run(&args(&[]))
        .unwrap_err()
        .to_string()
        .contains("--resume"));
    require_venv();
    let o = run(&args(&["--resume"])).unwrap();
    assert_eq!(o.episodes, 1);
    assert_eq!(o.dropped, vec![("reach-v3".to_string(), 1)]);
    let info: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("meta/info.json")).unwrap())
            .unwrap();
    // Attempt 0 was not recorded again: the one episode is attempt 1's seed.
    let seeds = info["openvla_sim"]["episode_seeds"].as_array().unwrap();
    assert_eq!(seeds.len(), 1);
    assert_eq!(seeds[0].as_u64().unwrap() % 1_000_000, 1);
}
