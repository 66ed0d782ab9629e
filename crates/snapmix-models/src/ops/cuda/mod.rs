//! The CUDA paths of the training ops (issue 7): cuDNN convolutions and our own batch-norm and
//! max-pool kernels, all on candle's stream, called from the ops' `cuda_fwd` and backward.

pub(crate) mod batch_norm;
pub(crate) mod cudnn_conv;
pub(crate) mod max_pool;
pub mod memory;
#[cfg(test)]
mod tests;

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig};
use candle_core::op::BackpropOp;
use candle_core::{bail, CudaDevice, CudaStorage, Layout, Result, Shape, Storage, Tensor};

/// Threads per block of our kernels.
const BLOCK: u32 = 256;

/// The contiguous f32 data of a CUDA storage as a view, or a clear error naming `what`.
pub(crate) fn view_f32<'a>(
    storage: &'a CudaStorage,
    layout: &Layout,
    what: &str,
) -> Result<CudaView<'a, f32>> {
    let Ok(slice) = storage.as_cuda_slice::<f32>() else {
        bail!(
            "{what}: only f32 is supported by this op on CUDA, got {:?}",
            candle_core::backend::BackendStorage::dtype(storage)
        );
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(slice.slice(start..end)),
        None => bail!("{what}: the tensor must be contiguous"),
    }
}

/// A contiguous CUDA tensor's storage, read-locked while borrowed: backward passes receive
/// tensors, not storages.
pub(crate) struct Borrowed<'a> {
    storage: candle_core::StorageRef<'a>,
    layout: &'a Layout,
    what: &'static str,
}

impl<'a> Borrowed<'a> {
    /// Borrows `tensor`'s storage; `what` names it in errors.
    pub(crate) fn new(tensor: &'a Tensor, what: &'static str) -> Self {
        let (storage, layout) = tensor.storage_and_layout();
        Self {
            storage,
            layout,
            what,
        }
    }

    /// The f32 data as a view, or a clear error if the tensor is not a contiguous f32 CUDA one.
    pub(crate) fn view(&self) -> Result<CudaView<'_, f32>> {
        match &*self.storage {
            Storage::Cuda(cuda) => view_f32(cuda, self.layout, self.what),
            other => bail!(
                "{}: expected a CUDA tensor, got one on {:?}",
                self.what,
                other.device().location()
            ),
        }
    }
}

/// Wraps a device buffer as a tensor without copying; it carries no gradient.
pub(crate) fn cuda_tensor(
    slice: CudaSlice<f32>,
    device: &CudaDevice,
    shape: impl Into<Shape>,
) -> Tensor {
    let storage = CudaStorage::wrap_cuda_slice(slice, device.clone());
    Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
}

/// A 1-D launch over `elements` items, one per thread, capped so that the kernels' grid-stride
/// loops cover the rest.
pub(crate) fn launch_1d(elements: usize) -> LaunchConfig {
    let blocks = elements.div_ceil(BLOCK as usize).clamp(1, 65_535 * 8) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Maps a driver error to a candle error naming the op.
pub(crate) fn driver_err(
    what: &'static str,
) -> impl FnOnce(candle_core::cuda_backend::cudarc::driver::DriverError) -> candle_core::Error {
    move |err| candle_core::Error::Msg(format!("{what}: CUDA driver error {err:?}"))
}
