//! Fine-grained datasets and the input pipeline: CUB-200-2011, Stanford Cars, FGVC-Aircraft,
//! plain image folders and a built-in synthetic fine-grained set, decoded and augmented in
//! parallel straight into contiguous NCHW batches.
//!
//! It depends on candle only for the batch tensor type; it must know nothing of models, mixing
//! or training.
//!
//! ```
//! use std::sync::Arc;
//! use snapmix_data::synthetic::Split;
//! use snapmix_data::{Loader, LoaderConfig, ResizeMode, SyntheticConfig, SyntheticSet, Transform};
//!
//! // The built-in synthetic fine-grained set: 10 classes told apart by a small part.
//! let config = SyntheticConfig { train_per_class: 4, ..Default::default() };
//! let train = SyntheticSet::new(&config, Split::Train)?;
//! let loader = Loader::new(
//!     Arc::new(train),
//!     Transform::train(ResizeMode::Keep, 64, 64), // real datasets: train(mode, 512, 448)
//!     LoaderConfig::train(8, 42),                 // batch 8, seed 42
//! )?;
//! for batch in loader.epoch(0) {
//!     let batch = batch?;
//!     let images = batch.images_tensor(&candle_core::Device::Cpu)?; // [8, 3, 64, 64]
//!     assert_eq!(images.dims(), &[8, 3, 64, 64]);
//!     assert!(batch.masks.is_some()); // ground-truth part masks, same crop/flip
//! }
//! # Ok::<(), snapmix_data::DataError>(())
//! ```
//!
//! Real datasets: [`cub::load`], [`cars::load`], [`aircraft::load`] and [`folder::load`] return
//! [`Splits`] whose `train`/`test` [`ImageList`]s go to [`Loader::new`] the same way.

pub mod aircraft;
#[cfg(feature = "candle-datasets")]
pub mod candle_dataset;
pub mod cars;
pub mod cub;
mod dataset;
pub mod decode;
mod error;
pub mod folder;
pub mod mat5;
mod object_box;
mod text;

pub use dataset::{ImageDataset, ImageEntry, ImageList, LoadOptions, Skipped, Splits};
pub use error::{DataError, Origin};
pub use object_box::{ListedBox, ObjectBox};
pub mod loader;
pub mod synthetic;
pub mod transform;

pub use loader::{Batch, EpochIter, Loader, LoaderConfig};
pub use synthetic::{SyntheticConfig, SyntheticSet};
pub use transform::{ResizeMode, Transform};
