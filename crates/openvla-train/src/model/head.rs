//! The OpenVLA-OFT modules outside the VLA, for training: the MLPResNet L1 action head and the
//! proprio projector. The modules are the inference crate's own (`openvla::head::MlpResNet`,
//! `openvla::oft::proprio::ProprioProjector`) on the differentiable backend ([`Train`]); here
//! are their float32 `Var`s, fresh or read from a checkpoint.
//!
//! Tensor names are the reference's `state_dict` keys without DDP's `module.` prefix
//! (`model.fc1.weight`, `fc1.weight`, ...), so a head read from a published
//! `action_head--<step>_checkpoint.pt` ([`openvla::oft::pt::StateDict`]) trains on and is
//! written back under the same names.
//!
//! A fresh module is initialized as PyTorch initializes the reference's modules (`nn.Linear`:
//! weight and bias uniform in `±1/sqrt(fan_in)`; `nn.LayerNorm`: weight 1, bias 0), from the
//! run's seed.

use super::backend::{to_model, Train};
use super::ops::{linear, Linear};
use crate::error::{Result, TrainError};
use crate::lora::NoAdapters;
use crate::rng::TrainRng;
use candle_core::{DType, Device, Tensor, Var};
use openvla::head::MlpResNet;
use openvla::init::{oft_head_tensors, proprio_projector_tensors};
use openvla::model::backend::ParamSource;
use openvla::model::linear::LayerKind;
use openvla::oft::proprio::ProprioProjector;
use openvla::oft::pt::StateDict;

/// Residual blocks of the reference's L1 head (`L1RegressionActionHead`: `num_blocks=2`).
pub use openvla::init::OFT_HEAD_BLOCKS as L1_HEAD_BLOCKS;

/// Number of elements of a tensor list.
fn count(tensors: &[(String, Vec<usize>)]) -> usize {
    tensors
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum()
}

/// Parameters of an L1 head for LLM width `llm_dim` and action dimension `action_dim`.
pub fn l1_head_param_count(llm_dim: usize, action_dim: usize) -> usize {
    count(&oft_head_tensors(llm_dim, action_dim, L1_HEAD_BLOCKS))
}

/// Parameters of a proprio projector from `proprio_dim` to `llm_dim`.
pub fn proprio_projector_param_count(proprio_dim: usize, llm_dim: usize) -> usize {
    count(&proprio_projector_tensors(proprio_dim, llm_dim))
}

/// Named float32 parameters of a module, in `state_dict` order.
#[derive(Debug, Clone)]
struct Named(Vec<(String, Var)>);

impl Named {
    fn get(&self, name: &str) -> Result<&Tensor> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_tensor())
            .ok_or_else(|| TrainError::Invalid(format!("missing head parameter {name}")))
    }

    /// Fresh parameters for `tensors` (names and shapes, in `state_dict` order) as PyTorch
    /// initializes them: a module with a 2-D weight is an `nn.Linear` (weight, then bias,
    /// uniform in `±1/sqrt(fan_in)`), any other is an `nn.LayerNorm` (weight 1, bias 0).
    fn fresh(tensors: &[(String, Vec<usize>)], rng: &mut TrainRng) -> Result<Named> {
        let fan_in = |module: &str| {
            tensors
                .iter()
                .find(|(n, s)| s.len() == 2 && n.strip_suffix(".weight") == Some(module))
                .map(|(_, s)| s[1])
        };
        let mut out = Vec::with_capacity(tensors.len());
        for (name, shape) in tensors {
            let (module, is_weight) = match name.strip_suffix(".weight") {
                Some(m) => (m, true),
                None => (name.strip_suffix(".bias").unwrap_or(name), false),
            };
            let n: usize = shape.iter().product();
            let values: Vec<f32> = match fan_in(module) {
                Some(fin) => {
                    let bound = 1.0 / (fin as f64).sqrt();
                    (0..n)
                        .map(|_| ((2.0 * rng.next_f64() - 1.0) * bound) as f32)
                        .collect()
                }
                None => vec![if is_weight { 1.0 } else { 0.0 }; n],
            };
            out.push((
                name.clone(),
                Var::from_vec(values, shape.as_slice(), &Device::Cpu)?,
            ));
        }
        Ok(Named(out))
    }

    /// Float32 `Var`s of every tensor of `sd`, whose names must be exactly `expected`
    /// (in that order) with the shapes that `fresh` has.
    fn from_state_dict(sd: &StateDict, tensors: &[(String, Vec<usize>)]) -> Result<Named> {
        let have: Vec<&str> = sd.names().collect();
        let want: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
        let mut sorted_want = want.clone();
        sorted_want.sort_unstable();
        if have != sorted_want {
            return Err(TrainError::checkpoint(
                sd.path(),
                format!(
                    "holds the tensors [{}], expected [{}]",
                    have.join(", "),
                    want.join(", ")
                ),
            ));
        }
        let mut out = Vec::with_capacity(tensors.len());
        for (name, shape) in tensors {
            let t = sd.get_shaped(name, shape).map_err(|e| {
                TrainError::checkpoint(sd.path(), format!("{e} (for this model and data)"))
            })?;
            out.push((name.clone(), Var::from_tensor(&t.to_dtype(DType::F32)?)?));
        }
        Ok(Named(out))
    }
}

impl ParamSource<Train> for Named {
    fn tensor(&self, name: &str, shape: &[usize]) -> openvla::Result<Tensor> {
        let t = self.get(name).map_err(to_model)?;
        if t.dims() != shape {
            return Err(openvla::Error::InvalidInput(format!(
                "head parameter {name} is {:?}, expected {shape:?}",
                t.dims()
            )));
        }
        Ok(t.clone())
    }

    fn linear(
        &self,
        prefix: &str,
        (fin, fout): (usize, usize),
        bias: bool,
        _kind: LayerKind,
    ) -> openvla::Result<Linear> {
        Linear::load(self, prefix, (fin, fout), bias)
    }
}

/// OFT's `L1RegressionActionHead`: MLPResNet `LayerNorm(D·H) → fc1 → ReLU → blocks of
/// x + ReLU(Linear(LayerNorm(x))) → LayerNorm → fc2`, mapping `[B, K, D·H]` to the normalized
/// chunk `[B, K, D]`.
#[derive(Debug, Clone)]
pub struct L1HeadTrain {
    params: Named,
    head: MlpResNet<Train>,
}

impl L1HeadTrain {
    fn check_dims(llm_dim: usize, action_dim: usize) -> Result<()> {
        if llm_dim == 0 || action_dim == 0 {
            return Err(TrainError::Invalid(format!(
                "an L1 head needs a positive LLM width and action dimension, got {llm_dim} and \
                 {action_dim}"
            )));
        }
        Ok(())
    }

    fn new(params: Named, llm_dim: usize, action_dim: usize) -> Result<Self> {
        let dims = (llm_dim * action_dim, llm_dim, action_dim);
        Ok(Self {
            head: MlpResNet::load_with(&params, dims, L1_HEAD_BLOCKS)?,
            params,
        })
    }

    /// The names and shapes of a head for `llm_dim` and `action_dim`, freshly initialized.
    pub fn init(llm_dim: usize, action_dim: usize, rng: &mut TrainRng) -> Result<Self> {
        Self::check_dims(llm_dim, action_dim)?;
        let tensors = oft_head_tensors(llm_dim, action_dim, L1_HEAD_BLOCKS);
        Self::new(Named::fresh(&tensors, rng)?, llm_dim, action_dim)
    }

    /// The head of a checkpoint's `action_head--*.pt` (keys without `module.`), checked to
    /// have exactly the tensors and shapes of a head for `llm_dim` and `action_dim`.
    pub fn from_state_dict(sd: &StateDict, llm_dim: usize, action_dim: usize) -> Result<Self> {
        Self::check_dims(llm_dim, action_dim)?;
        let tensors = oft_head_tensors(llm_dim, action_dim, L1_HEAD_BLOCKS);
        Self::new(Named::from_state_dict(sd, &tensors)?, llm_dim, action_dim)
    }

    /// The action dimension D.
    pub fn action_dim(&self) -> usize {
        self.head.action_dim()
    }

    /// The parameters by `state_dict` name (without `module.`).
    pub fn named_parameters(&self) -> Vec<(String, Var)> {
        self.params.0.clone()
    }

    /// `x [B, K, D·H]` → normalized actions `[B, K, D]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let want = self.head.input_dim();
        if x.rank() != 3 || x.dim(2)? != want {
            return Err(TrainError::Invalid(format!(
                "action head input is {:?}; the head expects [B, K, {want}]",
                x.dims()
            )));
        }
        Ok(self.head.forward_with(&NoAdapters, x)?)
    }
}

/// The auxiliary environment-state head (`openvla finetune --aux-environment-state`): one
/// linear map `fc` from the mean over the chunk's rows of the action head's input
/// (`[B, K, D·H]` → `[B, D·H]`) to the normalized environment state `[B, E]` (object and goal
/// positions). It trains beside the action head on privileged simulator labels so that the
/// features the action head reads must locate the scene's objects; it is not part of the
/// exported policy. Initialized as an `nn.Linear`.
#[derive(Debug, Clone)]
pub struct AuxHeadTrain {
    params: Named,
}

/// The tensors of an auxiliary head from `input_dim` (D·H) to `state_dim` (E).
fn aux_head_tensors(input_dim: usize, state_dim: usize) -> Vec<(String, Vec<usize>)> {
    vec![
        ("fc.weight".to_string(), vec![state_dim, input_dim]),
        ("fc.bias".to_string(), vec![state_dim]),
    ]
}

/// Parameters of an auxiliary head from `input_dim` (D·H) to `state_dim` (E).
pub fn aux_head_param_count(input_dim: usize, state_dim: usize) -> usize {
    count(&aux_head_tensors(input_dim, state_dim))
}

impl AuxHeadTrain {
    /// A fresh head from the action head's input width `input_dim` (D·H) to `state_dim` (E).
    pub fn init(input_dim: usize, state_dim: usize, rng: &mut TrainRng) -> Result<Self> {
        if input_dim == 0 || state_dim == 0 {
            return Err(TrainError::Invalid(format!(
                "an auxiliary head needs positive input and state widths, got {input_dim} and \
                 {state_dim}"
            )));
        }
        Ok(Self {
            params: Named::fresh(&aux_head_tensors(input_dim, state_dim), rng)?,
        })
    }

    fn weight(&self) -> Result<&Tensor> {
        self.params.get("fc.weight")
    }

    /// The environment-state width E.
    pub fn state_dim(&self) -> Result<usize> {
        Ok(self.weight()?.dim(0)?)
    }

    /// The parameters by name (`fc.weight`, `fc.bias`).
    pub fn named_parameters(&self) -> Vec<(String, Var)> {
        self.params.0.clone()
    }

    /// `x [B, K, D·H]` (the action head's input) → the predicted normalized state `[B, E]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.weight()?;
        let input_dim = w.dim(1)?;
        if x.rank() != 3 || x.dim(2)? != input_dim {
            return Err(TrainError::Invalid(format!(
                "auxiliary head input is {:?}; the head expects [B, K, {input_dim}]",
                x.dims()
            )));
        }
        linear(&x.mean(1)?, w, Some(self.params.get("fc.bias")?))
    }
}

/// OFT's `ProprioProjector`: `fc1 (P → H) → GELU (exact) → fc2 (H → H)`, one token per sample.
#[derive(Debug, Clone)]
pub struct ProprioProjectorTrain {
    params: Named,
    projector: ProprioProjector<Train>,
}

impl ProprioProjectorTrain {
    fn check_dims(proprio_dim: usize) -> Result<()> {
        if proprio_dim == 0 {
            return Err(TrainError::Invalid(
                "the proprio state has no dimensions".into(),
            ));
        }
        Ok(())
    }

    fn new(params: Named, proprio_dim: usize, llm_dim: usize) -> Result<Self> {
        Ok(Self {
            projector: ProprioProjector::load_with(&params, proprio_dim, llm_dim)?,
            params,
        })
    }

    /// A fresh projector from `proprio_dim` to `llm_dim`.
    pub fn init(proprio_dim: usize, llm_dim: usize, rng: &mut TrainRng) -> Result<Self> {
        Self::check_dims(proprio_dim)?;
        let tensors = proprio_projector_tensors(proprio_dim, llm_dim);
        Self::new(Named::fresh(&tensors, rng)?, proprio_dim, llm_dim)
    }

    /// The projector of a checkpoint's `proprio_projector--*.pt`, checked against the shapes.
    pub fn from_state_dict(sd: &StateDict, proprio_dim: usize, llm_dim: usize) -> Result<Self> {
        Self::check_dims(proprio_dim)?;
        let tensors = proprio_projector_tensors(proprio_dim, llm_dim);
        Self::new(Named::from_state_dict(sd, &tensors)?, proprio_dim, llm_dim)
    }

    /// The input width.
    pub fn proprio_dim(&self) -> usize {
        self.projector.proprio_dim()
    }

    /// The parameters by `state_dict` name.
    pub fn named_parameters(&self) -> Vec<(String, Var)> {
        self.params.0.clone()
    }

    /// Normalized proprio `[B, P]` → one token per sample `[B, 1, H]`.
    pub fn forward(&self, proprio: &Tensor) -> Result<Tensor> {
        Ok(self.projector.forward_with(&NoAdapters, proprio)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_modules_follow_pytorch_defaults() {
        let mut rng = TrainRng::new(3);
        let head = L1HeadTrain::init(8, 3, &mut rng).unwrap();
        let names: Vec<String> = head.named_parameters().into_iter().map(|p| p.0).collect();
        assert_eq!(names.len(), 8 + 4 * L1_HEAD_BLOCKS, "{names:?}");
        for (n, v) in head.named_parameters() {
            let x: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            if n.contains("layer_norm") || n.ends_with("ffn.0.weight") || n.ends_with("ffn.0.bias")
            {
                let want = if n.ends_with("weight") { 1.0 } else { 0.0 };
                assert!(x.iter().all(|&v| v == want), "{n}");
            } else {
                let fin = if n.starts_with("model.fc1") {
                    24.0f32
                } else {
                    8.0
                };
                let bound = 1.0 / fin.sqrt();
                assert!(x.iter().all(|v| v.abs() <= bound), "{n}");
                // Not degenerate: spread over the interval.
                let max = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert!(max > 0.5 * bound, "{n}: max {max} of bound {bound}");
            }
        }
        let y = head
            .forward(&Tensor::ones((2, 5, 24), DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(y.dims(), [2, 5, 3]);
        let err = head
            .forward(&Tensor::ones((2, 5, 23), DType::F32, &Device::Cpu).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("[B, K, 24]"), "{err}");
        let count = |p: Vec<(String, Var)>| p.iter().map(|(_, v)| v.elem_count()).sum::<usize>();
        // layer_norm1 2·24, fc1 24·8+8, 2 blocks of (2·8 + 8·8+8), layer_norm2 2·8, fc2 8·3+3.
        assert_eq!(count(head.named_parameters()), 467);
        assert_eq!(l1_head_param_count(8, 3), 467);
        let proj = ProprioProjectorTrain::init(4, 8, &mut rng).unwrap();
        // fc1 4·8+8, fc2 8·8+8.
        assert_eq!(count(proj.named_parameters()), 112);
        assert_eq!(proprio_projector_param_count(4, 8), 112);
        let t = proj
            .forward(&Tensor::ones((2, 4), DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(t.dims(), [2, 1, 8]);
    }
}
