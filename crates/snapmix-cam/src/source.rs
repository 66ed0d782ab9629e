//! `CamSource`: what any backbone must provide for CAMs, so this crate needs no model code.

use candle_core::{Result, Tensor};

use crate::{semantic_percent_maps, Spm};

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

    /// The SPMs of `images` `[B, 3, rows, cols]` for their labels `targets` `[B]`: runs the
    /// body (`train` as in [`CamSource::cam_features`]) and calls [`semantic_percent_maps`]
    /// with this network's classifier, at the images' own size.
    fn semantic_percent_maps(
        &self,
        images: &Tensor,
        targets: &Tensor,
        train: bool,
    ) -> crate::Result<Spm> {
        let (_, _, rows, cols) = images.dims4()?;
        let features = self.cam_features(images, train)?;
        semantic_percent_maps(
            &features,
            self.classifier_weight(),
            self.classifier_bias(),
            targets,
            (rows, cols),
        )
    }
}
