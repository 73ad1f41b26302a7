//! A worker that dies mid-episode is restarted and its episode retried once (counted). In its
//! own test binary: the fault is injected through the environment of the worker processes.

mod common;

use common::{eval_args, no_stop, require_venv};
use openvla_eval::metaworld::run_with_stop;

#[test]
fn a_dead_worker_is_restarted_and_its_episode_retried_once() {
    require_venv();
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("crash-once");
    std::fs::write(&marker, b"").unwrap();
    // The first worker to remove the marker exits (code 3) at step 5 of its episode.
    std::env::set_var("OPENVLA_SIM_CRASH_ONCE", &marker);
    let out = dir.path().join("run");
    let o = run_with_stop(
        &eval_args(&[
            "--policy",
            "expert",
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
    assert!(!marker.exists(), "no worker crashed");
    assert!(o.complete);
    let t = &o.results["tasks"]["reach-v3"];
    assert_eq!(t["successes"], 2, "{t}");
    assert_eq!(t["retries"], 1, "{t}");
    assert_eq!(o.results["retries"], 1);
    let retried: Vec<u64> = o.results["episodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["retries"].as_u64().unwrap())
        .collect();
    assert_eq!(retried, [1, 0]);
}
