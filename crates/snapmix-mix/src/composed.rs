//! Mixing with plain composed candle ops on any device: the benchmark baseline and the
//! reference of the fused kernel. Samples sharing one pixel operation are mixed as one sub-batch.

use crate::apply::Paste;
use crate::Result;
use candle_core::{DType, Tensor};
use snapmix_cam::{PixelBox, Spm};
use std::collections::HashMap;

/// SPM mass of `(sample, box)` requests with `narrow` + `sum` on the maps, one reduction per
/// distinct box over the whole batch; NaN for degenerate samples.
pub(crate) fn box_sums(spm: &Spm, requests: &[(usize, PixelBox)]) -> Result<Vec<f64>> {
    let degenerate = spm.degenerate()?;
    let mut per_box: HashMap<PixelBox, Vec<f64>> = HashMap::new();
    for &(_, bbox) in requests {
        if per_box.contains_key(&bbox) {
            continue;
        }
        let sums = if bbox.area() == 0 {
            vec![0.0; spm.batch()]
        } else {
            spm.maps()?
                .narrow(1, bbox.row0, bbox.rows())?
                .narrow(2, bbox.col0, bbox.cols())?
                .sum((1, 2))?
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?
        };
        per_box.insert(bbox, sums);
    }
    Ok(requests
        .iter()
        .map(|&(sample, bbox)| {
            if degenerate[sample] {
                f64::NAN
            } else {
                per_box[&bbox][sample]
            }
        })
        .collect())
}

/// The geometry a group of samples shares (partners may differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Group {
    Keep,
    Zero(PixelBox),
    Blend(u64),
    Region(PixelBox, PixelBox),
}

/// Mixes `images` `[B, channels, rows, cols]` by `pastes` with candle ops.
pub(crate) fn mix_images(images: &Tensor, pastes: &[Paste]) -> Result<Tensor> {
    let (_, channels, _, _) = images.dims4()?;
    let device = images.device();
    let mut groups: Vec<(Group, Vec<u32>, Vec<u32>)> = Vec::new();
    for (i, paste) in pastes.iter().enumerate() {
        let (group, partner) = match *paste {
            Paste::Keep => (Group::Keep, i),
            Paste::Zero(b) => (Group::Zero(b), i),
            Paste::Blend { partner, lam } => (Group::Blend(lam.to_bits()), partner),
            Paste::Region { partner, from, to } => (Group::Region(from, to), partner),
        };
        match groups.iter_mut().find(|(g, _, _)| *g == group) {
            Some((_, ids, partners)) => {
                ids.push(i as u32);
                partners.push(partner as u32);
            }
            None => groups.push((group, vec![i as u32], vec![partner as u32])),
        }
    }
    let mut parts = Vec::with_capacity(groups.len());
    let mut order = Vec::with_capacity(pastes.len());
    for (group, ids, partners) in &groups {
        let n = ids.len();
        let own = images.index_select(&Tensor::from_slice(ids, n, device)?, 0)?;
        let partner = || images.index_select(&Tensor::from_slice(partners, n, device)?, 0);
        let ranges = |b: PixelBox| [0..n, 0..channels, b.row0..b.row1, b.col0..b.col1];
        let part = match *group {
            Group::Keep => own,
            Group::Zero(b) => {
                let zeros =
                    Tensor::zeros((n, channels, b.rows(), b.cols()), images.dtype(), device)?;
                own.slice_assign(&ranges(b), &zeros)?
            }
            Group::Blend(bits) => {
                let lam = f64::from_bits(bits);
                (own.affine(lam, 0.0)? + partner()?.affine(1.0 - lam, 0.0)?)?
            }
            Group::Region(from, to) => {
                let patch = partner()?.narrow(2, from.row0, from.rows())?.narrow(
                    3,
                    from.col0,
                    from.cols(),
                )?;
                let patch = if (from.rows(), from.cols()) == (to.rows(), to.cols()) {
                    patch.contiguous()?
                } else {
                    patch.upsample_bilinear2d(to.rows(), to.cols(), true)?
                };
                own.slice_assign(&ranges(to), &patch)?
            }
        };
        parts.push(part);
        order.extend_from_slice(ids);
    }
    let stacked = Tensor::cat(&parts, 0)?;
    if order.iter().enumerate().all(|(k, &i)| k == i as usize) {
        return Ok(stacked);
    }
    let mut inverse = vec![0u32; order.len()];
    for (k, &i) in order.iter().enumerate() {
        inverse[i as usize] = k as u32;
    }
    Ok(stacked.index_select(&Tensor::from_slice(&inverse, inverse.len(), device)?, 0)?)
}
