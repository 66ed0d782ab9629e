//! The error type of this crate: every bad configuration or input names the offending value.

use snapmix_cam::{CamError, PixelBox};

/// Why mixing parameters could not be sampled or applied, or a loss computed.
#[derive(Debug, thiserror::Error)]
pub enum MixError {
    /// Beta draws need a positive, finite concentration.
    #[error("beta must be positive and finite, got {0}")]
    InvalidBeta(f64),
    /// A probability outside [0, 1].
    #[error("{what} must be a probability in [0, 1], got {value}")]
    InvalidProb {
        /// Which probability.
        what: &'static str,
        /// Its value.
        value: f64,
    },
    /// The switch probabilities add up to more than 1.
    #[error("switch probabilities add up to {0}, more than 1")]
    SwitchTotal(f64),
    /// Label smoothing outside [0, 1).
    #[error("label smoothing must be in [0, 1), got {0}")]
    InvalidSmoothing(f64),
    /// A method name that is not one of the known ones.
    #[error(
        "unknown mixing method `{0}`: expected snapmix, cutmix, as_cutmix, mixup, cutout or none"
    )]
    UnknownMethod(String),
    /// A mixup coefficient outside [0, 1].
    #[error("mixing coefficient lam of sample {sample} must be in [0, 1], got {lam}")]
    InvalidLam {
        /// Sample index.
        sample: usize,
        /// Its coefficient.
        lam: f64,
    },
    /// The batch is empty.
    #[error("the batch is empty")]
    EmptyBatch,
    /// The image size has a zero side.
    #[error("images must be at least 1x1, got {rows}x{cols}")]
    EmptyImage {
        /// Rows.
        rows: usize,
        /// Cols.
        cols: usize,
    },
    /// A tensor does not have the rank or shape this operation needs.
    #[error("{what} must have shape {expected}, got {got:?}")]
    Shape {
        /// Which argument.
        what: &'static str,
        /// The shape it must have.
        expected: String,
        /// The shape it has.
        got: Vec<usize>,
    },
    /// A box does not lie inside the image or has its corners swapped.
    #[error("box {bbox} of sample {sample} is not inside the {rows}x{cols} image")]
    BoxOutside {
        /// Sample index.
        sample: usize,
        /// The box.
        bbox: PixelBox,
        /// Image rows.
        rows: usize,
        /// Image cols.
        cols: usize,
    },
    /// A partner index past the end of the batch.
    #[error("partner {partner} of sample {sample} is outside the batch of {batch}")]
    PermOutOfRange {
        /// Sample index.
        sample: usize,
        /// Its partner.
        partner: usize,
        /// Batch size.
        batch: usize,
    },
    /// SnapMix needs semantic percent maps.
    #[error("SnapMix needs the batch's SPMs: pass `Some(&spm)` (see snapmix_cam::semantic_percent_maps)")]
    MissingSpm,
    /// Targets must be integers.
    #[error("targets must have an integer dtype (u8, u32 or i64), got {0:?}")]
    TargetDType(candle_core::DType),
    /// Images must be floating point.
    #[error("images must have a float dtype, got {0:?}")]
    ImageDType(candle_core::DType),
    /// A label is not one of the logits' classes.
    #[error("target {target} of sample {sample} is outside the {classes} classes of the logits")]
    TargetOutOfRange {
        /// Sample index.
        sample: usize,
        /// Its label.
        target: i64,
        /// Number of classes K.
        classes: usize,
    },
    /// An error computing CAMs or box sums.
    #[error(transparent)]
    Cam(#[from] CamError),
    /// An error from candle (device, allocation, ...).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, MixError>;
