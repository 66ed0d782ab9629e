//! The CUDA twin of `optim_cpu`: the SGD update of one parameter as one kernel (cuda/sgd.cu) on
//! candle's stream, where the composed candle ops launch about ten kernels and allocate as many
//! full-size tensors per parameter.

use crate::optim_cpu::SgdUpdate;
use candle_core::cuda::cudarc::driver::{CudaViewMut, LaunchConfig, PushKernelArg};
use candle_core::cuda::WrapErr;
use candle_core::{bail, CpuStorage, CudaStorage, InplaceOp1, InplaceOp2, Layout, Result, Tensor};
use std::sync::Mutex;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/sgd.ptx"));
const MODULE: &str = "snapmix_sgd";
const BLOCK: u32 = 256;

/// Whether [`sgd_update_in_place`] can take these tensors: f32, contiguous, on a CUDA device.
pub(crate) fn fusable(tensors: &[&Tensor]) -> bool {
    tensors
        .iter()
        .all(|t| t.device().is_cuda() && t.dtype() == candle_core::DType::F32 && t.is_contiguous())
}

/// `optim_cpu::sgd_update_in_place` on CUDA: the same update, bit for bit.
pub(crate) fn sgd_update_in_place(
    param: &Tensor,
    grad: &Tensor,
    buffer: &Tensor,
    update: SgdUpdate,
) -> Result<()> {
    crate::optim_cpu::check_shapes(param, grad, buffer)?;
    if !param.device().same_device(grad.device()) || !param.device().same_device(buffer.device()) {
        bail!("sgd: parameter, gradient and momentum buffer must be on one CUDA device");
    }
    param.inplace_op2(grad, &ParamPass { buffer, update })
}

/// The outer op: holds the parameter (mutable) and gradient, then opens the buffer.
struct ParamPass<'a> {
    buffer: &'a Tensor,
    update: SgdUpdate,
}

impl InplaceOp2 for ParamPass<'_> {
    fn name(&self) -> &'static str {
        "snapmix-sgd-cuda"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        bail!("snapmix-sgd-cuda is the CUDA update: CPU tensors take optim_cpu's")
    }

    fn cuda_fwd(
        &self,
        param: &mut CudaStorage,
        param_layout: &Layout,
        grad: &CudaStorage,
        grad_layout: &Layout,
    ) -> Result<()> {
        let (start, end) = contiguous(param_layout)?;
        let param = param.as_cuda_slice_mut::<f32>()?.slice_mut(start..end);
        let (grad_start, grad_end) = contiguous(grad_layout)?;
        let grad_storage = grad;
        let grad = grad.as_cuda_slice::<f32>()?.slice(grad_start..grad_end);
        self.buffer.inplace_op1(&BufferPass {
            param: Mutex::new(param),
            grad: &grad,
            device: &grad_storage.device,
            update: self.update,
        })
    }
}

/// The inner op: holds the momentum buffer (mutable) and launches the kernel.
struct BufferPass<'a> {
    param: Mutex<CudaViewMut<'a, f32>>,
    grad: &'a candle_core::cuda::cudarc::driver::CudaView<'a, f32>,
    device: &'a candle_core::CudaDevice,
    update: SgdUpdate,
}

impl InplaceOp1 for BufferPass<'_> {
    fn name(&self) -> &'static str {
        "snapmix-sgd-momentum-cuda"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> Result<()> {
        bail!("snapmix-sgd-momentum-cuda is the CUDA update: CPU tensors take optim_cpu's")
    }

    fn cuda_fwd(&self, buffer: &mut CudaStorage, layout: &Layout) -> Result<()> {
        let (start, end) = contiguous(layout)?;
        let mut buffer = buffer.as_cuda_slice_mut::<f32>()?.slice_mut(start..end);
        let mut param = match self.param.lock() {
            Ok(param) => param,
            Err(_) => bail!("sgd: a previous update panicked mid-way"),
        };
        let n = end - start;
        if n == 0 {
            return Ok(());
        }
        let SgdUpdate {
            lr,
            weight_decay,
            momentum,
            nesterov,
        } = self.update;
        let (n64, nesterov) = (n as u64, i32::from(nesterov));
        let func = self
            .device
            .get_or_load_custom_func("sgd_momentum", MODULE, PTX)?;
        let mut launch = func.builder();
        launch
            .arg(&mut *param)
            .arg(self.grad)
            .arg(&mut buffer)
            .arg(&n64)
            .arg(&lr)
            .arg(&weight_decay)
            .arg(&momentum)
            .arg(&nesterov);
        let config = LaunchConfig {
            grid_dim: (n.div_ceil(BLOCK as usize).clamp(1, 65_535 * 8) as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the kernel's arguments match sgd.cu's signature; the three views cover n
        // elements each (shapes checked above) and are distinct tensors' storages.
        unsafe { launch.launch(config) }.w()?;
        Ok(())
    }
}

fn contiguous(layout: &Layout) -> Result<(usize, usize)> {
    match layout.contiguous_offsets() {
        Some(offsets) => Ok(offsets),
        None => bail!("sgd: the fused update needs contiguous f32 tensors"),
    }
}
