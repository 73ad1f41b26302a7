//! Dataset statistics in the reference's `dataset_statistics.json` format (spec §6.5):
//! mean, population std, max, min, and q01/q99 with numpy's default linear interpolation, per
//! action dimension, plus `mask`, `num_transitions` and `num_trajectories`.
//!
//! # Memory and exactness
//!
//! Images are never kept: a trajectory's actions are folded in and the trajectory is dropped.
//! Exact quantiles need every value, so each dimension's column of `f32` values is kept, which
//! costs `4 * dim` bytes per transition (7-D actions: 28 bytes; 100 M transitions: 2.8 GB).
//! Past a memory budget ([`StatsAccumulator::with_memory_budget`]) the columns are spilled to
//! temporary files, and each quantile is then found exactly in two sequential passes over the
//! file with a radix select: the 32-bit order-preserving key of a float is split into a high and
//! a low 16-bit half; pass 1 histograms the high halves to find the bucket holding the wanted
//! rank, pass 2 histograms the low halves inside that bucket, which pins the exact value. Memory
//! stays at two 65 536-entry histograms whatever the data size. Mean and std are accumulated in
//! `f64` (sum and Welford), min/max exactly.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::trajectory::{Matrix, Trajectory};

/// Per-dimension statistics of one array (`action` or `proprio`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArrayStats {
    /// Mean.
    pub mean: Vec<f64>,
    /// Population standard deviation.
    pub std: Vec<f64>,
    /// Maximum.
    pub max: Vec<f64>,
    /// Minimum.
    pub min: Vec<f64>,
    /// 1st percentile (numpy linear).
    pub q01: Vec<f64>,
    /// 99th percentile (numpy linear).
    pub q99: Vec<f64>,
    /// Which dimensions are normalized (absent = all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<Vec<bool>>,
}

impl ArrayStats {
    /// Statistics of an all-zero array of `dim` dimensions (the reference's proprio stand-in).
    pub fn zeros(dim: usize) -> Self {
        let z = vec![0.0; dim];
        Self {
            mean: z.clone(),
            std: z.clone(),
            max: z.clone(),
            min: z.clone(),
            q01: z.clone(),
            q99: z,
            mask: None,
        }
    }

    /// The mask, defaulting to all true.
    pub fn mask_or_all(&self) -> Vec<bool> {
        self.mask
            .clone()
            .unwrap_or_else(|| vec![true; self.q01.len()])
    }
}

/// One dataset's entry of `dataset_statistics.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetStatistics {
    /// Action statistics.
    pub action: ArrayStats,
    /// Proprio statistics (zeros shaped like the action when proprio is not loaded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proprio: Option<ArrayStats>,
    /// Statistics of the privileged environment state (LeRobot's
    /// `observation.environment_state`), when every trajectory has one: the bounds that
    /// normalize auxiliary training targets (`openvla finetune --aux-environment-state`).
    /// Absent from the reference's files, and ignored by inference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment_state: Option<ArrayStats>,
    /// Number of transitions (frames).
    pub num_transitions: u64,
    /// Number of trajectories.
    pub num_trajectories: u64,
}

/// The whole file: dataset name to statistics.
pub type StatisticsFile = BTreeMap<String, DatasetStatistics>;

/// Reads a `dataset_statistics.json` (or the `norm_stats` of a config).
pub fn load_statistics(path: &Path) -> Result<StatisticsFile> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| DataError::metadata(path, e.to_string()))
}

/// Writes a `dataset_statistics.json` as the reference does (`json.dump(..., indent=2)`).
pub fn save_statistics(path: &Path, stats: &StatisticsFile) -> Result<()> {
    let text = serde_json::to_string_pretty(stats)
        .map_err(|e| DataError::Invalid(format!("cannot serialize statistics: {e}")))?;
    std::fs::write(path, text + "\n").map_err(|e| DataError::io(path, e))
}

/// numpy's default (`linear`) quantile of sorted data.
pub fn quantile_sorted(sorted: &[f32], q: f64) -> f64 {
    let n = sorted.len();
    if n == 0 {
        return f64::NAN;
    }
    let (lo, frac) = quantile_index(n as u64, q);
    let a = sorted[lo as usize] as f64;
    let b = sorted[((lo + 1) as usize).min(n - 1)] as f64;
    lerp(a, b, frac)
}

/// Rank `floor(q (n-1))` and the fraction, as numpy computes the virtual index.
fn quantile_index(n: u64, q: f64) -> (u64, f64) {
    let virt = q * (n - 1) as f64;
    let lo = virt.floor();
    (lo as u64, virt - lo)
}

/// numpy's `_lerp`, which is exact at both ends.
fn lerp(a: f64, b: f64, t: f64) -> f64 {
    let diff = b - a;
    if t >= 0.5 {
        b - diff * (1.0 - t)
    } else {
        a + diff * t
    }
}

/// Order-preserving u32 key of an f32.
fn key(x: f32) -> u32 {
    let b = x.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

fn unkey(k: u32) -> f32 {
    let b = if k & 0x8000_0000 != 0 {
        k & 0x7fff_ffff
    } else {
        !k
    };
    f32::from_bits(b)
}

enum Column {
    Mem(Vec<f32>),
    Spill {
        path: PathBuf,
        writer: BufWriter<File>,
    },
}

#[derive(Clone, Copy)]
struct Moments {
    n: u64,
    mean: f64,
    m2: f64,
    min: f32,
    max: f32,
}

impl Moments {
    fn new() -> Self {
        Self {
            n: 0,
            mean: 0.0,
            m2: 0.0,
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
        }
    }
    fn push(&mut self, x: f32) {
        self.n += 1;
        let xf = x as f64;
        let d = xf - self.mean;
        self.mean += d / self.n as f64;
        self.m2 += d * (xf - self.mean);
        // numpy's max/min propagate NaN; so do we.
        if x.is_nan() || self.max.is_nan() {
            self.max = f32::NAN;
            self.min = f32::NAN;
        } else {
            self.max = self.max.max(x);
            self.min = self.min.min(x);
        }
    }
}

/// Streaming accumulator of one array's statistics (see the module docs).
struct ArrayAccumulator {
    dim: usize,
    columns: Vec<Column>,
    moments: Vec<Moments>,
    count: u64,
}

impl ArrayAccumulator {
    fn new(dim: usize) -> Self {
        Self {
            dim,
            columns: (0..dim).map(|_| Column::Mem(Vec::new())).collect(),
            moments: vec![Moments::new(); dim],
            count: 0,
        }
    }

    fn push_row(&mut self, row: &[f32]) -> Result<()> {
        for (d, &x) in row.iter().enumerate() {
            self.moments[d].push(x);
            match &mut self.columns[d] {
                Column::Mem(v) => v.push(x),
                Column::Spill { path, writer } => writer
                    .write_all(&x.to_le_bytes())
                    .map_err(|e| DataError::io(path.as_path(), e))?,
            }
        }
        self.count += 1;
        Ok(())
    }

    fn spill(&mut self, dir: &Path, tag: &str) -> Result<()> {
        for (d, col) in self.columns.iter_mut().enumerate() {
            if let Column::Mem(v) = col {
                let path = dir.join(format!("{tag}-{d}.f32"));
                let f = File::create(&path).map_err(|e| DataError::io(&path, e))?;
                let mut writer = BufWriter::with_capacity(1 << 20, f);
                for x in v.iter() {
                    writer
                        .write_all(&x.to_le_bytes())
                        .map_err(|e| DataError::io(&path, e))?;
                }
                *col = Column::Spill { path, writer };
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<ArrayStats> {
        let mut st = ArrayStats::zeros(self.dim);
        for (d, col) in self.columns.into_iter().enumerate() {
            let m = self.moments[d];
            st.mean[d] = if m.n == 0 { f64::NAN } else { m.mean };
            st.std[d] = if m.n == 0 {
                f64::NAN
            } else {
                (m.m2 / m.n as f64).sqrt()
            };
            st.max[d] = m.max as f64;
            st.min[d] = m.min as f64;
            let (q01, q99) = match col {
                Column::Mem(mut v) => {
                    if v.iter().any(|x| x.is_nan()) {
                        (f64::NAN, f64::NAN)
                    } else {
                        v.sort_unstable_by(f32::total_cmp);
                        (quantile_sorted(&v, 0.01), quantile_sorted(&v, 0.99))
                    }
                }
                Column::Spill { path, writer } => {
                    let r = spilled_quantiles(&path, writer, m.n, &[0.01, 0.99]);
                    std::fs::remove_file(&path).ok();
                    let q = r?;
                    (q[0], q[1])
                }
            };
            st.q01[d] = q01;
            st.q99[d] = q99;
        }
        Ok(st)
    }
}

/// Exact quantiles of a spilled column by two-pass radix select.
fn spilled_quantiles(path: &Path, writer: BufWriter<File>, n: u64, qs: &[f64]) -> Result<Vec<f64>> {
    writer
        .into_inner()
        .map_err(|e| DataError::io(path, e.into_error()))?
        .sync_all()
        .ok();
    if n == 0 {
        return Ok(vec![f64::NAN; qs.len()]);
    }
    // The ranks needed: lo and lo+1 of each quantile.
    let mut ranks: Vec<u64> = Vec::new();
    for &q in qs {
        let (lo, _) = quantile_index(n, q);
        ranks.push(lo);
        ranks.push((lo + 1).min(n - 1));
    }
    let scan = |f: &mut dyn FnMut(u32)| -> Result<()> {
        let file = File::open(path).map_err(|e| DataError::io(path, e))?;
        let mut r = BufReader::with_capacity(1 << 20, file);
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let got = r.read(&mut buf).map_err(|e| DataError::io(path, e))?;
            if got == 0 {
                break;
            }
            let whole = got - got % 4;
            if whole != got {
                // Finish the partial value.
                let mut rest = [0u8; 4];
                rest[..got - whole].copy_from_slice(&buf[whole..got]);
                r.read_exact(&mut rest[got - whole..])
                    .map_err(|e| DataError::io(path, e))?;
                for c in buf[..whole].chunks_exact(4) {
                    f(key(f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
                }
                f(key(f32::from_le_bytes(rest)));
                continue;
            }
            for c in buf[..whole].chunks_exact(4) {
                f(key(f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
            }
        }
        Ok(())
    };
    // Pass 1: high 16 bits.
    let mut hi = vec![0u64; 1 << 16];
    scan(&mut |k| hi[(k >> 16) as usize] += 1)?;
    let locate = |hist: &[u64], rank: u64| -> (usize, u64) {
        let mut acc = 0u64;
        for (i, &c) in hist.iter().enumerate() {
            if acc + c > rank {
                return (i, rank - acc);
            }
            acc += c;
        }
        (hist.len() - 1, 0)
    };
    let targets: Vec<(usize, u64)> = ranks.iter().map(|&r| locate(&hi, r)).collect();
    let mut buckets: Vec<usize> = targets.iter().map(|t| t.0).collect();
    buckets.sort_unstable();
    buckets.dedup();
    // Pass 2: low 16 bits inside the target buckets.
    let mut lo_hists: Vec<Vec<u64>> = vec![vec![0u64; 1 << 16]; buckets.len()];
    scan(&mut |k| {
        if let Ok(i) = buckets.binary_search(&((k >> 16) as usize)) {
            lo_hists[i][(k & 0xffff) as usize] += 1;
        }
    })?;
    let values: Vec<f64> = targets
        .iter()
        .map(|&(b, r)| {
            let i = buckets.binary_search(&b).unwrap_or(0);
            let (low, _) = locate(&lo_hists[i], r);
            unkey(((b as u32) << 16) | low as u32) as f64
        })
        .collect();
    Ok(qs
        .iter()
        .enumerate()
        .map(|(i, &q)| {
            let (_, frac) = quantile_index(n, q);
            lerp(values[2 * i], values[2 * i + 1], frac)
        })
        .collect())
}

/// Adds a trajectory's per-step matrix `m` (one row per action) to `slot`, which takes the
/// width of the first one; `what` names it in errors.
fn push_per_step(
    slot: &mut Option<ArrayAccumulator>,
    m: &Matrix,
    traj: &Trajectory,
    what: &str,
) -> Result<()> {
    let acc = slot.get_or_insert_with(|| ArrayAccumulator::new(m.cols));
    if m.cols != acc.dim || m.rows != traj.actions.rows {
        return Err(DataError::Invalid(format!(
            "{} episode {} ({}): {what} is [{}, {}], expected [{}, {}]",
            traj.dataset_name,
            traj.episode_index,
            traj.source,
            m.rows,
            m.cols,
            traj.actions.rows,
            acc.dim
        )));
    }
    for i in 0..m.rows {
        acc.push_row(m.row(i))?;
    }
    Ok(())
}

/// Streaming statistics over standardized trajectories (see the module docs for memory).
pub struct StatsAccumulator {
    action: Option<ArrayAccumulator>,
    /// `Some` when proprio statistics are asked for ([`StatsAccumulator::with_proprio`]).
    proprio: Option<Option<ArrayAccumulator>>,
    /// The environment state's columns while every trajectory so far has had one.
    environment_state: Option<ArrayAccumulator>,
    /// A trajectory without environment state was seen: no statistics for it.
    environment_state_missing: bool,
    num_transitions: u64,
    num_trajectories: u64,
    budget_bytes: u64,
    spill_dir: Option<PathBuf>,
    spilled: bool,
}

impl Default for StatsAccumulator {
    fn default() -> Self {
        Self::new()
    }
}

impl StatsAccumulator {
    /// An accumulator with a 4 GiB in-memory budget for the value columns.
    pub fn new() -> Self {
        Self::with_memory_budget(4 << 30, None)
    }

    /// An accumulator that spills its columns to `spill_dir` (default: the system temp dir)
    /// once they would exceed `budget_bytes`.
    pub fn with_memory_budget(budget_bytes: u64, spill_dir: Option<PathBuf>) -> Self {
        Self {
            action: None,
            proprio: None,
            environment_state: None,
            environment_state_missing: false,
            num_transitions: 0,
            num_trajectories: 0,
            budget_bytes,
            spill_dir,
            spilled: false,
        }
    }

    /// Also computes real proprio statistics from each trajectory's state (the config's
    /// `state_key`), as OFT's `dataset_statistics.json` holds them; every trajectory must then
    /// carry one. Without this, proprio statistics are zeros shaped like the action, the
    /// reference OpenVLA's `load_proprio=False` output.
    pub fn with_proprio(mut self) -> Self {
        self.proprio = Some(None);
        self
    }

    /// Whether the columns were spilled to disk.
    pub fn spilled(&self) -> bool {
        self.spilled
    }

    /// Adds one trajectory's actions.
    pub fn push(&mut self, traj: &Trajectory) -> Result<()> {
        let a = &traj.actions;
        if a.rows == 0 {
            self.num_trajectories += 1;
            return Ok(());
        }
        self.push_environment_state(traj)?;
        let acc = self
            .action
            .get_or_insert_with(|| ArrayAccumulator::new(a.cols));
        if a.cols != acc.dim {
            return Err(DataError::Invalid(format!(
                "{} episode {} ({}): action has {} dims, earlier episodes had {}",
                traj.dataset_name, traj.episode_index, traj.source, a.cols, acc.dim
            )));
        }
        for i in 0..a.rows {
            acc.push_row(a.row(i))?;
        }
        if let Some(slot) = self.proprio.as_mut() {
            let p = traj.proprio.as_ref().ok_or_else(|| {
                DataError::Invalid(format!(
                    "{} episode {} ({}): no proprio state, but proprio statistics were asked \
                     for (the dataset config needs a `state_key`)",
                    traj.dataset_name, traj.episode_index, traj.source
                ))
            })?;
            push_per_step(slot, p, traj, "proprio")?;
        }
        self.num_transitions += a.rows as u64;
        self.num_trajectories += 1;
        if !self.spilled && acc.count * acc.dim as u64 * 4 > self.budget_bytes {
            let dir = self.spill_dir.clone().unwrap_or_else(std::env::temp_dir);
            static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let tag = format!(
                "openvla-stats-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            );
            acc.spill(&dir, &tag)?;
            self.spilled = true;
        }
        Ok(())
    }

    /// Accumulates the trajectory's environment state while every trajectory has one (the
    /// statistics cover a column only when the whole dataset records it).
    fn push_environment_state(&mut self, traj: &Trajectory) -> Result<()> {
        if self.environment_state_missing {
            return Ok(());
        }
        match &traj.environment_state {
            Some(e) => push_per_step(&mut self.environment_state, e, traj, "environment state"),
            None => {
                self.environment_state_missing = true;
                self.environment_state = None;
                Ok(())
            }
        }
    }

    /// Transitions seen so far.
    pub fn num_transitions(&self) -> u64 {
        self.num_transitions
    }

    /// Finishes: action stats with `mask`; proprio computed when asked for
    /// ([`StatsAccumulator::with_proprio`], no mask), else zeros shaped like the action (the
    /// reference's `load_proprio=False` behaviour).
    pub fn finish(self, mask: Option<Vec<bool>>) -> Result<DatasetStatistics> {
        let acc = self.action.ok_or_else(|| {
            DataError::Invalid(
                "no transitions: cannot compute statistics of an empty dataset".into(),
            )
        })?;
        let dim = acc.dim;
        let mut action = acc.finish()?;
        if let Some(m) = &mask {
            if m.len() != dim {
                return Err(DataError::Invalid(format!(
                    "normalization mask has {} entries, action has {dim} dims",
                    m.len()
                )));
            }
        }
        action.mask = mask;
        let proprio = match self.proprio {
            Some(Some(p)) => p.finish()?,
            _ => ArrayStats::zeros(dim),
        };
        // `None` once an episode without it was seen.
        let environment_state = self.environment_state.map(|e| e.finish()).transpose()?;
        Ok(DatasetStatistics {
            action,
            proprio: Some(proprio),
            environment_state,
            num_transitions: self.num_transitions,
            num_trajectories: self.num_trajectories,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trajectory::Matrix;
    use std::sync::Arc;

    fn traj(rows: usize, cols: usize, f: impl Fn(usize, usize) -> f32) -> Trajectory {
        let data = (0..rows * cols).map(|i| f(i / cols, i % cols)).collect();
        Trajectory {
            dataset_name: Arc::from("t"),
            episode_index: 0,
            source: String::new(),
            images: Vec::new(),
            wrist_images: None,
            actions: Matrix::new(rows, cols, data),
            proprio: None,
            environment_state: None,
            instructions: Vec::new(),
        }
    }

    #[test]
    fn numpy_linear_quantile() {
        // np.quantile([1,2,3,4], 0.01) = 1.03 ; 0.99 -> 3.97
        let v = [1.0, 2.0, 3.0, 4.0];
        assert!((quantile_sorted(&v, 0.01) - 1.03).abs() < 1e-12);
        assert!((quantile_sorted(&v, 0.99) - 3.97).abs() < 1e-12);
        assert_eq!(quantile_sorted(&[5.0], 0.99), 5.0);
    }

    #[test]
    fn spill_equals_memory() {
        let f = |i: usize, d: usize| {
            (((i * 7919 + d * 104729) % 1000) as f32 - 500.0) / 37.0
                + if d == 2 { 0.0 } else { 1e-3 }
        };
        let mut mem = StatsAccumulator::new();
        let dir = std::env::temp_dir();
        let mut sp = StatsAccumulator::with_memory_budget(64, Some(dir));
        for e in 0..20 {
            let t = traj(50 + e, 3, |i, d| f(i + e * 100, d));
            mem.push(&t).unwrap();
            sp.push(&t).unwrap();
        }
        assert!(sp.spilled());
        let a = mem.finish(None).unwrap();
        let b = sp.finish(None).unwrap();
        assert_eq!(a.action.q01, b.action.q01);
        assert_eq!(a.action.q99, b.action.q99);
        assert_eq!(a.action.max, b.action.max);
        assert_eq!(a.num_transitions, b.num_transitions);
    }

    #[test]
    fn keys_preserve_order() {
        let xs = [
            -3.5f32,
            -0.0,
            0.0,
            1e-30,
            2.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        for &a in &xs {
            assert_eq!(unkey(key(a)).to_bits(), a.to_bits());
            for &b in &xs {
                if a < b {
                    assert!(key(a) < key(b));
                }
            }
        }
    }
}
