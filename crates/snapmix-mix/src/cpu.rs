//! The fused CPU mixing kernel: every output image plane is written once, row by row, copying
//! the input outside the pasted box and resampling the partner inside it.

use crate::apply::Paste;
use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Storage, Tensor};
use rayon::prelude::*;
use snapmix_cam::{BilinearTaps as Taps, PixelBox};

/// Mixes `images` `[B, channels, rows, cols]` by `pastes` into a new tensor; `None` when the
/// tensor is not a CPU f32 tensor (the caller then uses the composed path).
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

/// The out-of-place kernel over a contiguous slice: each output plane is written once.
fn mix_planes(
    images: &[f32],
    pastes: &[Paste],
    channels: usize,
    rows: usize,
    cols: usize,
) -> Vec<f32> {
    let plane = rows * cols;
    let resizes = prepare_resizes(pastes);
    let mut out = vec![0.0f32; images.len()];
    out.par_chunks_mut(plane).enumerate().for_each(|(g, dst)| {
        let (b, channel) = (g / channels, g % channels);
        let own = &images[g * plane..(g + 1) * plane];
        let partner_plane = |p: usize| {
            let start = (p * channels + channel) * plane;
            &images[start..start + plane]
        };
        match pastes[b] {
            Paste::Keep => dst.copy_from_slice(own),
            Paste::Zero(bbox) => {
                dst.copy_from_slice(own);
                zero_box(dst, cols, bbox);
            }
            Paste::Blend { partner, lam } => blend(dst, own, partner_plane(partner), lam),
            Paste::Region { partner, from, to } => {
                let resize = resizes[b]
                    .as_ref()
                    .expect("prepared for every region paste");
                let source = View {
                    data: partner_plane(partner),
                    stride: cols,
                    row0: from.row0,
                    col0: from.col0,
                };
                for (r, (d, o)) in dst
                    .chunks_exact_mut(cols)
                    .zip(own.chunks_exact(cols))
                    .enumerate()
                {
                    if r < to.row0 || r >= to.row1 {
                        d.copy_from_slice(o);
                    } else {
                        d[..to.col0].copy_from_slice(&o[..to.col0]);
                        d[to.col1..].copy_from_slice(&o[to.col1..]);
                    }
                }
                resize.paste(&source, dst, cols, to);
            }
        }
    });
    out
}

/// Mixes a contiguous f32 batch in place: only the pasted boxes (or, for Mixup, the blended
/// images) are written; partner patches are copied out first so no source is read after it
/// has been overwritten.
pub(crate) struct MixInPlace<'a> {
    pub pastes: &'a [Paste],
    pub channels: usize,
    pub rows: usize,
    pub cols: usize,
}

impl InplaceOp1 for MixInPlace<'_> {
    fn name(&self) -> &'static str {
        "snapmix-mix-in-place"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("{}: images must be f32", self.name());
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("{}: images must be contiguous", self.name());
        };
        self.run(&mut data[start..end]);
        Ok(())
    }
}

impl MixInPlace<'_> {
    fn run(&self, data: &mut [f32]) {
        let (channels, cols) = (self.channels, self.cols);
        let plane = self.rows * cols;
        let resizes = prepare_resizes(self.pastes);
        // Sources: the whole batch for blends, else just each partner's box_b (all channels).
        let blends = self.pastes.iter().any(|p| matches!(p, Paste::Blend { .. }));
        let snapshot = if blends { data.to_vec() } else { Vec::new() };
        // Region pastes: interpolate the partner boxes along the columns before any write.
        let colints: Vec<Vec<f32>> = if blends {
            Vec::new()
        } else {
            let data: &[f32] = data;
            (0..self.pastes.len() * channels)
                .into_par_iter()
                .map(
                    |g| match (self.pastes[g / channels], &resizes[g / channels]) {
                        (Paste::Region { partner, from, to }, Some(resize)) => {
                            let start = (partner * channels + g % channels) * plane;
                            let source = View {
                                data: &data[start..start + plane],
                                stride: cols,
                                row0: from.row0,
                                col0: from.col0,
                            };
                            resize.columns(&source, to)
                        }
                        _ => Vec::new(),
                    },
                )
                .collect()
        };
        data.par_chunks_mut(plane).enumerate().for_each(|(g, dst)| {
            let (b, channel) = (g / channels, g % channels);
            match self.pastes[b] {
                Paste::Keep => {}
                Paste::Zero(bbox) => zero_box(dst, cols, bbox),
                Paste::Blend { partner, lam } => {
                    let start = (partner * channels + channel) * plane;
                    let own = &snapshot[g * plane..(g + 1) * plane];
                    blend(dst, own, &snapshot[start..start + plane], lam);
                }
                Paste::Region { partner, from, to } => {
                    let resize = resizes[b]
                        .as_ref()
                        .expect("prepared for every region paste");
                    if blends {
                        let start = (partner * channels + channel) * plane;
                        let source = View {
                            data: &snapshot[start..start + plane],
                            stride: cols,
                            row0: from.row0,
                            col0: from.col0,
                        };
                        resize.paste(&source, dst, cols, to);
                    } else {
                        resize.rows(&colints[g], dst, cols, to);
                    }
                }
            }
        });
    }
}

fn prepare_resizes(pastes: &[Paste]) -> Vec<Option<Resize>> {
    pastes
        .iter()
        .map(|p| match *p {
            Paste::Region { from, to, .. } => Some(Resize::new(from, to)),
            _ => None,
        })
        .collect()
}

fn zero_box(dst: &mut [f32], cols: usize, bbox: PixelBox) {
    for r in bbox.row0..bbox.row1 {
        dst[r * cols + bbox.col0..r * cols + bbox.col1].fill(0.0);
    }
}

/// As PyTorch: `x * lam + x_b * (1 - lam)` with both scalars rounded to f32.
fn blend(dst: &mut [f32], own: &[f32], partner: &[f32], lam: f64) {
    let (wa, wb) = (lam as f32, (1.0 - lam) as f32);
    for ((d, &a), &p) in dst.iter_mut().zip(own).zip(partner) {
        *d = a * wa + p * wb;
    }
}

/// A box of a source plane: row `i` of the box starts at `data[(row0 + i) * stride + col0]`.
struct View<'a> {
    data: &'a [f32],
    stride: usize,
    row0: usize,
    col0: usize,
}

impl View<'_> {
    fn line(&self, i: usize, len: usize) -> &[f32] {
        let start = (self.row0 + i) * self.stride + self.col0;
        &self.data[start..start + len]
    }
}

/// Bilinear resize of a partner box into the target box with `align_corners = true`, as the
/// official code's `F.interpolate` of the cut patch (PyTorch's f32 arithmetic and order: the
/// columns first, then a blend of two such rows).
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
            row_taps: Taps::new(from.rows(), to.rows(), true),
            col_taps: Taps::new(from.cols(), to.cols(), true),
        }
    }

    /// Writes the resized box `source` into box `to` of the plane `dst` (row stride `cols`).
    fn paste(&self, source: &View<'_>, dst: &mut [f32], cols: usize, to: PixelBox) {
        self.rows(&self.columns(source, to), dst, cols, to);
    }

    /// Every source row interpolated along the columns (`[from.rows, to.cols]`), read before
    /// anything is written; for equal sizes, the patch itself.
    fn columns(&self, source: &View<'_>, to: PixelBox) -> Vec<f32> {
        let width = to.cols();
        let mut colint = Vec::with_capacity(self.from.rows() * width);
        for i in 0..self.from.rows() {
            let line = source.line(i, self.from.cols());
            if self.same_size {
                colint.extend_from_slice(line);
            } else {
                let t = &self.col_taps;
                colint
                    .extend((0..width).map(|c| line[t.i0[c]] * t.w0[c] + line[t.i1[c]] * t.w1[c]));
            }
        }
        colint
    }

    /// Blends two rows of [`Resize::columns`] per output row into box `to` of `dst`.
    fn rows(&self, colint: &[f32], dst: &mut [f32], cols: usize, to: PixelBox) {
        let width = to.cols();
        for r in 0..to.rows() {
            let start = (to.row0 + r) * cols + to.col0;
            let out = &mut dst[start..start + width];
            if self.same_size {
                out.copy_from_slice(&colint[r * width..(r + 1) * width]);
                continue;
            }
            let (i0, i1) = (self.row_taps.i0[r], self.row_taps.i1[r]);
            let (w0, w1) = (self.row_taps.w0[r], self.row_taps.w1[r]);
            let top = &colint[i0 * width..(i0 + 1) * width];
            let bottom = &colint[i1 * width..(i1 + 1) * width];
            for ((o, &a), &b) in out.iter_mut().zip(top).zip(bottom) {
                *o = a * w0 + b * w1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn align_corners_taps_hit_both_ends() {
        let t = Taps::new(3, 5, true);
        assert_eq!(t.i0, vec![0, 0, 1, 1, 2]);
        assert_eq!(t.w1, vec![0.0, 0.5, 0.0, 0.5, 0.0]);
        let single = Taps::new(4, 1, true);
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
