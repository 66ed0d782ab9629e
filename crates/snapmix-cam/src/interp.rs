//! Linear-interpolation taps computed exactly as PyTorch's CPU `upsample_bilinear2d` does
//! (f32 scale, source index, floor and lambdas), so our maps match it bit for bit in most pixels.

/// For every output position along one axis: the two source indices and their weights. Shared
/// with `snapmix-mix`'s patch resize so both crates interpolate with PyTorch's exact arithmetic.
#[derive(Debug, Clone)]
pub struct Taps {
    /// The lower source index of each output position.
    pub i0: Vec<usize>,
    /// The upper source index (equal to `i0` at the last source sample).
    pub i1: Vec<usize>,
    /// The weight of `i0`.
    pub w0: Vec<f32>,
    /// The weight of `i1` (`1 - w0`).
    pub w1: Vec<f32>,
}

impl Taps {
    /// Taps resizing an axis of `in_size` samples to `out_size` samples. `align_corners = false`
    /// treats pixels as areas (the CAM upsample); `true` maps the corner centres onto each other
    /// (the official SnapMix patch resize). Both sizes must be at least 1.
    pub fn new(in_size: usize, out_size: usize, align_corners: bool) -> Self {
        let scale = if align_corners {
            if out_size > 1 {
                (in_size - 1) as f32 / (out_size - 1) as f32
            } else {
                0.0
            }
        } else {
            in_size as f32 / out_size as f32
        };
        let mut taps = Self {
            i0: Vec::with_capacity(out_size),
            i1: Vec::with_capacity(out_size),
            w0: Vec::with_capacity(out_size),
            w1: Vec::with_capacity(out_size),
        };
        for dst in 0..out_size {
            let src = if align_corners {
                scale * dst as f32
            } else {
                (scale * (dst as f32 + 0.5) - 0.5).max(0.0)
            };
            let i0 = (src.floor() as usize).min(in_size - 1);
            let lambda1 = (src - i0 as f32).clamp(0.0, 1.0);
            taps.i0.push(i0);
            taps.i1.push(if i0 < in_size - 1 { i0 + 1 } else { i0 });
            taps.w0.push(1.0 - lambda1);
            taps.w1.push(lambda1);
        }
        taps
    }

    /// For each source index, the summed weight it receives from outputs `range` (f64, for
    /// exact box sums of an interpolated map without materialising it).
    pub(crate) fn source_weights(&self, in_size: usize, range: std::ops::Range<usize>) -> Vec<f64> {
        let mut weights = vec![0.0f64; in_size];
        for dst in range {
            weights[self.i0[dst]] += f64::from(self.w0[dst]);
            weights[self.i1[dst]] += f64::from(self.w1[dst]);
        }
        weights
    }

    /// Output positions where the interpolated value can reach an extreme: the first and last
    /// position reading each source interval (values in between are convex combinations).
    pub(crate) fn extreme_positions(&self) -> Vec<usize> {
        let n = self.i0.len();
        (0..n)
            .filter(|&d| {
                d == 0 || d + 1 == n || self.i0[d - 1] != self.i0[d] || self.i0[d + 1] != self.i0[d]
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn align_corners_false_matches_pytorch_half_pixel_rule() {
        // 2 -> 4: sources -0.25 (clamped to 0), 0.25, 0.75, 1.25 (index 1, lambda 0.25, i1 = 1).
        let taps = Taps::new(2, 4, false);
        assert_eq!(taps.i0, vec![0, 0, 0, 1]);
        assert_eq!(taps.i1, vec![1, 1, 1, 1]);
        assert_eq!(taps.w1, vec![0.0, 0.25, 0.75, 0.25]);
    }

    #[test]
    fn align_corners_true_hits_both_ends() {
        let taps = Taps::new(3, 5, true);
        assert_eq!(taps.i0, vec![0, 0, 1, 1, 2]);
        assert_eq!(taps.w1, vec![0.0, 0.5, 0.0, 0.5, 0.0]);
        let single = Taps::new(7, 1, true);
        assert_eq!((single.i0[0], single.w1[0]), (0, 0.0));
    }

    #[test]
    fn source_weights_sum_to_the_number_of_outputs() {
        let taps = Taps::new(14, 448, false);
        let total: f64 = taps.source_weights(14, 0..448).iter().sum();
        assert!((total - 448.0).abs() < 1e-9);
    }
}
