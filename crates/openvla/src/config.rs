//! Model configuration: `config.json` of an HF OpenVLA model directory.
//!
//! The LLM settings come from `text_config` merged over the `LlamaConfig` defaults of
//! transformers 4.40.1 (spec §1.3): the real `openvla-7b` checkpoint stores only the fields
//! that differ from those defaults. The vision towers are described by timm model ids
//! (`timm_model_ids`), optionally resized by `tiny_timm_overrides` (test checkpoints).

use crate::action::NormStats;
use crate::error::{Error, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The raw `config.json` of an OpenVLA (Prismatic) HF checkpoint.
#[derive(Debug, Clone, Deserialize)]
pub struct RawConfig {
    /// `"openvla"` or `"prismatic"`.
    #[serde(default)]
    pub model_type: Option<String>,
    /// For example `"dinosiglip-vit-so-224px"` or `"siglip-vit-so400m"`.
    #[serde(default)]
    pub vision_backbone_id: Option<String>,
    /// For example `"llama2-7b-pure"` or `"vicuna-v15-7b"`.
    #[serde(default)]
    pub llm_backbone_id: Option<String>,
    /// For example `"no-align+fused-gelu-mlp"`.
    #[serde(default)]
    pub arch_specifier: Option<String>,
    /// True for the fused DINOv2 + SigLIP backbone.
    pub use_fused_vision_backbone: Option<bool>,
    /// timm ids of the towers, featurizer first.
    pub timm_model_ids: Option<Vec<String>>,
    /// Activation overrides per tower (`null` = exact GELU).
    #[serde(default)]
    pub timm_override_act_layers: Option<Vec<Option<String>>>,
    /// Input image size per tower.
    #[serde(default)]
    pub image_sizes: Option<Vec<usize>>,
    /// `resize-naive`, `letterbox` or `resize-crop`.
    #[serde(default)]
    pub image_resize_strategy: Option<String>,
    /// Number of action bins (256).
    #[serde(default)]
    pub n_action_bins: Option<usize>,
    /// Padding multiple of the LLM vocabulary (64).
    #[serde(default)]
    pub pad_to_multiple_of: Option<usize>,
    /// Pad token id (32000).
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// Per-dataset action statistics.
    #[serde(default)]
    pub norm_stats: Option<NormStats>,
    /// The nested Llama config (only the fields that differ from the defaults).
    #[serde(default)]
    pub text_config: Option<serde_json::Map<String, serde_json::Value>>,
    /// Tower sizes of test checkpoints, keyed by timm id.
    #[serde(default)]
    pub tiny_timm_overrides: Option<BTreeMap<String, TimmOverride>>,
    /// openvla-rs: the arithmetic this model is served with when the command does not say
    /// (`"f32"` or `"bf16"`, [`ModelConfig::inference_compute`]); absent means f32.
    #[serde(default)]
    pub inference_compute: Option<String>,
}

/// A tower size override (`tiny_timm_overrides` entry).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct TimmOverride {
    /// Width of the tower.
    pub embed_dim: Option<usize>,
    /// Number of transformer blocks.
    pub depth: Option<usize>,
    /// Number of attention heads.
    pub num_heads: Option<usize>,
    /// MLP width ratio (timm `mlp_ratio`).
    #[serde(default)]
    pub mlp_ratio: Option<f64>,
    /// Patch size (timm `patch_size`).
    #[serde(default)]
    pub patch_size: Option<usize>,
    /// Number of register tokens (timm `reg_tokens`).
    #[serde(default)]
    pub reg_tokens: Option<usize>,
    /// Whether there is a class token (timm `class_token`).
    #[serde(default)]
    pub class_token: Option<bool>,
    /// Input resolution (timm `img_size`).
    #[serde(default)]
    pub img_size: Option<usize>,
    /// Whether the tower has SigLIP's attention-pool head (timm `global_pool='map'`), which
    /// the reference stores but never uses; `false` leaves it out of the checkpoint.
    #[serde(default)]
    pub attn_pool: Option<bool>,
}

/// Which published OpenVLA layout a checkpoint follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// `openvla-7b`: fused DINOv2 + SigLIP towers, 3-layer projector, `In: ... Out:` prompt.
    OpenVla,
    /// OpenVLA v0.1: SigLIP only, 2-layer projector, letterbox resize, Vicuna v1.5 prompt.
    OpenVlaV01,
}

/// Prompt template chosen from `llm_backbone_id` (spec §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptStyle {
    /// Llama-2 "pure": `In: What action should the robot take to {x}?\nOut:`.
    Pure,
    /// Vicuna v1.5 chat template with its system prompt.
    VicunaV15,
}

/// One timm ViT tower, fully resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct TowerConfig {
    /// The timm model id.
    pub timm_id: String,
    /// Token width.
    pub embed_dim: usize,
    /// Number of blocks in the checkpoint.
    pub depth: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// MLP width ratio; the hidden width is `int(embed_dim * mlp_ratio)` as in timm.
    pub mlp_ratio: f64,
    /// Patch size in pixels.
    pub patch_size: usize,
    /// Input resolution.
    pub image_size: usize,
    /// Whether there is a class token.
    pub class_token: bool,
    /// Number of register tokens.
    pub reg_tokens: usize,
    /// Whether blocks have LayerScale (`ls1`/`ls2`).
    pub layer_scale: bool,
    /// Whether the model has the SigLIP `attn_pool` head (stored, unused).
    pub attn_pool: bool,
    /// LayerNorm epsilon.
    pub norm_eps: f64,
}

impl TowerConfig {
    /// Tokens before the patches (class + registers); they are dropped from the output.
    pub fn num_prefix_tokens(&self) -> usize {
        usize::from(self.class_token) + self.reg_tokens
    }
    /// Number of patches (`(image_size / patch_size)^2`).
    pub fn num_patches(&self) -> usize {
        let side = self.image_size / self.patch_size;
        side * side
    }
    /// Hidden width of the MLP, computed as timm does (`int(dim * mlp_ratio)`).
    pub fn mlp_hidden(&self) -> usize {
        (self.embed_dim as f64 * self.mlp_ratio) as usize
    }
    /// Index of the block whose output is used: `len(blocks) - 2` (spec §2.2).
    pub fn selected_block(&self) -> usize {
        self.depth.saturating_sub(2)
    }
}

/// The Llama language model settings (transformers 4.40.1 `LlamaConfig` semantics).
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    /// Vocabulary size including padding rows (32064).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// SwiGLU width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when smaller than the query heads).
    pub num_key_value_heads: usize,
    /// RMSNorm epsilon (1e-6 when absent).
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// Maximum sequence length.
    pub max_position_embeddings: usize,
    /// Whether q/k/v/o projections have biases.
    pub attention_bias: bool,
    /// Whether `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// BOS id.
    pub bos_token_id: u32,
    /// EOS id.
    pub eos_token_id: u32,
    /// PAD id.
    pub pad_token_id: Option<u32>,
}

impl TextConfig {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Merges `text_config` over the transformers 4.40.1 `LlamaConfig` defaults.
    pub fn from_json(
        path: &Path,
        text: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<TextConfig> {
        let get_usize = |key: &str, default: usize| -> Result<usize> {
            match text.get(key) {
                None | Some(serde_json::Value::Null) => Ok(default),
                Some(v) => v.as_u64().map(|x| x as usize).ok_or_else(|| {
                    Error::config(
                        path,
                        format!("text_config.{key} must be a non-negative integer, got {v}"),
                    )
                }),
            }
        };
        let get_f64 = |key: &str, default: f64| -> Result<f64> {
            match text.get(key) {
                None | Some(serde_json::Value::Null) => Ok(default),
                Some(v) => v.as_f64().ok_or_else(|| {
                    Error::config(path, format!("text_config.{key} must be a number, got {v}"))
                }),
            }
        };
        let get_bool = |key: &str, default: bool| -> Result<bool> {
            match text.get(key) {
                None | Some(serde_json::Value::Null) => Ok(default),
                Some(v) => v.as_bool().ok_or_else(|| {
                    Error::config(
                        path,
                        format!("text_config.{key} must be a boolean, got {v}"),
                    )
                }),
            }
        };
        if let Some(mt) = text.get("model_type").and_then(|v| v.as_str()) {
            if mt != "llama" {
                return Err(Error::config(
                    path,
                    format!("text_config.model_type is {mt:?}; only \"llama\" is supported"),
                ));
            }
        }
        if let Some(act) = text.get("hidden_act").and_then(|v| v.as_str()) {
            if act != "silu" {
                return Err(Error::config(
                    path,
                    format!("text_config.hidden_act is {act:?}; only \"silu\" is supported"),
                ));
            }
        }
        if let Some(rs) = text.get("rope_scaling") {
            if !rs.is_null() {
                return Err(Error::config(
                    path,
                    format!("text_config.rope_scaling {rs} is not supported (expected null)"),
                ));
            }
        }
        let num_attention_heads = get_usize("num_attention_heads", 32)?;
        let cfg = TextConfig {
            vocab_size: get_usize("vocab_size", 32000)?,
            hidden_size: get_usize("hidden_size", 4096)?,
            intermediate_size: get_usize("intermediate_size", 11008)?,
            num_hidden_layers: get_usize("num_hidden_layers", 32)?,
            num_attention_heads,
            num_key_value_heads: get_usize("num_key_value_heads", num_attention_heads)?,
            rms_norm_eps: get_f64("rms_norm_eps", 1e-6)?,
            rope_theta: get_f64("rope_theta", 10000.0)?,
            max_position_embeddings: get_usize("max_position_embeddings", 2048)?,
            attention_bias: get_bool("attention_bias", false)?,
            tie_word_embeddings: get_bool("tie_word_embeddings", false)?,
            bos_token_id: get_usize("bos_token_id", 1)? as u32,
            eos_token_id: get_usize("eos_token_id", 2)? as u32,
            pad_token_id: match text.get("pad_token_id") {
                Some(v) if !v.is_null() => Some(get_usize("pad_token_id", 0)? as u32),
                _ => None,
            },
        };
        if cfg.num_attention_heads == 0
            || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
            || cfg.num_key_value_heads == 0
            || !cfg
                .num_attention_heads
                .is_multiple_of(cfg.num_key_value_heads)
        {
            return Err(Error::config(
                path,
                format!(
                    "text_config: hidden_size {} must be divisible by num_attention_heads {}, \
                     which must be divisible by num_key_value_heads {}",
                    cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
                ),
            ));
        }
        if !cfg.head_dim().is_multiple_of(2) {
            return Err(Error::config(
                path,
                format!(
                    "text_config: head_dim {} must be even for RoPE",
                    cfg.head_dim()
                ),
            ));
        }
        Ok(cfg)
    }
}

/// The architecture facts of a known timm tower id (before `tiny_timm_overrides`).
fn known_tower(timm_id: &str) -> Option<TowerConfig> {
    let t = |embed_dim,
             depth,
             num_heads,
             mlp_ratio: f64,
             patch_size,
             image_size,
             cls,
             reg,
             ls,
             pool| {
        TowerConfig {
            timm_id: timm_id.to_string(),
            embed_dim,
            depth,
            num_heads,
            mlp_ratio,
            patch_size,
            image_size,
            class_token: cls,
            reg_tokens: reg,
            layer_scale: ls,
            attn_pool: pool,
            norm_eps: 1e-6,
        }
    };
    let base = timm_id.split('.').next().unwrap_or(timm_id);
    Some(match base {
        "vit_large_patch14_reg4_dinov2" => t(1024, 24, 16, 4.0, 14, 224, true, 4, true, false),
        "vit_base_patch14_reg4_dinov2" => t(768, 12, 12, 4.0, 14, 224, true, 4, true, false),
        "vit_small_patch14_reg4_dinov2" => t(384, 12, 6, 4.0, 14, 224, true, 4, true, false),
        "vit_large_patch14_dinov2" => t(1024, 24, 16, 4.0, 14, 224, true, 0, true, false),
        "vit_so400m_patch14_siglip_224" => t(1152, 27, 16, 3.7362, 14, 224, false, 0, false, true),
        "vit_so400m_patch14_siglip_384" => t(1152, 27, 16, 3.7362, 14, 384, false, 0, false, true),
        "vit_base_patch16_siglip_224" => t(768, 12, 12, 4.0, 16, 224, false, 0, false, true),
        _ => return None,
    })
}

/// Everything the engine needs from `config.json`, resolved and validated.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// Path of the `config.json` it came from.
    pub path: PathBuf,
    /// The published layout this checkpoint follows.
    pub variant: Variant,
    /// Vision towers in checkpoint order: `featurizer`, then `fused_featurizer` if fused.
    pub towers: Vec<TowerConfig>,
    /// The language model.
    pub text: TextConfig,
    /// Prompt template.
    pub prompt_style: PromptStyle,
    /// Image resize strategy named in the config.
    pub image_resize_strategy: String,
    /// Number of action bins (256).
    pub n_action_bins: usize,
    /// Vocabulary size used to map tokens to bins: `text.vocab_size - pad_to_multiple_of`.
    pub action_vocab_size: usize,
    /// Per-dataset statistics embedded in `config.json`.
    pub norm_stats: NormStats,
    /// The arithmetic of the many-row products this model asks for when the caller does not
    /// choose (`inference_compute`; a policy trained and evaluated with bf16 arithmetic says
    /// `bf16`). `None`: exact f32.
    pub inference_compute: Option<crate::kernels::ComputePrecision>,
    /// The raw JSON, for fields the engine does not interpret.
    pub raw: RawConfig,
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        let raw: RawConfig = crate::error::read_json(path)?;
        Self::from_raw(path, raw)
    }

    /// Validates an already parsed config.
    pub fn from_raw(path: &Path, raw: RawConfig) -> Result<ModelConfig> {
        let fused = raw.use_fused_vision_backbone.ok_or_else(|| {
            Error::config(
                path,
                "missing `use_fused_vision_backbone`: not an OpenVLA/Prismatic HF config",
            )
        })?;
        let ids = raw.timm_model_ids.clone().ok_or_else(|| {
            Error::config(
                path,
                "missing `timm_model_ids`: not an OpenVLA/Prismatic HF config",
            )
        })?;
        let expected = if fused { 2 } else { 1 };
        if ids.len() != expected {
            return Err(Error::config(
                path,
                format!(
                    "use_fused_vision_backbone is {fused} so timm_model_ids must have {expected} \
                     entries, found {}",
                    ids.len()
                ),
            ));
        }
        if let Some(acts) = &raw.timm_override_act_layers {
            if let Some(Some(act)) = acts.iter().find(|a| a.is_some()) {
                return Err(Error::config(
                    path,
                    format!(
                        "timm_override_act_layers contains {act:?}; only null (exact GELU) is \
                         supported"
                    ),
                ));
            }
        }
        let overrides = raw.tiny_timm_overrides.clone().unwrap_or_default();
        let mut towers = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let mut tower = known_tower(id).ok_or_else(|| {
                Error::config(
                    path,
                    format!(
                        "unsupported timm model id {id:?}; supported: \
                         vit_large_patch14_reg4_dinov2.lvd142m, vit_base_patch14_reg4_dinov2, \
                         vit_small_patch14_reg4_dinov2, vit_large_patch14_dinov2, \
                         vit_so400m_patch14_siglip_224, vit_so400m_patch14_siglip_384, \
                         vit_base_patch16_siglip_224"
                    ),
                )
            })?;
            if let Some(o) = overrides.get(id) {
                tower.embed_dim = o.embed_dim.unwrap_or(tower.embed_dim);
                tower.depth = o.depth.unwrap_or(tower.depth);
                tower.num_heads = o.num_heads.unwrap_or(tower.num_heads);
                tower.mlp_ratio = o.mlp_ratio.unwrap_or(tower.mlp_ratio);
                tower.patch_size = o.patch_size.unwrap_or(tower.patch_size);
                tower.reg_tokens = o.reg_tokens.unwrap_or(tower.reg_tokens);
                tower.class_token = o.class_token.unwrap_or(tower.class_token);
                tower.image_size = o.img_size.unwrap_or(tower.image_size);
                tower.attn_pool = o.attn_pool.unwrap_or(tower.attn_pool);
            }
            if let Some(size) = raw.image_sizes.as_ref().and_then(|s| s.get(i)) {
                tower.image_size = *size;
            }
            if tower.num_heads == 0 || tower.embed_dim % tower.num_heads != 0 {
                return Err(Error::config(
                    path,
                    format!(
                        "tower {id}: embed_dim {} is not divisible by num_heads {}",
                        tower.embed_dim, tower.num_heads
                    ),
                ));
            }
            if tower.depth < 2 {
                return Err(Error::config(
                    path,
                    format!(
                        "tower {id}: depth {} is too small; OpenVLA uses the output of block \
                         len-2",
                        tower.depth
                    ),
                ));
            }
            if tower.patch_size == 0 || tower.image_size < tower.patch_size {
                return Err(Error::config(
                    path,
                    format!(
                        "tower {id}: patch size {} must be at least 1 and at most the image \
                         size {}",
                        tower.patch_size, tower.image_size
                    ),
                ));
            }
            if tower.image_size % tower.patch_size != 0 {
                return Err(Error::config(
                    path,
                    format!(
                        "tower {id}: image size {} is not a multiple of the patch size {}",
                        tower.image_size, tower.patch_size
                    ),
                ));
            }
            towers.push(tower);
        }
        if towers
            .windows(2)
            .any(|w| w[0].num_patches() != w[1].num_patches())
        {
            return Err(Error::config(
                path,
                "the fused towers produce different numbers of patches",
            ));
        }
        let text_json = raw.text_config.clone().unwrap_or_default();
        let text = TextConfig::from_json(path, &text_json)?;
        let llm_id = raw.llm_backbone_id.clone().unwrap_or_default();
        let prompt_style = if llm_id.starts_with("vicuna") {
            PromptStyle::VicunaV15
        } else {
            PromptStyle::Pure
        };
        let variant = if fused {
            Variant::OpenVla
        } else {
            Variant::OpenVlaV01
        };
        let pad = raw.pad_to_multiple_of.unwrap_or(64);
        let action_vocab_size = text.vocab_size.checked_sub(pad).ok_or_else(|| {
            Error::config(
                path,
                format!(
                    "text_config.vocab_size {} is smaller than pad_to_multiple_of {pad}",
                    text.vocab_size
                ),
            )
        })?;
        let n_action_bins = raw.n_action_bins.unwrap_or(256);
        if n_action_bins < 2 {
            return Err(Error::config(
                path,
                format!("n_action_bins must be at least 2, got {n_action_bins}"),
            ));
        }
        let image_resize_strategy = raw
            .image_resize_strategy
            .clone()
            .unwrap_or_else(|| "resize-naive".to_string());
        let inference_compute = raw
            .inference_compute
            .as_deref()
            .map(|name| {
                name.parse()
                    .map_err(|e| Error::config(path, format!("inference_compute: {e}")))
            })
            .transpose()?;
        Ok(ModelConfig {
            path: path.to_path_buf(),
            inference_compute,
            variant,
            towers,
            text,
            prompt_style,
            image_resize_strategy,
            n_action_bins,
            action_vocab_size,
            norm_stats: raw.norm_stats.clone().unwrap_or_default(),
            raw,
        })
    }

    /// The arithmetic this model runs with: `requested` (a `--compute` flag), else its
    /// [`ModelConfig::inference_compute`], else exact f32.
    pub fn compute_for(
        &self,
        requested: Option<crate::kernels::ComputePrecision>,
    ) -> crate::kernels::ComputePrecision {
        requested.or(self.inference_compute).unwrap_or_default()
    }

    /// Width of the fused vision features (sum of the tower widths).
    pub fn vision_dim(&self) -> usize {
        self.towers.iter().map(|t| t.embed_dim).sum()
    }

    /// Number of image patch tokens spliced into the LLM sequence.
    pub fn num_patches(&self) -> usize {
        self.towers.first().map(|t| t.num_patches()).unwrap_or(0)
    }

    /// The `(width, height)` training frames are resized to before augmentation: the reference's
    /// `resize_resolution=tuple(vla.module.config.image_sizes)` (`vla-scripts/finetune.py`),
    /// which the RLDS pipeline reads as `(height, width)`. With two towers that is
    /// `(image_sizes[0], image_sizes[1])` (OpenVLA: 224 x 224); with one tower, whose
    /// one-element tuple the reference cannot use, a square of its size.
    pub fn resize_resolution(&self) -> (u32, u32) {
        match self.towers.as_slice() {
            [h, w] => (w.image_size as u32, h.image_size as u32),
            // One tower (a validated config has one or two).
            towers => {
                let s = towers.first().map_or(0, |t| t.image_size) as u32;
                (s, s)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: serde_json::Value) -> Result<ModelConfig> {
        let raw: RawConfig = serde_json::from_value(json).unwrap();
        ModelConfig::from_raw(Path::new("config.json"), raw)
    }

    fn base() -> serde_json::Value {
        serde_json::json!({
            "use_fused_vision_backbone": true,
            "timm_model_ids": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
            "text_config": {"model_type": "llama", "vocab_size": 32064}
        })
    }

    #[test]
    fn llama_defaults_of_transformers_4_40_1() {
        let c = config(base()).unwrap();
        let t = &c.text;
        assert_eq!(
            (t.hidden_size, t.intermediate_size, t.num_hidden_layers),
            (4096, 11008, 32)
        );
        assert_eq!((t.num_attention_heads, t.num_key_value_heads), (32, 32));
        assert_eq!(t.rms_norm_eps, 1e-6);
        assert_eq!(t.rope_theta, 10000.0);
        assert_eq!(c.action_vocab_size, 32000);
        assert_eq!(c.towers[1].mlp_hidden(), 4304);
        assert_eq!(c.towers[0].num_prefix_tokens(), 5);
        assert_eq!(
            (c.towers[0].selected_block(), c.towers[1].selected_block()),
            (22, 25)
        );
    }

    #[test]
    fn explicit_values_and_overrides_are_honoured() {
        let mut j = base();
        j["text_config"]["rms_norm_eps"] = serde_json::json!(1e-5);
        j["text_config"]["num_key_value_heads"] = serde_json::json!(8);
        j["tiny_timm_overrides"] = serde_json::json!({
            "vit_so400m_patch14_siglip_224": {"embed_dim": 48, "depth": 3, "num_heads": 3, "mlp_ratio": 2.0},
            "vit_large_patch14_reg4_dinov2.lvd142m": {"embed_dim": 32, "depth": 2, "num_heads": 2, "reg_tokens": 2}
        });
        let c = config(j).unwrap();
        assert_eq!(c.text.rms_norm_eps, 1e-5);
        assert_eq!(c.text.num_key_value_heads, 8);
        assert_eq!(c.towers[1].mlp_hidden(), 96);
        assert_eq!(c.towers[0].num_prefix_tokens(), 3);
        assert_eq!(c.towers[0].selected_block(), 0);
    }

    /// `inference_compute`: absent means the caller's choice or f32; a known name is the
    /// model's default arithmetic; anything else is an error naming the choices.
    #[test]
    fn inference_compute_is_read_and_checked() {
        use crate::kernels::ComputePrecision;
        assert_eq!(config(base()).unwrap().inference_compute, None);
        let mut j = base();
        j["inference_compute"] = serde_json::json!("bf16");
        let bf16 = config(j).unwrap();
        assert_eq!(bf16.inference_compute, Some(ComputePrecision::Bf16));
        // The resolution every loader uses: a request wins, then the model's, then f32.
        assert_eq!(bf16.compute_for(None), ComputePrecision::Bf16);
        assert_eq!(
            bf16.compute_for(Some(ComputePrecision::F32)),
            ComputePrecision::F32
        );
        assert_eq!(
            config(base()).unwrap().compute_for(None),
            ComputePrecision::F32
        );
        let mut j = base();
        j["inference_compute"] = serde_json::json!("fp8");
        let err = config(j).unwrap_err().to_string();
        assert!(
            err.contains("inference_compute") && err.contains("\"fp8\"") && err.contains("bf16"),
            "{err}"
        );
    }

    #[test]
    fn inconsistent_values_are_errors() {
        let mut j = base();
        j["text_config"]["num_key_value_heads"] = serde_json::json!(5);
        assert!(config(j)
            .unwrap_err()
            .to_string()
            .contains("num_key_value_heads"));
        let mut j = base();
        j["tiny_timm_overrides"] =
            serde_json::json!({"vit_so400m_patch14_siglip_224": {"depth": 1}});
        assert!(config(j).unwrap_err().to_string().contains("depth 1"));
        let mut j = base();
        j["text_config"]["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 2.0});
        assert!(config(j).unwrap_err().to_string().contains("rope_scaling"));
    }

    #[test]
    fn resize_resolution_is_the_reference_tuple_of_image_sizes() {
        // OpenVLA: two towers at 224.
        assert_eq!(config(base()).unwrap().resize_resolution(), (224, 224));
        // The reference reads tuple(image_sizes) as (height, width).
        let mut j = base();
        j["timm_model_ids"] = serde_json::json!([
            "vit_large_patch14_reg4_dinov2.lvd142m",
            "vit_base_patch16_siglip_224"
        ]);
        j["image_sizes"] = serde_json::json!([224, 256]);
        assert_eq!(config(j).unwrap().resize_resolution(), (256, 224));
        // One tower: a square at its size.
        let mut j = base();
        j["use_fused_vision_backbone"] = serde_json::json!(false);
        j["timm_model_ids"] = serde_json::json!(["vit_base_patch16_siglip_224"]);
        j["image_sizes"] = serde_json::json!([128]);
        assert_eq!(config(j).unwrap().resize_resolution(), (128, 128));
    }
}
