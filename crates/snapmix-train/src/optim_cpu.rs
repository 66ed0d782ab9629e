//! The SGD update of one parameter as a single in-place pass on the CPU: parameter, gradient
//! and momentum buffer are each read once and the two updated ones written once, where the
//! composed candle ops read and allocate about ten full-size tensors per parameter.

use candle_core::{bail, CpuStorage, InplaceOp1, InplaceOp2, Layout, Result, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// Elements per rayon task: big enough to amortise scheduling, small enough to split the
/// large layer4 weights across threads.
const CHUNK: usize = 1 << 14;

/// The hyper-parameters of one update (PyTorch's SGD with dampening 0).
#[derive(Clone, Copy, Debug)]
pub(crate) struct SgdUpdate {
    pub(crate) lr: f32,
    pub(crate) weight_decay: f32,
    pub(crate) momentum: f32,
    pub(crate) nesterov: bool,
}

/// Whether [`sgd_update_in_place`] can take these tensors: f32, contiguous, on the CPU.
pub(crate) fn fusable(tensors: &[&Tensor]) -> bool {
    tensors
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && t.is_contiguous())
}

/// `d = g + wd*p; buf = mu*buf + d; d = nesterov ? d + mu*buf : buf; p -= lr*d`, in place
/// on `param` and `buffer` (which must have `grad`'s shape; a fresh buffer is all zeros, which
/// makes the first step `buf = d` exactly as PyTorch's).
pub(crate) fn sgd_update_in_place(
    param: &Tensor,
    grad: &Tensor,
    buffer: &Tensor,
    update: SgdUpdate,
) -> Result<()> {
    check_shapes(param, grad, buffer)?;
    param.inplace_op2(grad, &ParamPass { buffer, update })
}

/// The fused updates' precondition: parameter, gradient and momentum buffer of one shape (the
/// kernels walk the three buffers in step).
pub(crate) fn check_shapes(param: &Tensor, grad: &Tensor, buffer: &Tensor) -> Result<()> {
    if param.dims() != grad.dims() || param.dims() != buffer.dims() {
        bail!(
            "sgd: parameter {:?}, gradient {:?} and momentum buffer {:?} differ in shape",
            param.dims(),
            grad.dims(),
            buffer.dims()
        );
    }
    Ok(())
}

/// The outer op: holds the parameter (mutable) and gradient, then opens the buffer.
struct ParamPass<'a> {
    buffer: &'a Tensor,
    update: SgdUpdate,
}

impl InplaceOp2 for ParamPass<'_> {
    fn name(&self) -> &'static str {
        "snapmix-sgd"
    }

    fn cpu_fwd(
        &self,
        param: &mut CpuStorage,
        param_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> Result<()> {
        let param = f32_slice_mut(param, param_layout)?;
        let grad = f32_slice(grad, grad_layout)?;
        self.buffer.inplace_op1(&BufferPass {
            param: Mutex::new(param),
            grad,
            update: self.update,
        })
    }
}

/// The inner op: holds the momentum buffer (mutable) and runs the fused loop.
struct BufferPass<'a> {
    param: Mutex<&'a mut [f32]>,
    grad: &'a [f32],
    update: SgdUpdate,
}

impl InplaceOp1 for BufferPass<'_> {
    fn name(&self) -> &'static str {
        "snapmix-sgd-momentum"
    }

    fn cpu_fwd(&self, buffer: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let buffer = f32_slice_mut(buffer, layout)?;
        let mut param = match self.param.lock() {
            Ok(param) => param,
            Err(_) => bail!("sgd: a previous update panicked mid-way"),
        };
        let SgdUpdate {
            lr,
            weight_decay,
            momentum,
            nesterov,
        } = self.update;
        param
            .par_chunks_mut(CHUNK)
            .zip(self.grad.par_chunks(CHUNK))
            .zip(buffer.par_chunks_mut(CHUNK))
            .for_each(|((p, g), b)| {
                for ((p, &g), b) in p.iter_mut().zip(g).zip(b) {
                    let d = if weight_decay != 0.0 {
                        g + weight_decay * *p
                    } else {
                        g
                    };
                    *b = momentum * *b + d;
                    let step = if nesterov { d + momentum * *b } else { *b };
                    *p -= lr * step;
                }
            });
        Ok(())
    }
}

fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Ok(&data[start..end]),
        _ => bail!("sgd: the fused update needs contiguous f32 tensors"),
    }
}

fn f32_slice_mut<'a>(storage: &'a mut CpuStorage, layout: &Layout) -> Result<&'a mut [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Ok(&mut data[start..end]),
        _ => bail!("sgd: the fused update needs contiguous f32 tensors"),
    }
}
