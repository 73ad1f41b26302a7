//! The action head seam: what turns the language model's output into a chunk of normalized
//! actions `[K][D]`.
//!
//! The towers, projector and Llama are shared by every family; a head decides how the LLM is
//! run (autoregressive decoding with a KV cache, or one bidirectional pass over placeholder
//! positions) and how its output becomes actions. A new head (FAST tokens, diffusion, flow) is
//! one more variant here, without touching the towers or the LLM.
//!
//! - [`ActionHead::Autoregressive256`]: OpenVLA's 256-bin tokens, one token per dimension,
//!   greedy decoding (a chunk of one).
//! - [`ActionHead::ParallelL1`]: OpenVLA-OFT's MLPResNet L1-regression head over the hidden
//!   states of the shifted placeholder window (oft-spec §2.5-2.6).
//! - [`ActionHead::ParallelDiscrete`]: OFT's parallel decoding with 256-bin tokens: the argmax
//!   of the logits over the same shifted window (oft-spec §4.1).

use crate::action::ActionTokenizer;
use crate::error::{Error, Result};
use crate::model::backend::{Backend, Infer, ParamSource};
use crate::model::linear::LayerKind;
use crate::oft::pt::{StateDict, StateDictSource};
use candle_core::{DType, Tensor};

/// LayerNorm epsilon of the MLPResNet head (`nn.LayerNorm` default).
pub const LAYER_NORM_EPS: f32 = 1e-5;

/// Which head a model runs.
#[derive(Debug, Clone)]
pub enum ActionHead {
    /// OpenVLA: one 256-bin token per action dimension, decoded autoregressively.
    Autoregressive256(ActionTokenizer),
    /// OFT: L1-regression MLPResNet over the placeholder window.
    ParallelL1(MlpResNet),
    /// OFT: 256-bin tokens read in parallel (argmax over the full vocabulary) from the window.
    ParallelDiscrete(ActionTokenizer),
}

impl ActionHead {
    /// The family name used by `/metadata` and `openvla inspect`: `openvla`, `oft-l1` or
    /// `oft-discrete`.
    pub fn family(&self) -> &'static str {
        match self {
            ActionHead::Autoregressive256(_) => "openvla",
            ActionHead::ParallelL1(_) => "oft-l1",
            ActionHead::ParallelDiscrete(_) => "oft-discrete",
        }
    }

    /// A one-line description of the head.
    pub fn describe(&self) -> String {
        match self {
            ActionHead::Autoregressive256(t) => format!(
                "autoregressive {}-bin action tokens (greedy, KV cache)",
                t.bin_centers.len() + 1
            ),
            ActionHead::ParallelL1(m) => format!(
                "parallel decoding, MLPResNet L1 regression ({} -> {} -> {} blocks -> {}), \
                 bidirectional attention",
                m.input_dim(),
                m.hidden_dim(),
                m.blocks.len(),
                m.action_dim()
            ),
            ActionHead::ParallelDiscrete(t) => format!(
                "parallel decoding, {}-bin tokens by argmax over the window, bidirectional \
                 attention",
                t.bin_centers.len() + 1
            ),
        }
    }

    /// Whether the LLM runs once, bidirectionally, over placeholder positions.
    pub fn is_parallel(&self) -> bool {
        !matches!(self, ActionHead::Autoregressive256(_))
    }
}

/// `nn.LayerNorm` with affine weight and bias (eps [`LAYER_NORM_EPS`]).
#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    fn load<B: Backend>(w: &dyn ParamSource<B>, prefix: &str, dim: usize) -> Result<Self> {
        Ok(LayerNorm {
            weight: w.tensor(&format!("{prefix}.weight"), &[dim])?,
            bias: w.tensor(&format!("{prefix}.bias"), &[dim])?,
        })
    }
    fn forward<B: Backend>(&self, x: &Tensor) -> Result<Tensor> {
        B::layer_norm(x, &self.weight, &self.bias, LAYER_NORM_EPS as f64)
    }
}

/// OFT's `MLPResNet` (action_heads.py): `LayerNorm(D·H) → fc1 → ReLU → blocks of
/// x + ReLU(Linear(LayerNorm(x))) → LayerNorm → fc2`, no activation at the output. Written once
/// for inference and training ([`Backend`]); every row is computed on its own
/// ([`Backend::linear_rowwise`]).
#[derive(Debug, Clone)]
pub struct MlpResNet<B: Backend = Infer> {
    layer_norm1: LayerNorm,
    fc1: B::Linear,
    blocks: Vec<(LayerNorm, B::Linear)>,
    layer_norm2: LayerNorm,
    fc2: B::Linear,
    dims: (usize, usize, usize),
}

/// The intermediate results of one [`MlpResNet::forward_traced`] call, `[rows, ·]` each.
#[derive(Debug, Clone)]
pub struct MlpResNetTrace {
    /// After `layer_norm1`.
    pub layer_norm1: Tensor,
    /// After `fc1` and ReLU.
    pub fc1_relu: Tensor,
    /// After each residual block.
    pub blocks: Vec<Tensor>,
    /// After `layer_norm2`.
    pub layer_norm2: Tensor,
    /// The output (normalized actions).
    pub output: Tensor,
}

impl<B: Backend> MlpResNet<B> {
    /// The head of width `input → hidden → action_dim` with `blocks` residual blocks, from
    /// `model.*` of `w` (the reference's `state_dict` names without `module.`).
    pub fn load_with(
        w: &dyn ParamSource<B>,
        (input, hidden, action_dim): (usize, usize, usize),
        blocks: usize,
    ) -> Result<Self> {
        let linear = |prefix: &str, dims| w.linear(prefix, dims, true, LayerKind::Projector);
        let blocks = (0..blocks)
            .map(|i| {
                let p = format!("model.mlp_resnet_blocks.{i}.ffn");
                Ok((
                    LayerNorm::load(w, &format!("{p}.0"), hidden)?,
                    linear(&format!("{p}.1"), (hidden, hidden))?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(MlpResNet {
            layer_norm1: LayerNorm::load(w, "model.layer_norm1", input)?,
            fc1: linear("model.fc1", (input, hidden))?,
            blocks,
            layer_norm2: LayerNorm::load(w, "model.layer_norm2", hidden)?,
            fc2: linear("model.fc2", (hidden, action_dim))?,
            dims: (input, hidden, action_dim),
        })
    }

    /// Input width (`action_dim · llm_hidden`).
    pub fn input_dim(&self) -> usize {
        self.dims.0
    }
    /// Hidden width.
    pub fn hidden_dim(&self) -> usize {
        self.dims.1
    }
    /// Output width: the action dimension.
    pub fn action_dim(&self) -> usize {
        self.dims.2
    }

    /// `x [..., input_dim]` → normalized actions `[..., action_dim]`.
    pub fn forward_with(&self, ctx: &B::Ctx, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_traced_with(ctx, x)?.output)
    }

    /// `x [..., input_dim]` → normalized actions `[..., action_dim]`, keeping every stage.
    /// Every row is computed independently of the others (row-wise kernels).
    pub fn forward_traced_with(&self, ctx: &B::Ctx, x: &Tensor) -> Result<MlpResNetTrace> {
        if x.dim(x.rank() - 1)? != self.input_dim() {
            return Err(Error::InvalidInput(format!(
                "action head input has width {}, the head expects {}",
                x.dim(x.rank() - 1)?,
                self.input_dim()
            )));
        }
        let layer_norm1 = self.layer_norm1.forward::<B>(x)?;
        let fc1_relu = B::linear_rowwise(ctx, &self.fc1, &layer_norm1)?.relu()?;
        let mut h = fc1_relu.clone();
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for (norm, lin) in &self.blocks {
            h = (&h + B::linear_rowwise(ctx, lin, &norm.forward::<B>(&h)?)?.relu()?)?;
            blocks.push(h.clone());
        }
        let layer_norm2 = self.layer_norm2.forward::<B>(&h)?;
        let output = B::linear_rowwise(ctx, &self.fc2, &layer_norm2)?;
        Ok(MlpResNetTrace {
            layer_norm1,
            fc1_relu,
            blocks,
            layer_norm2,
            output,
        })
    }
}

impl MlpResNet<Infer> {
    /// Loads `model.*` of an L1 action head state dict (keys already without `module.`).
    /// The dimensions are read from the tensors: `fc2` gives the action dimension,
    /// `fc1` the hidden width and input width; `dtype` is the dtype the matrices are held in.
    pub fn load(sd: &StateDict, dtype: DType) -> Result<Self> {
        let fc1_shape = sd.get("model.fc1.weight", 2)?.dims().to_vec();
        let fc2_shape = sd.get("model.fc2.weight", 2)?.dims().to_vec();
        let (hidden, input) = (fc1_shape[0], fc1_shape[1]);
        let action_dim = fc2_shape[0];
        let mut blocks = 0;
        while sd
            .shape(&format!("model.mlp_resnet_blocks.{blocks}.ffn.1.weight"))
            .is_some()
        {
            blocks += 1;
        }
        let source = StateDictSource {
            sd,
            dtype: Some(dtype),
        };
        Self::load_with(&source, (input, hidden, action_dim), blocks)
    }

    /// `x [rows, input_dim]` → normalized actions `[rows, action_dim]`, keeping every stage.
    pub fn forward_traced(&self, x: &Tensor) -> Result<MlpResNetTrace> {
        self.forward_traced_with(&(), x)
    }
}
