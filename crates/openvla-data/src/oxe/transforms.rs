//! Standardization transforms (reference `oxe/transforms.py` and `rlds/utils/data_utils.py`),
//! driven by a [`DatasetConfig`]: first-step drop, no-op filtering, gripper conventions, Bridge's
//! relabelling of movement actions from the reached state.

use std::sync::Arc;

use crate::error::{DataError, Result};
use crate::oxe::configs::{DatasetConfig, GripperConvention, NoopFilter};
use crate::rlds::Episode;
use crate::trajectory::{ImageData, Matrix, Trajectory};

/// The raw columns of one episode that a [`DatasetConfig`] asks for, before standardization.
#[derive(Debug, Clone)]
pub struct RawSteps {
    /// Dataset name.
    pub dataset_name: Arc<str>,
    /// Episode index.
    pub episode_index: u64,
    /// Source for messages.
    pub source: String,
    /// Primary camera.
    pub images: Vec<ImageData>,
    /// Wrist camera, when asked for.
    pub wrist_images: Option<Vec<ImageData>>,
    /// Concatenated action columns (last = gripper).
    pub actions: Matrix,
    /// State, when the config names one.
    pub state: Option<Matrix>,
    /// The privileged environment state (LeRobot's `observation.environment_state`), when the
    /// dataset records one: auxiliary training targets, never a policy input.
    pub environment_state: Option<Matrix>,
    /// Instruction per step.
    pub instructions: Vec<String>,
}

/// `binarize_gripper_actions`: values > 0.95 are open (1), < 0.05 closed (0); values in between
/// take the next stable value after them, and a trailing run of intermediate values takes the
/// raw last value.
pub fn binarize_gripper_actions(g: &[f32]) -> Vec<f32> {
    let Some(&last) = g.last() else {
        return Vec::new();
    };
    let mut out = vec![0.0; g.len()];
    let mut carry = last;
    for i in (0..g.len()).rev() {
        let open = g[i] > 0.95;
        let closed = g[i] < 0.05;
        if open || closed {
            carry = if open { 1.0 } else { 0.0 };
        }
        out[i] = carry;
    }
    out
}

/// `rel2abs_gripper_actions`: relative gripper actions (< -0.1 opening, > 0.1 closing, else no
/// change) to absolute 1 = open / 0 = closed. The state before the first event is the opposite
/// of that event; with no event the gripper is open throughout.
pub fn rel2abs_gripper_actions(g: &[f32]) -> Vec<f32> {
    let th: Vec<i32> = g
        .iter()
        .map(|&a| {
            if a < -0.1 {
                1
            } else if a > 0.1 {
                -1
            } else {
                0
            }
        })
        .collect();
    let first = th.iter().copied().find(|&t| t != 0).unwrap_or(0);
    let mut carry = if first == 0 { 1 } else { -first };
    th.iter()
        .map(|&t| {
            if t != 0 {
                carry = t;
            }
            carry as f32 / 2.0 + 0.5
        })
        .collect()
}

/// `1 - clip(g, 0, 1)`: LIBERO's -1 open / +1 close to 1 open / 0 closed.
pub fn libero_gripper(g: &[f32]) -> Vec<f32> {
    g.iter().map(|&a| 1.0 - a.clamp(0.0, 1.0)).collect()
}

/// The LIBERO no-op rule (regenerate_libero_dataset.py `is_noop`), over raw actions; returns
/// the indices to keep. The comparison is against the previous *kept* action.
pub fn libero_noop_keep(actions: &Matrix, threshold: f64) -> Vec<bool> {
    let mut keep = vec![false; actions.rows];
    let mut prev: Option<usize> = None;
    for (i, k) in keep.iter_mut().enumerate() {
        let a = actions.row(i);
        let (motion, grip) = a.split_at(a.len().saturating_sub(1));
        let norm = motion
            .iter()
            .map(|&x| (x as f64) * (x as f64))
            .sum::<f64>()
            .sqrt();
        let noop = match prev {
            None => norm < threshold,
            Some(p) => norm < threshold && grip.first() == actions.row(p).last(),
        };
        if !noop {
            *k = true;
            prev = Some(i);
        }
    }
    keep
}

fn apply_gripper(conv: GripperConvention, g: &[f32]) -> Vec<f32> {
    match conv {
        GripperConvention::OpenIs1 | GripperConvention::AsIs => g.to_vec(),
        GripperConvention::CloseIs1 => g.iter().map(|&x| 1.0 - x).collect(),
        GripperConvention::Libero => libero_gripper(g),
        GripperConvention::Relative => rel2abs_gripper_actions(g),
        GripperConvention::Binarize => binarize_gripper_actions(g),
    }
}

/// Applies the configured standardization to raw columns.
pub fn standardize(cfg: &DatasetConfig, mut raw: RawSteps) -> Result<Trajectory> {
    let n = raw.actions.rows;
    let ctx = || {
        format!(
            "{} episode {} ({})",
            raw.dataset_name, raw.episode_index, raw.source
        )
    };
    if let Some(w) = &raw.wrist_images {
        if w.len() != n {
            return Err(DataError::Invalid(format!(
                "{}: {} actions but {} wrist images",
                ctx(),
                n,
                w.len()
            )));
        }
    }
    if raw.images.len() != n || raw.instructions.len() != n {
        return Err(DataError::Invalid(format!(
            "{}: {} actions but {} images and {} instructions",
            ctx(),
            n,
            raw.images.len(),
            raw.instructions.len()
        )));
    }
    for (s, what) in [
        (&raw.state, "states"),
        (&raw.environment_state, "environment states"),
    ] {
        if let Some(s) = s {
            if s.rows != n {
                return Err(DataError::Invalid(format!(
                    "{}: {} actions but {} {what}",
                    ctx(),
                    n,
                    s.rows
                )));
            }
        }
    }
    let mut keep: Vec<bool> = vec![true; n];
    if cfg.drop_first_step && n > 0 {
        keep[0] = false;
    }
    if cfg.noop_filter == NoopFilter::Libero {
        let k = libero_noop_keep(&raw.actions, 1e-4);
        for (a, b) in keep.iter_mut().zip(k) {
            *a &= b;
        }
    }
    if keep.iter().any(|k| !k) {
        let mut idx = 0;
        raw.actions.retain_rows(|i| keep[i]);
        // The optional per-step matrices follow the actions' rows.
        for s in [raw.state.as_mut(), raw.environment_state.as_mut()]
            .into_iter()
            .flatten()
        {
            s.retain_rows(|i| keep[i]);
        }
        raw.images.retain(|_| {
            idx += 1;
            keep[idx - 1]
        });
        if let Some(w) = raw.wrist_images.as_mut() {
            idx = 0;
            w.retain(|_| {
                idx += 1;
                keep[idx - 1]
            });
        }
        idx = 0;
        raw.instructions.retain(|_| {
            idx += 1;
            keep[idx - 1]
        });
    }
    let n = raw.actions.rows;
    let cols = raw.actions.cols;
    if cols == 0 && n > 0 {
        return Err(DataError::Invalid(format!("{}: empty action", ctx())));
    }
    if n > 0 {
        let g: Vec<f32> = raw.actions.column(cols - 1);
        let g = apply_gripper(cfg.gripper, &g);
        for (i, v) in g.into_iter().enumerate() {
            raw.actions.data[i * cols + cols - 1] = v;
        }
    }
    let mut actions = raw.actions;
    if cfg.relabel_actions_from_state {
        let state = raw.state.as_ref().ok_or_else(|| {
            DataError::Invalid(format!("{}: relabelling needs the state feature", ctx()))
        })?;
        if state.cols < 6 || cols < 7 {
            return Err(DataError::Invalid(format!(
                "{}: relabelling needs >= 6 state dims and 7 action dims",
                ctx()
            )));
        }
        let m = n.saturating_sub(1);
        let mut data = Vec::with_capacity(m * 7);
        for t in 0..m {
            let (s0, s1) = (state.row(t), state.row(t + 1));
            for d in 0..6 {
                data.push(s1[d] - s0[d]);
            }
            data.push(actions.row(t)[cols - 1]);
        }
        actions = Matrix::new(m, 7, data);
        raw.images.truncate(m);
        if let Some(w) = raw.wrist_images.as_mut() {
            w.truncate(m);
        }
        raw.instructions.truncate(m);
        // The optional per-step matrices follow the actions' rows.
        for s in [raw.state.as_mut(), raw.environment_state.as_mut()]
            .into_iter()
            .flatten()
        {
            s.retain_rows(|i| i < m);
        }
    }
    let want = cfg.action_encoding.dim();
    if actions.rows > 0 && actions.cols != want {
        return Err(DataError::Invalid(format!(
            "{}: standardized action has {} dims, {:?} needs {want} (action_keys {:?})",
            ctx(),
            actions.cols,
            cfg.action_encoding,
            cfg.action_keys
        )));
    }
    Ok(Trajectory {
        dataset_name: raw.dataset_name,
        episode_index: raw.episode_index,
        source: raw.source,
        images: raw.images,
        wrist_images: raw.wrist_images,
        actions,
        proprio: raw.state,
        environment_state: raw.environment_state,
        instructions: raw.instructions,
    })
}

/// Extracts the configured columns from an RLDS episode (keys are relative to `steps/`);
/// `wrist` also reads the config's wrist camera (an error if it names none).
pub fn raw_from_episode(cfg: &DatasetConfig, ep: &Episode, wrist: bool) -> Result<RawSteps> {
    let k = |key: &str| format!("steps/{key}");
    let encoded = |key: &str| -> Result<Vec<ImageData>> {
        Ok(ep
            .bytes(&k(key))?
            .iter()
            .map(|b| ImageData::Encoded(Arc::from(b.as_slice())))
            .collect())
    };
    let images = encoded(&cfg.image_key)?;
    let wrist_images = if wrist {
        Some(encoded(cfg.wrist_key()?)?)
    } else {
        None
    };
    let parts = cfg
        .action_keys
        .iter()
        .map(|a| ep.matrix(&k(a)))
        .collect::<Result<Vec<_>>>()?;
    let actions = Matrix::hconcat(&parts).unwrap_or_else(|| Matrix::new(ep.len, 0, Vec::new()));
    let state = match &cfg.state_key {
        Some(s) => Some(ep.matrix(&k(s))?),
        None => None,
    };
    let instructions = ep.strings(&k(&cfg.language_key))?;
    Ok(RawSteps {
        dataset_name: Arc::from(cfg.name.as_str()),
        episode_index: ep.index,
        source: ep.source.clone(),
        images,
        wrist_images,
        actions,
        state,
        environment_state: None,
        instructions,
    })
}

/// `raw_from_episode` followed by [`standardize`].
pub fn standardize_episode(cfg: &DatasetConfig, ep: &Episode, wrist: bool) -> Result<Trajectory> {
    standardize(cfg, raw_from_episode(cfg, ep, wrist)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binarize_matches_docstring() {
        let g = [1.0, 0.5, 0.0, 0.0, 0.6, 1.0, 0.3];
        assert_eq!(
            binarize_gripper_actions(&g),
            vec![1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.3]
        );
    }

    #[test]
    fn rel2abs() {
        // no event: open throughout
        assert_eq!(rel2abs_gripper_actions(&[0.0, 0.05]), vec![1.0, 1.0]);
        // first event is a close (+1): open before it, closed after, open after -1
        assert_eq!(
            rel2abs_gripper_actions(&[0.0, 1.0, 0.0, -1.0, 0.0]),
            vec![1.0, 0.0, 0.0, 1.0, 1.0]
        );
        // first event an open: closed before
        assert_eq!(rel2abs_gripper_actions(&[0.0, -0.5]), vec![0.0, 1.0]);
    }

    #[test]
    fn libero_noops() {
        let a = Matrix::new(
            5,
            7,
            vec![
                0., 0., 0., 0., 0., 0., -1., // first: noop by norm only
                0.1, 0., 0., 0., 0., 0., -1., // kept
                0., 0., 0., 0., 0., 0., -1., // noop: same gripper as previous kept
                0., 0., 0., 0., 0., 0., 1., // gripper changes: kept
                0., 0., 0., 0., 0., 5e-5, 1., // noop
            ],
        );
        assert_eq!(
            libero_noop_keep(&a, 1e-4),
            vec![false, true, false, true, false]
        );
    }
}
