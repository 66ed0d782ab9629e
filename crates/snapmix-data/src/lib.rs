//! Fine-grained datasets and the input pipeline: CUB-200-2011, Stanford Cars, FGVC-Aircraft,
//! plain image folders and a built-in synthetic fine-grained set, decoded and augmented in
//! parallel straight into contiguous NCHW batches.
//!
//! It depends on candle only for the batch tensor type; it must know nothing of models, mixing
//! or training.
