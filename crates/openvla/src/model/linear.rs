//! A linear layer whose weights are stored in f32, bf16, f16 or a block-quantized format, with
//! f32 activations and accumulation on CPU (or, with [`ComputePrecision::Bf16`], bf16
//! arithmetic in the many-row products).

use crate::error::Result;
use crate::kernels::amx::{TiledMatmul, TiledWeights};
use crate::kernels::f32_matmul::F32Matmul;
use crate::kernels::half_matmul::HalfMatmul;
use crate::kernels::quant_matmul::QuantMatmul;
pub use crate::quant::plan::LayerKind;
use crate::quant::{QuantFormat, QuantMatrix, QuantPlan, Quantization};
use candle_core::{DType, Tensor};
pub use openvla_kernels::ComputePrecision;
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
    /// The arithmetic of the many-row products of dense matrices (f32 by default).
    pub compute: ComputePrecision,
    /// Pack every dense matrix once at load into the AMX kernel's tile layout (bf16), so that
    /// the many-row products of [`ComputePrecision::Bf16`] pay neither the weights' rounding
    /// nor their packing per call; the same bits, at the cost of a bf16 copy of the weights
    /// beside the stored ones. Only where [`WeightPolicy::tiles_apply`] holds.
    pub tiles: bool,
}

impl WeightPolicy {
    /// Unquantized weights of one dtype.
    pub fn dense(dtype: WeightDtype) -> Self {
        WeightPolicy {
            dtype,
            quantization: None,
            plan: QuantPlan::default(),
            compute: ComputePrecision::F32,
            tiles: false,
        }
    }

    /// Weights of one dtype, quantized as `quantization` says.
    pub fn quantized(dtype: WeightDtype, quantization: Quantization) -> Self {
        WeightPolicy {
            dtype,
            quantization: Some(quantization),
            plan: quantization.plan(),
            compute: ComputePrecision::F32,
            tiles: false,
        }
    }

    /// The same storage, computed with `compute`.
    pub fn with_compute(self, compute: ComputePrecision) -> Self {
        WeightPolicy { compute, ..self }
    }

    /// The same, with the dense matrices also packed at load for the AMX kernel when `tiles`
    /// and [`WeightPolicy::tiles_apply`].
    pub fn with_tiles(self, tiles: bool) -> Self {
        WeightPolicy {
            tiles: tiles && Self::tiles_apply(self.compute),
            ..self
        }
    }

    /// Whether packing at load has anything to speed up: bf16 arithmetic on the AMX path
    /// ([`crate::kernels::dispatch::bf16_path`], which `OPENVLA_ISA` can cap).
    pub fn tiles_apply(compute: ComputePrecision) -> bool {
        compute == ComputePrecision::Bf16
            && crate::kernels::dispatch::bf16_path() == crate::kernels::dispatch::Bf16Path::Amx
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
    compute: ComputePrecision,
    /// The dense weight packed at load for the AMX kernel ([`WeightPolicy::tiles`]): the
    /// many-row products use it, everything else the stored weight.
    tiles: Option<Arc<TiledWeights>>,
}

impl Linear {
    /// Wraps an existing weight and bias (f32 arithmetic).
    pub fn new(weight: Weight, bias: Option<Tensor>) -> Linear {
        Linear {
            weight,
            bias,
            compute: ComputePrecision::F32,
            tiles: None,
        }
    }

    /// A layer loaded under `policy`: its arithmetic, and with [`WeightPolicy::tiles`] a dense
    /// weight packed once for the AMX kernel.
    pub fn with_policy(
        weight: Weight,
        bias: Option<Tensor>,
        policy: &WeightPolicy,
    ) -> Result<Linear> {
        let layer = Linear::new(weight, bias).with_compute(policy.compute);
        if policy.tiles && WeightPolicy::tiles_apply(policy.compute) {
            layer.packed()
        } else {
            Ok(layer)
        }
    }

    /// The same layer with its dense weight packed for the AMX kernel (quantized weights and
    /// weights off the CPU stay as they are: their kernels do not use it).
    fn packed(self) -> Result<Linear> {
        let tiles = match &self.weight {
            Weight::Dense(w) if w.device().is_cpu() && w.rank() == 2 => {
                Some(Arc::new(pack_tiles(w)?))
            }
            _ => None,
        };
        Ok(Linear { tiles, ..self })
    }

    /// Bytes of the weight matrix, and of its packed copy if it has one.
    pub fn storage_bytes(&self) -> usize {
        self.weight.storage_bytes() + self.tiles.as_ref().map_or(0, |t| t.storage_bytes())
    }

    /// Whether the weight was packed at load for the AMX kernel ([`WeightPolicy::tiles`]).
    pub fn is_tiled(&self) -> bool {
        self.tiles.is_some()
    }

    /// Wraps existing tensors (f32 arithmetic).
    pub fn from_tensors(weight: Tensor, bias: Option<Tensor>) -> Linear {
        Linear::new(Weight::Dense(weight), bias)
    }

    /// The same layer computed with `compute` in its many-row products.
    pub fn with_compute(self, compute: ComputePrecision) -> Linear {
        Linear { compute, ..self }
    }

    /// The arithmetic of the many-row products.
    pub fn compute(&self) -> ComputePrecision {
        self.compute
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
        let compute = self.compute;
        let y = match (&self.tiles, &self.weight) {
            (Some(t), _) if cpu && !rowwise && rows >= crate::kernels::GEMM_MIN_ROWS => x2
                .contiguous()?
                .apply_op1_no_bwd(&TiledMatmul { weight: t.clone() })?,
            (_, Weight::Quant(q)) => x2.contiguous()?.apply_op1_no_bwd(&QuantMatmul {
                weight: q.clone(),
                rowwise,
            })?,
            (_, Weight::Dense(w)) if cpu && matches!(w.dtype(), DType::BF16 | DType::F16) => x2
                .contiguous()?
                .apply_op2_no_bwd(w, &HalfMatmul { rowwise, compute })?,
            (_, Weight::Dense(w)) if cpu && w.dtype() == DType::F32 && w.is_contiguous() => x2
                .contiguous()?
                .apply_op2_no_bwd(w, &F32Matmul { rowwise, compute })?,
            (_, Weight::Dense(w)) => x2.matmul(&w.t()?)?,
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

/// Layers that read the same input (a decoder layer's q/k/v projections, its gate/up
/// projections), applied as **one stacked matmul** when their weights are stored alike: a
/// decode step then makes one kernel call (one activation quantization, one parallel
/// hand-off) instead of two or three, and the small k/v matrices of grouped-query models are
/// no longer separate, poorly parallel calls. Every output element is computed exactly as by
/// its own layer (the kernels compute each weight row independently of the others), so the
/// results are bit-identical to applying the layers one by one, which is what happens when
/// their storage differs.
#[derive(Debug, Clone)]
pub struct LinearGroup<const N: usize> {
    layers: Grouped<N>,
}

#[derive(Debug, Clone)]
enum Grouped<const N: usize> {
    /// One layer whose output is the parts' outputs side by side, `widths` wide.
    Stacked { layer: Linear, widths: [usize; N] },
    /// The parts, applied one by one.
    Separate([Linear; N]),
}

impl<const N: usize> LinearGroup<N> {
    /// Groups `parts` (all with the same input width), stacking their weights when possible.
    pub fn new(parts: [Linear; N]) -> Result<LinearGroup<N>> {
        let in_dims = parts.each_ref().map(|l| l.weight.dims().1);
        if in_dims.windows(2).any(|w| w[0] != w[1]) {
            return Err(crate::Error::InvalidInput(format!(
                "layers read inputs of different widths {in_dims:?}, so they cannot be grouped"
            )));
        }
        let alike = parts
            .iter()
            .all(|l| l.compute == parts[0].compute && l.is_tiled() == parts[0].is_tiled());
        let stacked = if alike { stack_weights(&parts)? } else { None };
        let layers = match stacked {
            Some(weight) => {
                let layer = Linear {
                    weight,
                    bias: stack_biases(&parts)?,
                    compute: parts[0].compute,
                    tiles: None,
                };
                // Tiled parts: their panels side by side where they line up, else the stack
                // packed anew.
                let tiled: Vec<&TiledWeights> =
                    parts.iter().filter_map(|l| l.tiles.as_deref()).collect();
                let layer = match (parts[0].is_tiled(), TiledWeights::stack(&tiled)) {
                    (false, _) => layer,
                    (true, Some(t)) => Linear {
                        tiles: Some(Arc::new(t)),
                        ..layer
                    },
                    (true, None) => layer.packed()?,
                };
                Grouped::Stacked {
                    layer,
                    widths: parts.each_ref().map(Linear::out_dim),
                }
            }
            None => Grouped::Separate(parts),
        };
        Ok(LinearGroup { layers })
    }

    /// Whether the layers run as one stacked matmul.
    pub fn is_stacked(&self) -> bool {
        matches!(self.layers, Grouped::Stacked { .. })
    }

    /// Bytes of the weight matrices.
    pub fn storage_bytes(&self) -> usize {
        match &self.layers {
            Grouped::Stacked { layer, .. } => layer.storage_bytes(),
            Grouped::Separate(parts) => parts.iter().map(Linear::storage_bytes).sum(),
        }
    }

    /// Each layer's output for `x [..., in]` (views into one result when stacked). `rowwise`
    /// as [`Linear::forward_rowwise`].
    pub fn forward(&self, x: &Tensor, rowwise: bool) -> Result<[Tensor; N]> {
        let outputs: Vec<Tensor> = match &self.layers {
            Grouped::Stacked { layer, widths } => {
                let y = layer.apply(x, rowwise)?;
                let last = y.rank() - 1;
                let mut start = 0;
                let mut out = Vec::with_capacity(N);
                for &w in widths {
                    out.push(y.narrow(last, start, w)?);
                    start += w;
                }
                out
            }
            Grouped::Separate(parts) => parts
                .iter()
                .map(|l| l.apply(x, rowwise))
                .collect::<Result<_>>()?,
        };
        Ok(outputs
            .try_into()
            .unwrap_or_else(|_| unreachable!("a group of {N} layers gives {N} outputs")))
    }
}

/// `w [n, k]` (f32, bf16 or f16 on the CPU) rounded to bf16 and packed for the AMX kernel.
fn pack_tiles(w: &Tensor) -> Result<TiledWeights> {
    let (n, k) = w.dims2()?;
    let wide: Vec<f32> = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Ok(TiledWeights::pack(n, k, |j0, nb, tile| {
        crate::kernels::bf16_gemm::round_slice(&wide[j0 * k..(j0 + nb) * k], tile)
    }))
}

/// The parts' biases side by side (f32), zeros for the parts without one, on the device of
/// those that have one; `None` when no part has a bias.
fn stack_biases(parts: &[Linear]) -> Result<Option<Tensor>> {
    let Some(any) = parts.iter().find_map(|l| l.bias.as_ref()) else {
        return Ok(None);
    };
    let mut bs = Vec::with_capacity(parts.len());
    for l in parts {
        bs.push(match &l.bias {
            Some(b) => b.to_dtype(DType::F32)?,
            None => Tensor::zeros(l.out_dim(), DType::F32, any.device())?,
        });
    }
    Ok(Some(Tensor::cat(&bs, 0)?))
}

/// The parts' weights stacked along the output dimension, or `None` when they are not stored
/// alike (dense of different dtypes or devices, quantized in different formats, or mixed).
fn stack_weights(parts: &[Linear]) -> Result<Option<Weight>> {
    if parts.len() < 2 {
        return Ok(None);
    }
    let dense: Vec<&Tensor> = parts
        .iter()
        .filter_map(|l| match &l.weight {
            Weight::Dense(t) => Some(t),
            Weight::Quant(_) => None,
        })
        .collect();
    if dense.len() == parts.len() {
        let same = dense
            .windows(2)
            .all(|w| w[0].dtype() == w[1].dtype() && w[0].device().same_device(w[1].device()));
        return Ok(if same {
            Some(Weight::Dense(Tensor::cat(&dense, 0)?))
        } else {
            None
        });
    }
    let quant: Vec<&Arc<QuantMatrix>> = parts
        .iter()
        .filter_map(|l| match &l.weight {
            Weight::Quant(q) => Some(q),
            Weight::Dense(_) => None,
        })
        .collect();
    if quant.len() != parts.len() || quant.windows(2).any(|w| w[0].format() != w[1].format()) {
        return Ok(None);
    }
    let rows = quant.iter().map(|q| q.rows()).sum();
    let mut qs = Vec::with_capacity(quant.iter().map(|q| q.qs().len()).sum());
    let mut scales = Vec::with_capacity(quant.iter().map(|q| q.scales().len()).sum());
    for q in &quant {
        qs.extend_from_slice(q.qs());
        scales.extend_from_slice(q.scales());
    }
    let m = QuantMatrix::from_parts(quant[0].format(), rows, quant[0].cols(), qs, scales)
        .map_err(|e| crate::Error::InvalidInput(format!("stacking quantized layers: {e}")))?;
    Ok(Some(Weight::Quant(Arc::new(m))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2001) as f32 / 1000.0
                    - 1.0
            })
            .collect()
    }

    fn layer(kind: &str, out: usize, inp: usize, seed: u32, bias: bool) -> Linear {
        let w = values(out * inp, seed);
        let weight = match kind {
            "f32" => Weight::Dense(Tensor::from_vec(w, (out, inp), &Device::Cpu).unwrap()),
            "bf16" => Weight::Dense(
                Tensor::from_vec(w, (out, inp), &Device::Cpu)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap(),
            ),
            "q8_0" => Weight::Quant(Arc::new(QuantMatrix::quantize(
                QuantFormat::Q8_0,
                &w,
                out,
                inp,
            ))),
            _ => Weight::Quant(Arc::new(QuantMatrix::quantize(
                QuantFormat::Q4_0,
                &w,
                out,
                inp,
            ))),
        };
        let bias =
            bias.then(|| Tensor::from_vec(values(out, seed + 1), out, &Device::Cpu).unwrap());
        Linear::new(weight, bias)
    }

    #[test]
    fn stacked_group_gives_the_bits_of_the_separate_layers() {
        let inp = 100;
        for kind in ["f32", "bf16", "q8_0", "q4_0"] {
            let parts = [
                layer(kind, 40, inp, 1, true),
                layer(kind, 8, inp, 2, false),
                layer(kind, 24, inp, 3, true),
            ];
            let group = LinearGroup::new(parts.clone()).unwrap();
            assert!(group.is_stacked(), "{kind}");
            assert_eq!(
                group.storage_bytes(),
                parts
                    .iter()
                    .map(|l| l.weight().storage_bytes())
                    .sum::<usize>()
            );
            for (rows, rowwise) in [(1, true), (3, true), (20, false), (20, true)] {
                let x =
                    Tensor::from_vec(values(rows * inp, 7), (1, rows, inp), &Device::Cpu).unwrap();
                let got = group.forward(&x, rowwise).unwrap();
                assert_eq!(got.len(), 3);
                for (g, l) in got.iter().zip(&parts) {
                    let want = l.apply(&x, rowwise).unwrap();
                    assert_eq!(g.dims(), want.dims(), "{kind}");
                    let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
                    let w: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
                    assert_eq!(g, w, "{kind}, {rows} rows, rowwise {rowwise}");
                }
            }
        }
    }

    #[test]
    fn unlike_storage_runs_separately_and_widths_must_match() {
        let inp = 64;
        let mixed = LinearGroup::new([
            layer("f32", 8, inp, 1, false),
            layer("q8_0", 8, inp, 2, false),
        ])
        .unwrap();
        assert!(!mixed.is_stacked());
        let x = Tensor::from_vec(values(2 * inp, 5), (2, inp), &Device::Cpu).unwrap();
        assert_eq!(mixed.forward(&x, false).unwrap().len(), 2);
        let formats = LinearGroup::new([
            layer("q8_0", 8, inp, 1, false),
            layer("q4_0", 8, inp, 2, false),
        ])
        .unwrap();
        assert!(!formats.is_stacked());
        let err = LinearGroup::new([
            layer("f32", 8, inp, 1, false),
            layer("f32", 8, 32, 2, false),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("different widths"), "{err}");
    }
    /// Weights packed at load for the AMX kernel ([`WeightPolicy::tiles`]) give the bits of the
    /// per-call packing in many-row products, leave row-independent and decode-sized products
    /// on the stored weights, count in the storage, and stack in groups (panel-aligned parts
    /// and parts that end inside a panel alike).
    #[test]
    fn tiles_packed_at_load_give_the_bits_of_the_per_call_path() {
        let policy = WeightPolicy::dense(WeightDtype::F32)
            .with_compute(ComputePrecision::Bf16)
            .with_tiles(true);
        if !WeightPolicy::tiles_apply(ComputePrecision::Bf16) {
            assert!(!policy.tiles, "tiles requested without AMX must be refused");
            eprintln!("skipped: tiles packed at load (no AMX-BF16 usable by this process)");
            return;
        }
        assert!(policy.tiles);
        assert!(
            !WeightPolicy::dense(WeightDtype::F32).with_tiles(true).tiles,
            "f32 arithmetic has no use for tiles"
        );
        let inp = 96;
        let vec = |t: &Tensor| -> Vec<u32> {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            v.iter().map(|f| f.to_bits()).collect()
        };
        for kind in ["f32", "bf16"] {
            let plain = [40, 64, 24].map(|out| {
                layer(kind, out, inp, out as u32, true).with_compute(ComputePrecision::Bf16)
            });
            let tiled = plain
                .clone()
                .map(|l| Linear::with_policy(l.weight().clone(), l.bias.clone(), &policy).unwrap());
            for (p, t) in plain.iter().zip(&tiled) {
                assert!(t.is_tiled() && !p.is_tiled(), "{kind}");
                assert!(t.storage_bytes() > p.storage_bytes(), "{kind}");
                for (rows, rowwise) in [(3, false), (20, false), (20, true), (121, false)] {
                    let x =
                        Tensor::from_vec(values(rows * inp, 7), (rows, inp), &Device::Cpu).unwrap();
                    let (a, b) = (p.apply(&x, rowwise).unwrap(), t.apply(&x, rowwise).unwrap());
                    assert_eq!(vec(&a), vec(&b), "{kind}, {rows} rows, rowwise {rowwise}");
                }
            }
            // The products really take the tiles: a layer whose tiles hold -W answers -x·Wᵀ in
            // many-row products and x·Wᵀ (the stored weight) in row-independent and few-row
            // ones. In a group, parts that line up keep their (here negated) panels; parts
            // that end inside a panel are repacked from the stacked stored weights.
            let negated = tiled.clone().map(|l| {
                let Weight::Dense(w) = l.weight() else {
                    unreachable!("dense test layers")
                };
                let tiles = Some(Arc::new(pack_tiles(&w.neg().unwrap()).unwrap()));
                Linear { tiles, ..l }
            });
            let x = Tensor::from_vec(values(33 * inp, 5), (33, inp), &Device::Cpu).unwrap();
            let no_bias = |l: &Linear| Linear {
                bias: None,
                ..l.clone()
            };
            let (n, p) = (no_bias(&negated[1]), no_bias(&plain[1]));
            let flipped = p.apply(&x, false).unwrap().neg().unwrap();
            assert_eq!(
                vec(&n.apply(&x, false).unwrap()),
                vec(&flipped),
                "{kind}: tiles used"
            );
            let x3 = x.narrow(0, 0, 3).unwrap();
            for (x, rowwise) in [(&x, true), (&x3, false)] {
                let want = vec(&p.apply(x, rowwise).unwrap());
                assert_eq!(
                    vec(&n.apply(x, rowwise).unwrap()),
                    want,
                    "{kind}: stored weight"
                );
            }
            let joined = LinearGroup::new([no_bias(&negated[1]), no_bias(&negated[2])]).unwrap();
            let repacked = LinearGroup::new([no_bias(&negated[0]), no_bias(&negated[1])]).unwrap();
            for (g, parts, sign) in [
                (&joined, [&plain[1], &plain[2]], -1.0),
                (&repacked, [&plain[0], &plain[1]], 1.0),
            ] {
                for (got, l) in g.forward(&x, false).unwrap().iter().zip(parts) {
                    let want = (no_bias(l).apply(&x, false).unwrap() * sign).unwrap();
                    assert_eq!(vec(got), vec(&want), "{kind}: group tiles, sign {sign}");
                }
            }
            // 40 + 64 rows end inside a panel (repacked); 64 + 24 line up (panels joined).
            for parts in [
                [tiled[0].clone(), tiled[1].clone()],
                [tiled[1].clone(), tiled[2].clone()],
            ] {
                let group = LinearGroup::new(parts.clone()).unwrap();
                assert!(group.is_stacked(), "{kind}");
                let x = Tensor::from_vec(values(33 * inp, 3), (33, inp), &Device::Cpu).unwrap();
                let got = group.forward(&x, false).unwrap();
                for (g, l) in got.iter().zip(&parts) {
                    assert_eq!(vec(g), vec(&l.apply(&x, false).unwrap()), "{kind} group");
                }
            }
        }
    }

    /// `--compute bf16`: many-row products of dense weights round the activations (and f32
    /// weights) to bf16 and so differ from the exact default by about bf16's precision, equal
    /// the f32 product of the rounded operands, and leave decode-sized products and quantized
    /// weights exact.
    #[test]
    fn bf16_compute_rounds_many_row_products_only() {
        let (rows, inp, out) = (20, 96, 40);
        let x = Tensor::from_vec(values(rows * inp, 9), (rows, inp), &Device::Cpu).unwrap();
        let xr = x
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        for kind in ["f32", "bf16", "q8_0"] {
            let exact = layer(kind, out, inp, 4, true);
            let fast = exact.clone().with_compute(ComputePrecision::Bf16);
            assert_eq!(fast.compute(), ComputePrecision::Bf16);
            let a: Vec<f32> = exact
                .forward(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let b: Vec<f32> = fast
                .forward(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            if kind == "q8_0" {
                assert_eq!(a, b, "quantized weights keep their exact kernels");
                continue;
            }
            // The exact product of the bf16-rounded operands (weights rounded for f32 ones).
            let wr = match exact.weight() {
                Weight::Dense(w) => w
                    .to_dtype(DType::BF16)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap(),
                Weight::Quant(_) => unreachable!(),
            };
            let want: Vec<f32> = Linear::new(Weight::Dense(wr), exact.bias.clone())
                .forward(&xr)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let mut differs = false;
            for ((a, b), w) in a.iter().zip(&b).zip(&want) {
                assert!(
                    (b - w).abs() <= 1e-4,
                    "{kind}: {b} vs rounded-operand product {w}"
                );
                assert!(
                    (a - b).abs() <= 0.05,
                    "{kind}: bf16 {b} too far from f32 {a}"
                );
                differs |= a != b;
            }
            assert!(
                differs,
                "{kind}: bf16 arithmetic gave the exact f32 bits everywhere"
            );
            // A decode-sized product (one row) keeps the exact kernels.
            let one = x.narrow(0, 0, 1).unwrap();
            assert_eq!(
                exact
                    .forward(&one)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
                fast.forward(&one)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
                "{kind}: one row"
            );
        }
    }
}
