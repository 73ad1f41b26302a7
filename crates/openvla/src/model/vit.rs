//! A timm Vision Transformer as OpenVLA uses it (spec §2): pre-norm blocks, fused qkv,
//! optional class/register tokens and LayerScale, output of block `len - 2`, no final norm,
//! prefix tokens dropped; optionally FiLM-conditioned on the language (OFT, oft-spec §3).

use crate::checkpoint::WeightLoader;
use crate::config::TowerConfig;
use crate::error::{Error, Result};
use crate::kernels::activation::gelu_erf;
use crate::kernels::attention::fused_qkv_attention;
use crate::model::linear::{LayerKind, Linear, Weight, WeightPolicy};
use crate::oft::film::FilmLayer;
use candle_core::{DType, Tensor, D};

/// Where a tower's tensors come from, under the safetensors names of the HF checkpoint
/// (`{prefix}.blocks.{i}.attn.qkv.weight`, ...): the model's shards ([`WeightLoader`]), or an
/// OFT FiLM `vision_backbone--*.pt` file with its LoRA merged
/// ([`crate::oft::film::FilmCheckpoint`]).
pub trait TowerSource {
    /// The f32 tensor `name`, which must have exactly `shape`.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor>;
    /// The weight matrix `name` (`[rows, cols]`), held as `policy` says for `kind`.
    fn weight(
        &self,
        name: &str,
        shape: [usize; 2],
        policy: &WeightPolicy,
        kind: LayerKind,
    ) -> Result<Weight>;
    /// Marks every tensor under `prefix` as knowingly unused.
    fn skip_prefix(&self, prefix: &str);
    /// The FiLM layers of the block under `block_prefix` (`vision_dim` outputs), or `None`
    /// when this source has no FiLM (the shards never do).
    fn film(
        &self,
        block_prefix: &str,
        vision_dim: usize,
        policy: &WeightPolicy,
    ) -> Result<Option<FilmLayer>>;
}

impl TowerSource for WeightLoader<'_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get(name, shape, DType::F32)
    }
    fn weight(
        &self,
        name: &str,
        [rows, cols]: [usize; 2],
        policy: &WeightPolicy,
        kind: LayerKind,
    ) -> Result<Weight> {
        self.get_weight(
            name,
            [rows, cols],
            policy.dtype.dtype(),
            policy.format_for(kind),
        )
    }
    fn skip_prefix(&self, prefix: &str) {
        WeightLoader::skip_prefix(self, prefix)
    }
    fn film(&self, _: &str, _: usize, _: &WeightPolicy) -> Result<Option<FilmLayer>> {
        Ok(None)
    }
}

/// A linear layer with bias, `{prefix}.weight` `[out, in]` and `{prefix}.bias` `[out]`.
pub(crate) fn load_linear(
    w: &dyn TowerSource,
    prefix: &str,
    (in_dim, out_dim): (usize, usize),
    wp: &WeightPolicy,
    kind: LayerKind,
) -> Result<Linear> {
    let weight = w.weight(&format!("{prefix}.weight"), [out_dim, in_dim], wp, kind)?;
    let bias = w.tensor(&format!("{prefix}.bias"), &[out_dim])?;
    Ok(Linear::new(weight, Some(bias)).with_compute(wp.compute))
}

/// LayerNorm with weight and bias (eps from the tower config).
#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    fn load(w: &dyn TowerSource, prefix: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: w.tensor(&format!("{prefix}.weight"), &[dim])?,
            bias: w.tensor(&format!("{prefix}.bias"), &[dim])?,
            eps: eps as f32,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::layer_norm(
            &x.contiguous()?,
            &self.weight,
            &self.bias,
            self.eps,
        )?)
    }
}

/// One pre-norm transformer block, FiLM-conditioned when `film` is set.
#[derive(Debug, Clone)]
struct Block {
    film: Option<FilmLayer>,
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    ls1: Option<Tensor>,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    ls2: Option<Tensor>,
    num_heads: usize,
}

impl Block {
    fn load(w: &dyn TowerSource, p: &str, cfg: &TowerConfig, wp: &WeightPolicy) -> Result<Self> {
        let d = cfg.embed_dim;
        let h = cfg.mlp_hidden();
        let ls = |name: &str| -> Result<Option<Tensor>> {
            if cfg.layer_scale {
                Ok(Some(w.tensor(&format!("{p}.{name}.scale_factor"), &[d])?))
            } else {
                Ok(None)
            }
        };
        let linear = |name: &str, dims: (usize, usize)| {
            load_linear(w, &format!("{p}.{name}"), dims, wp, LayerKind::Vision)
        };
        Ok(Block {
            film: w.film(p, d, wp)?,
            norm1: LayerNorm::load(w, &format!("{p}.norm1"), d, cfg.norm_eps)?,
            qkv: linear("attn.qkv", (d, 3 * d))?,
            proj: linear("attn.proj", (d, d))?,
            ls1: ls("ls1")?,
            norm2: LayerNorm::load(w, &format!("{p}.norm2"), d, cfg.norm_eps)?,
            fc1: linear("mlp.fc1", (d, h))?,
            fc2: linear("mlp.fc2", (h, d))?,
            ls2: ls("ls2")?,
            num_heads: cfg.num_heads,
        })
    }

    fn attention(&self, x: &Tensor) -> Result<Tensor> {
        let qkv = self.qkv.forward(x)?;
        let out = fused_qkv_attention(&qkv, self.num_heads)?;
        self.proj.forward(&out)
    }

    /// `language` is the average language embedding `[B, llm_dim]` (FiLM blocks only).
    fn forward(&self, x: &Tensor, language: Option<&Tensor>) -> Result<Tensor> {
        let a = self.attention(&self.norm1.forward(x)?)?;
        let a = match &self.ls1 {
            Some(g) => a.broadcast_mul(g)?,
            None => a,
        };
        let x = (x + a)?;
        // FiLM between the attention and MLP residuals (film_vit_wrapper.py:68-75).
        let x = match (&self.film, language) {
            (Some(film), Some(lang)) => film.modulate(&x, lang)?,
            (Some(_), None) => return Err(Error::InvalidInput(
                "this vision tower is FiLM-conditioned (OpenVLA-OFT FiLM checkpoint): it needs \
                     the average language embedding of the prompt, which only the OFT parallel \
                     decoding pass provides"
                    .into(),
            )),
            (None, _) => x,
        };
        let m = self
            .fc2
            .forward(&gelu_erf(&self.fc1.forward(&self.norm2.forward(&x)?)?)?)?;
        let m = match &self.ls2 {
            Some(g) => m.broadcast_mul(g)?,
            None => m,
        };
        Ok((x + m)?)
    }
}

/// A timm ViT truncated after the block whose output OpenVLA uses.
#[derive(Debug, Clone)]
pub struct VisionTransformer {
    cfg: TowerConfig,
    patch_embed: Linear,
    cls_token: Option<Tensor>,
    reg_token: Option<Tensor>,
    pos_embed: Tensor,
    blocks: Vec<Block>,
}

impl VisionTransformer {
    /// Loads the tower under `prefix` (e.g. `vision_backbone.featurizer`). The blocks after the
    /// selected one, the final `norm` and SigLIP's `attn_pool` are stored by the reference but
    /// never affect its output; they are skipped knowingly.
    pub fn load(
        w: &dyn TowerSource,
        prefix: &str,
        cfg: &TowerConfig,
        wp: &WeightPolicy,
    ) -> Result<Self> {
        let d = cfg.embed_dim;
        let p = cfg.patch_size;
        // The patch-embedding convolution (kernel = stride = patch) is a linear map of each
        // flattened (channel, row, column) patch.
        let conv_w = w.tensor(&format!("{prefix}.patch_embed.proj.weight"), &[d, 3, p, p])?;
        let conv_b = w.tensor(&format!("{prefix}.patch_embed.proj.bias"), &[d])?;
        let conv_w = conv_w.reshape((d, 3 * p * p))?.to_dtype(wp.dtype.dtype())?;
        let patch_embed = Linear::from_tensors(conv_w, Some(conv_b));
        let cls_token = if cfg.class_token {
            Some(w.tensor(&format!("{prefix}.cls_token"), &[1, 1, d])?)
        } else {
            None
        };
        let reg_token = if cfg.reg_tokens > 0 {
            Some(w.tensor(&format!("{prefix}.reg_token"), &[1, cfg.reg_tokens, d])?)
        } else {
            None
        };
        let pos_embed = w.tensor(&format!("{prefix}.pos_embed"), &[1, cfg.num_patches(), d])?;
        let selected = cfg.selected_block();
        let blocks = (0..=selected)
            .map(|i| Block::load(w, &format!("{prefix}.blocks.{i}"), cfg, wp))
            .collect::<Result<Vec<_>>>()?;
        for i in selected + 1..cfg.depth {
            w.skip_prefix(&format!("{prefix}.blocks.{i}."));
        }
        w.skip_prefix(&format!("{prefix}.norm."));
        if cfg.attn_pool {
            w.skip_prefix(&format!("{prefix}.attn_pool."));
        }
        Ok(VisionTransformer {
            cfg: cfg.clone(),
            patch_embed,
            cls_token,
            reg_token,
            pos_embed,
            blocks,
        })
    }

    /// The tower's configuration.
    pub fn config(&self) -> &TowerConfig {
        &self.cfg
    }

    /// Bytes of the tower's weight matrices (patch embedding, block linears, FiLM layers).
    pub fn weight_bytes(&self) -> usize {
        self.patch_embed.weight().storage_bytes()
            + self
                .blocks
                .iter()
                .flat_map(|b| [&b.qkv, &b.proj, &b.fc1, &b.fc2])
                .map(|l| l.weight().storage_bytes())
                .sum::<usize>()
            + self.film_bytes()
    }

    /// Whether the blocks are FiLM-conditioned.
    pub fn is_film(&self) -> bool {
        self.blocks.iter().any(|b| b.film.is_some())
    }

    /// Bytes of the FiLM layers' matrices (0 without FiLM).
    pub fn film_bytes(&self) -> usize {
        self.blocks
            .iter()
            .filter_map(|b| b.film.as_ref())
            .map(FilmLayer::weight_bytes)
            .sum()
    }

    /// `pixels [B, 3, H, W]` -> patch features `[B, num_patches, D]` of block `len - 2`.
    /// A FiLM tower needs [`VisionTransformer::forward_film`].
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        self.forward_film(pixels, None)
    }

    /// Like [`VisionTransformer::forward`], with the average language embedding
    /// `language [B, llm_dim]` that FiLM blocks are conditioned on (ignored by other towers).
    pub fn forward_film(&self, pixels: &Tensor, language: Option<&Tensor>) -> Result<Tensor> {
        let (b, c, h, w) = pixels.dims4()?;
        let p = self.cfg.patch_size;
        let (gh, gw) = (h / p, w / p);
        // [B, C, gh, p, gw, p] -> [B, gh, gw, C, p, p] -> [B, gh*gw, C*p*p]
        let patches = pixels
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, gh * gw, c * p * p))?;
        let mut x = self
            .patch_embed
            .forward(&patches)?
            .broadcast_add(&self.pos_embed)?;
        let d = self.cfg.embed_dim;
        let mut prefix = Vec::new();
        if let Some(cls) = &self.cls_token {
            prefix.push(cls.broadcast_as((b, 1, d))?);
        }
        if let Some(reg) = &self.reg_token {
            prefix.push(reg.broadcast_as((b, self.cfg.reg_tokens, d))?);
        }
        if !prefix.is_empty() {
            prefix.push(x);
            x = Tensor::cat(&prefix, 1)?;
        }
        for block in &self.blocks {
            x = block.forward(&x, language)?;
        }
        let n = x.dim(1)?;
        let np = self.cfg.num_prefix_tokens();
        Ok(x.narrow(D::Minus2, np, n - np)?)
    }
}
