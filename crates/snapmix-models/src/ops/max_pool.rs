//! 2-D max pooling with a backward pass for overlapping windows: candle 0.11.1's `max_pool2d`
//! has none when kernel != stride, which is exactly the ResNet stem pool (3x3, stride 2, pad 1).
//!
//! On the CPU (and for f32 on CUDA with the `cuda` feature) it is a candle `CustomOp1` whose
//! backward routes each output gradient to the first maximum of its window (PyTorch's rule,
//! padding acting as -inf). Other devices use an exact composition of candle ops (window stack
//! -> argmax -> gather) with the same semantics.

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Result, Shape, Tensor,
    WithDType, D,
};
use rayon::prelude::*;

/// A square max-pool window: `kernel` x `kernel`, moved by `stride`, over an input padded by
/// `padding` on every side (padding never wins a max, as in PyTorch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxPool2d {
    /// Window side.
    pub kernel: usize,
    /// Step between windows.
    pub stride: usize,
    /// Implicit -inf padding on each side.
    pub padding: usize,
}

impl MaxPool2d {
    /// The ResNet stem pool: 3x3, stride 2, padding 1.
    pub const RESNET_STEM: MaxPool2d = MaxPool2d {
        kernel: 3,
        stride: 2,
        padding: 1,
    };

    /// Output `(rows, cols)` for an input of `(rows, cols)` (floor mode, like PyTorch's default).
    pub fn output_size(&self, rows: usize, cols: usize) -> Result<(usize, usize)> {
        if self.kernel == 0 || self.stride == 0 {
            bail!(
                "max_pool2d: kernel ({}) and stride ({}) must be positive",
                self.kernel,
                self.stride
            )
        }
        if 2 * self.padding > self.kernel {
            bail!(
                "max_pool2d: padding {} must be at most half the kernel {}",
                self.padding,
                self.kernel
            )
        }
        let padded = (rows + 2 * self.padding, cols + 2 * self.padding);
        if padded.0 < self.kernel || padded.1 < self.kernel {
            bail!(
                "max_pool2d: input {rows}x{cols} is smaller than the {0}x{0} window",
                self.kernel
            )
        }
        Ok((
            (padded.0 - self.kernel) / self.stride + 1,
            (padded.1 - self.kernel) / self.stride + 1,
        ))
    }

    /// Pools `x` `[B, C, rows, cols]`, differentiably on every device.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, rows, cols) = x.dims4()?;
        self.output_size(rows, cols)?;
        match x.device() {
            Device::Cpu => x.contiguous()?.apply_op1(*self),
            Device::Cuda(_) if cfg!(feature = "cuda") && x.dtype() == DType::F32 => {
                x.contiguous()?.apply_op1(*self)
            }
            _ => self.forward_composed(x),
        }
    }

    /// The same pool from stock candle ops: the k*k shifted strided views are stacked, the
    /// first argmax picked and gathered, so the gradient goes to the first maximum like the
    /// CPU op's. Costs k*k times the output's memory; used where the custom op has no kernel.
    pub fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        let (batch, channels, rows, cols) = x.dims4()?;
        let (out_rows, out_cols) = self.output_size(rows, cols)?;
        // Pad with -inf, enough at the end that every window row/col start + stride * out fits.
        let need_rows = (self.kernel - 1) + self.stride * out_rows;
        let need_cols = (self.kernel - 1) + self.stride * out_cols;
        let padded = pad_neg_inf(x, 2, self.padding, need_rows - rows - self.padding)?;
        let padded = pad_neg_inf(&padded, 3, self.padding, need_cols - cols - self.padding)?;
        let mut windows = Vec::with_capacity(self.kernel * self.kernel);
        for dr in 0..self.kernel {
            for dc in 0..self.kernel {
                let view = padded
                    .narrow(2, dr, self.stride * out_rows)?
                    .narrow(3, dc, self.stride * out_cols)?
                    .reshape((
                        batch,
                        channels,
                        out_rows,
                        self.stride,
                        out_cols,
                        self.stride,
                    ))?
                    .narrow(3, 0, 1)?
                    .narrow(5, 0, 1)?
                    .reshape((batch, channels, out_rows, out_cols))?;
                windows.push(view);
            }
        }
        let stacked = Tensor::stack(&windows, D::Minus1)?;
        let first_max = stacked.argmax_keepdim(D::Minus1)?;
        stacked.gather(&first_max, D::Minus1)?.squeeze(D::Minus1)
    }
}

/// Pads dimension `dim` of `x` with `before` and `after` slices of -inf.
fn pad_neg_inf(x: &Tensor, dim: usize, before: usize, after: usize) -> Result<Tensor> {
    let mut parts = Vec::with_capacity(3);
    let filler = |len: usize| -> Result<Option<Tensor>> {
        if len == 0 {
            return Ok(None);
        }
        let mut dims = x.dims().to_vec();
        dims[dim] = len;
        Tensor::full(f32::NEG_INFINITY, dims, x.device())?
            .to_dtype(x.dtype())
            .map(Some)
    };
    if let Some(t) = filler(before)? {
        parts.push(t);
    }
    parts.push(x.clone());
    if let Some(t) = filler(after)? {
        parts.push(t);
    }
    Tensor::cat(&parts, dim)
}

/// Geometry of one pooling call on a contiguous `[B, C, rows, cols]` tensor.
#[derive(Clone, Copy)]
struct PlaneGeometry {
    rows: usize,
    cols: usize,
    out_rows: usize,
    out_cols: usize,
    pool: MaxPool2d,
}

impl PlaneGeometry {
    fn new(pool: MaxPool2d, layout: &Layout) -> Result<(Self, usize)> {
        let (batch, channels, rows, cols) = layout.shape().dims4()?;
        let (out_rows, out_cols) = pool.output_size(rows, cols)?;
        let geometry = PlaneGeometry {
            rows,
            cols,
            out_rows,
            out_cols,
            pool,
        };
        Ok((geometry, batch * channels))
    }

    /// Index in the plane of the first maximum of output cell (`out_row`, `out_col`); NaN wins
    /// like in PyTorch so that it propagates.
    fn window_argmax<T: WithDType>(&self, plane: &[T], out_row: usize, out_col: usize) -> usize {
        let pool = self.pool;
        let row_start = (out_row * pool.stride).saturating_sub(pool.padding);
        let row_end = (out_row * pool.stride + pool.kernel - pool.padding).min(self.rows);
        let col_start = (out_col * pool.stride).saturating_sub(pool.padding);
        let col_end = (out_col * pool.stride + pool.kernel - pool.padding).min(self.cols);
        let mut best = row_start * self.cols + col_start;
        let mut best_value = plane[best];
        for row in row_start..row_end {
            for col in col_start..col_end {
                let index = row * self.cols + col;
                let value = plane[index];
                if value > best_value || value.partial_cmp(&value).is_none() {
                    best = index;
                    best_value = value;
                    if best_value.partial_cmp(&best_value).is_none() {
                        return best;
                    }
                }
            }
        }
        best
    }
}

fn contiguous_slice<'a, T: WithDType>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&storage.as_slice::<T>()?[start..end]),
        None => bail!("max_pool2d: expected a contiguous tensor"),
    }
}

fn pool_forward<T: WithDType>(
    pool: MaxPool2d,
    storage: &CpuStorage,
    layout: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (geometry, planes) = PlaneGeometry::new(pool, layout)?;
    let input = contiguous_slice::<T>(storage, layout)?;
    let plane_in = geometry.rows * geometry.cols;
    let plane_out = geometry.out_rows * geometry.out_cols;
    let mut output = vec![T::zero(); planes * plane_out];
    output
        .par_chunks_mut(plane_out.max(1))
        .zip(input.par_chunks(plane_in.max(1)))
        .for_each(|(out_plane, in_plane)| {
            for out_row in 0..geometry.out_rows {
                for out_col in 0..geometry.out_cols {
                    let best = geometry.window_argmax(in_plane, out_row, out_col);
                    out_plane[out_row * geometry.out_cols + out_col] = in_plane[best];
                }
            }
        });
    let (batch, channels, _, _) = layout.shape().dims4()?;
    let shape = Shape::from((batch, channels, geometry.out_rows, geometry.out_cols));
    Ok((T::to_cpu_storage_owned(output), shape))
}

impl CustomOp1 for MaxPool2d {
    fn name(&self) -> &'static str {
        "snapmix-max-pool2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        match storage.dtype() {
            DType::F32 => pool_forward::<f32>(*self, storage, layout),
            DType::F64 => pool_forward::<f64>(*self, storage, layout),
            DType::F16 => pool_forward::<half::f16>(*self, storage, layout),
            DType::BF16 => pool_forward::<half::bf16>(*self, storage, layout),
            other => bail!("max_pool2d: unsupported dtype {other:?}"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::max_pool::forward(*self, storage, layout)
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad_arg = arg
            .contiguous()?
            .apply_op2_no_bwd(&grad_res.contiguous()?, &MaxPool2dBackward(*self))?;
        Ok(Some(grad_arg))
    }
}

/// The gradient of [`MaxPool2d`] w.r.t. its input: `(input, grad_output) -> grad_input`. It
/// recomputes each window's argmax instead of storing indices, trading a cheap rescan for
/// memory.
struct MaxPool2dBackward(MaxPool2d);

fn pool_backward<T: WithDType>(
    pool: MaxPool2d,
    input: &CpuStorage,
    input_layout: &Layout,
    grad_out: &CpuStorage,
    grad_layout: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (geometry, planes) = PlaneGeometry::new(pool, input_layout)?;
    let (batch, channels, _, _) = input_layout.shape().dims4()?;
    let expected = (batch, channels, geometry.out_rows, geometry.out_cols);
    if grad_layout.shape().dims4()? != expected {
        bail!(
            "max_pool2d backward: gradient shape {:?}, expected {expected:?}",
            grad_layout.shape()
        )
    }
    let input = contiguous_slice::<T>(input, input_layout)?;
    let grad_out = contiguous_slice::<T>(grad_out, grad_layout)?;
    let plane_in = geometry.rows * geometry.cols;
    let plane_out = geometry.out_rows * geometry.out_cols;
    let mut grad_in = vec![T::zero(); planes * plane_in];
    grad_in
        .par_chunks_mut(plane_in.max(1))
        .zip(input.par_chunks(plane_in.max(1)))
        .zip(grad_out.par_chunks(plane_out.max(1)))
        .for_each(|((grad_plane, in_plane), grad_out_plane)| {
            for out_row in 0..geometry.out_rows {
                for out_col in 0..geometry.out_cols {
                    let best = geometry.window_argmax(in_plane, out_row, out_col);
                    grad_plane[best] += grad_out_plane[out_row * geometry.out_cols + out_col];
                }
            }
        });
    Ok((
        T::to_cpu_storage_owned(grad_in),
        input_layout.shape().clone(),
    ))
}

impl CustomOp2 for MaxPool2dBackward {
    fn name(&self) -> &'static str {
        "snapmix-max-pool2d-backward"
    }

    fn cpu_fwd(
        &self,
        input: &CpuStorage,
        input_layout: &Layout,
        grad_out: &CpuStorage,
        grad_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if input.dtype() != grad_out.dtype() {
            bail!(
                "max_pool2d backward: input {:?} and gradient {:?} dtypes differ",
                input.dtype(),
                grad_out.dtype()
            )
        }
        let pool = self.0;
        match input.dtype() {
            DType::F32 => pool_backward::<f32>(pool, input, input_layout, grad_out, grad_layout),
            DType::F64 => pool_backward::<f64>(pool, input, input_layout, grad_out, grad_layout),
            DType::F16 => {
                pool_backward::<half::f16>(pool, input, input_layout, grad_out, grad_layout)
            }
            DType::BF16 => {
                pool_backward::<half::bf16>(pool, input, input_layout, grad_out, grad_layout)
            }
            other => bail!("max_pool2d backward: unsupported dtype {other:?}"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        input: &candle_core::CudaStorage,
        input_layout: &Layout,
        grad_out: &candle_core::CudaStorage,
        grad_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::max_pool::backward(self.0, input, input_layout, grad_out, grad_layout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random_input(shape: (usize, usize, usize, usize), seed: u64) -> Tensor {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let count = shape.0 * shape.1 * shape.2 * shape.3;
        let values: Vec<f64> = (0..count).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    /// Direct definition of the pool, value by value, for comparison.
    fn reference_pool(x: &Tensor, pool: MaxPool2d) -> Vec<f64> {
        let (b, c, rows, cols) = x.dims4().unwrap();
        let (out_rows, out_cols) = pool.output_size(rows, cols).unwrap();
        let values = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let mut out = Vec::new();
        for plane in 0..b * c {
            for orow in 0..out_rows {
                for ocol in 0..out_cols {
                    let mut best = f64::NEG_INFINITY;
                    for kr in 0..pool.kernel {
                        for kc in 0..pool.kernel {
                            let row = (orow * pool.stride + kr) as isize - pool.padding as isize;
                            let col = (ocol * pool.stride + kc) as isize - pool.padding as isize;
                            if row >= 0
                                && col >= 0
                                && (row as usize) < rows
                                && (col as usize) < cols
                            {
                                let v = values
                                    [plane * rows * cols + row as usize * cols + col as usize];
                                best = best.max(v);
                            }
                        }
                    }
                    out.push(best);
                }
            }
        }
        out
    }

    #[test]
    fn forward_matches_definition_and_candle_where_candle_works() {
        for (shape, pool) in [
            ((2, 3, 9, 8), MaxPool2d::RESNET_STEM),
            ((1, 2, 7, 7), MaxPool2d::RESNET_STEM),
            (
                (1, 2, 6, 5),
                MaxPool2d {
                    kernel: 2,
                    stride: 2,
                    padding: 0,
                },
            ),
            (
                (1, 1, 5, 6),
                MaxPool2d {
                    kernel: 3,
                    stride: 1,
                    padding: 1,
                },
            ),
        ] {
            let x = random_input(shape, 7);
            let ours = pool.forward(&x).unwrap();
            let expected = reference_pool(&x, pool);
            assert_eq!(
                ours.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
                expected
            );
            let composed = pool.forward_composed(&x).unwrap();
            assert_eq!(
                composed.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
                expected
            );
            if pool.padding == 0 {
                let candle = x.max_pool2d_with_stride(pool.kernel, pool.stride).unwrap();
                assert_eq!(
                    candle.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
                    expected
                );
            }
        }
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let pool = MaxPool2d::RESNET_STEM;
        let x = Var::from_tensor(&random_input((2, 2, 7, 8), 11)).unwrap();
        let (_, _, out_rows, out_cols) = pool.forward(&x).unwrap().dims4().unwrap();
        // A random linear functional of the output, so every window's gradient is distinct.
        let weights = random_input((2, 2, out_rows, out_cols), 12);
        let loss = |t: &Tensor| -> f64 {
            (pool.forward(t).unwrap() * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let grads = (pool.forward(&x).unwrap() * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let analytic = grads
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let values = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        // The loss is piecewise linear; inputs are distinct random values >1e-3 apart with high
        // probability, so a 1e-6 step never crosses a kink and central differences are exact.
        let step = 1e-6;
        let mut nonzero = 0;
        for (index, &g) in analytic.iter().enumerate() {
            let mut plus = values.clone();
            plus[index] += step;
            let mut minus = values.clone();
            minus[index] -= step;
            let to_tensor = |v: Vec<f64>| Tensor::from_vec(v, x.shape(), &Device::Cpu).unwrap();
            let numeric = (loss(&to_tensor(plus)) - loss(&to_tensor(minus))) / (2.0 * step);
            assert!(
                (numeric - g).abs() < 1e-6,
                "input {index}: numeric {numeric}, analytic {g}"
            );
            if g != 0.0 {
                nonzero += 1;
            }
        }
        assert!(nonzero > 20, "too few inputs received gradient: {nonzero}");
        // The composed (non-CPU) route gives the same gradient.
        let composed = (pool.forward_composed(&x).unwrap() * &weights)
            .unwrap()
            .sum_all()
            .unwrap();
        let composed_grad = composed
            .backward()
            .unwrap()
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap();
        assert_eq!(composed_grad.to_vec1::<f64>().unwrap(), analytic);
    }

    #[test]
    fn ties_send_the_gradient_to_the_first_maximum_only() {
        // All equal: each window's gradient goes to its first (top-left) in-bounds element.
        let x = Var::from_tensor(&Tensor::zeros((1, 1, 4, 4), DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        let pool = MaxPool2d::RESNET_STEM;
        for route in [
            pool.forward(&x).unwrap(),
            pool.forward_composed(&x).unwrap(),
        ] {
            let grad = route.sum_all().unwrap().backward().unwrap();
            let grad = grad
                .get(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            // Windows start at rows/cols -1, 1 -> first in-bounds elements at 0 and 1.
            let mut expected = vec![0f32; 16];
            for row in [0, 1] {
                for col in [0, 1] {
                    expected[row * 4 + col] = 1.0;
                }
            }
            assert_eq!(grad, expected);
        }
    }

    #[test]
    fn rejects_bad_configs() {
        let x = Tensor::zeros((1, 1, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let err = MaxPool2d {
            kernel: 3,
            stride: 2,
            padding: 2,
        }
        .forward(&x)
        .unwrap_err();
        assert!(err.to_string().contains("padding 2"), "{err}");
        let err = MaxPool2d {
            kernel: 3,
            stride: 0,
            padding: 1,
        }
        .forward(&x)
        .unwrap_err();
        assert!(err.to_string().contains("stride"), "{err}");
    }
}
