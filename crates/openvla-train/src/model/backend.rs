//! [`Train`]: the training implementation of the model definition's [`Backend`]
//! (`openvla::model::backend`). The towers, backbone, projector, decoder layers, OFT head and
//! proprio projector are `openvla`'s own (`VisionBackbone<Train>`, `Projector<Train>`,
//! `DecoderLayer<Train>`, `MlpResNet<Train>`, `ProprioProjector<Train>`; docs/model.md); here
//! are only the operations that differ from
//! inference: float32 `Var`s and frozen weights with their LoRA branches looked up in the
//! [`ParamStore`] ([`Adapters`]), and ops that record a backward (the fused ops of [`super::fused`]).

use super::ops::{self, Linear};
use super::params::ParamStore;
use crate::error::TrainError;
use crate::lora::Adapters;
use candle_core::{IndexOp, Tensor};
use openvla::model::backend::{Backend, ParamSource};
use openvla::model::linear::LayerKind;

/// The differentiable backend: every op records a backward in candle.
#[derive(Debug, Clone, Copy, Default)]
pub struct Train;

/// A training error as the model definition's error (`openvla::Error`); a model error comes
/// back unchanged.
pub(crate) fn to_model(e: TrainError) -> openvla::Error {
    match e {
        TrainError::Model(e) => e,
        TrainError::Candle(e) => openvla::Error::Candle(e),
        TrainError::Checkpoint { path, message } => openvla::Error::Checkpoint { path, message },
        TrainError::Invalid(s) => openvla::Error::InvalidInput(s),
        other => openvla::Error::InvalidInput(other.to_string()),
    }
}

impl Backend for Train {
    type Linear = Linear;
    type Ctx = dyn Adapters;

    fn linear(p: &Self::Ctx, layer: &Linear, x: &Tensor) -> openvla::Result<Tensor> {
        layer.forward(p, x).map_err(to_model)
    }

    fn patch_embed(
        p: &Self::Ctx,
        layer: &Linear,
        pixels: &Tensor,
        patches: &Tensor,
    ) -> openvla::Result<Tensor> {
        let d = layer.weight.dim(0)?;
        let w = layer.weight.reshape((d, patches.dim(2)?))?;
        let x = ops::linear(patches, &w, layer.bias.as_ref()).map_err(to_model)?;
        match p.lora(&layer.name) {
            // The LoRA branch of the Conv2d runs on the image: [B, D, gh, gw] -> [B, P, D].
            Some(l) => {
                let delta = l
                    .forward_delta(pixels)
                    .map_err(to_model)?
                    .flatten_from(2)?
                    .transpose(1, 2)?;
                Ok((x + delta)?)
            }
            None => Ok(x),
        }
    }

    type Group<const N: usize> = [Linear; N];

    fn group<const N: usize>(layers: [Linear; N]) -> openvla::Result<[Linear; N]> {
        Ok(layers)
    }

    fn linear_group<const N: usize>(
        p: &Self::Ctx,
        group: &[Linear; N],
        x: &Tensor,
        _rowwise: bool,
    ) -> openvla::Result<[Tensor; N]> {
        let out = group
            .iter()
            .map(|l| Self::linear(p, l, x))
            .collect::<openvla::Result<Vec<_>>>()?;
        out.try_into()
            .map_err(|_| openvla::Error::InvalidInput("linear group arity".into()))
    }

    fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> openvla::Result<Tensor> {
        ops::rms_norm(x, w, eps).map_err(to_model)
    }

    fn silu_mul(gate: &Tensor, up: &Tensor) -> openvla::Result<Tensor> {
        ops::silu_mul(gate, up).map_err(to_model)
    }

    fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> openvla::Result<Tensor> {
        ops::layer_norm(x, w, b, eps).map_err(to_model)
    }

    fn gelu_erf(x: &Tensor) -> openvla::Result<Tensor> {
        ops::gelu_erf(x).map_err(to_model)
    }

    fn vit_attention(_: &Linear, qkv: &Tensor, num_heads: usize) -> openvla::Result<Tensor> {
        let (b, n, c3) = qkv.dims3()?;
        let c = c3 / 3;
        let hd = c / num_heads;
        let qkv = qkv
            .reshape((b, n, 3, num_heads, hd))?
            .permute((2, 0, 3, 1, 4))?;
        let scale = (hd as f64).powf(-0.5) as f32;
        let out = super::attention::attention(&qkv.i(0)?, &qkv.i(1)?, &qkv.i(2)?, None, scale)
            .map_err(to_model)?;
        Ok(out.transpose(1, 2)?.reshape((b, n, c))?)
    }
}

impl Linear {
    /// Reads `{name}.weight` (`[out, in]`) and, with `bias`, `{name}.bias` from `src` (the
    /// model's [`ParamStore`], or a head's named parameters).
    pub fn load(
        src: &dyn ParamSource<Train>,
        name: &str,
        (fin, fout): (usize, usize),
        bias: bool,
    ) -> openvla::Result<Self> {
        Ok(Self {
            name: name.to_string(),
            weight: src.tensor(&format!("{name}.weight"), &[fout, fin])?,
            bias: if bias {
                Some(src.tensor(&format!("{name}.bias"), &[fout])?)
            } else {
                None
            },
        })
    }
}

impl ParamSource<Train> for ParamStore {
    fn tensor(&self, name: &str, shape: &[usize]) -> openvla::Result<Tensor> {
        self.get(name, shape).map_err(to_model)
    }

    fn linear(
        &self,
        prefix: &str,
        dims: (usize, usize),
        bias: bool,
        _kind: LayerKind,
    ) -> openvla::Result<Linear> {
        Linear::load(self, prefix, dims, bias)
    }

    fn patch_embed(&self, prefix: &str, dim: usize, patch: usize) -> openvla::Result<Linear> {
        Ok(Linear {
            name: prefix.to_string(),
            weight: self.tensor(&format!("{prefix}.weight"), &[dim, 3, patch, patch])?,
            bias: Some(self.tensor(&format!("{prefix}.bias"), &[dim])?),
        })
    }
}
