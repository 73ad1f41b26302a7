//! The streaming frame pipeline a training loop consumes (spec §7.5 "Mixing" and "Frame
//! transforms"), with all decoding off the consumer's thread and bounded memory:
//!
//! ```text
//!  reader thread per dataset    standardize -> skip unlabeled -> BOUNDS_Q99 -> frames
//!        | bounded channel (prefetch frames, encoded images)
//!  mixer thread                 weighted sampling across datasets -> shuffle buffer -> seq no.
//!        | bounded channel
//!  N decode workers             decode JPEG/PNG -> lanczos3 resize -> augmentation (seeded by seq)
//!        | bounded channel
//!  FrameStream (consumer)       reorders by seq, so the order is the same for a given seed
//!                               whatever the thread timing
//! ```
//!
//! Memory is bounded by `shuffle_buffer + 3 * prefetch` frames held as encoded images, plus
//! `decode_threads + prefetch` decoded 224x224 images, plus the replay cache below. In `repeat`
//! mode (training) each dataset loops forever, like the reference's `.repeat()`; otherwise the
//! stream ends when every dataset is exhausted.
//!
//! Two rules keep small datasets from being re-read over and over:
//! - the shuffle buffer never holds more frames than one pass over the datasets has (when the
//!   format knows that count, as LeRobot's metadata does): a 100 000-frame buffer over a
//!   36-frame dataset would otherwise read it about 2 800 times before the first sample;
//! - in `repeat` mode a reader keeps the frames of its first pass (images as stored: encoded, or
//!   decoded video frames) while they fit in `replay_cache_bytes`, and replays later passes from
//!   memory, so each video is decoded once per run instead of once per pass.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::augment::{augment, AugmentConfig};
use crate::decode::{decode_image_data, RgbImage};
use crate::error::{DataError, Result};
use crate::mixture::{ShuffleBuffer, WeightedSampler};
use crate::normalize::{normalize_rows, Normalization};
use crate::resize::resize_lanczos3;
use crate::rng::Rng;
use crate::source::DatasetSource;
use crate::stats::DatasetStatistics;
use crate::trajectory::ImageData;

/// Pipeline settings.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// Seed for sampling, shuffling and augmentation.
    pub seed: u64,
    /// Frame shuffle buffer size (the reference uses 100 000 for fine-tuning).
    pub shuffle_buffer: usize,
    /// Decode worker threads.
    pub decode_threads: usize,
    /// Output image size `(width, height)`; `None` keeps the stored size.
    pub image_size: Option<(u32, u32)>,
    /// Training augmentation, if any.
    pub augment: Option<AugmentConfig>,
    /// Loop over each dataset forever (training).
    pub repeat: bool,
    /// Capacity of each bounded channel, in frames.
    pub prefetch: usize,
    /// Skip corrupt TFRecords (counted in [`FrameStream::skipped`]).
    pub skip_corrupt: bool,
    /// Drop trajectories whose instructions are all empty (the reference's `skip_unlabeled`).
    pub skip_unlabeled: bool,
    /// Per dataset, the most image bytes a reader keeps to replay later passes from memory
    /// (`repeat` mode only); a dataset larger than this is re-read each pass. 0 disables it.
    pub replay_cache_bytes: usize,
    /// Actions per sample: the current one and the next `action_chunk - 1` of its episode
    /// (OFT's `NUM_ACTIONS_CHUNK`). As the reference's `chunk_act_obs` does, a frame whose
    /// chunk would run past the episode's end is not sampled (the last `action_chunk - 1`
    /// frames of each episode). 1 (the default) is OpenVLA's single action.
    pub action_chunk: usize,
    /// Also deliver the wrist camera (the dataset config's `wrist_image_key`), processed as the
    /// primary image is (resize, same augmentation draw).
    pub wrist: bool,
    /// Also deliver the proprio state, normalized with the statistics' `proprio` entry.
    pub proprio: bool,
    /// Also deliver the privileged environment state (LeRobot's
    /// `observation.environment_state`), normalized with the statistics'
    /// `environment_state` entry: auxiliary training targets.
    pub environment_state: bool,
    /// Bounds used to normalize actions and proprio.
    pub normalization: Normalization,
}

impl Default for StreamConfig {
    fn default() -> Self {
        Self {
            seed: 7,
            shuffle_buffer: 10_000,
            decode_threads: 2,
            image_size: Some((224, 224)),
            augment: None,
            repeat: true,
            prefetch: 256,
            skip_corrupt: false,
            skip_unlabeled: true,
            replay_cache_bytes: 1 << 30,
            action_chunk: 1,
            wrist: false,
            proprio: false,
            environment_state: false,
            normalization: Normalization::BoundsQ99,
        }
    }
}

/// One dataset of a stream.
#[derive(Debug, Clone)]
pub struct StreamDataset {
    /// The data and its standardization.
    pub source: DatasetSource,
    /// Split expression (e.g. `train[:95%]`).
    pub split: String,
    /// Sampling weight (already balanced, see [`crate::mixture::balance_weights`]).
    pub weight: f64,
    /// Statistics for BOUNDS_Q99; `None` leaves actions unnormalized.
    pub statistics: Option<DatasetStatistics>,
}

/// A frame ready for the model.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Position in the stream.
    pub seq: u64,
    /// RGB image (224x224 by default).
    pub image: RgbImage,
    /// The wrist camera's image, when [`StreamConfig::wrist`] asks for it.
    pub wrist_image: Option<RgbImage>,
    /// Action (normalized when statistics were given); row 0 of `action_chunk`.
    pub action: Vec<f32>,
    /// `StreamConfig::action_chunk` actions from this step on (normalized like `action`).
    pub action_chunk: Vec<Vec<f32>>,
    /// Normalized proprio state, when [`StreamConfig::proprio`] asks for it.
    pub proprio: Option<Vec<f32>>,
    /// Normalized environment state, when [`StreamConfig::environment_state`] asks for it.
    pub environment_state: Option<Vec<f32>>,
    /// Language instruction.
    pub instruction: String,
    /// Dataset name.
    pub dataset_name: Arc<str>,
    /// Episode index in its dataset.
    pub episode_index: u64,
    /// Step within the standardized trajectory.
    pub step: usize,
}

#[derive(Clone)]
struct Frame {
    image: ImageData,
    wrist_image: Option<ImageData>,
    action_chunk: Vec<Vec<f32>>,
    proprio: Option<Vec<f32>>,
    environment_state: Option<Vec<f32>>,
    instruction: String,
    dataset_name: Arc<str>,
    episode_index: u64,
    step: usize,
    source: String,
}

type Job = (u64, Result<Frame>);

/// The consumer end (an iterator of `Result<Sample>`).
pub struct FrameStream {
    rx: Receiver<(u64, Result<Sample>)>,
    pending: BTreeMap<u64, Result<Sample>>,
    next: u64,
    skipped: Arc<AtomicU64>,
    _threads: Vec<JoinHandle<()>>,
}

impl FrameStream {
    /// Corrupt records skipped so far.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }
}

impl Iterator for FrameStream {
    type Item = Result<Sample>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(s) = self.pending.remove(&self.next) {
                self.next += 1;
                return Some(s);
            }
            match self.rx.recv() {
                Ok((seq, s)) => {
                    self.pending.insert(seq, s);
                }
                Err(_) => {
                    // Workers finished: emit what is left in order.
                    let (&k, _) = self.pending.iter().next()?;
                    self.next = k;
                }
            }
        }
    }
}

fn image_bytes(image: &ImageData) -> usize {
    match image {
        ImageData::Encoded(b) => b.len(),
        ImageData::Rgb { data, .. } => data.len(),
    }
}

/// How errors name an optional per-step column of a trajectory and say how to get it.
struct ColumnSpec {
    /// The stream flag's subject (`proprio`, `the environment state`).
    what: &'static str,
    /// What an episode lacks without it, and how it gets it.
    missing: &'static str,
    /// The statistics entry that normalizes it.
    entry: &'static str,
    /// How the statistics get that entry.
    fix: &'static str,
}

const PROPRIO: ColumnSpec = ColumnSpec {
    what: "proprio",
    missing: "no state (set `state_key`)",
    entry: "proprio",
    fix: "compute them with `openvla stats --proprio`; all-zero statistics are the reference \
          OpenVLA's placeholder",
};

const ENVIRONMENT_STATE: ColumnSpec = ColumnSpec {
    what: "the environment state",
    missing: "no environment state (a LeRobot feature `observation.environment_state`)",
    entry: "environment_state",
    fix: "recompute them with `openvla stats`",
};

/// Normalizes a trajectory's optional column (`[len, d]`) in place with `stats`, or says why
/// the stream cannot deliver it.
fn normalize_column<'a>(
    column: Option<&'a mut crate::trajectory::Matrix>,
    stats: Option<&crate::stats::ArrayStats>,
    normalization: Normalization,
    spec: &ColumnSpec,
) -> std::result::Result<&'a crate::trajectory::Matrix, String> {
    let but = |why: String| format!("the stream asks for {}, but {why}", spec.what);
    let column = column.ok_or_else(|| but(format!("the episode has {}", spec.missing)))?;
    let st = stats.ok_or_else(|| {
        but(format!(
            "the statistics have no {} entry ({})",
            spec.entry, spec.fix
        ))
    })?;
    if st.q01.len() != column.cols {
        return Err(but(format!(
            "it has {} dims and the {} statistics {} ({})",
            column.cols,
            spec.entry,
            st.q01.len(),
            spec.fix
        )));
    }
    let cols = column.cols;
    normalize_rows(&mut column.data, cols, st, normalization);
    Ok(column)
}

fn reader_thread(
    ds: StreamDataset,
    cfg: StreamConfig,
    tx: SyncSender<Result<Frame>>,
    skipped: Arc<AtomicU64>,
) {
    let stats = ds.statistics.as_ref().map(|s| s.action.clone());
    let proprio_stats = ds.statistics.as_ref().and_then(|s| s.proprio.clone());
    let env_stats = ds
        .statistics
        .as_ref()
        .and_then(|s| s.environment_state.clone());
    let chunk = cfg.action_chunk.max(1);
    // The first pass's frames, kept while they fit the replay budget (None once they don't).
    let mut replay: Option<Vec<Frame>> = (cfg.repeat && cfg.replay_cache_bytes > 0).then(Vec::new);
    let mut replay_bytes = 0usize;
    loop {
        let mut frames_this_epoch = 0u64;
        let iter = match ds
            .source
            .trajectories(&ds.split, cfg.skip_corrupt, Some(skipped.clone()))
        {
            Ok(it) => it,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        for t in iter {
            let mut t = match t {
                Ok(t) => t,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            if cfg.skip_unlabeled && t.instructions.iter().all(|s| s.is_empty()) {
                continue;
            }
            if let Some(st) = &stats {
                let cols = t.actions.cols;
                normalize_rows(&mut t.actions.data, cols, st, cfg.normalization);
            }
            // All-zero proprio statistics are the reference OpenVLA's placeholder, not statistics.
            let proprio_st = proprio_stats
                .as_ref()
                .filter(|st| !st.min.iter().chain(&st.max).all(|&x| x == 0.0));
            let columns = (
                cfg.proprio
                    .then(|| {
                        normalize_column(
                            t.proprio.as_mut(),
                            proprio_st,
                            cfg.normalization,
                            &PROPRIO,
                        )
                    })
                    .transpose(),
                cfg.environment_state
                    .then(|| {
                        normalize_column(
                            t.environment_state.as_mut(),
                            env_stats.as_ref(),
                            cfg.normalization,
                            &ENVIRONMENT_STATE,
                        )
                    })
                    .transpose(),
            );
            let (proprio, environment_state) = match columns {
                (Ok(p), Ok(e)) => (p, e),
                (Err(why), _) | (_, Err(why)) => {
                    let _ = tx.send(Err(DataError::Invalid(format!("{}: {why}", t.source))));
                    return;
                }
            };
            let mut wrist = match (cfg.wrist, t.wrist_images.take()) {
                (false, _) => None,
                (true, Some(w)) => Some(w.into_iter()),
                (true, None) => {
                    let _ = tx.send(Err(DataError::Invalid(format!(
                        "{}: the stream asks for the wrist camera, but the episode has none",
                        t.source
                    ))));
                    return;
                }
            };
            // OFT's chunk_act_obs: only frames whose whole chunk lies inside the episode.
            let usable = t.actions.rows.saturating_sub(chunk - 1);
            for (i, img) in t.images.drain(..).enumerate() {
                let wrist_image = wrist.as_mut().and_then(|w| w.next());
                if i >= usable {
                    continue;
                }
                let f = Frame {
                    image: img,
                    wrist_image,
                    action_chunk: (i..i + chunk).map(|j| t.actions.row(j).to_vec()).collect(),
                    proprio: proprio.map(|p| p.row(i).to_vec()),
                    environment_state: environment_state.map(|e| e.row(i).to_vec()),
                    instruction: t.instructions.get(i).cloned().unwrap_or_default(),
                    dataset_name: t.dataset_name.clone(),
                    episode_index: t.episode_index,
                    step: i,
                    source: t.source.clone(),
                };
                if let Some(cache) = replay.as_mut() {
                    replay_bytes += image_bytes(&f.image);
                    if replay_bytes <= cfg.replay_cache_bytes {
                        cache.push(f.clone());
                    } else {
                        replay = None;
                    }
                }
                if tx.send(Ok(f)).is_err() {
                    return;
                }
                frames_this_epoch += 1;
            }
        }
        if !cfg.repeat {
            return;
        }
        if frames_this_epoch == 0 {
            let _ = tx.send(Err(DataError::Invalid(format!(
                "dataset `{}` split `{}` has no labelled frames; cannot repeat it",
                ds.source.name(),
                ds.split
            ))));
            return;
        }
        if let Some(cache) = replay.take() {
            // The whole pass fit: every later pass comes from memory, in the same order.
            loop {
                for f in &cache {
                    if tx.send(Ok(f.clone())).is_err() {
                        return;
                    }
                }
            }
        }
    }
}

fn mixer_thread(
    readers: Vec<Receiver<Result<Frame>>>,
    weights: Vec<f64>,
    cfg: StreamConfig,
    tx: SyncSender<Job>,
) {
    let mut sampler = WeightedSampler::new(&weights, cfg.seed ^ 0x5EED_0001);
    let mut buffer: ShuffleBuffer<Result<Frame>> =
        ShuffleBuffer::new(cfg.shuffle_buffer, cfg.seed ^ 0x5EED_0002);
    let mut alive = vec![true; readers.len()];
    let mut seq = 0u64;
    let emit = |f: Result<Frame>, seq: &mut u64| -> bool {
        let ok = tx.send((*seq, f)).is_ok();
        *seq += 1;
        ok
    };
    while let Some(i) = sampler.sample(|i| alive[i]) {
        match readers[i].recv() {
            Ok(f) => {
                let is_err = f.is_err();
                if is_err {
                    // Errors go out at once, not through the shuffle buffer.
                    if !emit(f, &mut seq) {
                        return;
                    }
                    alive[i] = false;
                    continue;
                }
                if let Some(out) = buffer.push(f) {
                    if !emit(out, &mut seq) {
                        return;
                    }
                }
            }
            Err(_) => alive[i] = false,
        }
    }
    while let Some(f) = buffer.pop() {
        if !emit(f, &mut seq) {
            return;
        }
    }
}

fn process(frame: Frame, seq: u64, cfg: &StreamConfig) -> Result<Sample> {
    let ctx = format!(
        "{} episode {} step {}",
        frame.source, frame.episode_index, frame.step
    );
    // Camera `i` gets its own augmentation draw, as the reference's `seed + i`.
    let camera = |data: &ImageData, i: u64| -> Result<RgbImage> {
        let img = decode_image_data(data, &ctx)?;
        let img = match cfg.image_size {
            Some((w, h)) if (img.width, img.height) != (w, h) => resize_lanczos3(&img, w, h),
            // TF resizes even at equal size; lanczos at scale 1 is the identity on integers.
            _ => img,
        };
        Ok(match &cfg.augment {
            Some(a) => augment(&img, a, &mut Rng::for_item(cfg.seed, 0xA06 + i, seq)),
            None => img,
        })
    };
    let image = camera(&frame.image, 0)?;
    let wrist_image = match &frame.wrist_image {
        Some(w) => Some(camera(w, 1)?),
        None => None,
    };
    let action = frame.action_chunk.first().cloned().unwrap_or_default();
    Ok(Sample {
        seq,
        image,
        wrist_image,
        action,
        action_chunk: frame.action_chunk,
        proprio: frame.proprio,
        environment_state: frame.environment_state,
        instruction: frame.instruction,
        dataset_name: frame.dataset_name,
        episode_index: frame.episode_index,
        step: frame.step,
    })
}

/// The shuffle buffer [`stream`] uses: `requested`, but no more than the frames of one pass
/// over all `datasets` when every one of them knows its frame count (at least 1).
pub fn effective_shuffle_buffer(datasets: &[StreamDataset], requested: usize) -> usize {
    let mut total = 0u64;
    for d in datasets {
        match d.source.num_frames(&d.split) {
            Ok(Some(n)) => total = total.saturating_add(n),
            _ => return requested.max(1),
        }
    }
    (requested as u64).min(total.max(1)) as usize
}

/// Starts the pipeline over `datasets` (weights taken from each [`StreamDataset::weight`]).
pub fn stream(datasets: Vec<StreamDataset>, cfg: StreamConfig) -> Result<FrameStream> {
    if datasets.is_empty() {
        return Err(DataError::Invalid("no datasets to stream".into()));
    }
    let skipped = Arc::new(AtomicU64::new(0));
    let prefetch = cfg.prefetch.max(1);
    let mut cfg = cfg;
    cfg.shuffle_buffer = effective_shuffle_buffer(&datasets, cfg.shuffle_buffer);
    let mut threads = Vec::new();
    let mut readers = Vec::new();
    let weights: Vec<f64> = datasets.iter().map(|d| d.weight).collect();
    for (i, mut ds) in datasets.into_iter().enumerate() {
        ds.source.load_wrist |= cfg.wrist;
        let (tx, rx) = sync_channel(prefetch);
        let c = cfg.clone();
        let sk = skipped.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("openvla-data-reader-{i}"))
                .spawn(move || reader_thread(ds, c, tx, sk))
                .map_err(|e| DataError::Invalid(format!("cannot spawn reader thread: {e}")))?,
        );
        readers.push(rx);
    }
    let (work_tx, work_rx) = sync_channel::<Job>(prefetch);
    let c = cfg.clone();
    threads.push(
        std::thread::Builder::new()
            .name("openvla-data-mixer".into())
            .spawn(move || mixer_thread(readers, weights, c, work_tx))
            .map_err(|e| DataError::Invalid(format!("cannot spawn mixer thread: {e}")))?,
    );
    let work_rx = Arc::new(Mutex::new(work_rx));
    let (out_tx, out_rx) = sync_channel(prefetch);
    for w in 0..cfg.decode_threads.max(1) {
        let rx = work_rx.clone();
        let tx = out_tx.clone();
        let c = cfg.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("openvla-data-decode-{w}"))
                .spawn(move || loop {
                    let job = match rx.lock() {
                        Ok(guard) => guard.recv(),
                        Err(_) => return,
                    };
                    let Ok((seq, frame)) = job else { return };
                    let out = frame.and_then(|f| process(f, seq, &c));
                    if tx.send((seq, out)).is_err() {
                        return;
                    }
                })
                .map_err(|e| DataError::Invalid(format!("cannot spawn decode thread: {e}")))?,
        );
    }
    drop(out_tx);
    Ok(FrameStream {
        rx: out_rx,
        pending: BTreeMap::new(),
        next: 0,
        skipped,
        _threads: threads,
    })
}
