//! Per-dataset configuration: the reference's `OXE_DATASET_CONFIGS` plus the standardization
//! choice of `OXE_STANDARDIZATION_TRANSFORMS`, reduced to what VLA training loads (primary
//! camera, language, 7-D EEF_POS actions). Built in for `bridge_orig` (alias `bridge_dataset`),
//! `bridge_oxe` (alias `bridge`, the Open-X copy), `fractal20220817_data` and the four
//! `libero_*_no_noops` suites. Custom datasets are described by a small TOML or JSON file with
//! the same fields as [`DatasetConfig`]:
//!
//! ```toml
//! name = "my_robot"
//! image_key = "observation/image"          # relative to the step (RLDS) or a LeRobot column
//! language_key = "language_instruction"
//! action_keys = ["action"]                  # concatenated in order
//! gripper = "close_is_1"                   # see GripperConvention
//! drop_first_step = false
//! noop_filter = "none"                     # or "libero"
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

/// How the dataset encodes the gripper (last action column). Standardization maps every
/// convention to 1 = open, 0 = closed (spec §6.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GripperConvention {
    /// Already absolute, 1 = open, 0 = closed: kept as is.
    #[serde(rename = "open_is_1")]
    OpenIs1,
    /// Absolute, 1 = closed, 0 = open: `1 - g`.
    #[serde(rename = "close_is_1")]
    CloseIs1,
    /// LIBERO: -1 = open, +1 = close: `1 - clip(g, 0, 1)`.
    Libero,
    /// Relative (+1 close, -1 open, 0 no change), as RT-1/fractal: `rel2abs_gripper_actions`.
    Relative,
    /// Continuous, near 1 open / near 0 closed with intermediate values, as Bridge:
    /// `binarize_gripper_actions`.
    Binarize,
    /// Kept exactly as stored, whatever its convention (e.g. Meta-World's gripper effort in
    /// [-1, 1]): for policies that learn the dataset's own action space, as OFT heads do.
    AsIs,
}

/// The no-op filter applied before standardization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoopFilter {
    /// Keep every step.
    #[default]
    None,
    /// LIBERO's rule (spec §7.8): drop a step when `‖a[:6]‖ < 1e-4` and its gripper action equals
    /// the previous *kept* step's (for the first kept step only the norm test applies).
    Libero,
}

/// Action encodings the reference accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionEncoding {
    /// EEF delta XYZ (3) + roll-pitch-yaw (3) + gripper (1).
    #[default]
    EefPos,
    /// EEF delta XYZ (3) + R6 (6) + gripper (1).
    EefR6,
    /// The dataset's own action space of this many dimensions, every one normalized (as
    /// ALOHA's all-true mask): `action_encoding = { raw = 4 }` in a config file.
    Raw(usize),
}

impl ActionEncoding {
    /// Action dimension.
    pub fn dim(self) -> usize {
        match self {
            ActionEncoding::EefPos => 7,
            ActionEncoding::EefR6 => 10,
            ActionEncoding::Raw(n) => n,
        }
    }

    /// The reference's `action_normalization_mask`: every dimension but the gripper for the
    /// EEF encodings; every dimension for [`ActionEncoding::Raw`].
    pub fn normalization_mask(self) -> Vec<bool> {
        let mut m = vec![true; self.dim()];
        if !matches!(self, ActionEncoding::Raw(_)) {
            if let Some(last) = m.last_mut() {
                *last = false;
            }
        }
        m
    }
}

fn default_language_key() -> String {
    "language_instruction".to_string()
}

/// Describes how to turn one dataset's steps into a standardized [`crate::Trajectory`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// Dataset name (also the statistics key / `unnorm_key`).
    pub name: String,
    /// Primary camera feature, relative to the step (`observation/image_0`) or a LeRobot column
    /// (`observation.images.image`).
    pub image_key: String,
    /// Optional wrist camera (OFT's second image; read only when a consumer asks for it).
    #[serde(default)]
    pub wrist_image_key: Option<String>,
    /// Language feature relative to the step; for LeRobot, `task` means the episode's task.
    #[serde(default = "default_language_key")]
    pub language_key: String,
    /// Action features, concatenated in order; the last column is the gripper.
    pub action_keys: Vec<String>,
    /// State feature, needed when `relabel_actions_from_state` is set.
    #[serde(default)]
    pub state_key: Option<String>,
    /// Gripper convention of the raw data.
    pub gripper: GripperConvention,
    /// Drop the first step (Bridge: its action is all zero).
    #[serde(default)]
    pub drop_first_step: bool,
    /// Bridge: movement actions become `state[t+1,:6] - state[t,:6]`, last step dropped.
    #[serde(default)]
    pub relabel_actions_from_state: bool,
    /// No-op filtering rule.
    #[serde(default)]
    pub noop_filter: NoopFilter,
    /// Action encoding (sets the dimension and the normalization mask).
    #[serde(default)]
    pub action_encoding: ActionEncoding,
}

/// Names with a built-in configuration.
pub const BUILTIN_DATASETS: &[&str] = &[
    "bridge_orig",
    "bridge_dataset",
    "bridge_oxe",
    "bridge",
    "fractal20220817_data",
    "libero_spatial_no_noops",
    "libero_object_no_noops",
    "libero_goal_no_noops",
    "libero_10_no_noops",
    "libero_spatial",
    "libero_object",
    "libero_goal",
    "libero_10",
];

impl DatasetConfig {
    /// The built-in configuration for `name`, if there is one.
    pub fn builtin(name: &str) -> Option<Self> {
        let s = |x: &str| x.to_string();
        let base = |image: &str, lang: &str, actions: &[&str], gripper| DatasetConfig {
            name: s(name),
            image_key: s(image),
            wrist_image_key: None,
            language_key: s(lang),
            action_keys: actions.iter().map(|a| s(a)).collect(),
            state_key: None,
            gripper,
            drop_first_step: false,
            relabel_actions_from_state: false,
            noop_filter: NoopFilter::None,
            action_encoding: ActionEncoding::EefPos,
        };
        match name {
            // bridge_orig_dataset_transform
            "bridge_orig" | "bridge_dataset" => Some(DatasetConfig {
                state_key: Some(s("observation/state")),
                drop_first_step: true,
                relabel_actions_from_state: true,
                ..base(
                    "observation/image_0",
                    "language_instruction",
                    &["action"],
                    GripperConvention::Binarize,
                )
            }),
            // bridge_oxe_dataset_transform (the Open-X copy, named `bridge` there)
            "bridge_oxe" | "bridge" => Some(DatasetConfig {
                state_key: Some(s("observation/state")),
                drop_first_step: true,
                relabel_actions_from_state: true,
                ..base(
                    "observation/image",
                    "observation/natural_language_instruction",
                    &[
                        "action/world_vector",
                        "action/rotation_delta",
                        "action/open_gripper",
                    ],
                    GripperConvention::OpenIs1,
                )
            }),
            // rt1_dataset_transform
            "fractal20220817_data" => Some(base(
                "observation/image",
                "observation/natural_language_instruction",
                &[
                    "action/world_vector",
                    "action/rotation_delta",
                    "action/gripper_closedness_action",
                ],
                GripperConvention::Relative,
            )),
            // libero_dataset_transform; the raw (non-regenerated) suites get the no-op filter.
            n if n.starts_with("libero_") && BUILTIN_DATASETS.contains(&n) => Some(DatasetConfig {
                wrist_image_key: Some(s("observation/wrist_image")),
                state_key: Some(s("observation/state")),
                noop_filter: if n.ends_with("_no_noops") {
                    NoopFilter::None
                } else {
                    NoopFilter::Libero
                },
                ..base(
                    "observation/image",
                    "language_instruction",
                    &["action"],
                    GripperConvention::Libero,
                )
            }),
            _ => None,
        }
    }

    /// Loads a custom configuration from a `.toml` or `.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
        let is_json = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        let cfg: DatasetConfig = if is_json {
            serde_json::from_str(&text).map_err(|e| DataError::metadata(path, e.to_string()))?
        } else {
            toml::from_str(&text).map_err(|e| DataError::metadata(path, e.to_string()))?
        };
        cfg.validate().map_err(|m| DataError::metadata(path, m))?;
        Ok(cfg)
    }

    /// Checks internal consistency.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.action_keys.is_empty() {
            return Err("`action_keys` is empty".into());
        }
        if self.action_encoding == ActionEncoding::Raw(0) {
            return Err("`action_encoding = { raw = N }` needs N >= 1".into());
        }
        if self.relabel_actions_from_state && self.state_key.is_none() {
            return Err("`relabel_actions_from_state` needs `state_key`".into());
        }
        Ok(())
    }

    /// The wrist camera key, or an error saying the config names none.
    pub fn wrist_key(&self) -> Result<&str> {
        self.wrist_image_key.as_deref().ok_or_else(|| {
            DataError::Invalid(format!(
                "dataset `{}` has no wrist camera in its configuration (set `wrist_image_key` \
                 in a --dataset-config file)",
                self.name
            ))
        })
    }

    /// The configuration for `name`: a custom file when given, else the built-in one.
    pub fn resolve(name: &str, custom: Option<&Path>) -> Result<Self> {
        if let Some(p) = custom {
            return Self::from_file(p);
        }
        Self::builtin(name).ok_or_else(|| {
            DataError::Invalid(format!(
                "no built-in standardization for dataset `{name}` (built in: {}); describe it with --dataset-config FILE (TOML or JSON, see openvla_data::oxe::configs)",
                BUILTIN_DATASETS.join(", ")
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_validate() {
        for n in BUILTIN_DATASETS {
            let c = DatasetConfig::builtin(n).unwrap();
            c.validate().unwrap();
            assert_eq!(c.name, *n);
        }
        assert!(DatasetConfig::builtin("kuka").is_none());
        let err = DatasetConfig::resolve("kuka", None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--dataset-config"), "{err}");
    }

    #[test]
    fn toml_and_json() {
        let dir = std::env::temp_dir().join(format!("ovd-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let t = dir.join("c.toml");
        std::fs::write(
            &t,
            "name = \"r\"\nimage_key = \"observation/image\"\naction_keys = [\"action\"]\ngripper = \"close_is_1\"\n",
        )
        .unwrap();
        let c = DatasetConfig::from_file(&t).unwrap();
        assert_eq!(c.gripper, GripperConvention::CloseIs1);
        assert_eq!(c.language_key, "language_instruction");
        let j = dir.join("c.json");
        std::fs::write(
            &j,
            r#"{"name":"r","image_key":"i","action_keys":["a"],"gripper":"nope"}"#,
        )
        .unwrap();
        let err = DatasetConfig::from_file(&j).unwrap_err().to_string();
        assert!(err.contains("c.json"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
