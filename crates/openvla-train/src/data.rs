//! Training batches from the `openvla-data` frame stream: frames (RGB at the model's resolution,
//! BOUNDS_Q99 actions, instructions, augmentation) -> the model's image transform -> [`VlaBatch`].
//!
//! The stream is deterministic for a seed (it reorders by sequence number whatever the thread
//! timing), so a position is just the number of samples consumed: resuming reopens the stream
//! and skips that many frames (image decoding of skipped frames is the cost; nothing is
//! approximated).

use crate::batch::ExampleBuilder;
use crate::error::{Result, TrainError};
use crate::oft::{make_oft_batch, OftBatch, OftSample};
use crate::seam::{make_batch, VlaBatch, VlaSample};
use crate::trainer::DataSource;
use candle_core::Device;
use openvla::config::PromptStyle;
use openvla::processor::PromptTokenizer;
use openvla_data::stream::FrameStream;
use openvla_image::PreprocessorConfig;
use std::sync::Arc;

/// Opens a fresh stream (called at start and on resume).
pub type StreamFactory = Box<dyn Fn() -> Result<FrameStream> + Send>;

/// How samples become token ids and pixel values.
#[derive(Debug, Clone)]
pub struct BatchFormat {
    /// Tokenizer of the model.
    pub tokenizer: Arc<PromptTokenizer>,
    /// Prompt template.
    pub style: PromptStyle,
    /// Action bins (256).
    pub n_bins: usize,
    /// Vocabulary size the action ids count down from (32000).
    pub action_vocab_size: usize,
    /// The model's image transform (`preprocessor_config.json`).
    pub preprocessor: PreprocessorConfig,
}

/// A [`DataSource`] of [`VlaBatch`]es over a frame stream.
pub struct StreamBatches {
    open: StreamFactory,
    stream: FrameStream,
    consumed: u64,
    batch_size: usize,
    format: BatchFormat,
    device: Device,
}

impl std::fmt::Debug for StreamBatches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamBatches")
            .field("consumed", &self.consumed)
            .field("batch_size", &self.batch_size)
            .finish_non_exhaustive()
    }
}

impl StreamBatches {
    /// Opens the stream; batches of `batch_size` samples go to `device`.
    pub fn new(
        open: StreamFactory,
        batch_size: usize,
        format: BatchFormat,
        device: Device,
    ) -> Result<Self> {
        if batch_size == 0 {
            return Err(TrainError::Invalid("batch size must be at least 1".into()));
        }
        let stream = open()?;
        Ok(Self {
            open,
            stream,
            consumed: 0,
            batch_size,
            format,
            device,
        })
    }

    /// The next frame of the stream.
    fn next_frame(&mut self) -> Result<openvla_data::stream::Sample> {
        let s = self.stream.next().ok_or_else(|| {
            TrainError::Invalid(
                "the dataset stream ended; training streams repeat, so the dataset is empty \
                 after filtering"
                    .into(),
            )
        })??;
        self.consumed += 1;
        Ok(s)
    }

    fn next_sample(&mut self) -> Result<VlaSample> {
        let s = self.next_frame()?;
        Ok(VlaSample {
            pixel_values: preprocess_frame(s.image, s.seq, &self.format.preprocessor)?,
            instruction: s.instruction,
            action: s.action,
        })
    }

    /// Samples consumed so far.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }
}

impl DataSource for StreamBatches {
    type Batch = VlaBatch;

    fn next_batch(&mut self) -> Result<VlaBatch> {
        let samples = (0..self.batch_size)
            .map(|_| self.next_sample())
            .collect::<Result<Vec<_>>>()?;
        let f = &self.format;
        let builder = ExampleBuilder::new(&f.tokenizer, f.style, f.n_bins, f.action_vocab_size);
        make_batch(&builder, &samples, &self.device)
    }

    fn position(&self) -> serde_json::Value {
        serde_json::json!({ "samples": self.consumed })
    }

    fn seek(&mut self, position: &serde_json::Value) -> Result<()> {
        let n = position
            .get("samples")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| {
                TrainError::Invalid(format!("bad data position {position} in checkpoint"))
            })?;
        self.stream = (self.open)()?;
        self.consumed = 0;
        for _ in 0..n {
            self.stream.next().ok_or_else(|| {
                TrainError::Invalid(format!("cannot resume: the stream ended before sample {n}"))
            })??;
            self.consumed += 1;
        }
        Ok(())
    }
}

/// The model's image transform of one stream image (frame `seq`, for errors).
pub fn preprocess_frame(
    image: openvla_data::decode::RgbImage,
    seq: u64,
    preprocessor: &PreprocessorConfig,
) -> Result<openvla_image::PixelValues> {
    let img = openvla_image::RgbImage::from_raw(image.width, image.height, image.data)
        .map_err(|e| TrainError::Invalid(format!("frame {seq}: {e}")))?;
    openvla_image::preprocess(&img, preprocessor)
        .map_err(|e| TrainError::Invalid(format!("frame {seq}: {e}")))
}

/// An OFT sample from a stream sample: the primary image, the wrist image if the stream
/// delivers it (each through the model's transform), the action chunk and the proprio state.
pub fn oft_sample(
    s: openvla_data::stream::Sample,
    preprocessor: &PreprocessorConfig,
) -> Result<OftSample> {
    let mut images = vec![preprocess_frame(s.image, s.seq, preprocessor)?];
    if let Some(w) = s.wrist_image {
        images.push(preprocess_frame(w, s.seq, preprocessor)?);
    }
    Ok(OftSample {
        images,
        instruction: s.instruction,
        chunk: s.action_chunk,
        proprio: s.proprio,
        environment_state: s.environment_state,
    })
}

/// A [`DataSource`] of [`OftBatch`]es (`openvla finetune --head l1`) over a frame stream opened
/// with the chunk size, the wrist camera and proprio as the run asks
/// (`openvla_data::stream::StreamConfig::{action_chunk, wrist, proprio}`).
#[derive(Debug)]
pub struct OftStreamBatches {
    inner: StreamBatches,
    chunk: usize,
}

impl OftStreamBatches {
    /// Opens the stream; every sample must carry a chunk of `chunk` actions.
    pub fn new(
        open: StreamFactory,
        batch_size: usize,
        chunk: usize,
        format: BatchFormat,
        device: Device,
    ) -> Result<Self> {
        Ok(Self {
            inner: StreamBatches::new(open, batch_size, format, device)?,
            chunk,
        })
    }
}

impl DataSource for OftStreamBatches {
    type Batch = OftBatch;

    fn next_batch(&mut self) -> Result<OftBatch> {
        let samples = (0..self.inner.batch_size)
            .map(|_| {
                let s = self.inner.next_frame()?;
                oft_sample(s, &self.inner.format.preprocessor)
            })
            .collect::<Result<Vec<_>>>()?;
        let f = &self.inner.format;
        let builder = ExampleBuilder::new(&f.tokenizer, f.style, f.n_bins, f.action_vocab_size);
        make_oft_batch(&builder, &samples, self.chunk, &self.inner.device)
    }

    fn position(&self) -> serde_json::Value {
        self.inner.position()
    }

    fn seek(&mut self, position: &serde_json::Value) -> Result<()> {
        self.inner.seek(position)
    }
}

/// The first frame of each of the first `episodes` episodes of `source` (all splits, in
/// order, no augmentation), with actions normalized by `statistics`: a small fixed set for
/// memorization tests and trained-model measurements.
pub fn first_frames(
    source: &openvla_data::source::DatasetSource,
    statistics: openvla_data::stats::DatasetStatistics,
    episodes: usize,
) -> Result<Vec<openvla_data::stream::Sample>> {
    first_frames_with(source, statistics, episodes, Default::default())
}

/// [`first_frames`] with the stream's other settings (action chunk, wrist camera, proprio,
/// normalization) from `config`; its order, repetition and augmentation are overridden.
pub fn first_frames_with(
    source: &openvla_data::source::DatasetSource,
    statistics: openvla_data::stats::DatasetStatistics,
    episodes: usize,
    config: openvla_data::stream::StreamConfig,
) -> Result<Vec<openvla_data::stream::Sample>> {
    use openvla_data::stream::{stream, StreamConfig, StreamDataset};
    let frames = stream(
        vec![StreamDataset {
            source: source.clone(),
            split: "all".into(),
            weight: 1.0,
            statistics: Some(statistics),
        }],
        StreamConfig {
            shuffle_buffer: 1,
            repeat: false,
            augment: None,
            ..config
        },
    )?;
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::with_capacity(episodes);
    for s in frames {
        let s = s?;
        if seen.insert((s.dataset_name.clone(), s.episode_index)) {
            out.push(s);
            if out.len() == episodes {
                break;
            }
        }
    }
    if out.len() < episodes {
        return Err(TrainError::Invalid(format!(
            "dataset {} has {} episodes, fewer than the {episodes} asked for",
            source.name(),
            out.len()
        )));
    }
    Ok(out)
}
