//! Tensor ops that candle 0.11.1 lacks or runs without a backward pass.

pub mod max_pool;
