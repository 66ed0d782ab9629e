//! Conv2d forward, backward-data and backward-filter through cuDNN on candle's stream: each
//! shape's algorithms are chosen once by measurement (cudnnFind*Ex, like `cudnn.benchmark`) and
//! every call reuses one workspace buffer per device that only grows.

use super::{cuda_tensor, view_f32, Borrowed};
use candle_core::cuda_backend::DeviceId;
use candle_core::{bail, CudaDevice, CudaStorage, Layout, Result, Shape, Tensor};
use cudarc::cudnn::{result as cudnn_result, sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

/// The shapes of one convolution (NCHW input, OIHW weight, no bias/dilation/groups, the same
/// stride and zero padding on both axes), as `conv2d.rs` validated them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ConvShape {
    pub batch: usize,
    pub in_channels: usize,
    pub rows: usize,
    pub cols: usize,
    pub out_channels: usize,
    pub kernel_rows: usize,
    pub kernel_cols: usize,
    pub stride: usize,
    pub padding: usize,
    pub out_rows: usize,
    pub out_cols: usize,
}

impl ConvShape {
    fn input_dims(&self) -> [usize; 4] {
        [self.batch, self.in_channels, self.rows, self.cols]
    }

    fn weight_dims(&self) -> [usize; 4] {
        [
            self.out_channels,
            self.in_channels,
            self.kernel_rows,
            self.kernel_cols,
        ]
    }

    fn output_dims(&self) -> [usize; 4] {
        [self.batch, self.out_channels, self.out_rows, self.out_cols]
    }
}

/// `x * w -> y`: the output `y` of `conv2d(x, w)`, on CUDA.
pub(crate) fn forward(
    shape: &ConvShape,
    x: &CudaStorage,
    x_layout: &Layout,
    weight: &CudaStorage,
    w_layout: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let device = x.device.clone();
    let x = view_f32(x, x_layout, "conv2d input")?;
    let weight = view_f32(weight, w_layout, "conv2d weight")?;
    let y_dims = shape.output_dims();
    // SAFETY: cuDNN writes every element of y (beta = 0).
    let mut y = unsafe { device.alloc::<f32>(y_dims.iter().product()) }?;
    with_state(&device, |state| {
        let stream = state.stream.clone();
        let (x_ptr, _x_sync) = x.device_ptr(&stream);
        let (w_ptr, _w_sync) = weight.device_ptr(&stream);
        let (y_ptr, _y_sync) = y.device_ptr_mut(&stream);
        state.run(
            shape,
            Pass::Forward,
            Pointers {
                x: x_ptr,
                w: w_ptr,
                y: y_ptr,
            },
        )
    })?;
    Ok((
        CudaStorage::wrap_cuda_slice(y, device),
        Shape::from(y_dims.to_vec()),
    ))
}

/// The gradients `(input, weight)` of `conv2d(x, weight)` given the output's gradient (all
/// contiguous); the input gradient only when `input_grad` (not for the image batch).
pub(crate) fn backward(
    shape: &ConvShape,
    x: &Tensor,
    weight: &Tensor,
    grad_out: &Tensor,
    input_grad: bool,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let device = x.device().as_cuda_device()?.clone();
    let (x, weight, dy) = (
        Borrowed::new(x, "conv2d input"),
        Borrowed::new(weight, "conv2d weight"),
        Borrowed::new(grad_out, "conv2d output gradient"),
    );
    let (x, weight, dy) = (x.view()?, weight.view()?, dy.view()?);
    let w_dims = shape.weight_dims();
    // SAFETY: cuDNN writes every element of dw and dx (beta = 0).
    let mut dw = unsafe { device.alloc::<f32>(w_dims.iter().product()) }?;
    let mut dx = match input_grad {
        true => Some(unsafe { device.alloc::<f32>(shape.input_dims().iter().product()) }?),
        false => None,
    };
    with_state(&device, |state| {
        let stream = state.stream.clone();
        let (x_ptr, _x_sync) = x.device_ptr(&stream);
        let (dy_ptr, _dy_sync) = dy.device_ptr(&stream);
        {
            let (dw_ptr, _dw_sync) = dw.device_ptr_mut(&stream);
            let ptrs = Pointers {
                x: x_ptr,
                w: dw_ptr,
                y: dy_ptr,
            };
            state.run(shape, Pass::BackwardFilter, ptrs)?;
        }
        if let Some(dx) = dx.as_mut() {
            let (w_ptr, _w_sync) = weight.device_ptr(&stream);
            let (dx_ptr, _dx_sync) = dx.device_ptr_mut(&stream);
            let ptrs = Pointers {
                x: dx_ptr,
                w: w_ptr,
                y: dy_ptr,
            };
            state.run(shape, Pass::BackwardData, ptrs)?;
        }
        Ok(())
    })?;
    let grad_x = dx.map(|dx| cuda_tensor(dx, &device, shape.input_dims().to_vec()));
    Ok((grad_x, Some(cuda_tensor(dw, &device, w_dims.to_vec()))))
}

/// The three cuDNN convolution calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Pass {
    /// y = conv(x, w).
    Forward,
    /// dx from w and dy.
    BackwardData,
    /// dw from x and dy.
    BackwardFilter,
}

/// Device addresses of one call, named after the forward pass: `y` is dy in backward, `x` is
/// dx in backward-data, `w` is dw in backward-filter.
struct Pointers {
    x: u64,
    w: u64,
    y: u64,
}

/// The algorithm chosen for one pass.
#[derive(Clone, Copy, Debug)]
enum Algo {
    Forward(sys::cudnnConvolutionFwdAlgo_t),
    BackwardData(sys::cudnnConvolutionBwdDataAlgo_t),
    BackwardFilter(sys::cudnnConvolutionBwdFilterAlgo_t),
}

/// What a cached plan is for: the shape, the pass and whether TF32 was allowed.
type PlanKey = (ConvShape, Pass, bool);

/// A pass ready to run: descriptors (the convolution's math type set to the measured
/// algorithm's), the algorithm and the workspace it needs.
struct Plan {
    descriptors: Descriptors,
    algo: Algo,
    workspace_bytes: usize,
}

/// cuDNN state of one device: a handle bound to candle's stream, the measured plans and the
/// workspace. One per device, not per thread: the trainer's steps hop between rayon workers,
/// and per-thread states re-measured every shape and kept a workspace on each worker.
struct CudnnState {
    handle: Handle,
    stream: Arc<CudaStream>,
    plans: HashMap<PlanKey, Plan>,
    /// Shared by every call on this device; replaced by a larger one when a plan needs more,
    /// never shrunk.
    workspace: Option<CudaSlice<u8>>,
}

// SAFETY: the handle and descriptors are used only under STATES' lock, one thread at a time,
// which cuDNN allows ("a handle may be used by any host thread, but not concurrently").
unsafe impl Send for CudnnState {}

static STATES: Mutex<Option<HashMap<DeviceId, CudnnState>>> = Mutex::new(None);

/// Runs `f` with the cuDNN state of `device`, creating it on first use.
fn with_state<R>(device: &CudaDevice, f: impl FnOnce(&mut CudnnState) -> Result<R>) -> Result<R> {
    // A panic while the lock was held cannot leave a half-built state: entries are inserted
    // whole, and a plan is cached only after its measurement succeeded.
    let mut states = STATES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let state = match states.get_or_insert_with(HashMap::new).entry(device.id()) {
        std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
        std::collections::hash_map::Entry::Vacant(entry) => {
            entry.insert(CudnnState::new(device.cuda_stream())?)
        }
    };
    state
        .stream
        .context()
        .bind_to_thread()
        .map_err(super::driver_err("conv2d"))?;
    f(state)
}

impl CudnnState {
    fn new(stream: Arc<CudaStream>) -> Result<Self> {
        stream
            .context()
            .bind_to_thread()
            .map_err(super::driver_err("conv2d"))?;
        let handle = Handle(cudnn_result::create_handle().map_err(cudnn_err("cudnnCreate"))?);
        // SAFETY: a live handle and candle's live stream (kept alive by `stream`).
        unsafe { cudnn_result::set_stream(handle.0, stream.cu_stream() as sys::cudaStream_t) }
            .map_err(cudnn_err("cudnnSetStream"))?;
        Ok(Self {
            handle,
            stream,
            plans: HashMap::new(),
            workspace: None,
        })
    }

    /// Runs one pass, measuring its algorithms first if this shape has none yet.
    fn run(&mut self, shape: &ConvShape, pass: Pass, ptrs: Pointers) -> Result<()> {
        let tf32 = crate::ops::dispatch::allow_tf32();
        let plan = match self.plans.entry((*shape, pass, tf32)) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(entry) => entry.insert(measure(
                &self.handle,
                &self.stream,
                shape,
                pass,
                tf32,
                &ptrs,
            )?),
        };
        let (workspace_bytes, algo) = (plan.workspace_bytes, plan.algo);
        let workspace = grow_workspace(&mut self.workspace, &self.stream, workspace_bytes)?;
        let d = &plan.descriptors;
        let (alpha, beta) = (1.0f32, 0.0f32);
        let alpha = &alpha as *const f32 as *const c_void;
        let beta = &beta as *const f32 as *const c_void;
        let ws = workspace as *mut c_void;
        let h = self.handle.0;
        // SAFETY: descriptors match the buffers (built from the same shape), the workspace holds
        // at least `workspace_bytes`, and all pointers are live for the call (their guards are
        // held by the caller); everything runs on candle's stream.
        let status = unsafe {
            match algo {
                Algo::Forward(algo) => cudnn_result::convolution_forward(
                    h,
                    alpha,
                    d.x.0,
                    ptrs.x as *const c_void,
                    d.w.0,
                    ptrs.w as *const c_void,
                    d.conv.0,
                    algo,
                    ws,
                    workspace_bytes,
                    beta,
                    d.y.0,
                    ptrs.y as *mut c_void,
                ),
                Algo::BackwardData(algo) => cudnn_result::convolution_backward_data(
                    h,
                    alpha,
                    d.w.0,
                    ptrs.w as *const c_void,
                    d.y.0,
                    ptrs.y as *const c_void,
                    d.conv.0,
                    algo,
                    ws,
                    workspace_bytes,
                    beta,
                    d.x.0,
                    ptrs.x as *mut c_void,
                ),
                Algo::BackwardFilter(algo) => cudnn_result::convolution_backward_filter(
                    h,
                    alpha,
                    d.x.0,
                    ptrs.x as *const c_void,
                    d.y.0,
                    ptrs.y as *const c_void,
                    d.conv.0,
                    algo,
                    ws,
                    workspace_bytes,
                    beta,
                    d.w.0,
                    ptrs.w as *mut c_void,
                ),
            }
        };
        status.map_err(|err| {
            candle_core::Error::Msg(format!(
                "conv2d: cuDNN {pass:?} with {algo:?} failed for {shape:?}: {err:?}"
            ))
        })
    }
}

/// The address of a workspace of at least `bytes` (0 for none), growing the shared buffer
/// when needed. The old buffer is freed in stream order, after the calls that used it.
fn grow_workspace(
    workspace: &mut Option<CudaSlice<u8>>,
    stream: &Arc<CudaStream>,
    bytes: usize,
) -> Result<u64> {
    if bytes == 0 {
        return Ok(0);
    }
    if workspace.as_ref().is_none_or(|w| w.len() < bytes) {
        *workspace = None;
        // SAFETY: cuDNN workspaces need no initialisation.
        let buffer =
            unsafe { stream.alloc::<u8>(bytes) }.map_err(super::driver_err("conv2d workspace"))?;
        *workspace = Some(buffer);
    }
    let Some(buffer) = workspace.as_mut() else {
        bail!("conv2d: workspace missing after allocation");
    };
    let (ptr, _sync) = buffer.device_ptr_mut(stream);
    Ok(ptr)
}

/// Chooses the fastest algorithm for one pass by running them all once on the call's own
/// buffers (cudnnFind*Ex), with a temporary workspace as large as the slowest-to-fit
/// algorithm wants, up to the workspace limit. With TF32 disallowed only FMA math (strict
/// fp32) is tried.
fn measure(
    handle: &Handle,
    stream: &Arc<CudaStream>,
    shape: &ConvShape,
    pass: Pass,
    tf32: bool,
    ptrs: &Pointers,
) -> Result<Plan> {
    let descriptors = Descriptors::new(shape)?;
    let math = if tf32 {
        sys::cudnnMathType_t::CUDNN_DEFAULT_MATH
    } else {
        sys::cudnnMathType_t::CUDNN_FMA_MATH
    };
    // SAFETY: a live convolution descriptor.
    unsafe { cudnn_result::set_convolution_math_type(descriptors.conv.0, math) }
        .map_err(cudnn_err("cudnnSetConvolutionMathType"))?;
    let limit = crate::ops::dispatch::conv_workspace_limit();
    let wanted = workspace_sizes(handle, &descriptors, pass)
        .into_iter()
        .filter(|&bytes| bytes <= limit)
        .max()
        .unwrap_or(0);
    // A failed allocation only narrows the search to algorithms needing no workspace.
    let mut find_workspace = match wanted {
        0 => None,
        // SAFETY: cuDNN workspaces need no initialisation.
        bytes => unsafe { stream.alloc::<u8>(bytes) }.ok(),
    };
    let find_bytes = find_workspace.as_ref().map_or(0, |w| w.len());
    let (ws, _ws_sync) = match find_workspace.as_mut() {
        Some(w) => {
            let (ptr, sync) = w.device_ptr_mut(stream);
            (ptr as *mut c_void, Some(sync))
        }
        None => (std::ptr::null_mut(), None),
    };
    let tensor_cores = [
        sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
        sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION,
    ];
    let usable = |status: sys::cudnnStatus_t, memory: usize, math: sys::cudnnMathType_t| {
        status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS
            && memory <= find_bytes
            && (tf32 || !tensor_cores.contains(&math))
    };
    let (h, d) = (handle.0, &descriptors);
    let mut count = 0;
    // SAFETY: as in `run`; the find calls write only the pass's output buffer and the
    // workspace, which are ours for the duration.
    let chosen = unsafe {
        match pass {
            Pass::Forward => {
                let mut perf = [std::mem::zeroed::<sys::cudnnConvolutionFwdAlgoPerf_t>(); 8];
                sys::cudnnFindConvolutionForwardAlgorithmEx(
                    h,
                    d.x.0,
                    ptrs.x as *const c_void,
                    d.w.0,
                    ptrs.w as *const c_void,
                    d.conv.0,
                    d.y.0,
                    ptrs.y as *mut c_void,
                    perf.len() as i32,
                    &mut count,
                    perf.as_mut_ptr(),
                    ws,
                    find_bytes,
                )
                .result()
                .map_err(cudnn_err("cudnnFindConvolutionForwardAlgorithmEx"))?;
                perf.iter()
                    .take(count.max(0) as usize)
                    .find(|p| usable(p.status, p.memory, p.mathType))
                    .map(|p| (Algo::Forward(p.algo), p.memory, p.mathType))
            }
            Pass::BackwardData => {
                let mut perf = [std::mem::zeroed::<sys::cudnnConvolutionBwdDataAlgoPerf_t>(); 6];
                sys::cudnnFindConvolutionBackwardDataAlgorithmEx(
                    h,
                    d.w.0,
                    ptrs.w as *const c_void,
                    d.y.0,
                    ptrs.y as *const c_void,
                    d.conv.0,
                    d.x.0,
                    ptrs.x as *mut c_void,
                    perf.len() as i32,
                    &mut count,
                    perf.as_mut_ptr(),
                    ws,
                    find_bytes,
                )
                .result()
                .map_err(cudnn_err("cudnnFindConvolutionBackwardDataAlgorithmEx"))?;
                perf.iter()
                    .take(count.max(0) as usize)
                    .find(|p| usable(p.status, p.memory, p.mathType))
                    .map(|p| (Algo::BackwardData(p.algo), p.memory, p.mathType))
            }
            Pass::BackwardFilter => {
                let mut perf = [std::mem::zeroed::<sys::cudnnConvolutionBwdFilterAlgoPerf_t>(); 7];
                sys::cudnnFindConvolutionBackwardFilterAlgorithmEx(
                    h,
                    d.x.0,
                    ptrs.x as *const c_void,
                    d.y.0,
                    ptrs.y as *const c_void,
                    d.conv.0,
                    d.w.0,
                    ptrs.w as *mut c_void,
                    perf.len() as i32,
                    &mut count,
                    perf.as_mut_ptr(),
                    ws,
                    find_bytes,
                )
                .result()
                .map_err(cudnn_err("cudnnFindConvolutionBackwardFilterAlgorithmEx"))?;
                perf.iter()
                    .take(count.max(0) as usize)
                    .find(|p| usable(p.status, p.memory, p.mathType))
                    .map(|p| (Algo::BackwardFilter(p.algo), p.memory, p.mathType))
            }
        }
    };
    let Some((algo, workspace_bytes, math)) = chosen else {
        bail!(
            "conv2d: cuDNN found no usable {pass:?} algorithm for {shape:?} (TF32 {tf32}, \
             workspace {find_bytes} bytes)"
        );
    };
    // The real runs use the measured math type (as PyTorch does), and never TF32 when it is
    // disallowed.
    let math = if tf32 {
        math
    } else {
        sys::cudnnMathType_t::CUDNN_FMA_MATH
    };
    // SAFETY: a live convolution descriptor.
    unsafe { cudnn_result::set_convolution_math_type(descriptors.conv.0, math) }
        .map_err(cudnn_err("cudnnSetConvolutionMathType"))?;
    Ok(Plan {
        descriptors,
        algo,
        workspace_bytes,
    })
}

/// The workspace each algorithm of `pass` needs (algorithms that do not support the shape
/// are left out).
fn workspace_sizes(handle: &Handle, d: &Descriptors, pass: Pass) -> Vec<usize> {
    use sys::cudnnConvolutionBwdDataAlgo_t as D;
    use sys::cudnnConvolutionBwdFilterAlgo_t as F;
    use sys::cudnnConvolutionFwdAlgo_t as A;
    let h = handle.0;
    // SAFETY: size queries on live descriptors.
    unsafe {
        match pass {
            Pass::Forward => [
                A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
                A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
                A::CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
                A::CUDNN_CONVOLUTION_FWD_ALGO_DIRECT,
                A::CUDNN_CONVOLUTION_FWD_ALGO_FFT,
                A::CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING,
                A::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
                A::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
            ]
            .into_iter()
            .filter_map(|algo| {
                cudnn_result::get_convolution_forward_workspace_size(
                    h, d.x.0, d.w.0, d.conv.0, d.y.0, algo,
                )
                .ok()
            })
            .collect(),
            Pass::BackwardData => [
                D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_0,
                D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_1,
                D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT,
                D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT_TILING,
                D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD,
                D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD_NONFUSED,
            ]
            .into_iter()
            .filter_map(|algo| {
                cudnn_result::get_convolution_backward_data_workspace_size(
                    h, d.w.0, d.y.0, d.conv.0, d.x.0, algo,
                )
                .ok()
            })
            .collect(),
            Pass::BackwardFilter => [
                F::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0,
                F::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1,
                F::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT,
                F::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3,
                F::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD,
                F::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD_NONFUSED,
                F::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT_TILING,
            ]
            .into_iter()
            .filter_map(|algo| {
                cudnn_result::get_convolution_backward_filter_workspace_size(
                    h, d.x.0, d.y.0, d.conv.0, d.w.0, algo,
                )
                .ok()
            })
            .collect(),
        }
    }
}

/// Maps a cuDNN status to a candle error naming the call.
fn cudnn_err(call: &'static str) -> impl FnOnce(cudnn_result::CudnnError) -> candle_core::Error {
    move |err| candle_core::Error::Msg(format!("conv2d: {call} failed: {err:?}"))
}

/// An owned cuDNN handle.
struct Handle(sys::cudnnHandle_t);

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreate and destroyed once; a failure cannot be reported here.
        let _ = unsafe { cudnn_result::destroy_handle(self.0) };
    }
}

struct TensorDesc(sys::cudnnTensorDescriptor_t);
struct FilterDesc(sys::cudnnFilterDescriptor_t);
struct ConvDesc(sys::cudnnConvolutionDescriptor_t);

impl Drop for TensorDesc {
    fn drop(&mut self) {
        // SAFETY: created once, destroyed once.
        let _ = unsafe { cudnn_result::destroy_tensor_descriptor(self.0) };
    }
}

impl Drop for FilterDesc {
    fn drop(&mut self) {
        // SAFETY: created once, destroyed once.
        let _ = unsafe { cudnn_result::destroy_filter_descriptor(self.0) };
    }
}

impl Drop for ConvDesc {
    fn drop(&mut self) {
        // SAFETY: created once, destroyed once.
        let _ = unsafe { cudnn_result::destroy_convolution_descriptor(self.0) };
    }
}

/// The descriptors of one convolution: f32 NCHW tensors, an OIHW filter, cross-correlation.
struct Descriptors {
    x: TensorDesc,
    w: FilterDesc,
    y: TensorDesc,
    conv: ConvDesc,
}

impl Descriptors {
    fn new(shape: &ConvShape) -> Result<Self> {
        let dims = |d: [usize; 4]| -> Result<[i32; 4]> {
            let mut out = [0i32; 4];
            for (o, v) in out.iter_mut().zip(d) {
                *o = to_i32(v)?;
            }
            Ok(out)
        };
        let (f32_type, nchw) = (
            sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
        );
        let x = TensorDesc(
            cudnn_result::create_tensor_descriptor()
                .map_err(cudnn_err("cudnnCreateTensorDescriptor"))?,
        );
        let y = TensorDesc(
            cudnn_result::create_tensor_descriptor()
                .map_err(cudnn_err("cudnnCreateTensorDescriptor"))?,
        );
        let w = FilterDesc(
            cudnn_result::create_filter_descriptor()
                .map_err(cudnn_err("cudnnCreateFilterDescriptor"))?,
        );
        let conv = ConvDesc(
            cudnn_result::create_convolution_descriptor()
                .map_err(cudnn_err("cudnnCreateConvolutionDescriptor"))?,
        );
        let (stride, padding) = (to_i32(shape.stride)?, to_i32(shape.padding)?);
        // SAFETY: freshly created descriptors.
        unsafe {
            cudnn_result::set_tensor4d_descriptor(x.0, nchw, f32_type, dims(shape.input_dims())?)
                .map_err(cudnn_err("cudnnSetTensor4dDescriptor"))?;
            cudnn_result::set_tensor4d_descriptor(y.0, nchw, f32_type, dims(shape.output_dims())?)
                .map_err(cudnn_err("cudnnSetTensor4dDescriptor"))?;
            cudnn_result::set_filter4d_descriptor(w.0, f32_type, nchw, dims(shape.weight_dims())?)
                .map_err(cudnn_err("cudnnSetFilter4dDescriptor"))?;
            cudnn_result::set_convolution2d_descriptor(
                conv.0,
                padding,
                padding,
                stride,
                stride,
                1,
                1,
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                f32_type,
            )
            .map_err(cudnn_err("cudnnSetConvolution2dDescriptor"))?;
        }
        Ok(Self { x, w, y, conv })
    }
}

/// A dimension as cuDNN's `int`.
fn to_i32(value: usize) -> Result<i32> {
    i32::try_from(value).map_err(|_| {
        candle_core::Error::Msg(format!("conv2d: dimension {value} too large for cuDNN"))
    })
}
