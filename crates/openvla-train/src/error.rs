//! Errors of the training crate.

use std::path::PathBuf;

/// Everything that can go wrong while preparing, running or saving a fine-tuning run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A tensor operation failed.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    /// The inference library reported an error (config, tokenizer, ...).
    #[error(transparent)]
    Model(#[from] openvla::Error),
    /// The data library reported an error.
    #[error(transparent)]
    Data(#[from] openvla_data::DataError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A JSON file is malformed.
    #[error("{path}: invalid JSON: {message}")]
    Json {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A user-supplied value (flag, sample, adapter file) is invalid.
    #[error("{0}")]
    Invalid(String),
    /// A LoRA adapter directory does not match PEFT's format or the model.
    #[error("adapter {path}: {message}")]
    Adapter {
        /// The adapter directory or file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A training checkpoint is missing, incomplete or inconsistent with the run.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// The checkpoint directory.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The loss became NaN or infinite; the run stopped and the last good checkpoint is kept.
    #[error(
        "the loss is {loss} at step {step}; training stopped. The last good checkpoint is {}",
        last_good.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "none (no checkpoint was written yet)".into())
    )]
    NonFiniteLoss {
        /// The optimizer step (1-based) whose loss was not finite.
        step: u64,
        /// The value.
        loss: f32,
        /// The newest checkpoint written before it, if any.
        last_good: Option<PathBuf>,
    },
    /// The estimated memory of a run exceeds what is available.
    #[error("{0}")]
    OutOfMemory(String),
    /// The dataset's action dimension differs from the model's.
    #[error("{0}")]
    ActionDimMismatch(String),
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, TrainError>;

impl TrainError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TrainError::Io {
            path: path.into(),
            source,
        }
    }

    /// A JSON error on `path`.
    pub fn json(path: impl Into<PathBuf>, message: impl ToString) -> Self {
        TrainError::Json {
            path: path.into(),
            message: message.to_string(),
        }
    }

    /// An adapter error on `path`.
    pub fn adapter(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        TrainError::Adapter {
            path: path.into(),
            message: message.into(),
        }
    }

    /// A checkpoint error on `path`.
    pub fn checkpoint(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        TrainError::Checkpoint {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Reads and parses a JSON file.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| TrainError::json(path, e))
}
