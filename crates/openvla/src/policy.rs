//! `Policy`: the one object every front end holds (processor + model + action head + norm stats).

use crate::action::{
    resolve_unnorm_key, unnormalize, ActionStatistics, ActionTokenizer, NormStats,
};
use crate::checkpoint::{Checkpoint, LoadProgress, WeightLoader};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::linear::{WeightDtype, WeightPolicy};
use crate::model::{GenerationRequest, GenerationTrace, OpenVla};
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
    /// Arithmetic of the many-row products (vision, projector, prefill): exact f32 (the
    /// default) or bf16 ([`crate::model::linear::ComputePrecision`]).
    pub compute: crate::model::linear::ComputePrecision,
}

/// One robot observation.
#[derive(Debug, Clone)]
pub struct Observation {
    /// The camera image (any size, RGB).
    pub image: RgbImage,
    /// The task, e.g. "pick up the red block".
    pub instruction: String,
}

/// The policy's answer for one observation.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// Un-normalized action (float64), one value per action dimension.
    pub action: Vec<f64>,
    /// Action in [-1, 1] before un-normalization.
    pub normalized_action: Vec<f64>,
    /// The generated action token ids.
    pub token_ids: Vec<u32>,
    /// The dataset statistics used.
    pub unnorm_key: String,
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
        let weight_dtype = match options.precision {
            Precision::F32 => WeightDtype::F32,
            Precision::Bf16 => WeightDtype::Bf16,
            Precision::F16 => WeightDtype::F16,
            Precision::Auto if quantization.is_some() => WeightDtype::F32,
            Precision::Auto => {
                let f32_bytes = ckpt.total_bytes() / 2 * 4;
                match available_memory() {
                    Some(avail) if f32_bytes > avail / 10 * 6 => WeightDtype::Bf16,
                    _ => WeightDtype::F32,
                }
            }
        };
        let weights = match quantization {
            Some(q) => WeightPolicy::quantized(weight_dtype, q),
            None => WeightPolicy::dense(weight_dtype),
        };
        let weights = weights.with_compute(options.compute);
        let device = Device::Cpu;
        let loader = WeightLoader::new(&ckpt, device.clone(), options.progress);
        let model = OpenVla::load(&loader, &config, &weights)?;
        loader.finish()?;
        let action_tokenizer = ActionTokenizer::new(config.n_action_bins, config.action_vocab_size);
        Ok(Policy {
            dir: dir.to_path_buf(),
            config,
            preprocessor,
            tokenizer,
            model,
            norm_stats,
            norm_stats_source,
            action_tokenizer,
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

    /// Action dimension of a dataset.
    pub fn action_dim(&self, unnorm_key: Option<&str>) -> Result<usize> {
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
        let pixel_values = self.preprocess_image(&observation.image)?;
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
                action,
                normalized_action,
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
