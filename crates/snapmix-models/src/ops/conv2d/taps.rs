//! Stride-1 convolutions on small feature maps without im2col: one GEMM per kernel tap (per
//! output row when the tap shifts columns) on a pixel-major, batch-innermost layout
//! `[C, pixels * N]`, where the output pixels a tap sees inside the image are contiguous runs of
//! columns. im2col multiplies the zero padding too: 5/9 of its work on a 2x2 map, 3/10 on 4x4.

use super::super::cpu::{matmul_serial_into_block, min_planes_per_task, zeros, MatRef, Scratch};
use super::ConvGeometry;
use candle_core::Result;
use rayon::prelude::*;

/// Output pixels per image up to which [`applies`] picks tap GEMMs; on larger maps the
/// padding is a small share of im2col's work and the per-row GEMMs get too many.
const MAX_OUT_PIXELS: usize = 64;

/// Images from which [`applies`] picks tap GEMMs. A run has `batch` columns per pixel, and every
/// run re-packs its tap's weights: at batch 8 the runs were too short for that to pay
/// (ResNet-50 at 64x64 ran 3% slower than with im2col), at batch 32 ResNet-18 ran 10% faster.
const MIN_BATCH: usize = 16;

/// Input x output channels of a tap's weight slice up to which [`applies`] picks tap GEMMs on
/// any small map: every run re-reads its tap's `[O, C]` slice, which at 256 KiB stays in the
/// core's L2. Per-op timers, ResNet-18: 3x3 convs of 128 and 256 channels ran 9-25% faster as
/// tap GEMMs on 8x8, 7x7 and 4x4 maps, 512 channels on 4x4 at batch 16 11% slower.
const MAX_CACHED_TAP_WEIGHTS: usize = 256 * 256;

/// Whether `g` runs as tap GEMMs: a stride-1 conv with channels and a kernel larger than 1x1 on
/// a map of at most [`MAX_OUT_PIXELS`] output pixels, for at least [`MIN_BATCH`] images; with
/// weight slices larger than [`MAX_CACHED_TAP_WEIGHTS`] only where im2col would multiply
/// padding at least half the time (2x2 maps: 21% faster at 512 channels, batch 32).
pub(super) fn applies(g: &ConvGeometry) -> bool {
    if g.stride != 1
        || g.in_channels * g.out_channels == 0
        || g.kernel_rows * g.kernel_cols == 1
        || g.out_pixels() > MAX_OUT_PIXELS
        || g.batch < MIN_BATCH
    {
        return false;
    }
    if g.out_channels * g.in_channels <= MAX_CACHED_TAP_WEIGHTS {
        return true;
    }
    let im2col_columns = g.kernel_rows * g.kernel_cols * g.out_pixels() * g.batch;
    2 * runs(g).iter().map(|run| run.len).sum::<usize>() <= im2col_columns
}

/// One contiguous run of pixel-major columns through which a kernel tap maps input to output:
/// output columns `output..output + len` see input columns `input..input + len`.
struct Run {
    tap: usize,
    input: usize,
    output: usize,
    len: usize,
}

/// The runs of every tap: one per tap when it keeps columns (and the map keeps its width),
/// else one per output row that sees the image.
fn runs(g: &ConvGeometry) -> Vec<Run> {
    // Output index `i` of an axis of `size` inputs sees input `i + k - padding`.
    let valid = |k: usize, size: usize, out: usize| {
        let lo = g.padding.saturating_sub(k).min(out);
        (lo, (size + g.padding).saturating_sub(k).min(out).max(lo))
    };
    let n = g.batch;
    let mut runs = Vec::new();
    for kernel_row in 0..g.kernel_rows {
        let (row_lo, row_hi) = valid(kernel_row, g.rows, g.out_rows);
        for kernel_col in 0..g.kernel_cols {
            let (col_lo, col_hi) = valid(kernel_col, g.cols, g.out_cols);
            if row_lo == row_hi || col_lo == col_hi {
                continue;
            }
            let tap = kernel_row * g.kernel_cols + kernel_col;
            let input_pixel = |out_row: usize, out_col: usize| {
                (out_row + kernel_row - g.padding) * g.cols + out_col + kernel_col - g.padding
            };
            if col_hi - col_lo == g.cols && g.out_cols == g.cols {
                runs.push(Run {
                    tap,
                    input: input_pixel(row_lo, col_lo) * n,
                    output: row_lo * g.out_cols * n,
                    len: (row_hi - row_lo) * g.out_cols * n,
                });
                continue;
            }
            for out_row in row_lo..row_hi {
                runs.push(Run {
                    tap,
                    input: input_pixel(out_row, col_lo) * n,
                    output: (out_row * g.out_cols + col_lo) * n,
                    len: (col_hi - col_lo) * n,
                });
            }
        }
    }
    runs
}

/// Tap `tap` of the OIHW weight as an `[O, C]` matrix.
fn tap_weight<'a>(g: &ConvGeometry, weight: &'a [f32], tap: usize) -> MatRef<'a> {
    let taps = g.kernel_rows * g.kernel_cols;
    MatRef::strided(
        &weight[tap..],
        g.out_channels,
        g.in_channels,
        g.in_channels * taps,
        taps,
    )
}

/// The OIHW weight as `[C, taps, O]`: each tap's transpose `W_tap^T [C, O]` with unit column
/// stride. The input-gradient GEMMs, copy included, ran 1.4-1.8x faster on it than on the
/// transposed OIHW view, whose reduction (over O) strides across `C * taps` values.
fn transposed_by_tap(g: &ConvGeometry, weight: &[f32]) -> Vec<f32> {
    // Tiles of 8 input channels (all taps) x 16 output channels: each destination row gets 16
    // contiguous values, a cache line, at a time. Scattering one value to each of a block's
    // rows, 4*O bytes apart, thrashed a few L1 sets and ran 3x slower (512 channels).
    const CHANNELS_PER_BLOCK: usize = 8;
    const OUT_CHANNELS_PER_TILE: usize = 16;
    let (o, c, taps) = (g.out_channels, g.in_channels, g.kernel_rows * g.kernel_cols);
    let mut by_tap = Vec::with_capacity(weight.len());
    by_tap
        .spare_capacity_mut()
        .par_chunks_mut(CHANNELS_PER_BLOCK * taps * o)
        .enumerate()
        .for_each(|(block, dst)| {
            // The block's `channels * taps` values sit at this offset of every weight row.
            let offset = block * CHANNELS_PER_BLOCK * taps;
            for tile in (0..o).step_by(OUT_CHANNELS_PER_TILE) {
                let tile_len = OUT_CHANNELS_PER_TILE.min(o - tile);
                for (i, dst_row) in dst.chunks_exact_mut(o).enumerate() {
                    let src = weight[(tile * c * taps + offset + i)..]
                        .iter()
                        .step_by(c * taps);
                    for (d, &value) in dst_row[tile..tile + tile_len].iter_mut().zip(src) {
                        d.write(value);
                    }
                }
            }
        });
    // SAFETY: every block writes all its rows' `o` values, so all `weight.len()` are written.
    unsafe { by_tap.set_len(weight.len()) };
    by_tap
}

/// GEMM rows per rayon task for a GEMM of `rows` rows: one task per thread, in multiples of 16.
fn rows_per_thread(rows: usize) -> usize {
    rows.div_ceil(rayon::current_num_threads())
        .next_multiple_of(16)
}

/// Output channels per forward task: on the OIHW view, whose packing is the cost on these
/// small maps, 64-row GEMMs beat one task per thread by up to 1.6x (2x2 maps, 512 channels).
const FORWARD_ROWS_PER_TASK: usize = 64;

/// Forward: `out[:, output run] += W_tap [O, C] * x[:, input run]` over every run; also returns
/// the input in the pixel-major layout `[C, P * N]` that [`backward`]'s weight gradient reads.
pub(super) fn forward(g: &ConvGeometry, x: &[f32], weight: &[f32]) -> Result<(Vec<f32>, Scratch)> {
    let (in_len, out_len) = (g.image_pixels() * g.batch, g.out_pixels() * g.batch);
    let x_pm = to_pixel_major(x, g.batch, g.in_channels, g.image_pixels());
    let runs = runs(g);
    let mut out_pm = Scratch::take(g.out_channels * out_len);
    let weight = |tap| tap_weight(g, weight, tap);
    let out = (&mut out_pm[..], out_len);
    let input = MatRef::row_major(&x_pm, g.in_channels, in_len);
    sum_over_runs(&runs, false, weight, input, out, FORWARD_ROWS_PER_TASK)?;
    let out = from_pixel_major(&out_pm, g.batch, g.out_channels, g.out_pixels());
    Ok((out, x_pm))
}

/// Backward: `grad_W_tap += dY[:, output run] x[:, input run]^T` over every run, and (for
/// `Some(grad_x)`, added to it when `accumulate`) `dX[:, input run] += W_tap^T dY[:, output run]`.
/// `x_pm`: the pixel-major input from [`forward`], if kept (else built here).
pub(super) fn backward(
    g: &ConvGeometry,
    x: &[f32],
    weight: &[f32],
    grad_out: &[f32],
    grad_x: Option<(&mut [f32], bool)>,
    x_pm: Option<&[f32]>,
) -> Result<Vec<f32>> {
    let (c, o, taps) = (g.in_channels, g.out_channels, g.kernel_rows * g.kernel_cols);
    let (in_len, out_len) = (g.image_pixels() * g.batch, g.out_pixels() * g.batch);
    let runs = runs(g);
    let dy_pm = to_pixel_major(grad_out, g.batch, o, g.out_pixels());
    let dy_pm = MatRef::row_major(&dy_pm, o, out_len);

    let grad_w = {
        let built;
        let x_pm = match x_pm {
            Some(kept) if kept.len() == c * in_len => kept,
            _ => {
                built = to_pixel_major(x, g.batch, c, g.image_pixels());
                &built[..]
            }
        };
        let x_pm = MatRef::row_major(x_pm, c, in_len);
        // Per output channel, tap-major `[taps, C]` (each tap's block has unit column stride),
        // reordered to OIHW's `[C, taps]` by the task that computed it.
        let task_rows = rows_per_thread(o);
        // Written once, by the reorder, so never zero-filled first.
        let mut grad_w = Vec::with_capacity(o * c * taps);
        grad_w
            .spare_capacity_mut()
            .par_chunks_mut(task_rows * c * taps)
            .enumerate()
            .try_for_each(|(task, grad_w)| -> Result<()> {
                let rows = grad_w.len() / (c * taps);
                let dy = dy_pm.row_range(task * task_rows, rows);
                let mut by_tap = Scratch::take(grad_w.len());
                // A tap's first run writes its block, later ones add; a tap without runs (it
                // sees only padding) has a zero gradient.
                let mut written = vec![false; taps];
                for run in &runs {
                    matmul_serial_into_block(
                        &mut by_tap[run.tap * c..],
                        c * taps,
                        written[run.tap],
                        dy.columns(run.output, run.len),
                        x_pm.columns(run.input, run.len).t(),
                    )?;
                    written[run.tap] = true;
                }
                for row in by_tap.chunks_exact_mut(c * taps) {
                    for (block, _) in row.chunks_exact_mut(c).zip(&written).filter(|(_, w)| !**w) {
                        block.fill(0.0);
                    }
                }
                for (dst, src) in grad_w
                    .chunks_exact_mut(c * taps)
                    .zip(by_tap.chunks_exact(c * taps))
                {
                    for (channel, dst) in dst.chunks_exact_mut(taps).enumerate() {
                        for (tap, d) in dst.iter_mut().enumerate() {
                            d.write(src[tap * c + channel]);
                        }
                    }
                }
                Ok(())
            })?;
        // SAFETY: the tasks above cover all `o * c * taps` values (every row, every channel
        // and tap of it).
        unsafe { grad_w.set_len(o * c * taps) };
        grad_w
    };

    if let Some((grad_x, accumulate)) = grad_x {
        let weight_t = transposed_by_tap(g, weight);
        let weight_t = |tap| MatRef::strided(&weight_t[tap * o..], c, o, taps * o, 1);
        let mut dx_pm = Scratch::take(c * in_len);
        let dx = (&mut dx_pm[..], in_len);
        sum_over_runs(&runs, true, weight_t, dy_pm, dx, rows_per_thread(c))?;
        write_from_pixel_major(&dx_pm, g.batch, c, g.image_pixels(), grad_x, accumulate);
    }
    Ok(grad_w)
}

/// `dst[:, to] += by_tap(run.tap) * src[:, from]` over every run, with `(from, to)` the run's
/// input and output columns, or for the `adjoint` map (the input gradient) its output and input
/// ones; `dst` (`by_tap`'s rows of `dst_cols` pixel-major columns) is zeroed first, then filled
/// in tasks of `task_rows` rows.
fn sum_over_runs<'a>(
    runs: &[Run],
    adjoint: bool,
    by_tap: impl Fn(usize) -> MatRef<'a> + Sync,
    src: MatRef,
    (dst, dst_cols): (&mut [f32], usize),
    task_rows: usize,
) -> Result<()> {
    if dst.is_empty() {
        return Ok(());
    }
    dst.par_chunks_mut(task_rows.max(1) * dst_cols)
        .enumerate()
        .try_for_each(|(task, dst)| {
            dst.fill(0.0);
            let rows = dst.len() / dst_cols;
            runs.iter().try_for_each(|run| {
                let (from, to) = if adjoint {
                    (run.output, run.input)
                } else {
                    (run.input, run.output)
                };
                let lhs = by_tap(run.tap).row_range(task * task_rows, rows);
                let rhs = src.columns(from, run.len);
                matmul_serial_into_block(&mut dst[to..], dst_cols, true, lhs, rhs)
            })
        })
}

/// NCHW `[N, C, P]` -> pixel-major `[C, P, N]`.
fn to_pixel_major(src: &[f32], batch: usize, channels: usize, pixels: usize) -> Scratch {
    let mut dst = Scratch::take(batch * channels * pixels);
    dst.par_chunks_mut(pixels * batch)
        .enumerate()
        .with_min_len(min_planes_per_task(pixels * batch))
        .for_each(|(channel, dst)| {
            for n in 0..batch {
                let plane = &src[(n * channels + channel) * pixels..][..pixels];
                for (pixel, &value) in plane.iter().enumerate() {
                    dst[pixel * batch + n] = value;
                }
            }
        });
    dst
}

/// Pixel-major `[C, P, N]` -> a new NCHW `[N, C, P]` buffer.
fn from_pixel_major(src: &[f32], batch: usize, channels: usize, pixels: usize) -> Vec<f32> {
    let mut dst = zeros(batch * channels * pixels);
    write_from_pixel_major(src, batch, channels, pixels, &mut dst, false);
    dst
}

/// Writes (or, when `accumulate`, adds) pixel-major `[C, P, N]` into NCHW `dst`.
fn write_from_pixel_major(
    src: &[f32],
    batch: usize,
    channels: usize,
    pixels: usize,
    dst: &mut [f32],
    accumulate: bool,
) {
    dst.par_chunks_mut(pixels)
        .enumerate()
        .with_min_len(min_planes_per_task(pixels))
        .for_each(|(plane, dst)| {
            let (n, channel) = (plane / channels, plane % channels);
            let src = &src[channel * pixels * batch + n..];
            for (pixel, d) in dst.iter_mut().enumerate() {
                let value = src[pixel * batch];
                *d = if accumulate { *d + value } else { value };
            }
        });
}
