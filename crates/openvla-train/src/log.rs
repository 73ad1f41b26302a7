//! The JSONL metrics log (`metrics.jsonl`, one object per optimizer step).

use crate::error::{Result, TrainError};
use crate::io::write_atomic;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsRecord {
    /// Optimizer step (1-based).
    pub step: u64,
    /// Mean training loss over the step's micro-batches.
    pub loss: f64,
    /// Action-token accuracy (mean over micro-batches), if the objective reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action_accuracy: Option<f64>,
    /// L1 error of decoded actions (the L1 objective: of the current action), if reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action_l1_loss: Option<f64>,
    /// L1 error of the chunk's later actions (the L1 objective with a chunk of more than one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_actions_l1_loss: Option<f64>,
    /// L1 error of the auxiliary environment-state prediction (`--aux-environment-state`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aux_l1_loss: Option<f64>,
    /// Learning rate.
    pub lr: f64,
    /// Optimizer steps per second over this process's steps so far.
    pub steps_per_s: f64,
    /// Seconds since this process started training.
    pub elapsed_s: f64,
    /// Seconds of this step spent waiting for batches from the data stream (near 0 when the
    /// loader keeps up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_wait_s: Option<f64>,
    /// Seconds of this step in the forward and backward passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward_backward_s: Option<f64>,
    /// Seconds of this step in the optimizer update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimizer_s: Option<f64>,
}

/// Appends records to `metrics.jsonl`, flushing every line.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// Opens `path` for appending. On resume at `keep_until_step`, lines of later steps (written
    /// after the checkpoint the run resumes from) are dropped first, atomically, so the log
    /// stays one consistent curve. A torn last line (killed mid-write) is dropped too.
    pub fn open(path: &Path, keep_until_step: Option<u64>) -> Result<Self> {
        let records = if path.is_file() {
            read_metrics(path)?
        } else {
            vec![]
        };
        let keep: Vec<&MetricsRecord> = records
            .iter()
            .filter(|r| keep_until_step.is_some_and(|s| r.step <= s))
            .collect();
        let mut text = String::new();
        for r in keep {
            text.push_str(&serde_json::to_string(r).map_err(|e| TrainError::json(path, e))?);
            text.push('\n');
        }
        write_atomic(path, text.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| TrainError::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Appends one record.
    pub fn append(&mut self, r: &MetricsRecord) -> Result<()> {
        let mut line = serde_json::to_string(r).map_err(|e| TrainError::json(&self.path, e))?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .map_err(|e| TrainError::io(&self.path, e))
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads `metrics.jsonl`, skipping a torn (unparsable) last line.
pub fn read_metrics(path: &Path) -> Result<Vec<MetricsRecord>> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut out = Vec::with_capacity(lines.len());
    for (i, l) in lines.iter().enumerate() {
        match serde_json::from_str::<MetricsRecord>(l) {
            Ok(r) => out.push(r),
            Err(_) if i + 1 == lines.len() => break,
            Err(e) => return Err(TrainError::json(path, format!("line {}: {e}", i + 1))),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(step: u64) -> MetricsRecord {
        MetricsRecord {
            step,
            loss: 1.0 / step as f64,
            action_accuracy: None,
            action_l1_loss: None,
            next_actions_l1_loss: None,
            aux_l1_loss: None,
            lr: 5e-4,
            steps_per_s: 1.0,
            elapsed_s: step as f64,
            data_wait_s: None,
            forward_backward_s: None,
            optimizer_s: None,
        }
    }

    #[test]
    fn torn_last_line_is_dropped_and_resume_truncates() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.jsonl");
        let mut log = MetricsLog::open(&p, None).unwrap();
        for s in 1..=5 {
            log.append(&rec(s)).unwrap();
        }
        drop(log);
        let mut text = std::fs::read_to_string(&p).unwrap();
        text.push_str("{\"step\": 6, \"lo");
        std::fs::write(&p, text).unwrap();
        assert_eq!(read_metrics(&p).unwrap().len(), 5);
        let mut log = MetricsLog::open(&p, Some(3)).unwrap();
        log.append(&rec(4)).unwrap();
        let r = read_metrics(&p).unwrap();
        assert_eq!(
            r.iter().map(|r| r.step).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        assert_eq!(r[0], rec(1));
    }
}
