//! LeRobotDataset v3 (`codebase_version` "v3.0"): `meta/info.json` (features, fps, path
//! templates, splits), `meta/stats.json`, `meta/tasks.parquet`, `meta/episodes/*/*.parquet`
//! (per-episode data file, row range and video segment), `data/chunk-XXX/file-XXX.parquet`
//! (many episodes per file) and `videos/<key>/chunk-XXX/file-XXX.mp4`.
//!
//! Video frames are decoded by the system `ffmpeg` (spawned, RGB24 on a pipe). For an episode,
//! ffmpeg seeks to the episode's segment, decodes it with `showinfo` (which reports each frame's
//! presentation time), and each parquet row takes the frame whose time is closest to
//! `from_timestamp + timestamp`, as LeRobot's decoder does; a frame further than half a frame
//! period away is an error. ffmpeg must be installed (`tools/data/setup.sh`).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{Field, Row};
use serde_json::Value;

use crate::decode::RgbImage;
use crate::error::{DataError, Result};
use crate::oxe::configs::{ActionEncoding, DatasetConfig, GripperConvention, NoopFilter};
use crate::oxe::transforms::{standardize, RawSteps};
use crate::tfds::{resolve_split, DatasetInfo, SplitInfo};
use crate::trajectory::{ImageData, Matrix, Trajectory, ENVIRONMENT_STATE_KEY};

/// One feature of `info.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureInfo {
    /// `float32`, `int64`, `video`, `image`, `string`, ...
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
}

/// The parts of `meta/info.json` the reader uses.
#[derive(Debug, Clone)]
pub struct LeRobotInfo {
    /// `v3.0`.
    pub codebase_version: String,
    /// Frames per second.
    pub fps: f64,
    /// Features by name.
    pub features: BTreeMap<String, FeatureInfo>,
    /// Number of episodes.
    pub total_episodes: u64,
    /// Number of frames.
    pub total_frames: u64,
    /// Data file template.
    pub data_path: String,
    /// Video file template.
    pub video_path: Option<String>,
    /// Splits as episode ranges `"a:b"`.
    pub splits: BTreeMap<String, String>,
}

/// Where an episode's frames of one camera live.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoRef {
    /// Chunk index.
    pub chunk_index: i64,
    /// File index.
    pub file_index: i64,
    /// Start of the episode in the file, seconds.
    pub from_timestamp: f64,
    /// End of the episode in the file, seconds.
    pub to_timestamp: f64,
}

/// One row of `meta/episodes`.
#[derive(Debug, Clone, PartialEq)]
pub struct EpisodeMeta {
    /// Episode index.
    pub episode_index: i64,
    /// Number of frames.
    pub length: i64,
    /// Task strings.
    pub tasks: Vec<String>,
    /// Data chunk.
    pub data_chunk_index: i64,
    /// Data file.
    pub data_file_index: i64,
    /// First global frame index.
    pub dataset_from_index: i64,
    /// End global frame index (exclusive).
    pub dataset_to_index: i64,
    /// Video segments by video key.
    pub videos: BTreeMap<String, VideoRef>,
}

/// An opened LeRobot v3 dataset.
#[derive(Debug, Clone)]
pub struct LeRobotDataset {
    /// Root directory.
    pub root: PathBuf,
    /// `meta/info.json`.
    pub info: LeRobotInfo,
    /// Task strings by task index.
    pub tasks: BTreeMap<i64, String>,
    /// Episodes, sorted by index.
    pub episodes: Vec<EpisodeMeta>,
}

/// The frames of one episode, read from its data file.
#[derive(Debug, Clone, Default)]
pub struct EpisodeFrames {
    /// Numeric columns (`action`, `observation.state`, ...) as `[len, dim]`.
    pub columns: BTreeMap<String, Matrix>,
    /// `timestamp` per frame.
    pub timestamps: Vec<f64>,
    /// `task_index` per frame.
    pub task_index: Vec<i64>,
    /// `index` (global frame index) per frame.
    pub index: Vec<i64>,
}

fn pq_err(path: &Path, e: impl std::fmt::Display) -> DataError {
    DataError::Parquet {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn read_rows(path: &Path) -> Result<Vec<Row>> {
    let f = File::open(path).map_err(|e| DataError::io(path, e))?;
    let reader = SerializedFileReader::new(f).map_err(|e| pq_err(path, e))?;
    let iter = reader.get_row_iter(None).map_err(|e| pq_err(path, e))?;
    iter.map(|r| r.map_err(|e| pq_err(path, e))).collect()
}

fn as_i64(f: &Field) -> Option<i64> {
    match f {
        Field::Long(v) => Some(*v),
        Field::Int(v) => Some(*v as i64),
        Field::Short(v) => Some(*v as i64),
        Field::Byte(v) => Some(*v as i64),
        Field::UInt(v) => Some(*v as i64),
        Field::ULong(v) => i64::try_from(*v).ok(),
        Field::Bool(v) => Some(*v as i64),
        _ => None,
    }
}

fn as_f64(f: &Field) -> Option<f64> {
    match f {
        Field::Float(v) => Some(*v as f64),
        Field::Double(v) => Some(*v),
        Field::Float16(v) => Some(f64::from(*v)),
        other => as_i64(other).map(|v| v as f64),
    }
}

/// Flattens a (possibly nested list) numeric field into `out`.
fn flatten_numbers(f: &Field, out: &mut Vec<f32>) -> bool {
    match f {
        Field::ListInternal(l) => l.elements().iter().all(|e| flatten_numbers(e, out)),
        other => match as_f64(other) {
            Some(v) => {
                out.push(v as f32);
                true
            }
            None => false,
        },
    }
}

fn row_map(row: &Row) -> HashMap<&str, &Field> {
    row.get_column_iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect()
}

fn json_usize_list(v: Option<&Value>) -> Vec<usize> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_u64)
                .map(|x| x as usize)
                .collect()
        })
        .unwrap_or_default()
}

/// Python-style `{name:03d}` template formatting for the few names LeRobot uses.
fn fill_template(t: &str, vars: &[(&str, String)]) -> String {
    let mut out = t.to_string();
    for (k, v) in vars {
        for spec in [format!("{{{k}:03d}}"), format!("{{{k}}}")] {
            if out.contains(&spec) {
                let val = if spec.ends_with(":03d}") {
                    match v.parse::<i64>() {
                        Ok(n) => format!("{n:03}"),
                        Err(_) => v.clone(),
                    }
                } else {
                    v.clone()
                };
                out = out.replace(&spec, &val);
            }
        }
    }
    out
}

impl LeRobotDataset {
    /// Whether `path` looks like a LeRobot dataset root.
    pub fn is_lerobot(path: &Path) -> bool {
        path.join("meta").join("info.json").is_file()
    }

    /// Opens a dataset root.
    pub fn open(root: &Path) -> Result<Self> {
        let info_path = root.join("meta").join("info.json");
        let text = std::fs::read_to_string(&info_path).map_err(|e| DataError::io(&info_path, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| DataError::metadata(&info_path, format!("invalid JSON: {e}")))?;
        let codebase_version = v
            .get("codebase_version")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if !codebase_version.starts_with("v3") {
            return Err(DataError::metadata(
                &info_path,
                format!("codebase_version `{codebase_version}` is not supported (only v3.x)"),
            ));
        }
        let mut features = BTreeMap::new();
        if let Some(obj) = v.get("features").and_then(Value::as_object) {
            for (k, f) in obj {
                features.insert(
                    k.clone(),
                    FeatureInfo {
                        dtype: f
                            .get("dtype")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                        shape: json_usize_list(f.get("shape")),
                    },
                );
            }
        }
        let num = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        let info = LeRobotInfo {
            codebase_version,
            fps: v
                .get("fps")
                .and_then(Value::as_f64)
                .ok_or_else(|| DataError::metadata(&info_path, "no `fps`"))?,
            features,
            total_episodes: num("total_episodes"),
            total_frames: num("total_frames"),
            data_path: v
                .get("data_path")
                .and_then(Value::as_str)
                .ok_or_else(|| DataError::metadata(&info_path, "no `data_path`"))?
                .to_string(),
            video_path: v
                .get("video_path")
                .and_then(Value::as_str)
                .map(str::to_string),
            splits: v
                .get("splits")
                .and_then(Value::as_object)
                .map(|o| {
                    o.iter()
                        .filter_map(|(k, s)| s.as_str().map(|s| (k.clone(), s.to_string())))
                        .collect()
                })
                .unwrap_or_default(),
        };
        let tasks = Self::load_tasks(&root.join("meta").join("tasks.parquet"))?;
        let episodes = Self::load_episodes(&root.join("meta").join("episodes"))?;
        Ok(Self {
            root: root.to_path_buf(),
            info,
            tasks,
            episodes,
        })
    }

    /// The standardization LeRobot's own conventions give this dataset, read from
    /// `meta/info.json` alone: the camera features (`dtype` video or image) in name order, the
    /// first whose name does not contain `wrist` as the primary camera and the first that does
    /// as the wrist camera; `observation.state` as the state; `action` as the action, kept in
    /// its own space ([`ActionEncoding::Raw`], gripper [`GripperConvention::AsIs`]); the
    /// episode's `task` as the instruction. A `--dataset-config` file overrides all of it.
    pub fn default_config(&self, name: &str) -> Result<DatasetConfig> {
        let info_path = self.root.join("meta").join("info.json");
        let cameras: Vec<&String> = self
            .info
            .features
            .iter()
            .filter(|(_, f)| f.dtype == "video" || f.dtype == "image")
            .map(|(k, _)| k)
            .collect();
        let is_wrist = |k: &str| k.to_ascii_lowercase().contains("wrist");
        let primary = cameras
            .iter()
            .find(|k| !is_wrist(k))
            .or_else(|| cameras.first())
            .ok_or_else(|| {
                DataError::metadata(
                    &info_path,
                    "no camera feature (a feature with dtype `video` or `image`); describe the \
                     dataset with --dataset-config FILE",
                )
            })?;
        let wrist = cameras
            .iter()
            .find(|k| is_wrist(k) && *k != primary)
            .map(|k| k.to_string());
        let action = self.info.features.get("action").ok_or_else(|| {
            DataError::metadata(
                &info_path,
                format!(
                    "no `action` feature (features: {}); describe the dataset with \
                     --dataset-config FILE",
                    self.info
                        .features
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })?;
        let action_dim = match action.shape.as_slice() {
            [n] if *n > 0 => *n,
            other => {
                return Err(DataError::metadata(
                    &info_path,
                    format!("`action` has shape {other:?}; expected one dimension [N], N >= 1"),
                ))
            }
        };
        let cfg = DatasetConfig {
            name: name.to_string(),
            image_key: primary.to_string(),
            wrist_image_key: wrist,
            language_key: "task".into(),
            action_keys: vec!["action".into()],
            state_key: self
                .info
                .features
                .contains_key("observation.state")
                .then(|| "observation.state".to_string()),
            gripper: GripperConvention::AsIs,
            drop_first_step: false,
            relabel_actions_from_state: false,
            noop_filter: NoopFilter::None,
            action_encoding: ActionEncoding::Raw(action_dim),
        };
        cfg.validate()
            .map_err(|m| DataError::metadata(&info_path, m))?;
        Ok(cfg)
    }

    fn load_tasks(path: &Path) -> Result<BTreeMap<i64, String>> {
        let mut out = BTreeMap::new();
        for row in read_rows(path)? {
            let m = row_map(&row);
            let idx = m
                .get("task_index")
                .and_then(|f| as_i64(f))
                .ok_or_else(|| pq_err(path, "no integer `task_index` column"))?;
            // pandas may store the task as the index column.
            let task = ["task", "__index_level_0__"]
                .iter()
                .find_map(|k| match m.get(k) {
                    Some(Field::Str(s)) => Some(s.clone()),
                    _ => None,
                })
                .ok_or_else(|| pq_err(path, "no string `task` column"))?;
            out.insert(idx, task);
        }
        Ok(out)
    }

    fn load_episodes(dir: &Path) -> Result<Vec<EpisodeMeta>> {
        let mut files = Vec::new();
        let chunks = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
        for c in chunks.flatten() {
            if let Ok(rd) = std::fs::read_dir(c.path()) {
                for f in rd.flatten() {
                    if f.path().extension().is_some_and(|e| e == "parquet") {
                        files.push(f.path());
                    }
                }
            }
        }
        files.sort();
        let mut eps = Vec::new();
        for path in files {
            for row in read_rows(&path)? {
                let m = row_map(&row);
                let int = |k: &str| -> Result<i64> {
                    m.get(k)
                        .and_then(|f| as_i64(f))
                        .ok_or_else(|| pq_err(&path, format!("missing integer column `{k}`")))
                };
                let tasks = match m.get("tasks") {
                    Some(Field::ListInternal(l)) => l
                        .elements()
                        .iter()
                        .filter_map(|e| match e {
                            Field::Str(s) => Some(s.clone()),
                            _ => None,
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                let mut videos = BTreeMap::new();
                for (k, f) in m.iter() {
                    if let Some(rest) = k.strip_prefix("videos/") {
                        if let Some(key) = rest.strip_suffix("/from_timestamp") {
                            let g = |s: &str| m.get(format!("videos/{key}/{s}").as_str()).copied();
                            videos.insert(
                                key.to_string(),
                                VideoRef {
                                    chunk_index: g("chunk_index").and_then(as_i64).unwrap_or(0),
                                    file_index: g("file_index").and_then(as_i64).unwrap_or(0),
                                    from_timestamp: as_f64(f).unwrap_or(0.0),
                                    to_timestamp: g("to_timestamp").and_then(as_f64).unwrap_or(0.0),
                                },
                            );
                        }
                    }
                }
                eps.push(EpisodeMeta {
                    episode_index: int("episode_index")?,
                    length: int("length")?,
                    tasks,
                    data_chunk_index: int("data/chunk_index")?,
                    data_file_index: int("data/file_index")?,
                    dataset_from_index: int("dataset_from_index")?,
                    dataset_to_index: int("dataset_to_index")?,
                    videos,
                });
            }
        }
        eps.sort_by_key(|e| e.episode_index);
        Ok(eps)
    }

    /// `meta/stats.json` as JSON (LeRobot's own mean/std/min/max per feature).
    pub fn stats(&self) -> Result<Value> {
        let p = self.root.join("meta").join("stats.json");
        let text = std::fs::read_to_string(&p).map_err(|e| DataError::io(&p, e))?;
        serde_json::from_str(&text).map_err(|e| DataError::metadata(&p, e.to_string()))
    }

    /// The dataset name (the root directory's name).
    pub fn name(&self) -> String {
        self.root
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "lerobot".into())
    }

    /// The splits as a TFDS-like [`DatasetInfo`] over episodes, so that `train[:95%]` works.
    pub fn split_info(&self) -> DatasetInfo {
        let n = self.episodes.len() as u64;
        let mut splits: Vec<SplitInfo> = self
            .info
            .splits
            .iter()
            .filter_map(|(k, r)| {
                let (a, b) = r.split_once(':')?;
                let (a, b): (u64, u64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                Some(SplitInfo {
                    name: k.clone(),
                    shard_lengths: vec![b.saturating_sub(a)],
                    num_bytes: a, // start offset, see `episode_range`
                    filepath_template: String::new(),
                })
            })
            .collect();
        if splits.is_empty() {
            splits.push(SplitInfo {
                name: "train".into(),
                shard_lengths: vec![n],
                num_bytes: 0,
                filepath_template: String::new(),
            });
        }
        DatasetInfo {
            name: self.name(),
            version: self.info.codebase_version.clone(),
            file_format: "parquet".into(),
            splits,
        }
    }

    /// Positions (into [`Self::episodes`]) selected by a split expression.
    pub fn select(&self, split: &str) -> Result<Vec<usize>> {
        let info = self.split_info();
        let mut out = Vec::new();
        for s in resolve_split(split, &info)? {
            let start = info.split(&s.split).map(|x| x.num_bytes).unwrap_or(0);
            for e in (start + s.from)..(start + s.to) {
                if let Some(pos) = self
                    .episodes
                    .iter()
                    .position(|m| m.episode_index == e as i64)
                {
                    out.push(pos);
                }
            }
        }
        Ok(out)
    }

    fn data_file(&self, chunk: i64, file: i64) -> PathBuf {
        self.root.join(fill_template(
            &self.info.data_path,
            &[
                ("chunk_index", chunk.to_string()),
                ("file_index", file.to_string()),
                ("episode_chunk", chunk.to_string()),
            ],
        ))
    }

    /// The video file of camera `key` for an episode.
    pub fn video_file(&self, key: &str, v: &VideoRef) -> Result<PathBuf> {
        let t = self.info.video_path.as_deref().ok_or_else(|| {
            DataError::metadata(
                self.root.join("meta/info.json"),
                "no `video_path` but a video feature is used",
            )
        })?;
        Ok(self.root.join(fill_template(
            t,
            &[
                ("video_key", key.to_string()),
                ("chunk_index", v.chunk_index.to_string()),
                ("file_index", v.file_index.to_string()),
            ],
        )))
    }

    /// Reads all frames of a data file, grouped by episode index.
    pub fn read_data_file(&self, chunk: i64, file: i64) -> Result<BTreeMap<i64, EpisodeFrames>> {
        let path = self.data_file(chunk, file);
        let mut out: BTreeMap<i64, EpisodeFrames> = BTreeMap::new();
        let numeric: Vec<&String> = self
            .info
            .features
            .iter()
            .filter(|(_, f)| !matches!(f.dtype.as_str(), "video" | "image" | "string"))
            .map(|(k, _)| k)
            .collect();
        for row in read_rows(&path)? {
            let m = row_map(&row);
            let ep = m
                .get("episode_index")
                .and_then(|f| as_i64(f))
                .ok_or_else(|| pq_err(&path, "row without `episode_index`"))?;
            let fr = out.entry(ep).or_default();
            fr.timestamps
                .push(m.get("timestamp").and_then(|f| as_f64(f)).unwrap_or(0.0));
            fr.task_index
                .push(m.get("task_index").and_then(|f| as_i64(f)).unwrap_or(0));
            fr.index
                .push(m.get("index").and_then(|f| as_i64(f)).unwrap_or(0));
            for k in &numeric {
                if let Some(f) = m.get(k.as_str()) {
                    let col = fr.columns.entry((*k).clone()).or_default();
                    let before = col.data.len();
                    if !flatten_numbers(f, &mut col.data) {
                        return Err(pq_err(&path, format!("column `{k}` is not numeric")));
                    }
                    let w = col.data.len() - before;
                    if col.rows > 0 && w != col.cols {
                        return Err(pq_err(&path, format!("column `{k}` changes width")));
                    }
                    col.cols = w;
                    col.rows += 1;
                }
            }
        }
        Ok(out)
    }

    /// Decodes camera `key` of an episode at the given per-frame timestamps (seconds from the
    /// episode start), with the system ffmpeg.
    pub fn decode_frames(
        &self,
        key: &str,
        ep: &EpisodeMeta,
        timestamps: &[f64],
    ) -> Result<Vec<RgbImage>> {
        let v = ep.videos.get(key).ok_or_else(|| {
            DataError::Invalid(format!(
                "{}: episode {} has no video `{key}` (videos: {})",
                self.root.display(),
                ep.episode_index,
                ep.videos.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })?;
        let path = self.video_file(key, v)?;
        if !path.is_file() {
            return Err(DataError::Video {
                path,
                message: "video file missing".into(),
            });
        }
        if timestamps.is_empty() {
            return Ok(Vec::new());
        }
        let period = 1.0 / self.info.fps;
        let start = (v.from_timestamp + timestamps.iter().cloned().fold(f64::INFINITY, f64::min)
            - period / 2.0)
            .max(0.0);
        let count = timestamps.len() + 2;
        let frames = run_ffmpeg(&path, start, count)?;
        let mut out = Vec::with_capacity(timestamps.len());
        for &t in timestamps {
            let want = v.from_timestamp + t;
            let best = frames
                .iter()
                .min_by(|a, b| (a.0 - want).abs().total_cmp(&(b.0 - want).abs()))
                .ok_or_else(|| DataError::Video {
                    path: path.clone(),
                    message: format!("no frames decoded from {start:.4}s"),
                })?;
            if (best.0 - want).abs() > period / 2.0 {
                return Err(DataError::Video {
                    path: path.clone(),
                    message: format!(
                        "no frame near {want:.4}s (closest at {:.4}s); episode {} key {key}",
                        best.0, ep.episode_index
                    ),
                });
            }
            out.push(best.1.clone());
        }
        Ok(out)
    }

    /// Streams standardized trajectories of a split, decoding video frames with ffmpeg.
    pub fn trajectories(&self, cfg: &DatasetConfig, split: &str) -> Result<LeRobotTrajectories> {
        Ok(LeRobotTrajectories {
            load_images: true,
            ds: self.clone(),
            cfg: cfg.clone(),
            order: self.select(split)?.into_iter(),
            cache: None,
            load_wrist: false,
        })
    }

    /// Reads one episode's raw columns as the config asks (no standardization); with
    /// `load_images` false the frames are empty placeholders; `wrist` also decodes the config's
    /// wrist camera.
    pub fn raw_steps(
        &self,
        cfg: &DatasetConfig,
        pos: usize,
        frames: &EpisodeFrames,
        load_images: bool,
        wrist: bool,
    ) -> Result<RawSteps> {
        let ep = self
            .episodes
            .get(pos)
            .ok_or_else(|| DataError::Invalid(format!("no episode at position {pos}")))?;
        let ctx = format!("{} episode {}", self.root.display(), ep.episode_index);
        let col = |k: &str| -> Result<Matrix> {
            frames
                .columns
                .get(k)
                .cloned()
                .ok_or_else(|| DataError::MissingFeature {
                    context: ctx.clone(),
                    key: k.to_string(),
                    available: frames
                        .columns
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", "),
                })
        };
        let parts = cfg
            .action_keys
            .iter()
            .map(|k| col(k))
            .collect::<Result<Vec<_>>>()?;
        let actions = Matrix::hconcat(&parts)
            .ok_or_else(|| DataError::Invalid(format!("{ctx}: action columns differ in length")))?;
        let state = match &cfg.state_key {
            Some(k) => Some(col(k)?),
            None => None,
        };
        // LeRobot's name for privileged simulator state; read whenever the dataset has it.
        let environment_state = if self.info.features.contains_key(ENVIRONMENT_STATE_KEY) {
            Some(col(ENVIRONMENT_STATE_KEY)?)
        } else {
            None
        };
        let instructions: Vec<String> = if cfg.language_key == "task" {
            frames
                .task_index
                .iter()
                .map(|i| self.tasks.get(i).cloned().unwrap_or_default())
                .collect()
        } else {
            return Err(DataError::Invalid(format!(
                "{ctx}: LeRobot language comes from the episode tasks; set language_key = \"task\" (got `{}`)",
                cfg.language_key
            )));
        };
        let camera = |key: &str| -> Result<Vec<ImageData>> {
            let feat = self
                .info
                .features
                .get(key)
                .ok_or_else(|| DataError::MissingFeature {
                    context: ctx.clone(),
                    key: key.to_string(),
                    available: self
                        .info
                        .features
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", "),
                })?;
            if feat.dtype != "video" {
                return Err(DataError::Invalid(format!(
                    "{ctx}: camera `{key}` has dtype `{}`; only video cameras are supported",
                    feat.dtype
                )));
            }
            let imgs = if load_images {
                self.decode_frames(key, ep, &frames.timestamps)?
            } else {
                vec![RgbImage::zeros(0, 0); frames.timestamps.len()]
            };
            Ok(imgs
                .into_iter()
                .map(|im| ImageData::Rgb {
                    width: im.width,
                    height: im.height,
                    data: Arc::from(im.data),
                })
                .collect())
        };
        let images = camera(&cfg.image_key)?;
        let wrist_images = if wrist && load_images {
            Some(camera(cfg.wrist_key()?)?)
        } else {
            None
        };
        Ok(RawSteps {
            dataset_name: Arc::from(cfg.name.as_str()),
            episode_index: ep.episode_index as u64,
            source: ctx,
            images,
            wrist_images,
            actions,
            state,
            environment_state,
            instructions,
        })
    }
}

/// Decodes `count` frames from `start` seconds: `(pts seconds, frame)` pairs.
fn run_ffmpeg(path: &Path, start: f64, count: usize) -> Result<Vec<(f64, RgbImage)>> {
    let verr = |m: String| DataError::Video {
        path: path.to_path_buf(),
        message: m,
    };
    let mut child = Command::new("ffmpeg")
        .args(["-hide_banner", "-nostdin", "-nostats", "-loglevel", "info", "-copyts"])
        .args(["-ss", &format!("{start:.6}")])
        .arg("-i")
        .arg(path)
        .args(["-map", "0:v:0", "-frames:v", &count.to_string()])
        .args(["-vf", "showinfo", "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            verr(format!(
                "cannot run `ffmpeg` ({e}); install it (Debian: tools/data/setup.sh or `apt-get install ffmpeg`)"
            ))
        })?;
    let mut stderr = child
        .stderr
        .take()
        .ok_or_else(|| verr("no stderr pipe".into()))?;
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        stderr.read_to_string(&mut s).ok();
        s
    });
    let mut raw = Vec::new();
    if let Some(mut out) = child.stdout.take() {
        out.read_to_end(&mut raw).map_err(|e| verr(e.to_string()))?;
    }
    let status = child.wait().map_err(|e| verr(e.to_string()))?;
    let log = err_thread.join().unwrap_or_default();
    if !status.success() {
        let tail: String = log.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
        return Err(verr(format!("ffmpeg failed ({status}): {tail}")));
    }
    let mut frames = Vec::new();
    let mut offset = 0usize;
    for line in log
        .lines()
        .filter(|l| l.contains("showinfo") && l.contains("pts_time:"))
    {
        let field = |name: &str| -> Option<&str> {
            let i = line.find(name)? + name.len();
            line[i..].split_whitespace().next()
        };
        let pts: f64 = field("pts_time:")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| verr(format!("bad showinfo line: {line}")))?;
        let (w, h) = field(" s:")
            .and_then(|s| s.split_once('x'))
            .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)))
            .ok_or_else(|| verr(format!("bad showinfo line: {line}")))?;
        let n = w as usize * h as usize * 3;
        if offset + n > raw.len() {
            // showinfo sits before the output's frame limit, so it may report frames that
            // were never written: the first frames on stdout are the first ones it reported.
            break;
        }
        frames.push((
            pts,
            RgbImage {
                width: w,
                height: h,
                data: raw[offset..offset + n].to_vec(),
            },
        ));
        offset += n;
    }
    Ok(frames)
}

/// Iterator of standardized LeRobot trajectories (see [`LeRobotDataset::trajectories`]).
pub struct LeRobotTrajectories {
    load_images: bool,
    ds: LeRobotDataset,
    cfg: DatasetConfig,
    order: std::vec::IntoIter<usize>,
    cache: Option<((i64, i64), BTreeMap<i64, EpisodeFrames>)>,
    load_wrist: bool,
}

impl LeRobotTrajectories {
    /// Skips video decoding (frames become empty placeholders): for statistics, which only
    /// need actions.
    pub fn without_images(mut self) -> Self {
        self.load_images = false;
        self
    }

    /// Also decodes the config's wrist camera (OFT's second image).
    pub fn with_wrist(mut self) -> Self {
        self.load_wrist = true;
        self
    }

    fn load(&mut self, pos: usize) -> Result<Trajectory> {
        let ep = self.ds.episodes[pos].clone();
        let key = (ep.data_chunk_index, ep.data_file_index);
        if self.cache.as_ref().map(|c| c.0) != Some(key) {
            let frames = self.ds.read_data_file(key.0, key.1)?;
            self.cache = Some((key, frames));
        }
        let frames = self
            .cache
            .as_ref()
            .and_then(|c| c.1.get(&ep.episode_index))
            .cloned()
            .unwrap_or_default();
        let raw = self
            .ds
            .raw_steps(&self.cfg, pos, &frames, self.load_images, self.load_wrist)?;
        standardize(&self.cfg, raw)
    }
}

impl Iterator for LeRobotTrajectories {
    type Item = Result<Trajectory>;

    fn next(&mut self) -> Option<Self::Item> {
        let pos = self.order.next()?;
        Some(self.load(pos))
    }
}
