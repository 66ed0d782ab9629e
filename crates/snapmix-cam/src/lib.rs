//! Class activation maps (CAMs) and semantic percent maps (SPMs) for SnapMix.
//!
//! Given the last-conv feature maps of a CNN and its linear classifier, this crate computes the
//! CAM of each sample's own label, upsamples it to the image size and normalises it into an SPM
//! that sums to one, reporting degenerate (all-zero or non-finite) maps per sample. It knows
//! nothing of boxes, mixing, files or any particular model: it depends only on candle.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use snapmix_cam::{semantic_percent_maps, PixelBox};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dev = Device::Cpu;
//! // Last-conv features of 2 images (C = 8 channels on a 4x4 grid) and a 3-class classifier.
//! let features = Tensor::randn(0f32, 1.0, (2, 8, 4, 4), &dev)?;
//! let weight = Tensor::randn(0f32, 1.0, (3, 8), &dev)?;
//! let bias = Tensor::zeros(3, candle_core::DType::F32, &dev)?;
//! let labels = Tensor::new(&[2u32, 0], &dev)?;
//!
//! let spm = semantic_percent_maps(&features, &weight, Some(&bias), &labels, (32, 32))?;
//! assert_eq!(spm.maps()?.dims(), &[2, 32, 32]);
//! assert_eq!(spm.cam().dims(), &[2, 4, 4]);
//! // Each non-degenerate map sums to one; a box holds a share of that mass.
//! let whole = spm.box_sums(&[0, 1], &[PixelBox::full(32, 32); 2])?;
//! for (mass, degenerate) in whole.iter().zip(spm.degenerate()?) {
//!     assert!(degenerate || (mass - 1.0).abs() < 1e-6);
//! }
//! # Ok(())
//! # }
//! ```

mod composed;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod error;
mod interp;
mod pixel_box;
mod source;
mod spm;

pub use error::{CamError, Result};
pub use interp::Taps as BilinearTaps;
pub use pixel_box::PixelBox;
pub use source::CamSource;
pub use spm::{semantic_percent_maps, semantic_percent_maps_composed, Spm};
