//! Trainable candle ResNets (torchvision layout and parameter names) that expose the feature
//! maps a CAM needs, an optional mid-level head, and pretrained-weight loading.
//!
//! It depends on candle and on `snapmix-cam` (to implement its `CamSource`); it must know
//! nothing of datasets, mixing or the training loop.
