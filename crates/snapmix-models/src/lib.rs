//! Trainable candle ResNets (torchvision layout and parameter names) that expose the feature
//! maps a CAM needs, an optional mid-level head, and pretrained-weight loading.
//!
//! It depends on candle and on `snapmix-cam` (to implement its `CamSource`); it must know
//! nothing of datasets, mixing or the training loop.
//!
//! Start with [`ResNet::new`] / [`ResNet::from_config`] on a `VarMap`-backed `VarBuilder`, or
//! [`load_pretrained`]; the README's examples (building, training outputs, loading from a file
//! and from the hub) are compiled as this crate's doc tests.

mod arch;
mod error;
pub mod layers;
pub mod ops;
mod resnet;
mod weights;

pub use arch::{Arch, BlockKind};
pub use error::{ModelError, Result};
pub use resnet::{
    is_head_param, MidLevelConfig, Outputs, ParamGroups, ResNet, ResNetConfig, HEAD_PREFIXES,
};
pub use weights::{
    load_pretrained, read_safetensors, HubWeights, LoadOptions, LoadReport, Pretrained,
    WeightSource,
};

/// The README's examples, compiled and run by `cargo test --doc`.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
