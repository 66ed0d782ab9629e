//! The end of a residual block with a downsample shortcut, `relu(a + b)`, as one op: one pass
//! forward, one masked pass backward, where candle's composed `(a + b).relu()` makes four
//! tensors forward and backward. (Identity shortcuts are added inside the block's last conv+BN
//! op, see [`ShortcutLink`](super::conv_bn::ShortcutLink).)

use super::cpu::{cpu_tensor, storage_f32, with_tensor_f32};
use candle_core::{bail, CpuStorage, CustomOp2, DType, Device, Layout, Result, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// Elements per rayon task.
const CHUNK: usize = 1 << 15;

/// `relu(a + b)` for two tensors of one shape. Its gradient is PyTorch's: zero where the output
/// is zero (candle's own `relu` passes the gradient where the input is exactly 0).
///
/// On the CPU with f32 tensors this is one fused op; elsewhere candle's composed ops until a
/// device path exists, as after [`set_composed_ops(true)`](super::dispatch::set_composed_ops).
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dims() != b.dims() {
        bail!(
            "add_relu: the two inputs differ in shape: {:?} and {:?}",
            a.dims(),
            b.dims()
        );
    }
    let fused = matches!(a.device(), Device::Cpu)
        && a.dtype() == DType::F32
        && b.dtype() == DType::F32
        && !super::dispatch::composed_ops();
    if !fused {
        return (a + b)?.relu();
    }
    let a = a.contiguous()?;
    let b = b.contiguous()?;
    a.apply_op2_arc(&b, Arc::new(Box::new(AddRelu)))
}

/// The custom op.
struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "snapmix-add-relu"
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        a_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, candle_core::Shape)> {
        let a = storage_f32(a, a_layout, "add_relu lhs")?;
        let b = storage_f32(b, b_layout, "add_relu rhs")?;
        let mut out = Vec::with_capacity(a.len());
        out.spare_capacity_mut()
            .par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
            .for_each(|(out, (a, b))| {
                for (o, (&a, &b)) in out.iter_mut().zip(a.iter().zip(b)) {
                    o.write((a + b).max(0.0));
                }
            });
        // SAFETY: the chunks above cover all `a.len()` elements of the spare capacity.
        unsafe { out.set_len(a.len()) };
        Ok((CpuStorage::F32(out), a_layout.shape().clone()))
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !matches!(grad_out.device(), Device::Cpu) {
            bail!("snapmix-add-relu: backward runs on the CPU only");
        }
        let grad_out = grad_out.contiguous()?;
        let grad = with_tensor_f32(out, "add_relu output", |out| {
            with_tensor_f32(&grad_out, "add_relu output gradient", |grad| {
                let mut masked = Vec::with_capacity(grad.len());
                masked
                    .spare_capacity_mut()
                    .par_chunks_mut(CHUNK)
                    .zip(out.par_chunks(CHUNK).zip(grad.par_chunks(CHUNK)))
                    .for_each(|(dst, (out, grad))| {
                        for (d, (&o, &g)) in dst.iter_mut().zip(out.iter().zip(grad)) {
                            d.write(if o > 0.0 { g } else { 0.0 });
                        }
                    });
                // SAFETY: the chunks above cover all `grad.len()` elements.
                unsafe { masked.set_len(grad.len()) };
                Ok(masked)
            })
        })?;
        // Both inputs get the same gradient; candle accumulates each into its own slot.
        let grad = cpu_tensor(grad, out.shape())?;
        Ok((Some(grad.clone()), Some(grad)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn wave(len: usize, phase: f32) -> Vec<f32> {
        (0..len).map(|i| (i as f32 * 0.61 + phase).sin()).collect()
    }

    #[test]
    fn matches_composed_ops_forward_and_backward() -> Result<()> {
        let dims = (3, 5, 7, 9);
        let len = 3 * 5 * 7 * 9;
        let a = Var::from_vec(wave(len, 0.0), dims, &Device::Cpu)?;
        let b = Var::from_vec(wave(len, 1.3), dims, &Device::Cpu)?;
        let weights = Tensor::from_vec(wave(len, 2.1), dims, &Device::Cpu)?;

        let fused = add_relu(&a, &b)?;
        let composed = (a.as_tensor() + b.as_tensor())?.relu()?;
        let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
        assert_eq!(flat(&fused)?, flat(&composed)?);

        let fused_grads = (fused * &weights)?.sum_all()?.backward()?;
        let composed_grads = (composed * &weights)?.sum_all()?.backward()?;
        for var in [&a, &b] {
            let got = fused_grads.get(var.as_tensor()).expect("fused gradient");
            let want = composed_grads
                .get(var.as_tensor())
                .expect("composed gradient");
            assert_eq!(flat(got)?, flat(want)?);
        }
        Ok(())
    }

    #[test]
    fn gradient_is_zero_where_the_sum_is_exactly_zero() -> Result<()> {
        let a = Var::from_vec(vec![1.0f32, -2.0, 3.0], 3, &Device::Cpu)?;
        let b = Tensor::from_vec(vec![-1.0f32, 1.0, -1.0], 3, &Device::Cpu)?;
        let out = add_relu(&a, &b)?;
        assert_eq!(out.to_vec1::<f32>()?, vec![0.0, 0.0, 2.0]);
        let grads = out.sum_all()?.backward()?;
        let grad = grads.get(a.as_tensor()).expect("gradient of a");
        assert_eq!(grad.to_vec1::<f32>()?, vec![0.0, 0.0, 1.0]);
        Ok(())
    }

    #[test]
    fn shape_mismatch_is_an_error() {
        let a = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap();
        let err = add_relu(&a, &b).unwrap_err().to_string();
        assert!(err.contains("[2, 3]") && err.contains("[3, 2]"), "{err}");
    }
}
