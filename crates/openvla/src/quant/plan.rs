//! Which weight matrices a quantization mode quantizes, and to which format.

use super::QuantFormat;

/// The role of a weight matrix, which decides its quantization ([`Quantization::format_for`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// A vision tower's patch embedding (a convolution applied as a linear map).
    PatchEmbed,
    /// A linear layer of a vision tower block (qkv, proj, fc1, fc2).
    Vision,
    /// A projector layer.
    Projector,
    /// A linear layer of an LLM decoder layer (q/k/v/o, gate/up/down).
    Llm,
    /// The LLM's output head.
    LmHead,
    /// The LLM's token embeddings (a table, read a few rows at a time).
    Embedding,
}

/// A weight quantization mode (`--quantize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Quantization {
    /// Every linear layer and the token embeddings in `q8_0`.
    Int8,
    /// The LLM's decoder layers in `q4_0`; the vision towers, projector, lm_head and
    /// embeddings in `q8_0` (see [`Quantization::format_for`]).
    Int4,
}

impl Quantization {
    /// The name on the command line and in `quantization.json`.
    pub fn name(self) -> &'static str {
        match self {
            Quantization::Int8 => "int8",
            Quantization::Int4 => "int4",
        }
    }

    /// The per-role formats of this mode.
    pub fn plan(self) -> QuantPlan {
        let f = |k| self.format_for(k);
        QuantPlan {
            vision: f(LayerKind::Vision),
            projector: f(LayerKind::Projector),
            llm: f(LayerKind::Llm),
            lm_head: f(LayerKind::LmHead),
            embedding: f(LayerKind::Embedding),
        }
    }

    /// The format of a matrix of role `kind`, or `None` to keep it unquantized.
    ///
    /// - The patch embeddings stay in the dense dtype: they are 0.1 % of the FLOPs and the first
    ///   layer, where errors would propagate through every block.
    /// - `int8` quantizes everything else to `q8_0`.
    /// - `int4` puts the LLM decoder layers (93 % of the 7B's parameters, and all of its decode
    ///   traffic but lm_head) in `q4_0`, and keeps the vision towers, projector, lm_head and
    ///   embeddings in `q8_0`: they are small (10 % of the 7B), read once per image (towers,
    ///   projector) or decide the argmax directly (lm_head), and measured more sensitive.
    pub fn format_for(self, kind: LayerKind) -> Option<QuantFormat> {
        match (self, kind) {
            (_, LayerKind::PatchEmbed) => None,
            (Quantization::Int8, _) => Some(QuantFormat::Q8_0),
            (Quantization::Int4, LayerKind::Llm) => Some(QuantFormat::Q4_0),
            (
                Quantization::Int4,
                LayerKind::Vision | LayerKind::Projector | LayerKind::LmHead | LayerKind::Embedding,
            ) => Some(QuantFormat::Q8_0),
        }
    }
}

/// The format of each role's matrices (`None`: unquantized). Patch embeddings are never
/// quantized. [`Quantization::plan`] gives the plans of `int8` and `int4`; other plans are for
/// experiments (e.g. measuring which component's quantization costs accuracy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QuantPlan {
    /// Vision tower block linears.
    pub vision: Option<QuantFormat>,
    /// Projector layers.
    pub projector: Option<QuantFormat>,
    /// LLM decoder layer linears.
    pub llm: Option<QuantFormat>,
    /// The LLM output head.
    pub lm_head: Option<QuantFormat>,
    /// The token embedding table.
    pub embedding: Option<QuantFormat>,
}

impl QuantPlan {
    /// The format for a matrix of role `kind`.
    pub fn format_for(&self, kind: LayerKind) -> Option<QuantFormat> {
        match kind {
            LayerKind::PatchEmbed => None,
            LayerKind::Vision => self.vision,
            LayerKind::Projector => self.projector,
            LayerKind::Llm => self.llm,
            LayerKind::LmHead => self.lm_head,
            LayerKind::Embedding => self.embedding,
        }
    }
}

impl std::str::FromStr for Quantization {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "int8" => Ok(Quantization::Int8),
            "int4" => Ok(Quantization::Int4),
            _ => Err(format!("unknown quantization {s:?}; expected int8 or int4")),
        }
    }
}

impl std::fmt::Display for Quantization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The role of checkpoint tensor `name`, if it is a weight matrix that quantization may touch.
///
/// Follows the HF OpenVLA names (spec §1.4): vision block linears, projector layers, LLM decoder
/// linears, `lm_head` and `embed_tokens`. Everything else (norms, biases, LayerScale, position
/// and register tokens, patch embeddings) is kept as stored.
pub fn kind_of(name: &str) -> Option<LayerKind> {
    let base = name.strip_suffix(".weight")?;
    if let Some(rest) = base.strip_prefix("language_model.") {
        return match rest {
            "lm_head" => Some(LayerKind::LmHead),
            "model.embed_tokens" => Some(LayerKind::Embedding),
            _ if rest.starts_with("model.layers.")
                && (rest.contains(".self_attn.") || rest.contains(".mlp.")) =>
            {
                Some(LayerKind::Llm)
            }
            _ => None,
        };
    }
    if base.starts_with("projector.fc") {
        return Some(LayerKind::Projector);
    }
    if base.starts_with("vision_backbone.") && base.contains(".blocks.") {
        let leaf = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"];
        if leaf.iter().any(|l| base.ends_with(l)) {
            return Some(LayerKind::Vision);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_follow_the_checkpoint_names() {
        let cases = [
            ("language_model.lm_head.weight", Some(LayerKind::LmHead)),
            (
                "language_model.model.embed_tokens.weight",
                Some(LayerKind::Embedding),
            ),
            (
                "language_model.model.layers.3.self_attn.q_proj.weight",
                Some(LayerKind::Llm),
            ),
            (
                "language_model.model.layers.31.mlp.down_proj.weight",
                Some(LayerKind::Llm),
            ),
            ("language_model.model.layers.3.input_layernorm.weight", None),
            ("language_model.model.norm.weight", None),
            ("projector.fc2.weight", Some(LayerKind::Projector)),
            ("projector.fc2.bias", None),
            (
                "vision_backbone.featurizer.blocks.0.attn.qkv.weight",
                Some(LayerKind::Vision),
            ),
            (
                "vision_backbone.fused_featurizer.blocks.26.mlp.fc2.weight",
                Some(LayerKind::Vision),
            ),
            (
                "vision_backbone.fused_featurizer.blocks.2.norm1.weight",
                None,
            ),
            ("vision_backbone.featurizer.patch_embed.proj.weight", None),
            (
                "vision_backbone.fused_featurizer.attn_pool.mlp.fc1.weight",
                None,
            ),
        ];
        for (name, kind) in cases {
            assert_eq!(kind_of(name), kind, "{name}");
        }
    }
}
