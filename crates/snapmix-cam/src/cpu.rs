//! Fused CPU kernels over contiguous f32 slices: the gather-matvec CAM, the one-pass
//! upsample + normalise, and box sums read straight from the low-resolution CAM.
//!
//! Each kernel has a composed-candle twin in `composed.rs` that tests compare it against; a GPU
//! twin would take the same slices' device counterparts.

use crate::interp::Taps;
use crate::PixelBox;
use rayon::prelude::*;

/// How one sample's upsampled CAM is normalised: `spm = (cam_up - min) / sum`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Norm {
    /// Minimum of the upsampled CAM.
    pub min: f32,
    /// Sum of `cam_up - min` over the image.
    pub sum: f64,
    /// The SPM is undefined: the sum is zero (constant CAM) or not finite.
    pub degenerate: bool,
}

/// The CAM of each sample's own class, `cam[b, p] = bias[b] + sum_c relu(features[b, c, p]) *
/// rows[b, c]`, where `rows`/`bias` are the classifier rows already gathered for each label.
/// Reads each feature once and computes only the B needed maps, never all K.
pub(crate) fn gather_cam(
    features: &[f32],
    class_rows: &[f32],
    class_bias: &[f32],
    channels: usize,
    pixels: usize,
) -> Vec<f32> {
    let mut cam = vec![0.0f32; class_bias.len() * pixels];
    cam.par_chunks_mut(pixels).enumerate().for_each(|(b, acc)| {
        let sample = &features[b * channels * pixels..(b + 1) * channels * pixels];
        let weights = &class_rows[b * channels..(b + 1) * channels];
        for (plane, &weight) in sample.chunks_exact(pixels).zip(weights) {
            for (a, &f) in acc.iter_mut().zip(plane) {
                *a += f.max(0.0) * weight;
            }
        }
        let bias = class_bias[b];
        acc.iter_mut().for_each(|a| *a += bias);
    });
    cam
}

/// Bilinear geometry of one CAM-to-image upsample (`align_corners = false`).
#[derive(Debug, Clone)]
pub(crate) struct Upsample {
    pub h: usize,
    pub w: usize,
    pub rows: usize,
    pub cols: usize,
    row_taps: Taps,
    col_taps: Taps,
}

impl Upsample {
    pub(crate) fn new(h: usize, w: usize, rows: usize, cols: usize) -> Self {
        Self {
            h,
            w,
            rows,
            cols,
            row_taps: Taps::new(h, rows, false),
            col_taps: Taps::new(w, cols, false),
        }
    }

    /// Every CAM row interpolated along the columns: `[h, cols]`. PyTorch interpolates the
    /// inner axis first, so reusing these rows reproduces its arithmetic exactly.
    fn column_pass(&self, cam: &[f32]) -> Vec<f32> {
        let taps = &self.col_taps;
        let mut out = Vec::with_capacity(self.h * self.cols);
        for row in cam.chunks_exact(self.w) {
            out.extend(
                (0..self.cols).map(|c| row[taps.i0[c]] * taps.w0[c] + row[taps.i1[c]] * taps.w1[c]),
            );
        }
        out
    }

    /// One output row from the column-interpolated rows.
    #[inline]
    fn output_row<'a>(&'a self, colint: &'a [f32], r: usize) -> impl Iterator<Item = f32> + 'a {
        let t = &self.row_taps;
        let (w0, w1) = (t.w0[r], t.w1[r]);
        let top = &colint[t.i0[r] * self.cols..(t.i0[r] + 1) * self.cols];
        let bottom = &colint[t.i1[r] * self.cols..(t.i1[r] + 1) * self.cols];
        top.iter().zip(bottom).map(move |(&a, &b)| a * w0 + b * w1)
    }

    /// Sum of the upsampled (not yet shifted) CAM over `bbox`, from the low-resolution map and
    /// the summed interpolation weights, in f64.
    pub(crate) fn box_sum_raw(&self, cam: &[f32], bbox: PixelBox) -> f64 {
        if bbox.area() == 0 {
            return 0.0;
        }
        let row_weights = self.row_taps.source_weights(self.h, bbox.row0..bbox.row1);
        let col_weights = self.col_taps.source_weights(self.w, bbox.col0..bbox.col1);
        cam.chunks_exact(self.w)
            .zip(&row_weights)
            .filter(|(_, &rw)| rw != 0.0)
            .map(|(row, &rw)| {
                rw * row
                    .iter()
                    .zip(&col_weights)
                    .map(|(&v, &cw)| f64::from(v) * cw)
                    .sum::<f64>()
            })
            .sum()
    }

    /// Sum of the SPM over `bbox` (NaN for a degenerate sample, as the official 0/0 gives).
    pub(crate) fn box_sum(&self, cam: &[f32], norm: Norm, bbox: PixelBox) -> f64 {
        if norm.degenerate {
            return f64::NAN;
        }
        (self.box_sum_raw(cam, bbox) - f64::from(norm.min) * bbox.area() as f64) / norm.sum
    }

    /// The normalisation of one sample: the minimum over the only output rows where it can
    /// occur, and the sum from the weights (no full-resolution pass).
    fn norm(&self, cam: &[f32], colint: &[f32], extreme_rows: &[usize]) -> Norm {
        let (lo, hi) = cam
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
        let finite = cam.iter().all(|v| v.is_finite());
        let min = extreme_rows
            .iter()
            .flat_map(|&r| self.output_row(colint, r))
            .fold(f32::INFINITY, f32::min);
        let total = self.box_sum_raw(cam, PixelBox::full(self.rows, self.cols));
        let sum = total - f64::from(min) * (self.rows * self.cols) as f64;
        // A constant CAM is mathematically 0/0; rounding in the upsample must not turn it into noise.
        let degenerate = !finite || lo == hi || !(sum > 0.0 && sum.is_finite());
        Norm {
            min,
            sum,
            degenerate,
        }
    }

    /// Prepares a batch of CAMs `[B, h, w]` for normalisation: every CAM row interpolated
    /// along the columns (`[B, h, cols]`, small) and each sample's min and sum. Enough for box
    /// sums; the full-size maps are written only if asked for ([`Upsample::write`]).
    pub(crate) fn prepare(&self, cam: &[f32]) -> (Vec<f32>, Vec<Norm>) {
        let plane = self.h * self.w;
        let extreme_rows = self.row_taps.extreme_positions();
        let prepared: Vec<(Vec<f32>, Norm)> = cam
            .par_chunks(plane)
            .map(|sample| {
                let colint = self.column_pass(sample);
                let norm = self.norm(sample, &colint, &extreme_rows);
                (colint, norm)
            })
            .collect();
        let norms = prepared.iter().map(|(_, n)| *n).collect();
        (prepared.into_iter().flat_map(|(c, _)| c).collect(), norms)
    }

    /// Writes the SPMs `[B, rows, cols]` in a single pass from [`Upsample::prepare`]'s output;
    /// degenerate samples are left all zero.
    pub(crate) fn write(&self, colint: &[f32], norms: &[Norm]) -> Vec<f32> {
        let per_sample = self.h * self.cols;
        let mut maps = vec![0.0f32; norms.len() * self.rows * self.cols];
        maps.par_chunks_mut(self.cols)
            .with_min_len(16)
            .enumerate()
            .for_each(|(g, out)| {
                let b = g / self.rows;
                let norm = norms[b];
                if norm.degenerate {
                    return;
                }
                let colint = &colint[b * per_sample..(b + 1) * per_sample];
                let scale = (1.0 / norm.sum) as f32;
                for (o, v) in out.iter_mut().zip(self.output_row(colint, g % self.rows)) {
                    *o = ((v - norm.min) * scale).max(0.0);
                }
            });
        maps
    }

    /// [`Upsample::prepare`] then [`Upsample::write`].
    #[cfg(test)]
    pub(crate) fn spm(&self, cam: &[f32]) -> (Vec<f32>, Vec<Norm>) {
        let (colint, norms) = self.prepare(cam);
        (self.write(&colint, &norms), norms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_cam_is_relu_dot_plus_bias() {
        // 2 samples, 2 channels, 2 pixels.
        let features = [1.0, -1.0, 2.0, 3.0, /* sample 1 */ -5.0, 4.0, 1.0, 1.0];
        let rows = [1.0, 10.0, /* sample 1 */ 2.0, -1.0];
        let bias = [0.5, -0.5];
        let cam = gather_cam(&features, &rows, &bias, 2, 2);
        assert_eq!(
            cam,
            vec![1.0 + 20.0 + 0.5, 30.0 + 0.5, -1.0 - 0.5, 8.0 - 1.0 - 0.5]
        );
    }

    #[test]
    fn spm_sums_to_one_and_min_is_zero() {
        let up = Upsample::new(3, 2, 13, 7);
        let cam = [0.3, -1.0, 2.0, 0.7, 0.1, 5.0];
        let (maps, norms) = up.spm(&cam);
        assert!(!norms[0].degenerate);
        let sum: f64 = maps.iter().map(|&v| f64::from(v)).sum();
        assert!((sum - 1.0).abs() < 1e-5, "{sum}");
        let min = maps.iter().copied().fold(f32::INFINITY, f32::min);
        assert_eq!(min, 0.0);
        let full = up.box_sum(&cam, norms[0], PixelBox::full(13, 7));
        assert!((full - 1.0).abs() < 1e-9);
        let part = up.box_sum(&cam, norms[0], PixelBox::new(2, 1, 9, 5));
        let direct: f64 = (2..9)
            .flat_map(|r| (1..5).map(move |c| (r, c)))
            .map(|(r, c)| f64::from(maps[r * 7 + c]))
            .sum();
        assert!((part - direct).abs() < 1e-6, "{part} vs {direct}");
    }

    #[test]
    fn constant_and_non_finite_cams_are_degenerate() {
        let up = Upsample::new(2, 2, 5, 5);
        let cam = [3.0, 3.0, 3.0, 3.0, 0.0, f32::NAN, 1.0, 2.0];
        let (maps, norms) = up.spm(&cam);
        assert!(norms[0].degenerate && norms[1].degenerate);
        assert!(maps.iter().all(|&v| v == 0.0));
        assert!(up
            .box_sum(&cam[..4], norms[0], PixelBox::full(5, 5))
            .is_nan());
    }
}
