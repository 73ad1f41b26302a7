//! Meta-World v3 tasks, LeRobot's task descriptions and difficulty groups.
//!
//! One source for both sides: `python/sim/openvla_sim/tasks.json`, compiled in here and read by
//! the Python workers.

use anyhow::{bail, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::OnceLock;

/// The parsed task table.
#[derive(Debug, Deserialize)]
pub struct TaskTable {
    /// The 50 tasks in metaworld's order.
    pub mt50: Vec<String>,
    /// MT10.
    pub mt10: Vec<String>,
    /// LeRobot's difficulty groups: easy, medium, hard, very_hard.
    pub groups: BTreeMap<String, Vec<String>>,
    /// LeRobot's task descriptions (the instructions).
    pub descriptions: BTreeMap<String, String>,
}

/// The difficulty groups in report order.
pub const GROUP_ORDER: [&str; 4] = ["easy", "medium", "hard", "very_hard"];

/// The task table.
pub fn table() -> &'static TaskTable {
    static TABLE: OnceLock<TaskTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        serde_json::from_str(include_str!("../../../python/sim/openvla_sim/tasks.json"))
            .expect("tasks.json compiled into the binary is valid")
    })
}

/// The difficulty group of a task.
pub fn group_of(task: &str) -> Option<&'static str> {
    GROUP_ORDER.iter().copied().find(|g| {
        table()
            .groups
            .get(*g)
            .is_some_and(|ts| ts.iter().any(|t| t == task))
    })
}

/// The instruction (LeRobot's description) of a task.
pub fn instruction(task: &str) -> Option<&'static str> {
    table().descriptions.get(task).map(String::as_str)
}

/// Resolves `--tasks`: `mt10`, `mt50`, a difficulty group (`easy`, `medium`, `hard`,
/// `very_hard`), or task names (with or without `-v3`), comma-separated, in order, without
/// repeats.
pub fn resolve(spec: &str) -> Result<Vec<String>> {
    let t = table();
    let mut out: Vec<String> = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let lower = part.to_ascii_lowercase().replace("very-hard", "very_hard");
        let names: Vec<String> = match lower.as_str() {
            "mt10" => t.mt10.clone(),
            "mt50" => t.mt50.clone(),
            g if t.groups.contains_key(g) => t.groups[g].clone(),
            name => {
                let full = if name.ends_with("-v3") {
                    name.to_string()
                } else {
                    format!("{name}-v3")
                };
                if !t.descriptions.contains_key(&full) {
                    bail!(
                        "unknown Meta-World task `{part}`; expected mt10, mt50, easy, medium, hard, \
                         very_hard or task names such as reach-v3 (the 50: {})",
                        t.mt50.join(", ")
                    );
                }
                vec![full]
            }
        };
        for n in names {
            if !out.contains(&n) {
                out.push(n);
            }
        }
    }
    if out.is_empty() {
        bail!("--tasks names no task; expected mt10, mt50, a difficulty group or task names");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_matches_lerobot_groups() {
        let t = table();
        assert_eq!(t.mt50.len(), 50);
        assert_eq!(t.mt10.len(), 10);
        let sizes: Vec<usize> = GROUP_ORDER.iter().map(|g| t.groups[*g].len()).collect();
        assert_eq!(sizes, [28, 11, 6, 5]);
        for task in &t.mt50 {
            assert!(group_of(task).is_some(), "{task} has no group");
            assert!(instruction(task).is_some(), "{task} has no description");
        }
        assert_eq!(instruction("push-v3"), instruction("push-back-v3"));
        assert_eq!(instruction("reach-v3"), Some("Reach a goal position"));
    }

    #[test]
    fn resolve_specs() {
        assert_eq!(resolve("mt10").unwrap().len(), 10);
        assert_eq!(resolve("very_hard").unwrap().len(), 5);
        assert_eq!(
            resolve("reach,push-v3,reach-v3").unwrap(),
            ["reach-v3", "push-v3"]
        );
        let e = resolve("reach,fly-v3").unwrap_err().to_string();
        assert!(e.contains("unknown Meta-World task `fly-v3`"), "{e}");
        assert!(resolve(" , ").is_err());
    }
}
