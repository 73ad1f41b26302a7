//! The policy that ships in `models/metaworld-mt10` acts: served by this engine and run closed
//! loop in Meta-World (LeRobot protocol: seeded random positions, corner4 camera, obs[:4]
//! state, 500 steps), it succeeds at least once on each of two MT10 tasks in two episodes.
//! The model card (`models/metaworld-mt10/README.md`) has its full MT10 table.

mod common;

use common::{eval_args, no_stop, require_venv, root};
use openvla_eval::metaworld::run_with_stop;

#[test]
fn shipped_metaworld_policy_succeeds_closed_loop() {
    require_venv();
    let model = root().join("models/metaworld-mt10");
    assert!(
        model.join("config.json").is_file(),
        "the shipped policy {} is missing",
        model.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let args = [
        "--model",
        model.to_str().unwrap(),
        "--tasks",
        "drawer-close,window-close",
        "--episodes",
        "2",
        "--envs",
        "2",
        "--videos",
        "0",
        "--out",
        out.to_str().unwrap(),
    ];
    let o = run_with_stop(&eval_args(&args), no_stop()).unwrap();
    assert!(o.complete);
    let r = &o.results;
    assert_eq!(r["config"]["protocol"], "lerobot");
    assert_eq!(r["seeds"]["first"], 1000);
    assert_eq!(r["policy"]["inputs"]["proprio_dim"], 4, "{}", r["policy"]);
    for task in ["drawer-close-v3", "window-close-v3"] {
        let t = &r["tasks"][task];
        assert_eq!(t["episodes"], 2, "{t}");
        let s = t["successes"].as_u64().unwrap();
        assert!(
            s >= 1,
            "the shipped policy failed both episodes of {task}: {t}"
        );
        assert!(t["failures"].as_object().unwrap().is_empty(), "{t}");
    }
}
