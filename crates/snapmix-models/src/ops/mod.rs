//! Tensor ops that candle 0.11.1 lacks or runs without a backward pass.

pub mod add_relu;
pub mod max_pool;
// GEMM-based conv2d and fused batch norm for training (issue 9), with their CPU plumbing.
pub mod batch_norm;
pub mod bn_add_relu;
pub mod conv2d;
pub mod conv_bn;
mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dispatch;
#[cfg(test)]
mod test_util;
