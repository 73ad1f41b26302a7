//! A summary of a model directory read from its headers only (no weights are loaded).

use crate::action::{ActionTokenizer, NormStats};
use crate::config::{ModelConfig, Variant};
use crate::error::Result;
use crate::head::ActionHead;
use crate::model::checkpoint::Checkpoint;
use crate::oft::constants::OftOptions;
use crate::policy::load_norm_stats;
use serde::Serialize;
use std::collections::BTreeSet;
use std::path::Path;

/// Parameters of one component of the checkpoint.
#[derive(Debug, Clone, Serialize)]
pub struct ComponentSummary {
    /// Component name as in the paper/spec (`featurizer (DINOv2)`, `projector`, ...).
    pub name: String,
    /// Checkpoint prefix.
    pub prefix: String,
    /// Number of parameters stored.
    pub parameters: u64,
    /// Number of tensors stored.
    pub tensors: usize,
    /// Stored dtypes.
    pub dtypes: Vec<String>,
}

/// One dataset of `norm_stats`.
#[derive(Debug, Clone, Serialize)]
pub struct DatasetSummary {
    /// The `unnorm_key`.
    pub unnorm_key: String,
    /// Action dimension (length of q01).
    pub action_dim: usize,
    /// Dimensions that are un-normalized.
    pub masked_dims: usize,
    /// Transitions the statistics were computed over, if recorded.
    pub num_transitions: Option<u64>,
}

/// What `openvla inspect` prints.
#[derive(Debug, Clone, Serialize)]
pub struct ModelSummary {
    /// `openvla-7b` or `openvla-v0.1` layout.
    pub variant: String,
    /// Vision towers (timm id, width, depth, heads).
    pub towers: Vec<String>,
    /// LLM shape.
    pub llm: String,
    /// Prompt template.
    pub prompt_style: String,
    /// Image resize strategy.
    pub image_resize_strategy: String,
    /// Parameters per component.
    pub components: Vec<ComponentSummary>,
    /// Total parameters.
    pub total_parameters: u64,
    /// Total bytes of tensor data.
    pub total_bytes: u64,
    /// Shard files.
    pub shards: Vec<String>,
    /// Where the dataset statistics come from.
    pub norm_stats_source: String,
    /// Datasets of `norm_stats`.
    pub datasets: Vec<DatasetSummary>,
    /// Action head family: `openvla`, `oft-l1` or `oft-discrete`.
    pub family: String,
    /// The action head.
    pub head: String,
    /// OpenVLA-OFT constants and component files (`None` for the 256-bin family).
    pub oft: Option<OftSummary>,
}

/// One resolved OFT constant.
#[derive(Debug, Clone, Serialize)]
pub struct ConstantSummary {
    /// Its name (`chunk_size`, `action_dim`, ...).
    pub name: String,
    /// Its value (`null` when not applicable).
    pub value: serde_json::Value,
    /// Where it came from.
    pub source: String,
}

/// The OFT part of a summary.
#[derive(Debug, Clone, Serialize)]
pub struct OftSummary {
    /// The constants with their sources.
    pub constants: Vec<ConstantSummary>,
    /// The component files read.
    pub files: Vec<String>,
    /// Whether images are centre-cropped.
    pub center_crop: bool,
}

impl ModelSummary {
    /// Reads config, statistics and safetensors headers of `dir`.
    pub fn read(dir: &Path) -> Result<ModelSummary> {
        Self::read_with(dir, &OftOptions::default())
    }

    /// Like [`ModelSummary::read`], resolving OpenVLA-OFT constants with `oft` flags (the
    /// component `.pt` files are read to check their shapes).
    pub fn read_with(dir: &Path, oft: &OftOptions) -> Result<ModelSummary> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let (norm_stats, source) = load_norm_stats(dir, &config)?;
        let ckpt = Checkpoint::open_dir(dir)?;
        let mut summary = Self::build(&config, &ckpt, &norm_stats, &source);
        let tokenizer = ActionTokenizer::new(config.n_action_bins, config.action_vocab_size);
        let head = match crate::oft::load(
            dir,
            config.text.hidden_size,
            config.n_action_bins,
            config.action_vocab_size,
            oft,
            candle_core::DType::F32,
        )? {
            Some((head, model)) => {
                let c = &model.constants;
                let entry =
                    |name: &str, value: serde_json::Value, source: String| ConstantSummary {
                        name: name.into(),
                        value,
                        source,
                    };
                summary.oft = Some(OftSummary {
                    constants: vec![
                        entry(
                            "chunk_size",
                            c.chunk.value.into(),
                            c.chunk.source.to_string(),
                        ),
                        entry(
                            "action_dim",
                            c.action_dim.value.into(),
                            c.action_dim.source.to_string(),
                        ),
                        entry(
                            "proprio_dim",
                            c.proprio_dim.value.into(),
                            c.proprio_dim.source.to_string(),
                        ),
                        entry(
                            "num_images",
                            c.num_images.value.into(),
                            c.num_images.source.to_string(),
                        ),
                        entry(
                            "normalization",
                            c.normalization.value.to_string().into(),
                            c.normalization.source.to_string(),
                        ),
                    ],
                    files: model
                        .files
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect(),
                    center_crop: model.center_crop,
                });
                head
            }
            None => ActionHead::Autoregressive256(tokenizer),
        };
        summary.family = head.family().into();
        summary.head = head.describe();
        Ok(summary)
    }

    fn build(
        config: &ModelConfig,
        ckpt: &Checkpoint,
        norm_stats: &NormStats,
        source: &Path,
    ) -> Self {
        let tower_name = |id: &str| {
            if id.contains("dinov2") {
                "DINOv2"
            } else if id.contains("siglip") {
                "SigLIP"
            } else {
                "ViT"
            }
        };
        let mut components = Vec::new();
        let prefixes: Vec<(String, String)> = config
            .towers
            .iter()
            .zip([
                "vision_backbone.featurizer.",
                "vision_backbone.fused_featurizer.",
            ])
            .map(|(t, p)| {
                let role = p.trim_end_matches('.').rsplit('.').next().unwrap_or(p);
                (
                    format!("{role} ({})", tower_name(&t.timm_id)),
                    p.to_string(),
                )
            })
            .chain([
                ("projector".to_string(), "projector.".to_string()),
                (
                    "language_model (Llama)".to_string(),
                    "language_model.".to_string(),
                ),
            ])
            .collect();
        let mut counted = 0u64;
        for (name, prefix) in prefixes {
            let mut parameters = 0u64;
            let mut tensors = 0;
            let mut dtypes = BTreeSet::new();
            for n in ckpt.names().filter(|n| n.starts_with(&prefix)) {
                if let Some(info) = ckpt.info(n) {
                    parameters += crate::quant::io::stored_parameters(n, &info.shape);
                    tensors += 1;
                    dtypes.insert(info.dtype.name().to_string());
                }
            }
            counted += parameters;
            components.push(ComponentSummary {
                name,
                prefix,
                parameters,
                tensors,
                dtypes: dtypes.into_iter().collect(),
            });
        }
        let total_parameters: u64 = ckpt
            .names()
            .filter_map(|n| {
                ckpt.info(n)
                    .map(|i| crate::quant::io::stored_parameters(n, &i.shape))
            })
            .sum();
        if total_parameters > counted {
            components.push(ComponentSummary {
                name: "other".into(),
                prefix: String::new(),
                parameters: total_parameters - counted,
                tensors: 0,
                dtypes: vec![],
            });
        }
        let t = &config.text;
        ModelSummary {
            variant: match config.variant {
                Variant::OpenVla => "openvla-7b layout (fused DINOv2 + SigLIP)".into(),
                Variant::OpenVlaV01 => "openvla-v0.1 layout (SigLIP only)".into(),
            },
            towers: config
                .towers
                .iter()
                .map(|t| {
                    format!(
                        "{}: width {}, depth {} (output of block {}), heads {}, patch {}, {} px",
                        t.timm_id,
                        t.embed_dim,
                        t.depth,
                        t.selected_block(),
                        t.num_heads,
                        t.patch_size,
                        t.image_size
                    )
                })
                .collect(),
            llm: format!(
                "Llama: hidden {}, intermediate {}, {} layers, {} heads, {} KV heads, vocab {}, \
                 rms_norm_eps {:e}, rope_theta {}",
                t.hidden_size,
                t.intermediate_size,
                t.num_hidden_layers,
                t.num_attention_heads,
                t.num_key_value_heads,
                t.vocab_size,
                t.rms_norm_eps,
                t.rope_theta
            ),
            prompt_style: format!("{:?}", config.prompt_style),
            image_resize_strategy: config.image_resize_strategy.clone(),
            components,
            total_parameters,
            total_bytes: ckpt.total_bytes(),
            shards: ckpt
                .files()
                .map(|p| {
                    p.file_name()
                        .map(|f| f.to_string_lossy().into_owned())
                        .unwrap_or_default()
                })
                .collect(),
            norm_stats_source: source
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            datasets: norm_stats
                .iter()
                .map(|(k, v)| DatasetSummary {
                    unnorm_key: k.clone(),
                    action_dim: v.action.action_dim(),
                    masked_dims: v
                        .action
                        .mask
                        .as_ref()
                        .map(|m| m.iter().filter(|&&b| b).count())
                        .unwrap_or(v.action.action_dim()),
                    num_transitions: v.num_transitions,
                })
                .collect(),
            family: "openvla".into(),
            head: String::new(),
            oft: None,
        }
    }
}
