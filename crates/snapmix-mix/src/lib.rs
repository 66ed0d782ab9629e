//! Data-mixing augmentations for fine-grained recognition: SnapMix, CutMix, asymmetric CutMix,
//! Mixup and Cutout, with the label weights each assigns and the mixed cross-entropy loss.
//!
//! Sampling (boxes, partners, Beta draws from a seeded RNG) is separate from applying those
//! parameters to a batch, which is deterministic. It depends on `snapmix-cam` for SPMs and on
//! candle; it must know nothing of files, datasets, models or training loops.
