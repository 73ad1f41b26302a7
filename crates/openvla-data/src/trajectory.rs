//! The standardized trajectory every reader produces and every later stage consumes.

use std::sync::Arc;

/// The LeRobot feature of privileged simulator state (object and goal positions), read into
/// [`Trajectory::environment_state`] whenever a LeRobot dataset has it.
pub const ENVIRONMENT_STATE_KEY: &str = "observation.environment_state";

/// A dense row-major `f32` matrix (`rows` steps by `cols` dimensions).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Matrix {
    /// Number of rows.
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
    /// `rows * cols` values, row-major.
    pub data: Vec<f32>,
}

impl Matrix {
    /// Wraps row-major data; `data.len()` must be `rows * cols`.
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        debug_assert_eq!(rows * cols, data.len());
        Self { rows, cols, data }
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    /// Mutable row `i`.
    pub fn row_mut(&mut self, i: usize) -> &mut [f32] {
        &mut self.data[i * self.cols..(i + 1) * self.cols]
    }

    /// Column `j` as a vector.
    pub fn column(&self, j: usize) -> Vec<f32> {
        (0..self.rows)
            .map(|i| self.data[i * self.cols + j])
            .collect()
    }

    /// Keeps the rows whose index passes `keep`.
    pub fn retain_rows(&mut self, mut keep: impl FnMut(usize) -> bool) {
        let cols = self.cols;
        let mut out = Vec::with_capacity(self.data.len());
        let mut rows = 0;
        for i in 0..self.rows {
            if keep(i) {
                out.extend_from_slice(&self.data[i * cols..(i + 1) * cols]);
                rows += 1;
            }
        }
        self.rows = rows;
        self.data = out;
    }

    /// Concatenates matrices with equal row counts along columns.
    pub fn hconcat(parts: &[Matrix]) -> Option<Matrix> {
        let rows = parts.first()?.rows;
        if parts.iter().any(|p| p.rows != rows) {
            return None;
        }
        let cols: usize = parts.iter().map(|p| p.cols).sum();
        let mut data = Vec::with_capacity(rows * cols);
        for i in 0..rows {
            for p in parts {
                data.extend_from_slice(p.row(i));
            }
        }
        Some(Matrix::new(rows, cols, data))
    }
}

/// An image as stored by the dataset.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageData {
    /// Encoded JPEG or PNG bytes (RLDS).
    Encoded(Arc<[u8]>),
    /// Decoded RGB8 pixels (video frames).
    Rgb {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
        /// `height * width * 3` bytes, row-major RGB.
        data: Arc<[u8]>,
    },
}

/// A trajectory after the per-dataset standardization transform (spec §7.5): primary camera,
/// 7-D (or 10-D) end-effector actions with the gripper in the last column (1 = open, 0 = closed),
/// and one language instruction per step. Actions are *not* normalized.
#[derive(Debug, Clone)]
pub struct Trajectory {
    /// Dataset name (the `unnorm_key`).
    pub dataset_name: Arc<str>,
    /// Episode index within the dataset's split.
    pub episode_index: u64,
    /// Where it came from (`shard@offset`, parquet file), for messages.
    pub source: String,
    /// Primary camera images, one per step.
    pub images: Vec<ImageData>,
    /// Wrist camera images, one per step, when the config names a wrist camera and the
    /// source was asked to load it ([`crate::source::DatasetSource::load_wrist`]).
    pub wrist_images: Option<Vec<ImageData>>,
    /// Standardized actions `[len, action_dim]`.
    pub actions: Matrix,
    /// Optional proprioceptive state `[len, d]` (the config's `state_key`; OFT's proprio).
    pub proprio: Option<Matrix>,
    /// Optional privileged environment state `[len, e]` (LeRobot's
    /// `observation.environment_state`: object and goal positions in simulation), for
    /// auxiliary training targets; never a policy input.
    pub environment_state: Option<Matrix>,
    /// Language instruction per step.
    pub instructions: Vec<String>,
}

impl Trajectory {
    /// Number of steps.
    pub fn len(&self) -> usize {
        self.actions.rows
    }

    /// Whether the trajectory has no steps.
    pub fn is_empty(&self) -> bool {
        self.actions.rows == 0
    }
}
