//! Data-mixing augmentations for fine-grained recognition: SnapMix, CutMix, asymmetric CutMix,
//! Mixup and Cutout, with the label weights each assigns and the mixed cross-entropy loss.
//!
//! Sampling (boxes, partners, Beta draws from a seeded RNG) is separate from applying those
//! parameters to a batch, which is deterministic. It depends on `snapmix-cam` for SPMs and on
//! candle; it knows nothing of files, datasets, models or training loops.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use rand::SeedableRng;
//! use rand_chacha::ChaCha8Rng;
//! use snapmix_cam::semantic_percent_maps;
//! use snapmix_mix::{apply, mixed_cross_entropy, Method, MixConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dev = Device::Cpu;
//! let images = Tensor::randn(0f32, 1.0, (4, 3, 32, 32), &dev)?;
//! let labels = Tensor::new(&[0u32, 1, 2, 1], &dev)?;
//! // What a network would give: last-conv features and its classifier.
//! let features = Tensor::randn(0f32, 1.0, (4, 16, 4, 4), &dev)?;
//! let weight = Tensor::randn(0f32, 1.0, (3, 16), &dev)?;
//! let bias = Tensor::zeros(3, DType::F32, &dev)?;
//!
//! let config = MixConfig { beta: 5.0, ..MixConfig::new(Method::SnapMix) };
//! let mut rng = ChaCha8Rng::seed_from_u64(7);
//! let params = config.sample(&mut rng, 4, 32, 32)?;
//! let spm = semantic_percent_maps(&features, &weight, Some(&bias), &labels, (32, 32))?;
//! let mixed = apply(&params, &images, &labels, Some(&spm))?;
//! assert_eq!(mixed.images.dims(), &[4, 3, 32, 32]);
//!
//! let logits = Tensor::randn(0f32, 1.0, (4, 3), &dev)?;
//! let loss = mixed_cross_entropy(&logits, &mixed, 0.1)?;
//! assert!(loss.to_scalar::<f32>()?.is_finite());
//! # Ok(())
//! # }
//! ```

mod apply;
mod composed;
mod config;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod error;
mod loss;
mod params;

pub use apply::{apply, apply_composed, apply_in_place, MixedBatch};
pub use config::{rand_bbox, MixConfig, MixMode};
pub use error::{MixError, Result};
pub use loss::mixed_cross_entropy;
pub use params::{Method, MixParams, SampleMix};
pub use snapmix_cam::{PixelBox, Spm};
