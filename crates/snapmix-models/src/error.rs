//! The crate's error type: every failure names the file, tensor or value at fault.

use std::path::PathBuf;

/// Errors from building, running, loading or saving a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// An architecture name that is not one of `resnet18/34/50/101/152`.
    #[error("unknown architecture `{0}`: expected one of resnet18, resnet34, resnet50, resnet101, resnet152")]
    UnknownArch(String),

    /// A model configuration value that cannot work (zero classes, zero width...).
    #[error("invalid model configuration: {0}")]
    InvalidConfig(String),

    /// A tensor in a weights file has a different shape than the model's parameter.
    #[error(
        "{source_name}: tensor `{name}` has shape {found:?} but the model expects {expected:?}"
    )]
    ShapeMismatch {
        /// The file or map the tensor came from.
        source_name: String,
        /// The tensor's name.
        name: String,
        /// The model's shape.
        expected: Vec<usize>,
        /// The file's shape.
        found: Vec<usize>,
    },

    /// Names in a weights file that the model does not have.
    #[error("{source_name}: {} unexpected tensor(s) the model does not have: {}", names.len(), names.join(", "))]
    UnexpectedTensors {
        /// The file or map the tensors came from.
        source_name: String,
        /// The offending names.
        names: Vec<String>,
    },

    /// Model parameters or buffers that a weights file lacks.
    #[error("{source_name}: {} tensor(s) missing: {}", names.len(), names.join(", "))]
    MissingTensors {
        /// The file or map that lacks them.
        source_name: String,
        /// The missing names.
        names: Vec<String>,
    },

    /// A tensor stored with a dtype that cannot be converted to the model's float dtype.
    #[error("{source_name}: tensor `{name}` has dtype {dtype}, expected a float dtype")]
    UnsupportedDtype {
        /// The file or map the tensor came from.
        source_name: String,
        /// The tensor's name.
        name: String,
        /// The stored dtype.
        dtype: String,
    },

    /// Reading or writing a weights file failed.
    #[error("weights file {path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },

    /// Fetching weights from the Hugging Face hub failed.
    #[error(
        "could not get `{filename}` of hub repo `{repo_id}`{}: {message}. Without network access, \
         download https://huggingface.co/{repo_id}/resolve/main/{filename} elsewhere and load it with \
         `WeightSource::File(path)`",
        if *offline { " in offline mode (cache only)" } else { "" }
    )]
    Hub {
        /// The hub repository, e.g. `timm/resnet50.tv_in1k`.
        repo_id: String,
        /// The file inside it, e.g. `model.safetensors`.
        filename: String,
        /// Whether only the local cache was consulted.
        offline: bool,
        /// The hub client's error.
        message: String,
    },

    /// A model built from plain tensors (not a `VarMap`) cannot hand out trainable variables.
    #[error("parameter `{0}` is not a trainable variable: build the model from a VarMap-backed VarBuilder")]
    NotAVariable(String),

    /// An error inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, ModelError>;
