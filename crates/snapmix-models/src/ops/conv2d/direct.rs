//! Convolutions without an im2col matrix: 3x3, stride-1, padding-1 convs (forward and input
//! gradient) and the forward of strided convs with odd square kernels and "same" padding (the
//! stem's 7x7, stride 2). Each input plane is copied once into a zero-padded "flat" layout in
//! which output position `y * row_len + x` reads every kernel tap at a fixed offset, so a block
//! of output positions is a sum of contiguous, shifted input vectors times broadcast weights.
//! Stride 1: rows `cols + padding` long, the zeros that end one row the left padding of the
//! next (`padding` wasted positions per row). Stride 2: each plane split into its four phases
//! (even or odd rows and columns), in which the strided conv is a stride-1 one reading each
//! phase with a quarter of the taps. The input gradient of a stride-1 conv is the same
//! convolution of the output gradient with the weights transposed and flipped. An AVX-512
//! micro-kernel where the CPU has one, a portable one otherwise (for tests: [`applies_forward`]
//! and [`applies_input_gradient`] take this path only with AVX-512).

use super::super::cpu::{build_in_chunks, Scratch};
use super::{ConvGeometry, InputGradient};
use candle_core::Result;
use rayon::prelude::*;

/// Output channels per micro-kernel call (their weights broadcast).
const CHANNEL_BLOCK: usize = 12;
/// Channel counts are rounded up to a multiple of this (zero weights, outputs not kept).
const CHANNEL_ROUNDING: usize = 4;
/// 16-float vectors of output positions per micro-kernel call.
const PIXEL_VECTORS: usize = 2;
/// Output positions per micro-kernel call.
const PIXEL_BLOCK: usize = 16 * PIXEL_VECTORS;
/// Narrowest map taking the stride-1 path: the wasted column costs 1/cols of the work. One
/// thread, 14x14 maps of 128 channels: 145-151 GFLOP/s with the copies, against 132-138 for
/// `gemm` alone on a ready im2col matrix.
const MIN_COLS: usize = 14;

/// Whether the input gradient of `g` runs here: a 3x3, stride-1, padding-1 conv on maps at
/// least [`MIN_COLS`] wide, on the per-image path, on a CPU with AVX-512.
pub(super) fn applies_input_gradient(g: &ConvGeometry) -> bool {
    g.kernel_rows == 3 && g.stride == 1 && g.cols >= MIN_COLS && applies_forward(g)
}

/// Whether the forward of `g` runs here: as [`applies_input_gradient`], or a stride-2 conv with
/// an odd square kernel from 3x3 and "same" padding (ResNet's stem and downsampling 3x3s) on the
/// per-image path. Per-op timers, R18 b16 112x112: stem 8.3 -> 6.4 ms, layer2's stride-2 3x3
/// 2.7 -> 2.1 ms per step.
pub(super) fn applies_forward(g: &ConvGeometry) -> bool {
    let same_padding =
        g.kernel_rows == g.kernel_cols && g.kernel_rows % 2 == 1 && g.padding == g.kernel_rows / 2;
    let shape = match g.stride {
        1 => g.kernel_rows == 3 && g.cols >= MIN_COLS,
        2 => g.kernel_rows >= 3,
        _ => false,
    };
    same_padding
        && shape
        && g.in_channels > 0
        && g.runs_per_image()
        && Kernel::best() != Kernel::Portable
}

/// Forward one image at a time, applying `then` to each image's output `[O, P]` while it is in
/// the core's cache; the output (NCHW) and `then`'s results in image order.
pub(super) fn forward_images<R: Send>(
    g: &ConvGeometry,
    x: &[f32],
    weight: &[f32],
    then: impl Fn(&[f32]) -> R + Sync,
) -> Result<(Vec<f32>, Vec<R>)> {
    let layout = FlatLayout::new(g.rows, g.cols, g.kernel_rows, g.stride);
    let packed = PackedWeights::forward(weight, g.out_channels, g.in_channels, layout.taps());
    let plan = Plan::new(layout, packed);
    let image_len = g.in_channels * g.image_pixels();
    let out_len = g.out_channels * g.out_pixels();
    build_in_chunks(g.batch * out_len, out_len, |n, out| {
        let image = &x[n * image_len..][..image_len];
        plan.convolve_image(Kernel::best(), image, out, false);
        Ok(then(out))
    })
}

/// The input gradient as `target` asks for it: each image's output gradient convolved with the
/// transposed, flipped weights.
pub(super) fn input_gradient(
    g: &ConvGeometry,
    weight: &[f32],
    grad_out: &[f32],
    target: InputGradient,
) -> Result<Option<Vec<f32>>> {
    if matches!(target, InputGradient::Skip) {
        return Ok(None);
    }
    let layout = FlatLayout::new(g.rows, g.cols, g.kernel_rows, 1);
    let packed =
        PackedWeights::input_gradient(weight, g.out_channels, g.in_channels, layout.taps());
    let plan = Plan::new(layout, packed);
    let (image_len, out_len) = (
        g.in_channels * g.image_pixels(),
        g.out_channels * g.out_pixels(),
    );
    target.write_in_chunks(g.batch * image_len, image_len, |n, grad_x, accumulate| {
        let grad = &grad_out[n * out_len..][..out_len];
        plan.convolve_image(Kernel::best(), grad, grad_x, accumulate);
        Ok(())
    })
}

/// One conv as the micro-kernel runs it, the same for every image: the layout of its input
/// planes, where each packed weight row's tap reads them, and the packed weights.
struct Plan {
    layout: FlatLayout,
    offsets: Vec<usize>,
    weights: PackedWeights,
}

impl Plan {
    fn new(layout: FlatLayout, weights: PackedWeights) -> Self {
        Self {
            offsets: layout.tap_offsets(weights.in_channels),
            layout,
            weights,
        }
    }

    /// One image `[C, rows*cols]` convolved into `out` `[O, out_rows*out_cols]` (or added to
    /// it).
    fn convolve_image(&self, kernel: Kernel, image: &[f32], out: &mut [f32], accumulate: bool) {
        let (layout, weights) = (self.layout, &self.weights);
        let in_channels = weights.in_channels;
        let mut padded = Scratch::take(layout.padded_len(in_channels, &self.offsets));
        layout.pad(image, in_channels, &mut padded);
        let mut flat = Scratch::take(weights.rounded_out_channels() * layout.out_stride());
        convolve(kernel, layout, &padded, &self.offsets, weights, &mut flat);
        layout.unpad(&flat, weights.out_channels, out, accumulate);
    }
}

/// The flat padded layout of one conv's `rows x cols` input planes (see the module docs): a
/// square odd kernel with "same" padding, stride 1 or 2.
#[derive(Clone, Copy, Debug)]
struct FlatLayout {
    rows: usize,
    cols: usize,
    kernel: usize,
    stride: usize,
}

impl FlatLayout {
    fn new(rows: usize, cols: usize, kernel: usize, stride: usize) -> Self {
        Self {
            rows,
            cols,
            kernel,
            stride,
        }
    }

    fn padding(self) -> usize {
        self.kernel / 2
    }

    /// Kernel taps per input channel.
    fn taps(self) -> usize {
        self.kernel * self.kernel
    }

    fn out_rows(self) -> usize {
        (self.rows + 2 * self.padding() - self.kernel) / self.stride + 1
    }

    fn out_cols(self) -> usize {
        (self.cols + 2 * self.padding() - self.kernel) / self.stride + 1
    }

    /// Stride 1: the columns and the padding zeros shared by neighbouring rows; stride 2: a
    /// phase's columns that the output columns read.
    fn row_len(self) -> usize {
        match self.stride {
            1 => self.cols + self.padding(),
            _ => self.out_cols() + self.padding(),
        }
    }

    /// Rows of a (phase) plane: stride 1, the image rows and the padding rows above and below.
    fn plane_rows(self) -> usize {
        match self.stride {
            1 => self.rows + 2 * self.padding(),
            _ => self.out_rows() + self.padding(),
        }
    }

    fn plane_len(self) -> usize {
        self.plane_rows() * self.row_len()
    }

    /// (Phase) planes per input channel.
    fn phases(self) -> usize {
        self.stride * self.stride
    }

    /// Output positions computed per plane (the output rows, each with its wasted positions).
    fn out_positions(self) -> usize {
        self.out_rows() * self.row_len()
    }

    /// Output positions rounded up to whole micro-kernel blocks: a flat output plane's length.
    fn out_stride(self) -> usize {
        self.out_positions().next_multiple_of(PIXEL_BLOCK)
    }

    /// Where tap `(ky, kx)` of input channel `c` reads for output position 0, in OIHW weight
    /// order (`[c][ky][kx]`).
    fn tap_offsets(self, channels: usize) -> Vec<usize> {
        let (k, row_len, plane_len) = (self.kernel, self.row_len(), self.plane_len());
        let mut offsets = Vec::with_capacity(channels * self.taps());
        for c in 0..channels {
            for ky in 0..k {
                for kx in 0..k {
                    offsets.push(match self.stride {
                        1 => c * plane_len + ky * row_len + kx,
                        _ => {
                            let phase = c * 4 + (ky % 2) * 2 + kx % 2;
                            phase * plane_len + (ky / 2) * row_len + kx / 2
                        }
                    });
                }
            }
        }
        offsets
    }

    /// The padded planes of `channels` and the zeros after them that blocks of positions read
    /// from the last taps' `offsets`.
    fn padded_len(self, channels: usize, offsets: &[usize]) -> usize {
        let planes = channels * self.phases() * self.plane_len();
        let read = offsets
            .iter()
            .max()
            .map_or(0, |max| max + self.out_stride());
        planes.max(read)
    }

    /// Copies `channels` planes of `src` into the padded layout `dst`, zeros after them.
    fn pad(self, src: &[f32], channels: usize, dst: &mut [f32]) {
        let (rows, cols, row_len) = (self.rows, self.cols, self.row_len());
        let (planes, tail) = dst.split_at_mut(channels * self.phases() * self.plane_len());
        let planes = planes.chunks_exact_mut(self.phases() * self.plane_len());
        for (planes, src) in planes.zip(src.chunks_exact(rows * cols)) {
            if self.stride == 1 {
                self.pad_plane(src, planes);
                continue;
            }
            let pad = self.padding();
            for (phase, plane) in planes.chunks_exact_mut(self.plane_len()).enumerate() {
                let (row_phase, col_phase) = (phase / 2, phase % 2);
                for (a, dst) in plane.chunks_exact_mut(row_len).enumerate() {
                    // Phase row `a` is padded row `2a + row_phase`, its value `b` padded
                    // column `2b + col_phase`.
                    let Some(r) = (2 * a + row_phase).checked_sub(pad).filter(|&r| r < rows) else {
                        dst.fill(0.0);
                        continue;
                    };
                    // Values `first..` read image columns `2b + col_phase - pad` from
                    // `first_col`, every other one, while they lie in the image.
                    let first = pad.saturating_sub(col_phase).div_ceil(2);
                    let first_col = 2 * first + col_phase - pad;
                    let values = (cols.saturating_sub(first_col))
                        .div_ceil(2)
                        .min(row_len.saturating_sub(first));
                    let (head, rest) = dst.split_at_mut(first.min(row_len));
                    let (inside, tail) = rest.split_at_mut(values);
                    head.fill(0.0);
                    for (value, &x) in inside
                        .iter_mut()
                        .zip(src[r * cols + first_col.min(cols)..][..].iter().step_by(2))
                    {
                        *value = x;
                    }
                    tail.fill(0.0);
                }
            }
        }
        tail.fill(0.0);
    }

    /// One stride-1 plane: `padding` zero rows above and below, each image row after
    /// `padding` zeros.
    fn pad_plane(self, src: &[f32], plane: &mut [f32]) {
        let (pad, rows, row_len) = (self.padding(), self.rows, self.row_len());
        plane[..pad * row_len].fill(0.0);
        for (row, src) in plane[pad * row_len..]
            .chunks_exact_mut(row_len)
            .zip(src.chunks_exact(self.cols))
        {
            row[..pad].fill(0.0);
            row[pad..].copy_from_slice(src);
        }
        plane[(pad + rows) * row_len..].fill(0.0);
    }

    /// The first `channels` flat output planes of `flat` (`out_stride` apart) into `dst`
    /// (`[channels, out_rows*out_cols]`), or added to it, without the wasted positions.
    fn unpad(self, flat: &[f32], channels: usize, dst: &mut [f32], accumulate: bool) {
        let (cols, row_len) = (self.out_cols(), self.row_len());
        for (dst, flat) in dst
            .chunks_exact_mut(self.out_rows() * cols)
            .zip(flat.chunks_exact(self.out_stride()))
            .take(channels)
        {
            for (dst, src) in dst.chunks_exact_mut(cols).zip(flat.chunks(row_len)) {
                if accumulate {
                    for (d, s) in dst.iter_mut().zip(src) {
                        *d += s;
                    }
                } else {
                    dst.copy_from_slice(&src[..cols]);
                }
            }
        }
    }
}

/// Weights in micro-kernel order: for each block of up to [`CHANNEL_BLOCK`] output channels,
/// `[in_channel][tap][channel in block]`, the output channels rounded up to a multiple of
/// [`CHANNEL_ROUNDING`] with zeros.
struct PackedWeights {
    values: Scratch,
    out_channels: usize,
    in_channels: usize,
}

impl PackedWeights {
    /// The conv's own OIHW `weight` `[out_channels, in_channels, taps]`.
    fn forward(weight: &[f32], out_channels: usize, in_channels: usize, taps: usize) -> Self {
        let row_len = in_channels * taps;
        Self::pack(out_channels, in_channels, taps, |first, block, dst| {
            // The block's rows `[block, C * taps]` transposed, in tiles of `TILE` columns so
            // that the tile's destination stays in L1 while `block` rows are read into it.
            const TILE: usize = 64;
            let rows = &weight[first * row_len..][..block * row_len];
            for (tile, dst) in dst.chunks_mut(TILE * block).enumerate() {
                for (i, row) in rows.chunks_exact(row_len).enumerate() {
                    let src = &row[tile * TILE..][..dst.len() / block];
                    for (k, &value) in src.iter().enumerate() {
                        dst[k * block + i] = value;
                    }
                }
            }
        })
    }

    /// The input gradient's weights for OIHW `weight` `[out_channels, in_channels, taps]` of a
    /// stride-1 conv: a conv from `out_channels` to `in_channels` with every kernel flipped
    /// (tap `taps - 1 - tap`).
    fn input_gradient(
        weight: &[f32],
        out_channels: usize,
        in_channels: usize,
        taps: usize,
    ) -> Self {
        Self::pack(in_channels, out_channels, taps, |first, block, dst| {
            // Per output channel of the weight, its kernels of input channels `first..`.
            for (o, dst) in dst.chunks_exact_mut(taps * block).enumerate() {
                let kernels = &weight[(o * in_channels + first) * taps..][..block * taps];
                for (i, kernel) in kernels.chunks_exact(taps).enumerate() {
                    for (tap, &value) in kernel.iter().enumerate() {
                        dst[(taps - 1 - tap) * block + i] = value;
                    }
                }
            }
        })
    }

    /// Packs `out_channels` rounded up, a block per rayon task: `fill(first, channels, dst)`
    /// writes every value of the block of `channels` from `first` into `dst`
    /// (`[in_channels * taps, channels]`); the rounded-up block gets zeros for the channels
    /// past `out_channels`. `in_channels` must not be 0.
    fn pack(
        out_channels: usize,
        in_channels: usize,
        taps: usize,
        fill: impl Fn(usize, usize, &mut [f32]) + Sync,
    ) -> Self {
        let rounded = out_channels.next_multiple_of(CHANNEL_ROUNDING);
        let per_channel = in_channels * taps;
        let mut values = Scratch::take(rounded * per_channel);
        values
            .par_chunks_mut(CHANNEL_BLOCK * per_channel)
            .enumerate()
            .for_each(|(index, dst)| {
                let first = index * CHANNEL_BLOCK;
                let block = dst.len() / per_channel.max(1);
                let existing = block.min(out_channels.saturating_sub(first));
                if existing == block {
                    fill(first, block, dst);
                } else {
                    // The rounded-up block: pack the existing channels narrower, then spread
                    // them with zeros for the others.
                    let mut narrow = vec![0.0; existing * per_channel];
                    fill(first, existing, &mut narrow);
                    for (k, dst) in dst.chunks_exact_mut(block).enumerate() {
                        dst[..existing].copy_from_slice(&narrow[k * existing..][..existing]);
                        dst[existing..].fill(0.0);
                    }
                }
            });
        Self {
            values,
            out_channels,
            in_channels,
        }
    }

    fn rounded_out_channels(&self) -> usize {
        self.out_channels.next_multiple_of(CHANNEL_ROUNDING)
    }
}

/// `(first channel, channels)` of the micro-kernel's output-channel blocks for `rounded`
/// channels (a multiple of [`CHANNEL_ROUNDING`]).
fn channel_blocks(rounded: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..rounded)
        .step_by(CHANNEL_BLOCK)
        .map(move |first| (first, CHANNEL_BLOCK.min(rounded - first)))
}

/// All flat output planes `[rounded_out_channels, out_stride]` of one padded image, whose taps
/// read at `offsets` (one per packed weight row).
fn convolve(
    kernel: Kernel,
    layout: FlatLayout,
    padded: &[f32],
    offsets: &[usize],
    weights: &PackedWeights,
    flat: &mut [f32],
) {
    let stride = layout.out_stride();
    // The lengths every micro-kernel call below relies on.
    assert!(padded.len() >= layout.padded_len(weights.in_channels, offsets));
    assert!(flat.len() >= weights.rounded_out_channels() * stride);
    assert_eq!(
        weights.values.len(),
        weights.rounded_out_channels() * offsets.len()
    );
    // A block of channels at a time over all positions: its weights (27 KiB for 64 input
    // channels of 3x3) stay in L1. One thread, micro-kernel alone, three runs: 28x28 maps of 64
    // channels 167-170 -> 168-171 GFLOP/s against positions outer, 14x14 of 128 169-175 ->
    // 172-176.
    for (first, block) in channel_blocks(weights.rounded_out_channels()) {
        for first_pixel in (0..stride).step_by(PIXEL_BLOCK) {
            // SAFETY: block `first_pixel` reads input positions up to
            // `max(offsets) + stride - 1` (inside `padded`, asserted above),
            // `block * offsets.len()` weights from the block's start, and writes `block` rows
            // of `PIXEL_BLOCK` outputs, `out_stride` apart, inside `flat`.
            unsafe {
                kernel.block(
                    block,
                    Block {
                        input: padded.as_ptr().add(first_pixel),
                        offsets,
                        weights: weights.values.as_ptr().add(first * offsets.len()),
                        out: flat.as_mut_ptr().add(first * stride + first_pixel),
                        out_stride: stride,
                    },
                );
            }
        }
    }
}

/// Which micro-kernel runs: the same sums, in the same order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Kernel {
    fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") {
            return Self::Avx512;
        }
        Self::Portable
    }

    /// `out[i * out_stride + j] = sum_t weights[t * channels + i] * input[offsets[t] + j]` for
    /// `i < channels`, `j < PIXEL_BLOCK`.
    ///
    /// # Safety
    /// Those reads and writes must be in bounds, `channels` one of 4, 8 or 12, and `Avx512`
    /// only chosen where the CPU has it ([`Kernel::best`]).
    unsafe fn block(self, channels: usize, call: Block) {
        match self {
            Self::Portable => portable_block(channels, call),
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => match channels {
                12 => avx512::block::<12>(call),
                8 => avx512::block::<8>(call),
                _ => avx512::block::<4>(call),
            },
        }
    }
}

/// Where one micro-kernel call reads and writes: `input` at each of the taps' `offsets`, the
/// block's `weights` (`[tap][channel]`), and `out`, one row of positions per channel,
/// `out_stride` apart.
#[derive(Clone, Copy)]
struct Block<'a> {
    input: *const f32,
    offsets: &'a [usize],
    weights: *const f32,
    out: *mut f32,
    out_stride: usize,
}

/// [`Kernel::block`] in plain Rust.
///
/// # Safety
/// As [`Kernel::block`].
unsafe fn portable_block(channels: usize, call: Block) {
    let mut acc = [[0.0f32; PIXEL_BLOCK]; CHANNEL_BLOCK];
    let mut w = call.weights;
    for &offset in call.offsets {
        let src = call.input.add(offset);
        for acc in &mut acc[..channels] {
            let weight = *w;
            w = w.add(1);
            for (j, acc) in acc.iter_mut().enumerate() {
                *acc = weight.mul_add(*src.add(j), *acc);
            }
        }
    }
    for (i, acc) in acc[..channels].iter().enumerate() {
        std::ptr::copy_nonoverlapping(acc.as_ptr(), call.out.add(i * call.out_stride), PIXEL_BLOCK);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Block, PIXEL_VECTORS};
    use std::arch::x86_64::*;

    /// [`super::Kernel::block`] for `CHANNELS` output channels: `CHANNELS x PIXEL_VECTORS`
    /// accumulators in registers, each tap one vector load per pixel vector and one broadcast
    /// per channel. Reading the taps' offsets from a table runs as fast as fixed 3x3 loops
    /// (one thread: 185 vs 186 GFLOP/s on 28x28 maps of 64 channels, 190 vs 187 on 14x14 of
    /// 128).
    ///
    /// # Safety
    /// As [`super::Kernel::block`]; the CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block<const CHANNELS: usize>(call: Block) {
        let Block {
            input,
            offsets,
            weights,
            out,
            out_stride,
        } = call;
        let mut acc = [[_mm512_setzero_ps(); PIXEL_VECTORS]; CHANNELS];
        let mut w = weights;
        for &offset in offsets {
            let src = input.add(offset);
            let mut pixels = [_mm512_setzero_ps(); PIXEL_VECTORS];
            for (j, v) in pixels.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(src.add(16 * j));
            }
            for acc in acc.iter_mut() {
                let weight = _mm512_set1_ps(*w);
                w = w.add(1);
                for (acc, &v) in acc.iter_mut().zip(&pixels) {
                    *acc = _mm512_fmadd_ps(weight, v, *acc);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            for (j, &v) in acc.iter().enumerate() {
                _mm512_storeu_ps(out.add(i * out_stride + 16 * j), v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Result;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// A `kernel x kernel` conv of one `[C, rows, cols]` image with "same" padding, summed in
    /// f64.
    fn reference(image: &[f32], weight: &[f32], o: usize, layout: FlatLayout) -> Vec<f32> {
        let (rows, cols, k, stride) = (layout.rows, layout.cols, layout.kernel, layout.stride);
        let (out_rows, out_cols) = (layout.out_rows(), layout.out_cols());
        let c = image.len() / (rows * cols);
        let mut out = vec![0.0; o * out_rows * out_cols];
        for (i, value) in out.iter_mut().enumerate() {
            let (oc, y, x) = (
                i / (out_rows * out_cols),
                i / out_cols % out_rows,
                i % out_cols,
            );
            let mut sum = 0.0f64;
            for ic in 0..c {
                for tap in 0..k * k {
                    let iy = (y * stride + tap / k).checked_sub(k / 2);
                    let ix = (x * stride + tap % k).checked_sub(k / 2);
                    if let (Some(iy), Some(ix)) = (iy, ix) {
                        if iy < rows && ix < cols {
                            sum += f64::from(weight[(oc * c + ic) * k * k + tap])
                                * f64::from(image[(ic * rows + iy) * cols + ix]);
                        }
                    }
                }
            }
            *value = sum as f32;
        }
        out
    }

    fn uniform(rng: &mut ChaCha8Rng, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    fn max_rel_err(got: &[f32], want: &[f32]) -> f32 {
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = got
            .iter()
            .zip(want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        diff / scale
    }

    #[test]
    fn both_kernels_match_a_direct_sum_on_ragged_channels_and_positions() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let kernels = [Kernel::Portable, Kernel::best()];
        // (out channels, in channels, rows, cols, kernel, stride): channel blocks 12 + 4,
        // 12 + 12, 8 and 4 (one rounded up), flat planes ending mid-block, a single row; strided
        // on odd and even sizes, the stem's 7x7 among them.
        for (o, c, rows, cols, k, stride) in [
            (13, 5, 9, 16, 3, 1),
            (24, 3, 4, 14, 3, 1),
            (7, 2, 1, 31, 3, 1),
            (3, 1, 5, 5, 3, 1),
            (9, 3, 23, 18, 7, 2),
            (16, 2, 8, 8, 7, 2),
            (5, 4, 7, 9, 3, 2),
            (4, 3, 12, 11, 5, 2),
        ] {
            let layout = FlatLayout::new(rows, cols, k, stride);
            let image = uniform(&mut rng, c * rows * cols);
            let weight = uniform(&mut rng, o * c * k * k);
            let want = reference(&image, &weight, o, layout);
            let plan = Plan::new(layout, PackedWeights::forward(&weight, o, c, layout.taps()));
            for kernel in kernels {
                let case = format!("{kernel:?} o{o} c{c} {rows}x{cols} k{k} s{stride}");
                let mut out = vec![f32::NAN; want.len()];
                plan.convolve_image(kernel, &image, &mut out, false);
                let err = max_rel_err(&out, &want);
                assert!(err < 1e-5, "{case}: {err}");

                // Accumulating adds the same values onto what is there.
                let mut sum = vec![1.0; want.len()];
                plan.convolve_image(kernel, &image, &mut sum, true);
                let plus_one: Vec<f32> = want.iter().map(|v| v + 1.0).collect();
                assert!(max_rel_err(&sum, &plus_one) < 1e-5, "{case} accumulated");
            }
        }
    }

    #[test]
    fn input_gradient_weights_are_the_kernels_transposed_and_flipped() {
        let (o, c) = (5, 3);
        let weight: Vec<f32> = (0..o * c * 9).map(|i| i as f32).collect();
        let packed = PackedWeights::input_gradient(&weight, o, c, 9);
        // A conv from 5 to 3 channels, rounded to 4 in one block: [o][tap][c of 4].
        assert_eq!((packed.out_channels, packed.in_channels), (3, 5));
        assert_eq!(packed.values.len(), 4 * 5 * 9);
        let at = |ic: usize, tap: usize, oc: usize| packed.values[(ic * 9 + tap) * 4 + oc];
        assert_eq!(at(0, 0, 0), weight[8]);
        assert_eq!(at(4, 2, 1), weight[(4 * c + 1) * 9 + 6]);
        assert_eq!(at(2, 7, 2), weight[(2 * c + 2) * 9 + 1]);
        assert_eq!(at(1, 3, 3), 0.0);
    }

    #[test]
    fn takes_3x3_stride_1_maps_from_14_columns_and_wide_strided_kernels_per_image() -> Result<()> {
        let picks = |x: [usize; 4], w: [usize; 4], stride: usize| -> Result<(bool, bool)> {
            let g = ConvGeometry::new(&x, &w, stride, w[2] / 2)?;
            Ok((applies_forward(&g), applies_input_gradient(&g)))
        };
        crate::ops::test_util::on_two_threads(|| {
            let avx512 = Kernel::best() != Kernel::Portable;
            // ResNet-18 at 112x112, batch 16: layer1 and layer2's stride-1 3x3 convs, both
            // ways; the stem and layer2's stride-2 3x3 forward only.
            assert_eq!(
                picks([16, 64, 28, 28], [64, 64, 3, 3], 1)?,
                (avx512, avx512)
            );
            assert_eq!(
                picks([16, 128, 14, 14], [128, 128, 3, 3], 1)?,
                (avx512, avx512)
            );
            assert_eq!(picks([16, 3, 112, 112], [64, 3, 7, 7], 2)?, (avx512, false));
            assert_eq!(
                picks([16, 64, 28, 28], [128, 64, 3, 3], 2)?,
                (avx512, false)
            );
            let neither = (false, false);
            assert_eq!(picks([16, 64, 28, 28], [128, 64, 1, 1], 2)?, neither); // 1x1 strided
            assert_eq!(picks([16, 64, 28, 28], [128, 64, 3, 3], 3)?, neither); // stride 3
            assert_eq!(picks([16, 128, 12, 12], [128, 128, 3, 3], 1)?, neither); // narrow
            assert_eq!(picks([16, 256, 7, 7], [256, 256, 3, 3], 1)?, neither); // batch-wide
            assert_eq!(picks([1, 64, 28, 28], [64, 64, 3, 3], 1)?, neither); // one image
            assert_eq!(picks([16, 64, 28, 28], [64, 64, 1, 1], 1)?, neither); // pointwise
            Ok(())
        })
    }
}
