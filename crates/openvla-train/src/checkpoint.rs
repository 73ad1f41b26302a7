//! Training checkpoints: trainable weights, AdamW moments, step, RNG state and data position,
//! written atomically so that a run killed at any instant (SIGKILL, power loss) resumes from the
//! last complete checkpoint.
//!
//! Layout under `<run>/checkpoints/`:
//!
//! ```text
//! step-00000100/
//!   params.safetensors      trainable parameters (float32) by name
//!   optimizer.safetensors   "<name>.exp_avg" / "<name>.exp_avg_sq"
//!   state.json              step, rng, data position, per-parameter optimizer steps, fingerprint
//! ```
//!
//! A checkpoint is built in `.step-00000100.tmp-<pid>/`, every file fsynced, then the directory
//! is renamed to its final name and the parent fsynced. Only directories named `step-<n>` that
//! hold `state.json` count; leftovers of an interrupted save are removed on the next start.

use crate::error::{read_json, Result, TrainError};
use crate::io::{pt_metadata, read_safetensors, sync_dir, write_atomic, write_safetensors};
use crate::optim::{AdamW, ParamState};
use crate::rng::TrainRng;
use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `state.json` of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Optimizer steps completed.
    pub step: u64,
    /// RNG state after that step.
    pub rng: TrainRng,
    /// Where the data source is (its own format, see [`crate::trainer::DataSource`]).
    pub data_position: serde_json::Value,
    /// AdamW step count of each parameter that has state.
    pub optimizer_steps: BTreeMap<String, u64>,
    /// What the run must agree on to resume (model, mode, rank, batch, ...).
    pub fingerprint: serde_json::Value,
    /// Last logged loss (informational).
    #[serde(default)]
    pub loss: Option<f64>,
}

/// The checkpoints directory of a run.
pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// Directory name of the checkpoint after `step`.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

fn parse_step(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?.parse().ok()
}

/// Complete checkpoints of a run, sorted by step.
pub fn list_checkpoints(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let dir = checkpoints_dir(run_dir);
    if !dir.is_dir() {
        return Ok(vec![]);
    }
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).map_err(|e| TrainError::io(&dir, e))? {
        let e = e.map_err(|e| TrainError::io(&dir, e))?;
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(step) = parse_step(&name) {
            if e.path().join("state.json").is_file() {
                out.push((step, e.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The newest complete checkpoint, if any.
pub fn latest_checkpoint(run_dir: &Path) -> Result<Option<(u64, PathBuf)>> {
    Ok(list_checkpoints(run_dir)?.pop())
}

/// Removes leftovers of interrupted saves (`.step-*.tmp-*` directories).
pub fn clean_partial(run_dir: &Path) -> Result<()> {
    let dir = checkpoints_dir(run_dir);
    if !dir.is_dir() {
        return Ok(());
    }
    for e in std::fs::read_dir(&dir).map_err(|e| TrainError::io(&dir, e))? {
        let e = e.map_err(|e| TrainError::io(&dir, e))?;
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with(".step-") && name.contains(".tmp-") {
            std::fs::remove_dir_all(e.path()).map_err(|err| TrainError::io(e.path(), err))?;
        }
    }
    Ok(())
}

/// Writes a checkpoint for `state.step` atomically and returns its directory. `extra` may add
/// files (e.g. a PEFT adapter) into the directory before it is published.
pub fn save_checkpoint(
    run_dir: &Path,
    params: &[(String, Var)],
    opt: &AdamW,
    state: &CheckpointState,
    extra: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let dir = checkpoints_dir(run_dir);
    std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
    let name = step_dir_name(state.step);
    let final_dir = dir.join(&name);
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    let p: BTreeMap<String, Tensor> = params
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    write_safetensors(&tmp.join("params.safetensors"), &p, &pt_metadata())?;
    let mut o = BTreeMap::new();
    for (n, s) in &opt.state {
        o.insert(format!("{n}.exp_avg"), s.exp_avg.clone());
        o.insert(format!("{n}.exp_avg_sq"), s.exp_avg_sq.clone());
    }
    write_safetensors(&tmp.join("optimizer.safetensors"), &o, &pt_metadata())?;
    extra(&tmp)?;
    let text = serde_json::to_string_pretty(state).map_err(|e| TrainError::json(&tmp, e))?;
    write_atomic(&tmp.join("state.json"), text.as_bytes())?;
    sync_dir(&tmp)?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| TrainError::io(&final_dir, e))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| TrainError::io(&final_dir, e))?;
    sync_dir(&dir)?;
    Ok(final_dir)
}

/// Deletes all but the newest `keep` complete checkpoints (`keep = 0` keeps all).
pub fn prune_checkpoints(run_dir: &Path, keep: usize) -> Result<Vec<PathBuf>> {
    if keep == 0 {
        return Ok(vec![]);
    }
    let all = list_checkpoints(run_dir)?;
    let n = all.len().saturating_sub(keep);
    let mut removed = Vec::new();
    for (_, p) in all.into_iter().take(n) {
        std::fs::remove_dir_all(&p).map_err(|e| TrainError::io(&p, e))?;
        removed.push(p);
    }
    Ok(removed)
}

/// Restores a checkpoint into `params` (by name; every one must be present with its shape) and
/// `opt`, and returns its state. A checkpoint written with other settings than `fingerprint`
/// (the run's) is refused before any tensor is read: such a run may train other tensors, and
/// the settings are what the user needs to see.
pub fn load_checkpoint(
    dir: &Path,
    params: &[(String, Var)],
    opt: &mut AdamW,
    fingerprint: &serde_json::Value,
) -> Result<CheckpointState> {
    let state: CheckpointState = read_json(&dir.join("state.json"))?;
    if &state.fingerprint != fingerprint {
        return Err(TrainError::checkpoint(
            dir,
            format!(
                "was written by a run with different settings; saved {} but this run has \
                 {fingerprint}",
                state.fingerprint
            ),
        ));
    }
    let device = params
        .first()
        .map(|(_, v)| v.device().clone())
        .unwrap_or(Device::Cpu);
    let saved = read_safetensors(&dir.join("params.safetensors"), &device)?;
    if saved.len() != params.len() {
        return Err(TrainError::checkpoint(
            dir,
            format!(
                "holds {} trainable tensors but the run trains {}; was it written with another \
                 mode, rank or target list?",
                saved.len(),
                params.len()
            ),
        ));
    }
    for (name, var) in params {
        let t = saved
            .get(name)
            .ok_or_else(|| TrainError::checkpoint(dir, format!("has no tensor {name}")))?;
        if t.shape() != var.shape() {
            return Err(TrainError::checkpoint(
                dir,
                format!(
                    "{name} has shape {:?} but the run's parameter has {:?}",
                    t.dims(),
                    var.dims()
                ),
            ));
        }
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    let moments = read_safetensors(&dir.join("optimizer.safetensors"), &device)?;
    opt.state.clear();
    for (name, &step) in &state.optimizer_steps {
        let get = |k: String| {
            moments
                .get(&k)
                .cloned()
                .ok_or_else(|| TrainError::checkpoint(dir, format!("optimizer state lacks {k}")))
        };
        opt.state.insert(
            name.clone(),
            ParamState {
                exp_avg: get(format!("{name}.exp_avg"))?,
                exp_avg_sq: get(format!("{name}.exp_avg_sq"))?,
                step,
            },
        );
    }
    Ok(state)
}
