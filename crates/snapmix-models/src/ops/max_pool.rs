//! 2-D max pooling with a backward pass for overlapping windows: candle 0.11.1's `max_pool2d`
//! has none when kernel != stride, which is exactly the ResNet stem pool (3x3, stride 2, pad 1).
//!
//! On the CPU (and for f32 on CUDA with the `cuda` feature) it is a candle `CustomOp1` whose
//! backward routes each output gradient to the first maximum of its window (PyTorch's rule,
//! padding acting as -inf). Other devices use an exact composition of candle ops (window stack
//! -> argmax -> gather) with the same semantics.

use super::cpu::{build_in_chunks, zeros};
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Storage, Tensor, WithDType,
    D,
};
use rayon::prelude::*;
use std::sync::OnceLock;

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
            Device::Cpu => x.contiguous()?.apply_op1(PoolOp::new(*self)),
            Device::Cuda(_) if cfg!(feature = "cuda") && x.dtype() == DType::F32 => {
                x.contiguous()?.apply_op1(PoolOp::new(*self))
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

/// Pools one plane into `out`, writing each output's argmax (index in the plane) into `argmax`:
/// a max down each window's rows for every column at once, then along each window's columns,
/// picking the first maximum in row-major window order (the lowest row, then the lowest
/// column, among equal values) as [`PlaneGeometry::window_argmax`] does. A plane holding NaN
/// takes that per-window scan instead, so NaN wins as in PyTorch.
fn pool_plane<T: WithDType>(
    geometry: &PlaneGeometry,
    plane: &[T],
    out: &mut [T],
    argmax: &mut [u32],
    column_best: &mut ColumnBest<T>,
) {
    let cols = geometry.cols;
    // x != x is the NaN test for every dtype; or-ed over chunks without an early exit inside a
    // chunk so that the test vectorises (a short-circuiting scan of every value does not).
    #[allow(clippy::eq_op)]
    let has_nan = plane
        .chunks(64)
        .any(|chunk| chunk.iter().fold(false, |nan, &v| nan | (v != v)));
    if has_nan {
        for (index, (out, argmax)) in out.iter_mut().zip(argmax.iter_mut()).enumerate() {
            let best =
                geometry.window_argmax(plane, index / geometry.out_cols, index % geometry.out_cols);
            *out = plane[best];
            *argmax = best as u32;
        }
        return;
    }
    let pool = geometry.pool;
    let ColumnBest { value, row } = column_best;
    value.resize(cols, T::zero());
    row.resize(cols, 0);
    for out_row in 0..geometry.out_rows {
        let row_start = (out_row * pool.stride).saturating_sub(pool.padding);
        let row_end = (out_row * pool.stride + pool.kernel - pool.padding).min(geometry.rows);
        // Selects rather than branches: which row wins is data-dependent and unpredictable.
        value.copy_from_slice(&plane[row_start * cols..][..cols]);
        row.fill(row_start as u32);
        for r in row_start + 1..row_end {
            let src = &plane[r * cols..][..cols];
            for ((best, best_row), &v) in value.iter_mut().zip(row.iter_mut()).zip(src) {
                let wins = v > *best;
                *best = if wins { v } else { *best };
                *best_row = if wins { r as u32 } else { *best_row };
            }
        }
        let out_at = out_row * geometry.out_cols;
        if pool == MaxPool2d::RESNET_STEM {
            let outs = out_at..out_at + geometry.out_cols;
            stem_columns(value, row, cols, &mut out[outs.clone()], &mut argmax[outs]);
            continue;
        }
        for out_col in 0..geometry.out_cols {
            let col_start = (out_col * pool.stride).saturating_sub(pool.padding);
            let col_end = (out_col * pool.stride + pool.kernel - pool.padding).min(cols);
            let mut best = col_start;
            for c in col_start + 1..col_end {
                let wins =
                    value[c] > value[best] || (value[c] == value[best] && row[c] < row[best]);
                best = if wins { c } else { best };
            }
            out[out_at + out_col] = value[best];
            argmax[out_at + out_col] = (row[best] as usize * cols + best) as u32;
        }
    }
}

/// [`pool_plane`]'s pass along a row of windows for the ResNet stem's pool (3 wide, stride 2,
/// padding 1), from the per-column maxima `value` and their rows `row`: output `j` takes the
/// first maximum of columns `2j - 1, 2j, 2j + 1` (a lower row wins a tie, then a lower column).
/// Windows with all three columns inside take a fixed three-way comparison, without the
/// generic pass's window bounds and loop (the input has at least one column).
fn stem_columns<T: WithDType>(
    value: &[T],
    row: &[u32],
    cols: usize,
    out: &mut [T],
    argmax: &mut [u32],
) {
    let index = |c: usize| row[c] * cols as u32 + c as u32;
    let beats = |c: usize, best: usize| {
        value[c] > value[best] || (value[c] == value[best] && row[c] < row[best])
    };
    // Output 0 sees columns 0 and 1 and, for an odd width, the last one its last two columns.
    let edge = |first: usize, last: usize| {
        let best = if last > first && beats(last, first) {
            last
        } else {
            first
        };
        (value[best], index(best))
    };
    let outs = out.len();
    (out[0], argmax[0]) = edge(0, 1.min(cols - 1));
    let full_end = if cols % 2 == 1 { outs - 1 } else { outs };
    if cols % 2 == 1 && outs > 1 {
        (out[outs - 1], argmax[outs - 1]) = edge(cols - 2, cols - 1);
    }
    for j in 1..full_end {
        let (a, b, c) = (2 * j - 1, 2 * j, 2 * j + 1);
        let b_wins = beats(b, a);
        let best = if b_wins { b } else { a };
        let best = if beats(c, best) { c } else { best };
        out[j] = value[best];
        argmax[j] = index(best);
    }
}

/// Per-column running maxima of [`pool_plane`]'s vertical pass, reused across planes.
struct ColumnBest<T> {
    value: Vec<T>,
    row: Vec<u32>,
}

impl<T> ColumnBest<T> {
    fn new() -> Self {
        Self {
            value: Vec::new(),
            row: Vec::new(),
        }
    }
}

/// The pooled output and, per output, its argmax's index in its plane.
fn pool_forward<T: WithDType + Default>(
    pool: MaxPool2d,
    storage: &CpuStorage,
    layout: &Layout,
) -> Result<(CpuStorage, Shape, Vec<u32>)> {
    let (geometry, planes) = PlaneGeometry::new(pool, layout)?;
    let input = contiguous_slice::<T>(storage, layout)?;
    let plane_in = geometry.rows * geometry.cols;
    if plane_in > u32::MAX as usize {
        bail!("max_pool2d: planes of {plane_in} pixels are too large");
    }
    let plane_out = geometry.out_rows * geometry.out_cols;
    let mut output = zeros(planes * plane_out);
    let mut argmax = zeros::<u32>(planes * plane_out);
    output
        .par_chunks_mut(plane_out.max(1))
        .zip(argmax.par_chunks_mut(plane_out.max(1)))
        .zip(input.par_chunks(plane_in.max(1)))
        .for_each_init(ColumnBest::new, |column_best, ((out, argmax), plane)| {
            pool_plane(&geometry, plane, out, argmax, column_best);
        });
    let (batch, channels, _, _) = layout.shape().dims4()?;
    let shape = Shape::from((batch, channels, geometry.out_rows, geometry.out_cols));
    Ok((T::to_cpu_storage_owned(output), shape, argmax))
}

/// The op: on the CPU it keeps each output's argmax, so backward is one scatter.
struct PoolOp {
    pool: MaxPool2d,
    argmax: OnceLock<Vec<u32>>,
}

impl PoolOp {
    fn new(pool: MaxPool2d) -> Self {
        Self {
            pool,
            argmax: OnceLock::new(),
        }
    }
}

impl CustomOp1 for PoolOp {
    fn name(&self) -> &'static str {
        "snapmix-max-pool2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (output, shape, argmax) = match storage.dtype() {
            DType::F32 => pool_forward::<f32>(self.pool, storage, layout),
            DType::F64 => pool_forward::<f64>(self.pool, storage, layout),
            DType::F16 => pool_forward::<half::f16>(self.pool, storage, layout),
            DType::BF16 => pool_forward::<half::bf16>(self.pool, storage, layout),
            other => bail!("max_pool2d: unsupported dtype {other:?}"),
        }?;
        if self.argmax.set(argmax).is_err() {
            bail!("max_pool2d: an op instance ran its forward pass twice");
        }
        Ok((output, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::max_pool::forward(self.pool, storage, layout)
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad_res = grad_res.contiguous()?;
        #[cfg(feature = "cuda")]
        if grad_res.device().is_cuda() {
            return arg
                .contiguous()?
                .apply_op2_no_bwd(&grad_res, &MaxPool2dBackward(self.pool))
                .map(Some);
        }
        let Some(argmax) = self.argmax.get() else {
            bail!(
                "max_pool2d backward: no argmaxes recorded (the forward pass was not on the CPU)"
            );
        };
        scatter_to_argmax(arg, &grad_res, argmax).map(Some)
    }
}

/// The CPU backward: each output gradient added to its window's recorded argmax.
fn scatter_to_argmax(input: &Tensor, grad_out: &Tensor, argmax: &[u32]) -> Result<Tensor> {
    let (_, _, rows, cols) = input.dims4()?;
    let plane_in = rows * cols;
    let (_, _, out_rows, out_cols) = grad_out.dims4()?;
    let plane_out = out_rows * out_cols;
    if grad_out.elem_count() != argmax.len() {
        bail!(
            "max_pool2d backward: gradient of {} values for {} pooled outputs",
            grad_out.elem_count(),
            argmax.len()
        );
    }
    fn scatter<T: WithDType + Default>(
        grad_out: &[T],
        argmax: &[u32],
        planes: usize,
        (plane_in, plane_out): (usize, usize),
    ) -> Result<Vec<T>> {
        // Each plane's gradient zeroed and scattered into by one task, in its core's cache.
        let (grad_in, _) = build_in_chunks(planes * plane_in, plane_in, |plane, grad_in| {
            let outputs = plane * plane_out..(plane + 1) * plane_out;
            for (&g, &index) in grad_out[outputs.clone()].iter().zip(&argmax[outputs]) {
                grad_in[index as usize] += g;
            }
            Ok(())
        })?;
        Ok(grad_in)
    }
    let planes = input.elem_count() / plane_in.max(1);
    let sizes = (plane_in, plane_out);
    let (storage, layout) = grad_out.storage_and_layout();
    let Storage::Cpu(storage) = &*storage else {
        bail!("max_pool2d backward: expected a CPU gradient");
    };
    let shape = input.shape();
    match storage.dtype() {
        DType::F32 => {
            let grad_in =
                scatter::<f32>(contiguous_slice(storage, layout)?, argmax, planes, sizes)?;
            Tensor::from_vec(grad_in, shape, &Device::Cpu)
        }
        DType::F64 => {
            let grad_in =
                scatter::<f64>(contiguous_slice(storage, layout)?, argmax, planes, sizes)?;
            Tensor::from_vec(grad_in, shape, &Device::Cpu)
        }
        DType::F16 => {
            let grad_in =
                scatter::<half::f16>(contiguous_slice(storage, layout)?, argmax, planes, sizes)?;
            Tensor::from_vec(grad_in, shape, &Device::Cpu)
        }
        DType::BF16 => {
            let grad_in =
                scatter::<half::bf16>(contiguous_slice(storage, layout)?, argmax, planes, sizes)?;
            Tensor::from_vec(grad_in, shape, &Device::Cpu)
        }
        other => bail!("max_pool2d backward: unsupported dtype {other:?}"),
    }
}

/// The CUDA gradient of [`MaxPool2d`] w.r.t. its input: `(input, grad_output) -> grad_input`,
/// recomputing each window's argmax (the CPU op scatters to the argmaxes it recorded).
#[cfg(feature = "cuda")]
struct MaxPool2dBackward(MaxPool2d);

#[cfg(feature = "cuda")]
impl candle_core::CustomOp2 for MaxPool2dBackward {
    fn name(&self) -> &'static str {
        "snapmix-max-pool2d-backward"
    }

    fn cpu_fwd(
        &self,
        _input: &CpuStorage,
        _input_layout: &Layout,
        _grad_out: &CpuStorage,
        _grad_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("max_pool2d backward: the CPU pool scatters to its recorded argmaxes instead")
    }

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

    /// The gradient of `sum(out * weights)` with respect to `x`, flattened.
    fn weighted_sum_gradient<T: WithDType>(out: &Tensor, weights: &Tensor, x: &Var) -> Vec<T> {
        let grads = (out * weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let grad = grads.get(x).expect("x's gradient");
        grad.flatten_all().unwrap().to_vec1::<T>().unwrap()
    }

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
        let analytic: Vec<f64> = weighted_sum_gradient(&pool.forward(&x).unwrap(), &weights, &x);
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
        let composed = pool.forward_composed(&x).unwrap();
        let composed_grad: Vec<f64> = weighted_sum_gradient(&composed, &weights, &x);
        assert_eq!(composed_grad, analytic);
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

    /// Output and input gradient of the CPU op against a per-window scan, on inputs full of
    /// ties (three levels, like post-ReLU maps) and with NaN in one plane.
    #[test]
    fn separable_pass_picks_the_window_scan_argmax() {
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        for (pool, rows, cols) in [
            (MaxPool2d::RESNET_STEM, 9, 10),
            (MaxPool2d::RESNET_STEM, 8, 7),
            (
                MaxPool2d {
                    kernel: 2,
                    stride: 2,
                    padding: 0,
                },
                6,
                7,
            ),
            (
                MaxPool2d {
                    kernel: 3,
                    stride: 1,
                    padding: 1,
                },
                5,
                4,
            ),
        ] {
            let planes = 3;
            let mut values: Vec<f32> = (0..planes * rows * cols)
                .map(|_| rng.random_range(0..3) as f32)
                .collect();
            values[rows * cols + 5] = f32::NAN; // plane 1
            let x = Var::from_tensor(
                &Tensor::from_vec(values.clone(), (1, planes, rows, cols), &Device::Cpu).unwrap(),
            )
            .unwrap();
            let out = pool.forward(&x).unwrap();
            let (_, _, out_rows, out_cols) = out.dims4().unwrap();
            let probe: Vec<f32> = (0..planes * out_rows * out_cols)
                .map(|i| 1.0 + i as f32)
                .collect();
            let probe_t = Tensor::from_vec(probe.clone(), out.shape(), &Device::Cpu).unwrap();
            let grad: Vec<f32> = weighted_sum_gradient(&out, &probe_t, &x);
            let out = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();

            let geometry = PlaneGeometry {
                rows,
                cols,
                out_rows,
                out_cols,
                pool,
            };
            let mut want_grad = vec![0f32; values.len()];
            for plane in 0..planes {
                let data = &values[plane * rows * cols..][..rows * cols];
                for o in 0..out_rows * out_cols {
                    let best = geometry.window_argmax(data, o / out_cols, o % out_cols);
                    let got = out[plane * out_rows * out_cols + o];
                    assert!(
                        got.to_bits() == data[best].to_bits(),
                        "{pool:?} output {plane}/{o}"
                    );
                    want_grad[plane * rows * cols + best] += probe[plane * out_rows * out_cols + o];
                }
            }
            assert_eq!(grad, want_grad, "{pool:?} {rows}x{cols}");
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
