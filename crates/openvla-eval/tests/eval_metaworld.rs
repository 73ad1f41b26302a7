//! `openvla eval metaworld` end to end against real Meta-World workers (the project venv):
//! the scripted experts over HTTP, seeding, policy failures and bad flags.

mod common;

use common::{eval_args, fake_server, no_stop, require_venv, ActReply};
use openvla_eval::metaworld::run_with_stop;
use openvla_eval::worker::{PythonEnv, Worker};
use serde_json::{json, Value};
use std::time::Duration;

#[test]
fn experts_over_http_succeed_and_results_json_records_the_run() {
    require_venv();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out_s = out.to_str().unwrap();
    let args = [
        "--policy",
        "expert",
        "--tasks",
        "reach,button-press-topdown",
        "--episodes",
        "2",
        "--envs",
        "2",
        "--out",
        out_s,
    ];
    let o = run_with_stop(&eval_args(&args), no_stop()).unwrap();
    assert!(o.complete);
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(r, o.results.as_object().map(|_| r.clone()).unwrap());
    for task in ["reach-v3", "button-press-topdown-v3"] {
        let t = &r["tasks"][task];
        assert_eq!(t["episodes"], 2, "{t}");
        assert_eq!(t["successes"], 2, "the scripted expert failed {task}: {t}");
        assert_eq!(t["group"], "easy");
        let steps = t["steps_to_success"]["mean"].as_f64().unwrap();
        assert!(steps > 5.0 && steps < 500.0, "{steps}");
        assert!(t["policy_latency_ms"]["p50"].as_f64().unwrap() > 0.0);
        assert!(t["env_steps_per_s"].as_f64().unwrap() > 0.0);
        let lo = t["wilson95"][0].as_f64().unwrap();
        assert!(lo > 0.3 && lo < 0.5, "Wilson lower bound of 2/2: {lo}");
        assert!(
            out.join(format!("videos/{task}-ep000.mp4"))
                .metadata()
                .unwrap()
                .len()
                > 1000
        );
        assert!(
            out.join(format!("videos/{task}-ep000.png"))
                .metadata()
                .unwrap()
                .len()
                > 1000
        );
        assert!(!out.join(format!("videos/{task}-ep001.mp4")).exists());
    }
    assert_eq!(r["episode_weighted_mean"]["success_rate"], 1.0);
    assert_eq!(r["macro_mean"]["success_rate"], 1.0);
    assert_eq!(r["groups"]["easy"]["episodes"], 4);
    assert_eq!(r["config"]["protocol"], "lerobot");
    assert_eq!(r["config"]["image_size"], 224);
    assert_eq!(r["policy"]["metadata"]["variant"], "metaworld-expert");
    assert_eq!(r["policy"]["inputs"]["proprio_dim"], 4);
    assert_eq!(r["versions"]["metaworld"], "3.1.1");
    assert_eq!(r["versions"]["mujoco"], "3.3.0");
    assert_eq!(r["seeds"]["first"], 1000);
    let eps = r["episodes"].as_array().unwrap();
    assert_eq!(eps.len(), 4);
    let seeds: Vec<u64> = eps.iter().map(|e| e["seed"].as_u64().unwrap()).collect();
    assert_eq!(seeds, [1000, 1001, 1000, 1001]);
    assert!(eps
        .iter()
        .all(|e| e["error"].is_null() && e["retries"] == 0));
    assert_eq!(
        r["server_batch_sizes"]["1"].as_u64().unwrap(),
        r["policy_latency_ms"]["requests"].as_u64().unwrap()
    );
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(md.contains("| reach-v3 | easy | 2/2 | 100.0 ["), "{md}");
    assert!(md.contains("episode-weighted mean"), "{md}");
    assert!(out.join("success.png").metadata().unwrap().len() > 1000);

    // A finished run resumes to nothing new; without --resume the directory is refused.
    let lines = || {
        std::fs::read_to_string(out.join("episodes.jsonl"))
            .unwrap()
            .lines()
            .count()
    };
    assert_eq!(lines(), 4);
    let mut again: Vec<&str> = args.to_vec();
    again.push("--resume");
    let o2 = run_with_stop(&eval_args(&again), no_stop()).unwrap();
    assert!(o2.complete);
    assert_eq!(lines(), 4);
    assert_eq!(o2.results["episodes_done"], 4);
    let e = run_with_stop(&eval_args(&args), no_stop())
        .unwrap_err()
        .to_string();
    assert!(e.contains("--resume"), "{e}");
    // --resume with another configuration is refused.
    let mut other = again.clone();
    other.extend(["--seed", "2000"]);
    let e = run_with_stop(&eval_args(&other), no_stop())
        .unwrap_err()
        .to_string();
    assert!(e.contains("seed differs"), "{e}");
}

#[test]
fn same_seeds_give_the_same_initial_states() {
    require_venv();
    let env = PythonEnv::discover().unwrap();
    let t = Duration::from_secs(300);
    let mut a = Worker::spawn(&env, t).unwrap();
    let mut b = Worker::spawn(&env, t).unwrap();
    let init = |w: &mut Worker, task: &str, protocol: &str, index: u64, seed: u64| {
        let v = w
            .call(
                &json!({"op": "initial_state", "task": task, "protocol": protocol,
                        "index": index, "seed": seed, "image_size": 64}),
                t,
            )
            .unwrap();
        (v["obs"].clone(), v["rand_vec"].clone())
    };
    let x = init(&mut a, "pick-place-v3", "lerobot", 0, 1000);
    // Another process, and the same process after other episodes.
    assert_eq!(init(&mut b, "pick-place-v3", "lerobot", 0, 1000), x);
    let y = init(&mut a, "pick-place-v3", "lerobot", 1, 1001);
    assert_ne!(y, x, "another seed must move the object or goal");
    assert_eq!(init(&mut a, "pick-place-v3", "lerobot", 0, 1000), x);
    assert_eq!(x.0.as_array().unwrap().len(), 39);
    // The benchmark's fixed goals: episode i is goal i whatever the seed.
    let g0 = init(&mut a, "pick-place-v3", "metaworld", 0, 1000);
    assert_eq!(init(&mut b, "pick-place-v3", "metaworld", 0, 5), g0);
    assert_ne!(init(&mut b, "pick-place-v3", "metaworld", 1, 1001).1, g0.1);
}

#[test]
fn a_failing_policy_fails_its_episodes_with_the_reason() {
    require_venv();
    let meta = json!({"variant": "openvla", "action_dims": {"metaworld": 4}});
    let url = fake_server(meta.clone(), ActReply::Error500);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("err");
    let o = run_with_stop(
        &eval_args(&[
            "--url",
            &url,
            "--tasks",
            "reach",
            "--episodes",
            "2",
            "--envs",
            "1",
            "--out",
            out.to_str().unwrap(),
            "--videos",
            "0",
        ]),
        no_stop(),
    )
    .unwrap();
    assert!(o.complete);
    let t = &o.results["tasks"]["reach-v3"];
    assert_eq!(t["successes"], 0);
    for e in o.results["episodes"].as_array().unwrap() {
        let err = e["error"].as_str().unwrap();
        assert!(
            err.contains("HTTP 500") && err.contains("the model failed"),
            "{err}"
        );
        assert_eq!(e["steps"], 0);
    }
    assert_eq!(o.results["episodes_with_errors"], 2);

    // A policy that never answers: the episode fails on the timeout, the run does not hang.
    let url = fake_server(meta, ActReply::Hang);
    let out = dir.path().join("hang");
    let o = run_with_stop(
        &eval_args(&[
            "--url",
            &url,
            "--tasks",
            "reach",
            "--episodes",
            "1",
            "--envs",
            "1",
            "--out",
            out.to_str().unwrap(),
            "--policy-timeout-s",
            "1",
            "--videos",
            "0",
        ]),
        no_stop(),
    )
    .unwrap();
    let err = o.results["episodes"][0]["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(err.contains("timeout"), "{err}");
}

#[test]
fn a_model_with_another_action_dimension_is_refused_before_any_worker_starts() {
    require_venv();
    let url = fake_server(
        json!({"action_dims": {"bridge_orig": 7}}),
        ActReply::Error500,
    );
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("dim");
    let e = run_with_stop(
        &eval_args(&[
            "--url",
            &url,
            "--tasks",
            "reach",
            "--out",
            out.to_str().unwrap(),
        ]),
        no_stop(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("bridge_orig: 7") && e.contains("Meta-World takes 4"),
        "{e}"
    );
    assert!(!out.join("episodes.jsonl").exists());
    // The shipped tiny model: one of its datasets has 4-D actions, chosen without a flag; asking
    // for a 7-D one is refused.
    let tiny = common::root().join("models/openvla-tiny");
    let e = run_with_stop(
        &eval_args(&[
            "--model",
            tiny.to_str().unwrap(),
            "--unnorm-key",
            "fake_bridge_orig",
            "--tasks",
            "reach",
            "--out",
            dir.path().join("tiny").to_str().unwrap(),
        ]),
        no_stop(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("action dimension 7"), "{e}");
}

#[test]
fn an_interrupted_run_writes_partial_results_and_resume_finishes_it() {
    require_venv();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("int");
    let args = [
        "--policy",
        "expert",
        "--tasks",
        "reach",
        "--episodes",
        "3",
        "--envs",
        "1",
        "--out",
        out.to_str().unwrap(),
        "--videos",
        "0",
    ];
    // Stop (as Ctrl-C does) once the first episode is on disk.
    let stop = no_stop();
    let (flag, jsonl) = (stop.clone(), out.join("episodes.jsonl"));
    std::thread::spawn(move || {
        let t0 = std::time::Instant::now();
        while t0.elapsed() < Duration::from_secs(600) {
            if std::fs::read_to_string(&jsonl).is_ok_and(|s| s.lines().count() >= 1) {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let o = run_with_stop(&eval_args(&args), stop).unwrap();
    assert!(!o.complete);
    let done = o.results["episodes_done"].as_u64().unwrap();
    assert!((1..3).contains(&done), "{done}");
    assert_eq!(o.results["complete"], false);
    assert!(out.join("results.json").is_file());
    let mut again = args.to_vec();
    again.push("--resume");
    let o = run_with_stop(&eval_args(&again), no_stop()).unwrap();
    assert!(o.complete);
    assert_eq!(o.results["tasks"]["reach-v3"]["successes"], 3);
    let indices: Vec<u64> = o.results["episodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, [0, 1, 2]);
}

#[test]
fn render_settings_are_recorded_and_checked_on_resume() {
    require_venv();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("render");
    let out_s = out.to_str().unwrap();
    let args = |render: &'static str| {
        [
            "--policy",
            "expert",
            "--no-render",
            "--render",
            render,
            "--tasks",
            "reach",
            "--episodes",
            "1",
            "--envs",
            "1",
            "--image-size",
            "64",
            "--out",
            out_s,
        ]
        .to_vec()
    };
    let o = run_with_stop(&eval_args(&args("default")), no_stop()).unwrap();
    assert!(o.complete);
    assert_eq!(o.results["tasks"]["reach-v3"]["successes"], 1);
    let config = &o.results["config"];
    assert_eq!(config["render"], "default", "{config}");
    assert!(
        config["camera"].as_str().unwrap().contains("shadows"),
        "{config}"
    );
    // The recorded episode was rendered (with the default settings) into its contact sheet.
    assert!(out.join("videos/reach-v3-ep000.png").is_file());
    // Another render setting is another run: --resume refuses it.
    let mut other = args("fast");
    other.push("--resume");
    let e = run_with_stop(&eval_args(&other), no_stop())
        .unwrap_err()
        .to_string();
    assert!(e.contains("render differs"), "{e}");
}

#[test]
fn blind_sends_black_images_in_place_of_the_rendered_frames() {
    require_venv();
    let meta = json!({"variant": "openvla", "action_dims": {"metaworld": 4}});
    let url = fake_server(meta, ActReply::ZeroIfBlack);
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, blind: bool| {
        let out = dir.path().join(name);
        let mut args = vec![
            "--url",
            &url,
            "--tasks",
            "reach",
            "--episodes",
            "1",
            "--envs",
            "1",
            "--horizon",
            "5",
            "--image-size",
            "64",
            "--videos",
            "0",
            "--out",
            out.to_str().unwrap(),
        ];
        if blind {
            args.push("--blind");
        }
        run_with_stop(&eval_args(&args), no_stop()).unwrap().results
    };
    // The fake policy refuses any image that is not all zeros: the rendered frames are refused...
    let seen = run("seen", false);
    let err = seen["episodes"][0]["error"].as_str().unwrap_or_default();
    assert!(err.contains("image not black"), "{seen}");
    // ...and with --blind every request carries a black image of the frame's size.
    let blind = run("blind", true);
    let ep = &blind["episodes"][0];
    assert!(ep["error"].is_null(), "{ep}");
    assert_eq!(ep["steps"], 5, "{ep}");
    assert_eq!(blind["config"]["blind"], true);
    assert!(seen["config"]["blind"].is_null());
    // Scripted policies never look at the image: --blind with them is refused up front.
    let e = run_with_stop(
        &eval_args(&["--policy", "expert", "--blind", "--tasks", "reach"]),
        no_stop(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("--blind goes with --policy model"), "{e}");
}
