//! The Llama language model (transformers 4.40.1 `LlamaForCausalLM` semantics, spec §4):
//! pre-norm decoder layers with RMSNorm, grouped-query attention with half-rotation RoPE, SwiGLU,
//! a KV cache, and input embeddings supplied by the caller (so image patches can be spliced in).
//! The decoder layer itself is the one definition of [`crate::model::decoder`]; here are the
//! inference passes around it (caches, packed prefill, OFT's bidirectional pass, decoding).

use crate::config::TextConfig;
use crate::error::{Error, Result};
use crate::kernels::attention::cache_attention;
use crate::kernels::ComputePrecision;
use crate::model::backend::{Backend, Infer};
use crate::model::checkpoint::WeightLoader;
use crate::model::decoder::{repeat_kv, rope_angles, rope_inv_freq, DecoderLayer};
use crate::model::linear::{LayerKind, Linear, Weight, WeightPolicy};
use crate::model::vit::Loading;
use candle_core::{DType, Device, Tensor};

/// Additive mask value for positions a query may not attend to (finite, so fully masked padding
/// rows stay finite instead of turning into NaN); training's masks use it too.
pub const MASKED: f32 = f32::MIN / 2.0;

/// Llama's final RMSNorm.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Infer::rms_norm(x, &self.weight, self.eps)
    }
}

/// Attention of one batch row over its own cache (`q`, `k`, `v` are `[1, heads, T, hd]`,
/// rotated): causal, or bidirectional over every cached and new position (OFT's parallel
/// decoding).
fn attend_row(
    layer: &DecoderLayer,
    q: &Tensor,
    k: Tensor,
    v: Tensor,
    cache: &mut Option<LayerKv>,
    causal: bool,
) -> Result<Tensor> {
    let (num_heads, num_kv_heads, hd) = layer.heads();
    let t = q.dim(2)?;
    let (k, v) = LayerKv::append(cache, k, v)?;
    let s = k.dim(2)?;
    // On CPU in f32, prefill and decode steps alike: the fused kernel (no GQA expansion, mask
    // tensor or copies). It sees only this row's cache, so a row's result does not depend on
    // the rest of the batch. OFT's bidirectional pass takes it in bf16 arithmetic only: in the
    // exact default, candle's ops stay closer to the reference (the FiLM golden test's 1e-5).
    let compute = layer.compute();
    if causal || compute == ComputePrecision::Bf16 {
        if let Some(out) = cache_attention(q, &k, &v, causal, compute)? {
            return Ok(out);
        }
    }
    // The generic path (other devices and dtypes) takes packed copies of the cache views.
    let (k, v) = (k.contiguous()?, v.contiguous()?);
    let rep = num_heads / num_kv_heads;
    let (k, v) = (repeat_kv(&k, rep)?, repeat_kv(&v, rep)?);
    let scale = 1.0 / (hd as f64).sqrt();
    let mut scores = (q.matmul(&k.t()?)? * scale)?;
    if causal && t > 1 {
        // Causal: the query at new position i sees every cached key and new keys <= i.
        let past = s - t;
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..s).map(move |j| if j <= past + i { 0.0 } else { MASKED }))
            .collect();
        let mask = Tensor::from_vec(mask, (1, 1, t, s), q.device())?;
        scores = scores.broadcast_add(&mask)?;
    }
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    Ok(probs.matmul(&v)?)
}

/// The layer over `x [B, T, D]`, each row attending causally to its own cache, with its own
/// RoPE angles `rope[row]`. Single-token steps go through the row-independent kernels, so a
/// request decodes the same whether it is alone or batched.
fn forward_cached(
    layer: &DecoderLayer,
    x: &Tensor,
    rope: &[(Tensor, Tensor)],
    caches: &mut [Option<LayerKv>],
) -> Result<Tensor> {
    let t = x.dim(1)?;
    layer.forward_with(&(), x, t == 1, &mut |q, k, v| {
        let mut outs = Vec::with_capacity(caches.len());
        for (row, cache) in caches.iter_mut().enumerate() {
            let (cos, sin) = &rope[row];
            let qr = candle_nn::rotary_emb::rope(&q.narrow(0, row, 1)?.contiguous()?, cos, sin)?;
            let kr = candle_nn::rotary_emb::rope(&k.narrow(0, row, 1)?.contiguous()?, cos, sin)?;
            let vr = v.narrow(0, row, 1)?.contiguous()?;
            outs.push(attend_row(layer, &qr, kr, vr, cache, true)?);
        }
        Ok(Tensor::cat(&outs, 0)?)
    })
}

/// The layer over several sequences packed along the positions of `x [1, T, D]` (`lens` sum
/// to `T`): the projections run on all positions at once, attention stays within each
/// sequence. `rope` holds each position's own angles. With `caches` (one per sequence)
/// attention is causal and each sequence's keys and values are appended to its cache (a
/// batched prefill); without, it is bidirectional and nothing is kept (OFT).
fn forward_packed_layer(
    layer: &DecoderLayer,
    x: &Tensor,
    rope: &(Tensor, Tensor),
    lens: &[usize],
    mut caches: Option<&mut [Option<LayerKv>]>,
) -> Result<Tensor> {
    layer.forward_with(&(), x, false, &mut |q, k, v| {
        let (cos, sin) = rope;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        let mut outs = Vec::with_capacity(lens.len());
        let mut start = 0;
        for (i, &len) in lens.iter().enumerate() {
            let seg = |y: &Tensor| -> Result<Tensor> { Ok(y.narrow(2, start, len)?.contiguous()?) };
            let mut none = None;
            let (cache, causal) = match caches.as_deref_mut() {
                Some(c) => (&mut c[i], true),
                None => (&mut none, false),
            };
            outs.push(attend_row(
                layer,
                &seg(&q)?,
                seg(&k)?,
                seg(&v)?,
                cache,
                causal,
            )?);
            start += len;
        }
        Ok(Tensor::cat(&outs, 2)?)
    })
}

/// One layer's keys and values for one sequence: buffers `[1, kv_heads, capacity, head_dim]`
/// whose first `len` positions are filled.
///
/// A step writes its new positions in place (`slice_set`) and the buffers grow geometrically, so
/// a decode step does not copy the whole cache (`Tensor::cat` did: about 300 MB per token on the
/// 7B); the attention reads the filled part as a view. The buffers are written in place, so the
/// type is not `Clone`: caches are moved between requests and batches, never shared.
#[derive(Debug)]
pub struct LayerKv {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl LayerKv {
    /// Positions a new buffer is rounded up to.
    const GRANULE: usize = 64;

    /// Appends `k`, `v` (`[1, kv_heads, t, head_dim]`) and returns the keys and values of every
    /// position so far (views `[1, kv_heads, len, head_dim]` of the buffers).
    fn append(cache: &mut Option<LayerKv>, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        let mut c = match cache.take() {
            Some(c) if c.len + t <= c.k.dim(2)? => c,
            old => {
                let (b, heads, _, hd) = k.dims4()?;
                let (len, cap0) = match &old {
                    Some(c) => (c.len, c.k.dim(2)?),
                    None => (0, 0),
                };
                let cap = (len + t).max(2 * cap0).next_multiple_of(Self::GRANULE);
                let kb = Tensor::zeros((b, heads, cap, hd), k.dtype(), k.device())?;
                let vb = Tensor::zeros((b, heads, cap, hd), v.dtype(), v.device())?;
                if let Some(o) = old.filter(|o| o.len > 0) {
                    kb.slice_set(&o.k.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                    vb.slice_set(&o.v.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                }
                LayerKv { k: kb, v: vb, len }
            }
        };
        c.k.slice_set(&k.contiguous()?, 2, c.len)?;
        c.v.slice_set(&v.contiguous()?, 2, c.len)?;
        c.len += t;
        let views = (c.k.narrow(2, 0, c.len)?, c.v.narrow(2, 0, c.len)?);
        *cache = Some(c);
        Ok(views)
    }
}

/// Keys and values of every layer for the positions processed so far, one entry per batch row
/// (rows may hold different lengths).
#[derive(Debug, Default)]
pub struct KvCache {
    rows: Vec<Vec<Option<LayerKv>>>,
}

impl KvCache {
    /// An empty cache for `rows` sequences.
    pub fn new(rows: usize) -> Self {
        KvCache {
            rows: (0..rows).map(|_| Vec::new()).collect(),
        }
    }
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows.len()
    }
    /// Number of cached positions of `row`.
    pub fn len(&self, row: usize) -> usize {
        self.rows
            .get(row)
            .and_then(|r| r.first())
            .and_then(|l| l.as_ref())
            .map_or(0, |l| l.len)
    }
    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        (0..self.rows()).all(|r| self.len(r) == 0)
    }
    /// Concatenates the rows of several caches.
    pub fn concat(caches: Vec<KvCache>) -> KvCache {
        KvCache {
            rows: caches.into_iter().flat_map(|c| c.rows).collect(),
        }
    }
    /// Gives every row that has no entries yet an empty one per layer.
    fn ensure_layers(&mut self, layers: usize) {
        for r in self.rows.iter_mut() {
            if r.len() != layers {
                *r = (0..layers).map(|_| None).collect();
            }
        }
    }

    /// Runs `f` on layer `li`'s entry of every row (moved out for the call, then back).
    fn with_layer<R>(
        &mut self,
        li: usize,
        f: impl FnOnce(&mut [Option<LayerKv>]) -> Result<R>,
    ) -> Result<R> {
        let mut layer: Vec<Option<LayerKv>> = self.rows.iter_mut().map(|r| r[li].take()).collect();
        let out = f(&mut layer);
        for (r, kv) in self.rows.iter_mut().zip(layer) {
            r[li] = kv;
        }
        out
    }

    /// Keeps only the given rows, in that order.
    pub fn select(&mut self, keep: &[usize]) {
        let mut rows = std::mem::take(&mut self.rows);
        self.rows = keep.iter().map(|&i| std::mem::take(&mut rows[i])).collect();
    }
}

/// Positions a packed LLM pass takes at most: a batch whose sequences need more runs as several
/// packs (bounds the activations: 4,096 positions of the 7B's MLP are 360 MB in f32). A longer
/// single sequence runs alone.
pub const MAX_PACKED_POSITIONS: usize = 4096;

/// Splits sequences of lengths `lens` into consecutive packs for
/// [`Llama::prefill_packed`] and [`Llama::forward_packed_bidirectional`], each of at most
/// `max` positions (a longer sequence is a pack of its own). A sequence too short to keep its
/// bits when stacked ([`crate::kernels::stacks_bit_exactly`]) is always a pack of its own.
pub fn packs(lens: &[usize], max: usize) -> Vec<std::ops::Range<usize>> {
    let short = |len: usize| !crate::kernels::stacks_bit_exactly(len);
    let mut out = Vec::new();
    let (mut start, mut total) = (0, 0);
    for (i, &len) in lens.iter().enumerate() {
        if i > start && (total + len > max || short(len) || short(lens[start])) {
            out.push(start..i);
            start = i;
            total = 0;
        }
        total += len;
    }
    if start < lens.len() {
        out.push(start..lens.len());
    }
    out
}

/// The language model.
#[derive(Debug, Clone)]
pub struct Llama {
    embed_tokens: Weight,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    inv_freq: Vec<f32>,
    cfg: TextConfig,
    device: Device,
}

impl Llama {
    /// Loads `language_model.*`.
    pub fn load(w: &WeightLoader, cfg: &TextConfig, wp: &WeightPolicy) -> Result<Self> {
        let (v, d) = (cfg.vocab_size, cfg.hidden_size);
        let embed_tokens = w.get_weight(
            "language_model.model.embed_tokens.weight",
            [v, d],
            wp.dtype.dtype(),
            wp.format_for(LayerKind::Embedding),
        )?;
        let source = Loading {
            source: w,
            policy: wp,
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                DecoderLayer::load_with(&source, &format!("language_model.model.layers.{i}"), cfg)
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm {
            weight: w.get("language_model.model.norm.weight", &[d], DType::F32)?,
            eps: cfg.rms_norm_eps,
        };
        // HF `tie_word_embeddings`: lm_head *is* embed_tokens; a stored lm_head is ignored, as
        // transformers' `tie_weights` replaces it after loading.
        let lm_head = if cfg.tie_word_embeddings {
            if w.has_weight("language_model.lm_head.weight") {
                w.skip_prefix("language_model.lm_head.");
            }
            Linear::new(embed_tokens.clone(), None)
        } else {
            w.linear(
                "language_model.lm_head",
                (d, v),
                false,
                wp,
                LayerKind::LmHead,
            )?
        };
        let inv_freq = rope_inv_freq(cfg);
        Ok(Llama {
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq,
            cfg: cfg.clone(),
            device: w.device().clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }

    /// Bytes of the decoder layers' weight matrices (read in full at every decode step).
    pub fn layer_weight_bytes(&self) -> usize {
        self.layers.iter().map(DecoderLayer::weight_bytes).sum()
    }

    /// Bytes of `lm_head` (read in full at every decode step).
    pub fn lm_head_bytes(&self) -> usize {
        self.lm_head.storage_bytes()
    }

    /// The output projection's weight (`[vocab, D]`; the embedding table when tied).
    pub fn lm_head_weight(&self) -> &Weight {
        self.lm_head.weight()
    }

    /// The token embedding table `[vocab, D]`.
    pub fn embed_tokens_weight(&self) -> &Weight {
        &self.embed_tokens
    }

    /// Bytes of the token embedding table (a few rows are read per step).
    pub fn embedding_bytes(&self) -> usize {
        self.embed_tokens.storage_bytes()
    }

    /// Token embeddings `[1, n, D]` (f32) of `ids`.
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.cfg.vocab_size) {
            return Err(Error::InvalidInput(format!(
                "token id {bad} is outside the vocabulary of {} entries",
                self.cfg.vocab_size
            )));
        }
        Ok(self.embed_tokens.rows_f32(ids)?.unsqueeze(0)?)
    }

    /// cos/sin tables `[T, head_dim / 2]` for positions `start .. start + t`, in f32 as
    /// transformers computes them (`pos * inv_freq`, then cos and sin).
    fn rope_tables(&self, start: usize, t: usize) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let (cos, sin) = rope_angles(&self.inv_freq, start, t);
        Ok((
            Tensor::from_vec(cos, (t, half), &self.device)?,
            Tensor::from_vec(sin, (t, half), &self.device)?,
        ))
    }

    /// Runs several sequences, packed one after the other along the positions of
    /// `x [1, T, D]` (`lens` give their lengths, summing to `T`), with **bidirectional**
    /// attention inside each sequence, as OpenVLA-OFT's parallel decoding does (the
    /// transformers fork's `is_causal=False`, oft-spec §2.4). Each sequence takes positions
    /// `0 .. len`; the projections run on all positions at once. No cache is kept. Returns the
    /// hidden states after the final RMSNorm, packed the same way.
    pub fn forward_packed_bidirectional(&self, x: &Tensor, lens: &[usize]) -> Result<Tensor> {
        self.forward_packed(x, lens, None)
    }

    /// The prefill of several sequences packed one after the other along the positions of
    /// `x [1, T, D]` (`lens` give their lengths): causal attention within each sequence, each
    /// at positions `0 .. len`, the projections on all positions at once. Returns the hidden
    /// states after the final RMSNorm, packed the same way, and a cache with one row per
    /// sequence, ready for [`Llama::forward`]. Within a pack made by [`packs`], a sequence gets
    /// exactly the hidden states and cache of its own `forward` on an empty cache: every kernel
    /// computes a row on its own.
    pub fn prefill_packed(&self, x: &Tensor, lens: &[usize]) -> Result<(Tensor, KvCache)> {
        let mut cache = KvCache::new(lens.len());
        let hidden = self.forward_packed(x, lens, Some(&mut cache))?;
        Ok((hidden, cache))
    }

    /// [`Llama::forward_packed_bidirectional`] (no cache) or [`Llama::prefill_packed`].
    fn forward_packed(
        &self,
        x: &Tensor,
        lens: &[usize],
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let t = x.dim(1)?;
        if x.dim(0)? != 1 || lens.iter().sum::<usize>() != t || lens.contains(&0) {
            return Err(Error::InvalidInput(format!(
                "packed sequences of lengths {lens:?} do not fill the {t} positions of one row"
            )));
        }
        let mut cos = Vec::with_capacity(lens.len());
        let mut sin = Vec::with_capacity(lens.len());
        for &len in lens {
            if len > self.cfg.max_position_embeddings {
                return Err(Error::InvalidInput(format!(
                    "sequence of {len} positions exceeds max_position_embeddings {}",
                    self.cfg.max_position_embeddings
                )));
            }
            let (c, s) = self.rope_tables(0, len)?;
            cos.push(c);
            sin.push(s);
        }
        let rope = (Tensor::cat(&cos, 0)?, Tensor::cat(&sin, 0)?);
        if let Some(c) = cache.as_deref_mut() {
            c.ensure_layers(self.layers.len());
        }
        let mut h = x.clone();
        for (li, layer) in self.layers.iter().enumerate() {
            h = match cache.as_deref_mut() {
                Some(c) => c.with_layer(li, |kv| {
                    forward_packed_layer(layer, &h, &rope, lens, Some(kv))
                })?,
                None => forward_packed_layer(layer, &h, &rope, lens, None)?,
            };
        }
        self.norm.forward(&h)
    }

    /// Runs the decoder over `x [B, T, D]`, appending to `cache` (which must have `B` rows).
    /// Row `r`'s new tokens take positions `cache.len(r) ..`, attention is causal, and each row
    /// attends only to its own cache. Returns the hidden states after the final RMSNorm.
    pub fn forward(&self, x: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        if cache.rows() != b {
            return Err(Error::InvalidInput(format!(
                "the KV cache has {} rows but the input has {b}",
                cache.rows()
            )));
        }
        let mut rope = Vec::with_capacity(b);
        for row in 0..b {
            let start = cache.len(row);
            if start + t > self.cfg.max_position_embeddings {
                return Err(Error::InvalidInput(format!(
                    "sequence of {} positions exceeds max_position_embeddings {}",
                    start + t,
                    self.cfg.max_position_embeddings
                )));
            }
            rope.push(self.rope_tables(start, t)?);
        }
        cache.ensure_layers(self.layers.len());
        let mut h = x.clone();
        for (li, layer) in self.layers.iter().enumerate() {
            h = cache.with_layer(li, |kv| forward_cached(layer, &h, &rope, kv))?;
        }
        self.norm.forward(&h)
    }

    /// Logits `[B, vocab]` (f32) of the last position of `hidden [B, T, D]`.
    pub fn last_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let t = hidden.dim(1)?;
        let last = hidden.narrow(1, t - 1, 1)?.squeeze(1)?;
        let logits = self.lm_head.forward_rowwise(&last)?;
        Ok(logits.to_dtype(DType::F32)?)
    }

    /// Logits `[B, T, vocab]` of every position.
    pub fn all_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(hidden)?.to_dtype(DType::F32)?)
    }
}

/// Index of the largest value; ties go to the lowest index (as `torch.argmax` on CPU).
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] || (values[best].is_nan() && !v.is_nan()) {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_bound_positions_and_keep_short_sequences_alone() {
        assert_eq!(packs(&[], 10), Vec::<std::ops::Range<usize>>::new());
        assert_eq!(packs(&[300, 280, 310], 4096), vec![0..3]);
        // 300 + 280 fit in 600; 310 starts a new pack; 700 exceeds the bound alone.
        assert_eq!(
            packs(&[300, 280, 310, 700, 20], 600),
            vec![0..2, 2..3, 3..4, 4..5]
        );
        // Fewer than GEMM_MIN_ROWS positions: a pack of its own, wherever it is.
        let s = crate::kernels::GEMM_MIN_ROWS - 1;
        assert_eq!(
            packs(&[s, 20, 30, s, s, 40], 4096),
            vec![0..1, 1..3, 3..4, 4..5, 5..6]
        );
    }

    /// Appends in chunks that cross the first buffer (64 positions) and a doubling: the views
    /// always equal the concatenation of everything appended, in f32 (attention's dtype) and
    /// in another dtype alike.
    #[test]
    fn kv_cache_appends_in_place_and_grows() {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F64] {
            let mut cache = None;
            let (mut all_k, mut all_v) = (Vec::new(), Vec::new());
            let mut caps = Vec::new();
            for (step, t) in [3usize, 60, 1, 1, 70, 1].into_iter().enumerate() {
                let k = Tensor::rand(0f32, 1.0, (1, 2, t, 4), &dev).unwrap();
                let v = (k.clone() + step as f64).unwrap();
                let (k, v) = (k.to_dtype(dtype).unwrap(), v.to_dtype(dtype).unwrap());
                all_k.push(k.clone());
                all_v.push(v.clone());
                let (kv, vv) = LayerKv::append(&mut cache, k, v).unwrap();
                let want_k = Tensor::cat(&all_k, 2).unwrap();
                let want_v = Tensor::cat(&all_v, 2).unwrap();
                let len = want_k.dim(2).unwrap();
                assert_eq!(kv.dims(), &[1, 2, len, 4]);
                let diff = |a: &Tensor, b: &Tensor| {
                    (a - b)
                        .unwrap()
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_dtype(DType::F64)
                        .unwrap()
                        .to_scalar::<f64>()
                        .unwrap()
                };
                assert_eq!(diff(&kv, &want_k), 0.0, "keys after step {step}");
                assert_eq!(diff(&vv, &want_v), 0.0, "values after step {step}");
                let c = cache.as_ref().unwrap();
                assert_eq!(c.len, len);
                caps.push(c.k.dim(2).unwrap());
            }
            // 3 → 64; 63, 64 fit; 65 doubles to 128; 135 → 256; 136 fits.
            assert_eq!(caps, [64, 64, 64, 128, 256, 256]);
        }
    }
}
