//! `CamSource`: what any backbone must provide for CAMs, so this crate needs no model code.

use candle_core::{Result, Tensor};

/// A network whose class activation maps can be computed: a last conv stage followed by global
/// pooling and a linear classifier (ResNet, DenseNet, EfficientNet, ...).
///
/// Implementing it takes a few lines: run the body, hand out the classifier's parameters.
pub trait CamSource {
    /// Runs the network body on `images` `[B, 3, H, W]` and returns the last-conv feature maps
    /// `[B, C, h, w]` (before global pooling). `train` selects batch-norm mode: the official
    /// SnapMix computes CAMs in train mode, which also updates running statistics.
    fn cam_features(&self, images: &Tensor, train: bool) -> Result<Tensor>;

    /// The classifier's weight `[K, C]`.
    fn classifier_weight(&self) -> &Tensor;

    /// The classifier's bias `[K]`, if it has one.
    fn classifier_bias(&self) -> Option<&Tensor>;
}
