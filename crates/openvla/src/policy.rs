//! `Policy`: the one object every front end holds (processor + model + action head + norm stats).

use crate::action::{
    resolve_unnorm_key, unnormalize, ActionStatistics, ActionTokenizer, NormStats,
};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::head::{ActionHead, MlpResNetTrace};
use crate::model::checkpoint::{Checkpoint, LoadProgress, WeightLoader};
use crate::model::linear::{WeightDtype, WeightPolicy};
use crate::model::{GenerationRequest, GenerationTrace, OpenVla, ParallelInput, ParallelTrace};
use crate::oft::constants::OftOptions;
use crate::oft::proprio::{normalize_proprio, unnormalize_oft, Stats};
use crate::oft::OftModel;
use crate::processor::{build_prompt, PixelValues, PreprocessorConfig, PromptTokenizer, RgbImage};
use crate::quant::Quantization;
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How unquantized weights are held in memory. Activations, accumulation and every other
/// operation are f32 in all precisions, so `f32`, `bf16` and `f16` compute the reference's
/// float32 function over the weights as held (bf16 is exactly the stored checkpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 when the upcast weights fit comfortably in available memory, otherwise bf16
    /// (always f32 for the few matrices a quantized model keeps unquantized).
    #[default]
    Auto,
    /// f32 weights and activations: the reference's float32 run.
    F32,
    /// bf16 weights as stored, widened to f32 inside the matmul kernels: the same function as
    /// `F32` at half the memory and memory traffic.
    Bf16,
    /// f16 weights (converted from the checkpoint at load; a load error if a value exceeds
    /// ±65504), widened to f32 inside the matmul kernels.
    F16,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Precision::Auto),
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            "f16" => Ok(Precision::F16),
            _ => Err(format!(
                "unknown precision {s:?}; expected auto, f32 or bf16, or f16"
            )),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::Auto => "auto",
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        })
    }
}

/// Largest checkpoint (bytes as stored) whose dense matrices are packed at load for the AMX
/// kernel under bf16 arithmetic ([`crate::model::linear::WeightPolicy::tiles`]).
pub const TILES_MAX_BYTES: u64 = 512 << 20;

/// Options for [`Policy::load`].
#[derive(Default)]
pub struct LoadOptions<'a> {
    /// Precision of unquantized weights.
    pub precision: Precision,
    /// Quantize the weights while loading ([`Quantization::format_for`] says which). A model
    /// directory written by `openvla quantize` is read as stored whatever this says, but asking
    /// for a different mode than it holds is an error.
    pub quantize: Option<Quantization>,
    /// Called as tensor data is read.
    pub progress: Option<&'a (dyn Fn(LoadProgress) + Sync)>,
    /// Arithmetic of the many-row products (vision, projector, prefill): exact f32 or bf16
    /// ([`crate::model::linear::ComputePrecision`]). `None`: what the model's `config.json`
    /// asks for ([`crate::ModelConfig::inference_compute`]), else f32.
    pub compute: Option<crate::model::linear::ComputePrecision>,
    /// OpenVLA-OFT constants given as flags (they override `config.json` and presets).
    pub oft: OftOptions,
}

/// One robot observation.
#[derive(Debug, Clone)]
pub struct Observation {
    /// The camera images (any size, RGB), each with a name (`primary`, `wrist`,
    /// `left_wrist`, ...): the primary (third-person) image first, then the wrist views in the
    /// order the model was trained with.
    pub images: Vec<(String, RgbImage)>,
    /// The task, e.g. "pick up the red block".
    pub instruction: String,
    /// Raw (un-normalized) proprioceptive state, for models that take it.
    pub proprio: Option<Vec<f64>>,
}

impl Observation {
    /// One primary image, no proprio.
    pub fn new(image: RgbImage, instruction: impl Into<String>) -> Observation {
        Observation {
            images: vec![("primary".to_string(), image)],
            instruction: instruction.into(),
            proprio: None,
        }
    }

    /// The primary (first) image.
    pub fn primary(&self) -> Option<&RgbImage> {
        self.images.first().map(|(_, i)| i)
    }
}

/// The policy's answer for one observation: a chunk of `K` actions of `D` dimensions. The
/// 256-bin OpenVLA family answers a chunk of one.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// Un-normalized actions (float64), `[K][D]`.
    pub actions: Vec<Vec<f64>>,
    /// The actions before un-normalization, `[K][D]`.
    pub normalized_actions: Vec<Vec<f64>>,
    /// The action token ids (256-bin heads; empty for the L1 head).
    pub token_ids: Vec<u32>,
    /// The dataset statistics used.
    pub unnorm_key: String,
}

impl Prediction {
    /// The first action of the chunk.
    pub fn action(&self) -> &[f64] {
        self.actions.first().map_or(&[], |a| a.as_slice())
    }
    /// The first normalized action of the chunk.
    pub fn normalized_action(&self) -> &[f64] {
        self.normalized_actions
            .first()
            .map_or(&[], |a| a.as_slice())
    }
}

/// Everything computed for one observation, for golden tests and benchmarks.
#[derive(Debug, Clone)]
pub struct Trace {
    /// Processor output `[1, C, H, W]`.
    pub pixel_values: Tensor,
    /// Prompt ids as the processor returns them (BOS, no trailing 29871).
    pub prompt_ids: Vec<u32>,
    /// Ids fed to the model (with the 29871 appended).
    pub input_ids: Vec<u32>,
    /// Model intermediates and timings.
    pub generation: GenerationTrace,
    /// Time spent in image preprocessing and tokenization.
    pub preprocess_time: Duration,
    /// The final prediction.
    pub prediction: Prediction,
}

/// A loaded OpenVLA policy.
pub struct Policy {
    dir: PathBuf,
    config: ModelConfig,
    preprocessor: PreprocessorConfig,
    tokenizer: PromptTokenizer,
    model: OpenVla,
    norm_stats: NormStats,
    norm_stats_source: PathBuf,
    action_tokenizer: ActionTokenizer,
    head: ActionHead,
    oft: Option<OftModel>,
    weights: WeightPolicy,
    device: Device,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("dir", &self.dir)
            .field("variant", &self.config.variant)
            .field("weights", &self.weights)
            .finish_non_exhaustive()
    }
}

/// Reads `norm_stats`: `dataset_statistics.json` next to `config.json` replaces the config's
/// statistics when present, as the reference's deploy and eval code do.
pub fn load_norm_stats(dir: &Path, config: &ModelConfig) -> Result<(NormStats, PathBuf)> {
    let sidecar = dir.join("dataset_statistics.json");
    let (stats, source) = if sidecar.exists() {
        (crate::error::read_json::<NormStats>(&sidecar)?, sidecar)
    } else {
        (config.norm_stats.clone(), config.path.clone())
    };
    for (key, s) in &stats {
        s.action
            .validate(key)
            .map_err(|m| Error::config(&source, m))?;
    }
    Ok((stats, source))
}

/// Bytes of memory available to this process (Linux `MemAvailable`), if known.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Whether `bytes` fit comfortably in memory: within 60 % of [`available_memory`] (true where
/// that is unknown). The rule behind `--precision auto` and packing weights at load.
fn fits_comfortably(bytes: u64) -> bool {
    available_memory().is_none_or(|avail| bytes <= avail / 10 * 6)
}

impl Policy {
    /// Loads an HF OpenVLA model directory (`config.json`, `preprocessor_config.json`,
    /// `tokenizer.json`, safetensors weights, optional `dataset_statistics.json`).
    pub fn load(dir: &Path, options: &LoadOptions) -> Result<Policy> {
        if !dir.is_dir() {
            return Err(Error::config(
                dir,
                "model directory does not exist or is not a directory",
            ));
        }
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let preprocessor = load_preprocessor(dir, &config)?;
        let tokenizer = PromptTokenizer::from_file(&dir.join("tokenizer.json"))?;
        let (norm_stats, norm_stats_source) = load_norm_stats(dir, &config)?;
        let ckpt = Checkpoint::open_dir(dir)?;
        let stored = crate::quant::io::read_manifest(dir)?;
        let quantization = match (stored, options.quantize) {
            (Some(s), Some(q)) if s != q => {
                return Err(Error::config(
                    dir.join(crate::quant::io::MANIFEST),
                    format!(
                        "this model directory is already quantized to {s}; it cannot be loaded \
                         as {q} (quantize the original checkpoint instead)"
                    ),
                ))
            }
            (Some(s), _) => Some(s),
            (None, q) => q,
        };
        let f32_bytes = ckpt.total_bytes() / 2 * 4;
        let weight_dtype = match options.precision {
            Precision::F32 => WeightDtype::F32,
            Precision::Bf16 => WeightDtype::Bf16,
            Precision::F16 => WeightDtype::F16,
            Precision::Auto if quantization.is_some() => WeightDtype::F32,
            Precision::Auto if fits_comfortably(f32_bytes) => WeightDtype::F32,
            Precision::Auto => WeightDtype::Bf16,
        };
        let weights = match quantization {
            Some(q) => WeightPolicy::quantized(weight_dtype, q),
            None => WeightPolicy::dense(weight_dtype),
        };
        // bf16 arithmetic on AMX packs the dense matrices once at load (a bf16 copy beside the
        // stored weights) for checkpoints up to TILES_MAX_BYTES whose weights and copy fit in
        // 60 % of the available memory. Small models gain most (their products are too small to
        // amortize the per-call packing: 1.4x on the Meta-World policy); a MiniVLA-sized one
        // gained 5-10 % for twice the resident memory, so larger models pack per call.
        let compute = config.compute_for(options.compute);
        let held = match weight_dtype {
            WeightDtype::F32 => f32_bytes,
            _ => ckpt.total_bytes(),
        };
        let tiles_fit =
            ckpt.total_bytes() <= TILES_MAX_BYTES && fits_comfortably(held + ckpt.total_bytes());
        let weights = weights.with_compute(compute).with_tiles(tiles_fit);
        let device = Device::Cpu;
        let loader = WeightLoader::new(&ckpt, device.clone(), options.progress);
        let film = crate::oft::film::FilmCheckpoint::open(dir, config.text.hidden_size)?;
        let towers = film
            .as_ref()
            .map(|f| f as &dyn crate::model::vit::TowerSource);
        let model = OpenVla::load_with_film(&loader, &config, &weights, towers)?;
        loader.finish()?;
        if let Some(f) = &film {
            f.finish()?;
        }
        let action_tokenizer = ActionTokenizer::new(config.n_action_bins, config.action_vocab_size);
        let head_dtype = match weights.dtype {
            WeightDtype::Bf16 => candle_core::DType::BF16,
            WeightDtype::F16 => candle_core::DType::F16,
            _ => candle_core::DType::F32,
        };
        let (head, oft) = match crate::oft::load(
            dir,
            config.text.hidden_size,
            config.n_action_bins,
            config.action_vocab_size,
            &options.oft,
            head_dtype,
        )? {
            Some((head, oft)) => (head, Some(oft)),
            None => (
                ActionHead::Autoregressive256(action_tokenizer.clone()),
                None,
            ),
        };
        if let Some(oft) = &oft {
            check_oft_stats(&norm_stats, &norm_stats_source, oft)?;
        }
        Ok(Policy {
            dir: dir.to_path_buf(),
            config,
            preprocessor,
            tokenizer,
            model,
            norm_stats,
            norm_stats_source,
            action_tokenizer,
            head,
            oft,
            weights,
            device,
        })
    }

    /// The model directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// The resolved model configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }
    /// The dataset statistics in effect.
    pub fn norm_stats(&self) -> &NormStats {
        &self.norm_stats
    }
    /// Where the statistics in effect were read from.
    pub fn norm_stats_source(&self) -> &Path {
        &self.norm_stats_source
    }
    /// The dtype of unquantized weight matrices.
    pub fn weight_dtype(&self) -> WeightDtype {
        self.weights.dtype
    }
    /// The arithmetic of the many-row products ([`LoadOptions::compute`]).
    pub fn compute(&self) -> crate::model::linear::ComputePrecision {
        self.weights.compute
    }
    /// How weights are held: dtype and quantization.
    pub fn weight_policy(&self) -> WeightPolicy {
        self.weights
    }
    /// The prompt tokenizer.
    pub fn tokenizer(&self) -> &PromptTokenizer {
        &self.tokenizer
    }
    /// The network.
    pub fn model(&self) -> &OpenVla {
        &self.model
    }
    /// The action tokenizer (bins).
    pub fn action_tokenizer(&self) -> &ActionTokenizer {
        &self.action_tokenizer
    }
    /// The action head.
    pub fn head(&self) -> &ActionHead {
        &self.head
    }
    /// The OFT components and constants (`None` for the original OpenVLA family).
    pub fn oft(&self) -> Option<&OftModel> {
        self.oft.as_ref()
    }
    /// Actions per prediction (K; 1 for the 256-bin family).
    pub fn chunk_size(&self) -> usize {
        self.oft.as_ref().map_or(1, |o| o.constants.chunk.value)
    }
    /// Images per observation.
    pub fn num_images(&self) -> usize {
        self.oft
            .as_ref()
            .map_or(1, |o| o.constants.num_images.value)
    }
    /// Proprio dimension, if the model takes proprio.
    pub fn proprio_dim(&self) -> Option<usize> {
        self.oft
            .as_ref()
            .and_then(|o| o.constants.proprio_dim.value)
    }

    /// Action dimension of a dataset.
    pub fn action_dim(&self, unnorm_key: Option<&str>) -> Result<usize> {
        if let Some(o) = &self.oft {
            return Ok(o.constants.action_dim.value);
        }
        Ok(resolve_unnorm_key(&self.norm_stats, unnorm_key)?
            .1
            .action
            .action_dim())
    }

    /// Image -> `pixel_values [1, C, H, W]`.
    pub fn preprocess_image(&self, image: &RgbImage) -> Result<Tensor> {
        let PixelValues {
            channels,
            height,
            width,
            data,
        } = openvla_image::preprocess(image, &self.preprocessor)?;
        Ok(Tensor::from_vec(
            data,
            (1, channels, height, width),
            &self.device,
        )?)
    }

    /// Instruction -> prompt ids (BOS first, no trailing 29871).
    pub fn prompt_ids(&self, instruction: &str) -> Result<Vec<u32>> {
        let prompt = build_prompt(self.config.prompt_style, instruction)?;
        self.tokenizer.encode(&prompt)
    }

    /// Predicts one action per observation with the statistics of `unnorm_key`.
    pub fn predict(
        &self,
        observations: &[Observation],
        unnorm_key: Option<&str>,
    ) -> Result<Vec<Prediction>> {
        let requests: Vec<Request> = observations
            .iter()
            .map(|o| Request {
                observation: o.clone(),
                unnorm_key: unnorm_key.map(str::to_string),
            })
            .collect();
        self.predict_batch(&requests).into_iter().collect()
    }

    /// Predicts a batch of independent requests, each with its own `unnorm_key`.
    ///
    /// Images are preprocessed and prompts prefilled per request; decoding runs all requests
    /// together, one batched forward per step. Every request gets exactly the tokens and actions
    /// it gets alone. A bad request (unknown key, empty instruction) fails alone: the others
    /// still get their predictions.
    pub fn predict_batch(&self, requests: &[Request]) -> Vec<Result<Prediction>> {
        if self.head.is_parallel() {
            return match self.trace_parallel_batch(requests) {
                Ok(traces) => traces
                    .into_iter()
                    .map(|t| t.map(|t| t.prediction))
                    .collect(),
                Err(e) => {
                    let msg = e.to_string();
                    requests
                        .iter()
                        .map(|_| Err(Error::InvalidInput(msg.clone())))
                        .collect()
                }
            };
        }
        Ok(()).and_then(|_| self.trace_batch(requests)).map_or_else(
            |e| {
                let msg = e.to_string();
                requests
                    .iter()
                    .map(|_| Err(Error::InvalidInput(msg.clone())))
                    .collect()
            },
            |traces| {
                traces
                    .into_iter()
                    .map(|t| t.map(|t| t.prediction))
                    .collect()
            },
        )
    }

    /// Runs one observation and keeps every intermediate result.
    pub fn trace(&self, observation: &Observation, unnorm_key: Option<&str>) -> Result<Trace> {
        let request = Request {
            observation: observation.clone(),
            unnorm_key: unnorm_key.map(str::to_string),
        };
        self.trace_batch(std::slice::from_ref(&request))?.remove(0)
    }

    /// Like [`Policy::predict_batch`], keeping every intermediate result. The outer error is a
    /// failure of the batch as a whole; inner errors belong to single requests.
    pub fn trace_batch(&self, requests: &[Request]) -> Result<Vec<Result<Trace>>> {
        if self.head.is_parallel() {
            return Err(Error::InvalidInput(format!(
                "this is an OpenVLA-OFT model ({}): use trace_parallel",
                self.head.family()
            )));
        }
        let prepared: Vec<Result<Prepared>> = requests
            .iter()
            .map(|r| self.prepare(&r.observation, r.unnorm_key.as_deref()))
            .collect();
        let ok: Vec<&Prepared> = prepared.iter().filter_map(|p| p.as_ref().ok()).collect();
        let gen_requests: Vec<GenerationRequest> = ok
            .iter()
            .map(|p| GenerationRequest {
                pixel_values: &p.pixel_values,
                input_ids: &p.input_ids,
                max_new_tokens: p.action_dim,
            })
            .collect();
        let mut generations = self.model.generate_batch(&gen_requests)?.into_iter();
        let mut out = Vec::with_capacity(requests.len());
        for p in prepared {
            out.push(match p {
                Err(e) => Err(e),
                Ok(p) => match generations.next() {
                    Some(g) => self.finish(p, g),
                    None => Err(Error::InvalidInput(
                        "batch generation lost a request".into(),
                    )),
                },
            });
        }
        Ok(out)
    }

    /// Everything about a request that can fail before the model runs.
    fn prepare(&self, observation: &Observation, unnorm_key: Option<&str>) -> Result<Prepared> {
        let t0 = Instant::now();
        let (key, stats) = resolve_unnorm_key(&self.norm_stats, unnorm_key)?;
        let prompt_ids = self.prompt_ids(&observation.instruction)?;
        let mut input_ids = prompt_ids.clone();
        if input_ids.last() != Some(&crate::model::SPACE_TOKEN) {
            input_ids.push(crate::model::SPACE_TOKEN);
        }
        let action_dim = stats.action.action_dim();
        // [BOS, patches, rest of prompt] is prefilled, then action_dim - 1 generated tokens
        // are fed back; checked here so that an over-long instruction fails alone instead of
        // failing the batch it is in.
        let positions = input_ids.len() + self.config.num_patches() + action_dim.saturating_sub(1);
        let max_positions = self.config.text.max_position_embeddings;
        if positions > max_positions {
            return Err(Error::InvalidInput(format!(
                "the instruction is too long: its {} prompt tokens, {} image patches and {} \
                 action tokens need {positions} positions, more than the model's \
                 max_position_embeddings ({max_positions})",
                input_ids.len(),
                self.config.num_patches(),
                action_dim
            )));
        }
        let image = match observation.images.as_slice() {
            [(_, image)] => image,
            other => {
                return Err(Error::InvalidInput(format!(
                    "this model takes exactly 1 image, got {}",
                    other.len()
                )))
            }
        };
        let pixel_values = self.preprocess_image(image)?;
        Ok(Prepared {
            pixel_values,
            prompt_ids,
            input_ids,
            unnorm_key: key.to_string(),
            stats: stats.action.clone(),
            action_dim,
            preprocess_time: t0.elapsed(),
        })
    }

    /// Turns generated tokens into the prediction.
    fn finish(&self, p: Prepared, generation: GenerationTrace) -> Result<Trace> {
        // The reference takes the last `action_dim` ids of prompt + generated tokens, which
        // matters only if EOS stopped generation early.
        let full: Vec<u32> = p
            .input_ids
            .iter()
            .chain(&generation.generated)
            .copied()
            .collect();
        if full.len() < p.action_dim {
            return Err(Error::InvalidInput(format!(
                "generation produced {} ids, fewer than action_dim {}",
                full.len(),
                p.action_dim
            )));
        }
        let token_ids = full[full.len() - p.action_dim..].to_vec();
        let normalized_action = self.action_tokenizer.decode(&token_ids);
        let action = unnormalize(&normalized_action, &p.stats);
        Ok(Trace {
            pixel_values: p.pixel_values,
            prompt_ids: p.prompt_ids,
            input_ids: p.input_ids,
            generation,
            preprocess_time: p.preprocess_time,
            prediction: Prediction {
                actions: vec![action],
                normalized_actions: vec![normalized_action],
                token_ids,
                unnorm_key: p.unnorm_key,
            },
        })
    }
}

/// A request of a batch: an observation and the dataset statistics to un-normalize with.
#[derive(Debug, Clone)]
pub struct Request {
    /// Image and instruction.
    pub observation: Observation,
    /// Dataset statistics to use (may be omitted when the model has exactly one dataset).
    pub unnorm_key: Option<String>,
}

/// A request after the checks and preprocessing that precede the model.
struct Prepared {
    pixel_values: Tensor,
    prompt_ids: Vec<u32>,
    input_ids: Vec<u32>,
    unnorm_key: String,
    stats: ActionStatistics,
    action_dim: usize,
    preprocess_time: Duration,
}

/// Reads `preprocessor_config.json` and checks it against the towers.
fn load_preprocessor(dir: &Path, config: &ModelConfig) -> Result<PreprocessorConfig> {
    let path = dir.join("preprocessor_config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let pre = PreprocessorConfig::from_json(&text).map_err(|e| Error::Config {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let towers = pre.num_towers();
    if towers != config.towers.len() {
        return Err(Error::config(
            &path,
            format!(
                "describes {towers} image transforms but config.json has {} vision towers",
                config.towers.len()
            ),
        ));
    }
    Ok(pre)
}

/// Checks that every dataset's statistics hold what the OFT constants need: action statistics
/// of dimension D, and proprio statistics when the model takes proprio.
fn check_oft_stats(stats: &NormStats, source: &Path, oft: &OftModel) -> Result<()> {
    let d = oft.constants.action_dim.value;
    for (key, s) in stats {
        if s.action.action_dim() != d {
            return Err(Error::config(
                source,
                format!(
                    "{key:?}: action statistics have {} dimensions, but the action dimension is                      {d} (from {})",
                    s.action.action_dim(),
                    oft.constants.action_dim.source
                ),
            ));
        }
    }
    Ok(())
}

/// The proprio statistics of a dataset (`dataset_statistics.json` `proprio`).
fn proprio_stats(stats: &crate::action::DatasetStatistics, key: &str) -> Result<Stats> {
    let v = stats.proprio.as_ref().ok_or_else(|| {
        Error::InvalidInput(format!(
            "dataset {key:?} has no proprio statistics in dataset_statistics.json, which a \
             model with a proprio projector needs"
        ))
    })?;
    serde_json::from_value(v.clone()).map_err(|e| {
        Error::InvalidInput(format!(
            "dataset {key:?}: malformed proprio statistics: {e}"
        ))
    })
}

/// Everything computed for one observation by an OFT (parallel decoding) model.
#[derive(Debug, Clone)]
pub struct ParallelPolicyTrace {
    /// Each image as the towers' processor receives it (after the resize and centre crop).
    pub images: Vec<RgbImage>,
    /// `pixel_values [1, C, H, W]` of each image.
    pub pixel_values: Vec<Tensor>,
    /// Normalized proprio (float64), if the model takes proprio.
    pub proprio_normalized: Option<Vec<f64>>,
    /// The proprio token `[1, 1, D]`.
    pub proprio_token: Option<Tensor>,
    /// Prompt ids with BOS and the trailing 29871.
    pub input_ids: Vec<u32>,
    /// The LLM pass.
    pub forward: ParallelTrace,
    /// The L1 head's stages (L1 head only).
    pub head: Option<MlpResNetTrace>,
    /// Time spent in image preprocessing, proprio and tokenization.
    pub preprocess_time: Duration,
    /// The final prediction.
    pub prediction: Prediction,
}

/// An OFT request after the checks and preprocessing that precede the model.
struct PreparedParallel {
    images: Vec<RgbImage>,
    pixel_values: Vec<Tensor>,
    proprio_normalized: Option<Vec<f64>>,
    proprio_token: Option<Tensor>,
    input_ids: Vec<u32>,
    unnorm_key: String,
    preprocess_time: Duration,
}

/// Side of the images OFT's processor path expects before the centre crop.
pub const OFT_IMAGE_SIZE: u32 = 224;

impl Policy {
    /// The image an OFT model's processor receives: resized to 224×224 with TF's JPEG round
    /// trip and lanczos3 when it has another size, then centre-cropped as TF does.
    pub fn oft_image(&self, image: &RgbImage) -> Result<RgbImage> {
        let oft = self
            .oft
            .as_ref()
            .ok_or_else(|| Error::InvalidInput("not an OpenVLA-OFT model".into()))?;
        let resized;
        let image = if image.size() != (OFT_IMAGE_SIZE, OFT_IMAGE_SIZE) {
            resized = openvla_image::tf_resize_for_policy(image, OFT_IMAGE_SIZE)?;
            &resized
        } else {
            image
        };
        if oft.center_crop {
            Ok(openvla_image::tf_center_crop(
                image,
                openvla_image::OFT_CROP_SCALE,
            )?)
        } else {
            Ok(image.clone())
        }
    }

    /// Runs one observation through an OFT model, keeping every intermediate result.
    pub fn trace_parallel(
        &self,
        observation: &Observation,
        unnorm_key: Option<&str>,
    ) -> Result<ParallelPolicyTrace> {
        let request = Request {
            observation: observation.clone(),
            unnorm_key: unnorm_key.map(str::to_string),
        };
        self.trace_parallel_batch(std::slice::from_ref(&request))?
            .pop()
            .ok_or_else(|| Error::InvalidInput("the batch lost its only request".into()))?
    }

    /// Runs a batch of requests through an OFT model: each is checked and preprocessed on its
    /// own (a bad request fails alone), then all run as one packed LLM pass
    /// ([`OpenVla::parallel_forward_batch`]); every request gets exactly its single answer.
    /// The outer error is a failure of the batch as a whole.
    pub fn trace_parallel_batch(
        &self,
        requests: &[Request],
    ) -> Result<Vec<Result<ParallelPolicyTrace>>> {
        let prepared: Vec<Result<PreparedParallel>> = requests
            .iter()
            .map(|r| self.prepare_parallel(&r.observation, r.unnorm_key.as_deref()))
            .collect();
        let ok: Vec<&PreparedParallel> = prepared.iter().filter_map(|p| p.as_ref().ok()).collect();
        let placeholders = match &self.oft {
            Some(o) => o.placeholders(),
            None => return Err(Error::InvalidInput("not an OpenVLA-OFT model".into())),
        };
        let inputs: Vec<ParallelInput> = ok
            .iter()
            .map(|p| ParallelInput {
                pixel_values: &p.pixel_values,
                proprio_token: p.proprio_token.as_ref(),
                input_ids: &p.input_ids,
                placeholders,
            })
            .collect();
        let mut forwards = if inputs.is_empty() {
            Vec::new()
        } else {
            self.model.parallel_forward_batch(&inputs)?
        }
        .into_iter();
        Ok(prepared
            .into_iter()
            .map(|p| {
                let p = p?;
                let forward = forwards
                    .next()
                    .ok_or_else(|| Error::InvalidInput("batch forward lost a request".into()))?;
                self.finish_parallel(p, forward)
            })
            .collect())
    }

    /// Everything about an OFT request that can fail before the model runs.
    fn prepare_parallel(
        &self,
        observation: &Observation,
        unnorm_key: Option<&str>,
    ) -> Result<PreparedParallel> {
        let oft = self.oft.as_ref().ok_or_else(|| {
            Error::InvalidInput(
                "trace_parallel needs an OpenVLA-OFT model; this is an OpenVLA (256-bin) model"
                    .into(),
            )
        })?;
        let t0 = Instant::now();
        let (key, stats) = resolve_unnorm_key(&self.norm_stats, unnorm_key)?;
        let c = &oft.constants;
        let n = c.num_images.value;
        if observation.images.len() != n {
            let names: Vec<&str> = observation.images.iter().map(|(n, _)| n.as_str()).collect();
            return Err(Error::InvalidInput(format!(
                "this model takes {n} images (from {}: primary first, then wrist views), got {} \
                 ({})",
                c.num_images.source,
                observation.images.len(),
                names.join(", ")
            )));
        }
        let (proprio_normalized, proprio_token) = match (&oft.proprio, c.proprio_dim.value) {
            (Some(projector), Some(p)) => {
                let raw = observation.proprio.as_ref().ok_or_else(|| {
                    Error::InvalidInput(format!(
                        "this model takes proprio ({p} values: the robot state) and none was given"
                    ))
                })?;
                if raw.len() != p {
                    return Err(Error::InvalidInput(format!(
                        "proprio has {} values, this model takes {p} (from {})",
                        raw.len(),
                        c.proprio_dim.source
                    )));
                }
                let normalized =
                    normalize_proprio(raw, &proprio_stats(stats, key)?, c.normalization.value)?;
                let token = projector.forward(&normalized, &self.device)?;
                (Some(normalized), Some(token))
            }
            _ => (None, None),
        };
        let images = observation
            .images
            .iter()
            .map(|(_, img)| self.oft_image(img))
            .collect::<Result<Vec<_>>>()?;
        let pixel_values = images
            .iter()
            .map(|img| self.preprocess_image(img))
            .collect::<Result<Vec<_>>>()?;
        let mut input_ids = self.prompt_ids(&observation.instruction)?;
        if input_ids.last() != Some(&crate::model::SPACE_TOKEN) {
            input_ids.push(crate::model::SPACE_TOKEN);
        }
        Ok(PreparedParallel {
            images,
            pixel_values,
            proprio_normalized,
            proprio_token,
            input_ids,
            unnorm_key: key.to_string(),
            preprocess_time: t0.elapsed(),
        })
    }

    /// Runs the head on a forward pass's window and un-normalizes the chunk.
    fn finish_parallel(
        &self,
        p: PreparedParallel,
        forward: ParallelTrace,
    ) -> Result<ParallelPolicyTrace> {
        let oft = self
            .oft
            .as_ref()
            .ok_or_else(|| Error::InvalidInput("not an OpenVLA-OFT model".into()))?;
        let c = &oft.constants;
        let placeholders = oft.placeholders();
        let stats = &self
            .norm_stats
            .get(&p.unnorm_key)
            .ok_or_else(|| Error::UnnormKey(format!("unknown unnorm_key {:?}", p.unnorm_key)))?
            .action;
        let (k, d) = (c.chunk.value, c.action_dim.value);
        let (normalized, token_ids, head, f32_head) = match &self.head {
            ActionHead::ParallelL1(mlp) => {
                let x = forward.window.reshape((k, d * forward.window.dim(2)?))?;
                let tr = mlp.forward_traced(&x)?;
                let flat: Vec<f64> = tr
                    .output
                    .to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .into_iter()
                    .map(f64::from)
                    .collect();
                (flat, Vec::new(), Some(tr), true)
            }
            ActionHead::ParallelDiscrete(tok) => {
                let logits = self.model.llm.all_logits(&forward.window)?.squeeze(0)?;
                let ids: Vec<u32> = (0..placeholders)
                    .map(|i| -> Result<u32> {
                        let row = logits.get(i)?.to_vec1::<f32>()?;
                        Ok(crate::model::llama::argmax(&row) as u32)
                    })
                    .collect::<Result<_>>()?;
                (tok.decode(&ids), ids, None, false)
            }
            ActionHead::Autoregressive256(_) => {
                return Err(Error::InvalidInput(
                    "the 256-bin head decodes autoregressively: use trace".into(),
                ))
            }
        };
        let mut actions = Vec::with_capacity(k);
        let mut normalized_actions = Vec::with_capacity(k);
        for row in normalized.chunks(d) {
            actions.push(unnormalize_oft(
                row,
                stats,
                c.normalization.value,
                f32_head,
            )?);
            normalized_actions.push(row.to_vec());
        }
        Ok(ParallelPolicyTrace {
            images: p.images,
            pixel_values: p.pixel_values,
            proprio_normalized: p.proprio_normalized,
            proprio_token: p.proprio_token,
            input_ids: p.input_ids,
            forward,
            head,
            preprocess_time: p.preprocess_time,
            prediction: Prediction {
                actions,
                normalized_actions,
                token_ids,
                unnorm_key: p.unnorm_key,
            },
        })
    }
}
