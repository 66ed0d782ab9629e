//! The fused CPU mixing kernel: every output image plane is written once, row by row, copying
//! the input outside the pasted box and resampling the partner inside it.

use crate::apply::Paste;
use candle_core::{DType, Storage, Tensor};
use rayon::prelude::*;
use snapmix_cam::PixelBox;

/// Mixes `images` `[B, channels, rows, cols]` by `pastes`; `None` when the tensor is not a CPU
/// f32 tensor (the caller then uses the composed path).
pub(crate) fn mix_images(images: &Tensor, pastes: &[Paste]) -> candle_core::Result<Option<Tensor>> {
    if !images.device().is_cpu() || images.dtype() != DType::F32 {
        return Ok(None);
    }
    let (batch, channels, rows, cols) = images.dims4()?;
    let images = images.contiguous()?;
    let mixed = {
        let (storage, layout) = images.storage_and_layout();
        let Storage::Cpu(storage) = &*storage else {
            return Ok(None);
        };
        let start = layout.start_offset();
        let data = &storage.as_slice::<f32>()?[start..start + batch * channels * rows * cols];
        mix_planes(data, pastes, channels, rows, cols)
    };
    Ok(Some(Tensor::from_vec(
        mixed,
        (batch, channels, rows, cols),
        images.device(),
    )?))
}

/// The kernel over a contiguous slice.
fn mix_planes(
    images: &[f32],
    pastes: &[Paste],
    channels: usize,
    rows: usize,
    cols: usize,
) -> Vec<f32> {
    let plane = rows * cols;
    let resizes: Vec<Option<Resize>> = pastes
        .iter()
        .map(|p| match *p {
            Paste::Region { from, to, .. } => Some(Resize::new(from, to)),
            _ => None,
        })
        .collect();
    let mut out = vec![0.0f32; images.len()];
    out.par_chunks_mut(plane).enumerate().for_each(|(g, dst)| {
        let (b, channel) = (g / channels, g % channels);
        let own = &images[g * plane..(g + 1) * plane];
        let partner_plane = |p: usize| {
            &images[(p * channels + channel) * plane..(p * channels + channel + 1) * plane]
        };
        match pastes[b] {
            Paste::Keep => dst.copy_from_slice(own),
            Paste::Zero(bbox) => {
                dst.copy_from_slice(own);
                for r in bbox.row0..bbox.row1 {
                    dst[r * cols + bbox.col0..r * cols + bbox.col1].fill(0.0);
                }
            }
            Paste::Blend { partner, lam } => {
                // As PyTorch: `x * lam + x_b * (1 - lam)` with both scalars rounded to f32.
                let (wa, wb) = (lam as f32, (1.0 - lam) as f32);
                for ((d, &a), &p) in dst.iter_mut().zip(own).zip(partner_plane(partner)) {
                    *d = a * wa + p * wb;
                }
            }
            Paste::Region { partner, to, .. } => {
                let resize = resizes[b]
                    .as_ref()
                    .expect("a resize is prepared for every region paste");
                let src = partner_plane(partner);
                for (r, (d, o)) in dst
                    .chunks_exact_mut(cols)
                    .zip(own.chunks_exact(cols))
                    .enumerate()
                {
                    if r < to.row0 || r >= to.row1 {
                        d.copy_from_slice(o);
                        continue;
                    }
                    d[..to.col0].copy_from_slice(&o[..to.col0]);
                    d[to.col1..].copy_from_slice(&o[to.col1..]);
                    resize.row(src, cols, r - to.row0, &mut d[to.col0..to.col1]);
                }
            }
        }
    });
    out
}

/// Bilinear resize of a partner box into the target box with `align_corners = true`, as the
/// official code's `F.interpolate` of the cut patch (PyTorch's f32 arithmetic and order).
struct Resize {
    from: PixelBox,
    same_size: bool,
    row_taps: Taps,
    col_taps: Taps,
}

impl Resize {
    fn new(from: PixelBox, to: PixelBox) -> Self {
        Self {
            from,
            same_size: from.rows() == to.rows() && from.cols() == to.cols(),
            row_taps: Taps::align_corners(from.rows(), to.rows()),
            col_taps: Taps::align_corners(from.cols(), to.cols()),
        }
    }

    /// Writes output row `r` of the box (relative to its top) from the partner plane `src`.
    #[inline]
    fn row(&self, src: &[f32], cols: usize, r: usize, out: &mut [f32]) {
        let line = |i: usize| {
            let start = (self.from.row0 + i) * cols + self.from.col0;
            &src[start..start + self.from.cols()]
        };
        if self.same_size {
            out.copy_from_slice(line(r));
            return;
        }
        let (top, bottom) = (line(self.row_taps.i0[r]), line(self.row_taps.i1[r]));
        let (rw0, rw1) = (self.row_taps.w0[r], self.row_taps.w1[r]);
        let t = &self.col_taps;
        for (c, o) in out.iter_mut().enumerate() {
            let (j0, j1, cw0, cw1) = (t.i0[c], t.i1[c], t.w0[c], t.w1[c]);
            *o =
                (top[j0] * cw0 + top[j1] * cw1) * rw0 + (bottom[j0] * cw0 + bottom[j1] * cw1) * rw1;
        }
    }
}

/// Source indices and weights of one axis, computed as PyTorch's CPU kernel does in f32.
struct Taps {
    i0: Vec<usize>,
    i1: Vec<usize>,
    w0: Vec<f32>,
    w1: Vec<f32>,
}

impl Taps {
    /// `align_corners = true`: output `d` reads source `d * (in - 1) / (out - 1)`.
    fn align_corners(in_size: usize, out_size: usize) -> Self {
        let scale = if out_size > 1 {
            (in_size - 1) as f32 / (out_size - 1) as f32
        } else {
            0.0
        };
        let mut taps = Self {
            i0: Vec::with_capacity(out_size),
            i1: Vec::with_capacity(out_size),
            w0: Vec::with_capacity(out_size),
            w1: Vec::with_capacity(out_size),
        };
        for d in 0..out_size {
            let src = scale * d as f32;
            let i0 = (src.floor() as usize).min(in_size - 1);
            let lambda1 = (src - i0 as f32).clamp(0.0, 1.0);
            taps.i0.push(i0);
            taps.i1.push(if i0 < in_size - 1 { i0 + 1 } else { i0 });
            taps.w0.push(1.0 - lambda1);
            taps.w1.push(lambda1);
        }
        taps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn align_corners_taps_hit_both_ends() {
        let t = Taps::align_corners(3, 5);
        assert_eq!(t.i0, vec![0, 0, 1, 1, 2]);
        assert_eq!(t.w1, vec![0.0, 0.5, 0.0, 0.5, 0.0]);
        let single = Taps::align_corners(4, 1);
        assert_eq!((single.i0[0], single.w1[0]), (0, 0.0));
    }

    #[test]
    fn region_paste_upsamples_the_partner_box() {
        // Two 1-channel 3x3 images; sample 0 gets sample 1's top-left 2x2 box stretched to 3x3.
        let own = [0.0f32; 9];
        let partner = [1.0, 2.0, 9.0, 3.0, 4.0, 9.0, 9.0, 9.0, 9.0];
        let images: Vec<f32> = own.iter().chain(&partner).copied().collect();
        let pastes = [
            Paste::Region {
                partner: 1,
                from: PixelBox::new(0, 0, 2, 2),
                to: PixelBox::new(0, 0, 3, 3),
            },
            Paste::Keep,
        ];
        let out = mix_planes(&images, &pastes, 1, 3, 3);
        assert_eq!(&out[..9], &[1.0, 1.5, 2.0, 2.0, 2.5, 3.0, 3.0, 3.5, 4.0]);
        assert_eq!(&out[9..], &partner);
    }
}
