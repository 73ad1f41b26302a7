//! Per-block gradient checkpointing (`openvla finetune --checkpointing`).
//!
//! candle keeps the whole forward graph alive until `backward` returns, so a plain step holds
//! every intermediate of every block at once. Here a stack of blocks runs forward on detached
//! inputs, keeping only each block's input ([`Tape`]); the graph of a block is dropped as soon as
//! the next one starts. The backward is then driven block by block, from the last one down
//! ([`backward_blocks`]): each block is recomputed from its saved input (made a leaf `Var`), and
//! `sum(y * dL/dy)` is back-propagated through it, which gives the gradient of the block's
//! input (passed to the block below) and of its parameters (gathered into [`Grads`]). Only one
//! block's graph is alive at a time.
//!
//! The recomputation is the same function on the same input, so gradients equal a plain
//! backward's up to the order in which a parameter's contributions are summed. LoRA dropout
//! draws the same masks: every block's dropout streams are saved before its forward and
//! restored before its recomputation.

use crate::error::Result;
use crate::lora::LoraLayer;
use crate::rng::TrainRng;
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, TensorId, Var};
use std::collections::HashMap;
use std::sync::Arc;

/// Gradients of trainable parameters, by tensor, summed over the partial backward passes of a
/// step.
#[derive(Debug, Default)]
pub struct Grads {
    map: HashMap<TensorId, Tensor>,
}

impl Grads {
    /// No gradients yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the gradients that `store` holds for `params` (as float32).
    pub fn absorb(&mut self, store: &GradStore, params: &[Var]) -> Result<()> {
        for v in params {
            if let Some(g) = store.get(v.as_tensor()) {
                let g = g.to_dtype(DType::F32)?;
                let id = v.as_tensor().id();
                let sum = match self.map.remove(&id) {
                    Some(a) => (a + g)?,
                    None => g,
                };
                self.map.insert(id, sum);
            }
        }
        Ok(())
    }

    /// The gradient of `v`, if any pass reached it.
    pub fn get(&self, v: &Var) -> Option<&Tensor> {
        self.map.get(&v.as_tensor().id())
    }
}

/// What a checkpointed forward keeps: each block's input, and the dropout streams of the LoRA
/// branches as they were before each block ran.
#[derive(Debug, Default)]
pub struct Tape {
    inputs: Vec<Tensor>,
    rng: Vec<Vec<TrainRng>>,
}

impl Tape {
    /// Number of blocks recorded.
    pub fn len(&self) -> usize {
        self.inputs.len()
    }

    /// Whether no block was recorded.
    pub fn is_empty(&self) -> bool {
        self.inputs.is_empty()
    }
}

fn save_rng(lora: &[Arc<LoraLayer>]) -> Result<Vec<TrainRng>> {
    lora.iter().map(|l| l.rng_state()).collect()
}

fn restore_rng(lora: &[Arc<LoraLayer>], states: &[TrainRng]) -> Result<()> {
    for (l, s) in lora.iter().zip(states) {
        l.set_rng_state(s.clone())?;
    }
    Ok(())
}

/// Runs blocks `0..n` over `x` without keeping their graphs: `block(i, h)` is block `i`.
/// Returns the last block's output (detached) and the tape for [`backward_blocks`].
pub fn forward_blocks(
    x: &Tensor,
    n: usize,
    lora: &[Arc<LoraLayer>],
    block: &dyn Fn(usize, &Tensor) -> Result<Tensor>,
) -> Result<(Tensor, Tape)> {
    let mut tape = Tape::default();
    let mut h = x.detach();
    for i in 0..n {
        tape.rng.push(save_rng(lora)?);
        tape.inputs.push(h.clone());
        h = block(i, &h)?.detach();
    }
    Ok((h, tape))
}

/// The backward of a [`forward_blocks`] run, given `g_out`, the gradient of the loss with
/// respect to the last block's output. Parameter gradients go into `grads`; the gradient with
/// respect to the first block's input is returned (zeros if nothing depends on it).
pub fn backward_blocks(
    tape: &Tape,
    g_out: &Tensor,
    lora: &[Arc<LoraLayer>],
    block: &dyn Fn(usize, &Tensor) -> Result<Tensor>,
    params: &[Var],
    grads: &mut Grads,
) -> Result<Tensor> {
    let mut g = g_out.detach();
    for i in (0..tape.inputs.len()).rev() {
        restore_rng(lora, &tape.rng[i])?;
        let x = Var::from_tensor(&tape.inputs[i])?;
        let y = block(i, x.as_tensor())?;
        let store = backward_through(&y, &g)?;
        grads.absorb(&store, params)?;
        g = match store.get(x.as_tensor()) {
            Some(gx) => gx.detach(),
            None => x.as_tensor().zeros_like()?,
        };
    }
    Ok(g)
}

/// Back-propagates the upstream gradient `g` (same shape as `y`) through `y`'s graph: the
/// backward of `sum(y * g)` with `g` held constant.
pub fn backward_through(y: &Tensor, g: &Tensor) -> Result<GradStore> {
    let g = g.detach().to_dtype(y.dtype())?;
    Ok((y * g)?.sum_all()?.backward()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn blockwise_backward_equals_the_plain_one() {
        // y = tanh(W2 tanh(W1 x)) with W1, W2 trainable; loss = sum(y^2).
        let dev = Device::Cpu;
        let x = Tensor::new(&[[0.3f32, -1.2, 0.7], [1.1, 0.2, -0.4]], &dev).unwrap();
        let w1 = Var::from_tensor(
            &Tensor::new(
                &[[0.5f32, -0.3, 0.8], [0.1, 0.9, -0.6], [-0.7, 0.2, 0.4]],
                &dev,
            )
            .unwrap(),
        )
        .unwrap();
        let w2 = Var::from_tensor(
            &Tensor::new(
                &[[0.2f32, 0.6, -0.1], [-0.5, 0.3, 0.7], [0.9, -0.2, 0.1]],
                &dev,
            )
            .unwrap(),
        )
        .unwrap();
        let ws = [w1.clone(), w2.clone()];
        let block = |i: usize, h: &Tensor| -> Result<Tensor> {
            Ok(h.matmul(&ws[i].as_tensor().t()?)?.tanh()?)
        };
        let loss = |y: &Tensor| -> Result<Tensor> { Ok(y.sqr()?.sum_all()?) };

        let plain = loss(&block(1, &block(0, &x).unwrap()).unwrap())
            .unwrap()
            .backward()
            .unwrap();

        let (out, tape) = forward_blocks(&x, 2, &[], &block).unwrap();
        assert_eq!(tape.len(), 2);
        let top = Var::from_tensor(&out).unwrap();
        let store = loss(top.as_tensor()).unwrap().backward().unwrap();
        let g = store.get(top.as_tensor()).unwrap().clone();
        let mut grads = Grads::new();
        backward_blocks(&tape, &g, &[], &block, &ws, &mut grads).unwrap();
        for w in &ws {
            let a = plain.get(w.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
            let b = grads.get(w).unwrap().to_vec2::<f32>().unwrap();
            for (ra, rb) in a.iter().zip(&b) {
                for (p, q) in ra.iter().zip(rb) {
                    assert!((p - q).abs() <= 1e-6 * p.abs().max(1.0), "{p} vs {q}");
                }
            }
        }
    }
}
