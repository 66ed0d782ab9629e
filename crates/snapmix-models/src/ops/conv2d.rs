//! Conv2d for training as one candle CustomOp: on the CPU, im2col + GEMM forward and, in
//! backward, a GEMM each for the weight and input gradients (col2im), parallel with rayon.

use super::batch_norm::PlaneMoments;
use super::cpu::{
    add_assign, build_in_chunks, cpu_tensor, matmul, matmul_new, matmul_serial,
    min_planes_per_task, storage_f32, transposed_sum, with_tensor_f32, zeros, MatRef, Scratch,
};
use candle_core::{bail, CpuStorage, CustomOp2, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

mod direct;
mod taps;

/// Convolves NCHW `x` with OIHW `weight` (no bias, no dilation, one group, the same stride and
/// zero padding on both axes), as candle's `x.conv2d(weight, padding, stride, 1, 1)` does.
///
/// On the CPU with f32 tensors this runs the GEMM-based custom op (on CUDA, with the `cuda`
/// feature, the same op through cuDNN), whose backward pass skips the input gradient when `x` is
/// not trainable (neither a variable nor computed from one, e.g. the image batch). Other devices
/// and dtypes use candle's own conv2d until their path exists, as does every call after
/// [`set_composed_ops(true)`](super::dispatch::set_composed_ops).
pub fn conv2d(x: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let geometry = ConvGeometry::new(x.dims(), weight.dims(), stride, padding)?;
    let fast = super::dispatch::has_fused_ops(x.device())
        && x.dtype() == candle_core::DType::F32
        && !super::dispatch::composed_ops();
    if !fast {
        return x.conv2d(weight, padding, stride, 1, 1);
    }
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    let op = Conv2dOp {
        geometry,
        input_grad: x.track_op(),
    };
    x.apply_op2_arc(&weight, Arc::new(Box::new(op)))
}

/// Shapes of one convolution. Rows/cols are the image axes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct ConvGeometry {
    batch: usize,
    in_channels: usize,
    rows: usize,
    cols: usize,
    out_channels: usize,
    kernel_rows: usize,
    kernel_cols: usize,
    stride: usize,
    padding: usize,
    out_rows: usize,
    out_cols: usize,
}

impl ConvGeometry {
    pub(super) fn new(
        x_dims: &[usize],
        w_dims: &[usize],
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let (&[batch, in_channels, rows, cols], &[out_channels, w_in, kernel_rows, kernel_cols]) =
            (x_dims, w_dims)
        else {
            bail!("conv2d: expected NCHW input and OIHW weight, got {x_dims:?} and {w_dims:?}");
        };
        if w_in != in_channels {
            bail!(
                "conv2d: input has {in_channels} channels but the weight {w_dims:?} expects {w_in}"
            );
        }
        if stride == 0 {
            bail!("conv2d: stride must be at least 1");
        }
        if rows + 2 * padding < kernel_rows || cols + 2 * padding < kernel_cols {
            bail!(
                "conv2d: kernel {kernel_rows}x{kernel_cols} larger than the padded input \
                 {rows}x{cols} (padding {padding})"
            );
        }
        Ok(Self {
            batch,
            in_channels,
            rows,
            cols,
            out_channels,
            kernel_rows,
            kernel_cols,
            stride,
            padding,
            out_rows: (rows + 2 * padding - kernel_rows) / stride + 1,
            out_cols: (cols + 2 * padding - kernel_cols) / stride + 1,
        })
    }

    /// Length of one im2col column: in_channels * kernel_rows * kernel_cols.
    fn patch_len(&self) -> usize {
        self.in_channels * self.kernel_rows * self.kernel_cols
    }

    /// Output pixels per image.
    fn out_pixels(&self) -> usize {
        self.out_rows * self.out_cols
    }

    /// A 1x1, stride-1, unpadded conv: the im2col matrix is the input itself, channel-major.
    fn is_pointwise(&self) -> bool {
        self.kernel_rows == 1 && self.kernel_cols == 1 && self.stride == 1 && self.padding == 0
    }

    /// Enough output pixels per image, and images for every thread: then one GEMM per image (or
    /// small group of images, [`Self::images_per_gemm`]), on an im2col matrix small enough to
    /// stay in the core's cache (or, pointwise, on the NCHW data itself), beats a batch-wide
    /// im2col streamed through memory and the reorders.
    fn runs_per_image(&self) -> bool {
        self.out_pixels() >= PER_IMAGE_MIN_PIXELS && self.batch >= rayon::current_num_threads()
    }

    /// Images per GEMM on the per-image path: enough for [`GROUP_MIN_COLUMNS`] output
    /// columns, as long as every thread still gets a group.
    fn images_per_gemm(&self) -> usize {
        let wanted = GROUP_MIN_COLUMNS.div_ceil(self.out_pixels().max(1));
        wanted
            .min(self.batch / rayon::current_num_threads().max(1))
            .max(1)
    }

    /// Input pixels per image plane.
    fn image_pixels(&self) -> usize {
        self.rows * self.cols
    }

    pub(super) fn out_shape(&self) -> Shape {
        Shape::from((self.batch, self.out_channels, self.out_rows, self.out_cols))
    }
}

#[cfg(feature = "cuda")]
impl ConvGeometry {
    /// The same shapes for the cuDNN path.
    fn cuda_shape(&self) -> super::cuda::cudnn_conv::ConvShape {
        super::cuda::cudnn_conv::ConvShape {
            batch: self.batch,
            in_channels: self.in_channels,
            rows: self.rows,
            cols: self.cols,
            out_channels: self.out_channels,
            kernel_rows: self.kernel_rows,
            kernel_cols: self.kernel_cols,
            stride: self.stride,
            padding: self.padding,
            out_rows: self.out_rows,
            out_cols: self.out_cols,
        }
    }
}

/// The custom op: forward on the CPU here, on CUDA through cuDNN (`cuda/cudnn_conv.rs`).
struct Conv2dOp {
    geometry: ConvGeometry,
    /// Whether backward must produce the input gradient (false for the image batch).
    input_grad: bool,
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "snapmix-conv2d"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        weight: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = storage_f32(x, x_layout, "conv2d input")?;
        let weight = storage_f32(weight, w_layout, "conv2d weight")?;
        let out = forward(&self.geometry, x, weight)?;
        Ok((CpuStorage::F32(out), self.geometry.out_shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_layout: &Layout,
        weight: &candle_core::CudaStorage,
        w_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let shape = self.geometry.cuda_shape();
        super::cuda::cudnn_conv::forward(&shape, x, x_layout, weight, w_layout)
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if grad_out.device().is_cuda() {
            let (shape, grad_out) = (self.geometry.cuda_shape(), grad_out.contiguous()?);
            return super::cuda::cudnn_conv::backward(
                &shape,
                x,
                weight,
                &grad_out,
                self.input_grad,
            );
        }
        if !matches!(grad_out.device(), Device::Cpu) {
            bail!("snapmix-conv2d: backward is not implemented for CUDA/Metal yet");
        }
        let g = self.geometry;
        let grad_out = grad_out.contiguous()?;
        let (grad_x, grad_w) = with_tensor_f32(x, "conv2d input", |x| {
            with_tensor_f32(weight, "conv2d weight", |weight| {
                with_tensor_f32(&grad_out, "conv2d output gradient", |grad_out| {
                    backward(
                        &g,
                        x,
                        weight,
                        grad_out,
                        InputGradient::new_if(self.input_grad),
                        None,
                    )
                })
            })
        })?;
        let grad_x = match grad_x {
            Some(data) => Some(cpu_tensor(data, x.shape())?),
            None => None,
        };
        Ok((grad_x, Some(cpu_tensor(grad_w, weight.shape())?)))
    }
}

/// Output pixels per image from which a conv runs one GEMM per image (see
/// [`ConvGeometry::runs_per_image`]); below it the GEMMs get too thin to pay.
const PER_IMAGE_MIN_PIXELS: usize = 128;

/// Output columns (pixels) from which the per-image path runs one GEMM per image; smaller maps
/// put several images side by side in one GEMM (forward and input gradient). Layer2's 196-pixel
/// maps: 120-122 GFLOP/s one image at a time, 144-152 two at a time (one thread).
const GROUP_MIN_COLUMNS: usize = 384;

/// Images whose weight-gradient GEMMs accumulate into one partial sum; the partials are then
/// added in order, so the result does not depend on the thread count or on scheduling.
const IMAGES_PER_PARTIAL: usize = 4;

/// Forward: out = W [O, C*KH*KW] * col [C*KH*KW, N*P], then reordered to NCHW.
pub(super) fn forward(g: &ConvGeometry, x: &[f32], weight: &[f32]) -> Result<Vec<f32>> {
    if g.runs_per_image() {
        return forward_per_image(g, x, weight);
    }
    Ok(forward_batch_wide(g, x, weight)?.0)
}

/// The batch-wide paths of [`forward`] (tap GEMMs, else one im2col GEMM): the output and the
/// copy of the input it multiplied (pixel-major or im2col).
fn forward_batch_wide(g: &ConvGeometry, x: &[f32], weight: &[f32]) -> Result<(Vec<f32>, Scratch)> {
    if taps::applies(g) {
        return taps::forward(g, x, weight);
    }
    let (k, np) = (g.patch_len(), g.batch * g.out_pixels());
    let mut col = Scratch::take(k * np);
    im2col(g, x, &mut col);
    let mut out_cm = Scratch::take(g.out_channels * np);
    matmul(
        &mut out_cm,
        false,
        MatRef::row_major(weight, g.out_channels, k),
        MatRef::row_major(&col, k, np),
    )?;
    let out = from_channel_major(&out_cm, g.batch, g.out_channels, g.out_pixels());
    Ok((out, col))
}

/// The im2col matrix `[C*KH*KW, count*P]` of `count` consecutive images: one pointwise
/// conv's image is that matrix itself, else it is built in `scratch`.
fn image_patches<'a>(
    g: &ConvGeometry,
    images: &'a [f32],
    count: usize,
    scratch: &'a mut Scratch,
) -> MatRef<'a> {
    let columns = count * g.out_pixels();
    if g.is_pointwise() && count == 1 {
        return MatRef::row_major(images, g.in_channels, columns);
    }
    im2col_images(g, images, count, scratch);
    MatRef::row_major(scratch, g.patch_len(), columns)
}

/// Scratch for [`image_patches`] of `count` images: none for one pointwise conv's image.
fn patches_scratch(g: &ConvGeometry, count: usize) -> Scratch {
    Scratch::take(if g.is_pointwise() && count == 1 {
        0
    } else {
        g.patch_len() * count * g.out_pixels()
    })
}

/// Forward, per image: out[n] [O, P] = W [O, C*KH*KW] * col[n] [C*KH*KW, P] (a GEMM per
/// image or small group of images).
fn forward_per_image(g: &ConvGeometry, x: &[f32], weight: &[f32]) -> Result<Vec<f32>> {
    Ok(forward_images(g, x, weight, |_| ())?.0)
}

/// [`forward_per_image`] (one GEMM per group of [`ConvGeometry::images_per_gemm`] images),
/// applying `then` to each image's output `[O, P]` while it is still in the core's cache; the
/// output and `then`'s results in image order.
fn forward_images<R: Send>(
    g: &ConvGeometry,
    x: &[f32],
    weight: &[f32],
    then: impl Fn(&[f32]) -> R + Sync,
) -> Result<(Vec<f32>, Vec<R>)> {
    if direct::applies_forward(g) {
        return direct::forward_images(g, x, weight, then);
    }
    let (o, p, group) = (g.out_channels, g.out_pixels(), g.images_per_gemm());
    let image_len = g.in_channels * g.image_pixels();
    let weight = MatRef::row_major(weight, o, g.patch_len());
    let (out, per_group) = build_in_chunks(g.batch * o * p, group * o * p, |index, out| {
        let count = out.len() / (o * p);
        let images = &x[index * group * image_len..][..count * image_len];
        let mut scratch = patches_scratch(g, count);
        let patches = image_patches(g, images, count, &mut scratch);
        if count == 1 {
            matmul_serial(out, false, weight, patches)?;
        } else {
            // [O, count*P] -> count images of [O, P].
            let mut product = Scratch::take(o * count * p);
            matmul_serial(&mut product, false, weight, patches)?;
            for (n, image_out) in out.chunks_exact_mut(o * p).enumerate() {
                for (dst, row) in image_out
                    .chunks_exact_mut(p)
                    .zip(product.chunks_exact(count * p))
                {
                    dst.copy_from_slice(&row[n * p..][..p]);
                }
            }
        }
        Ok(out.chunks_exact(o * p).map(&then).collect::<Vec<R>>())
    })?;
    Ok((out, per_group.into_iter().flatten().collect()))
}

/// A training forward pass: the output and what its backward pass can reuse.
pub(super) struct TrainingForward {
    pub(super) out: Vec<f32>,
    /// Each output plane's moments (`batch * out_channels`, image-major) on the per-image path:
    /// computed while the image's output is in cache, they spare the batch norm that follows a
    /// pass over the whole output.
    pub(super) planes: Option<Vec<PlaneMoments>>,
    /// The input as the batch-wide paths' weight gradient reads it, which [`backward`] would
    /// otherwise build again: the im2col matrix, or the tap GEMMs' pixel-major copy (layer3 and
    /// layer4 of ResNet at 112x112).
    pub(super) patches: Option<Scratch>,
}

/// [`forward`], keeping what [`TrainingForward`] lists.
pub(super) fn forward_for_training(
    g: &ConvGeometry,
    x: &[f32],
    weight: &[f32],
) -> Result<TrainingForward> {
    if !g.runs_per_image() {
        let (out, patches) = forward_batch_wide(g, x, weight)?;
        return Ok(TrainingForward {
            out,
            planes: None,
            patches: Some(patches),
        });
    }
    let p = g.out_pixels();
    let (out, per_image) = forward_images(g, x, weight, |image_out| {
        image_out
            .chunks_exact(p)
            .map(PlaneMoments::of)
            .collect::<Vec<_>>()
    })?;
    Ok(TrainingForward {
        out,
        planes: Some(per_image.concat()),
        patches: None,
    })
}

/// Backward, per image: grad_w = sum_n dY[n] col[n]^T, grad_x[n] = col2im(W^T dY[n]).
fn backward_per_image(
    g: &ConvGeometry,
    x: &[f32],
    weight: &[f32],
    grad_out: &[f32],
    input_grad: InputGradient,
) -> Result<(Option<Vec<f32>>, Vec<f32>)> {
    let (k, o, p) = (g.patch_len(), g.out_channels, g.out_pixels());
    let image_len = g.in_channels * g.image_pixels();
    let layout = WeightGradient::new(o, k, g.batch * p);
    let partials = grad_out
        .par_chunks(IMAGES_PER_PARTIAL * o * p)
        .zip(x.par_chunks(IMAGES_PER_PARTIAL * image_len))
        .map(|(grads, images)| {
            let mut partial = vec![0.0; o * k];
            let mut scratch = patches_scratch(g, 1);
            for (i, (grad, image)) in grads
                .chunks(o * p)
                .zip(images.chunks(image_len))
                .enumerate()
            {
                let patches = image_patches(g, image, 1, &mut scratch);
                layout.add(&mut partial, i > 0, MatRef::row_major(grad, o, p), patches)?;
            }
            Ok(partial)
        })
        .collect::<Result<Vec<_>>>()?;
    let grad_w = layout.sum_as_oihw(&partials)?;

    if direct::applies_input_gradient(g) {
        return Ok((
            direct::input_gradient(g, weight, grad_out, input_grad)?,
            grad_w,
        ));
    }
    let weight_t = MatRef::row_major(weight, o, k).t();
    let group = g.images_per_gemm();
    let grad_x = input_grad.write_in_chunks(
        g.batch * image_len,
        group * image_len,
        |index, grad_x, accumulate| {
            let count = grad_x.len() / image_len;
            let grad = &grad_out[index * group * o * p..][..count * o * p];
            if g.is_pointwise() && count == 1 {
                let grad = MatRef::row_major(grad, o, p);
                return matmul_serial(grad_x, accumulate, weight_t, grad);
            }
            // The group's output gradient side by side, [O, count*P].
            let mut grad_cm = Scratch::take(o * count * p);
            for (n, image_grad) in grad.chunks_exact(o * p).enumerate() {
                for (row, dst) in image_grad
                    .chunks_exact(p)
                    .zip(grad_cm.chunks_exact_mut(count * p))
                {
                    dst[n * p..][..p].copy_from_slice(row);
                }
            }
            let mut grad_col = Scratch::take(k * count * p);
            let grad = MatRef::row_major(&grad_cm, o, count * p);
            matmul_serial(&mut grad_col, false, weight_t, grad)?;
            // Into the new chunk's zeros or the gradient already there alike.
            col2im_images_add(g, &grad_col, count, grad_x);
            Ok(())
        },
    )?;
    Ok((grad_x, grad_w))
}

/// What a backward pass does with the input gradient.
pub(super) enum InputGradient {
    /// Not wanted (the image batch, or an input nothing trainable feeds).
    Skip,
    /// Into a new buffer.
    New,
    /// Added into this buffer (of the input's length), which is returned.
    AddTo(Vec<f32>),
}

impl InputGradient {
    pub(super) fn new_if(wanted: bool) -> Self {
        if wanted {
            Self::New
        } else {
            Self::Skip
        }
    }

    /// The buffer of `len` values to write into and whether to add to it, or `None` to skip.
    fn buffer(self, len: usize) -> Result<Option<(Vec<f32>, bool)>> {
        Ok(match self {
            Self::Skip => None,
            Self::New => Some((zeros(len), false)),
            Self::AddTo(buffer) if buffer.len() == len => Some((buffer, true)),
            Self::AddTo(buffer) => return Self::wrong_length(&buffer, len),
        })
    }

    /// The input gradient (`len` values), or `None` to skip: `write(index, chunk, accumulate)`
    /// writes or adds each `chunk`-long chunk on all threads, into a new buffer (each chunk
    /// zeroed by its task, `accumulate` false) or added into the given one.
    fn write_in_chunks(
        self,
        len: usize,
        chunk: usize,
        write: impl Fn(usize, &mut [f32], bool) -> Result<()> + Sync,
    ) -> Result<Option<Vec<f32>>> {
        match self {
            Self::Skip => Ok(None),
            Self::New => Ok(Some(
                build_in_chunks(len, chunk, |index, chunk| write(index, chunk, false))?.0,
            )),
            Self::AddTo(mut buffer) if buffer.len() == len => {
                buffer
                    .par_chunks_mut(chunk.max(1))
                    .enumerate()
                    .try_for_each(|(index, chunk)| write(index, chunk, true))?;
                Ok(Some(buffer))
            }
            Self::AddTo(buffer) => Self::wrong_length(&buffer, len),
        }
    }

    fn wrong_length<T>(buffer: &[f32], len: usize) -> Result<T> {
        bail!(
            "conv2d backward: {} values to add the input gradient to, for an input of {len}",
            buffer.len()
        )
    }
}

/// Backward: grad_w = dY [O, N*P] * col^T, and (if wanted) grad_x = col2im(W^T * dY).
/// `patches`: the batch-wide paths' copy of `x` from [`forward_for_training`], if kept (else,
/// or on the per-image path, what the weight gradient reads is built here).
pub(super) fn backward(
    g: &ConvGeometry,
    x: &[f32],
    weight: &[f32],
    grad_out: &[f32],
    input_grad: InputGradient,
    patches: Option<&[f32]>,
) -> Result<(Option<Vec<f32>>, Vec<f32>)> {
    if g.runs_per_image() {
        return backward_per_image(g, x, weight, grad_out, input_grad);
    }
    if taps::applies(g) {
        let image_len = g.in_channels * g.image_pixels();
        let mut grad_x = input_grad.buffer(g.batch * image_len)?;
        let target = grad_x
            .as_mut()
            .map(|(buffer, add)| (buffer.as_mut_slice(), *add));
        let grad_w = taps::backward(g, x, weight, grad_out, target, patches)?;
        return Ok((grad_x.map(|(buffer, _)| buffer), grad_w));
    }
    let (k, np) = (g.patch_len(), g.batch * g.out_pixels());
    let mut grad_cm = Scratch::take(g.out_channels * np);
    to_channel_major(
        grad_out,
        g.batch,
        g.out_channels,
        g.out_pixels(),
        &mut grad_cm,
    );
    let grad_cm = MatRef::row_major(&grad_cm, g.out_channels, np);

    let grad_w = match patches {
        Some(col) if col.len() == k * np => {
            weight_gradient(grad_cm, MatRef::row_major(col, k, np))?
        }
        _ => {
            let mut col = Scratch::take(k * np);
            im2col(g, x, &mut col);
            weight_gradient(grad_cm, MatRef::row_major(&col, k, np))?
        }
    };

    if matches!(input_grad, InputGradient::Skip) {
        return Ok((None, grad_w));
    }
    let mut grad_col = Scratch::take(k * np);
    matmul(
        &mut grad_col,
        false,
        MatRef::row_major(weight, g.out_channels, k).t(),
        grad_cm,
    )?;
    let image_pixels = g.image_pixels();
    let grad_x = if g.is_pointwise() {
        from_channel_major(&grad_col, g.batch, g.in_channels, image_pixels)
    } else {
        let mut grad_x_cm = Scratch::take(g.batch * g.in_channels * image_pixels);
        col2im(g, &grad_col, &mut grad_x_cm);
        from_channel_major(&grad_x_cm, g.batch, g.in_channels, image_pixels)
    };
    let grad_x = match input_grad {
        InputGradient::AddTo(mut buffer) => {
            add_assign(&mut buffer, &grad_x)?;
            buffer
        }
        _ => grad_x,
    };
    Ok((Some(grad_x), grad_w))
}

/// `grad_cm [O, N*P] * col [K, N*P]^T`. A long reduction (the early layers: few channels, many
/// pixels) is split into fixed runs of pixels whose serial GEMMs run in parallel and whose
/// partial sums are then added in order: `gemm` splits only the small output, and badly. Fixed
/// runs keep the result independent of the thread count.
fn weight_gradient(grad_cm: MatRef, col: MatRef) -> Result<Vec<f32>> {
    let (out_channels, patch_len, pixels) = (grad_cm.rows(), col.rows(), col.cols());
    let layout = WeightGradient::new(out_channels, patch_len, pixels);
    if pixels < 2 * PIXELS_PER_PARTIAL {
        return layout.into_oihw(layout.product(grad_cm, col)?);
    }
    let partials = (0..pixels.div_ceil(PIXELS_PER_PARTIAL))
        .into_par_iter()
        .map(|run| {
            let (start, len) = (run * PIXELS_PER_PARTIAL, PIXELS_PER_PARTIAL);
            let mut partial = Scratch::take(out_channels * patch_len);
            layout.add(
                &mut partial,
                false,
                grad_cm.columns(start, len),
                col.columns(start, len),
            )?;
            Ok(partial)
        })
        .collect::<Result<Vec<_>>>()?;
    layout.sum_as_oihw(&partials)
}

/// How a weight gradient `dY [O, P] * patches [K, P]^T` is accumulated. Both factors run along
/// pixels, so `gemm` transposes one of them as it packs: accumulating the transpose
/// `patches * dY^T` (`[K, O]`) makes that the smaller dY when K > O. On ResNet's 3x3 and stem
/// shapes its GEMMs ran 1.2-1.5x faster (layer1 per image 105 -> 156 GFLOP/s, stem 90 -> 129).
/// The result is transposed once, in the pass that adds the partial sums, and only for
/// reductions over at least [`TRANSPOSED_MIN_PIXELS`] pixels: per-op timers, R18 b16 112x112,
/// layer4's 3x3 convs (256 pixels) 11.3 -> 13.5 ms each in backward, layer3's stride-2 3x3
/// (784) 7.6 -> 5.1-5.4 ms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct WeightGradient {
    out_channels: usize,
    patch_len: usize,
    transposed: bool,
}

/// Pixels summed over from which [`WeightGradient`] accumulates the transpose.
const TRANSPOSED_MIN_PIXELS: usize = 512;

impl WeightGradient {
    fn new(out_channels: usize, patch_len: usize, pixels: usize) -> Self {
        Self {
            out_channels,
            patch_len,
            transposed: patch_len > out_channels && pixels >= TRANSPOSED_MIN_PIXELS,
        }
    }

    /// `acc = dy * patches^T` (or `+=` when `accumulate`) in this layout, on this thread.
    fn add(&self, acc: &mut [f32], accumulate: bool, dy: MatRef, patches: MatRef) -> Result<()> {
        if self.transposed {
            matmul_serial(acc, accumulate, patches, dy.t())
        } else {
            matmul_serial(acc, accumulate, dy, patches.t())
        }
    }

    /// `dy * patches^T` in this layout, as a new buffer, multi-threaded.
    fn product(&self, dy: MatRef, patches: MatRef) -> Result<Vec<f32>> {
        if self.transposed {
            matmul_new(patches, dy.t())
        } else {
            matmul_new(dy, patches.t())
        }
    }

    /// The gradient accumulated in `acc` as OIHW `[O, K]` (`acc` itself in the direct layout).
    fn into_oihw(self, acc: Vec<f32>) -> Result<Vec<f32>> {
        if self.transposed {
            transposed_sum(&[acc], self.patch_len, self.out_channels)
        } else {
            Ok(acc)
        }
    }

    /// The sum of `partials` (added in order) as OIHW `[O, K]`, transposed in the same pass.
    fn sum_as_oihw<P: std::ops::Deref<Target = [f32]> + Sync>(
        self,
        partials: &[P],
    ) -> Result<Vec<f32>> {
        if self.transposed {
            transposed_sum(partials, self.patch_len, self.out_channels)
        } else {
            Ok(sum_in_order(partials, self.out_channels * self.patch_len))
        }
    }
}

/// The element-wise sum of `len`-long partial results, added in their order (so the result
/// does not depend on how rayon scheduled them).
fn sum_in_order<P: std::ops::Deref<Target = [f32]>>(partials: &[P], len: usize) -> Vec<f32> {
    let mut sum = vec![0.0; len];
    for partial in partials {
        for (total, value) in sum.iter_mut().zip(partial.iter()) {
            *total += value;
        }
    }
    sum
}

/// Pixels (GEMM reduction length) per partial weight gradient in [`weight_gradient`].
const PIXELS_PER_PARTIAL: usize = 1024;

/// The output columns `[lo, hi)` whose input column `out_col * stride + kernel_col - padding`
/// falls inside the image (for stride 1 a contiguous run).
fn valid_out_cols(g: &ConvGeometry, kernel_col: usize) -> (usize, usize) {
    // out_col * stride + kernel_col >= padding  and  < cols + padding
    let lo = g.padding.saturating_sub(kernel_col).div_ceil(g.stride);
    let hi = (g.cols + g.padding)
        .saturating_sub(kernel_col)
        .div_ceil(g.stride);
    (
        lo.min(g.out_cols),
        hi.min(g.out_cols).max(lo.min(g.out_cols)),
    )
}

/// Writes the im2col row of kernel tap (`kernel_row`, `kernel_col`) for one input plane (its
/// rows split by [`split_column_phases`] for a strided conv): for every output pixel, the input
/// pixel that tap sees, or 0 in the padding.
fn fill_tap(
    g: &ConvGeometry,
    plane: &[f32],
    kernel_row: usize,
    kernel_col: usize,
    dst: &mut [f32],
) {
    if g.stride == 1 && g.out_cols == g.cols {
        return fill_tap_same_width(g, plane, kernel_row, kernel_col, dst);
    }
    let (lo, hi) = valid_out_cols(g, kernel_col);
    let row_len = phased_row_len(g);
    for (out_row, dst_row) in dst.chunks_exact_mut(g.out_cols).enumerate() {
        let in_row = (out_row * g.stride + kernel_row).wrapping_sub(g.padding);
        if in_row >= g.rows {
            dst_row.fill(0.0);
            continue;
        }
        let src_row = &plane[in_row * row_len..][..row_len];
        dst_row[..lo].fill(0.0);
        dst_row[hi..].fill(0.0);
        if lo == hi {
            continue;
        }
        // Input columns first, first + stride, ...: one run of their column phase.
        let first = lo * g.stride + kernel_col - g.padding;
        let phase_len = g.cols.div_ceil(g.stride);
        let start = first % g.stride * phase_len + first / g.stride;
        dst_row[lo..hi].copy_from_slice(&src_row[start..start + (hi - lo)]);
    }
}

/// Values per input row as [`fill_tap`] reads them: the row itself for stride 1, else split by
/// [`split_column_phases`] into `stride` runs of `ceil(cols / stride)`.
fn phased_row_len(g: &ConvGeometry) -> usize {
    g.stride * g.cols.div_ceil(g.stride)
}

/// For a strided conv, every row of `planes` split by column phase: run `k` holds columns
/// `k, k + stride, k + 2 * stride, ...`, so a kernel tap reads one contiguous run per output
/// row instead of every `stride`-th value (for the stem's 7x7 taps, runs of 56 in 112). For
/// stride 1 the planes as they are.
fn split_column_phases<'a>(
    g: &ConvGeometry,
    planes: &'a [f32],
    scratch: &'a mut Option<Scratch>,
) -> &'a [f32] {
    if g.stride == 1 || planes.is_empty() {
        return planes;
    }
    let (cols, row_len, phase_len) = (g.cols, phased_row_len(g), g.cols.div_ceil(g.stride));
    let split = scratch.insert(Scratch::take(planes.len() / cols * row_len));
    for (dst, src) in split
        .chunks_exact_mut(row_len)
        .zip(planes.chunks_exact(cols))
    {
        for (phase, run) in dst.chunks_exact_mut(phase_len).enumerate() {
            let values = src[phase.min(cols)..].iter().step_by(g.stride);
            let written = run.iter_mut().zip(values).map(|(d, &v)| *d = v).count();
            run[written..].fill(0.0);
        }
    }
    split
}

/// [`fill_tap`] for stride 1 with as many output as input columns: the tap's row is then the
/// plane shifted by whole rows and `kernel_col - padding` columns, so all valid rows are one
/// contiguous copy, after which only the columns that wrapped around from a neighbouring row
/// are zeroed (small feature maps would otherwise pay a call per 2-16 values).
fn fill_tap_same_width(
    g: &ConvGeometry,
    plane: &[f32],
    kernel_row: usize,
    kernel_col: usize,
    dst: &mut [f32],
) {
    let width = g.cols;
    // Output rows whose input row `out_row + kernel_row - padding` lies inside the image.
    let row_lo = g.padding.saturating_sub(kernel_row).min(g.out_rows);
    let row_hi = (g.rows + g.padding)
        .saturating_sub(kernel_row)
        .min(g.out_rows)
        .max(row_lo);
    dst[..row_lo * width].fill(0.0);
    dst[row_hi * width..].fill(0.0);
    let block = &mut dst[row_lo * width..row_hi * width];
    if block.is_empty() {
        return;
    }
    let len = block.len();
    // Block element i reads plane[start + i + kernel_col - padding].
    let start = (row_lo + kernel_row - g.padding) * width;
    if kernel_col >= g.padding {
        let shift = kernel_col - g.padding;
        let copied = len.min(plane.len().saturating_sub(start + shift));
        block[..copied].copy_from_slice(&plane[start + shift..][..copied]);
        block[copied..].fill(0.0);
        for row in block.chunks_exact_mut(width) {
            row[width.saturating_sub(shift)..].fill(0.0);
        }
    } else {
        let shift = g.padding - kernel_col;
        let skipped = shift.saturating_sub(start).min(len);
        block[..skipped].fill(0.0);
        if skipped < len {
            block[skipped..].copy_from_slice(&plane[start + skipped - shift..start + len - shift]);
        }
        for row in block.chunks_exact_mut(width) {
            row[..shift.min(width)].fill(0.0);
        }
    }
}

/// The adjoint of [`fill_tap`]: adds one im2col row back into the input plane it was read from.
fn add_tap(g: &ConvGeometry, src: &[f32], kernel_row: usize, kernel_col: usize, plane: &mut [f32]) {
    let (lo, hi) = valid_out_cols(g, kernel_col);
    if lo == hi {
        return;
    }
    for (out_row, src_row) in src.chunks_exact(g.out_cols).enumerate() {
        let in_row = (out_row * g.stride + kernel_row).wrapping_sub(g.padding);
        if in_row >= g.rows {
            continue;
        }
        let dst_row = &mut plane[in_row * g.cols..][..g.cols];
        let first = lo * g.stride + kernel_col - g.padding;
        if g.stride == 1 {
            for (d, s) in dst_row[first..first + (hi - lo)]
                .iter_mut()
                .zip(&src_row[lo..hi])
            {
                *d += *s;
            }
        } else {
            let dst = &mut dst_row[first..=first + (hi - lo - 1) * g.stride];
            for (i, s) in src_row[lo..hi].iter().enumerate() {
                dst[i * g.stride] += *s;
            }
        }
    }
}

/// Fills `col [C*KH*KW, N*P]`: row (c, kh, kw), column (n, out_row, out_col).
fn im2col(g: &ConvGeometry, x: &[f32], col: &mut [f32]) {
    let (p, np) = (g.out_pixels(), g.batch * g.out_pixels());
    let taps = g.kernel_rows * g.kernel_cols;
    let mut phased = None;
    let x = split_column_phases(g, x, &mut phased);
    let plane_len = g.rows * phased_row_len(g);
    col.par_chunks_mut(np).enumerate().for_each(|(row, dst)| {
        let (c, tap) = (row / taps, row % taps);
        for n in 0..g.batch {
            let plane = &x[(n * g.in_channels + c) * plane_len..][..plane_len];
            fill_tap(
                g,
                plane,
                tap / g.kernel_cols,
                tap % g.kernel_cols,
                &mut dst[n * p..][..p],
            );
        }
    });
}

/// The im2col matrix `[C*KH*KW, count*P]` of `count` consecutive images (image n in columns
/// `n*P..(n+1)*P`), on the calling thread.
fn im2col_images(g: &ConvGeometry, images: &[f32], count: usize, col: &mut [f32]) {
    let (taps, p) = (g.kernel_rows * g.kernel_cols, g.out_pixels());
    let mut phased = None;
    let images = split_column_phases(g, images, &mut phased);
    let plane_len = g.rows * phased_row_len(g);
    for (row, dst) in col.chunks_exact_mut(count * p).enumerate() {
        let (c, tap) = (row / taps, row % taps);
        for (n, dst) in dst.chunks_exact_mut(p).enumerate() {
            let plane = &images[(n * g.in_channels + c) * plane_len..][..plane_len];
            fill_tap(g, plane, tap / g.kernel_cols, tap % g.kernel_cols, dst);
        }
    }
}

/// The adjoint of `im2col`: sums `col` back into a channel-major `[C, N, rows*cols]` image.
fn col2im(g: &ConvGeometry, col: &[f32], image_cm: &mut [f32]) {
    let (p, np) = (g.out_pixels(), g.batch * g.out_pixels());
    let taps = g.kernel_rows * g.kernel_cols;
    let image_pixels = g.image_pixels();
    image_cm
        .par_chunks_mut(g.batch * image_pixels)
        .enumerate()
        .for_each(|(c, channel)| {
            channel.fill(0.0);
            for tap in 0..taps {
                let src = &col[(c * taps + tap) * np..][..np];
                for (n, plane) in channel.chunks_exact_mut(image_pixels).enumerate() {
                    let (kernel_row, kernel_col) = (tap / g.kernel_cols, tap % g.kernel_cols);
                    add_tap(g, &src[n * p..][..p], kernel_row, kernel_col, plane);
                }
            }
        });
}

/// The adjoint of [`im2col_images`]: adds `count` images' input gradients from their
/// im2col-shaped gradient into `images` (`count` of `[C, rows*cols]`), on the calling thread.
fn col2im_images_add(g: &ConvGeometry, col: &[f32], count: usize, images: &mut [f32]) {
    let (taps, p, image_pixels) = (
        g.kernel_rows * g.kernel_cols,
        g.out_pixels(),
        g.image_pixels(),
    );
    for (row, src) in col.chunks_exact(count * p).enumerate() {
        let (c, tap) = (row / taps, row % taps);
        for (n, src) in src.chunks_exact(p).enumerate() {
            let plane = &mut images[(n * g.in_channels + c) * image_pixels..][..image_pixels];
            add_tap(g, src, tap / g.kernel_cols, tap % g.kernel_cols, plane);
        }
    }
}

/// `[N, C, P]` -> `[C, N*P]`.
fn to_channel_major(src: &[f32], batch: usize, channels: usize, pixels: usize, dst: &mut [f32]) {
    dst.par_chunks_mut(pixels)
        .enumerate()
        .with_min_len(min_planes_per_task(pixels))
        .for_each(|(i, d)| {
            let (c, n) = (i / batch, i % batch);
            d.copy_from_slice(&src[(n * channels + c) * pixels..][..pixels]);
        });
}

/// `[C, N*P]` -> a new `[N, C, P]` buffer (written once, never zero-filled first).
fn from_channel_major(src: &[f32], batch: usize, channels: usize, pixels: usize) -> Vec<f32> {
    let len = batch * channels * pixels;
    let mut dst = Vec::with_capacity(len);
    dst.spare_capacity_mut()
        .par_chunks_mut(pixels)
        .enumerate()
        .with_min_len(min_planes_per_task(pixels))
        .for_each(|(i, d)| {
            let (n, c) = (i / channels, i % channels);
            for (d, &s) in d.iter_mut().zip(&src[(c * batch + n) * pixels..][..pixels]) {
                d.write(s);
            }
        });
    // SAFETY: the planes above cover all `len` elements.
    unsafe { dst.set_len(len) };
    dst
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{on_two_threads, random, rel_err};
    use candle_core::{DType, Var};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// Forward, input and weight gradients against candle's conv2d for one geometry.
    fn check(x_dims: [usize; 4], w_dims: [usize; 4], stride: usize, padding: usize) -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let x = Var::from_tensor(&random(&mut rng, &x_dims, 0.0)?)?;
        let w = Var::from_tensor(&random(&mut rng, &w_dims, 0.0)?)?;
        let reference = x.conv2d(&w, padding, stride, 1, 1)?;
        let ours = conv2d(&x, &w, stride, padding)?;
        assert_eq!(ours.dims(), reference.dims());
        let err = rel_err(&ours, &reference)?;
        assert!(
            err < 1e-5,
            "forward {x_dims:?} {w_dims:?} s{stride} p{padding}: {err}"
        );

        // A random linear loss, so every output element gets a distinct gradient.
        let probe = random(&mut rng, reference.dims(), 0.0)?;
        let ref_grads = (reference * &probe)?.sum_all()?.backward()?;
        let our_grads = (ours * &probe)?.sum_all()?.backward()?;
        for (name, var) in [("input", &x), ("weight", &w)] {
            let want = ref_grads.get(var).expect("reference gradient");
            let got = our_grads.get(var).expect("our gradient");
            let err = rel_err(got, want)?;
            assert!(
                err < 1e-4,
                "{name} gradient {x_dims:?} {w_dims:?} s{stride} p{padding}: {err}"
            );
        }
        Ok(())
    }

    #[test]
    fn matches_candle_on_resnet_geometries() -> Result<()> {
        on_two_threads(|| {
            // Batch-wide im2col (fewer than 128 output pixels per image).
            check([2, 3, 17, 15], [4, 3, 7, 7], 2, 3)?; // stem
            check([2, 5, 9, 8], [6, 5, 3, 3], 1, 1)?; // basic block
            check([2, 5, 9, 9], [6, 5, 3, 3], 2, 1)?; // downsampling 3x3
            check([2, 5, 9, 7], [6, 5, 1, 1], 1, 0)?; // bottleneck 1x1
            check([3, 5, 9, 7], [6, 5, 1, 1], 2, 0)?; // projection shortcut
            check([1, 2, 4, 4], [3, 2, 3, 3], 3, 2)?; // stride larger than the kernel reach
            check([1, 3, 46, 46], [4, 3, 3, 3], 1, 1)?; // weight gradient in 3 runs, the last short
            check([1, 3, 46, 46], [40, 3, 3, 3], 1, 1)?; // the same, not transposed (O > K)
            check([2, 3, 5, 2], [4, 3, 5, 5], 1, 2)?; // column shifts as wide as the image
            check([1, 2, 4, 3], [3, 2, 7, 7], 1, 3)?; // and wider
            check([2, 3, 7, 6], [4, 3, 3, 3], 1, 0)?; // stride 1 without padding

            // Tap GEMMs (stride 1, at most 64 output pixels, 16 images).
            check([16, 5, 2, 2], [6, 5, 3, 3], 1, 1)?; // layer4 at 64x64
            check([16, 70, 4, 4], [67, 70, 3, 3], 1, 1)?; // more rows than a forward task
            check([17, 3, 3, 5], [4, 3, 5, 5], 1, 2)?; // a kernel taller than the map
            check([16, 3, 4, 6], [4, 3, 3, 3], 1, 0)?; // narrower output than input
            check([16, 2, 1, 1], [3, 2, 3, 3], 1, 1)?; // one pixel: 8 of 9 taps see only padding

            // The per-image path (at least 128 output pixels, an image per thread); maps under
            // 384 pixels put 2-3 images in one GEMM.
            check([9, 6, 12, 11], [5, 6, 1, 1], 1, 0)?; // 1x1, partials of 4 + 4 + 1
            check([2, 4, 16, 8], [7, 4, 1, 1], 1, 0)?; // 1x1, one partial
            check([5, 4, 12, 12], [6, 4, 3, 3], 1, 1)?; // 3x3, partials of 4 + 1
            check([2, 4, 30, 28], [5, 4, 3, 3], 2, 1)?; // strided 3x3 (direct forward too)
            check([2, 3, 34, 30], [4, 3, 7, 7], 2, 3)?; // stem (direct forward with AVX-512)
            check([2, 3, 33, 31], [13, 3, 7, 7], 2, 3)?; // the same on odd sizes, 12 + 4 channels
            check([3, 5, 27, 29], [6, 5, 3, 3], 2, 1)?; // strided 3x3 on odd sizes

            // Direct 3x3 convs (stride 1, at least 14 columns; with AVX-512): channel blocks
            // 12 + 4 forward and 8 (5 rounded up) for the input gradient, and 12 + 12.
            check([3, 5, 9, 16], [13, 5, 3, 3], 1, 1)?;
            check([2, 24, 14, 14], [24, 24, 3, 3], 1, 1)?;

            // Weight gradients accumulated transposed (K > O, at least 512 pixels).
            check([9, 4, 12, 12], [6, 4, 3, 3], 1, 1)?; // 3x3, partials of 4 + 4 + 1
            check([5, 3, 34, 30], [4, 3, 7, 7], 2, 3) // stem
        })
    }

    #[test]
    fn small_maps_put_several_images_in_one_gemm_while_every_thread_gets_a_group() -> Result<()> {
        let per_gemm = |x: [usize; 4], w: [usize; 4], stride, padding| -> Result<usize> {
            Ok(ConvGeometry::new(&x, &w, stride, padding)?.images_per_gemm())
        };
        on_two_threads(|| {
            // ResNet-18 at 112x112, batch 16: layer2's 14x14 maps in pairs, layer1's 28x28 alone.
            assert_eq!(per_gemm([16, 128, 14, 14], [128, 128, 3, 3], 1, 1)?, 2);
            assert_eq!(per_gemm([16, 64, 28, 28], [64, 64, 3, 3], 1, 1)?, 1);
            // The cases of `matches_candle_on_resnet_geometries` with groups, one ragged.
            assert_eq!(per_gemm([9, 6, 12, 11], [5, 6, 1, 1], 1, 0)?, 3);
            assert_eq!(per_gemm([5, 4, 12, 12], [6, 4, 3, 3], 1, 1)?, 2);
            assert_eq!(per_gemm([5, 3, 34, 30], [4, 3, 7, 7], 2, 3)?, 2);
            // Two images on two threads: one each.
            assert_eq!(per_gemm([2, 4, 16, 8], [7, 4, 1, 1], 1, 0)?, 1);
            Ok(())
        })
    }

    #[test]
    fn weight_gradients_accumulate_transposed_for_long_reductions_into_fewer_outputs() {
        let transposed = |o, k, pixels| WeightGradient::new(o, k, pixels).transposed;
        // The cases of `matches_candle_on_resnet_geometries` that take each branch.
        assert!(transposed(4, 27, 46 * 46));
        assert!(!transposed(40, 27, 46 * 46));
        assert!(transposed(6, 36, 9 * 144));
        assert!(!transposed(5, 36, 2 * 210));
        // ResNet-18 at 112x112, batch 16: layer1, layer3's stride-2 3x3 and the stem
        // transposed, layer4 not.
        assert!(transposed(64, 576, 16 * 784));
        assert!(transposed(256, 1152, 16 * 49));
        assert!(transposed(64, 147, 16 * 3136));
        assert!(!transposed(512, 4608, 16 * 16));
    }

    #[test]
    fn tap_gemms_take_small_stride_1_maps_and_large_weights_only_when_padding_dominates(
    ) -> Result<()> {
        let picks = |x: [usize; 4], w: [usize; 4], stride: usize| -> Result<bool> {
            Ok(taps::applies(&ConvGeometry::new(&x, &w, stride, w[2] / 2)?))
        };
        assert!(picks([16, 256, 7, 7], [256, 256, 3, 3], 1)?);
        assert!(picks([32, 512, 2, 2], [512, 512, 3, 3], 1)?); // 5/9 of im2col on padding
        assert!(!picks([16, 512, 4, 4], [512, 512, 3, 3], 1)?); // 3/10 on padding
        assert!(!picks([8, 256, 4, 4], [256, 256, 3, 3], 1)?); // too few images
        assert!(!picks([16, 64, 9, 8], [64, 64, 3, 3], 1)?); // 72 output pixels
        assert!(!picks([16, 64, 8, 8], [64, 64, 3, 3], 2)?);
        assert!(!picks([16, 64, 8, 8], [64, 64, 1, 1], 1)?);
        assert!(!picks([16, 0, 4, 4], [8, 0, 3, 3], 1)?); // nothing to split into tasks
                                                          // And the large-weight path computes what candle does.
        on_two_threads(|| check([16, 260, 2, 2], [258, 260, 3, 3], 1, 1))
    }

    #[test]
    fn batch_wide_weight_gradients_reuse_the_forwards_copy_of_the_input() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut values = |dims: &[usize]| -> Result<Vec<f32>> {
            random(&mut rng, dims, 0.0)?.flatten_all()?.to_vec1::<f32>()
        };
        // The kept copy gives the same gradients as one built again, and the weight gradient
        // really comes from it: another input's copy gives another gradient.
        let mut check_reuse = |x_dims: [usize; 4], w_dims: [usize; 4], stride| -> Result<()> {
            let g = ConvGeometry::new(&x_dims, &w_dims, stride, 1)?;
            let (x, other_x) = (values(&x_dims)?, values(&x_dims)?);
            let w = values(&w_dims)?;
            let dy = values(&[x_dims[0], w_dims[0], g.out_rows, g.out_cols])?;
            let kept = forward_for_training(&g, &x, &w)?;
            assert_eq!(kept.out, forward(&g, &x, &w)?);
            assert!(kept.planes.is_none());
            let copy = kept
                .patches
                .expect("a batch-wide path keeps its copy of the input");
            let reused = backward(&g, &x, &w, &dy, InputGradient::New, Some(&copy))?;
            let rebuilt = backward(&g, &x, &w, &dy, InputGradient::New, None)?;
            assert_eq!(reused, rebuilt);
            let other = forward_for_training(&g, &other_x, &w)?.patches;
            let other = other.expect("kept");
            let (_, from_other) = backward(&g, &x, &w, &dy, InputGradient::Skip, Some(&other))?;
            assert_ne!(from_other, rebuilt.1);
            Ok(())
        };
        on_two_threads(|| {
            // A strided conv on a 7x7 output map: the im2col path.
            check_reuse([4, 6, 13, 13], [5, 6, 3, 3], 2)?;
            // Tap GEMMs (stride 1, 16 images of 4x4): their pixel-major copy.
            check_reuse([16, 3, 4, 4], [4, 3, 3, 3], 1)?;
            Ok::<_, candle_core::Error>(())
        })?;

        // The per-image path keeps none (it builds no batch-wide copy).
        let per_image = ConvGeometry::new(&[2, 4, 16, 16], &[5, 4, 3, 3], 1, 1)?;
        let x = values(&[2, 4, 16, 16])?;
        let w = values(&[5, 4, 3, 3])?;
        on_two_threads(|| -> Result<()> {
            assert!(forward_for_training(&per_image, &x, &w)?.patches.is_none());
            Ok(())
        })
    }

    #[test]
    fn a_conv_without_input_channels_gives_zeros() -> Result<()> {
        on_two_threads(|| {
            for batch in [2, 16] {
                let x =
                    Var::from_tensor(&Tensor::zeros((batch, 0, 4, 4), DType::F32, &Device::Cpu)?)?;
                let w = Var::from_tensor(&Tensor::zeros((8, 0, 3, 3), DType::F32, &Device::Cpu)?)?;
                let out = conv2d(&x, &w, 1, 1)?;
                assert_eq!(out.dims(), &[batch, 8, 4, 4]);
                assert_eq!(out.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
                out.sum_all()?.backward()?;
            }
            Ok(())
        })
    }

    #[test]
    fn per_image_input_gradients_are_added_into_a_given_buffer_of_the_right_length() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let mut values = |dims: &[usize]| -> Result<Vec<f32>> {
            random(&mut rng, dims, 0.0)?.flatten_all()?.to_vec1::<f32>()
        };
        // Direct (with AVX-512), strided GEMM and pointwise per-image paths.
        for (x_dims, w_dims, stride, padding) in [
            ([3, 5, 9, 16], [13, 5, 3, 3], 1, 1),
            ([2, 4, 30, 28], [5, 4, 3, 3], 2, 1),
            ([9, 6, 12, 11], [5, 6, 1, 1], 1, 0),
        ] {
            let g = ConvGeometry::new(&x_dims, &w_dims, stride, padding)?;
            let (x, w) = (values(&x_dims)?, values(&w_dims)?);
            let dy = values(&[x_dims[0], w_dims[0], g.out_rows, g.out_cols])?;
            on_two_threads(|| {
                assert!(g.runs_per_image());
                let (new, grad_w) = backward(&g, &x, &w, &dy, InputGradient::New, None)?;
                let new = new.expect("an input gradient");
                let ones = vec![1.0; x.len()];
                let (added, added_w) = backward(&g, &x, &w, &dy, InputGradient::AddTo(ones), None)?;
                // The same sums, added onto 1 (col2im adds tap by tap: rounding may differ).
                let want = (Tensor::new(new.as_slice(), &Device::Cpu)? + 1.0)?;
                let got = Tensor::new(added.expect("an input gradient").as_slice(), &Device::Cpu)?;
                let err = rel_err(&got, &want)?;
                assert!(err < 1e-6, "{x_dims:?} {w_dims:?}: {err}");
                assert_eq!(added_w, grad_w);
                let short = InputGradient::AddTo(vec![0.0; x.len() - 1]);
                let err = backward(&g, &x, &w, &dy, short, None)
                    .unwrap_err()
                    .to_string();
                assert!(err.contains(&format!("{} values", x.len() - 1)), "{err}");
                Ok::<_, candle_core::Error>(())
            })?;
        }
        Ok(())
    }

    #[test]
    fn the_image_batch_gets_no_gradient() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        // Batch-wide (64 output pixels), per-image and direct (256, 16 columns), per-image
        // strided (64 x 64 at stride 2: 1024).
        for (x_dims, w_dims, stride) in [
            ([2, 3, 8, 8], [4, 3, 3, 3], 1),
            ([2, 3, 16, 16], [4, 3, 3, 3], 1),
            ([2, 3, 64, 64], [4, 3, 7, 7], 2),
        ] {
            let images = random(&mut rng, &x_dims, 0.0)?;
            let w = Var::from_tensor(&random(&mut rng, &w_dims, 0.0)?)?;
            let padding = w_dims[2] / 2;
            let grads =
                on_two_threads(|| conv2d(&images, &w, stride, padding)?.sum_all()?.backward())?;
            assert!(grads.get(&images).is_none(), "{x_dims:?}");
            assert!(grads.get(&w).is_some());
        }
        Ok(())
    }

    #[test]
    fn rejects_mismatched_channels_and_other_dtypes_fall_back() -> Result<()> {
        let x = Tensor::zeros((1, 3, 8, 8), DType::F32, &Device::Cpu)?;
        let w = Tensor::zeros((4, 2, 3, 3), DType::F32, &Device::Cpu)?;
        let err = conv2d(&x, &w, 1, 1).unwrap_err().to_string();
        assert!(err.contains("3 channels"), "{err}");
        let x = Tensor::ones((1, 2, 5, 5), DType::F64, &Device::Cpu)?;
        let w = Tensor::ones((1, 2, 3, 3), DType::F64, &Device::Cpu)?;
        let out = conv2d(&x, &w, 1, 0)?;
        assert_eq!(out.dims(), &[1, 1, 3, 3]);
        assert_eq!(out.flatten_all()?.to_vec1::<f64>()?, vec![18.0; 9]);
        Ok(())
    }
}
