//! The error type of this crate: every bad input is reported with the offending value.

use crate::PixelBox;

/// Why a CAM or SPM could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum CamError {
    /// A tensor does not have the rank or shape this operation needs.
    #[error("{what} must have shape {expected}, got {got:?}")]
    Shape {
        /// Which argument.
        what: &'static str,
        /// The shape it must have, in words.
        expected: &'static str,
        /// The shape it has.
        got: Vec<usize>,
    },
    /// The classifier's input width differs from the number of feature channels.
    #[error("classifier weight has {weight} input channels but the features have {features}")]
    ChannelMismatch {
        /// Channels C of the features `[B, C, h, w]`.
        features: usize,
        /// Columns of the weight `[K, C]`.
        weight: usize,
    },
    /// The bias length differs from the number of classes.
    #[error("classifier bias has {bias} entries but the weight has {classes} classes")]
    BiasMismatch {
        /// Rows K of the weight.
        classes: usize,
        /// Length of the bias.
        bias: usize,
    },
    /// Features and targets disagree on the batch size.
    #[error("features hold {features} samples but targets hold {targets}")]
    BatchMismatch {
        /// Batch size of the features.
        features: usize,
        /// Number of targets.
        targets: usize,
    },
    /// The batch is empty.
    #[error("the batch is empty")]
    EmptyBatch,
    /// A label is not one of the classifier's classes.
    #[error(
        "target {target} of sample {sample} is outside the {classes} classes of the classifier"
    )]
    TargetOutOfRange {
        /// Sample index.
        sample: usize,
        /// Its label.
        target: i64,
        /// Number of classes K.
        classes: usize,
    },
    /// Targets must be integers.
    #[error("targets must have an integer dtype (u8, u32 or i64), got {0:?}")]
    TargetDType(candle_core::DType),
    /// Features, weight and bias must be floating point.
    #[error("{what} must have a float dtype, got {dtype:?}")]
    FloatDType {
        /// Which argument.
        what: &'static str,
        /// Its dtype.
        dtype: candle_core::DType,
    },
    /// The output size has a zero side.
    #[error("the SPM size must be at least 1x1, got {rows}x{cols}")]
    EmptySize {
        /// Requested rows.
        rows: usize,
        /// Requested cols.
        cols: usize,
    },
    /// A box does not lie inside the image, or has its corners swapped.
    #[error("box {bbox} is not inside the {rows}x{cols} image")]
    BoxOutside {
        /// The box.
        bbox: PixelBox,
        /// Image rows.
        rows: usize,
        /// Image cols.
        cols: usize,
    },
    /// A sample index refers past the end of the batch.
    #[error("sample index {index} is outside the batch of {batch}")]
    SampleOutOfRange {
        /// The index.
        index: usize,
        /// The batch size.
        batch: usize,
    },
    /// Box-sum requests must come in (sample, box) pairs.
    #[error("{samples} sample indices but {boxes} boxes")]
    BoxCountMismatch {
        /// Number of sample indices.
        samples: usize,
        /// Number of boxes.
        boxes: usize,
    },
    /// An error from candle (device, allocation, ...).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, CamError>;
