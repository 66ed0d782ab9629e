//! The SnapMix training and evaluation loop: wires a dataset pipeline, a model and a mixing
//! method together with the optimiser, learning-rate schedule, checkpoints and metrics.
//!
//! This is the only library crate that depends on the others; nothing may depend on it.

pub mod config;
pub mod data;
mod error;
pub mod eval;
pub mod metrics;
pub mod optim;
mod optim_cpu;
#[cfg(feature = "cuda")]
mod optim_cuda;
pub mod rundir;
pub mod schedule;
pub mod trainer;

pub use config::{Overrides, TrainConfig};
pub use error::TrainError;
pub use eval::{evaluate, ClassCount, EvalResult};
pub use metrics::{read_metrics, MetricRecord, MetricsWriter};
pub use optim::{NamedVar, ParamGroup, Sgd, SgdSettings};
pub use rundir::{Checkpoint, EvalRecord, RunDir, StartMode, TrainState};
pub use schedule::MultiStepLr;
pub use trainer::{
    EpochSummary, Observer, Outcome, RunSummary, Silent, StepProgress, Trainer, TrainerOptions,
};

/// The top-level README's examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct TopLevelReadme;
