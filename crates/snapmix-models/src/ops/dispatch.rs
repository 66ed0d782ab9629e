//! A process-wide switch between the fused training ops and candle's composed ops, so one
//! model can be run both ways (the benchmark's reference path, or a numerical cross-check).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

static COMPOSED: AtomicBool = AtomicBool::new(false);

/// Makes every later [`conv2d`](super::conv2d::conv2d) and
/// [`batch_norm_train`](super::batch_norm::batch_norm_train) call use candle's composed ops
/// (`true`) or the fused custom ops where the device has them (`false`, the default).
pub fn set_composed_ops(composed: bool) {
    COMPOSED.store(composed, Ordering::Relaxed);
}

/// Whether the composed ops were asked for.
pub fn composed_ops() -> bool {
    COMPOSED.load(Ordering::Relaxed)
}

static ALLOW_TF32: AtomicBool = AtomicBool::new(true);

/// Lets CUDA convolutions use TF32 tensor cores (`true`, the default, like PyTorch's
/// `torch.backends.cudnn.allow_tf32`: about 10 mantissa bits in the products, roughly twice as
/// fast on Ampere and later) or keeps them strict fp32 (`false`). Later calls pick it up; each
/// setting keeps its own measured algorithms. The CPU ops are always strict fp32.
pub fn set_allow_tf32(allow: bool) {
    ALLOW_TF32.store(allow, Ordering::Relaxed);
}

/// Whether CUDA convolutions may use TF32.
pub fn allow_tf32() -> bool {
    ALLOW_TF32.load(Ordering::Relaxed)
}

/// The default of [`set_conv_workspace_limit`]: 1 GiB.
pub const DEFAULT_CONV_WORKSPACE_LIMIT: usize = 1 << 30;

static CONV_WORKSPACE_LIMIT: AtomicUsize = AtomicUsize::new(DEFAULT_CONV_WORKSPACE_LIMIT);

/// Caps the scratch memory a cuDNN convolution algorithm may use (bytes): algorithms needing
/// more are never chosen. Lower it to trade speed for peak memory. Applies to shapes measured
/// after the call.
pub fn set_conv_workspace_limit(bytes: usize) {
    CONV_WORKSPACE_LIMIT.store(bytes, Ordering::Relaxed);
}

/// The current cap of [`set_conv_workspace_limit`].
pub fn conv_workspace_limit() -> usize {
    CONV_WORKSPACE_LIMIT.load(Ordering::Relaxed)
}

/// Whether `device` has the fused custom ops for f32: the CPU always, CUDA when this crate was
/// built with its `cuda` feature (cuDNN convolutions and our kernels).
pub(crate) fn has_fused_ops(device: &candle_core::Device) -> bool {
    device.is_cpu() || (cfg!(feature = "cuda") && device.is_cuda())
}
