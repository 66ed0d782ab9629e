//! Peak device memory of a CUDA run, read from the device's memory pool (candle allocates with
//! cuMemAllocAsync, i.e. from that pool), for the benchmarks' memory figures.

use candle_core::{bail, Device, Result};
use cudarc::driver::sys;

/// High-water marks of the device's current memory pool since the last [`reset_peak`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolPeak {
    /// Bytes held by live allocations at the peak: comparable to PyTorch's
    /// `torch.cuda.max_memory_allocated` (both count what tensors and workspaces held, not what
    /// the allocator kept in reserve), up to allocation rounding.
    pub used_bytes: u64,
    /// Bytes the pool had reserved from the driver at the peak (PyTorch's
    /// `max_memory_reserved` counterpart).
    pub reserved_bytes: u64,
}

/// Starts a new measurement: both high-water marks are set to the current values.
pub fn reset_peak(device: &Device) -> Result<()> {
    let pool = current_pool(device)?;
    for attribute in [
        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
    ] {
        // The driver accepts only 0 here, meaning "reset to the current value".
        let mut zero: u64 = 0;
        // SAFETY: a live pool handle and a u64 value, as the attribute requires.
        unsafe { sys::cuMemPoolSetAttribute(pool, attribute, &mut zero as *mut u64 as *mut _) }
            .result()
            .map_err(super::driver_err("memory pool reset"))?;
    }
    Ok(())
}

/// The high-water marks since the last [`reset_peak`] (or since the pool was created). Memory
/// allocated outside the pool (cuMemAlloc, e.g. by cuBLAS for its own workspace) is not counted.
pub fn peak(device: &Device) -> Result<PoolPeak> {
    let pool = current_pool(device)?;
    let read = |attribute| -> Result<u64> {
        let mut value: u64 = 0;
        // SAFETY: a live pool handle and a u64 out-value, as the attribute requires.
        unsafe { sys::cuMemPoolGetAttribute(pool, attribute, &mut value as *mut u64 as *mut _) }
            .result()
            .map_err(super::driver_err("memory pool query"))?;
        Ok(value)
    };
    Ok(PoolPeak {
        used_bytes: read(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
        reserved_bytes: read(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?,
    })
}

/// Bytes held by live allocations in the device's memory pool now.
pub fn used_bytes(device: &Device) -> Result<u64> {
    let pool = current_pool(device)?;
    let mut value: u64 = 0;
    // SAFETY: a live pool handle and a u64 out-value, as the attribute requires.
    unsafe {
        sys::cuMemPoolGetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
            &mut value as *mut u64 as *mut _,
        )
    }
    .result()
    .map_err(super::driver_err("memory pool query"))?;
    Ok(value)
}

/// Makes the device's memory pool keep freed memory for reuse instead of returning it to the
/// driver at each synchronisation (the pool's default threshold is 0), as PyTorch's caching
/// allocator does: otherwise every training step and every fresh batch-sized output re-maps
/// its memory. Devices without memory pools are left as they are.
pub fn retain_freed_memory(device: &Device) -> Result<()> {
    let Device::Cuda(cuda) = device else {
        return Ok(());
    };
    if !cuda.cuda_stream().context().has_async_alloc() {
        return Ok(());
    }
    let pool = current_pool(device)?;
    let mut threshold = u64::MAX;
    // SAFETY: a live pool handle and a u64 value, as the attribute requires.
    unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut _,
        )
    }
    .result()
    .map_err(super::driver_err("memory pool release threshold"))
}

fn current_pool(device: &Device) -> Result<sys::CUmemoryPool> {
    let Device::Cuda(cuda) = device else {
        bail!("memory pool peaks exist only for CUDA devices, got {device:?}");
    };
    let stream = cuda.cuda_stream();
    let context = stream.context();
    if !context.has_async_alloc() {
        bail!("this CUDA device has no memory pools (no cuMemAllocAsync), so no pool peak");
    }
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: a valid device ordinal handle and an out-pointer.
    unsafe { sys::cuDeviceGetMemPool(&mut pool, context.cu_device()) }
        .result()
        .map_err(super::driver_err("cuDeviceGetMemPool"))?;
    Ok(pool)
}
