//! A process-wide switch between the fused training ops and candle's composed ops, so one
//! model can be run both ways (the benchmark's reference path, or a numerical cross-check).

use std::sync::atomic::{AtomicBool, Ordering};

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
