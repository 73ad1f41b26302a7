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
    std::fs::write(dir.path().join("f"), b"x").unwrap();
    assert!(e(&["--out", dir.path().to_str().unwrap()]).contains("not empty"));
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
