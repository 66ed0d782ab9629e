//! 3x3, stride-1, padding-1 convolutions without an im2col matrix. Each input plane is copied
//! once into a zero-padded "flat" layout whose rows are `cols + 1` long: one zero column is the
//! right padding of a row and the left padding of the next. Output position `y * (cols + 1) + x`
//! then reads kernel tap `(ky, kx)` at the fixed offset `ky * (cols + 1) + kx`, so a block of
//! output positions is a sum of contiguous, shifted input vectors times broadcast weights (one
//! wasted position per row). The input gradient of such a conv is the same convolution of the
//! output gradient with the weights transposed and flipped. An AVX-512 micro-kernel where the CPU
//! has one, a portable one otherwise (for tests: [`applies`] takes this path only with AVX-512).

use super::super::cpu::Scratch;
use super::ConvGeometry;
use rayon::prelude::*;

/// Output channels per micro-kernel call (their weights broadcast).
const CHANNEL_BLOCK: usize = 12;
/// Channel counts are rounded up to a multiple of this (zero weights, outputs not kept).
const CHANNEL_ROUNDING: usize = 4;
/// 16-float vectors of output positions per micro-kernel call.
const PIXEL_VECTORS: usize = 2;
/// Output positions per micro-kernel call.
const PIXEL_BLOCK: usize = 16 * PIXEL_VECTORS;
/// Narrowest map taking this path: the wasted column costs 1/cols of the work. One thread,
/// 14x14 maps of 128 channels: 145-151 GFLOP/s with the copies, against 132-138 for `gemm`
/// alone on a ready im2col matrix.
const MIN_COLS: usize = 14;

/// Whether `g` runs here: a 3x3, stride-1, padding-1 conv on maps at least [`MIN_COLS`] wide,
/// on the per-image path, on a CPU with AVX-512.
pub(super) fn applies(g: &ConvGeometry) -> bool {
    g.kernel_rows == 3
        && g.kernel_cols == 3
        && g.stride == 1
        && g.padding == 1
        && g.cols >= MIN_COLS
        && g.in_channels > 0
        && g.runs_per_image()
        && Kernel::best() != Kernel::Portable
}

/// Forward into `out` (NCHW) one image at a time, applying `then` to each image's output
/// `[O, P]` while it is in the core's cache; its results in image order.
pub(super) fn forward_images<R: Send>(
    g: &ConvGeometry,
    x: &[f32],
    weight: &[f32],
    out: &mut [f32],
    then: impl Fn(&[f32]) -> R + Sync,
) -> Vec<R> {
    let packed = PackedWeights::forward(weight, g.out_channels, g.in_channels);
    let image_len = g.in_channels * g.image_pixels();
    out.par_chunks_mut(g.out_channels * g.out_pixels())
        .zip(x.par_chunks(image_len))
        .map(|(out, image)| {
            convolve_image(Kernel::best(), g.rows, g.cols, image, &packed, out, false);
            then(out)
        })
        .collect()
}

/// The input gradient, written into `grad_x` or added to it (`accumulate`): each image's output
/// gradient convolved with the transposed, flipped weights.
pub(super) fn input_gradient(
    g: &ConvGeometry,
    weight: &[f32],
    grad_out: &[f32],
    grad_x: &mut [f32],
    accumulate: bool,
) {
    let packed = PackedWeights::input_gradient(weight, g.out_channels, g.in_channels);
    grad_x
        .par_chunks_mut(g.in_channels * g.image_pixels())
        .zip(grad_out.par_chunks(g.out_channels * g.out_pixels()))
        .for_each(|(grad_x, grad)| {
            convolve_image(
                Kernel::best(),
                g.rows,
                g.cols,
                grad,
                &packed,
                grad_x,
                accumulate,
            );
        });
}

/// One image `[C, rows*cols]` convolved into `out` `[O, rows*cols]` (or added to it).
fn convolve_image(
    kernel: Kernel,
    rows: usize,
    cols: usize,
    image: &[f32],
    weights: &PackedWeights,
    out: &mut [f32],
    accumulate: bool,
) {
    let layout = FlatLayout { rows, cols };
    let mut padded = Scratch::take(layout.padded_len(weights.in_channels));
    layout.pad(image, weights.in_channels, &mut padded);
    let mut flat = Scratch::take(weights.rounded_out_channels() * layout.out_stride());
    convolve(kernel, layout, &padded, weights, &mut flat);
    layout.unpad(&flat, weights.out_channels, out, accumulate);
}

/// The flat padded layout of `rows x cols` planes (see the module docs).
#[derive(Clone, Copy, Debug)]
struct FlatLayout {
    rows: usize,
    cols: usize,
}

impl FlatLayout {
    /// Row length: the columns and one zero.
    fn row_len(self) -> usize {
        self.cols + 1
    }

    /// A padded plane: a zero row above and below the image rows.
    fn plane_len(self) -> usize {
        (self.rows + 2) * self.row_len()
    }

    /// Output positions computed per plane (the image rows, each with its wasted position).
    fn out_positions(self) -> usize {
        self.rows * self.row_len()
    }

    /// Output positions rounded up to whole micro-kernel blocks: a flat output plane's length.
    fn out_stride(self) -> usize {
        self.out_positions().next_multiple_of(PIXEL_BLOCK)
    }

    /// `channels` padded planes and the zeros that the last plane's rounded-up block reads past
    /// it (up to `out_stride + 2 * row_len + 2` from the plane's start).
    fn padded_len(self, channels: usize) -> usize {
        channels * self.plane_len() + self.out_stride() - self.out_positions() + 2
    }

    /// Copies `channels` planes of `src` into the padded layout `dst` (of [`Self::padded_len`]).
    fn pad(self, src: &[f32], channels: usize, dst: &mut [f32]) {
        let (rows, cols, row_len) = (self.rows, self.cols, self.row_len());
        let (planes, tail) = dst.split_at_mut(channels * self.plane_len());
        for (plane, src) in planes
            .chunks_exact_mut(self.plane_len())
            .zip(src.chunks_exact(rows * cols))
        {
            plane[..row_len].fill(0.0);
            for (row, src) in plane[row_len..]
                .chunks_exact_mut(row_len)
                .zip(src.chunks_exact(cols))
            {
                row[0] = 0.0;
                row[1..].copy_from_slice(src);
            }
            plane[(rows + 1) * row_len..].fill(0.0);
        }
        tail.fill(0.0);
    }

    /// The first `channels` flat output planes of `flat` (`out_stride` apart) into `dst`
    /// (`[channels, rows*cols]`), or added to it, without the wasted positions.
    fn unpad(self, flat: &[f32], channels: usize, dst: &mut [f32], accumulate: bool) {
        let (cols, row_len) = (self.cols, self.row_len());
        for (dst, flat) in dst
            .chunks_exact_mut(self.rows * cols)
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

/// 3x3 weights in micro-kernel order: for each block of up to [`CHANNEL_BLOCK`] output
/// channels, `[in_channel][tap][channel in block]`, the output channels rounded up to a multiple
/// of [`CHANNEL_ROUNDING`] with zeros.
struct PackedWeights {
    values: Scratch,
    out_channels: usize,
    in_channels: usize,
}

impl PackedWeights {
    /// The conv's own OIHW `weight` `[out_channels, in_channels, 3, 3]`.
    fn forward(weight: &[f32], out_channels: usize, in_channels: usize) -> Self {
        Self::pack(out_channels, in_channels, |first, block, dst| {
            // The block's rows `[block, C * 9]` transposed, in tiles of `TILE` columns so
            // that the tile's destination stays in L1 while `block` rows are read into it.
            const TILE: usize = 64;
            let rows = &weight[first * in_channels * 9..][..block * in_channels * 9];
            for (tile, dst) in dst.chunks_mut(TILE * block).enumerate() {
                for (i, row) in rows.chunks_exact(in_channels * 9).enumerate() {
                    let src = &row[tile * TILE..][..dst.len() / block];
                    for (k, &value) in src.iter().enumerate() {
                        dst[k * block + i] = value;
                    }
                }
            }
        })
    }

    /// The input gradient's weights for OIHW `weight` `[out_channels, in_channels, 3, 3]`: a
    /// conv from `out_channels` to `in_channels` with every kernel flipped (tap `8 - tap`).
    fn input_gradient(weight: &[f32], out_channels: usize, in_channels: usize) -> Self {
        Self::pack(in_channels, out_channels, |first, block, dst| {
            // Per output channel of the weight, its kernels of input channels `first..`.
            for (o, dst) in dst.chunks_exact_mut(9 * block).enumerate() {
                let kernels = &weight[(o * in_channels + first) * 9..][..block * 9];
                for (i, kernel) in kernels.chunks_exact(9).enumerate() {
                    for (tap, &value) in kernel.iter().enumerate() {
                        dst[(8 - tap) * block + i] = value;
                    }
                }
            }
        })
    }

    /// Packs `out_channels` rounded up, a block per rayon task: `fill(first, channels, dst)`
    /// writes every value of the block of `channels` from `first` into `dst`
    /// (`[in_channels * 9, channels]`); the rounded-up block gets zeros for the channels past
    /// `out_channels`. `in_channels` must not be 0.
    fn pack(
        out_channels: usize,
        in_channels: usize,
        fill: impl Fn(usize, usize, &mut [f32]) + Sync,
    ) -> Self {
        let rounded = out_channels.next_multiple_of(CHANNEL_ROUNDING);
        let mut values = Scratch::take(rounded * in_channels * 9);
        values
            .par_chunks_mut(CHANNEL_BLOCK * in_channels * 9)
            .enumerate()
            .for_each(|(index, dst)| {
                let first = index * CHANNEL_BLOCK;
                let block = dst.len() / (in_channels * 9).max(1);
                let existing = block.min(out_channels.saturating_sub(first));
                if existing == block {
                    fill(first, block, dst);
                } else {
                    // The rounded-up block: pack the existing channels narrower, then spread
                    // them with zeros for the others.
                    let mut narrow = vec![0.0; existing * in_channels * 9];
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

/// All flat output planes `[rounded_out_channels, out_stride]` of one padded image.
fn convolve(
    kernel: Kernel,
    layout: FlatLayout,
    padded: &[f32],
    weights: &PackedWeights,
    flat: &mut [f32],
) {
    let (in_channels, stride) = (weights.in_channels, layout.out_stride());
    // The lengths every micro-kernel call below relies on.
    assert!(padded.len() >= layout.padded_len(in_channels));
    assert!(flat.len() >= weights.rounded_out_channels() * stride);
    assert_eq!(
        weights.values.len(),
        weights.rounded_out_channels() * in_channels * 9
    );
    let args = BlockArgs {
        plane_len: layout.plane_len(),
        row_len: layout.row_len(),
        in_channels,
        out_stride: stride,
    };
    // A block of channels at a time over all positions: its weights (27 KiB for 64 input
    // channels) stay in L1. One thread, micro-kernel alone, three runs: 28x28 maps of 64
    // channels 167-170 -> 168-171 GFLOP/s against positions outer, 14x14 of 128 169-175 ->
    // 172-176.
    for (first, block) in channel_blocks(weights.rounded_out_channels()) {
        for first_pixel in (0..stride).step_by(PIXEL_BLOCK) {
            // SAFETY: block `first_pixel` reads input positions up to
            // `(in_channels - 1) * plane_len + stride + 2 * row_len + 2` (asserted above),
            // `block * in_channels * 9` weights from the block's start, and writes `block` rows
            // of `PIXEL_BLOCK` outputs, `out_stride` apart, inside `flat`.
            unsafe {
                kernel.block(
                    block,
                    padded.as_ptr().add(first_pixel),
                    weights.values.as_ptr().add(first * in_channels * 9),
                    flat.as_mut_ptr().add(first * stride + first_pixel),
                    args,
                );
            }
        }
    }
}

/// Strides of one micro-kernel call.
#[derive(Clone, Copy)]
struct BlockArgs {
    plane_len: usize,
    row_len: usize,
    in_channels: usize,
    out_stride: usize,
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

    /// `out[i * out_stride + j] = sum_c sum_tap weights[(c * 9 + tap) * channels + i] *
    /// input[c * plane_len + ky * row_len + kx + j]` for `i < channels`, `j < PIXEL_BLOCK`.
    ///
    /// # Safety
    /// Those reads and writes must be in bounds, `channels` one of 4, 8 or 12, and `Avx512`
    /// only chosen where the CPU has it ([`Kernel::best`]).
    unsafe fn block(
        self,
        channels: usize,
        input: *const f32,
        weights: *const f32,
        out: *mut f32,
        args: BlockArgs,
    ) {
        match self {
            Self::Portable => portable_block(channels, input, weights, out, args),
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => match channels {
                12 => avx512::block::<12>(input, weights, out, args),
                8 => avx512::block::<8>(input, weights, out, args),
                _ => avx512::block::<4>(input, weights, out, args),
            },
        }
    }
}

/// [`Kernel::block`] in plain Rust.
///
/// # Safety
/// As [`Kernel::block`].
unsafe fn portable_block(
    channels: usize,
    input: *const f32,
    weights: *const f32,
    out: *mut f32,
    args: BlockArgs,
) {
    let mut acc = [[0.0f32; PIXEL_BLOCK]; CHANNEL_BLOCK];
    let mut w = weights;
    for c in 0..args.in_channels {
        for tap in 0..9 {
            let src = input.add(c * args.plane_len + (tap / 3) * args.row_len + tap % 3);
            for acc in &mut acc[..channels] {
                let weight = *w;
                w = w.add(1);
                for (j, acc) in acc.iter_mut().enumerate() {
                    *acc = weight.mul_add(*src.add(j), *acc);
                }
            }
        }
    }
    for (i, acc) in acc[..channels].iter().enumerate() {
        std::ptr::copy_nonoverlapping(acc.as_ptr(), out.add(i * args.out_stride), PIXEL_BLOCK);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{BlockArgs, PIXEL_VECTORS};
    use std::arch::x86_64::*;

    /// [`super::Kernel::block`] for `CHANNELS` output channels: `CHANNELS x PIXEL_VECTORS`
    /// accumulators in registers, each tap one vector load per pixel vector and one broadcast
    /// per channel.
    ///
    /// # Safety
    /// As [`super::Kernel::block`]; the CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block<const CHANNELS: usize>(
        input: *const f32,
        weights: *const f32,
        out: *mut f32,
        args: BlockArgs,
    ) {
        let mut acc = [[_mm512_setzero_ps(); PIXEL_VECTORS]; CHANNELS];
        let mut plane = input;
        let mut w = weights;
        for _ in 0..args.in_channels {
            for ky in 0..3 {
                let row = plane.add(ky * args.row_len);
                for kx in 0..3 {
                    let mut pixels = [_mm512_setzero_ps(); PIXEL_VECTORS];
                    for (j, v) in pixels.iter_mut().enumerate() {
                        *v = _mm512_loadu_ps(row.add(kx + 16 * j));
                    }
                    for acc in acc.iter_mut() {
                        let weight = _mm512_set1_ps(*w);
                        w = w.add(1);
                        for (acc, &v) in acc.iter_mut().zip(&pixels) {
                            *acc = _mm512_fmadd_ps(weight, v, *acc);
                        }
                    }
                }
            }
            plane = plane.add(args.plane_len);
        }
        for (i, acc) in acc.iter().enumerate() {
            for (j, &v) in acc.iter().enumerate() {
                _mm512_storeu_ps(out.add(i * args.out_stride + 16 * j), v);
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

    /// A 3x3, padding-1 conv of one `[C, rows, cols]` image, summed in f64.
    fn reference(
        image: &[f32],
        weight: &[f32],
        o: usize,
        c: usize,
        rows: usize,
        cols: usize,
    ) -> Vec<f32> {
        let mut out = vec![0.0; o * rows * cols];
        for (i, value) in out.iter_mut().enumerate() {
            let (oc, y, x) = (i / (rows * cols), i / cols % rows, i % cols);
            let mut sum = 0.0f64;
            for ic in 0..c {
                for tap in 0..9 {
                    let (iy, ix) = ((y + tap / 3).checked_sub(1), (x + tap % 3).checked_sub(1));
                    if let (Some(iy), Some(ix)) = (iy, ix) {
                        if iy < rows && ix < cols {
                            sum += f64::from(weight[(oc * c + ic) * 9 + tap])
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
        // (out channels, in channels, rows, cols): channel blocks 12 + 4, 12 + 12, 8 and 4 (one
        // rounded up), flat planes ending mid-block, a single row.
        for (o, c, rows, cols) in [(13, 5, 9, 16), (24, 3, 4, 14), (7, 2, 1, 31), (3, 1, 5, 5)] {
            let image = uniform(&mut rng, c * rows * cols);
            let weight = uniform(&mut rng, o * c * 9);
            let want = reference(&image, &weight, o, c, rows, cols);
            let packed = PackedWeights::forward(&weight, o, c);
            for kernel in kernels {
                let mut out = vec![f32::NAN; o * rows * cols];
                convolve_image(kernel, rows, cols, &image, &packed, &mut out, false);
                let err = max_rel_err(&out, &want);
                assert!(err < 1e-5, "{kernel:?} o{o} c{c} {rows}x{cols}: {err}");

                // Accumulating adds the same values onto what is there.
                let mut sum = vec![1.0; o * rows * cols];
                convolve_image(kernel, rows, cols, &image, &packed, &mut sum, true);
                let plus_one: Vec<f32> = want.iter().map(|v| v + 1.0).collect();
                assert!(
                    max_rel_err(&sum, &plus_one) < 1e-5,
                    "{kernel:?} accumulated"
                );
            }
        }
    }

    #[test]
    fn input_gradient_weights_are_the_kernels_transposed_and_flipped() {
        let (o, c) = (5, 3);
        let weight: Vec<f32> = (0..o * c * 9).map(|i| i as f32).collect();
        let packed = PackedWeights::input_gradient(&weight, o, c);
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
    fn takes_3x3_stride_1_maps_from_14_columns_on_the_per_image_path() -> Result<()> {
        let picks = |x: [usize; 4], w: [usize; 4], stride: usize| -> Result<bool> {
            Ok(applies(&ConvGeometry::new(&x, &w, stride, 1)?))
        };
        crate::ops::test_util::on_two_threads(|| {
            let avx512 = Kernel::best() != Kernel::Portable;
            // ResNet-18 at 112x112, batch 16: layer1 and layer2's stride-1 3x3 convs.
            assert_eq!(picks([16, 64, 28, 28], [64, 64, 3, 3], 1)?, avx512);
            assert_eq!(picks([16, 128, 14, 14], [128, 128, 3, 3], 1)?, avx512);
            assert!(!picks([16, 64, 28, 28], [128, 64, 3, 3], 2)?); // strided
            assert!(!picks([16, 128, 12, 12], [128, 128, 3, 3], 1)?); // narrow
            assert!(!picks([16, 256, 7, 7], [256, 256, 3, 3], 1)?); // batch-wide path
            assert!(!picks([1, 64, 28, 28], [64, 64, 3, 3], 1)?); // one image, two threads
            Ok(())
        })
    }
}
