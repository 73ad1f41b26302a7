//! `openvla init`: a freshly initialized model directory of any OpenVLA-family shape, for
//! training from scratch (docs/init.md).
//!
//! The shape is described by an [`InitConfig`] (a TOML file, or a named [`PRESETS`] entry):
//! one vision tower (SigLIP-like, no class token) or two (DINOv2 with registers, then SigLIP,
//! fused), any image size and patch grid, a Llama of any width, depth, heads and vocabulary
//! (optionally with tied embeddings), and an OFT L1 action head (chunk K, action dimension D,
//! optional proprio, number of images) or the 256-bin token head.
//!
//! Every tensor starts as the reference's modules initialize it:
//! - timm 0.9.10 `VisionTransformer` (`init_weights('')`): Linear weights truncated normal
//!   (std 0.02, cut at ±2), biases zero; LayerNorm ones and zeros; the patch embedding is a
//!   `Conv2d` left at PyTorch's default (kaiming uniform with a = √5, so U(±1/√fan_in) for
//!   weight and bias); `pos_embed` truncated normal std 0.02; the class token normal std 1e-6;
//!   register tokens zero (0.9.10 leaves them as created); LayerScale factors 1e-5
//!   (`init_values` of timm's DINOv2 models); SigLIP's attention-pool latent truncated normal
//!   std `dim^-0.5` cut at ±2 std. `tools/reference/check_init.py` compares a written
//!   directory with timm's and transformers' own modules.
//! - transformers 4.40.1 `LlamaPreTrainedModel._init_weights`: Linear and Embedding weights
//!   normal(0, `initializer_range`), the embedding's `pad_token_id` row zero, RMSNorm ones.
//! - The projector and OFT's `MLPResNet` action head and `ProprioProjector`: `nn.Linear`
//!   defaults (U(±1/√fan_in) for weight and bias), `nn.LayerNorm` ones and zeros.
//!
//! Values are drawn from a counter-based generator keyed by the seed and the tensor's name, so
//! a directory is a pure function of (config, seed, dtype).

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::oft::pt::write_state_dict;
use crate::synth::{
    checkpoint_tensors, name_seed, splitmix64, write_json, write_model_files, write_safetensors,
    SavedDtype,
};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The Llama-2 tokenizer's size: 32000 tokens plus `<PAD>`.
const TOKENIZER_SIZE: usize = 32001;
/// The reference pads the embedding matrix to a multiple of this (`pad_to_multiple_of`).
const PAD_TO_MULTIPLE_OF: usize = 64;
/// Id of `<PAD>`, whose embedding row is zero (`padding_idx`).
const PAD_TOKEN_ID: usize = 32000;
/// Tokens of the prompt and its template besides the image patches and action positions,
/// generously counted (BOS, `In: What action should the robot take to ...?\nOut:`, stop).
const PROMPT_TOKEN_ALLOWANCE: usize = 64;

/// Named configurations: `(name, TOML text)`. The first is the documented example.
pub const PRESETS: &[(&str, &str)] = &[
    ("metaworld-small", METAWORLD_SMALL),
    ("metaworld-fused", METAWORLD_FUSED),
];

/// The Meta-World policy of issue 15: one SigLIP-like tower, 128 px, 64 patches.
pub const METAWORLD_SMALL: &str = r#"# openvla init preset "metaworld-small": a from-scratch Meta-World policy, 28.8 MB in bf16.

[vision]
image_size = 128                # pixels, square; every tower sees this size

[[vision.towers]]
kind = "siglip"                 # SigLIP-like: no class token, mean/std 0.5
width = 192
depth = 5                       # OpenVLA reads the output of block depth-2: 4 blocks are used
heads = 3
mlp_ratio = 4.0
patch_size = 16                 # 128 / 16 = 8 x 8 = 64 patches

[llm]
width = 256
depth = 4
heads = 4
intermediate = 688
vocab_size = 32064              # the Llama-2 tokenizer (32001 tokens) padded to a multiple of 64
tie_word_embeddings = true      # lm_head = embed_tokens (saves 16 MB in bf16)

[head]
kind = "l1"                     # OFT L1 regression head (MLPResNet) on parallel action chunks
chunk = 8                       # K actions per chunk
action_dim = 4                  # D
proprio_dim = 4                 # robot state obs[:4]; omit for no proprio projector
images = 1
"#;

/// The same policy with the fused DINOv2-reg + SigLIP backbone (35.5 MB in bf16).
pub const METAWORLD_FUSED: &str = r#"# openvla init preset "metaworld-fused": two towers (DINOv2 with registers, then SigLIP), fused.

[vision]
image_size = 128

[[vision.towers]]
kind = "dinov2"                 # class token, 4 register tokens, LayerScale, ImageNet mean/std
width = 192
depth = 5
heads = 3
patch_size = 16
registers = 4

[[vision.towers]]
kind = "siglip"
width = 192
depth = 5
heads = 3
patch_size = 16

[llm]
width = 256
depth = 4
heads = 4
intermediate = 688
tie_word_embeddings = true

[head]
kind = "l1"
chunk = 8
action_dim = 4
proprio_dim = 4
images = 1
"#;

/// The file `openvla init --config` reads (TOML; unknown keys are errors).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitConfig {
    /// The vision towers.
    pub vision: VisionSpec,
    /// The language model.
    pub llm: LlmSpec,
    /// The action head.
    pub head: HeadSpec,
}

/// `[vision]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VisionSpec {
    /// Input resolution of every tower (square), in pixels.
    pub image_size: usize,
    /// `[[vision.towers]]`: one tower, or two (DINOv2 then SigLIP) for the fused backbone.
    pub towers: Vec<TowerSpec>,
}

/// Which timm ViT family a tower follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TowerKind {
    /// SigLIP-like: no class token, no LayerScale, mean and std 0.5.
    Siglip,
    /// DINOv2-like: class token, register tokens, LayerScale, ImageNet mean and std.
    Dinov2,
}

/// `[[vision.towers]]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TowerSpec {
    /// `siglip` or `dinov2`.
    pub kind: TowerKind,
    /// Token width (timm `embed_dim`).
    pub width: usize,
    /// Blocks stored; OpenVLA uses the output of block `depth - 2`, so at least 2.
    pub depth: usize,
    /// Attention heads; must divide `width`.
    pub heads: usize,
    /// MLP width ratio (hidden = `int(width * mlp_ratio)`); default 4.
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    /// Patch size in pixels; must divide `vision.image_size`.
    pub patch_size: usize,
    /// Register tokens (DINOv2 only; default 4 for DINOv2).
    #[serde(default)]
    pub registers: Option<usize>,
    /// Keep SigLIP's attention-pool head, which the reference stores but never uses
    /// (SigLIP only; default false).
    #[serde(default)]
    pub attn_pool: bool,
}

fn default_mlp_ratio() -> f64 {
    4.0
}

/// `[llm]`: a Llama (transformers 4.40.1 `LlamaConfig` semantics).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmSpec {
    /// Hidden size.
    pub width: usize,
    /// Decoder layers.
    pub depth: usize,
    /// Query heads; must divide `width`, and `width / heads` must be even (RoPE).
    pub heads: usize,
    /// Key/value heads (grouped-query attention); must divide `heads`. Default: `heads`.
    #[serde(default)]
    pub kv_heads: Option<usize>,
    /// SwiGLU width.
    pub intermediate: usize,
    /// Embedding rows: at least 32064 (the Llama-2 tokenizer's 32001 tokens padded to a
    /// multiple of 64, as the reference does) and a multiple of 64. Default 32064.
    #[serde(default = "default_vocab")]
    pub vocab_size: usize,
    /// `lm_head` shares the embedding matrix (HF `tie_word_embeddings`). Default false.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// RoPE base. Default 10000.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Longest sequence. Default 2048.
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon. Default 1e-6 (the `LlamaConfig` default OpenVLA runs with).
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    /// Standard deviation of the Linear and Embedding weights. Default 0.02.
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
}

fn default_vocab() -> usize {
    TOKENIZER_SIZE.div_ceil(PAD_TO_MULTIPLE_OF) * PAD_TO_MULTIPLE_OF
}
fn default_rope_theta() -> f64 {
    10000.0
}
fn default_max_positions() -> usize {
    2048
}
fn default_rms_eps() -> f64 {
    1e-6
}
fn default_init_range() -> f64 {
    0.02
}

/// `[head]`, tagged by `kind`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", deny_unknown_fields)]
pub enum HeadSpec {
    /// `kind = "l1"`: OpenVLA-OFT's L1 regression head on parallel action chunks.
    #[serde(rename = "l1")]
    L1 {
        /// Actions per chunk (K).
        chunk: usize,
        /// Action dimension (D).
        action_dim: usize,
        /// Proprio (robot state) dimension; absent = no proprio projector.
        #[serde(default)]
        proprio_dim: Option<usize>,
        /// Images per observation (primary, then wrist views). Default 1.
        #[serde(default = "default_images")]
        images: usize,
        /// Residual blocks of the `MLPResNet` (the reference uses 2).
        #[serde(default = "default_head_blocks")]
        blocks: usize,
        /// `bounds_q99` (default) or `bounds`.
        #[serde(default = "default_normalization")]
        normalization: String,
        /// Centre-crop images at inference (the reference's default, for models trained with
        /// random crops). Default true.
        #[serde(default = "default_true")]
        center_crop: bool,
    },
    /// `kind = "bins"`: the original OpenVLA head, one action per call decoded as 256-bin
    /// tokens of the Llama-2 vocabulary.
    #[serde(rename = "bins")]
    Bins {
        /// Number of bins. Default 256.
        #[serde(default = "default_bins")]
        bins: usize,
    },
}

fn default_images() -> usize {
    1
}
fn default_head_blocks() -> usize {
    OFT_HEAD_BLOCKS
}
fn default_normalization() -> String {
    "bounds_q99".into()
}
fn default_true() -> bool {
    true
}
fn default_bins() -> usize {
    256
}

impl InitConfig {
    /// Parses TOML text; `origin` names the file (or preset) in errors.
    pub fn from_toml(text: &str, origin: &Path) -> Result<InitConfig> {
        let cfg: InitConfig = toml::from_str(text)
            .map_err(|e| Error::config(origin, format!("invalid init config: {e}")))?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<InitConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml(&text, path)
    }

    /// A named preset (see [`PRESETS`]).
    pub fn preset(name: &str) -> Result<InitConfig> {
        let text = preset_text(name)?;
        Self::from_toml(text, Path::new(&format!("preset {name}")))
    }

    /// Checks that the shape is consistent; every error names the field and what was expected.
    pub fn validate(&self, origin: &Path) -> Result<()> {
        let bad = |m: String| Err(Error::config(origin, m));
        let v = &self.vision;
        match v.towers.as_slice() {
            [_] => {}
            [a, b] => {
                if (a.kind, b.kind) != (TowerKind::Dinov2, TowerKind::Siglip) {
                    return bad(format!(
                        "two towers must be a dinov2 tower then a siglip tower (the fused \
                         DINOv2 + SigLIP backbone), found {:?} then {:?}",
                        a.kind, b.kind
                    ));
                }
                if a.patch_size != b.patch_size {
                    return bad(format!(
                        "the fused towers must have the same patch grid: patch_size {} and {} \
                         give different numbers of patches at {} px",
                        a.patch_size, b.patch_size, v.image_size
                    ));
                }
            }
            t => {
                return bad(format!(
                    "vision.towers has {} entries; expected 1 (one tower) or 2 (dinov2 + siglip)",
                    t.len()
                ))
            }
        }
        for (i, t) in v.towers.iter().enumerate() {
            let at = format!("vision.towers[{i}] ({:?})", t.kind);
            if t.width == 0 || t.heads == 0 || !t.width.is_multiple_of(t.heads) {
                return bad(format!(
                    "{at}: width {} must be a positive multiple of heads {}",
                    t.width, t.heads
                ));
            }
            if t.depth < 2 {
                return bad(format!(
                    "{at}: depth {} is too small; OpenVLA uses the output of block depth-2, so \
                     depth must be at least 2",
                    t.depth
                ));
            }
            if t.mlp_ratio.is_nan() || (t.width as f64 * t.mlp_ratio) < 1.0 {
                return bad(format!(
                    "{at}: mlp_ratio {} gives no MLP width",
                    t.mlp_ratio
                ));
            }
            if t.patch_size == 0
                || v.image_size < t.patch_size
                || !v.image_size.is_multiple_of(t.patch_size)
            {
                return bad(format!(
                    "{at}: patch_size {} must divide vision.image_size {} (e.g. 128 px with \
                     patch 16 gives 8 x 8 = 64 patches)",
                    t.patch_size, v.image_size
                ));
            }
            match t.kind {
                TowerKind::Siglip if t.registers.unwrap_or(0) > 0 => {
                    return bad(format!(
                        "{at}: registers are a DINOv2 feature; a siglip tower has none"
                    ))
                }
                TowerKind::Dinov2 if t.attn_pool => {
                    return bad(format!(
                        "{at}: attn_pool is SigLIP's attention-pool head; a dinov2 tower has none"
                    ))
                }
                _ => {}
            }
        }
        let l = &self.llm;
        let kv = l.kv_heads.unwrap_or(l.heads);
        if l.width == 0 || l.heads == 0 || !l.width.is_multiple_of(l.heads) {
            return bad(format!(
                "llm: width {} must be a positive multiple of heads {}",
                l.width, l.heads
            ));
        }
        if !(l.width / l.heads).is_multiple_of(2) {
            return bad(format!(
                "llm: the head width {} / {} = {} must be even for RoPE",
                l.width,
                l.heads,
                l.width / l.heads
            ));
        }
        if kv == 0 || !l.heads.is_multiple_of(kv) {
            return bad(format!("llm: kv_heads {kv} must divide heads {}", l.heads));
        }
        if l.depth == 0 || l.intermediate == 0 {
            return bad(format!(
                "llm: depth {} and intermediate {} must be positive",
                l.depth, l.intermediate
            ));
        }
        if l.vocab_size < default_vocab() || !l.vocab_size.is_multiple_of(PAD_TO_MULTIPLE_OF) {
            return bad(format!(
                "llm: vocab_size {} must be a multiple of {PAD_TO_MULTIPLE_OF} and at least {} \
                 (the Llama-2 tokenizer has {TOKENIZER_SIZE} tokens and OpenVLA pads the \
                 embedding to a multiple of {PAD_TO_MULTIPLE_OF})",
                l.vocab_size,
                default_vocab()
            ));
        }
        if [l.initializer_range, l.rms_norm_eps, l.rope_theta]
            .iter()
            .any(|x| x.is_nan() || *x <= 0.0)
        {
            return bad(
                "llm: initializer_range, rms_norm_eps and rope_theta must be positive".into(),
            );
        }
        let patches = (v.image_size / v.towers[0].patch_size).pow(2);
        let (images, actions, proprio) = match &self.head {
            HeadSpec::L1 {
                chunk,
                action_dim,
                proprio_dim,
                images,
                blocks: _,
                normalization,
                center_crop: _,
            } => {
                if *chunk == 0 || *action_dim == 0 || *images == 0 {
                    return bad(format!(
                        "head: chunk {chunk}, action_dim {action_dim} and images {images} must \
                         be at least 1"
                    ));
                }
                if *proprio_dim == Some(0) {
                    return bad(
                        "head: proprio_dim 0; omit proprio_dim for a model without proprio".into(),
                    );
                }
                if let Err(e) = normalization.parse::<crate::oft::constants::NormalizationType>() {
                    return bad(format!("head.normalization: {e}"));
                }
                (
                    *images,
                    chunk * action_dim,
                    usize::from(proprio_dim.is_some()),
                )
            }
            HeadSpec::Bins { bins } => {
                if !(2..=256).contains(bins) {
                    return bad(format!(
                        "head: bins {bins} must be between 2 and 256 (the action tokens are the \
                         last bins of the Llama-2 vocabulary)"
                    ));
                }
                // One action of at most a few dozen dimensions, decoded token by token.
                (1, 32, 0)
            }
        };
        let seq = patches * images + proprio + actions + PROMPT_TOKEN_ALLOWANCE;
        if seq > l.max_position_embeddings {
            return bad(format!(
                "the sequence ({patches} patches x {images} images + {actions} action positions \
                 + {proprio} proprio + about {PROMPT_TOKEN_ALLOWANCE} prompt tokens = {seq}) \
                 exceeds llm.max_position_embeddings {}",
                l.max_position_embeddings
            ));
        }
        Ok(())
    }

    /// The timm id each tower is described by (sized by `tiny_timm_overrides`).
    fn timm_id(kind: TowerKind) -> &'static str {
        match kind {
            TowerKind::Siglip => "vit_base_patch16_siglip_224",
            TowerKind::Dinov2 => "vit_small_patch14_reg4_dinov2",
        }
    }

    /// The `config.json` of this shape (without statistics).
    pub fn config_json(&self, dtype: SavedDtype) -> Value {
        let v = &self.vision;
        let fused = v.towers.len() == 2;
        let mut overrides = serde_json::Map::new();
        for t in &v.towers {
            let mut o = json!({
                "embed_dim": t.width, "depth": t.depth, "num_heads": t.heads,
                "mlp_ratio": t.mlp_ratio, "patch_size": t.patch_size, "img_size": v.image_size,
            });
            match t.kind {
                TowerKind::Siglip => {
                    o["class_token"] = json!(false);
                    o["reg_tokens"] = json!(0);
                    o["attn_pool"] = json!(t.attn_pool);
                }
                TowerKind::Dinov2 => {
                    o["class_token"] = json!(true);
                    o["reg_tokens"] = json!(t.registers.unwrap_or(4));
                }
            }
            overrides.insert(Self::timm_id(t.kind).to_string(), o);
        }
        let l = &self.llm;
        let torch_dtype = match dtype {
            SavedDtype::Bf16 => "bfloat16",
            SavedDtype::F32 => "float32",
        };
        let ids: Vec<&str> = v.towers.iter().map(|t| Self::timm_id(t.kind)).collect();
        let mut cfg = json!({
            "architectures": ["OpenVLAForActionPrediction"],
            "arch_specifier": "no-align+fused-gelu-mlp",
            "hf_llm_id": "meta-llama/Llama-2-7b-hf",
            "image_resize_strategy": "resize-naive",
            "image_sizes": vec![v.image_size; v.towers.len()],
            "llm_backbone_id": "llama2-7b-pure",
            "llm_max_length": l.max_position_embeddings,
            "model_type": "openvla",
            "n_action_bins": match self.head { HeadSpec::Bins { bins } => bins, HeadSpec::L1 { .. } => 256 },
            "output_projector_states": false,
            "pad_to_multiple_of": PAD_TO_MULTIPLE_OF,
            "pad_token_id": PAD_TOKEN_ID,
            "text_config": {
                "model_type": "llama", "vocab_size": l.vocab_size, "hidden_size": l.width,
                "intermediate_size": l.intermediate, "num_hidden_layers": l.depth,
                "num_attention_heads": l.heads,
                "num_key_value_heads": l.kv_heads.unwrap_or(l.heads),
                "max_position_embeddings": l.max_position_embeddings,
                "rope_theta": l.rope_theta, "rms_norm_eps": l.rms_norm_eps,
                "initializer_range": l.initializer_range,
                "tie_word_embeddings": l.tie_word_embeddings,
                "pad_token_id": PAD_TOKEN_ID, "torch_dtype": torch_dtype
            },
            "timm_model_ids": ids,
            "timm_override_act_layers": vec![Value::Null; v.towers.len()],
            "tiny_timm_overrides": overrides,
            "torch_dtype": torch_dtype,
            "transformers_version": "4.40.1",
            "use_fused_vision_backbone": fused,
            "vision_backbone_id": match (fused, v.towers[0].kind) {
                (true, _) => "dinosiglip-vit-so-224px",
                (false, TowerKind::Siglip) => "siglip-vit-so400m",
                (false, TowerKind::Dinov2) => "dinov2-vit-l",
            },
        });
        if let HeadSpec::L1 {
            chunk,
            action_dim,
            proprio_dim,
            images,
            normalization,
            center_crop,
            ..
        } = &self.head
        {
            let mut constants = json!({
                "NUM_ACTIONS_CHUNK": chunk,
                "ACTION_DIM": action_dim,
                "ACTION_PROPRIO_NORMALIZATION_TYPE": normalization.to_ascii_lowercase(),
            });
            if let Some(p) = proprio_dim {
                constants["PROPRIO_DIM"] = json!(p);
            }
            if let Some(obj) = cfg.as_object_mut() {
                obj.insert("oft_constants".into(), constants);
                obj.insert(
                    "oft_eval_cfg".into(),
                    json!({
                        "use_l1_regression": true, "use_diffusion": false, "use_film": false,
                        "use_proprio": proprio_dim.is_some(), "num_images_in_input": images,
                        "center_crop": center_crop
                    }),
                );
            }
        }
        cfg
    }

    /// `preprocessor_config.json`: per tower the input size, bicubic resize and the tower's
    /// normalization (ImageNet for DINOv2, 0.5 for SigLIP), as `PrismaticImageProcessor`.
    pub fn preprocessor_json(&self) -> Value {
        let v = &self.vision;
        let n = v.towers.len();
        let (means, stds): (Vec<[f64; 3]>, Vec<[f64; 3]>) = v
            .towers
            .iter()
            .map(|t| match t.kind {
                TowerKind::Dinov2 => ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
                TowerKind::Siglip => ([0.5; 3], [0.5; 3]),
            })
            .unzip();
        json!({
            "auto_map": {"AutoImageProcessor": "processing_prismatic.PrismaticImageProcessor",
                         "AutoProcessor": "processing_prismatic.PrismaticProcessor"},
            "image_processor_type": "PrismaticImageProcessor",
            "image_resize_strategy": "resize-naive",
            "input_sizes": vec![[3, v.image_size, v.image_size]; n],
            "interpolations": vec!["bicubic"; n],
            "means": means,
            "processor_class": "PrismaticProcessor",
            "stds": stds,
            "use_fused_vision_backbone": n == 2
        })
    }
}

/// The TOML text of a preset, or an error listing them.
pub fn preset_text(name: &str) -> Result<&'static str> {
    PRESETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, t)| *t)
        .ok_or_else(|| {
            Error::InvalidInput(format!(
                "unknown preset {name:?}; available: {}",
                PRESETS
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
}

/// Options of [`write_initialized`].
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Seed of every random draw.
    pub seed: u64,
    /// Dtype of `model.safetensors` and of the action head file (the proprio projector is
    /// always float32, as the reference saves it).
    pub dtype: SavedDtype,
    /// The Llama-2 `tokenizer.json` to copy (with the `tokenizer_config.json` and
    /// `special_tokens_map.json` next to it).
    pub tokenizer: PathBuf,
    /// A `dataset_statistics.json` to install (e.g. from `openvla stats`); without it the
    /// directory has no statistics until `openvla finetune` writes them.
    pub stats: Option<PathBuf>,
    /// Largest safetensors shard in bytes.
    pub max_shard_bytes: u64,
}

/// What [`write_initialized`] wrote.
#[derive(Debug, Clone)]
pub struct InitSummary {
    /// Parameters in `model.safetensors` (tied embeddings counted once).
    pub backbone_params: u64,
    /// Parameters of the OFT action head and proprio projector.
    pub head_params: u64,
    /// Bytes of all weight files.
    pub weight_bytes: u64,
    /// Files written, relative to the directory.
    pub files: Vec<String>,
}

/// Writes a freshly initialized model directory for `cfg` to `out` (which must not exist or be
/// empty). `progress(done_bytes, total_bytes)` follows the safetensors writing.
pub fn write_initialized(
    out: &Path,
    cfg: &InitConfig,
    opts: &InitOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<InitSummary> {
    cfg.validate(out)?;
    if out.exists() {
        let mut entries = std::fs::read_dir(out).map_err(|e| Error::io(out, e))?;
        if entries.next().is_some() {
            return Err(Error::config(
                out,
                "the output directory exists and is not empty; choose a new --out (init never \
                 overwrites a model)",
            ));
        }
    }
    let stats_text = match &opts.stats {
        Some(p) => {
            let stats: crate::action::NormStats = crate::error::read_json(p)?;
            for (key, s) in &stats {
                s.action.validate(key).map_err(|m| Error::config(p, m))?;
            }
            Some(std::fs::read(p).map_err(|e| Error::io(p, e))?)
        }
        None => None,
    };
    let config = write_model_files(
        out,
        &cfg.config_json(opts.dtype),
        &cfg.preprocessor_json(),
        &opts.tokenizer,
    )?;
    write_json(
        &out.join("processor_config.json"),
        &json!({"auto_map": {"AutoProcessor": "processing_prismatic.PrismaticProcessor"},
                "processor_class": "PrismaticProcessor"}),
    )?;
    let tensors = checkpoint_tensors(&config);
    let rules: HashMap<&str, Law> = tensors
        .iter()
        .map(|(n, s)| Ok((n.as_str(), backbone_law(n, s, &config, &tensors)?)))
        .collect::<Result<_>>()?;
    let seed = opts.seed;
    let fill = |name: &str, shape: &[usize]| {
        let law = rules.get(name).copied().unwrap_or(Law::Const(0.0));
        let mut values = sample(law, name, shape, seed);
        if name == "language_model.model.embed_tokens.weight" {
            // nn.Embedding(padding_idx=pad_token_id): that row starts at zero.
            let d = shape[1];
            values[PAD_TOKEN_ID * d..(PAD_TOKEN_ID + 1) * d].fill(0.0);
        }
        opts.dtype.encode(&values)
    };
    write_safetensors(
        out,
        &tensors,
        opts.dtype,
        opts.max_shard_bytes,
        &fill,
        progress,
    )?;
    let backbone_params: u64 = tensors
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64)
        .sum();
    let mut weight_bytes = backbone_params * opts.dtype.size() as u64;
    let mut files: Vec<String> = std::fs::read_dir(out)
        .map_err(|e| Error::io(out, e))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    let mut head_params = 0u64;
    if let HeadSpec::L1 {
        action_dim,
        proprio_dim,
        blocks,
        ..
    } = &cfg.head
    {
        let llm = cfg.llm.width;
        let head = oft_head_tensors(llm, *action_dim, *blocks);
        let head_dtype = match opts.dtype {
            SavedDtype::Bf16 => DType::BF16,
            SavedDtype::F32 => DType::F32,
        };
        let name = format!("{}--0_checkpoint.pt", crate::oft::ACTION_HEAD);
        let n = write_component(&out.join(&name), &head, seed, head_dtype)?;
        head_params += n;
        weight_bytes += n * head_dtype.size_in_bytes() as u64;
        files.push(name);
        if let Some(p) = proprio_dim {
            let proj = proprio_projector_tensors(*p, llm);
            let name = format!("{}--0_checkpoint.pt", crate::oft::PROPRIO_PROJECTOR);
            let n = write_component(&out.join(&name), &proj, seed, DType::F32)?;
            head_params += n;
            weight_bytes += n * 4;
            files.push(name);
        }
    }
    if let Some(bytes) = stats_text {
        let path = out.join("dataset_statistics.json");
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
        files.push("dataset_statistics.json".into());
    }
    files.sort();
    Ok(InitSummary {
        backbone_params,
        head_params,
        weight_bytes,
        files,
    })
}

/// Residual blocks of the reference's L1 head (`L1RegressionActionHead`: `num_blocks=2`).
pub const OFT_HEAD_BLOCKS: usize = 2;

/// The tensors of OFT's `ProprioProjector` (`fc1`, GELU, `fc2`) from `proprio` to `llm`.
pub fn proprio_projector_tensors(proprio: usize, llm: usize) -> Vec<(String, Vec<usize>)> {
    vec![
        ("fc1.weight".to_string(), vec![llm, proprio]),
        ("fc1.bias".to_string(), vec![llm]),
        ("fc2.weight".to_string(), vec![llm, llm]),
        ("fc2.bias".to_string(), vec![llm]),
    ]
}

/// The tensors of OFT's `L1RegressionActionHead` (`model.` = its `MLPResNet`) for an LLM of
/// width `llm`: input `llm · action_dim`, hidden `llm`, output `action_dim`.
pub fn oft_head_tensors(llm: usize, action_dim: usize, blocks: usize) -> Vec<(String, Vec<usize>)> {
    let input = llm * action_dim;
    let mut t = vec![
        ("model.layer_norm1.weight".to_string(), vec![input]),
        ("model.layer_norm1.bias".to_string(), vec![input]),
        ("model.fc1.weight".to_string(), vec![llm, input]),
        ("model.fc1.bias".to_string(), vec![llm]),
    ];
    for i in 0..blocks {
        let p = format!("model.mlp_resnet_blocks.{i}.ffn");
        t.push((format!("{p}.0.weight"), vec![llm]));
        t.push((format!("{p}.0.bias"), vec![llm]));
        t.push((format!("{p}.1.weight"), vec![llm, llm]));
        t.push((format!("{p}.1.bias"), vec![llm]));
    }
    t.push(("model.layer_norm2.weight".to_string(), vec![llm]));
    t.push(("model.layer_norm2.bias".to_string(), vec![llm]));
    t.push(("model.fc2.weight".to_string(), vec![action_dim, llm]));
    t.push(("model.fc2.bias".to_string(), vec![action_dim]));
    t
}

/// Writes one OFT component (`nn.Linear` / `nn.LayerNorm` defaults) with the reference's DDP
/// `module.` prefix; returns its parameter count.
fn write_component(
    path: &Path,
    tensors: &[(String, Vec<usize>)],
    seed: u64,
    dtype: DType,
) -> Result<u64> {
    let fan_in: HashMap<&str, usize> = tensors
        .iter()
        .filter(|(_, s)| s.len() == 2)
        .map(|(n, s)| (n.strip_suffix(".weight").unwrap_or(n), s[1]))
        .collect();
    let mut out = Vec::with_capacity(tensors.len());
    let mut params = 0u64;
    for (name, shape) in tensors {
        let module = name
            .strip_suffix(".weight")
            .or_else(|| name.strip_suffix(".bias"))
            .unwrap_or(name);
        let law = match fan_in.get(module) {
            Some(&f) => Law::Uniform(1.0 / (f as f64).sqrt()),
            None if name.ends_with(".weight") => Law::Const(1.0),
            None => Law::Const(0.0),
        };
        let key = format!("module.{name}");
        let values = sample(law, &format!("{}/{key}", path_tag(path)), shape, seed);
        let t = Tensor::from_vec(values, shape.as_slice(), &Device::Cpu)?.to_dtype(dtype)?;
        params += t.elem_count() as u64;
        out.push((key, t));
    }
    write_state_dict(path, &out)?;
    Ok(params)
}

/// The component a file holds (`action_head` / `proprio_projector`), to key its random streams.
fn path_tag(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name.split("--").next().unwrap_or("").to_string()
}

/// How a tensor's values are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Law {
    /// Every element equal.
    Const(f32),
    /// Normal(0, std).
    Normal(f64),
    /// Normal(0, std) resampled until inside [-cut, cut] (timm's `trunc_normal_`).
    TruncNormal { std: f64, cut: f64 },
    /// Uniform on [-bound, bound].
    Uniform(f64),
}

/// The reference's initialization of checkpoint tensor `name` (see the module docs).
fn backbone_law(
    name: &str,
    shape: &[usize],
    cfg: &ModelConfig,
    tensors: &[(String, Vec<usize>)],
) -> Result<Law> {
    let is_bias = name.ends_with(".bias");
    let weight_fan_in = |module: &str| -> Option<usize> {
        tensors
            .iter()
            .find(|(n, _)| n == &format!("{module}.weight"))
            .map(|(_, s)| s[1..].iter().product())
    };
    let module = name
        .strip_suffix(".weight")
        .or_else(|| name.strip_suffix(".bias"))
        .unwrap_or(name);
    if let Some(rest) = name.strip_prefix("vision_backbone.") {
        let tower = if rest.starts_with("fused_featurizer.") {
            cfg.towers.get(1)
        } else {
            cfg.towers.first()
        };
        let d = tower.map(|t| t.embed_dim).unwrap_or(1);
        let norm =
            module.ends_with(".norm") || module.ends_with(".norm1") || module.ends_with(".norm2");
        return Ok(if name.ends_with(".pos_embed") {
            Law::TruncNormal {
                std: 0.02,
                cut: 2.0,
            }
        } else if name.ends_with(".cls_token") {
            Law::Normal(1e-6)
        } else if name.ends_with(".reg_token") {
            // timm 0.9.10 creates it with torch.zeros and init_weights leaves it (later
            // versions draw normal(1e-6)).
            Law::Const(0.0)
        } else if name.ends_with(".attn_pool.latent") {
            let std = (d as f64).powf(-0.5);
            Law::TruncNormal {
                std,
                cut: 2.0 * std,
            }
        } else if name.ends_with(".scale_factor") {
            Law::Const(1e-5)
        } else if module.ends_with(".patch_embed.proj") {
            // nn.Conv2d's default (timm's init only touches nn.Linear).
            let fan_in = weight_fan_in(module).unwrap_or(1);
            Law::Uniform(1.0 / (fan_in as f64).sqrt())
        } else if norm {
            Law::Const(if is_bias { 0.0 } else { 1.0 })
        } else if is_bias {
            Law::Const(0.0)
        } else if name.ends_with(".weight") && shape.len() == 2 {
            Law::TruncNormal {
                std: 0.02,
                cut: 2.0,
            }
        } else {
            return Err(Error::InvalidInput(format!(
                "init: no initialization rule for vision tensor {name} {shape:?}"
            )));
        });
    }
    if name.starts_with("projector.") {
        let fan_in = weight_fan_in(module).ok_or_else(|| {
            Error::InvalidInput(format!("init: projector tensor {name} has no weight"))
        })?;
        return Ok(Law::Uniform(1.0 / (fan_in as f64).sqrt()));
    }
    if name.starts_with("language_model.") {
        let std = cfg
            .raw
            .text_config
            .as_ref()
            .and_then(|t| t.get("initializer_range"))
            .and_then(Value::as_f64)
            .unwrap_or(0.02);
        return Ok(
            if name.ends_with("layernorm.weight") || name.ends_with(".norm.weight") {
                Law::Const(1.0)
            } else if is_bias {
                Law::Const(0.0)
            } else if name.ends_with(".weight") && shape.len() == 2 {
                Law::Normal(std)
            } else {
                return Err(Error::InvalidInput(format!(
                    "init: no initialization rule for LLM tensor {name} {shape:?}"
                )));
            },
        );
    }
    Err(Error::InvalidInput(format!(
        "init: no initialization rule for tensor {name} {shape:?}"
    )))
}

/// Elements per independently seeded block (values do not depend on the thread count).
const BLOCK: usize = 4096;

/// Draws a tensor's values: block `b` of tensor `name` uses the SplitMix64 stream seeded by
/// `(seed, name, b)`; normals by Box-Muller.
fn sample(law: Law, name: &str, shape: &[usize], seed: u64) -> Vec<f32> {
    let n: usize = shape.iter().product();
    if let Law::Const(c) = law {
        return vec![c; n];
    }
    let base = name_seed(seed, name);
    let mut out = vec![0f32; n];
    out.par_chunks_mut(BLOCK)
        .enumerate()
        .for_each(|(bi, chunk)| {
            let mut rng = Stream(splitmix64(
                base ^ (bi as u64).wrapping_mul(0xD1B5_4A32_D192_ED03),
            ));
            for v in chunk.iter_mut() {
                *v = match law {
                    Law::Const(c) => c,
                    Law::Normal(std) => (rng.normal() * std) as f32,
                    Law::TruncNormal { std, cut } => loop {
                        let x = rng.normal() * std;
                        if x.abs() <= cut {
                            break x as f32;
                        }
                    },
                    Law::Uniform(bound) => ((2.0 * rng.uniform() - 1.0) * bound) as f32,
                };
            }
        });
    out
}

/// A SplitMix64 stream.
struct Stream(u64);

impl Stream {
    /// Uniform in (0, 1), from 53 random bits.
    fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        ((splitmix64(self.0) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller, one value per pair of uniforms).
    fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moments(v: &[f32]) -> (f64, f64, f64) {
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        let max = v.iter().map(|x| x.abs() as f64).fold(0.0, f64::max);
        (mean, var.sqrt(), max)
    }

    #[test]
    fn laws_have_their_moments_and_are_deterministic() {
        let v = sample(Law::Normal(0.02), "a", &[200_000], 7);
        let (m, s, _) = moments(&v);
        assert!(m.abs() < 2e-4 && (s - 0.02).abs() < 2e-4, "{m} {s}");
        assert_eq!(v, sample(Law::Normal(0.02), "a", &[200_000], 7));
        assert_ne!(v, sample(Law::Normal(0.02), "a", &[200_000], 8));
        assert_ne!(v, sample(Law::Normal(0.02), "b", &[200_000], 7));
        let u = sample(Law::Uniform(0.125), "u", &[200_000], 1);
        let (m, s, max) = moments(&u);
        assert!(m.abs() < 1e-3 && (s - 0.125 / 3f64.sqrt()).abs() < 1e-3 && max <= 0.125);
        let t = sample(Law::TruncNormal { std: 1.0, cut: 2.0 }, "t", &[200_000], 1);
        let (_, s, max) = moments(&t);
        // A standard normal truncated at ±2 has std 0.8796.
        assert!(max <= 2.0 && (s - 0.8796).abs() < 5e-3, "{s} {max}");
    }

    #[test]
    fn presets_parse_and_match_their_description() {
        let c = InitConfig::preset("metaworld-small").unwrap();
        assert_eq!(c.vision.image_size, 128);
        assert_eq!(c.vision.towers.len(), 1);
        assert_eq!(c.llm.vocab_size, 32064);
        assert!(c.llm.tie_word_embeddings);
        assert_eq!(
            c.head,
            HeadSpec::L1 {
                chunk: 8,
                action_dim: 4,
                proprio_dim: Some(4),
                images: 1,
                blocks: 2,
                normalization: "bounds_q99".into(),
                center_crop: true
            }
        );
        assert_eq!(
            InitConfig::preset("metaworld-fused")
                .unwrap()
                .vision
                .towers
                .len(),
            2
        );
        let err = InitConfig::preset("nope").unwrap_err().to_string();
        assert!(err.contains("metaworld-small"), "{err}");
    }

    fn with(edit: &str, from: &str, to: &str) -> String {
        let s = edit.replacen(from, to, 1);
        assert_ne!(s, edit, "{from:?} not in the preset");
        s
    }

    fn error_of(text: &str) -> String {
        InitConfig::from_toml(text, Path::new("x.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn contradictory_shapes_are_errors_that_name_the_field() {
        let p = METAWORLD_SMALL;
        let cases = [
            (
                with(p, "patch_size = 16", "patch_size = 15"),
                "patch_size 15 must divide",
            ),
            (
                with(p, "heads = 3", "heads = 5"),
                "width 192 must be a positive multiple of heads 5",
            ),
            (with(p, "depth = 5 ", "depth = 1 "), "depth 1 is too small"),
            (with(p, "width = 256", "width = 250"), "llm: width 250"),
            (
                with(p, "heads = 4", "heads = 4\nkv_heads = 3"),
                "kv_heads 3 must divide heads 4",
            ),
            (
                with(p, "vocab_size = 32064", "vocab_size = 32000"),
                "vocab_size 32000",
            ),
            (with(p, "chunk = 8", "chunk = 0"), "chunk 0"),
            (
                with(p, "proprio_dim = 4", "proprio_dim = 0"),
                "omit proprio_dim",
            ),
            (with(p, "kind = \"l1\"", "kind = \"l2\""), "unknown variant"),
            (
                with(p, "kind = \"siglip\"", "kind = \"siglip\"\nregisters = 2"),
                "registers are a DINOv2",
            ),
            (
                with(p, "image_size = 128", "image_size = 128\ncolour = 1"),
                "unknown field",
            ),
            (
                with(p, "images = 1", "images = 1\nnormalization = \"minmax\""),
                "head.normalization",
            ),
            (
                with(p, "[llm]", "[llm]\nmax_position_embeddings = 100"),
                "exceeds llm.max_position_embeddings",
            ),
        ];
        for (text, want) in cases {
            let e = error_of(&text);
            assert!(
                e.contains(want) && e.contains("x.toml"),
                "want {want:?} in {e}"
            );
        }
        let f = METAWORLD_FUSED;
        let swapped = with(
            &with(f, "kind = \"dinov2\"", "kind = \"tmp\""),
            "kind = \"siglip\"",
            "kind = \"dinov2\"",
        )
        .replacen("kind = \"tmp\"", "kind = \"siglip\"", 1)
        .replacen("registers = 4", "", 1);
        assert!(error_of(&swapped).contains("dinov2 tower then a siglip tower"));
        let grid = with(f, "patch_size = 16", "patch_size = 32");
        assert!(error_of(&grid).contains("same patch grid"));
    }
}
