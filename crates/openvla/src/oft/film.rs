//! OpenVLA-OFT FiLM (oft-spec §1.2, §3; the reference's `prismatic/models/film_vit_wrapper.py`).
//!
//! A FiLM checkpoint holds `vision_backbone--<step>_checkpoint.pt`: the whole
//! `FiLMedPrismaticVisionBackbone` state dict as `finetune.py:642-646` saves it, without a
//! `module.` prefix. Each timm block is wrapped (`blocks.{i}.block.*`) next to its FiLM Linears
//! `blocks.{i}.scale` / `blocks.{i}.shift` (`llm_dim -> vision_dim`), and every tower linear
//! (and the patch-embedding convolution) carries PEFT's **unmerged** LoRA
//! (`*.base_layer.{weight,bias}`, `*.lora_A.default.weight`, `*.lora_B.default.weight`): the
//! merged shards' vision weights are not used by the reference at all (its strict
//! `load_state_dict` of this file replaces them, `openvla_utils.py:341-343`).
//!
//! [`FilmCheckpoint`] reads the file, merges every LoRA pair in f32 as
//! `W + (alpha / r) · B·A` (PEFT's forward is `base(x) + B(A(x)) · alpha / r`; the same function
//! up to f32 rounding) and serves the towers' tensors under the shards' names
//! ([`TowerSource`]). The scale follows the reference's inference exactly: `_apply_film_to_vla`
//! builds its LoRA with `r = cfg.lora_rank` (which its strict load forces to equal the file's
//! rank) and `lora_alpha = min(r, 16)` (`openvla_utils.py:325-331`), whatever the training run's
//! `lora_adapter/adapter_config.json` says.

use crate::error::{Error, Result};
pub use crate::model::backend::FilmLayer;
use crate::model::backend::ParamSource;
use crate::model::linear::{LayerKind, Weight, WeightPolicy};
use crate::model::vit::{Loading, TowerSource};
use crate::oft::pt::{self, StateDict};
use crate::quant::QuantMatrix;
use candle_core::Tensor;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tracing::warn;

/// Component name of the FiLM vision backbone file.
pub const VISION_BACKBONE: &str = "vision_backbone";

/// `lora_alpha` of the reference's inference LoRA for rank `r` (`openvla_utils.py:327`).
pub fn reference_lora_alpha(rank: usize) -> usize {
    rank.min(16)
}

/// What merging the file's LoRA found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraMerge {
    /// The rank `r` (`lora_A` rows), the same for every layer.
    pub rank: usize,
    /// `lora_alpha` of the reference's inference LoRA, `min(r, 16)`.
    pub alpha: usize,
    /// Number of layers merged.
    pub layers: usize,
}

impl LoraMerge {
    /// `alpha / r`.
    pub fn scale(&self) -> f64 {
        self.alpha as f64 / self.rank as f64
    }
}

/// A FiLM `vision_backbone--<step>_checkpoint.pt`, LoRA merged, keyed by the names the towers
/// have in the merged shards (`vision_backbone.featurizer.blocks.0.attn.qkv.weight`, ...).
#[derive(Debug)]
pub struct FilmCheckpoint {
    path: PathBuf,
    tensors: BTreeMap<String, Tensor>,
    lora: Option<LoraMerge>,
    llm_dim: usize,
    used: Mutex<BTreeSet<String>>,
    skipped: Mutex<Vec<String>>,
}

/// `…blocks.{i}.block.…` -> `…blocks.{i}.…` (the FiLM block wrapper's extra path component).
fn unwrap_block(name: &str) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    let mut out = Vec::with_capacity(parts.len());
    let mut i = 0;
    while i < parts.len() {
        out.push(parts[i]);
        if parts[i] == "blocks"
            && i + 2 < parts.len()
            && parts[i + 1].parse::<usize>().is_ok()
            && parts[i + 2] == "block"
        {
            out.push(parts[i + 1]);
            i += 3;
        } else {
            i += 1;
        }
    }
    out.join(".")
}

/// One tensor of the file, classified by its PEFT role.
enum Role<'a> {
    /// `{stem}.base_layer.{weight,bias}` -> `{stem}.{weight,bias}`.
    Base(String),
    /// `{stem}.lora_A.<adapter>.weight`.
    LoraA(&'a str),
    /// `{stem}.lora_B.<adapter>.weight`.
    LoraB(&'a str),
    /// Anything else, kept under its name.
    Plain,
}

fn role(name: &str) -> Role<'_> {
    for (suffix, param) in [
        (".base_layer.weight", "weight"),
        (".base_layer.bias", "bias"),
    ] {
        if let Some(stem) = name.strip_suffix(suffix) {
            return Role::Base(format!("{stem}.{param}"));
        }
    }
    if name.ends_with(".weight") {
        if let Some((stem, _)) = name.split_once(".lora_A.") {
            return Role::LoraA(stem);
        }
        if let Some((stem, _)) = name.split_once(".lora_B.") {
            return Role::LoraB(stem);
        }
    }
    Role::Plain
}

impl FilmCheckpoint {
    /// Finds and reads the single `vision_backbone` checkpoint file of `dir` (`Ok(None)` when
    /// there is none; two are an error naming them). `llm_dim` is the input width of the FiLM
    /// projections (the LLM's hidden size).
    pub fn open(dir: &Path, llm_dim: usize) -> Result<Option<FilmCheckpoint>> {
        match pt::find_component(dir, VISION_BACKBONE)? {
            Some(path) => FilmCheckpoint::read(&path, dir, llm_dim).map(Some),
            None => Ok(None),
        }
    }

    /// Reads `path` and merges its LoRA. `dir`'s `config.json` (`oft_eval_cfg.lora_rank`) and
    /// `lora_adapter/adapter_config.json` are checked against the file's rank when present.
    pub fn read(path: &Path, dir: &Path, llm_dim: usize) -> Result<FilmCheckpoint> {
        let sd = StateDict::read(path)?;
        let named = sd
            .names()
            .map(|name| {
                let rank = sd.shape(name).map_or(0, |s| s.len());
                Ok((name.to_string(), sd.get(name, rank)?))
            })
            .collect::<Result<Vec<_>>>()?;
        Self::from_named(path, dir, llm_dim, named)
    }

    /// [`FilmCheckpoint::read`] of tensors already read from `path` (f32, file key names).
    fn from_named(
        path: &Path,
        dir: &Path,
        llm_dim: usize,
        named: Vec<(String, Tensor)>,
    ) -> Result<FilmCheckpoint> {
        let mut tensors = BTreeMap::new();
        let mut lora_a: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut lora_b: BTreeMap<String, Tensor> = BTreeMap::new();
        let insert = |map: &mut BTreeMap<String, Tensor>, key: String, t: Tensor| {
            if map.insert(key.clone(), t).is_some() {
                return Err(Error::checkpoint(
                    path,
                    format!("tensor {key:?} is stored twice (plain and as a LoRA base layer)"),
                ));
            }
            Ok(())
        };
        for (name, t) in named {
            if !name.starts_with("vision_backbone.") {
                return Err(Error::checkpoint(
                    path,
                    format!(
                        "key {name:?} is not a vision backbone tensor: expected the state dict of \
                         the FiLMed vision backbone (keys `vision_backbone.featurizer.…`, \
                         `vision_backbone.fused_featurizer.…`) that finetune.py saves with use_film"
                    ),
                ));
            }
            let unwrapped = unwrap_block(&name);
            match role(&unwrapped) {
                Role::Base(key) => insert(&mut tensors, key, t)?,
                Role::LoraA(stem) => insert(&mut lora_a, stem.to_string(), t)?,
                Role::LoraB(stem) => insert(&mut lora_b, stem.to_string(), t)?,
                Role::Plain => insert(&mut tensors, unwrapped.clone(), t)?,
            }
        }
        if !tensors.keys().any(|k| k.ends_with(".scale.weight")) {
            return Err(Error::checkpoint(
                path,
                "this vision_backbone file has no FiLM layers (no `blocks.<i>.scale` / \
                 `blocks.<i>.shift` Linears): expected the FiLMedPrismaticVisionBackbone state \
                 dict that finetune.py saves with use_film (film_vit_wrapper.py:53-54)",
            ));
        }
        let lora = Self::merge_lora(path, &mut tensors, lora_a, lora_b)?;
        if let Some(l) = &lora {
            check_rank(dir, path, l)?;
        }
        Ok(FilmCheckpoint {
            path: path.to_path_buf(),
            tensors,
            lora,
            llm_dim,
            used: Mutex::new(BTreeSet::new()),
            skipped: Mutex::new(Vec::new()),
        })
    }

    /// `W += (alpha / r) · B·A` for every LoRA pair (f32; a conv's `B [out, r, 1, 1]` and
    /// `A [r, c, k, k]` flatten to matrices).
    fn merge_lora(
        path: &Path,
        tensors: &mut BTreeMap<String, Tensor>,
        lora_a: BTreeMap<String, Tensor>,
        mut lora_b: BTreeMap<String, Tensor>,
    ) -> Result<Option<LoraMerge>> {
        if let Some(stem) = lora_b.keys().find(|k| !lora_a.contains_key(*k)) {
            return Err(Error::checkpoint(
                path,
                format!("{stem}: lora_B without lora_A"),
            ));
        }
        let mut rank = None;
        let mut layers = 0;
        for (stem, a) in &lora_a {
            let r = a.dim(0)?;
            match rank {
                None => rank = Some(r),
                Some(r0) if r0 != r => {
                    return Err(Error::checkpoint(
                        path,
                        format!("{stem}: LoRA rank {r}, but other layers have rank {r0}"),
                    ))
                }
                _ => {}
            }
        }
        let Some(r) = rank else { return Ok(None) };
        let alpha = reference_lora_alpha(r);
        let scale = alpha as f64 / r as f64;
        for (stem, a) in lora_a {
            let b = lora_b
                .remove(&stem)
                .ok_or_else(|| Error::checkpoint(path, format!("{stem}: lora_A without lora_B")))?;
            let key = format!("{stem}.weight");
            let w = tensors.get(&key).ok_or_else(|| {
                Error::checkpoint(
                    path,
                    format!("{stem}: LoRA tensors without a base layer ({stem}.base_layer.weight)"),
                )
            })?;
            let out = w.dim(0)?;
            let a2 = a.flatten_from(1)?;
            let b2 = b.flatten_from(1)?;
            if a2.dim(1)? * out != w.elem_count() || b2.dims() != [out, r] {
                return Err(Error::checkpoint(
                    path,
                    format!(
                        "{stem}: LoRA shapes A {:?}, B {:?} do not fit the base weight {:?}",
                        a.dims(),
                        b.dims(),
                        w.dims()
                    ),
                ));
            }
            let delta = (b2.matmul(&a2)? * scale)?.reshape(w.dims())?;
            let merged = (w + delta)?;
            tensors.insert(key, merged);
            layers += 1;
        }
        Ok(Some(LoraMerge {
            rank: r,
            alpha,
            layers,
        }))
    }

    /// The file read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The LoRA that was merged (`None` if the file held none).
    pub fn lora(&self) -> Option<LoraMerge> {
        self.lora
    }

    fn lookup(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.tensors.get(name).ok_or_else(|| {
            Error::checkpoint(
                &self.path,
                format!(
                    "missing tensor {name:?} (named as in the merged shards; in this file a \
                     block's tensors sit under `blocks.<i>.block.` and LoRA-wrapped weights \
                     under `.base_layer.`)"
                ),
            )
        })?;
        if t.dims() != shape {
            return Err(Error::checkpoint(
                &self.path,
                format!(
                    "tensor {name:?} has shape {:?}, config.json implies {shape:?}",
                    t.dims()
                ),
            ));
        }
        if let Ok(mut used) = self.used.lock() {
            used.insert(name.to_string());
        }
        Ok(t.clone())
    }

    /// Fails if the file holds tensors the towers neither used nor knowingly skipped (a file
    /// of another architecture).
    pub fn finish(&self) -> Result<()> {
        let used = self.used.lock().map(|u| u.clone()).unwrap_or_default();
        let skipped = self.skipped.lock().map(|s| s.clone()).unwrap_or_default();
        let unexpected: Vec<&str> = self
            .tensors
            .keys()
            .map(String::as_str)
            .filter(|n| !used.contains(*n) && !skipped.iter().any(|p| n.starts_with(p.as_str())))
            .collect();
        if unexpected.is_empty() {
            return Ok(());
        }
        Err(Error::checkpoint(
            &self.path,
            format!(
                "{} tensors do not belong to the vision towers described by config.json, e.g. \
                 {:?}",
                unexpected.len(),
                &unexpected[..unexpected.len().min(5)]
            ),
        ))
    }
}

/// The file's rank against `oft_eval_cfg.lora_rank` (the reference's strict load fails on a
/// mismatch) and against the training run's `lora_adapter/adapter_config.json`.
fn check_rank(dir: &Path, path: &Path, lora: &LoraMerge) -> Result<()> {
    let config_path = dir.join("config.json");
    if config_path.is_file() {
        let v: serde_json::Value = crate::error::read_json(&config_path)?;
        if let Some(x) = v.get("oft_eval_cfg").and_then(|c| c.get("lora_rank")) {
            if x.as_u64() != Some(lora.rank as u64) {
                return Err(Error::config(
                    &config_path,
                    format!(
                        "oft_eval_cfg.lora_rank is {x}, but the LoRA in {} has rank {} (the \
                         reference's strict load of that file would fail)",
                        path.display(),
                        lora.rank
                    ),
                ));
            }
        }
    }
    let adapter = dir.join("lora_adapter").join("adapter_config.json");
    if adapter.is_file() {
        let v: serde_json::Value = crate::error::read_json(&adapter)?;
        if let Some(r) = v.get("r").and_then(|r| r.as_u64()) {
            if r != lora.rank as u64 {
                return Err(Error::config(
                    &adapter,
                    format!(
                        "r is {r}, but the LoRA in {} has rank {}",
                        path.display(),
                        lora.rank
                    ),
                ));
            }
        }
        if let Some(a) = v.get("lora_alpha").and_then(|a| a.as_f64()) {
            if a != lora.alpha as f64 {
                warn!(
                    "{}: lora_alpha {a} differs from the reference's inference value \
                     min(r, 16) = {}; following the reference (openvla_utils.py:327)",
                    adapter.display(),
                    lora.alpha
                );
            }
        }
    }
    Ok(())
}

impl TowerSource for FilmCheckpoint {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.lookup(name, shape)
    }

    fn weight(
        &self,
        name: &str,
        [rows, cols]: [usize; 2],
        policy: &WeightPolicy,
        kind: LayerKind,
    ) -> Result<Weight> {
        let t = self.lookup(name, &[rows, cols])?;
        Ok(match policy.format_for(kind) {
            Some(format) => {
                let v = t.flatten_all()?.to_vec1::<f32>()?;
                Weight::Quant(Arc::new(QuantMatrix::quantize(format, &v, rows, cols)))
            }
            None => Weight::Dense(t.to_dtype(policy.dtype.dtype())?),
        })
    }

    fn skip_prefix(&self, prefix: &str) {
        if let Ok(mut s) = self.skipped.lock() {
            s.push(prefix.to_string());
        }
    }

    fn film(
        &self,
        block_prefix: &str,
        vision_dim: usize,
        policy: &WeightPolicy,
    ) -> Result<Option<FilmLayer>> {
        for part in ["scale", "shift"] {
            let name = format!("{block_prefix}.{part}.weight");
            if !self.tensors.contains_key(&name) {
                return Err(Error::checkpoint(
                    &self.path,
                    format!(
                        "missing FiLM tensor {:?}: a FiLM vision_backbone file holds `scale` and \
                         `shift` Linears ([{vision_dim}, {}]) for every block of both towers \
                         (film_vit_wrapper.py:53-54, 200-213)",
                        name, self.llm_dim
                    ),
                ));
            }
        }
        let source = Loading {
            source: self,
            policy,
        };
        let linear = |part: &str| {
            source.linear(
                &format!("{block_prefix}.{part}"),
                (self.llm_dim, vision_dim),
                true,
                LayerKind::Vision,
            )
        };
        Ok(Some(FilmLayer::new(linear("scale")?, linear("shift")?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwrap_block_removes_only_the_wrapper_component() {
        assert_eq!(
            unwrap_block("vision_backbone.featurizer.blocks.3.block.attn.qkv.base_layer.weight"),
            "vision_backbone.featurizer.blocks.3.attn.qkv.base_layer.weight"
        );
        assert_eq!(
            unwrap_block("vision_backbone.featurizer.blocks.3.scale.weight"),
            "vision_backbone.featurizer.blocks.3.scale.weight"
        );
        assert_eq!(
            unwrap_block(
                "vision_backbone.fused_featurizer.attn_pool.mlp.fc1.lora_A.default.weight"
            ),
            "vision_backbone.fused_featurizer.attn_pool.mlp.fc1.lora_A.default.weight"
        );
    }

    #[test]
    fn roles() {
        assert!(matches!(role("a.qkv.base_layer.weight"), Role::Base(k) if k == "a.qkv.weight"));
        assert!(matches!(role("a.qkv.base_layer.bias"), Role::Base(k) if k == "a.qkv.bias"));
        assert!(matches!(
            role("a.qkv.lora_A.default.weight"),
            Role::LoraA("a.qkv")
        ));
        assert!(matches!(
            role("a.qkv.lora_B.default.weight"),
            Role::LoraB("a.qkv")
        ));
        assert!(matches!(role("a.norm1.weight"), Role::Plain));
        assert_eq!(reference_lora_alpha(32), 16);
        assert_eq!(reference_lora_alpha(8), 8);
    }

    fn t(shape: &[usize], v: f32) -> Tensor {
        Tensor::full(v, shape, &candle_core::Device::Cpu).unwrap()
    }

    /// One wrapped block: qkv with LoRA (rank `r`), FiLM scale/shift (llm_dim 2, dim 4).
    fn block(r: usize) -> Vec<(String, Tensor)> {
        let p = "vision_backbone.featurizer.blocks.0";
        vec![
            (
                format!("{p}.block.attn.qkv.base_layer.weight"),
                t(&[12, 4], 1.0),
            ),
            (format!("{p}.block.attn.qkv.base_layer.bias"), t(&[12], 0.0)),
            (
                format!("{p}.block.attn.qkv.lora_A.default.weight"),
                t(&[r, 4], 0.5),
            ),
            (
                format!("{p}.block.attn.qkv.lora_B.default.weight"),
                t(&[12, r], 0.25),
            ),
            (format!("{p}.scale.weight"), t(&[4, 2], 0.1)),
            (format!("{p}.scale.bias"), t(&[4], 0.0)),
            (format!("{p}.shift.weight"), t(&[4, 2], 0.1)),
            (format!("{p}.shift.bias"), t(&[4], 0.0)),
        ]
    }

    fn build(named: Vec<(String, Tensor)>) -> Result<FilmCheckpoint> {
        let dir = tempfile::tempdir().unwrap();
        FilmCheckpoint::from_named(&dir.path().join("vb.pt"), dir.path(), 2, named)
    }

    #[test]
    fn lora_is_merged_with_alpha_min_r_16_over_r() {
        for r in [8usize, 32] {
            let c = build(block(r)).unwrap();
            let lora = c.lora().unwrap();
            assert_eq!((lora.rank, lora.alpha, lora.layers), (r, r.min(16), 1));
            let w = c
                .tensor(
                    "vision_backbone.featurizer.blocks.0.attn.qkv.weight",
                    &[12, 4],
                )
                .unwrap();
            // 1 + (alpha / r) * r * 0.25 * 0.5
            let want = 1.0 + r.min(16) as f32 / r as f32 * r as f32 * 0.125;
            let got = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(
                got.iter().all(|v| (v - want).abs() < 1e-6),
                "{got:?} vs {want}"
            );
            // The FiLM Linears are there; the unused ones are reported by finish().
            let wp = WeightPolicy::default();
            assert!(c
                .film("vision_backbone.featurizer.blocks.0", 4, &wp)
                .unwrap()
                .is_some());
            let e = c.finish().unwrap_err().to_string();
            assert!(e.contains("qkv.bias"), "{e}");
        }
    }

    #[test]
    fn malformed_files_are_errors_naming_the_tensor() {
        let err = |named: Vec<(String, Tensor)>| build(named).unwrap_err().to_string();
        // lora_A without lora_B
        let mut named = block(4);
        named.retain(|(n, _)| !n.contains("lora_B"));
        assert!(err(named).contains("qkv: lora_A without lora_B"));
        // LoRA without a base layer
        let mut named = block(4);
        named.retain(|(n, _)| !n.ends_with("base_layer.weight"));
        assert!(err(named).contains("without a base layer"));
        // mixed ranks
        let mut named = block(4);
        named.push((
            "vision_backbone.featurizer.blocks.0.block.mlp.fc1.lora_A.default.weight".into(),
            t(&[8, 4], 0.0),
        ));
        assert!(err(named).contains("rank"));
        // a key outside the vision backbone
        let mut named = block(4);
        named.push(("module.fc1.weight".into(), t(&[1], 0.0)));
        assert!(err(named).contains("module.fc1.weight"));
        // no FiLM at all
        let mut named = block(4);
        named.retain(|(n, _)| !n.contains(".scale.") && !n.contains(".shift."));
        assert!(err(named).contains("no FiLM layers"));
        // one block without its FiLM Linears
        let mut named = block(4);
        named.retain(|(n, _)| !n.contains(".shift."));
        let c = build(named).unwrap();
        let e = c
            .film(
                "vision_backbone.featurizer.blocks.0",
                4,
                &WeightPolicy::default(),
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("blocks.0.shift.weight"), "{e}");
    }

    #[test]
    fn modulate_is_x_times_one_plus_gamma_plus_beta() {
        let dev = candle_core::Device::Cpu;
        // llm_dim 2 -> vision_dim 3.
        let w = |v: &[f32]| Tensor::from_slice(v, (3, 2), &dev).unwrap();
        let b = |v: &[f32]| Tensor::from_slice(v, 3, &dev).unwrap();
        use crate::model::linear::Linear;
        let film = FilmLayer::<crate::model::backend::Infer>::new(
            Linear::from_tensors(w(&[1., 0., 0., 1., 1., 1.]), Some(b(&[0., 0.5, -1.]))),
            Linear::from_tensors(w(&[0., 0., 2., 0., 0., 3.]), Some(b(&[1., 0., 0.]))),
        );
        let lang = Tensor::from_slice(&[0.5f32, 0.25], (1, 2), &dev).unwrap();
        let x = Tensor::from_slice(&[1f32, 2., 3., -1., 0., 4.], (1, 2, 3), &dev).unwrap();
        let y = film.modulate(&(), &x, &lang).unwrap();
        // gamma = [0.5, 0.75, -0.25], beta = [1, 1, 0.75]
        let want = [1.5f32 + 1., 3.5 + 1., 2.25 + 0.75, -1.5 + 1., 1., 3. + 0.75];
        let got = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }
}
