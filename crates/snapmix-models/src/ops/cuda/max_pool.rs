//! The CUDA path of the max pool with backward: kernels in max_pool.cu (PTX from build.rs), the
//! same first-maximum rule as the CPU op.

use super::{launch_1d, view_f32};
use crate::ops::max_pool::MaxPool2d;
use candle_core::{bail, CudaStorage, Layout, Result, Shape};
use cudarc::driver::PushKernelArg;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/max_pool.ptx"));
const MODULE: &str = "snapmix_max_pool";

/// Sizes a kernel needs: `[planes, rows, cols]` in, `[planes, out_rows, out_cols]` out.
struct Geometry {
    planes: usize,
    rows: usize,
    cols: usize,
    out_rows: usize,
    out_cols: usize,
}

impl Geometry {
    fn new(pool: MaxPool2d, layout: &Layout) -> Result<(Self, (usize, usize))> {
        let (batch, channels, rows, cols) = layout.shape().dims4()?;
        let (out_rows, out_cols) = pool.output_size(rows, cols)?;
        let geometry = Self {
            planes: batch * channels,
            rows,
            cols,
            out_rows,
            out_cols,
        };
        Ok((geometry, (batch, channels)))
    }
}

/// Pools a contiguous f32 `[B, C, rows, cols]` storage.
pub(crate) fn forward(
    pool: MaxPool2d,
    storage: &CudaStorage,
    layout: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let (g, (batch, channels)) = Geometry::new(pool, layout)?;
    let device = storage.device.clone();
    let x = view_f32(storage, layout, "max_pool2d input")?;
    let total = g.planes * g.out_rows * g.out_cols;
    // SAFETY: the kernel writes every output element.
    let mut out = unsafe { device.alloc::<f32>(total) }?;
    let func = device.get_or_load_custom_func("max_pool_forward", MODULE, PTX)?;
    let mut args = func.builder();
    args.arg(&x)
        .arg(&mut out)
        .arg(&g.planes)
        .arg(&g.rows)
        .arg(&g.cols)
        .arg(&g.out_rows)
        .arg(&g.out_cols)
        .arg(&pool.kernel)
        .arg(&pool.stride)
        .arg(&pool.padding);
    // SAFETY: argument types and order match the kernel; the buffers hold what it reads.
    unsafe { args.launch(launch_1d(total)) }.map_err(super::driver_err("max_pool_forward"))?;
    let shape = Shape::from((batch, channels, g.out_rows, g.out_cols));
    Ok((CudaStorage::wrap_cuda_slice(out, device), shape))
}

/// The input gradient from the input and the output's gradient (both contiguous f32).
pub(crate) fn backward(
    pool: MaxPool2d,
    input: &CudaStorage,
    input_layout: &Layout,
    grad_out: &CudaStorage,
    grad_layout: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let (g, (batch, channels)) = Geometry::new(pool, input_layout)?;
    let expected = (batch, channels, g.out_rows, g.out_cols);
    if grad_layout.shape().dims4()? != expected {
        bail!(
            "max_pool2d backward: gradient shape {:?}, expected {expected:?}",
            grad_layout.shape()
        )
    }
    let device = input.device.clone();
    let x = view_f32(input, input_layout, "max_pool2d input")?;
    let grad = view_f32(grad_out, grad_layout, "max_pool2d output gradient")?;
    let total = g.planes * g.rows * g.cols;
    // SAFETY: the kernel writes every input-gradient element.
    let mut grad_in = unsafe { device.alloc::<f32>(total) }?;
    let func = device.get_or_load_custom_func("max_pool_backward", MODULE, PTX)?;
    let mut args = func.builder();
    args.arg(&x)
        .arg(&grad)
        .arg(&mut grad_in)
        .arg(&g.planes)
        .arg(&g.rows)
        .arg(&g.cols)
        .arg(&g.out_rows)
        .arg(&g.out_cols)
        .arg(&pool.kernel)
        .arg(&pool.stride)
        .arg(&pool.padding);
    // SAFETY: as above.
    unsafe { args.launch(launch_1d(total)) }.map_err(super::driver_err("max_pool_backward"))?;
    Ok((
        CudaStorage::wrap_cuda_slice(grad_in, device),
        input_layout.shape().clone(),
    ))
}
