//! Opening a dataset by path, whatever its format, and streaming its standardized trajectories.
//!
//! * A LeRobot v3 root (has `meta/info.json`).
//! * An RLDS/TFDS version directory (has `dataset_info.json`), or a dataset directory with
//!   version subdirectories, or a data root holding `<name>/<version>/`.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use crate::error::{DataError, Result};
use crate::oxe::configs::DatasetConfig;
use crate::oxe::transforms::standardize_episode;
use crate::rlds::RldsDataset;
use crate::trajectory::Trajectory;

/// The format of an opened dataset.
#[derive(Debug, Clone)]
pub enum Format {
    /// RLDS in TFDS layout.
    Rlds(RldsDataset),
    /// LeRobotDataset v3.
    #[cfg(feature = "lerobot")]
    LeRobot(crate::lerobot::LeRobotDataset),
}

/// A dataset plus the configuration that standardizes it.
#[derive(Debug, Clone)]
pub struct DatasetSource {
    /// Standardization config (its `name` is the statistics key).
    pub config: DatasetConfig,
    /// The data.
    pub format: Format,
    /// The path it was opened from.
    pub path: PathBuf,
    /// Whether trajectories carry images (false: empty placeholders, no video decoding; the
    /// statistics pass turns this off).
    pub load_images: bool,
    /// Whether trajectories also carry the config's wrist camera (OFT's second image); off by
    /// default, and ignored when `load_images` is off.
    pub load_wrist: bool,
}

/// A boxed trajectory iterator that can move to a reader thread.
pub type TrajectoryIter = Box<dyn Iterator<Item = Result<Trajectory>> + Send>;

impl DatasetSource {
    /// Opens `data` (see the module docs). `name` picks a dataset under a data root and selects
    /// the built-in config; `config` is a custom TOML/JSON description that overrides it.
    pub fn open(data: &Path, name: Option<&str>, config: Option<&Path>) -> Result<Self> {
        #[cfg(feature = "lerobot")]
        if crate::lerobot::LeRobotDataset::is_lerobot(data) {
            let ds = crate::lerobot::LeRobotDataset::open(data)?;
            let name = name.map(str::to_string).unwrap_or_else(|| ds.name());
            // A config file wins, then a built-in name, then LeRobot's own conventions read
            // from meta/info.json.
            let cfg = match (config, DatasetConfig::builtin(&name)) {
                (Some(_), _) => DatasetConfig::resolve(&name, config)?,
                (None, Some(builtin)) => builtin,
                (None, None) => ds.default_config(&name)?,
            };
            return Ok(Self {
                config: cfg,
                format: Format::LeRobot(ds),
                path: data.to_path_buf(),
                load_images: true,
                load_wrist: false,
            });
        }
        let dir = match name {
            Some(n) if data.join(n).is_dir() => data.join(n),
            Some(n) if !looks_like_tfds(data) => {
                return Err(DataError::Invalid(format!(
                    "dataset `{n}` not found under {} (expected {}/<version>/dataset_info.json)",
                    data.display(),
                    data.join(n).display()
                )))
            }
            _ => data.to_path_buf(),
        };
        let ds = RldsDataset::open(&dir)?;
        let key = name.unwrap_or(ds.name()).to_string();
        let cfg = DatasetConfig::resolve(&key, config)?;
        Ok(Self {
            config: cfg,
            format: Format::Rlds(ds),
            path: dir,
            load_images: true,
            load_wrist: false,
        })
    }

    /// The dataset's statistics key.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The reference's split choice for training or validation.
    pub fn reference_split(&self, train: bool) -> String {
        match &self.format {
            Format::Rlds(d) => d.reference_split(train).to_string(),
            #[cfg(feature = "lerobot")]
            Format::LeRobot(d) => {
                let has_val = d.info.splits.contains_key("val");
                match (has_val, train) {
                    (true, true) => "train".into(),
                    (true, false) => "val".into(),
                    (false, true) => "train[:95%]".into(),
                    (false, false) => "train[95%:]".into(),
                }
            }
        }
    }

    /// The width of the dataset's privileged environment state (LeRobot's
    /// `observation.environment_state`, a 1-D feature), if it records one; RLDS datasets have
    /// none.
    pub fn environment_state_dim(&self) -> Option<usize> {
        match &self.format {
            Format::Rlds(_) => None,
            #[cfg(feature = "lerobot")]
            Format::LeRobot(d) => d
                .info
                .features
                .get(crate::trajectory::ENVIRONMENT_STATE_KEY)
                .and_then(|f| match f.shape.as_slice() {
                    [n] => Some(*n),
                    _ => None,
                }),
        }
    }

    /// Number of episodes in a split expression.
    pub fn num_episodes(&self, split: &str) -> Result<u64> {
        match &self.format {
            Format::Rlds(d) => d.num_episodes(split),
            #[cfg(feature = "lerobot")]
            Format::LeRobot(d) => Ok(d.select(split)?.len() as u64),
        }
    }

    /// Frames in a split before standardization (an upper bound on the frames it yields), when
    /// the format records it without reading the data: LeRobot's episode lengths; `None` for
    /// RLDS, whose metadata counts episodes only.
    pub fn num_frames(&self, split: &str) -> Result<Option<u64>> {
        match &self.format {
            Format::Rlds(_) => Ok(None),
            #[cfg(feature = "lerobot")]
            Format::LeRobot(d) => Ok(Some(
                d.select(split)?
                    .into_iter()
                    .map(|i| d.episodes[i].length.max(0) as u64)
                    .sum(),
            )),
        }
    }

    /// Streams standardized trajectories. `skipped` counts corrupt records skipped (RLDS with
    /// `skip_corrupt`).
    pub fn trajectories(
        &self,
        split: &str,
        skip_corrupt: bool,
        skipped: Option<Arc<AtomicU64>>,
    ) -> Result<TrajectoryIter> {
        match &self.format {
            Format::Rlds(d) => {
                d.check_shards(split)?;
                let it = d.episodes(split, skip_corrupt)?;
                let it = match skipped {
                    Some(c) => it.with_counter(c),
                    None => it,
                };
                let cfg = self.config.clone();
                let wrist = self.load_images && self.load_wrist;
                Ok(Box::new(
                    it.map(move |ep| standardize_episode(&cfg, &ep?, wrist)),
                ))
            }
            #[cfg(feature = "lerobot")]
            Format::LeRobot(d) => {
                let it = d.trajectories(&self.config, split)?;
                Ok(if !self.load_images {
                    Box::new(it.without_images())
                } else if self.load_wrist {
                    Box::new(it.with_wrist())
                } else {
                    Box::new(it)
                })
            }
        }
    }
}

fn looks_like_tfds(p: &Path) -> bool {
    crate::tfds::find_version_dir(p).is_ok()
}

impl DatasetSource {
    /// Computes `dataset_statistics.json` values over `split` (the reference uses `all`),
    /// streaming, with an optional progress bar (its length is set to the episode count).
    pub fn compute_statistics(
        &self,
        split: &str,
        skip_corrupt: bool,
        skipped: Option<Arc<AtomicU64>>,
        progress: Option<&indicatif::ProgressBar>,
        accumulator: crate::stats::StatsAccumulator,
    ) -> Result<crate::stats::DatasetStatistics> {
        let mut acc = accumulator;
        let this = DatasetSource {
            load_images: false,
            ..self.clone()
        };
        if let Some(pb) = progress {
            pb.set_length(self.num_episodes(split)?);
        }
        for t in this.trajectories(split, skip_corrupt, skipped)? {
            let t = t?;
            acc.push(&t)?;
            if let Some(pb) = progress {
                pb.inc(1);
                pb.set_message(format!("{} transitions", acc.num_transitions()));
            }
        }
        acc.finish(Some(self.config.action_encoding.normalization_mask()))
    }
}
