//! The errors of training and evaluation, each carrying the offending value, path or step.

use std::path::PathBuf;

/// Everything that can go wrong in a run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A setting is out of range or inconsistent.
    #[error("invalid setting: {0}")]
    InvalidSetting(String),
    /// No preset of that name.
    #[error("unknown preset `{0}`: expected `synthetic` or {{cub,cars,aircraft}}-{{resnet18,resnet34,resnet50,resnet101,resnet152}}[-midlevel][-scratch]")]
    UnknownPreset(String),
    /// A config file could not be parsed.
    #[error("config file {path}: {message}")]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A file or folder could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The run directory already holds a run and neither resume nor overwrite was asked for.
    #[error("{0} already holds a run: pass --resume to continue it or --overwrite to start over")]
    RunExists(PathBuf),
    /// Resume was asked for but there is nothing to resume.
    #[error("cannot resume {path}: {reason}")]
    CannotResume {
        /// The run directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A checkpoint is malformed.
    #[error("checkpoint {path}: {reason}")]
    BadCheckpoint {
        /// The checkpoint folder or file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The saved optimiser state does not fit the parameters.
    #[error("optimizer state: {0}")]
    OptimizerState(String),
    /// The loss became NaN or infinite.
    #[error("non-finite loss {loss} at epoch {epoch}, step {step} (global step {global_step}); batch mixing: {mixing}. The last good checkpoint is left as it was.")]
    NonFiniteLoss {
        /// The loss value.
        loss: f32,
        /// 0-based epoch.
        epoch: usize,
        /// 0-based step within the epoch.
        step: usize,
        /// Steps since the start of training.
        global_step: usize,
        /// The mixing parameters of the batch.
        mixing: String,
    },
    /// The dataset or its pipeline failed.
    #[error(transparent)]
    Data(#[from] snapmix_data::DataError),
    /// The model could not be built or loaded.
    #[error(transparent)]
    Model(#[from] snapmix_models::ModelError),
    /// Mixing failed.
    #[error(transparent)]
    Mix(#[from] snapmix_mix::MixError),
    /// CAM computation failed.
    #[error(transparent)]
    Cam(#[from] snapmix_cam::CamError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// JSON (metrics, checkpoint state) could not be written or read.
    #[error("{path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        source: serde_json::Error,
    },
}
