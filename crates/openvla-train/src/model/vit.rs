//! A timm ViT tower as OpenVLA uses it (the same math as `openvla::model::vit`): pre-norm
//! blocks with fused qkv, exact (erf) GELU, optional class/register tokens and LayerScale
//! (DINOv2), output of block `len - 2` with the prefix tokens dropped, no final norm.

use super::ops::{layer_norm, softmax_last, Linear};
use super::params::ParamStore;
use crate::error::Result;
use candle_core::{IndexOp, Tensor, D};
use openvla::config::TowerConfig;

#[derive(Debug, Clone)]
struct Norm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl Norm {
    fn load(p: &ParamStore, name: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: p.get(&format!("{name}.weight"), &[dim])?,
            bias: p.get(&format!("{name}.bias"), &[dim])?,
            eps,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

#[derive(Debug, Clone)]
struct Block {
    norm1: Norm,
    qkv: Linear,
    proj: Linear,
    ls1: Option<Tensor>,
    norm2: Norm,
    fc1: Linear,
    fc2: Linear,
    ls2: Option<Tensor>,
    num_heads: usize,
}

impl Block {
    fn load(p: &ParamStore, prefix: &str, cfg: &TowerConfig) -> Result<Self> {
        let d = cfg.embed_dim;
        let h = cfg.mlp_hidden();
        let ls = |n: &str| -> Result<Option<Tensor>> {
            if cfg.layer_scale {
                Ok(Some(p.get(&format!("{prefix}.{n}.scale_factor"), &[d])?))
            } else {
                Ok(None)
            }
        };
        let lin = |n: &str, dims| Linear::load(p, &format!("{prefix}.{n}"), dims, true);
        Ok(Self {
            norm1: Norm::load(p, &format!("{prefix}.norm1"), d, cfg.norm_eps)?,
            qkv: lin("attn.qkv", (d, 3 * d))?,
            proj: lin("attn.proj", (d, d))?,
            ls1: ls("ls1")?,
            norm2: Norm::load(p, &format!("{prefix}.norm2"), d, cfg.norm_eps)?,
            fc1: lin("mlp.fc1", (d, h))?,
            fc2: lin("mlp.fc2", (h, d))?,
            ls2: ls("ls2")?,
            num_heads: cfg.num_heads,
        })
    }

    fn attention(&self, p: &ParamStore, x: &Tensor) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let hd = c / self.num_heads;
        let qkv = self
            .qkv
            .forward(p, x)?
            .reshape((b, n, 3, self.num_heads, hd))?
            .permute((2, 0, 3, 1, 4))?;
        let q = (qkv.i(0)?.contiguous()? * (hd as f64).powf(-0.5))?;
        let k = qkv.i(1)?.contiguous()?;
        let v = qkv.i(2)?.contiguous()?;
        let attn = softmax_last(&q.matmul(&k.t()?)?)?;
        let out = attn.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?;
        self.proj.forward(p, &out)
    }

    fn forward(&self, p: &ParamStore, x: &Tensor) -> Result<Tensor> {
        let a = self.attention(p, &self.norm1.forward(x)?)?;
        let a = match &self.ls1 {
            Some(g) => a.broadcast_mul(g)?,
            None => a,
        };
        let x = (x + a)?;
        let h = self.fc1.forward(p, &self.norm2.forward(&x)?)?.gelu_erf()?;
        let m = self.fc2.forward(p, &h)?;
        let m = match &self.ls2 {
            Some(g) => m.broadcast_mul(g)?,
            None => m,
        };
        Ok((x + m)?)
    }
}

/// One vision tower, truncated after the block whose output OpenVLA uses.
#[derive(Debug, Clone)]
pub struct VisionTower {
    cfg: TowerConfig,
    /// `patch_embed.proj` (`[D, 3, p, p]`), applied as a Linear over flattened patches.
    patch_embed: Linear,
    cls_token: Option<Tensor>,
    reg_token: Option<Tensor>,
    pos_embed: Tensor,
    blocks: Vec<Block>,
}

impl VisionTower {
    /// Reads the tower under `prefix` (`vision_backbone.featurizer`, ...).
    pub fn load(p: &ParamStore, prefix: &str, cfg: &TowerConfig) -> Result<Self> {
        let d = cfg.embed_dim;
        let ps = cfg.patch_size;
        let name = format!("{prefix}.patch_embed.proj");
        let w = p.get(&format!("{name}.weight"), &[d, 3, ps, ps])?;
        let patch_embed = Linear {
            name,
            weight: w,
            bias: Some(p.get(&format!("{prefix}.patch_embed.proj.bias"), &[d])?),
        };
        let cls_token = if cfg.class_token {
            Some(p.get(&format!("{prefix}.cls_token"), &[1, 1, d])?)
        } else {
            None
        };
        let reg_token = if cfg.reg_tokens > 0 {
            Some(p.get(&format!("{prefix}.reg_token"), &[1, cfg.reg_tokens, d])?)
        } else {
            None
        };
        let pos_embed = p.get(&format!("{prefix}.pos_embed"), &[1, cfg.num_patches(), d])?;
        let blocks = (0..=cfg.selected_block())
            .map(|i| Block::load(p, &format!("{prefix}.blocks.{i}"), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            patch_embed,
            cls_token,
            reg_token,
            pos_embed,
            blocks,
        })
    }

    /// `pixels [B, 3, H, W]` -> patch features `[B, num_patches, D]` of block `len - 2`.
    pub fn forward(&self, p: &ParamStore, pixels: &Tensor) -> Result<Tensor> {
        let mut x = self.stem(p, pixels)?;
        for i in 0..self.blocks.len() {
            x = self.block(p, i, &x)?;
        }
        self.patch_features(&x)
    }

    /// Number of blocks run (up to and including the selected one).
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Block `i` over the token sequence `x [B, N, D]`.
    pub fn block(&self, p: &ParamStore, i: usize, x: &Tensor) -> Result<Tensor> {
        let b = self.blocks.get(i).ok_or_else(|| {
            crate::error::TrainError::Invalid(format!(
                "no vision block {i} (the tower runs {})",
                self.blocks.len()
            ))
        })?;
        b.forward(p, x)
    }

    /// The selected block's output with the prefix (class, register) tokens dropped.
    pub fn patch_features(&self, x: &Tensor) -> Result<Tensor> {
        let n = x.dim(1)?;
        let np = self.cfg.num_prefix_tokens();
        Ok(x.narrow(D::Minus2, np, n - np)?)
    }

    /// Patch embedding (with its LoRA branch), position embedding and prefix tokens: the
    /// token sequence `[B, N, D]` the first block reads.
    pub fn stem(&self, p: &ParamStore, pixels: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixels.dims4()?;
        let ps = self.cfg.patch_size;
        let (gh, gw) = (h / ps, w / ps);
        let d = self.cfg.embed_dim;
        // The convolution (kernel = stride = patch) as a product over flattened patches.
        let patches = pixels
            .reshape((b, c, gh, ps, gw, ps))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, gh * gw, c * ps * ps))?;
        let w = self.patch_embed.weight.reshape((d, c * ps * ps))?;
        let mut x = super::ops::linear(&patches, &w, self.patch_embed.bias.as_ref())?;
        if let Some(l) = p.lora(&self.patch_embed.name) {
            // The LoRA branch of the Conv2d runs on the image: [B, D, gh, gw] -> [B, P, D].
            let delta = l.forward_delta(pixels)?.flatten_from(2)?.transpose(1, 2)?;
            x = (x + delta)?;
        }
        let mut x = x.broadcast_add(&self.pos_embed)?;
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
}
