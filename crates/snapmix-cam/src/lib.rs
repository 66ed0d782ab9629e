//! Class activation maps (CAMs) and semantic percent maps (SPMs) for SnapMix.
//!
//! Given the last-conv feature maps of a CNN and its linear classifier, this crate computes the
//! CAM of each sample's own label, upsamples it to the image size and normalises it into an SPM
//! that sums to one, reporting degenerate (all-zero or non-finite) maps per sample. It knows
//! nothing of boxes, mixing, files or any particular model: it must depend only on candle.

mod source;

pub use source::CamSource;
