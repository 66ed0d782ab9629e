//! Fine-grained datasets and the input pipeline: CUB-200-2011, Stanford Cars, FGVC-Aircraft,
//! plain image folders and a built-in synthetic fine-grained set, decoded and augmented in
//! parallel straight into contiguous NCHW batches.
//!
//! It depends on candle only for the batch tensor type; it must know nothing of models, mixing
//! or training.

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
mod text;

pub use dataset::{ImageDataset, ImageEntry, ImageList, LoadOptions, Skipped, Splits};
pub use error::{DataError, Origin};
pub mod loader;
pub mod synthetic;
pub mod transform;

pub use loader::{Batch, EpochIter, Loader, LoaderConfig};
pub use synthetic::{SyntheticConfig, SyntheticSet};
pub use transform::{ResizeMode, Transform};
