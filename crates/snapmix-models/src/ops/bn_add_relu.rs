//! The end of a residual block, `relu(batch_norm(x) + residual)`, as one op: neither the
//! normalised tensor nor the sum is kept for backward. Composed as batch norm, add and ReLU,
//! both stay alive until backward ends; in a ResNet-50 bottleneck they are two of the four
//! widest tensors, which put a CUDA training step at 1.7x PyTorch's peak memory.

use super::batch_norm::{
    backward, channel_stats, normalise, reference, BackwardInputs, BnDims, StatsSlot,
};
use super::cpu::{cpu_tensor, storage_f32, with_tensor_f32};
use candle_core::{bail, CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use std::sync::Arc;

/// `relu(batch_norm(x) + residual)` in training mode, with the batch statistics as
/// [`batch_norm_train`](super::batch_norm::batch_norm_train) returns them. `residual` has `x`'s
/// shape; its gradient is the output gradient where the output is positive (PyTorch's ReLU).
///
/// One fused op on the CPU and (with the `cuda` feature) on CUDA for f32; elsewhere, and after
/// [`set_composed_ops(true)`](super::dispatch::set_composed_ops), batch norm then
/// [`add_relu`](super::add_relu::add_relu).
pub fn batch_norm_add_relu_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    residual: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dims = BnDims::new(x.dims(), gamma.dims(), beta.dims())?;
    if eps.is_nan() || eps <= 0.0 {
        bail!("batch_norm_add_relu_train: eps must be positive, got {eps}");
    }
    if residual.dims() != x.dims() {
        bail!(
            "batch_norm_add_relu_train: the residual {:?} differs from the input {:?}",
            residual.dims(),
            x.dims()
        );
    }
    if !super::dispatch::has_fused_ops(x.device())
        || x.dtype() != DType::F32
        || residual.dtype() != DType::F32
        || super::dispatch::composed_ops()
    {
        let (y, mean, var) = reference(x, gamma, beta, eps, false)?;
        return Ok((super::add_relu::add_relu(&y, residual)?, mean, var));
    }
    let stats = StatsSlot::default();
    let op = BatchNormAddReluOp {
        dims,
        eps: eps as f32,
        input_grad: x.track_op(),
        residual_grad: residual.track_op(),
        stats: stats.clone(),
    };
    let gamma_beta = Tensor::cat(&[gamma, beta], 0)?;
    let output = x.contiguous()?.apply_op3_arc(
        &gamma_beta,
        &residual.contiguous()?,
        Arc::new(Box::new(op)),
    )?;
    let (mean, var) = stats.mean_and_var("batch_norm_add_relu_train", dims.channels())?;
    Ok((output, mean, var))
}

/// The custom op on `(x, [gamma; beta], residual)`.
struct BatchNormAddReluOp {
    dims: BnDims,
    eps: f32,
    input_grad: bool,
    residual_grad: bool,
    stats: StatsSlot,
}

impl CustomOp3 for BatchNormAddReluOp {
    fn name(&self) -> &'static str {
        "snapmix-batch-norm-add-relu"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        gamma_beta: &CpuStorage,
        gb_layout: &Layout,
        residual: &CpuStorage,
        r_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = storage_f32(x, x_layout, "batch_norm_add_relu_train input")?;
        let gamma_beta = storage_f32(
            gamma_beta,
            gb_layout,
            "batch_norm_add_relu_train gamma/beta",
        )?;
        let residual = storage_f32(residual, r_layout, "batch_norm_add_relu_train residual")?;
        let (gamma, beta) = gamma_beta.split_at(self.dims.channels());
        let stats = channel_stats(&self.dims, x, self.eps);
        let out = normalise(&self.dims, x, gamma, beta, &stats, true, Some(residual));
        self.stats.set_cpu(stats, "batch_norm_add_relu_train")?;
        Ok((CpuStorage::F32(out), x_layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_layout: &Layout,
        gamma_beta: &candle_core::CudaStorage,
        gb_layout: &Layout,
        residual: &candle_core::CudaStorage,
        r_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let channels = self.dims.channels();
        let start = gb_layout.start_offset();
        let gamma_layout = Layout::contiguous_with_offset(channels, start);
        let beta_layout = Layout::contiguous_with_offset(channels, start + channels);
        let (out, stats) = super::cuda::batch_norm::forward(
            self.dims.cuda_shape(),
            self.eps,
            super::cuda::batch_norm::Tail::AddRelu(residual, r_layout),
            x,
            x_layout,
            gamma_beta,
            &gamma_layout,
            gamma_beta,
            &beta_layout,
        )?;
        self.stats.set_cuda(stats, "batch_norm_add_relu_train")?;
        Ok((out, x_layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma_beta: &Tensor,
        _residual: &Tensor,
        out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let channels = self.dims.channels();
        let grad_out = grad_out.contiguous()?;
        #[cfg(feature = "cuda")]
        if grad_out.device().is_cuda() {
            let stats = self.stats.cuda("snapmix-batch-norm-add-relu")?;
            let inputs = super::cuda::batch_norm::BackwardInputs {
                x,
                gamma: &gamma_beta.narrow(0, 0, channels)?,
                out,
                grad: &grad_out,
                stats,
                relu: true,
                input_grad: self.input_grad,
            };
            let (grad_x, grad_gamma, grad_beta) =
                super::cuda::batch_norm::backward(self.dims.cuda_shape(), inputs)?;
            let grad_residual = if self.residual_grad {
                Some(super::cuda::batch_norm::relu_masked_grad(out, &grad_out)?)
            } else {
                None
            };
            let grad_gamma_beta = Tensor::cat(&[grad_gamma, grad_beta], 0)?;
            return Ok((grad_x, Some(grad_gamma_beta), grad_residual));
        }
        if !matches!(grad_out.device(), Device::Cpu) {
            bail!("snapmix-batch-norm-add-relu: backward runs on the CPU and CUDA only");
        }
        let stats = self.stats.cpu("snapmix-batch-norm-add-relu")?;
        // The CPU backward writes the masked output gradient (the residual's) only alongside
        // the input gradient.
        let mut masked = Vec::new();
        let want_masked = self.residual_grad.then_some(&mut masked);
        let (grad_x, grad_gamma, grad_beta) =
            with_tensor_f32(x, "batch_norm_add_relu_train input", |x| {
                with_tensor_f32(gamma_beta, "batch_norm_add_relu_train gamma/beta", |gb| {
                    with_tensor_f32(out, "batch_norm_add_relu_train output", |out| {
                        with_tensor_f32(&grad_out, "batch_norm_add_relu_train gradient", |grad| {
                            Ok(backward(
                                &self.dims,
                                BackwardInputs {
                                    x,
                                    gamma: &gb[..channels],
                                    out,
                                    grad,
                                    stats,
                                    relu: true,
                                    input_grad: self.input_grad || self.residual_grad,
                                    relu_grad: want_masked,
                                },
                            ))
                        })
                    })
                })
            })?;
        let grad_x = match grad_x {
            Some(data) if self.input_grad => Some(cpu_tensor(data, x.shape())?),
            _ => None,
        };
        let grad_residual = if self.residual_grad {
            Some(cpu_tensor(masked, x.shape())?)
        } else {
            None
        };
        let mut grad_gamma_beta = grad_gamma;
        grad_gamma_beta.extend_from_slice(&grad_beta);
        Ok((
            grad_x,
            Some(cpu_tensor(grad_gamma_beta, 2 * channels)?),
            grad_residual,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::batch_norm::batch_norm_train;
    use crate::ops::test_util::{random, rel_err};
    use candle_core::Var;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    const TOL: f32 = 1e-4;

    /// Output, statistics and every gradient against batch norm + candle's add and ReLU.
    fn check(dims: &[usize], offset: f32) -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let channels = dims[1];
        let x = Var::from_tensor(&random(&mut rng, dims, offset)?)?;
        let residual = Var::from_tensor(&random(&mut rng, dims, 0.0)?)?;
        let gamma = Var::from_tensor(&random(&mut rng, &[channels], 1.0)?)?;
        let beta = Var::from_tensor(&random(&mut rng, &[channels], 0.0)?)?;
        let weights = random(&mut rng, dims, 0.0)?;
        let (got, got_mean, got_var) =
            batch_norm_add_relu_train(&x, &gamma, &beta, 1e-5, &residual)?;
        let (y, want_mean, want_var) = reference(&x, &gamma, &beta, 1e-5, false)?;
        let want = (y + residual.as_tensor())?.relu()?;
        let what = format!("{dims:?} offset {offset}");
        assert!(rel_err(&got, &want)? < TOL, "{what}: output");
        assert!(rel_err(&got_mean, &want_mean)? < TOL, "{what}: mean");
        assert!(rel_err(&got_var, &want_var)? < TOL, "{what}: variance");
        let got_grads = (got * &weights)?.sum_all()?.backward()?;
        let want_grads = (want * &weights)?.sum_all()?.backward()?;
        for (name, var) in [
            ("x", &x),
            ("residual", &residual),
            ("gamma", &gamma),
            ("beta", &beta),
        ] {
            let (g, w) = (got_grads.get(var), want_grads.get(var));
            let (Some(g), Some(w)) = (g, w) else {
                panic!("{what}: no gradient of {name}");
            };
            let err = rel_err(g, w)?;
            assert!(err < TOL, "{what}: gradient of {name}: {err}");
        }
        Ok(())
    }

    #[test]
    fn matches_batch_norm_then_add_and_relu() -> Result<()> {
        check(&[2, 3, 5, 4], 0.0)?;
        check(&[4, 8, 3, 3], 3.0)?;
        check(&[3, 2, 1, 1], -1.0)
    }

    #[test]
    fn constant_residual_gets_no_gradient_and_untracked_input_none() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let x = Var::from_tensor(&random(&mut rng, &[2, 3, 4, 4], 0.0)?)?;
        let residual = random(&mut rng, &[2, 3, 4, 4], 0.0)?;
        let gamma = Var::from_tensor(&random(&mut rng, &[3], 1.0)?)?;
        let beta = Var::from_tensor(&random(&mut rng, &[3], 0.0)?)?;
        let (got, _, _) = batch_norm_add_relu_train(&x, &gamma, &beta, 1e-5, &residual)?;
        let grads = got.sum_all()?.backward()?;
        assert!(grads.get(&residual).is_none());
        let (y, _, _) = batch_norm_train(&x, &gamma, &beta, 1e-5, false)?;
        let want = (y + &residual)?.relu()?.sum_all()?.backward()?;
        let err = rel_err(grads.get(&x).unwrap(), want.get(&x).unwrap())?;
        assert!(err < TOL, "gradient of x: {err}");
        // An untracked input with a tracked residual: the residual's gradient alone.
        let plain = x.as_tensor().detach();
        let tracked = Var::from_tensor(&residual)?;
        let (out, _, _) = batch_norm_add_relu_train(&plain, &gamma, &beta, 1e-5, &tracked)?;
        let grads = out.sum_all()?.backward()?;
        let mask = out.gt(0.0)?.to_dtype(DType::F32)?;
        assert!(grads.get(&plain).is_none());
        assert_eq!(
            grads
                .get(&tracked)
                .unwrap()
                .flatten_all()?
                .to_vec1::<f32>()?,
            mask.flatten_all()?.to_vec1::<f32>()?
        );
        Ok(())
    }

    #[test]
    fn mismatched_residual_is_an_error_naming_both_shapes() {
        let x = Tensor::zeros((2, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let residual = Tensor::zeros((2, 3, 4, 5), DType::F32, &Device::Cpu).unwrap();
        let gamma = Tensor::ones(3, DType::F32, &Device::Cpu).unwrap();
        let beta = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
        let err = batch_norm_add_relu_train(&x, &gamma, &beta, 1e-5, &residual)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("[2, 3, 4, 5]") && err.contains("[2, 3, 4, 4]"),
            "{err}"
        );
    }
}
