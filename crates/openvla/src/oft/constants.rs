//! OFT's per-checkpoint constants (chunk size K, action dimension D, proprio dimension, image
//! count, normalization type), which a checkpoint does not store (oft-spec §5).
//!
//! Each is taken, in this order, from: the caller's flags; `config.json`'s `oft_constants` /
//! `oft_eval_cfg` fields; the `--platform` preset; the tensor shapes that determine it (the
//! head's `fc2` gives D, its `layer_norm1` gives D·hidden, the proprio projector's `fc1` gives
//! the proprio dimension). Nothing is guessed: a constant nothing determines is an error naming
//! it, and a shape that contradicts a given value is an error naming both. Every resolved value
//! records where it came from, for `openvla inspect`.

use crate::error::{Error, Result};
use serde_json::Value;
use std::fmt;
use std::path::Path;

/// OFT's robot platforms (`prismatic/vla/constants.py`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    /// LIBERO: K=8, D=7, proprio 8, BOUNDS_Q99, 2 images (third-person + wrist).
    Libero,
    /// ALOHA: K=25, D=14, proprio 14, BOUNDS, 3 images (primary, left wrist, right wrist).
    Aloha,
    /// Bridge: K=5, D=7, proprio 7, BOUNDS_Q99 (no published image count).
    Bridge,
}

/// The constants of a platform preset.
#[derive(Debug, Clone, Copy)]
struct Preset {
    chunk: usize,
    action_dim: usize,
    proprio_dim: usize,
    normalization: NormalizationType,
    num_images: Option<usize>,
}

impl Platform {
    /// The preset's constants (`prismatic/vla/constants.py`; image counts of the published
    /// LIBERO and ALOHA configurations).
    fn preset(self) -> Preset {
        let (chunk, action_dim, proprio_dim, normalization, num_images) = match self {
            Platform::Libero => (8, 7, 8, NormalizationType::BoundsQ99, Some(2)),
            Platform::Aloha => (25, 14, 14, NormalizationType::Bounds, Some(3)),
            Platform::Bridge => (5, 7, 7, NormalizationType::BoundsQ99, None),
        };
        Preset {
            chunk,
            action_dim,
            proprio_dim,
            normalization,
            num_images,
        }
    }
}

impl std::str::FromStr for Platform {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "libero" => Ok(Platform::Libero),
            "aloha" => Ok(Platform::Aloha),
            "bridge" => Ok(Platform::Bridge),
            _ => Err(format!(
                "unknown platform {s:?}; expected libero, aloha or bridge"
            )),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Platform::Libero => "libero",
            Platform::Aloha => "aloha",
            Platform::Bridge => "bridge",
        })
    }
}

/// `ACTION_PROPRIO_NORMALIZATION_TYPE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormalizationType {
    /// (min, max).
    Bounds,
    /// (q01, q99).
    BoundsQ99,
}

impl std::str::FromStr for NormalizationType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "bounds" => Ok(NormalizationType::Bounds),
            "bounds_q99" => Ok(NormalizationType::BoundsQ99),
            _ => Err(format!(
                "unknown normalization type {s:?}; expected bounds or bounds_q99"
            )),
        }
    }
}

impl fmt::Display for NormalizationType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NormalizationType::Bounds => "bounds",
            NormalizationType::BoundsQ99 => "bounds_q99",
        })
    }
}

/// Where a constant came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A flag / load option.
    Flag,
    /// A field of `config.json` (`oft_constants.X` or `oft_eval_cfg.X`).
    Config(String),
    /// The platform preset.
    Platform(Platform),
    /// A tensor shape (names the tensor).
    Shape(String),
    /// Not applicable: the model has no such input (e.g. no proprio projector).
    Absent(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Flag => f.write_str("flag"),
            Source::Config(field) => write!(f, "config.json {field}"),
            Source::Platform(p) => write!(f, "--platform {p} preset"),
            Source::Shape(t) => write!(f, "shape of {t}"),
            Source::Absent(why) => f.write_str(why),
        }
    }
}

/// A value and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved<T> {
    /// The value.
    pub value: T,
    /// Its source.
    pub source: Source,
}

/// User-supplied OFT settings (flags); `None` = not given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OftOptions {
    /// `--platform`.
    pub platform: Option<Platform>,
    /// `--chunk`: actions per chunk (K).
    pub chunk: Option<usize>,
    /// `--action-dim` (D).
    pub action_dim: Option<usize>,
    /// `--proprio-dim`.
    pub proprio_dim: Option<usize>,
    /// `--num-images`.
    pub num_images: Option<usize>,
    /// `--normalization`.
    pub normalization: Option<NormalizationType>,
    /// `--oft-discrete`: the checkpoint is discrete-token OFT (no action head file).
    pub discrete: bool,
}

impl OftOptions {
    /// Whether any flag was given (a flag alone makes a directory an OFT model).
    pub fn any(&self) -> bool {
        *self != OftOptions::default()
    }
}

/// The resolved constants of an OFT model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OftConstants {
    /// Actions per chunk (K).
    pub chunk: Resolved<usize>,
    /// Action dimension (D).
    pub action_dim: Resolved<usize>,
    /// Proprio dimension, or `None` when the model takes no proprio.
    pub proprio_dim: Resolved<Option<usize>>,
    /// Images per observation (primary first, then wrist views).
    pub num_images: Resolved<usize>,
    /// Normalization of actions and proprio.
    pub normalization: Resolved<NormalizationType>,
}

/// What the checkpoint's tensors say.
#[derive(Debug, Clone, Default)]
pub struct Shapes {
    /// The L1 head's `fc2.weight` rows (D), with the tensor's name.
    pub head_fc2_rows: Option<usize>,
    /// The L1 head's `layer_norm1` width (D·hidden).
    pub head_layer_norm1: Option<usize>,
    /// The proprio projector's `fc1.weight` columns.
    pub proprio_fc1_cols: Option<usize>,
    /// The LLM hidden size.
    pub llm_hidden: usize,
}

/// The `oft_constants` and `oft_eval_cfg` objects of `config.json` (absent = empty).
#[derive(Debug, Clone, Default)]
pub struct ConfigFields {
    constants: serde_json::Map<String, Value>,
    eval_cfg: serde_json::Map<String, Value>,
}

impl ConfigFields {
    /// Reads the two fields from `config.json`.
    pub fn read(config_path: &Path) -> Result<ConfigFields> {
        let v: Value = crate::error::read_json(config_path)?;
        let obj = |name: &str| -> Result<serde_json::Map<String, Value>> {
            match v.get(name) {
                None | Some(Value::Null) => Ok(Default::default()),
                Some(Value::Object(m)) => Ok(m.clone()),
                Some(other) => Err(Error::config(
                    config_path,
                    format!("{name} must be an object, found {other}"),
                )),
            }
        };
        Ok(ConfigFields {
            constants: obj("oft_constants")?,
            eval_cfg: obj("oft_eval_cfg")?,
        })
    }

    /// Whether either field is present.
    pub fn present(&self) -> bool {
        !self.constants.is_empty() || !self.eval_cfg.is_empty()
    }

    fn usize(&self, path: &Path, table: &str, key: &str) -> Result<Option<usize>> {
        let m = if table == "oft_constants" {
            &self.constants
        } else {
            &self.eval_cfg
        };
        match m.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
                Error::config(
                    path,
                    format!("{table}.{key} must be a non-negative integer, found {v}"),
                )
            }),
        }
    }

    /// A boolean of `oft_eval_cfg`.
    pub fn eval_flag(&self, path: &Path, key: &str) -> Result<Option<bool>> {
        match self.eval_cfg.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(Error::config(
                path,
                format!("oft_eval_cfg.{key} must be true or false, found {v}"),
            )),
        }
    }

    fn normalization(&self, path: &Path) -> Result<Option<NormalizationType>> {
        match self.constants.get("ACTION_PROPRIO_NORMALIZATION_TYPE") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => s.parse().map(Some).map_err(|e: String| {
                Error::config(
                    path,
                    format!("oft_constants.ACTION_PROPRIO_NORMALIZATION_TYPE: {e}"),
                )
            }),
            Some(v) => Err(Error::config(
                path,
                format!(
                    "oft_constants.ACTION_PROPRIO_NORMALIZATION_TYPE must be a string, found {v}"
                ),
            )),
        }
    }
}

/// Picks the first of the given candidates.
fn first<T: Clone>(cands: &[(Option<T>, Source)]) -> Option<Resolved<T>> {
    cands.iter().find_map(|(v, s)| {
        v.clone().map(|value| Resolved {
            value,
            source: s.clone(),
        })
    })
}

/// Resolves every constant (see the module docs). `has_proprio` says whether a proprio
/// projector file exists; `config_path` names `config.json` in errors.
pub fn resolve(
    flags: &OftOptions,
    cfg: &ConfigFields,
    config_path: &Path,
    shapes: &Shapes,
    has_proprio: bool,
) -> Result<OftConstants> {
    let preset = flags.platform.map(Platform::preset);
    let plat = |f: fn(&Preset) -> Option<usize>| preset.as_ref().and_then(f);
    let plat_src = || Source::Platform(flags.platform.unwrap_or(Platform::Libero));
    let missing = |name: &str, flag: &str, field: &str| {
        Error::config(
            config_path,
            format!(
                "the OFT constant {name} is not determined: give {flag} or --platform, or set \
                 {field} in config.json (a checkpoint does not store it)"
            ),
        )
    };
    let conf = |k: &str| format!("oft_constants.{k}");

    let chunk = first(&[
        (flags.chunk, Source::Flag),
        (
            cfg.usize(config_path, "oft_constants", "NUM_ACTIONS_CHUNK")?,
            Source::Config(conf("NUM_ACTIONS_CHUNK")),
        ),
        (plat(|p| Some(p.chunk)), plat_src()),
    ])
    .ok_or_else(|| {
        missing(
            "chunk size (NUM_ACTIONS_CHUNK)",
            "--chunk",
            "oft_constants.NUM_ACTIONS_CHUNK",
        )
    })?;
    if chunk.value == 0 {
        return Err(Error::config(
            config_path,
            format!(
                "the chunk size is 0 (from {}); it must be at least 1",
                chunk.source
            ),
        ));
    }

    let shape_d = shapes.head_fc2_rows;
    let action_dim = first(&[
        (flags.action_dim, Source::Flag),
        (
            cfg.usize(config_path, "oft_constants", "ACTION_DIM")?,
            Source::Config(conf("ACTION_DIM")),
        ),
        (plat(|p| Some(p.action_dim)), plat_src()),
        (
            shape_d,
            Source::Shape("action head model.fc2.weight".into()),
        ),
    ])
    .ok_or_else(|| {
        missing(
            "action dimension (ACTION_DIM)",
            "--action-dim",
            "oft_constants.ACTION_DIM",
        )
    })?;
    if let Some(d) = shape_d {
        if d != action_dim.value {
            return Err(Error::config(
                config_path,
                format!(
                    "the action dimension is {} (from {}), but the action head's \
                     model.fc2.weight has {d} rows",
                    action_dim.value, action_dim.source
                ),
            ));
        }
    }
    if let Some(w) = shapes.head_layer_norm1 {
        let want = action_dim.value * shapes.llm_hidden;
        if w != want {
            return Err(Error::config(
                config_path,
                format!(
                    "the action head's model.layer_norm1 has width {w}, but the action dimension \
                     {} (from {}) times the LLM hidden size {} is {want}",
                    action_dim.value, action_dim.source, shapes.llm_hidden
                ),
            ));
        }
    }

    let proprio_dim = if has_proprio {
        let given = first(&[
            (flags.proprio_dim, Source::Flag),
            (
                cfg.usize(config_path, "oft_constants", "PROPRIO_DIM")?,
                Source::Config(conf("PROPRIO_DIM")),
            ),
            (plat(|p| Some(p.proprio_dim)), plat_src()),
            (
                shapes.proprio_fc1_cols,
                Source::Shape("proprio projector fc1.weight".into()),
            ),
        ])
        .ok_or_else(|| {
            missing(
                "proprio dimension (PROPRIO_DIM)",
                "--proprio-dim",
                "oft_constants.PROPRIO_DIM",
            )
        })?;
        if let Some(p) = shapes.proprio_fc1_cols {
            if p != given.value {
                return Err(Error::config(
                    config_path,
                    format!(
                        "the proprio dimension is {} (from {}), but the proprio projector's \
                         fc1.weight has {p} columns",
                        given.value, given.source
                    ),
                ));
            }
        }
        Resolved {
            value: Some(given.value),
            source: given.source,
        }
    } else {
        if cfg.eval_flag(config_path, "use_proprio")? == Some(true) {
            return Err(Error::config(
                config_path,
                "oft_eval_cfg.use_proprio is true but the directory has no \
                 proprio_projector--<step>_checkpoint.pt file",
            ));
        }
        Resolved {
            value: None,
            source: Source::Absent("no proprio_projector checkpoint file".into()),
        }
    };

    let num_images = first(&[
        (flags.num_images, Source::Flag),
        (
            cfg.usize(config_path, "oft_eval_cfg", "num_images_in_input")?,
            Source::Config("oft_eval_cfg.num_images_in_input".into()),
        ),
        (plat(|p| p.num_images), plat_src()),
    ])
    .ok_or_else(|| {
        missing(
            "number of input images",
            "--num-images",
            "oft_eval_cfg.num_images_in_input",
        )
    })?;
    if num_images.value == 0 {
        return Err(Error::config(
            config_path,
            format!(
                "the image count is 0 (from {}); it must be at least 1",
                num_images.source
            ),
        ));
    }

    let normalization = first(&[
        (flags.normalization, Source::Flag),
        (
            cfg.normalization(config_path)?,
            Source::Config(conf("ACTION_PROPRIO_NORMALIZATION_TYPE")),
        ),
        (preset.map(|p| p.normalization), plat_src()),
    ])
    .ok_or_else(|| {
        missing(
            "normalization type (ACTION_PROPRIO_NORMALIZATION_TYPE)",
            "--normalization",
            "oft_constants.ACTION_PROPRIO_NORMALIZATION_TYPE",
        )
    })?;

    Ok(OftConstants {
        chunk,
        action_dim,
        proprio_dim,
        num_images,
        normalization,
    })
}
