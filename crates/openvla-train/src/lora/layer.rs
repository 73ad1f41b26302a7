//! The LoRA branch of a wrapped layer, differentiable: PEFT's
//! `result = base(x) + lora_B(lora_A(dropout(x))) * scaling`.
//!
//! The model adds [`LoraLayer::forward_delta`] to its base Linear's output (or, for the
//! patch-embed Conv2d, to the convolution's output). The branch runs in float32 (the LoRA
//! weights' dtype, as PEFT casts `x` to `lora_A.weight.dtype`) and is cast back to `x`'s dtype.

use super::adapter::LoraWeights;
use super::targets::ModuleKind;
use crate::error::{Result, TrainError};
use crate::model::ops::linear;
use crate::rng::TrainRng;
use candle_core::{DType, Tensor};
use std::sync::Mutex;

/// The LoRA branch of one module.
#[derive(Debug)]
pub struct LoraLayer {
    /// A and B.
    pub weights: LoraWeights,
    /// `alpha / r`.
    pub scaling: f64,
    /// Dropout probability on the branch input (training only).
    pub dropout: f64,
    /// Convolution stride (the patch size) for a Conv2d module.
    pub stride: usize,
    /// Whether dropout is active.
    pub training: bool,
    rng: Mutex<TrainRng>,
}

impl LoraLayer {
    /// A branch with `weights`; `seed` drives the dropout masks.
    pub fn new(weights: LoraWeights, scaling: f64, dropout: f64, stride: usize, seed: u64) -> Self {
        Self {
            weights,
            scaling,
            dropout,
            stride: stride.max(1),
            training: true,
            rng: Mutex::new(TrainRng::new(seed)),
        }
    }

    /// Restarts the dropout stream (the trainer reseeds every step from the run's RNG, so a
    /// resumed run draws the same masks).
    pub fn reseed(&self, seed: u64) -> Result<()> {
        let mut rng = self
            .rng
            .lock()
            .map_err(|_| TrainError::Invalid("LoRA dropout RNG poisoned".into()))?;
        *rng = TrainRng::new(seed);
        Ok(())
    }

    /// The dropout stream's current state (saved by gradient checkpointing, so that a
    /// recomputed block draws the masks its forward drew).
    pub fn rng_state(&self) -> Result<TrainRng> {
        Ok(self
            .rng
            .lock()
            .map_err(|_| TrainError::Invalid("LoRA dropout RNG poisoned".into()))?
            .clone())
    }

    /// Puts the dropout stream back to a state from [`LoraLayer::rng_state`].
    pub fn set_rng_state(&self, state: TrainRng) -> Result<()> {
        *self
            .rng
            .lock()
            .map_err(|_| TrainError::Invalid("LoRA dropout RNG poisoned".into()))? = state;
        Ok(())
    }

    fn dropout(&self, x: &Tensor) -> Result<Tensor> {
        if !self.training || self.dropout <= 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 - self.dropout;
        let n = x.elem_count();
        let mut rng = self
            .rng
            .lock()
            .map_err(|_| TrainError::Invalid("LoRA dropout RNG poisoned".into()))?;
        let mask: Vec<f32> = (0..n)
            .map(|_| {
                if rng.next_f64() < keep {
                    (1.0 / keep) as f32
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        Ok(x.mul(&mask)?)
    }

    /// The branch output for input `x` (`[..., in]` for a Linear, `[B, C, H, W]` for a Conv2d).
    pub fn forward_delta(&self, x: &Tensor) -> Result<Tensor> {
        let out_dtype = x.dtype();
        let x = self.dropout(&x.to_dtype(DType::F32)?)?;
        let a = self.weights.a.as_tensor();
        let b = self.weights.b.as_tensor();
        let y = match self.weights.kind {
            ModuleKind::Conv2d => {
                let h = x.conv2d(a, 0, self.stride, 1, 1)?;
                (h.conv2d(b, 0, 1, 1, 1)? * self.scaling)?
            }
            _ => {
                // Two fused linears (one graph node each, dA and dB without transposed
                // copies); the scaling applied to the rank-r middle, not the wide output.
                let h = (linear(&x, a, None)? * self.scaling)?;
                linear(&h, b, None)?
            }
        };
        Ok(y.to_dtype(out_dtype)?)
    }
}
