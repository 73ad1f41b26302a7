//! Random-weight checkpoints of real OpenVLA shapes, written locally in the HF layout.
//!
//! There is no model hub at run time, so benchmarks and memory tests build their own
//! checkpoints: the same tensor names, shapes and bf16 dtype as `openvla/openvla-7b` (including
//! the tensors the reference stores but never uses), with deterministic pseudo-random values.
//! Tensors are generated and written shard by shard, so a 15 GB checkpoint needs little memory.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use rayon::prelude::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Model shapes the synthesizer knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthShape {
    /// The test fixture's sizes (4.5 M parameters).
    Tiny,
    /// The real DINOv2-L + SigLIP-so400m towers with a Qwen2.5-0.5B-shaped Llama (hidden 896,
    /// intermediate 4864, 24 layers, 14 heads, 2 KV heads), vocabulary 32064.
    MiniVla,
    /// `openvla/openvla-7b` (7.54 B parameters, 15.08 GB in bf16).
    OpenVla7b,
}

impl std::str::FromStr for SynthShape {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "tiny" => Ok(SynthShape::Tiny),
            "minivla" => Ok(SynthShape::MiniVla),
            "7b" => Ok(SynthShape::OpenVla7b),
            _ => Err(format!("unknown shape {s:?}; expected tiny, minivla or 7b")),
        }
    }
}

impl SynthShape {
    /// The `config.json` of this shape (without `norm_stats`).
    pub fn config_json(self) -> Value {
        let (text, overrides) = match self {
            SynthShape::Tiny => (
                json!({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "num_key_value_heads": 4}),
                Some(json!({
                    "vit_large_patch14_reg4_dinov2.lvd142m": {"embed_dim": 32, "depth": 4, "num_heads": 2},
                    "vit_so400m_patch14_siglip_224": {"embed_dim": 48, "depth": 4, "num_heads": 3}
                })),
            ),
            SynthShape::MiniVla => (
                json!({"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                       "num_attention_heads": 14, "num_key_value_heads": 2,
                       "max_position_embeddings": 32768, "rope_theta": 1000000.0}),
                None,
            ),
            SynthShape::OpenVla7b => (json!({}), None),
        };
        let mut text_config = json!({
            "model_type": "llama", "vocab_size": 32064, "pad_token_id": 32000,
            "torch_dtype": "bfloat16"
        });
        if let (Some(dst), Some(src)) = (text_config.as_object_mut(), text.as_object()) {
            dst.extend(src.clone());
        }
        let mut cfg = json!({
            "architectures": ["OpenVLAForActionPrediction"],
            "arch_specifier": "no-align+fused-gelu-mlp",
            "hf_llm_id": "meta-llama/Llama-2-7b-hf",
            "image_resize_strategy": "resize-naive",
            "image_sizes": [224, 224],
            "llm_backbone_id": "llama2-7b-pure",
            "llm_max_length": 2048,
            "model_type": "openvla",
            "n_action_bins": 256,
            "output_projector_states": false,
            "pad_to_multiple_of": 64,
            "pad_token_id": 32000,
            "text_config": text_config,
            "timm_model_ids": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
            "timm_override_act_layers": [null, null],
            "torch_dtype": "bfloat16",
            "transformers_version": "4.40.1",
            "use_fused_vision_backbone": true,
            "vision_backbone_id": "dinosiglip-vit-so-224px"
        });
        if let (Some(o), Some(obj)) = (overrides, cfg.as_object_mut()) {
            obj.insert("tiny_timm_overrides".into(), o);
        }
        cfg
    }
}

/// Every tensor an HF OpenVLA checkpoint of this configuration stores, with its shape, in model
/// order (towers, projector, LLM). `language_model.lm_head.weight` is absent when
/// `text_config.tie_word_embeddings` is true.
pub fn checkpoint_tensors(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let mut out: Vec<(String, Vec<usize>)> = Vec::new();
    let mut push = |n: String, s: Vec<usize>| out.push((n, s));
    for (tower, prefix) in cfg.towers.iter().zip([
        "vision_backbone.featurizer",
        "vision_backbone.fused_featurizer",
    ]) {
        let d = tower.embed_dim;
        let h = tower.mlp_hidden();
        let p = tower.patch_size;
        push(
            format!("{prefix}.patch_embed.proj.weight"),
            vec![d, 3, p, p],
        );
        push(format!("{prefix}.patch_embed.proj.bias"), vec![d]);
        push(
            format!("{prefix}.pos_embed"),
            vec![1, tower.num_patches(), d],
        );
        if tower.class_token {
            push(format!("{prefix}.cls_token"), vec![1, 1, d]);
        }
        if tower.reg_tokens > 0 {
            push(format!("{prefix}.reg_token"), vec![1, tower.reg_tokens, d]);
        }
        for i in 0..tower.depth {
            let b = format!("{prefix}.blocks.{i}");
            for n in ["norm1", "norm2"] {
                push(format!("{b}.{n}.weight"), vec![d]);
                push(format!("{b}.{n}.bias"), vec![d]);
            }
            push(format!("{b}.attn.qkv.weight"), vec![3 * d, d]);
            push(format!("{b}.attn.qkv.bias"), vec![3 * d]);
            push(format!("{b}.attn.proj.weight"), vec![d, d]);
            push(format!("{b}.attn.proj.bias"), vec![d]);
            push(format!("{b}.mlp.fc1.weight"), vec![h, d]);
            push(format!("{b}.mlp.fc1.bias"), vec![h]);
            push(format!("{b}.mlp.fc2.weight"), vec![d, h]);
            push(format!("{b}.mlp.fc2.bias"), vec![d]);
            if tower.layer_scale {
                push(format!("{b}.ls1.scale_factor"), vec![d]);
                push(format!("{b}.ls2.scale_factor"), vec![d]);
            }
        }
        push(format!("{prefix}.norm.weight"), vec![d]);
        push(format!("{prefix}.norm.bias"), vec![d]);
        if tower.attn_pool {
            let a = format!("{prefix}.attn_pool");
            push(format!("{a}.latent"), vec![1, 1, d]);
            push(format!("{a}.q.weight"), vec![d, d]);
            push(format!("{a}.q.bias"), vec![d]);
            push(format!("{a}.kv.weight"), vec![2 * d, d]);
            push(format!("{a}.kv.bias"), vec![2 * d]);
            push(format!("{a}.proj.weight"), vec![d, d]);
            push(format!("{a}.proj.bias"), vec![d]);
            push(format!("{a}.norm.weight"), vec![d]);
            push(format!("{a}.norm.bias"), vec![d]);
            push(format!("{a}.mlp.fc1.weight"), vec![h, d]);
            push(format!("{a}.mlp.fc1.bias"), vec![h]);
            push(format!("{a}.mlp.fc2.weight"), vec![d, h]);
            push(format!("{a}.mlp.fc2.bias"), vec![d]);
        }
    }
    let v = cfg.vision_dim();
    let t = &cfg.text;
    let llm = t.hidden_size;
    if cfg.towers.len() == 2 {
        push("projector.fc1.weight".into(), vec![4 * v, v]);
        push("projector.fc1.bias".into(), vec![4 * v]);
        push("projector.fc2.weight".into(), vec![llm, 4 * v]);
        push("projector.fc2.bias".into(), vec![llm]);
        push("projector.fc3.weight".into(), vec![llm, llm]);
        push("projector.fc3.bias".into(), vec![llm]);
    } else {
        push("projector.fc1.weight".into(), vec![llm, v]);
        push("projector.fc1.bias".into(), vec![llm]);
        push("projector.fc2.weight".into(), vec![llm, llm]);
        push("projector.fc2.bias".into(), vec![llm]);
    }
    let hd = t.head_dim();
    let kv = t.num_key_value_heads * hd;
    push(
        "language_model.model.embed_tokens.weight".into(),
        vec![t.vocab_size, llm],
    );
    for i in 0..t.num_hidden_layers {
        let l = format!("language_model.model.layers.{i}");
        push(format!("{l}.input_layernorm.weight"), vec![llm]);
        push(format!("{l}.post_attention_layernorm.weight"), vec![llm]);
        push(
            format!("{l}.self_attn.q_proj.weight"),
            vec![t.num_attention_heads * hd, llm],
        );
        push(format!("{l}.self_attn.k_proj.weight"), vec![kv, llm]);
        push(format!("{l}.self_attn.v_proj.weight"), vec![kv, llm]);
        push(
            format!("{l}.self_attn.o_proj.weight"),
            vec![llm, t.num_attention_heads * hd],
        );
        if t.attention_bias {
            push(
                format!("{l}.self_attn.q_proj.bias"),
                vec![t.num_attention_heads * hd],
            );
            push(format!("{l}.self_attn.k_proj.bias"), vec![kv]);
            push(format!("{l}.self_attn.v_proj.bias"), vec![kv]);
            push(format!("{l}.self_attn.o_proj.bias"), vec![llm]);
        }
        push(
            format!("{l}.mlp.gate_proj.weight"),
            vec![t.intermediate_size, llm],
        );
        push(
            format!("{l}.mlp.up_proj.weight"),
            vec![t.intermediate_size, llm],
        );
        push(
            format!("{l}.mlp.down_proj.weight"),
            vec![llm, t.intermediate_size],
        );
    }
    push("language_model.model.norm.weight".into(), vec![llm]);
    // With tied embeddings (HF `tie_word_embeddings`) lm_head is embed_tokens and not stored.
    if !t.tie_word_embeddings {
        push(
            "language_model.lm_head.weight".into(),
            vec![t.vocab_size, llm],
        );
    }
    out
}

/// How a tensor is initialized: `(mean, half-width)` of a uniform distribution.
fn init_rule(name: &str, shape: &[usize]) -> (f32, f32) {
    let fan_in = if shape.len() >= 2 {
        shape[1..].iter().product::<usize>()
    } else {
        1
    };
    if name.ends_with("norm.weight")
        || name.ends_with("layernorm.weight")
        || name.contains(".norm1.weight")
        || name.contains(".norm2.weight")
    {
        (1.0, 0.1)
    } else if name.ends_with("scale_factor") {
        (0.5, 0.3)
    } else if name.ends_with(".bias") {
        (0.0, 0.05)
    } else if name.contains("embed_tokens") {
        (0.0, 0.1 * 3f32.sqrt())
    } else if name.ends_with("pos_embed")
        || name.ends_with("cls_token")
        || name.ends_with("reg_token")
        || name.ends_with("latent")
    {
        (0.0, 0.5 * 3f32.sqrt())
    } else {
        // N(0, 1/fan_in)-like variance with a uniform law.
        (0.0, (3.0 / fan_in as f32).sqrt())
    }
}

/// SplitMix64's output function: a well-mixed 64-bit value of `z`.
pub(crate) fn splitmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The stream seed of tensor `name` under `seed` (FNV-1a of the name over the seed), so that a
/// tensor's values depend on the seed and its name only, not on the order of writing.
pub(crate) fn name_seed(seed: u64, name: &str) -> u64 {
    let mut h = seed ^ 0x9E37_79B9_7F4A_7C15;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01B3);
    }
    h
}

/// Fills `out` with deterministic bf16 values for tensor `name` (SplitMix64 per element block).
fn fill_bf16(name: &str, shape: &[usize], seed: u64, out: &mut [u16]) {
    let (mean, half) = init_rule(name, shape);
    let h = name_seed(seed, name);
    let boost_rows = name == "language_model.lm_head.weight";
    let row = shape.get(1).copied().unwrap_or(1).max(1);
    out.par_chunks_mut(4096)
        .enumerate()
        .for_each(|(ci, chunk)| {
            let mut s = h.wrapping_add((ci as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
            for (j, v) in chunk.iter_mut().enumerate() {
                s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let u = (splitmix64(s) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                let mut x = mean + half * u;
                // Make the action-token rows of lm_head (31744..32000) dominate, so that greedy
                // decoding emits action tokens as a trained model does.
                if boost_rows {
                    let r = (ci * 4096 + j) / row;
                    if (31744..32000).contains(&r) {
                        x *= 3.0;
                    }
                }
                *v = half::bf16::from_f32(x).to_bits();
            }
        });
}

/// Options of [`write_random_checkpoint`].
#[derive(Debug, Clone)]
pub struct SynthOptions {
    /// Which shape.
    pub shape: SynthShape,
    /// Seed of the pseudo-random weights.
    pub seed: u64,
    /// Largest shard, in bytes (the reference's conversion uses 7 GB, giving 3 shards for 7B).
    pub max_shard_bytes: u64,
    /// `tokenizer.json` to copy into the directory.
    pub tokenizer: PathBuf,
}

/// Writes a complete HF model directory with random bf16 weights to `out`.
/// `progress(done_bytes, total_bytes)` is called as data is written.
pub fn write_random_checkpoint(
    out: &Path,
    opts: &SynthOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<()> {
    let mut cfg_json = opts.shape.config_json();
    let stats: Value =
        serde_json::from_str(DEFAULT_NORM_STATS).map_err(|e| Error::InvalidInput(e.to_string()))?;
    if let Some(obj) = cfg_json.as_object_mut() {
        obj.insert("norm_stats".into(), stats);
    }
    let preprocessor = serde_json::from_str::<Value>(FUSED_PREPROCESSOR)
        .map_err(|e| Error::InvalidInput(e.to_string()))?;
    let config = write_model_files(out, &cfg_json, &preprocessor, &opts.tokenizer)?;
    let tensors = checkpoint_tensors(&config);
    let fill = |name: &str, shape: &[usize]| {
        let mut buf = vec![0u16; shape.iter().product()];
        fill_bf16(name, shape, opts.seed, &mut buf);
        bytemuck::cast_slice::<u16, u8>(&buf).to_vec()
    };
    write_safetensors(
        out,
        &tensors,
        SavedDtype::Bf16,
        opts.max_shard_bytes,
        &fill,
        progress,
    )
}

/// The dtype tensors are written in by [`write_safetensors`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SavedDtype {
    /// bfloat16 (2 bytes).
    Bf16,
    /// float32 (4 bytes).
    F32,
}

impl SavedDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            SavedDtype::Bf16 => 2,
            SavedDtype::F32 => 4,
        }
    }
    /// The safetensors header name.
    fn safetensors_name(self) -> &'static str {
        match self {
            SavedDtype::Bf16 => "BF16",
            SavedDtype::F32 => "F32",
        }
    }
    /// Little-endian bytes of `values` in this dtype (bf16 rounds to nearest even).
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            SavedDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            SavedDtype::Bf16 => values
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes())
                .collect(),
        }
    }
}

/// Writes `config.json` (`config_json`), `preprocessor_config.json`, `generation_config.json`
/// and the tokenizer into `out` (created): `tokenizer.json` from `tokenizer`, plus the
/// `tokenizer_config.json` and `special_tokens_map.json` found next to it. Returns the parsed
/// config, so that an invalid one fails before any weight is written.
pub(crate) fn write_model_files(
    out: &Path,
    config_json: &Value,
    preprocessor: &Value,
    tokenizer: &Path,
) -> Result<ModelConfig> {
    if !tokenizer.is_file() {
        return Err(Error::config(
            tokenizer,
            "tokenizer.json not found (the Llama-2 tokenizer ships in the repository as \
             models/openvla-tiny/tokenizer.json; pass its path)",
        ));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let cfg_path = out.join("config.json");
    write_json(&cfg_path, config_json)?;
    let config = ModelConfig::from_file(&cfg_path)?;
    write_json(&out.join("preprocessor_config.json"), preprocessor)?;
    std::fs::copy(tokenizer, out.join("tokenizer.json")).map_err(|e| Error::io(tokenizer, e))?;
    if let Some(dir) = tokenizer.parent() {
        for extra in ["tokenizer_config.json", "special_tokens_map.json"] {
            let src = dir.join(extra);
            if src.is_file() {
                std::fs::copy(&src, out.join(extra)).map_err(|e| Error::io(&src, e))?;
            }
        }
    }
    write_json(
        &out.join("generation_config.json"),
        &json!({"_from_model_config": true, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32000, "transformers_version": "4.40.1"}),
    )?;
    Ok(config)
}

/// Writes `tensors` (name, shape; in this order) as safetensors shards of at most
/// `max_shard_bytes` into `out`: `model.safetensors`, or `model-0000i-of-0000n.safetensors`
/// and `model.safetensors.index.json`. `fill(name, shape)` returns a tensor's little-endian
/// bytes in `dtype`; it is called one tensor at a time, so memory stays at one tensor.
/// `progress(done_bytes, total_bytes)` is called as data is written.
pub(crate) fn write_safetensors(
    out: &Path,
    tensors: &[(String, Vec<usize>)],
    dtype: SavedDtype,
    max_shard_bytes: u64,
    fill: &dyn Fn(&str, &[usize]) -> Vec<u8>,
    progress: &dyn Fn(u64, u64),
) -> Result<()> {
    let nbytes = |s: &[usize]| s.iter().product::<usize>() as u64 * dtype.size() as u64;
    let total: u64 = tensors.iter().map(|(_, s)| nbytes(s)).sum();
    // Assign tensors to shards in order.
    let mut shards: Vec<Vec<&(String, Vec<usize>)>> = vec![vec![]];
    let mut size = 0u64;
    for t in tensors {
        let bytes = nbytes(&t.1);
        if size > 0 && size + bytes > max_shard_bytes {
            shards.push(vec![]);
            size = 0;
        }
        size += bytes;
        if let Some(last) = shards.last_mut() {
            last.push(t);
        }
    }
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut done = 0u64;
    for (si, shard) in shards.iter().enumerate() {
        let file_name = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", si + 1, n)
        };
        let path = out.join(&file_name);
        for (name, _) in shard {
            weight_map.insert(name.clone(), file_name.clone());
        }
        let (header, _) = crate::checkpoint::safetensors_header(
            Some(json!({"format": "pt"})),
            shard.iter().map(|(name, shape)| {
                (
                    name.as_str(),
                    dtype.safetensors_name(),
                    shape.as_slice(),
                    nbytes(shape),
                )
            }),
        );
        let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut w = BufWriter::with_capacity(1 << 22, file);
        let io = |e| Error::io(&path, e);
        w.write_all(&header).map_err(io)?;
        for (name, shape) in shard {
            let bytes = fill(name, shape);
            if bytes.len() as u64 != nbytes(shape) {
                return Err(Error::checkpoint(
                    &path,
                    format!(
                        "tensor {name}: {} bytes produced, {} expected for shape {shape:?}",
                        bytes.len(),
                        nbytes(shape)
                    ),
                ));
            }
            w.write_all(&bytes).map_err(io)?;
            done += bytes.len() as u64;
            progress(done, total);
        }
        w.flush().map_err(io)?;
    }
    if n > 1 {
        write_json(
            &out.join("model.safetensors.index.json"),
            &json!({"metadata": {"total_size": total}, "weight_map": weight_map}),
        )?;
    }
    Ok(())
}

pub(crate) fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::InvalidInput(e.to_string()))?;
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// `preprocessor_config.json` of the fused openvla-7b processor.
pub const FUSED_PREPROCESSOR: &str = r#"{
  "auto_map": {"AutoImageProcessor": "processing_prismatic.PrismaticImageProcessor",
               "AutoProcessor": "processing_prismatic.PrismaticProcessor"},
  "image_processor_type": "PrismaticImageProcessor",
  "image_resize_strategy": "resize-naive",
  "input_sizes": [[3, 224, 224], [3, 224, 224]],
  "interpolations": ["bicubic", "bicubic"],
  "means": [[0.485, 0.456, 0.406], [0.5, 0.5, 0.5]],
  "processor_class": "PrismaticProcessor",
  "stds": [[0.229, 0.224, 0.225], [0.5, 0.5, 0.5]],
  "use_fused_vision_backbone": true
}"#;

/// One dataset of statistics (BridgeData-like values) for synthesized checkpoints.
pub const DEFAULT_NORM_STATS: &str = r#"{"bridge_orig": {"action": {
  "mask": [true, true, true, true, true, true, false],
  "q01": [-0.02872725, -0.0417035, -0.02609386, -0.08092105, -0.092887, -0.20718276, 0.0],
  "q99": [0.02830968, 0.04085525, 0.04016159, 0.08192048, 0.07792851, 0.20382574, 1.0]},
  "num_transitions": 2135463, "num_trajectories": 60064}}"#;
