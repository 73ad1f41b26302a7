//! Episode records and the scores made of them: per task, per LeRobot difficulty group, the macro
//! mean over groups (what papers report) and the episode-weighted mean (what `lerobot-eval`
//! prints as `overall`), each with a 95% Wilson interval; `results.json` and the Markdown table.

use crate::stats::{quantile, weighted_rate, wilson};
use crate::tasks::{group_of, instruction, GROUP_ORDER};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// The outcome of one episode, as stored (one JSON line each) in `episodes.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpisodeRecord {
    /// Task name (`reach-v3`).
    pub task: String,
    /// Episode index within the task (0-based).
    pub index: u64,
    /// The env seed (`env.seed(seed)` before reset).
    pub seed: u64,
    /// Whether `info["success"]` fired.
    pub success: bool,
    /// Env steps taken.
    pub steps: u64,
    /// The step (1-based) at which success fired.
    pub success_step: Option<u64>,
    /// Policy requests made.
    pub requests: u64,
    /// Latency of each policy request, ms.
    #[serde(default)]
    pub latencies_ms: Vec<f64>,
    /// The server's batch size for each request (`x-openvla-batch-size`).
    #[serde(default)]
    pub batch_sizes: Vec<u64>,
    /// Episode wall time in the worker (reset, render, policy, physics), s.
    pub wall_s: f64,
    /// Time waiting on the policy, s.
    pub policy_s: f64,
    /// Why the episode failed other than by not succeeding (policy error, timeout, dead worker).
    pub error: Option<String>,
    /// How many times the episode was retried after its worker died.
    pub retries: u32,
    /// The object/goal random vector of the episode.
    #[serde(default)]
    pub rand_vec: Vec<f64>,
    /// The episode's MP4, if recorded.
    pub video: Option<String>,
    /// The episode's contact sheet, if recorded.
    pub contact_sheet: Option<String>,
    /// Why the recording failed, if it did.
    pub media_error: Option<String>,
}

fn rate_json(successes: u64, episodes: u64) -> Value {
    let p = if episodes > 0 {
        successes as f64 / episodes as f64
    } else {
        0.0
    };
    let (lo, hi) = wilson(p, episodes as f64);
    json!({"successes": successes, "episodes": episodes, "success_rate": p, "wilson95": [lo, hi]})
}

/// Per-task, per-group and overall scores of `records` over `tasks` (in report order), with
/// latency, batch-size and speed summaries.
pub fn summarize(tasks: &[String], records: &[EpisodeRecord]) -> Value {
    let mut per_task = Map::new();
    let mut all_lat = Vec::new();
    let mut batches: BTreeMap<u64, u64> = BTreeMap::new();
    let mut group_counts: BTreeMap<&str, (u64, u64, Vec<&str>)> = BTreeMap::new();
    let (mut total_s, mut total_e, mut retries, mut errors) = (0u64, 0u64, 0u64, 0u64);
    for task in tasks {
        let recs: Vec<&EpisodeRecord> = records.iter().filter(|r| &r.task == task).collect();
        let s = recs.iter().filter(|r| r.success).count() as u64;
        let e = recs.len() as u64;
        let lat: Vec<f64> = recs
            .iter()
            .flat_map(|r| r.latencies_ms.iter().copied())
            .collect();
        let steps: u64 = recs.iter().map(|r| r.steps).sum();
        let wall: f64 = recs.iter().map(|r| r.wall_s).sum();
        let to_success: Vec<f64> = recs
            .iter()
            .filter_map(|r| r.success_step.map(|x| x as f64))
            .collect();
        let mut failures: BTreeMap<String, u64> = BTreeMap::new();
        for r in &recs {
            if let Some(err) = &r.error {
                *failures.entry(err.clone()).or_default() += 1;
            }
            for b in &r.batch_sizes {
                *batches.entry(*b).or_default() += 1;
            }
        }
        let task_retries: u64 = recs.iter().map(|r| r.retries as u64).sum();
        let group = group_of(task).unwrap_or("unknown");
        let mut t = rate_json(s, e);
        let o = t.as_object_mut().expect("rate_json is an object");
        o.insert("group".into(), json!(group));
        o.insert("instruction".into(), json!(instruction(task)));
        o.insert(
            "steps_to_success".into(),
            json!({
                "mean": if to_success.is_empty() { None } else {
                    Some(to_success.iter().sum::<f64>() / to_success.len() as f64) },
                "median": quantile(&to_success, 0.5),
                "per_episode": recs.iter().map(|r| r.success_step).collect::<Vec<_>>(),
            }),
        );
        o.insert(
            "policy_latency_ms".into(),
            json!({"p50": quantile(&lat, 0.5), "p95": quantile(&lat, 0.95), "requests": lat.len()}),
        );
        o.insert("env_steps".into(), json!(steps));
        o.insert(
            "env_steps_per_s".into(),
            json!(if wall > 0.0 {
                Some(steps as f64 / wall)
            } else {
                None
            }),
        );
        o.insert("failures".into(), json!(failures));
        o.insert("retries".into(), json!(task_retries));
        per_task.insert(task.clone(), t);
        all_lat.extend(lat);
        let g = group_counts.entry(group).or_default();
        g.0 += s;
        g.1 += e;
        g.2.push(task);
        total_s += s;
        total_e += e;
        retries += task_retries;
        errors += recs.iter().filter(|r| r.error.is_some()).count() as u64;
    }
    let mut groups = Map::new();
    let mut macro_parts = Vec::new();
    for g in GROUP_ORDER {
        if let Some((s, e, names)) = group_counts.get(g) {
            // The group's rate is the mean of its tasks' rates (equal episodes per task make it
            // the pooled rate too).
            let parts: Vec<(u64, u64, f64)> = names
                .iter()
                .map(|t| {
                    let v = &per_task[*t];
                    (
                        v["successes"].as_u64().unwrap_or(0),
                        v["episodes"].as_u64().unwrap_or(0),
                        1.0,
                    )
                })
                .collect();
            let mut v = rate_json(*s, *e);
            if let Some((mean, (lo, hi))) = weighted_rate(&parts) {
                v["success_rate"] = json!(mean);
                v["wilson95"] = json!([lo, hi]);
                // Each group weighs 1 in the macro mean: its tasks share that weight.
                let n = parts.iter().filter(|p| p.1 > 0).count() as f64;
                macro_parts.extend(parts.iter().map(|p| (p.0, p.1, 1.0 / n)));
            }
            v["tasks"] = json!(names);
            groups.insert(g.to_string(), v);
        }
    }
    let macro_mean = weighted_rate(&macro_parts).map(
        |(m, (lo, hi))| json!({"success_rate": m, "wilson95": [lo, hi], "groups": groups.len()}),
    );
    let weighted = rate_json(total_s, total_e);
    let steps: u64 = records.iter().map(|r| r.steps).sum();
    let wall: f64 = records.iter().map(|r| r.wall_s).sum();
    json!({
        "tasks": per_task,
        "groups": groups,
        "macro_mean": macro_mean,
        "episode_weighted_mean": weighted,
        "policy_latency_ms": {"p50": quantile(&all_lat, 0.5), "p95": quantile(&all_lat, 0.95),
                              "requests": all_lat.len()},
        "server_batch_sizes": batches.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<Map<_, _>>(),
        "env_steps": steps,
        "env_steps_per_s_per_worker": if wall > 0.0 { Some(steps as f64 / wall) } else { None },
        "retries": retries,
        "episodes_with_errors": errors,
    })
}

fn pct(v: &Value) -> String {
    match v["success_rate"].as_f64() {
        Some(p) => {
            let lo = v["wilson95"][0].as_f64().unwrap_or(0.0);
            let hi = v["wilson95"][1].as_f64().unwrap_or(1.0);
            format!("{:.1} [{:.1}, {:.1}]", 100.0 * p, 100.0 * lo, 100.0 * hi)
        }
        None => "-".into(),
    }
}

/// The Markdown tables of a summary: per task, per group, the two means.
pub fn markdown(title: &str, summary: &Value) -> String {
    let mut s = format!("# {title}\n\nSuccess % with 95% Wilson intervals.\n\n");
    s.push_str("| task | group | successes | success % [95% CI] | mean steps to success | latency p50 / p95 ms |\n|---|---|---|---|---|---|\n");
    if let Some(tasks) = summary["tasks"].as_object() {
        for (name, t) in tasks {
            let steps = t["steps_to_success"]["mean"]
                .as_f64()
                .map_or("-".into(), |x| format!("{x:.0}"));
            let lat = match (
                t["policy_latency_ms"]["p50"].as_f64(),
                t["policy_latency_ms"]["p95"].as_f64(),
            ) {
                (Some(a), Some(b)) => format!("{a:.1} / {b:.1}"),
                _ => "-".into(),
            };
            s.push_str(&format!(
                "| {name} | {} | {}/{} | {} | {steps} | {lat} |\n",
                t["group"].as_str().unwrap_or(""),
                t["successes"],
                t["episodes"],
                pct(t)
            ));
        }
    }
    s.push_str("\n| group | tasks | episodes | success % [95% CI] |\n|---|---|---|---|\n");
    if let Some(groups) = summary["groups"].as_object() {
        for g in GROUP_ORDER {
            if let Some(v) = groups.get(g) {
                s.push_str(&format!(
                    "| {g} | {} | {} | {} |\n",
                    v["tasks"].as_array().map_or(0, Vec::len),
                    v["episodes"],
                    pct(v)
                ));
            }
        }
    }
    s.push_str(&format!(
        "| **macro mean over groups** | | | {} |\n| **episode-weighted mean** | | {} | {} |\n",
        pct(&summary["macro_mean"]),
        summary["episode_weighted_mean"]["episodes"],
        pct(&summary["episode_weighted_mean"])
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(task: &str, index: u64, success: bool) -> EpisodeRecord {
        EpisodeRecord {
            task: task.into(),
            index,
            seed: 1000 + index,
            success,
            steps: if success { 50 } else { 500 },
            success_step: success.then_some(50),
            requests: 10,
            latencies_ms: vec![1.0, 3.0],
            batch_sizes: vec![1, 2],
            wall_s: 1.0,
            policy_s: 0.1,
            error: None,
            retries: 0,
            rand_vec: vec![],
            video: None,
            contact_sheet: None,
            media_error: None,
        }
    }

    #[test]
    fn macro_and_weighted_means_differ_as_defined() {
        // easy: reach 2/2; hard: push 0/2, pick-place 1/2.
        let tasks: Vec<String> = ["reach-v3", "push-v3", "pick-place-v3"]
            .map(String::from)
            .to_vec();
        let r = vec![
            rec("reach-v3", 0, true),
            rec("reach-v3", 1, true),
            rec("push-v3", 0, false),
            rec("push-v3", 1, false),
            rec("pick-place-v3", 0, true),
            rec("pick-place-v3", 1, false),
        ];
        let s = summarize(&tasks, &r);
        assert_eq!(s["tasks"]["reach-v3"]["success_rate"], 1.0);
        assert_eq!(s["groups"]["easy"]["success_rate"], 1.0);
        assert_eq!(s["groups"]["hard"]["success_rate"], 0.25);
        // Macro over the two groups present: (1 + 0.25) / 2; weighted: 3/6.
        assert_eq!(s["macro_mean"]["success_rate"], 0.625);
        assert_eq!(s["episode_weighted_mean"]["success_rate"], 0.5);
        assert_eq!(s["server_batch_sizes"]["2"], 6);
        assert_eq!(s["tasks"]["reach-v3"]["steps_to_success"]["mean"], 50.0);
        let md = markdown("t", &s);
        assert!(md.contains("| reach-v3 | easy | 2/2 | 100.0 ["), "{md}");
        assert!(
            md.contains("| **macro mean over groups** | | | 62.5 ["),
            "{md}"
        );
    }
}
