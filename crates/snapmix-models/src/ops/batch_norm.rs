//! Training-mode BatchNorm (optionally followed by ReLU) as one fused candle CustomOp per
//! direction: one pass for the batch statistics, one for the output; backward likewise.

use super::cpu::{cpu_tensor, min_planes_per_task, storage_f32, with_tensor_f32};
use candle_core::{bail, CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::sync::{Arc, OnceLock};

/// Normalises `x` (`[N, C, ...]`) with its own batch statistics per channel, scales by `gamma`
/// and shifts by `beta` (both `[C]`), then applies ReLU when `relu` is set.
///
/// Returns `(output, batch_mean, batch_var)`: the statistics (`[C]`, the variance biased, i.e.
/// divided by the N*H*W elements per channel, as used for normalising) let the caller update its
/// running averages. They carry no gradient.
///
/// On the CPU with f32 tensors this is the fused custom op, which keeps only the per-channel mean
/// and inverse standard deviation for backward (the ReLU mask is read from the output); on CUDA,
/// with the `cuda` feature, the same op runs as CUDA kernels. Other devices and dtypes use
/// composed candle ops until their path exists, as does every call after
/// [`set_composed_ops(true)`](super::dispatch::set_composed_ops).
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dims = BnDims::new(x.dims(), gamma.dims(), beta.dims())?;
    if eps.is_nan() || eps <= 0.0 {
        bail!("batch_norm_train: eps must be positive, got {eps}");
    }
    if !super::dispatch::has_fused_ops(x.device())
        || x.dtype() != DType::F32
        || super::dispatch::composed_ops()
    {
        return reference(x, gamma, beta, eps, relu);
    }
    let x = x.contiguous()?;
    let stats = StatsSlot::default();
    let op = BatchNormOp {
        dims,
        eps: eps as f32,
        relu,
        input_grad: x.track_op(),
        stats: stats.clone(),
    };
    let output = x.apply_op3_arc(
        &gamma.contiguous()?,
        &beta.contiguous()?,
        Arc::new(Box::new(op)),
    )?;
    let (mean, var) = stats.mean_and_var("batch_norm_train", dims.channels)?;
    Ok((output, mean, var))
}

/// Where a batch-norm op's forward pass leaves its batch statistics, shared with the caller
/// (which returns them) and read again by the op's backward pass: on the host after a CPU
/// forward, on the device after a CUDA one.
#[derive(Clone, Default)]
pub(super) struct StatsSlot {
    cpu: Arc<OnceLock<BatchStats>>,
    #[cfg(feature = "cuda")]
    cuda: Arc<OnceLock<super::cuda::batch_norm::DeviceStats>>,
}

impl StatsSlot {
    /// Stores a CPU forward's statistics; `op` names the op in the error of a second forward.
    pub(super) fn set_cpu(&self, stats: BatchStats, op: &str) -> Result<()> {
        if self.cpu.set(stats).is_err() {
            bail!("{op}: an op instance ran its forward pass twice");
        }
        Ok(())
    }

    /// Stores a CUDA forward's statistics.
    #[cfg(feature = "cuda")]
    pub(super) fn set_cuda(
        &self,
        stats: super::cuda::batch_norm::DeviceStats,
        op: &str,
    ) -> Result<()> {
        if self.cuda.set(stats).is_err() {
            bail!("{op}: an op instance ran its forward pass twice");
        }
        Ok(())
    }

    /// A CPU forward's statistics, for backward.
    pub(super) fn cpu(&self, op: &str) -> Result<&BatchStats> {
        match self.cpu.get() {
            Some(stats) => Ok(stats),
            None => bail!("{op}: backward before forward"),
        }
    }

    /// A CUDA forward's statistics, for backward.
    #[cfg(feature = "cuda")]
    pub(super) fn cuda(&self, op: &str) -> Result<&super::cuda::batch_norm::DeviceStats> {
        match self.cuda.get() {
            Some(stats) => Ok(stats),
            None => bail!("{op}: backward before forward"),
        }
    }

    /// The batch mean and (biased) variance `[channels]` on the forward's device.
    pub(super) fn mean_and_var(&self, op: &str, channels: usize) -> Result<(Tensor, Tensor)> {
        #[cfg(feature = "cuda")]
        if let Some(stats) = self.cuda.get() {
            return Ok((stats.mean.clone(), stats.var.clone()));
        }
        let Some(stats) = self.cpu.get() else {
            bail!("{op}: the forward pass left no statistics");
        };
        Ok((
            cpu_tensor(stats.mean.clone(), channels)?,
            cpu_tensor(stats.var.clone(), channels)?,
        ))
    }
}

/// The same computation from candle's elementary ops: the reference for tests and the path for
/// devices without a fused kernel yet.
pub(super) fn reference(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let channels = x.dim(1)?;
    let reduced: Vec<usize> = (0..x.rank()).filter(|&axis| axis != 1).collect();
    let count = (x.elem_count() / channels) as f64;
    let mut stat_shape = vec![1; x.rank()];
    stat_shape[1] = channels;
    let mean = (x.sum_keepdim(reduced.as_slice())? / count)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = (centred.sqr()?.sum_keepdim(reduced.as_slice())? / count)?;
    let scale = var
        .affine(1.0, eps)?
        .sqrt()?
        .recip()?
        .broadcast_mul(&gamma.reshape(stat_shape.as_slice())?)?;
    let out = centred
        .broadcast_mul(&scale)?
        .broadcast_add(&beta.reshape(stat_shape.as_slice())?)?;
    let out = if relu { out.relu()? } else { out };
    Ok((
        out,
        mean.flatten_all()?.detach(),
        var.flatten_all()?.detach(),
    ))
}

/// Axis sizes: `batch` images, `channels`, `pixels` per image and channel.
#[derive(Clone, Copy, Debug)]
pub(super) struct BnDims {
    batch: usize,
    channels: usize,
    pixels: usize,
}

impl BnDims {
    pub(super) fn new(x: &[usize], gamma: &[usize], beta: &[usize]) -> Result<Self> {
        if x.len() < 2 {
            bail!("batch_norm_train: expected an input of shape [N, C, ...], got {x:?}");
        }
        let channels = x[1];
        if gamma != [channels] || beta != [channels] {
            bail!(
                "batch_norm_train: gamma {gamma:?} and beta {beta:?} must both be [{channels}] \
                 for an input of shape {x:?}"
            );
        }
        let dims = Self {
            batch: x[0],
            channels,
            pixels: x[2..].iter().product(),
        };
        if dims.batch * dims.pixels < 2 {
            bail!("batch_norm_train: need more than one value per channel, got input {x:?}");
        }
        Ok(dims)
    }

    /// Channels: the length of gamma and beta.
    pub(super) fn channels(&self) -> usize {
        self.channels
    }

    /// Values per channel: N * pixels.
    fn count(&self) -> usize {
        self.batch * self.pixels
    }
}

#[cfg(feature = "cuda")]
impl BnDims {
    /// The same sizes for the CUDA kernels.
    pub(super) fn cuda_shape(&self) -> super::cuda::batch_norm::BnShape {
        super::cuda::batch_norm::BnShape {
            batch: self.batch,
            channels: self.channels,
            pixels: self.pixels,
        }
    }
}

/// Per-channel batch statistics computed by the forward pass.
pub(super) struct BatchStats {
    pub(super) mean: Vec<f32>,
    pub(super) var: Vec<f32>,
    inv_std: Vec<f32>,
}

/// The custom op: CPU forward and backward here, CUDA ones in `cuda/batch_norm.rs`. `stats` is shared with the caller, which reads the batch statistics from it.
struct BatchNormOp {
    dims: BnDims,
    eps: f32,
    relu: bool,
    input_grad: bool,
    stats: StatsSlot,
}

impl CustomOp3 for BatchNormOp {
    fn name(&self) -> &'static str {
        "snapmix-batch-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        gamma: &CpuStorage,
        g_layout: &Layout,
        beta: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = storage_f32(x, x_layout, "batch_norm_train input")?;
        let gamma = storage_f32(gamma, g_layout, "batch_norm_train gamma")?;
        let beta = storage_f32(beta, b_layout, "batch_norm_train beta")?;
        let stats = channel_stats(&self.dims, x, self.eps);
        let out = normalise(&self.dims, x, gamma, beta, &stats, self.relu, None);
        self.stats.set_cpu(stats, "batch_norm_train")?;
        Ok((CpuStorage::F32(out), x_layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_layout: &Layout,
        gamma: &candle_core::CudaStorage,
        g_layout: &Layout,
        beta: &candle_core::CudaStorage,
        b_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (out, stats) = super::cuda::batch_norm::forward(
            self.dims.cuda_shape(),
            self.eps,
            super::cuda::batch_norm::Tail::Plain(self.relu),
            x,
            x_layout,
            gamma,
            g_layout,
            beta,
            b_layout,
        )?;
        self.stats.set_cuda(stats, "batch_norm_train")?;
        Ok((out, x_layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if grad_out.device().is_cuda() {
            let stats = self.stats.cuda("snapmix-batch-norm")?;
            let grad_out = grad_out.contiguous()?;
            let inputs = super::cuda::batch_norm::BackwardInputs {
                x,
                gamma,
                out,
                grad: &grad_out,
                stats,
                relu: self.relu,
                input_grad: self.input_grad,
            };
            let (grad_x, grad_gamma, grad_beta) =
                super::cuda::batch_norm::backward(self.dims.cuda_shape(), inputs)?;
            return Ok((grad_x, Some(grad_gamma), Some(grad_beta)));
        }
        if !matches!(grad_out.device(), Device::Cpu) {
            bail!("snapmix-batch-norm: backward is not implemented for CUDA/Metal yet");
        }
        let stats = self.stats.cpu("snapmix-batch-norm")?;
        let grad_out = grad_out.contiguous()?;
        let grads = with_tensor_f32(x, "batch_norm_train input", |x| {
            with_tensor_f32(gamma, "batch_norm_train gamma", |gamma| {
                with_tensor_f32(out, "batch_norm_train output", |out| {
                    with_tensor_f32(&grad_out, "batch_norm_train output gradient", |grad| {
                        Ok(backward(
                            &self.dims,
                            BackwardInputs {
                                x,
                                gamma,
                                out,
                                grad,
                                stats,
                                relu: self.relu,
                                input_grad: self.input_grad,
                                relu_grad: None,
                            },
                        ))
                    })
                })
            })
        })?;
        let (grad_x, grad_gamma, grad_beta) = grads;
        let grad_x = match grad_x {
            Some(data) => Some(cpu_tensor(data, x.shape())?),
            None => None,
        };
        let channels = self.dims.channels;
        Ok((
            grad_x,
            Some(cpu_tensor(grad_gamma, channels)?),
            Some(cpu_tensor(grad_beta, channels)?),
        ))
    }
}

/// Lanes of the f32 partial sums: wide enough to vectorise, short enough per lane to stay exact
/// to ~1e-7 over one image row; rows are then summed in f64.
const LANES: usize = 16;

/// Sums of both halves of `pair(a[i], b[i], c[i])` over three rows of equal length, each in
/// LANES f32 partial sums, returned as f64: one pass where two separate sums would read the
/// data twice, over fixed-size chunks so that it vectorises.
#[inline(always)]
fn lane_sums(
    a: &[f32],
    b: &[f32],
    c: &[f32],
    pair: impl Fn(f32, f32, f32) -> (f32, f32),
) -> (f64, f64) {
    let (b, c) = (&b[..a.len()], &c[..a.len()]);
    let (mut acc0, mut acc1) = ([0.0f32; LANES], [0.0f32; LANES]);
    let (a_chunks, b_chunks, c_chunks) = (
        a.chunks_exact(LANES),
        b.chunks_exact(LANES),
        c.chunks_exact(LANES),
    );
    let tails = (
        a_chunks.remainder(),
        b_chunks.remainder(),
        c_chunks.remainder(),
    );
    for ((a, b), c) in a_chunks.zip(b_chunks).zip(c_chunks) {
        for lane in 0..LANES {
            let (v0, v1) = pair(a[lane], b[lane], c[lane]);
            acc0[lane] += v0;
            acc1[lane] += v1;
        }
    }
    let (mut tail0, mut tail1) = (0.0f32, 0.0f32);
    for ((&a, &b), &c) in tails.0.iter().zip(tails.1).zip(tails.2) {
        let (v0, v1) = pair(a, b, c);
        tail0 += v0;
        tail1 += v1;
    }
    let total =
        |acc: [f32; LANES], tail: f32| acc.iter().map(|&a| a as f64).sum::<f64>() + tail as f64;
    (total(acc0, tail0), total(acc1, tail1))
}

/// Mean and biased variance of each channel in one pass over `x`, shifted by the channel's
/// first value so that the sum of squares does not cancel catastrophically.
pub(super) fn channel_stats(dims: &BnDims, x: &[f32], eps: f32) -> BatchStats {
    let BnDims {
        batch,
        channels,
        pixels,
    } = *dims;
    let count = dims.count() as f64;
    let per_channel: Vec<(f32, f32)> = (0..channels)
        .into_par_iter()
        .map(|c| {
            let shift = x[c * pixels];
            let (mut sum, mut sum_sq) = (0.0f64, 0.0f64);
            for n in 0..batch {
                let row = &x[(n * channels + c) * pixels..][..pixels];
                let (row_sum, row_sum_sq) = lane_sums(row, row, row, |x, _, _| {
                    let centred = x - shift;
                    (centred, centred * centred)
                });
                sum += row_sum;
                sum_sq += row_sum_sq;
            }
            let mean_shifted = sum / count;
            let var = (sum_sq / count - mean_shifted * mean_shifted).max(0.0);
            ((shift as f64 + mean_shifted) as f32, var as f32)
        })
        .collect();
    let (mean, var): (Vec<f32>, Vec<f32>) = per_channel.into_iter().unzip();
    let inv_std = var.iter().map(|&v| 1.0 / (v + eps).sqrt()).collect();
    BatchStats { mean, var, inv_std }
}

/// The mean and the sum of squared deviations (M2) of one plane of values, each in f64: the
/// per-image halves of [`channel_stats_from_planes`].
#[derive(Clone, Copy, Debug)]
pub(super) struct PlaneMoments {
    mean: f64,
    m2: f64,
}

impl PlaneMoments {
    /// Two passes over `plane` (meant to be in cache): its mean, then the squared deviations
    /// from it, corrected by the deviations' own sum.
    pub(super) fn of(plane: &[f32]) -> Self {
        let len = plane.len().max(1) as f64;
        let (sum, _) = lane_sums(plane, plane, plane, |x, _, _| (x, 0.0));
        let mean = sum / len;
        let centre = mean as f32;
        let (dev, dev_sq) = lane_sums(plane, plane, plane, |x, _, _| {
            let d = x - centre;
            (d, d * d)
        });
        Self {
            mean: centre as f64 + dev / len,
            m2: (dev_sq - dev * dev / len).max(0.0),
        }
    }
}

/// [`channel_stats`] from the moments of every plane (`batch * channels`, image-major), combined
/// per channel as in Chan et al.'s parallel variance: the same statistics without reading `x`.
pub(super) fn channel_stats_from_planes(
    dims: &BnDims,
    planes: &[PlaneMoments],
    eps: f32,
) -> Result<BatchStats> {
    let BnDims {
        batch,
        channels,
        pixels,
    } = *dims;
    if planes.len() != batch * channels {
        bail!(
            "batch norm: {} plane moments for {batch} images of {channels} channels",
            planes.len()
        );
    }
    let count = dims.count() as f64;
    let (mut mean, mut var) = (Vec::with_capacity(channels), Vec::with_capacity(channels));
    for c in 0..channels {
        let channel = || planes[c..].iter().step_by(channels);
        let channel_mean = channel().map(|p| p.mean).sum::<f64>() / batch as f64;
        let m2: f64 = channel()
            .map(|p| p.m2 + pixels as f64 * (p.mean - channel_mean).powi(2))
            .sum();
        mean.push(channel_mean as f32);
        var.push((m2 / count) as f32);
    }
    let inv_std = var.iter().map(|&v| 1.0 / (v + eps).sqrt()).collect();
    Ok(BatchStats { mean, var, inv_std })
}

/// out = (x - mean) * inv_std * gamma + beta, plus `residual` (x's shape) if given, then ReLU if
/// asked.
pub(super) fn normalise(
    dims: &BnDims,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    stats: &BatchStats,
    relu: bool,
    residual: Option<&[f32]>,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    out.spare_capacity_mut()
        .par_chunks_mut(dims.pixels)
        .zip(x.par_chunks(dims.pixels))
        .enumerate()
        .with_min_len(min_planes_per_task(dims.pixels))
        .for_each(|(i, (out_row, x_row))| {
            let c = i % dims.channels;
            let scale = gamma[c] * stats.inv_std[c];
            let shift = beta[c] - stats.mean[c] * scale;
            match (residual, relu) {
                (Some(residual), _) => {
                    let residual = &residual[i * dims.pixels..][..dims.pixels];
                    let floor = if relu { 0.0 } else { f32::NEG_INFINITY };
                    for (o, (&v, &r)) in out_row.iter_mut().zip(x_row.iter().zip(residual)) {
                        o.write((v * scale + shift + r).max(floor));
                    }
                }
                (None, true) => {
                    for (o, &v) in out_row.iter_mut().zip(x_row) {
                        o.write((v * scale + shift).max(0.0));
                    }
                }
                (None, false) => {
                    for (o, &v) in out_row.iter_mut().zip(x_row) {
                        o.write(v * scale + shift);
                    }
                }
            }
        });
    // SAFETY: the rows above cover all `x.len()` elements.
    unsafe { out.set_len(x.len()) };
    out
}

/// The `pixels` values of one channel of one image, from `start`.
fn plane(data: &[f32], start: usize, pixels: usize) -> &[f32] {
    &data[start..start + pixels]
}

/// What the backward pass reads.
pub(super) struct BackwardInputs<'a> {
    pub(super) x: &'a [f32],
    pub(super) gamma: &'a [f32],
    pub(super) out: &'a [f32],
    pub(super) grad: &'a [f32],
    pub(super) stats: &'a BatchStats,
    pub(super) relu: bool,
    pub(super) input_grad: bool,
    /// Where to write the output gradient as the fused ReLU passed it (x's shape), if wanted.
    pub(super) relu_grad: Option<&'a mut Vec<f32>>,
}

/// Gradients `(x, gamma, beta)`: one pass for the per-channel sums of g and g * (x - mean)
/// (g the output gradient, zeroed where ReLU was inactive), one for the input gradient.
pub(super) fn backward(
    dims: &BnDims,
    inp: BackwardInputs,
) -> (Option<Vec<f32>>, Vec<f32>, Vec<f32>) {
    let BnDims {
        batch,
        channels,
        pixels,
    } = *dims;
    // The output gradient where the fused ReLU let the value through, else 0.
    let relu = inp.relu;
    let masked = move |g: f32, out: f32| -> f32 {
        if relu && out <= 0.0 {
            0.0
        } else {
            g
        }
    };
    let image_row = |data, start| plane(data, start, pixels);
    let sums: Vec<(f32, f32)> = (0..channels)
        .into_par_iter()
        .map(|c| {
            let mean = inp.stats.mean[c];
            let (mut sum_g, mut sum_gx) = (0.0f64, 0.0f64);
            for n in 0..batch {
                let start = (n * channels + c) * pixels;
                let (grad, out, x) = (
                    image_row(inp.grad, start),
                    image_row(inp.out, start),
                    image_row(inp.x, start),
                );
                let (g, gx) = lane_sums(grad, out, x, |g, out, x| {
                    let g = masked(g, out);
                    (g, g * (x - mean))
                });
                sum_g += g;
                sum_gx += gx;
            }
            // d beta = sum g; d gamma = sum g * x_hat = inv_std * sum g * (x - mean).
            (sum_g as f32, (sum_gx * inp.stats.inv_std[c] as f64) as f32)
        })
        .collect();
    let (grad_beta, grad_gamma): (Vec<f32>, Vec<f32>) = sums.into_iter().unzip();
    if !inp.input_grad {
        return (None, grad_gamma, grad_beta);
    }
    // dx = gamma * inv_std * (g - mean(g) - x_hat * mean(g * x_hat)), written as a * g + b * x + d.
    let count = dims.count() as f32;
    let len = inp.x.len();
    let row_gradient =
        |row: usize, dst: &mut [MaybeUninit<f32>], relu_grad: Option<&mut [MaybeUninit<f32>]>| {
            let c = row % channels;
            let start = row * pixels;
            let inv_std = inp.stats.inv_std[c];
            let a = inp.gamma[c] * inv_std;
            let b = -a * inv_std * grad_gamma[c] / count;
            let d = -a * grad_beta[c] / count - b * inp.stats.mean[c];
            let (grad, out, x) = (
                image_row(inp.grad, start),
                image_row(inp.out, start),
                image_row(inp.x, start),
            );
            match relu_grad {
                Some(relu_grad) => {
                    for ((o, r), ((&g, &out), &x)) in dst
                        .iter_mut()
                        .zip(relu_grad.iter_mut())
                        .zip(grad.iter().zip(out).zip(x))
                    {
                        let g = masked(g, out);
                        r.write(g);
                        o.write(a * g + b * x + d);
                    }
                }
                None => {
                    for (o, ((&g, &out), &x)) in dst.iter_mut().zip(grad.iter().zip(out).zip(x)) {
                        o.write(a * masked(g, out) + b * x + d);
                    }
                }
            }
        };
    let mut grad_x = Vec::with_capacity(len);
    let rows = grad_x.spare_capacity_mut().par_chunks_mut(pixels);
    let min_rows = min_planes_per_task(pixels);
    match inp.relu_grad {
        Some(relu_grad) => {
            relu_grad.clear();
            relu_grad.reserve(len);
            rows.zip(relu_grad.spare_capacity_mut().par_chunks_mut(pixels))
                .enumerate()
                .with_min_len(min_rows)
                .for_each(|(row, (dst, relu_grad))| row_gradient(row, dst, Some(relu_grad)));
            // SAFETY: the rows above cover all `len` elements.
            unsafe { relu_grad.set_len(len) };
        }
        None => rows
            .enumerate()
            .with_min_len(min_rows)
            .for_each(|(row, dst)| row_gradient(row, dst, None)),
    }
    // SAFETY: the rows above cover all `len` elements.
    unsafe { grad_x.set_len(len) };
    (Some(grad_x), grad_gamma, grad_beta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{random, rel_err};
    use candle_core::Var;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn check(dims: &[usize], offset: f32, relu: bool) -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let channels = dims[1];
        let x = Var::from_tensor(&random(&mut rng, dims, offset)?)?;
        let gamma = Var::from_tensor(&random(&mut rng, &[channels], 1.0)?)?;
        let beta = Var::from_tensor(&random(&mut rng, &[channels], 0.0)?)?;
        let (want, want_mean, want_var) = reference(&x, &gamma, &beta, 1e-5, relu)?;
        let (got, got_mean, got_var) = batch_norm_train(&x, &gamma, &beta, 1e-5, relu)?;
        let what = format!("{dims:?} offset {offset} relu {relu}");
        for (name, g, w) in [
            ("output", &got, &want),
            ("mean", &got_mean, &want_mean),
            ("var", &got_var, &want_var),
        ] {
            let err = rel_err(g, w)?;
            assert!(err < 1e-4, "{name} {what}: {err}");
        }
        let probe = random(&mut rng, dims, 0.0)?;
        let want_grads = (want * &probe)?.sum_all()?.backward()?;
        let got_grads = (got * &probe)?.sum_all()?.backward()?;
        for (name, var) in [("input", &x), ("gamma", &gamma), ("beta", &beta)] {
            let err = rel_err(
                got_grads.get(var).expect("our gradient"),
                want_grads.get(var).expect("reference gradient"),
            )?;
            assert!(err < 1e-4, "{name} gradient {what}: {err}");
        }
        Ok(())
    }

    #[test]
    fn matches_composed_candle_ops() -> Result<()> {
        check(&[4, 3, 5, 7], 0.0, false)?;
        check(&[4, 3, 5, 7], 0.0, true)?;
        // Odd sizes leave lane tails; a large offset tests the one-pass variance.
        check(&[3, 5, 6, 6], 50.0, false)?;
        check(&[2, 4, 17, 3], 0.5, true)?;
        check(&[6, 8], 0.0, false) // BatchNorm1d-shaped input
    }

    #[test]
    fn statistics_from_plane_moments_match_a_pass_over_the_data() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        // Lane tails, one image, and a large offset (where a plain sum of squares cancels).
        for (dims, offset) in [
            ([3, 4, 7, 5], 0.0),
            ([1, 2, 33, 1], 0.3),
            ([5, 3, 4, 4], 200.0),
        ] {
            let x = random(&mut rng, &dims, offset)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let bn = BnDims::new(&dims, &[dims[1]], &[dims[1]])?;
            let planes: Vec<PlaneMoments> =
                x.chunks_exact(bn.pixels).map(PlaneMoments::of).collect();
            let want = channel_stats(&bn, &x, 1e-5);
            let got = channel_stats_from_planes(&bn, &planes, 1e-5)?;
            for (name, got, want) in [
                ("mean", &got.mean, &want.mean),
                ("var", &got.var, &want.var),
                ("inv_std", &got.inv_std, &want.inv_std),
            ] {
                for (g, w) in got.iter().zip(want.iter()) {
                    assert!(
                        (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                        "{name} {dims:?}: {g} vs {w}"
                    );
                }
            }
            match channel_stats_from_planes(&bn, &planes[1..], 1e-5) {
                Err(err) => assert!(err.to_string().contains("plane moments"), "{err}"),
                Ok(_) => panic!("one plane short of {dims:?} accepted"),
            }
        }
        Ok(())
    }

    #[test]
    fn rejects_bad_shapes_and_eps() -> Result<()> {
        let x = Tensor::zeros((2, 3, 4, 4), DType::F32, &Device::Cpu)?;
        let c3 = Tensor::ones(3, DType::F32, &Device::Cpu)?;
        let c4 = Tensor::ones(4, DType::F32, &Device::Cpu)?;
        let err = batch_norm_train(&x, &c4, &c3, 1e-5, false).unwrap_err();
        assert!(err.to_string().contains("[4]"), "{err}");
        assert!(batch_norm_train(&x, &c3, &c3, 0.0, false).is_err());
        let single = Tensor::zeros((1, 3), DType::F32, &Device::Cpu)?;
        assert!(batch_norm_train(&single, &c3, &c3, 1e-5, false).is_err());
        Ok(())
    }
}
