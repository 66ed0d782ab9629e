//! The CUDA path of the fused training batch norm (+ ReLU): kernels in batch_norm.cu, compiled to
//! PTX by build.rs; the same statistics, saved tensors and gradients as the CPU path.

use super::{cuda_tensor, launch_1d, view_f32, Borrowed, BLOCK};
use candle_core::{CudaDevice, CudaStorage, Layout, Result, Tensor};
use cudarc::driver::{LaunchConfig, PushKernelArg};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/batch_norm.ptx"));
const MODULE: &str = "snapmix_batch_norm";

/// Axis sizes of a `[batch, channels, ...]` input; `pixels` per image and channel.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BnShape {
    pub batch: usize,
    pub channels: usize,
    pub pixels: usize,
}

impl BnShape {
    fn count(&self) -> usize {
        self.batch * self.pixels
    }

    fn total(&self) -> usize {
        self.count() * self.channels
    }

    /// Grid `(channels, splits)` of the per-channel sum kernels: block (c, s) sums channel c of
    /// the images s, s + splits, ...; enough blocks in all to fill the GPU even when there are
    /// few channels (the stem has 64).
    fn per_channel(&self) -> LaunchConfig {
        let splits = 1024usize
            .div_ceil(self.channels)
            .clamp(1, self.batch.max(1));
        LaunchConfig {
            grid_dim: (self.channels as u32, splits as u32, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Grid `(planes, y)` of the elementwise kernels: block (p, y) covers plane p (one image's
    /// channel) from pixel y * BLOCK on, so a thread finds its channel without dividing.
    fn per_plane(&self) -> LaunchConfig {
        let rows = self.pixels.div_ceil(BLOCK as usize).clamp(1, 65_535);
        LaunchConfig {
            grid_dim: ((self.batch * self.channels) as u32, rows as u32, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// The batch statistics of one forward, on the device: what the caller folds into its running
/// averages (`mean`, `var` biased) and what backward reads (`mean`, `inv_std`).
pub(crate) struct DeviceStats {
    pub mean: Tensor,
    pub var: Tensor,
    pub inv_std: Tensor,
}

/// What follows the normalisation in the forward pass.
pub(crate) enum Tail<'a> {
    /// ReLU when `true`, nothing otherwise.
    Plain(bool),
    /// `relu(. + residual)`, the residual of the input's shape.
    AddRelu(&'a CudaStorage, &'a Layout),
}

/// Forward: the normalised output (followed by `tail`) and the batch statistics.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    shape: BnShape,
    eps: f32,
    tail: Tail,
    x: &CudaStorage,
    x_layout: &Layout,
    gamma: &CudaStorage,
    g_layout: &Layout,
    beta: &CudaStorage,
    b_layout: &Layout,
) -> Result<(CudaStorage, DeviceStats)> {
    let device = x.device.clone();
    let x = view_f32(x, x_layout, "batch_norm_train input")?;
    let gamma = view_f32(gamma, g_layout, "batch_norm_train gamma")?;
    let beta = view_f32(beta, b_layout, "batch_norm_train beta")?;
    let BnShape {
        batch,
        channels,
        pixels,
    } = shape;
    let (count, total) = (shape.count(), shape.total());
    let mut sums = device.alloc_zeros::<f64>(2 * channels)?;
    {
        let func = device.get_or_load_custom_func("bn_channel_sums", MODULE, PTX)?;
        let mut args = func.builder();
        args.arg(&x)
            .arg(&batch)
            .arg(&channels)
            .arg(&pixels)
            .arg(&mut sums);
        // SAFETY: argument types and order match the kernel; the buffers hold what it reads.
        unsafe { args.launch(shape.per_channel()) }
            .map_err(super::driver_err("bn_channel_sums"))?;
    }
    // SAFETY: each of these is fully written by bn_finalize_stats.
    let (mut mean, mut var, mut inv_std) = unsafe {
        (
            device.alloc::<f32>(channels)?,
            device.alloc::<f32>(channels)?,
            device.alloc::<f32>(channels)?,
        )
    };
    {
        let func = device.get_or_load_custom_func("bn_finalize_stats", MODULE, PTX)?;
        let eps = eps as f64;
        let mut args = func.builder();
        args.arg(&sums)
            .arg(&x)
            .arg(&channels)
            .arg(&pixels)
            .arg(&count)
            .arg(&eps)
            .arg(&mut mean)
            .arg(&mut var)
            .arg(&mut inv_std);
        // SAFETY: as above.
        unsafe { args.launch(launch_1d(channels)) }
            .map_err(super::driver_err("bn_finalize_stats"))?;
    }
    // SAFETY: bn_apply and bn_apply_add_relu write every element.
    let mut out = unsafe { device.alloc::<f32>(total) }?;
    match tail {
        Tail::Plain(relu) => {
            let func = device.get_or_load_custom_func("bn_apply", MODULE, PTX)?;
            let relu = relu as i32;
            let mut args = func.builder();
            args.arg(&x)
                .arg(&mean)
                .arg(&inv_std)
                .arg(&gamma)
                .arg(&beta)
                .arg(&mut out)
                .arg(&channels)
                .arg(&pixels)
                .arg(&relu);
            // SAFETY: as above.
            unsafe { args.launch(shape.per_plane()) }.map_err(super::driver_err("bn_apply"))?;
        }
        Tail::AddRelu(residual, r_layout) => {
            let residual = view_f32(residual, r_layout, "batch_norm_add_relu_train residual")?;
            if residual.len() != total {
                candle_core::bail!(
                    "batch_norm_add_relu_train: the residual has {} values, the input {total}",
                    residual.len()
                );
            }
            let func = device.get_or_load_custom_func("bn_apply_add_relu", MODULE, PTX)?;
            let mut args = func.builder();
            args.arg(&x)
                .arg(&mean)
                .arg(&inv_std)
                .arg(&gamma)
                .arg(&beta)
                .arg(&residual)
                .arg(&mut out)
                .arg(&channels)
                .arg(&pixels);
            // SAFETY: as above; the residual holds `total` values.
            unsafe { args.launch(shape.per_plane()) }
                .map_err(super::driver_err("bn_apply_add_relu"))?;
        }
    }
    let stats = DeviceStats {
        mean: cuda_tensor(mean, &device, channels),
        var: cuda_tensor(var, &device, channels),
        inv_std: cuda_tensor(inv_std, &device, channels),
    };
    Ok((CudaStorage::wrap_cuda_slice(out, device), stats))
}

/// What backward reads: the op's input, gamma, output (for the ReLU mask) and the output's
/// gradient, all contiguous CUDA tensors, and the forward's statistics.
pub(crate) struct BackwardInputs<'a> {
    pub x: &'a Tensor,
    pub gamma: &'a Tensor,
    pub out: &'a Tensor,
    pub grad: &'a Tensor,
    pub stats: &'a DeviceStats,
    pub relu: bool,
    pub input_grad: bool,
}

/// Gradients `(x, gamma, beta)`; the input's only when `input_grad`.
pub(crate) fn backward(
    shape: BnShape,
    inp: BackwardInputs,
) -> Result<(Option<Tensor>, Tensor, Tensor)> {
    let device: CudaDevice = inp.x.device().as_cuda_device()?.clone();
    let borrowed = [
        Borrowed::new(inp.x, "batch_norm_train input"),
        Borrowed::new(inp.out, "batch_norm_train output"),
        Borrowed::new(inp.grad, "batch_norm_train output gradient"),
        Borrowed::new(&inp.stats.mean, "batch_norm_train mean"),
        Borrowed::new(&inp.stats.inv_std, "batch_norm_train inv_std"),
        Borrowed::new(inp.gamma, "batch_norm_train gamma"),
    ];
    let [x, out, grad, mean, inv_std, gamma] = [
        borrowed[0].view()?,
        borrowed[1].view()?,
        borrowed[2].view()?,
        borrowed[3].view()?,
        borrowed[4].view()?,
        borrowed[5].view()?,
    ];
    let BnShape {
        batch,
        channels,
        pixels,
    } = shape;
    let (count, total) = (shape.count(), shape.total());
    let relu = inp.relu as i32;
    let mut sums = device.alloc_zeros::<f64>(2 * channels)?;
    {
        let func = device.get_or_load_custom_func("bn_grad_sums", MODULE, PTX)?;
        let mut args = func.builder();
        args.arg(&x)
            .arg(&out)
            .arg(&grad)
            .arg(&mean)
            .arg(&batch)
            .arg(&channels)
            .arg(&pixels)
            .arg(&relu)
            .arg(&mut sums);
        // SAFETY: argument types and order match the kernel; the buffers hold what it reads.
        unsafe { args.launch(shape.per_channel()) }.map_err(super::driver_err("bn_grad_sums"))?;
    }
    // SAFETY: fully written by bn_grad_params.
    let (mut grad_gamma, mut grad_beta) = unsafe {
        (
            device.alloc::<f32>(channels)?,
            device.alloc::<f32>(channels)?,
        )
    };
    {
        let func = device.get_or_load_custom_func("bn_grad_params", MODULE, PTX)?;
        let mut args = func.builder();
        args.arg(&sums)
            .arg(&inv_std)
            .arg(&channels)
            .arg(&mut grad_gamma)
            .arg(&mut grad_beta);
        // SAFETY: as above.
        unsafe { args.launch(launch_1d(channels)) }.map_err(super::driver_err("bn_grad_params"))?;
    }
    let grad_x = if inp.input_grad {
        // SAFETY: bn_grad_input writes every element.
        let mut grad_x = unsafe { device.alloc::<f32>(total) }?;
        let func = device.get_or_load_custom_func("bn_grad_input", MODULE, PTX)?;
        let mut args = func.builder();
        args.arg(&x)
            .arg(&out)
            .arg(&grad)
            .arg(&mean)
            .arg(&inv_std)
            .arg(&gamma)
            .arg(&grad_gamma)
            .arg(&grad_beta)
            .arg(&channels)
            .arg(&pixels)
            .arg(&count)
            .arg(&relu)
            .arg(&mut grad_x);
        // SAFETY: as above.
        unsafe { args.launch(shape.per_plane()) }.map_err(super::driver_err("bn_grad_input"))?;
        Some(cuda_tensor(grad_x, &device, inp.x.shape()))
    } else {
        None
    };
    Ok((
        grad_x,
        cuda_tensor(grad_gamma, &device, channels),
        cuda_tensor(grad_beta, &device, channels),
    ))
}

/// The output gradient where the output is positive, else 0: what a residual added before a
/// fused ReLU receives. `out` and `grad` are contiguous f32 CUDA tensors of one shape.
pub(crate) fn relu_masked_grad(out: &Tensor, grad: &Tensor) -> Result<Tensor> {
    if out.dims() != grad.dims() {
        candle_core::bail!(
            "relu_masked_grad: output {:?} and gradient {:?} differ in shape",
            out.dims(),
            grad.dims()
        );
    }
    let device: CudaDevice = out.device().as_cuda_device()?.clone();
    let borrowed = [
        Borrowed::new(out, "batch_norm_add_relu_train output"),
        Borrowed::new(grad, "batch_norm_add_relu_train output gradient"),
    ];
    let [out_view, grad_view] = [borrowed[0].view()?, borrowed[1].view()?];
    let total = out_view.len();
    // SAFETY: relu_masked_grad writes every element.
    let mut masked = unsafe { device.alloc::<f32>(total) }?;
    let func = device.get_or_load_custom_func("relu_masked_grad", MODULE, PTX)?;
    let mut args = func.builder();
    args.arg(&out_view)
        .arg(&grad_view)
        .arg(&mut masked)
        .arg(&total);
    // SAFETY: argument types and order match the kernel; all three buffers hold `total` values.
    unsafe { args.launch(launch_1d(total)) }.map_err(super::driver_err("relu_masked_grad"))?;
    Ok(cuda_tensor(masked, &device, out.shape()))
}
