//! `MixParams`: everything random about one mixing step, as plain data that `apply` replays.

use crate::{MixError, Result};
use snapmix_cam::PixelBox;
use std::fmt;
use std::str::FromStr;

/// A mixing method, as in the official SnapMix code (`utils/mixmethod.py`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Method {
    /// Asymmetric boxes from two Beta draws; the partner's box_b is resized into box_a; label
    /// weights from the semantic mass (SPM) each box removes or carries.
    SnapMix,
    /// One box pasted from the partner at the same place; area-corrected label weights.
    CutMix,
    /// Asymmetric CutMix: like SnapMix's geometry but area label weights; pastes only when both
    /// boxes cover more than 4 pixels.
    AsCutMix,
    /// Pixel-wise blend `lam * x + (1 - lam) * x_partner`.
    Mixup,
    /// A box (from a fixed lam of 0.75) filled with 0; labels unchanged.
    Cutout,
    /// Leave the sample alone.
    #[default]
    None,
}

impl Method {
    /// Every method, in a fixed order (for benchmarks and tables).
    pub const ALL: [Method; 6] = [
        Method::SnapMix,
        Method::CutMix,
        Method::AsCutMix,
        Method::Mixup,
        Method::Cutout,
        Method::None,
    ];

    /// The name used on command lines and in the golden files.
    pub const fn name(self) -> &'static str {
        match self {
            Method::SnapMix => "snapmix",
            Method::CutMix => "cutmix",
            Method::AsCutMix => "as_cutmix",
            Method::Mixup => "mixup",
            Method::Cutout => "cutout",
            Method::None => "none",
        }
    }

    /// Whether the sample's second label comes from a partner image.
    pub const fn has_partner(self) -> bool {
        matches!(
            self,
            Method::SnapMix | Method::CutMix | Method::AsCutMix | Method::Mixup
        )
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Method {
    type Err = MixError;

    fn from_str(s: &str) -> Result<Self> {
        Method::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| MixError::UnknownMethod(s.to_string()))
    }
}

/// What happens to one sample: its method, boxes and Beta draws.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleMix {
    /// The method applied to this sample (`None` when the probability draw said no).
    pub method: Method,
    /// The region of this image that is replaced (`[row0, col0, row1, col1]`, half-open).
    pub box_a: PixelBox,
    /// The region of the partner image that is cut out and resized into `box_a`
    /// (equal to `box_a` for CutMix and Cutout).
    pub box_b: PixelBox,
    /// The Beta draw behind `box_a`; for Mixup, the blend coefficient of this image.
    pub lam: f64,
    /// The Beta draw behind `box_b` (SnapMix), else equal to `lam`.
    pub lam1: f64,
}

impl SampleMix {
    /// A sample left unchanged.
    pub const fn none() -> Self {
        Self {
            method: Method::None,
            box_a: PixelBox::new(0, 0, 0, 0),
            box_b: PixelBox::new(0, 0, 0, 0),
            lam: 1.0,
            lam1: 1.0,
        }
    }
}

/// The random part of one mixing step for a batch of `rows x cols` images: which partner each
/// image is mixed with, and each sample's method, boxes and lambdas. Pure data: sample it with
/// [`crate::MixConfig::sample`], build it by hand, or load it from a golden file, then
/// [`crate::apply`] it.
#[derive(Debug, Clone, PartialEq)]
pub struct MixParams {
    /// Image rows the boxes refer to.
    pub rows: usize,
    /// Image cols the boxes refer to.
    pub cols: usize,
    /// Partner of each image: image `i` is mixed with image `perm[i]` (may be `i` itself).
    pub perm: Vec<usize>,
    /// One entry per image (all equal in batch mode).
    pub samples: Vec<SampleMix>,
    /// SnapMix's rule: when an image and its partner share a label, both label weights become
    /// their sum (the official code does this; off, the weights stay as computed).
    pub same_label_rule: bool,
}

impl MixParams {
    /// Parameters that leave a batch of `batch` images unchanged.
    pub fn identity(batch: usize, rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            perm: (0..batch).collect(),
            samples: vec![SampleMix::none(); batch],
            same_label_rule: true,
        }
    }

    /// The same `sample` for every image of the batch, with partners `perm` (batch mode).
    pub fn batch_mode(rows: usize, cols: usize, perm: Vec<usize>, sample: SampleMix) -> Self {
        let samples = vec![sample; perm.len()];
        Self {
            rows,
            cols,
            perm,
            samples,
            same_label_rule: true,
        }
    }

    /// Batch size.
    pub fn batch(&self) -> usize {
        self.samples.len()
    }

    /// Whether applying these parameters needs SPMs (some sample uses SnapMix).
    pub fn needs_spm(&self) -> bool {
        self.samples.iter().any(|s| s.method == Method::SnapMix)
    }

    /// Checks that partners are inside the batch, boxes inside the image and Mixup
    /// coefficients in [0, 1].
    pub fn validate(&self) -> Result<()> {
        let batch = self.batch();
        if batch == 0 {
            return Err(MixError::EmptyBatch);
        }
        if self.rows == 0 || self.cols == 0 {
            return Err(MixError::EmptyImage {
                rows: self.rows,
                cols: self.cols,
            });
        }
        if self.perm.len() != batch {
            return Err(MixError::Shape {
                what: "perm",
                expected: format!("[{batch}] (one partner per sample)"),
                got: vec![self.perm.len()],
            });
        }
        for (sample, (&partner, s)) in self.perm.iter().zip(&self.samples).enumerate() {
            if partner >= batch {
                return Err(MixError::PermOutOfRange {
                    sample,
                    partner,
                    batch,
                });
            }
            let boxes: &[PixelBox] = match s.method {
                Method::SnapMix | Method::CutMix | Method::AsCutMix => &[s.box_a, s.box_b],
                Method::Cutout => &[s.box_a],
                Method::Mixup | Method::None => &[],
            };
            if let Some(&bbox) = boxes.iter().find(|b| !b.fits(self.rows, self.cols)) {
                return Err(MixError::BoxOutside {
                    sample,
                    bbox,
                    rows: self.rows,
                    cols: self.cols,
                });
            }
            if s.method == Method::Mixup && !(0.0..=1.0).contains(&s.lam) {
                return Err(MixError::InvalidLam { sample, lam: s.lam });
            }
        }
        Ok(())
    }
}
