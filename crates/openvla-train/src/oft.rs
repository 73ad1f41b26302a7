//! OpenVLA-OFT training data (`openvla finetune --head l1`): samples with several images, an
//! action chunk and proprio, batched as the reference's `RLDSBatchTransform` and collator do
//! (`prismatic/vla/datasets/datasets.py`), and the positions the L1 head reads
//! (`vla-scripts/finetune.py` `run_forward_pass`, `prismatic/training/train_utils.py`).
//!
//! * The text is the 256-bin example with the whole chunk as its answer: `BOS + prompt + 29871
//!   + K·D action ids + </s>`, labels `-100` except the last `K·D + 1` positions.
//! * The action positions (`label > ACTION_TOKEN_BEGIN_IDX`, i.e. `current | next` action
//!   masks) have their embeddings zeroed.
//! * The head reads `last_hidden[:, prefix:-1]` where `labels[:, 1:]` is an action position: the
//!   window shifted by one (from the token before the first action through the next-to-last
//!   action), `K·D` rows per sample, reshaped `[B, K, D·H]`.

use crate::batch::{collate, ExampleBuilder, TextBatch, MODEL_MAX_LENGTH};
use crate::cli::OftRun;
use crate::error::{Result, TrainError};
use crate::metrics::action_token_begin_idx;
use crate::model::head::{L1HeadTrain, ProprioProjectorTrain};
use crate::rng::TrainRng;
use candle_core::{Device, Tensor};
use openvla::oft::pt::{find_component, StateDict};
use openvla::oft::{ACTION_HEAD, PROPRIO_PROJECTOR};
use std::path::Path;

/// The camera names `--images` accepts, in the order they enter the model.
pub const IMAGE_NAMES: [&str; 2] = ["primary", "wrist"];

/// Parses `--images` (`primary` or `primary,wrist`): whether the wrist camera is used.
pub fn parse_images(s: &str) -> Result<bool> {
    let names: Vec<&str> = s
        .split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .collect();
    match names.as_slice() {
        ["primary"] => Ok(false),
        ["primary", "wrist"] => Ok(true),
        _ => Err(TrainError::Invalid(format!(
            "--images {s:?}: expected `primary` or `primary,wrist` (the primary camera first; the \
             data stream delivers at most one wrist camera, the dataset's wrist_image_key)"
        ))),
    }
}

/// One OFT training sample after image preprocessing.
#[derive(Debug, Clone)]
pub struct OftSample {
    /// Each image's pixel values (`[3·towers, H, W]`), primary first.
    pub images: Vec<openvla_image::PixelValues>,
    /// Language instruction.
    pub instruction: String,
    /// The normalized action chunk `[K][D]`.
    pub chunk: Vec<Vec<f32>>,
    /// The normalized proprio state, when the model takes it.
    pub proprio: Option<Vec<f32>>,
    /// The normalized environment state, when the run trains an auxiliary head on it.
    pub environment_state: Option<Vec<f32>>,
}

/// A batch for the L1 objective.
#[derive(Debug, Clone)]
pub struct OftBatch {
    /// `[B, images·3·towers, H, W]` float32.
    pub pixel_values: Tensor,
    /// Collated ids (prompt, `K·D` action ids, `</s>`), labels and mask.
    pub text: TextBatch,
    /// `[B, T]` u8: 1 at the action positions, whose embeddings are zeroed.
    pub zeroed: Tensor,
    /// Per sample, the `K·D` text positions `j` (ascending) whose hidden state at multimodal
    /// position `prefix + j` the head reads.
    pub head_rows: Vec<Vec<usize>>,
    /// `[B, K, D]` the normalized chunk (the L1 target).
    pub actions: Tensor,
    /// `[B, P]` normalized proprio, when the model takes it.
    pub proprio: Option<Tensor>,
    /// `[B, E]` the normalized environment state (the auxiliary head's target), when the run
    /// trains one ([`OftBatch::with_environment_state`]).
    pub environment_state: Option<Tensor>,
    /// Actions per chunk (K).
    pub chunk: usize,
    /// Action dimension (D).
    pub action_dim: usize,
}

impl OftBatch {
    /// Batch size.
    pub fn len(&self) -> usize {
        self.text.batch
    }

    /// Whether the batch is empty (never, for a built batch).
    pub fn is_empty(&self) -> bool {
        self.text.batch == 0
    }

    /// The head's input `[B, K, D·H]`, gathered from the hidden states `[B, S, H]` whose row
    /// `prefix + j` is text position `j` (the reference's `last_hidden[:, prefix:-1]` at the
    /// shifted action mask, reshaped row-major).
    pub fn head_input(&self, hidden: &Tensor, prefix: usize) -> Result<Tensor> {
        let (b, s, h) = hidden.dims3()?;
        if b != self.len() {
            return Err(TrainError::Invalid(format!(
                "hidden states for {b} samples, batch of {}",
                self.len()
            )));
        }
        let mut idx = Vec::with_capacity(b * self.chunk * self.action_dim);
        for (row, js) in self.head_rows.iter().enumerate() {
            for &j in js {
                let pos = prefix + j;
                if pos + 1 >= s {
                    return Err(TrainError::Invalid(format!(
                        "head position {pos} is outside the {s} hidden states"
                    )));
                }
                idx.push((row * s + pos) as u32);
            }
        }
        let n = idx.len();
        let idx = Tensor::from_vec(idx, n, hidden.device())?;
        let rows = hidden.reshape((b * s, h))?.index_select(&idx, 0)?;
        Ok(rows.reshape((b, self.chunk, self.action_dim * h))?)
    }
}

/// The text positions of the head's window in one row of labels: `j` such that
/// `labels[j + 1] > begin` (the reference masks `labels[:, 1:]`), and the action positions
/// (`labels[j] > begin`), whose embeddings are zeroed.
fn action_positions(labels: &[i64], begin: i64) -> (Vec<usize>, Vec<u8>) {
    let zeroed: Vec<u8> = labels.iter().map(|&l| u8::from(l > begin)).collect();
    let rows = (0..labels.len().saturating_sub(1))
        .filter(|&j| labels[j + 1] > begin)
        .collect();
    (rows, zeroed)
}

/// Builds an [`OftBatch`]: every sample's chunk must have `chunk` rows of the same width, the
/// same number of images and proprio either in every sample or in none.
pub fn make_oft_batch(
    builder: &ExampleBuilder,
    samples: &[OftSample],
    chunk: usize,
    device: &Device,
) -> Result<OftBatch> {
    let first = samples
        .first()
        .ok_or_else(|| TrainError::Invalid("empty batch".into()))?;
    let d = first.chunk.first().map(|a| a.len()).unwrap_or(0);
    if chunk == 0 || d == 0 {
        return Err(TrainError::Invalid(
            "the action chunk is empty (chunk size and action dimension must be positive)".into(),
        ));
    }
    let n_images = first.images.len();
    let img0 = first
        .images
        .first()
        .ok_or_else(|| TrainError::Invalid("a sample has no image".into()))?;
    let (c, h, w) = (img0.channels, img0.height, img0.width);
    let mut examples = Vec::with_capacity(samples.len());
    let mut pixels = Vec::with_capacity(samples.len() * n_images * c * h * w);
    let mut actions = Vec::with_capacity(samples.len() * chunk * d);
    for (i, s) in samples.iter().enumerate() {
        if s.chunk.len() != chunk || s.chunk.iter().any(|a| a.len() != d) {
            return Err(TrainError::Invalid(format!(
                "sample {i}: the action chunk is {}x{:?}, expected {chunk} actions of {d} \
                 dimensions",
                s.chunk.len(),
                s.chunk.iter().map(Vec::len).collect::<Vec<_>>()
            )));
        }
        if s.images.len() != n_images {
            return Err(TrainError::Invalid(format!(
                "sample {i} has {} images, the batch {n_images}",
                s.images.len()
            )));
        }
        for img in &s.images {
            if (img.channels, img.height, img.width) != (c, h, w) {
                return Err(TrainError::Invalid(
                    "images of one batch have different preprocessed sizes".into(),
                ));
            }
            pixels.extend_from_slice(&img.data);
        }
        let flat: Vec<f32> = s.chunk.iter().flatten().copied().collect();
        actions.extend_from_slice(&flat);
        examples.push(builder.build(&s.instruction, &flat)?);
    }
    let text = collate(&examples, MODEL_MAX_LENGTH)?;
    let b = samples.len();
    let batch = OftBatch::from_parts(
        Tensor::from_vec(pixels, (b, n_images * c, h, w), device)?,
        text,
        Tensor::from_vec(actions, (b, chunk, d), device)?,
        stack_optional(samples, |s| s.proprio.as_deref(), "proprio", device)?,
        action_token_begin_idx(builder.action_tokenizer()),
    )?;
    Ok(
        match stack_optional(
            samples,
            |s| s.environment_state.as_deref(),
            "the environment state",
            device,
        )? {
            Some(state) => batch.with_environment_state(state)?,
            None => batch,
        },
    )
}

/// `[B, n]`: a per-sample vector (proprio, environment state) that every sample of the batch
/// has with the same length, or none has; `what` names it in errors.
fn stack_optional(
    samples: &[OftSample],
    get: impl Fn(&OftSample) -> Option<&[f32]>,
    what: &str,
    device: &Device,
) -> Result<Option<Tensor>> {
    let n = samples.first().and_then(&get).map(<[f32]>::len);
    let mut data = Vec::with_capacity(samples.len() * n.unwrap_or(0));
    for (i, s) in samples.iter().enumerate() {
        match (get(s), n) {
            (Some(v), Some(n)) if v.len() == n => data.extend_from_slice(v),
            (None, None) => {}
            (v, _) => {
                return Err(TrainError::Invalid(format!(
                    "sample {i}: {what} is {:?} values, the batch's first sample {n:?}",
                    v.map(<[f32]>::len)
                )))
            }
        }
    }
    Ok(match n {
        Some(n) => Some(Tensor::from_vec(data, (samples.len(), n), device)?),
        None => None,
    })
}

impl OftBatch {
    /// A batch from collated text (labels as the reference's transform makes them), pixel
    /// values `[B, images·3·towers, H, W]`, the normalized chunk `[B, K, D]` and proprio
    /// `[B, P]`; `begin` is `ACTION_TOKEN_BEGIN_IDX` (31743). Every sample must have exactly
    /// `K·D` action positions.
    pub fn from_parts(
        pixel_values: Tensor,
        text: TextBatch,
        actions: Tensor,
        proprio: Option<Tensor>,
        begin: i64,
    ) -> Result<OftBatch> {
        let (b, chunk, d) = actions.dims3()?;
        if b != text.batch || pixel_values.dim(0)? != b {
            return Err(TrainError::Invalid(format!(
                "batch parts disagree: {} texts, pixel values {:?}, actions {:?}",
                text.batch,
                pixel_values.dims(),
                actions.dims()
            )));
        }
        let mut zeroed = Vec::with_capacity(b * text.seq_len);
        let mut head_rows = Vec::with_capacity(b);
        for row in 0..b {
            let (rows, z) = action_positions(text.labels_row(row), begin);
            if rows.len() != chunk * d {
                return Err(TrainError::Invalid(format!(
                    "sample {row}: {} action positions (after truncation to {MODEL_MAX_LENGTH} \
                     tokens), expected K·D = {}",
                    rows.len(),
                    chunk * d
                )));
            }
            head_rows.push(rows);
            zeroed.extend(z);
        }
        Ok(OftBatch {
            zeroed: Tensor::from_vec(zeroed, (b, text.seq_len), pixel_values.device())?,
            pixel_values,
            text,
            head_rows,
            actions,
            proprio,
            environment_state: None,
            chunk,
            action_dim: d,
        })
    }

    /// The batch with its auxiliary target: the normalized environment state `[B, E]`.
    pub fn with_environment_state(mut self, state: Tensor) -> Result<OftBatch> {
        let (b, _) = state.dims2()?;
        if b != self.len() {
            return Err(TrainError::Invalid(format!(
                "environment state for {b} samples, batch of {}",
                self.len()
            )));
        }
        self.environment_state = Some(state);
        Ok(self)
    }
}

/// The action head and proprio projector a `--head l1` run starts from: those of `--model`
/// when it is an OFT checkpoint with component files (checked against the data's action and
/// proprio dimensions and the LLM width), otherwise freshly initialized from `seed` as the
/// reference initializes them (the projector first, then the head).
pub fn start_components(
    model: &Path,
    config: &openvla::ModelConfig,
    run: &OftRun,
    stats: &openvla_data::stats::DatasetStatistics,
    seed: u64,
) -> Result<(L1HeadTrain, Option<ProprioProjectorTrain>)> {
    let llm = config.text.hidden_size;
    let d = stats.action.q01.len();
    let p = if run.proprio {
        let st = stats.proprio.as_ref().ok_or_else(|| {
            TrainError::Invalid("--proprio: the dataset statistics have no proprio entry".into())
        })?;
        Some(st.q01.len())
    } else {
        None
    };
    let head_file = find_component(model, ACTION_HEAD)?;
    let proprio_file = find_component(model, PROPRIO_PROJECTOR)?;
    let mut rng = TrainRng::new(seed ^ 0x004F_4654_4845_4144);
    let proprio = match (p, &proprio_file) {
        (None, _) => None,
        (Some(p), Some(f)) => {
            let sd = StateDict::read(f)?;
            if let Some(cols) = sd.shape("fc1.weight").and_then(|s| s.get(1).copied()) {
                if cols != p {
                    return Err(TrainError::checkpoint(
                        f,
                        format!(
                            "the proprio projector takes {cols}-dimensional state (fc1.weight), \
                             but the dataset's state is {p}-dimensional"
                        ),
                    ));
                }
            }
            Some(ProprioProjectorTrain::from_state_dict(&sd, p, llm)?)
        }
        (Some(p), None) => Some(ProprioProjectorTrain::init(p, llm, &mut rng)?),
    };
    let head = match &head_file {
        Some(f) => {
            let sd = StateDict::read(f)?;
            if let Some(rows) = sd
                .shape("model.fc2.weight")
                .and_then(|s| s.first().copied())
            {
                if rows != d {
                    return Err(TrainError::checkpoint(
                        f,
                        format!(
                            "the action head predicts {rows}-dimensional actions \
                             (model.fc2.weight), but the dataset's actions are {d}-dimensional"
                        ),
                    ));
                }
            }
            L1HeadTrain::from_state_dict(&sd, llm, d)?
        }
        None => L1HeadTrain::init(llm, d, &mut rng)?,
    };
    Ok((head, proprio))
}

/// Writes one OFT component file (`action_head--<step>_checkpoint.pt`, ...): a `torch.save`
/// state dict whose keys carry DDP's `module.` prefix, as the reference writes them.
pub fn write_component(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let prefixed: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| (format!("module.{n}"), t.clone()))
        .collect();
    openvla::oft::pt::write_state_dict(path, &prefixed)
        .map_err(|e| TrainError::checkpoint(path, e.to_string()))
}

/// The file name of a component at `step` (`action_head--150000_checkpoint.pt`).
pub fn component_file_name(component: &str, step: u64) -> String {
    format!("{component}--{step}_checkpoint.pt")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_flag() {
        assert!(!parse_images("primary").unwrap());
        assert!(parse_images("primary, wrist").unwrap());
        for bad in ["wrist", "wrist,primary", "primary,wrist,wrist", ""] {
            let e = parse_images(bad).unwrap_err().to_string();
            assert!(e.contains("primary,wrist"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_window_is_shifted_by_one() {
        // BOS, prompt (3), 29871, 4 action ids, EOS: labels as the reference's transform.
        let labels = [-100, -100, -100, -100, -100, 31900, 31800, 31999, 31744, 2];
        let (rows, zeroed) = action_positions(&labels, 31743);
        assert_eq!(rows, vec![4, 5, 6, 7]);
        assert_eq!(zeroed, vec![0, 0, 0, 0, 0, 1, 1, 1, 1, 0]);
    }
}
