//! OpenVLA-OFT (Kim, Finn, Liang 2025): parallel decoding of action chunks with an L1
//! regression (or 256-bin) head, several images, proprioception (oft-spec.md).
//!
//! A published OFT directory is the base OpenVLA layout (merged safetensors shards, tokenizer,
//! processor config, `dataset_statistics.json` with action *and* proprio statistics) plus
//! component pickles: `action_head--<step>_checkpoint.pt` (bf16) and
//! `proprio_projector--<step>_checkpoint.pt` (fp32), with DDP's `module.` key prefix; FiLM
//! checkpoints add `vision_backbone--<step>_checkpoint.pt` ([`film`]).

pub mod constants;
pub mod film;
pub mod proprio;
pub mod pt;

use crate::action::ActionTokenizer;
use crate::error::{Error, Result};
use crate::head::{ActionHead, MlpResNet};
use candle_core::DType;
use constants::{ConfigFields, OftConstants, OftOptions, Shapes};
use proprio::ProprioProjector;
use std::path::{Path, PathBuf};
use tracing::debug;

/// Component name of the action head file.
pub const ACTION_HEAD: &str = "action_head";
/// Component name of the proprio projector file.
pub const PROPRIO_PROJECTOR: &str = "proprio_projector";

/// The OFT parts of a loaded model besides the shared towers and LLM.
#[derive(Debug, Clone)]
pub struct OftModel {
    /// The resolved constants, each with its source.
    pub constants: OftConstants,
    /// The proprio projector, if the model takes proprio.
    pub proprio: Option<ProprioProjector>,
    /// The component files read.
    pub files: Vec<PathBuf>,
    /// The FiLM `vision_backbone--<step>_checkpoint.pt` whose towers the model runs, if any.
    pub film: Option<PathBuf>,
    /// Whether images are centre-cropped (`oft_eval_cfg.center_crop`; the reference's eval
    /// and deploy scripts default to true, as every published checkpoint was trained with
    /// random crops).
    pub center_crop: bool,
}

impl OftModel {
    /// Number of zeroed placeholder positions: K·D.
    pub fn placeholders(&self) -> usize {
        self.constants.chunk.value * self.constants.action_dim.value
    }
}

/// Detects and loads the OFT components of `dir`.
///
/// `Ok(None)`: an original OpenVLA directory (no component files, no `oft_*` fields in
/// `config.json`, no OFT flags). Otherwise the head and constants; `head_dtype` is the dtype
/// the head's matrices are held in.
pub fn load(
    dir: &Path,
    llm_hidden: usize,
    n_action_bins: usize,
    action_vocab_size: usize,
    options: &OftOptions,
    head_dtype: DType,
) -> Result<Option<(ActionHead, OftModel)>> {
    let config_path = dir.join("config.json");
    let fields = ConfigFields::read(&config_path)?;
    let head_file = pt::find_component(dir, ACTION_HEAD)?;
    let proprio_file = pt::find_component(dir, PROPRIO_PROJECTOR)?;
    let film_file = pt::find_component(dir, film::VISION_BACKBONE)?;
    let noisy_file = pt::find_component(dir, "noisy_action_projector")?;
    let is_oft = head_file.is_some()
        || proprio_file.is_some()
        || fields.present()
        || options.any()
        || film_file.is_some();
    if !is_oft {
        return Ok(None);
    }
    match (&film_file, fields.eval_flag(&config_path, "use_film")?) {
        (Some(f), Some(false)) => {
            return Err(Error::config(
                &config_path,
                format!(
                    "oft_eval_cfg.use_film is false, but the directory holds the FiLM vision \
                     backbone {}: remove one",
                    f.display()
                ),
            ))
        }
        (None, Some(true)) => {
            return Err(Error::config(
                dir,
                "oft_eval_cfg.use_film is true, but there is no \
                 vision_backbone--<step>_checkpoint.pt file (a FiLM checkpoint needs exactly one)",
            ))
        }
        _ => {}
    }
    if noisy_file.is_some() || fields.eval_flag(&config_path, "use_diffusion")? == Some(true) {
        return Err(Error::config(
            dir,
            "this is a diffusion-head OFT checkpoint (noisy_action_projector file or \
             oft_eval_cfg.use_diffusion), which is not supported",
        ));
    }
    let l1 = fields.eval_flag(&config_path, "use_l1_regression")?;
    let mut files = Vec::new();
    if let Some(f) = &film_file {
        files.push(f.clone());
    }
    let head_sd =
        match (&head_file, l1, options.discrete) {
            (Some(f), _, false) if l1 != Some(false) => {
                files.push(f.clone());
                Some(pt::StateDict::read(f)?)
            }
            (Some(f), _, _) => return Err(Error::config(
                f,
                "an action head file is present, but the model is configured as discrete-token \
                 OFT (oft_eval_cfg.use_l1_regression = false or the discrete flag): remove one",
            )),
            (None, Some(false), _) | (None, _, true) => None,
            (None, _, false) => {
                return Err(Error::config(
                    dir,
                    "no action_head--<step>_checkpoint.pt file: an L1 OFT model needs exactly one \
                 (for a discrete-token OFT checkpoint set oft_eval_cfg.use_l1_regression = false \
                 or pass the discrete-head flag)",
                ))
            }
        };
    let proprio_sd = match &proprio_file {
        Some(f) => {
            files.push(f.clone());
            Some(pt::StateDict::read(f)?)
        }
        None => None,
    };
    let shapes = Shapes {
        head_fc2_rows: head_sd
            .as_ref()
            .and_then(|s| s.shape("model.fc2.weight"))
            .and_then(|s| s.first().copied()),
        head_layer_norm1: head_sd
            .as_ref()
            .and_then(|s| s.shape("model.layer_norm1.weight"))
            .and_then(|s| s.first().copied()),
        proprio_fc1_cols: proprio_sd
            .as_ref()
            .and_then(|s| s.shape("fc1.weight"))
            .and_then(|s| s.get(1).copied()),
        llm_hidden,
    };
    let constants = constants::resolve(
        options,
        &fields,
        &config_path,
        &shapes,
        proprio_sd.is_some(),
    )?;
    debug!(?constants, "OFT constants");
    if let (Some(f), None) = (&film_file, &head_sd) {
        // get_vla_action calls predict_action without use_film when there is no action head
        // (openvla_utils.py:781-783), so the reference cannot run FiLM with the 256-bin head.
        return Err(Error::config(
            f,
            "a FiLM vision backbone with the discrete-token (256-bin) head: the reference runs \
             FiLM only with a continuous action head (get_vla_action passes use_film only with \
             an action head, openvla_utils.py:781-795), so this combination has no reference \
             behaviour to reproduce",
        ));
    }
    // Without a head file the model is discrete-token OFT (checked above).
    let head = match head_sd {
        Some(sd) => ActionHead::ParallelL1(MlpResNet::load(&sd, head_dtype)?),
        None => {
            ActionHead::ParallelDiscrete(ActionTokenizer::new(n_action_bins, action_vocab_size))
        }
    };
    let proprio = proprio_sd
        .map(|sd| ProprioProjector::load(&sd, llm_hidden))
        .transpose()?;
    let center_crop = fields
        .eval_flag(&config_path, "center_crop")?
        .unwrap_or(true);
    Ok(Some((
        head,
        OftModel {
            constants,
            proprio,
            files,
            film: film_file,
            center_crop,
        },
    )))
}

/// OFT deploy.py image keys for `n` images: `full_image`, then the wrist keys OFT's clients
/// send (LIBERO: `wrist_image`; ALOHA: `left_wrist_image`, `right_wrist_image`).
pub fn oft_image_keys(n: usize) -> Vec<String> {
    let mut keys = vec!["full_image".to_string()];
    match n {
        0 | 1 => {}
        2 => keys.push("wrist_image".into()),
        3 => keys.extend(["left_wrist_image".into(), "right_wrist_image".into()]),
        _ => keys.extend((1..n).map(|i| format!("wrist_image_{i}"))),
    }
    keys
}
