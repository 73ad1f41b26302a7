//! A linear layer whose weights are stored in f32, bf16, f16 or a block-quantized format, with
//! f32 activations and accumulation on CPU.

use crate::checkpoint::WeightLoader;
use crate::error::Result;
use crate::kernels::f32_matmul::F32Matmul;
use crate::kernels::half_matmul::HalfMatmul;
use crate::kernels::quant_matmul::QuantMatmul;
use crate::quant::{QuantFormat, QuantMatrix, QuantPlan, Quantization};
use candle_core::{DType, Tensor};
use std::sync::Arc;

/// How unquantized weight matrices are held in memory. Activations are always f32 on CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightDtype {
    /// Upcast to f32 at load: exactly the reference's float32 run, 4 bytes per parameter.
    #[default]
    F32,
    /// Kept in bf16 as stored and widened inside the matmul kernel: the same function at
    /// 2 bytes per parameter (this is what lets the 7B fit in 24 GiB).
    Bf16,
    /// Converted to f16 at load and widened inside the matmul kernel: 2 bytes per parameter,
    /// 3 more mantissa bits than bf16 but a range limited to ±65504 (a load error beyond).
    F16,
}

impl WeightDtype {
    /// The candle dtype weight matrices are stored in.
    pub fn dtype(self) -> DType {
        match self {
            WeightDtype::F32 => DType::F32,
            WeightDtype::Bf16 => DType::BF16,
            WeightDtype::F16 => DType::F16,
        }
    }
}

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

/// How the model's weights are stored: the dtype of unquantized matrices and the quantization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WeightPolicy {
    /// Dtype of the matrices that are not quantized.
    pub dtype: WeightDtype,
    /// The quantization mode, if any (for reporting).
    pub quantization: Option<Quantization>,
    /// The format of each role's matrices, applied while loading (a pre-quantized checkpoint
    /// is read as stored).
    pub plan: QuantPlan,
}

impl WeightPolicy {
    /// Unquantized weights of one dtype.
    pub fn dense(dtype: WeightDtype) -> Self {
        WeightPolicy {
            dtype,
            quantization: None,
            plan: QuantPlan::default(),
        }
    }

    /// Weights of one dtype, quantized as `quantization` says.
    pub fn quantized(dtype: WeightDtype, quantization: Quantization) -> Self {
        WeightPolicy {
            dtype,
            quantization: Some(quantization),
            plan: quantization.plan(),
        }
    }

    /// The block format for a matrix of this role, if it is quantized.
    pub fn format_for(&self, kind: LayerKind) -> Option<QuantFormat> {
        self.plan.format_for(kind)
    }
}

/// A weight matrix `[out, in]`.
#[derive(Debug, Clone)]
pub enum Weight {
    /// f32, bf16 or f16.
    Dense(Tensor),
    /// Block-quantized.
    Quant(Arc<QuantMatrix>),
}

impl Weight {
    /// `[out, in]`.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            Weight::Dense(t) => {
                let d = t.dims();
                (d[0], d.get(1).copied().unwrap_or(1))
            }
            Weight::Quant(q) => (q.rows(), q.cols()),
        }
    }

    /// Bytes the matrix occupies in memory.
    pub fn storage_bytes(&self) -> usize {
        match self {
            Weight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Weight::Quant(q) => q.storage_bytes(),
        }
    }

    /// Rows `ids` as f32 `[ids.len(), in]` (an embedding lookup).
    pub fn rows_f32(&self, ids: &[u32]) -> Result<Tensor> {
        match self {
            Weight::Dense(t) => {
                let idx = Tensor::from_slice(ids, ids.len(), t.device())?;
                Ok(t.index_select(&idx, 0)?.to_dtype(DType::F32)?)
            }
            Weight::Quant(q) => {
                let k = q.cols();
                let mut out = vec![0f32; ids.len() * k];
                if k > 0 {
                    for (dst, &id) in out.chunks_mut(k).zip(ids) {
                        q.dequantize_rows(id as usize, dst);
                    }
                }
                Ok(Tensor::from_vec(
                    out,
                    (ids.len(), k),
                    &candle_core::Device::Cpu,
                )?)
            }
        }
    }
}

/// `y = x · Wᵀ + b` (PyTorch layout: `W` is `[out, in]`).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

impl Linear {
    /// Loads `{prefix}.weight` (`[out, in]`, stored as `policy` says for `kind`) and, if `bias`,
    /// `{prefix}.bias` (`[out]`, kept f32).
    pub fn load(
        w: &WeightLoader,
        prefix: &str,
        (in_dim, out_dim): (usize, usize),
        bias: bool,
        policy: &WeightPolicy,
        kind: LayerKind,
    ) -> Result<Linear> {
        let weight = w.get_weight(
            &format!("{prefix}.weight"),
            [out_dim, in_dim],
            policy.dtype.dtype(),
            policy.format_for(kind),
        )?;
        let bias = if bias {
            Some(w.get(&format!("{prefix}.bias"), &[out_dim], DType::F32)?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    /// Wraps an existing weight and bias.
    pub fn new(weight: Weight, bias: Option<Tensor>) -> Linear {
        Linear { weight, bias }
    }

    /// Wraps existing tensors.
    pub fn from_tensors(weight: Tensor, bias: Option<Tensor>) -> Linear {
        Linear {
            weight: Weight::Dense(weight),
            bias,
        }
    }

    /// The weight matrix `[out, in]`.
    pub fn weight(&self) -> &Weight {
        &self.weight
    }

    /// Output width.
    pub fn out_dim(&self) -> usize {
        self.weight.dims().0
    }

    /// Applies the layer to `x [..., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, false)
    }

    /// Like [`Linear::forward`], but every row is computed by the same dot-product kernel
    /// whatever the number of rows, so a row's result does not depend on the rest of the batch
    /// (used for batched decoding; memory-bound shapes, where this is also the fast way).
    pub fn forward_rowwise(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, true)
    }

    fn apply(&self, x: &Tensor, rowwise: bool) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = *dims.last().unwrap_or(&0);
        let rows: usize = dims[..dims.len().saturating_sub(1)].iter().product();
        let x2 = x.reshape((rows, in_dim))?;
        let cpu = x.device().is_cpu();
        let y = match &self.weight {
            Weight::Quant(q) => x2.contiguous()?.apply_op1_no_bwd(&QuantMatmul {
                weight: q.clone(),
                rowwise,
            })?,
            Weight::Dense(w) if cpu && matches!(w.dtype(), DType::BF16 | DType::F16) => x2
                .contiguous()?
                .apply_op2_no_bwd(w, &HalfMatmul { rowwise })?,
            Weight::Dense(w) if cpu && w.dtype() == DType::F32 && w.is_contiguous() => x2
                .contiguous()?
                .apply_op2_no_bwd(w, &F32Matmul { rowwise })?,
            Weight::Dense(w) => x2.matmul(&w.t()?)?,
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = dims;
        if let Some(last) = out_dims.last_mut() {
            *last = self.out_dim();
        }
        Ok(y.reshape(out_dims)?)
    }
}
