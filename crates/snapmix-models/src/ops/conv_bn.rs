//! Conv2d followed by training-mode batch norm (and ReLU) as one CPU op: candle's autograd then
//! never materialises the gradient of the conv output, which it would otherwise zero-fill and
//! add into a fresh buffer (three passes over the largest tensors of a ResNet step).

use super::batch_norm::{self, batch_norm_train, BackwardInputs, BatchStats, BnDims};
use super::conv2d::{self as conv, conv2d, ConvGeometry};
use super::cpu::{cpu_tensor, storage_f32, with_tensor_f32};
use candle_core::{bail, CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use std::sync::{Arc, OnceLock};

/// `batch_norm_train(&conv2d(x, weight, stride, padding)?, gamma, beta, eps, relu)`, with the
/// same outputs `(output, batch_mean, batch_var)`.
///
/// On the CPU with f32 tensors it is one custom op whose backward chains the two backward
/// passes internally; elsewhere (CUDA, Metal, other dtypes, or after
/// [`set_composed_ops(true)`](super::dispatch::set_composed_ops)) it is exactly that composition.
#[allow(clippy::too_many_arguments)]
pub fn conv_batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: usize,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let fused = matches!(x.device(), Device::Cpu)
        && x.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && !super::dispatch::composed_ops();
    if !fused {
        return batch_norm_train(&conv2d(x, weight, stride, padding)?, gamma, beta, eps, relu);
    }
    let geometry = ConvGeometry::new(x.dims(), weight.dims(), stride, padding)?;
    let dims = BnDims::new(geometry.out_shape().dims(), gamma.dims(), beta.dims())?;
    if eps.is_nan() || eps <= 0.0 {
        bail!("conv_batch_norm_train: eps must be positive, got {eps}");
    }
    let state = Arc::new(OnceLock::new());
    let op = ConvBatchNormOp {
        geometry,
        dims,
        eps: eps as f32,
        relu,
        input_grad: x.track_op(),
        state: state.clone(),
    };
    let gamma_beta = Tensor::cat(&[gamma, beta], 0)?;
    let output = x.contiguous()?.apply_op3_arc(
        &weight.contiguous()?,
        &gamma_beta,
        Arc::new(Box::new(op)),
    )?;
    let Some(state) = state.get() else {
        bail!("conv_batch_norm_train: the forward pass left no statistics");
    };
    let mean = cpu_tensor(state.stats.mean.clone(), dims.channels())?;
    let var = cpu_tensor(state.stats.var.clone(), dims.channels())?;
    Ok((output, mean, var))
}

/// What the forward pass keeps for backward: the conv output (the batch norm's input) and the
/// batch statistics.
struct ForwardState {
    conv_out: Vec<f32>,
    stats: BatchStats,
}

/// The fused op on `(x, weight, [gamma; beta])`.
struct ConvBatchNormOp {
    geometry: ConvGeometry,
    dims: BnDims,
    eps: f32,
    relu: bool,
    /// Whether backward must produce the input gradient (false for the image batch).
    input_grad: bool,
    state: Arc<OnceLock<ForwardState>>,
}

impl CustomOp3 for ConvBatchNormOp {
    fn name(&self) -> &'static str {
        "snapmix-conv-batch-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        weight: &CpuStorage,
        w_layout: &Layout,
        gamma_beta: &CpuStorage,
        gb_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = storage_f32(x, x_layout, "conv_batch_norm_train input")?;
        let weight = storage_f32(weight, w_layout, "conv_batch_norm_train weight")?;
        let gamma_beta = storage_f32(gamma_beta, gb_layout, "conv_batch_norm_train gamma/beta")?;
        let (gamma, beta) = gamma_beta.split_at(self.dims.channels());
        let conv_out = conv::forward(&self.geometry, x, weight)?;
        let stats = batch_norm::channel_stats(&self.dims, &conv_out, self.eps);
        let out = batch_norm::normalise(&self.dims, &conv_out, gamma, beta, &stats, self.relu);
        if self.state.set(ForwardState { conv_out, stats }).is_err() {
            bail!("conv_batch_norm_train: an op instance ran its forward pass twice");
        }
        Ok((CpuStorage::F32(out), self.geometry.out_shape()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        gamma_beta: &Tensor,
        out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if !matches!(grad_out.device(), Device::Cpu) {
            bail!("snapmix-conv-batch-norm: backward runs on the CPU only");
        }
        let Some(state) = self.state.get() else {
            bail!("snapmix-conv-batch-norm: backward before forward");
        };
        let grad_out = grad_out.contiguous()?;
        let channels = self.dims.channels();
        let (grad_conv_out, grad_gamma, grad_beta) =
            with_tensor_f32(gamma_beta, "conv_batch_norm_train gamma", |gamma_beta| {
                with_tensor_f32(out, "conv_batch_norm_train output", |out| {
                    with_tensor_f32(&grad_out, "conv_batch_norm_train gradient", |grad| {
                        Ok(batch_norm::backward(
                            &self.dims,
                            BackwardInputs {
                                x: &state.conv_out,
                                gamma: &gamma_beta[..channels],
                                out,
                                grad,
                                stats: &state.stats,
                                relu: self.relu,
                                input_grad: true,
                            },
                        ))
                    })
                })
            })?;
        let Some(grad_conv_out) = grad_conv_out else {
            bail!("snapmix-conv-batch-norm: the batch norm returned no input gradient");
        };
        let (grad_x, grad_w) = with_tensor_f32(x, "conv_batch_norm_train input", |x| {
            with_tensor_f32(weight, "conv_batch_norm_train weight", |weight| {
                conv::backward(&self.geometry, x, weight, &grad_conv_out, self.input_grad)
            })
        })?;
        let grad_x = match grad_x {
            Some(data) => Some(cpu_tensor(data, x.shape())?),
            None => None,
        };
        let mut grad_gamma_beta = grad_gamma;
        grad_gamma_beta.extend_from_slice(&grad_beta);
        Ok((
            grad_x,
            Some(cpu_tensor(grad_w, weight.shape())?),
            Some(cpu_tensor(grad_gamma_beta, 2 * channels)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{random, rel_err};
    use candle_core::Var;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// The fused op against candle's conv2d and the batch norm composed from candle ops: output,
    /// statistics, and the gradients of x, weight, gamma and beta.
    fn check(x_dims: [usize; 4], w_dims: [usize; 4], stride: usize, padding: usize, relu: bool) {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let x = Var::from_tensor(&random(&mut rng, &x_dims, 0.0).unwrap()).unwrap();
        let w = Var::from_tensor(&random(&mut rng, &w_dims, 0.0).unwrap()).unwrap();
        let gamma = Var::from_tensor(&random(&mut rng, &[w_dims[0]], 1.0).unwrap()).unwrap();
        let beta = Var::from_tensor(&random(&mut rng, &[w_dims[0]], 0.0).unwrap()).unwrap();
        let conv_out = x.conv2d(&w, padding, stride, 1, 1).unwrap();
        let (want, want_mean, want_var) =
            batch_norm::reference(&conv_out, &gamma, &beta, 1e-5, relu).unwrap();
        let (got, got_mean, got_var) =
            conv_batch_norm_train(&x, &w, stride, padding, &gamma, &beta, 1e-5, relu).unwrap();
        let case = format!("{x_dims:?} {w_dims:?} s{stride} p{padding} relu {relu}");
        for (name, got, want) in [
            ("output", &got, &want),
            ("mean", &got_mean, &want_mean),
            ("var", &got_var, &want_var),
        ] {
            let err = rel_err(got, want).unwrap();
            assert!(err < 1e-4, "{name} {case}: {err}");
        }
        let probe = random(&mut rng, want.dims(), 0.0).unwrap();
        let want_grads = (want * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let got_grads = (got * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, var) in [
            ("x", &x),
            ("weight", &w),
            ("gamma", &gamma),
            ("beta", &beta),
        ] {
            let err = rel_err(
                got_grads.get(var).expect("fused gradient"),
                want_grads.get(var).expect("reference gradient"),
            )
            .unwrap();
            assert!(err < 1e-4, "{name} gradient {case}: {err}");
        }
    }

    #[test]
    fn matches_conv_then_batch_norm_composed() {
        check([2, 3, 11, 10], [5, 3, 3, 3], 1, 1, true);
        check([2, 4, 9, 9], [6, 4, 3, 3], 2, 1, false);
        check([3, 4, 7, 6], [5, 4, 1, 1], 1, 0, true);
        check([2, 3, 34, 30], [4, 3, 7, 7], 2, 3, true); // one GEMM per image
    }

    #[test]
    fn the_image_batch_gets_no_gradient() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let images = random(&mut rng, &[2, 3, 8, 8], 0.0)?;
        let w = Var::from_tensor(&random(&mut rng, &[4, 3, 3, 3], 0.0)?)?;
        let gamma = Var::from_tensor(&random(&mut rng, &[4], 1.0)?)?;
        let beta = Var::from_tensor(&random(&mut rng, &[4], 0.0)?)?;
        let (out, _, _) = conv_batch_norm_train(&images, &w, 1, 1, &gamma, &beta, 1e-5, true)?;
        let grads = out.sum_all()?.backward()?;
        assert!(grads.get(&images).is_none());
        assert!(grads.get(&w).is_some() && grads.get(&gamma).is_some());
        Ok(())
    }

    #[test]
    fn rejects_a_gamma_of_the_wrong_length() -> Result<()> {
        let x = Tensor::zeros((2, 3, 8, 8), DType::F32, &Device::Cpu)?;
        let w = Tensor::zeros((4, 3, 3, 3), DType::F32, &Device::Cpu)?;
        let gamma = Tensor::ones(5, DType::F32, &Device::Cpu)?;
        let beta = Tensor::zeros(4, DType::F32, &Device::Cpu)?;
        let err = conv_batch_norm_train(&x, &w, 1, 1, &gamma, &beta, 1e-5, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("gamma [5]"), "{err}");
        Ok(())
    }
}
