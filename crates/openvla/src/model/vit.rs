//! A timm Vision Transformer as OpenVLA uses it (spec §2): pre-norm blocks, fused qkv,
//! optional class/register tokens and LayerScale, output of block `len - 2`, no final norm,
//! prefix tokens dropped; optionally FiLM-conditioned on the language (OFT, oft-spec §3).
//!
//! Written once for inference and training ([`Backend`]): `VisionTransformer` (= `<Infer>`)
//! serves predictions, `VisionTransformer<openvla_train::model::Train>` is fine-tuned.

use crate::config::TowerConfig;
use crate::error::{Error, Result};
use crate::model::backend::{Backend, FilmLayer, Infer, ParamSource};
use crate::model::checkpoint::WeightLoader;
use crate::model::linear::{LayerKind, Linear, Weight, WeightPolicy};
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

/// A [`TowerSource`] with the weight policy its matrices are held under: the inference
/// [`ParamSource`] of the towers.
pub struct Loading<'a> {
    /// Where the tensors come from.
    pub source: &'a dyn TowerSource,
    /// How weight matrices are held (dtype, quantization, arithmetic).
    pub policy: &'a WeightPolicy,
}

impl ParamSource<Infer> for Loading<'_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.source.tensor(name, shape)
    }

    fn linear(
        &self,
        prefix: &str,
        (in_dim, out_dim): (usize, usize),
        bias: bool,
        kind: LayerKind,
    ) -> Result<Linear> {
        let name = format!("{prefix}.weight");
        let weight = self
            .source
            .weight(&name, [out_dim, in_dim], self.policy, kind)?;
        let bias = if bias {
            Some(self.source.tensor(&format!("{prefix}.bias"), &[out_dim])?)
        } else {
            None
        };
        Linear::with_policy(weight, bias, self.policy)
    }

    fn patch_embed(&self, prefix: &str, dim: usize, patch: usize) -> Result<Linear> {
        // The convolution (kernel = stride = patch) is a linear map of each flattened
        // (channel, row, column) patch; f32 arithmetic, as before the compute option.
        let conv_w = self
            .source
            .tensor(&format!("{prefix}.weight"), &[dim, 3, patch, patch])?;
        let conv_b = self.source.tensor(&format!("{prefix}.bias"), &[dim])?;
        let conv_w = conv_w
            .reshape((dim, 3 * patch * patch))?
            .to_dtype(self.policy.dtype.dtype())?;
        Ok(Linear::from_tensors(conv_w, Some(conv_b)))
    }

    fn skip_prefix(&self, prefix: &str) {
        self.source.skip_prefix(prefix)
    }

    fn film(&self, block_prefix: &str, vision_dim: usize) -> Result<Option<FilmLayer>> {
        self.source.film(block_prefix, vision_dim, self.policy)
    }
}

/// LayerNorm with weight and bias (eps from the tower config).
#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn load<B: Backend>(
        w: &dyn ParamSource<B>,
        prefix: &str,
        dim: usize,
        eps: f64,
    ) -> Result<Self> {
        Ok(LayerNorm {
            weight: w.tensor(&format!("{prefix}.weight"), &[dim])?,
            bias: w.tensor(&format!("{prefix}.bias"), &[dim])?,
            eps,
        })
    }
    fn forward<B: Backend>(&self, x: &Tensor) -> Result<Tensor> {
        B::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// One pre-norm transformer block, FiLM-conditioned when `film` is set.
#[derive(Debug, Clone)]
struct Block<B: Backend> {
    film: Option<FilmLayer<B>>,
    norm1: LayerNorm,
    qkv: B::Linear,
    proj: B::Linear,
    ls1: Option<Tensor>,
    norm2: LayerNorm,
    fc1: B::Linear,
    fc2: B::Linear,
    ls2: Option<Tensor>,
    num_heads: usize,
}

impl<B: Backend> Block<B> {
    fn load(w: &dyn ParamSource<B>, p: &str, cfg: &TowerConfig) -> Result<Self> {
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
            w.linear(&format!("{p}.{name}"), dims, true, LayerKind::Vision)
        };
        Ok(Block {
            film: w.film(p, d)?,
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

    /// `language` is the average language embedding `[B, llm_dim]` (FiLM blocks only).
    fn forward(&self, ctx: &B::Ctx, x: &Tensor, language: Option<&Tensor>) -> Result<Tensor> {
        let qkv = B::linear(ctx, &self.qkv, &self.norm1.forward::<B>(x)?)?;
        let a = B::vit_attention(&self.qkv, &qkv, self.num_heads)?;
        let a = B::linear(ctx, &self.proj, &a)?;
        let a = match &self.ls1 {
            Some(g) => a.broadcast_mul(g)?,
            None => a,
        };
        let x = (x + a)?;
        // FiLM between the attention and MLP residuals (film_vit_wrapper.py:68-75).
        let x = match (&self.film, language) {
            (Some(film), Some(lang)) => film.modulate(ctx, &x, lang)?,
            (Some(_), None) => return Err(Error::InvalidInput(
                "this vision tower is FiLM-conditioned (OpenVLA-OFT FiLM checkpoint): it needs \
                     the average language embedding of the prompt, which only the OFT parallel \
                     decoding pass provides"
                    .into(),
            )),
            (None, _) => x,
        };
        let h = B::gelu_erf(&B::linear(ctx, &self.fc1, &self.norm2.forward::<B>(&x)?)?)?;
        let m = B::linear(ctx, &self.fc2, &h)?;
        let m = match &self.ls2 {
            Some(g) => m.broadcast_mul(g)?,
            None => m,
        };
        Ok((x + m)?)
    }
}

/// A timm ViT truncated after the block whose output OpenVLA uses.
#[derive(Debug, Clone)]
pub struct VisionTransformer<B: Backend = Infer> {
    cfg: TowerConfig,
    patch_embed: B::Linear,
    cls_token: Option<Tensor>,
    reg_token: Option<Tensor>,
    pos_embed: Tensor,
    blocks: Vec<Block<B>>,
}

impl<B: Backend> VisionTransformer<B> {
    /// Loads the tower under `prefix` (e.g. `vision_backbone.featurizer`). The blocks after the
    /// selected one, the final `norm` and SigLIP's `attn_pool` are stored by the reference but
    /// never affect its output; they are skipped knowingly.
    pub fn load_with(w: &dyn ParamSource<B>, prefix: &str, cfg: &TowerConfig) -> Result<Self> {
        let d = cfg.embed_dim;
        let patch_embed =
            w.patch_embed(&format!("{prefix}.patch_embed.proj"), d, cfg.patch_size)?;
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
            .map(|i| Block::load(w, &format!("{prefix}.blocks.{i}"), cfg))
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

    /// Whether the blocks are FiLM-conditioned.
    pub fn is_film(&self) -> bool {
        self.blocks.iter().any(|b| b.film.is_some())
    }

    /// Number of blocks run (up to and including the selected one).
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Patch embedding, position embedding and prefix (class, register) tokens: the token
    /// sequence `[B, N, D]` the first block reads, from `pixels [B, 3, H, W]`.
    pub fn stem(&self, ctx: &B::Ctx, pixels: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixels.dims4()?;
        let p = self.cfg.patch_size;
        let (gh, gw) = (h / p, w / p);
        // [B, C, gh, p, gw, p] -> [B, gh, gw, C, p, p] -> [B, gh*gw, C*p*p]
        let patches = pixels
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, gh * gw, c * p * p))?;
        let mut x = B::patch_embed(ctx, &self.patch_embed, pixels, &patches)?
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
        Ok(x)
    }

    /// Block `i` over the token sequence `x [B, N, D]`; `language [B, llm_dim]` conditions a
    /// FiLM block.
    pub fn block(
        &self,
        ctx: &B::Ctx,
        i: usize,
        x: &Tensor,
        language: Option<&Tensor>,
    ) -> Result<Tensor> {
        let block = self.blocks.get(i).ok_or_else(|| {
            Error::InvalidInput(format!(
                "no vision block {i} (the tower runs {})",
                self.blocks.len()
            ))
        })?;
        block.forward(ctx, x, language)
    }

    /// The selected block's output with the prefix (class, register) tokens dropped.
    pub fn patch_features(&self, x: &Tensor) -> Result<Tensor> {
        let n = x.dim(1)?;
        let np = self.cfg.num_prefix_tokens();
        Ok(x.narrow(D::Minus2, np, n - np)?)
    }

    /// `pixels [B, 3, H, W]` -> patch features `[B, num_patches, D]` of block `len - 2`, with
    /// the average language embedding `language [B, llm_dim]` that FiLM blocks are
    /// conditioned on (ignored by other towers).
    pub fn forward_with(
        &self,
        ctx: &B::Ctx,
        pixels: &Tensor,
        language: Option<&Tensor>,
    ) -> Result<Tensor> {
        let mut x = self.stem(ctx, pixels)?;
        for block in &self.blocks {
            x = block.forward(ctx, &x, language)?;
        }
        self.patch_features(&x)
    }

    /// The weight matrices of the tower (patch embedding, then each block's qkv, proj, fc1,
    /// fc2 and FiLM projections).
    pub fn linears(&self) -> Vec<&B::Linear> {
        let mut out = vec![&self.patch_embed];
        for b in &self.blocks {
            out.extend([&b.qkv, &b.proj, &b.fc1, &b.fc2]);
            if let Some(f) = &b.film {
                out.extend(f.layers());
            }
        }
        out
    }
}

impl VisionTransformer<Infer> {
    /// Loads the tower under `prefix` for inference, its matrices held as `wp` says.
    pub fn load(
        w: &dyn TowerSource,
        prefix: &str,
        cfg: &TowerConfig,
        wp: &WeightPolicy,
    ) -> Result<Self> {
        Self::load_with(
            &Loading {
                source: w,
                policy: wp,
            },
            prefix,
            cfg,
        )
    }

    /// Bytes of the tower's weight matrices (patch embedding, block linears, FiLM layers).
    pub fn weight_bytes(&self) -> usize {
        self.linears().iter().map(|l| l.storage_bytes()).sum()
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
        self.forward_with(&(), pixels, None)
    }

    /// Like [`VisionTransformer::forward`], with the average language embedding
    /// `language [B, llm_dim]` that FiLM blocks are conditioned on (ignored by other towers).
    pub fn forward_film(&self, pixels: &Tensor, language: Option<&Tensor>) -> Result<Tensor> {
        self.forward_with(&(), pixels, language)
    }
}
