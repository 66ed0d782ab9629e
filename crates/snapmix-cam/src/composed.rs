//! The SPM computed with plain composed candle ops (index_select, matmul, upsample_bilinear2d,
//! min, sum): runs on any candle device, is the in-run benchmark baseline and the reference the
//! fused kernels are tested against.

use crate::cpu::Norm;
use candle_core::{DType, Tensor, D};

/// What the composed path computes before degenerate samples are marked.
pub(crate) struct Composed {
    /// The CAM `[B, h, w]` of each sample's label.
    pub cam: Tensor,
    /// The normalised maps `[B, rows, cols]` (NaN where degenerate, as the official code).
    pub maps: Tensor,
    /// Per sample: min of the upsampled CAM and the sum after subtracting it.
    pub stats: Vec<(f32, f64)>,
}

/// The SPM of each sample's label with composed candle ops.
pub(crate) fn spm(
    features: &Tensor,
    class_rows: &Tensor,
    class_bias: &Tensor,
    rows: usize,
    cols: usize,
) -> candle_core::Result<Composed> {
    let (batch, channels, h, w) = features.dims4()?;
    let relu = features.relu()?.reshape((batch, channels, h * w))?;
    let cam = class_rows
        .unsqueeze(1)?
        .matmul(&relu)?
        .broadcast_add(&class_bias.reshape((batch, 1, 1))?)?
        .reshape((batch, 1, h, w))?;
    let up = cam
        .upsample_bilinear2d(rows, cols, false)?
        .reshape((batch, rows * cols))?;
    let min = up.min_keepdim(D::Minus1)?;
    let shifted = up.broadcast_sub(&min)?;
    let sum = shifted.sum_keepdim(D::Minus1)?;
    let maps = shifted.broadcast_div(&sum)?.reshape((batch, rows, cols))?;
    let mins = min.flatten_all()?.to_vec1::<f32>()?;
    let sums = sum.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok(Composed {
        cam: cam.reshape((batch, h, w))?,
        maps,
        stats: mins.into_iter().zip(sums).collect(),
    })
}

/// Marks degenerate samples and zeroes their maps, so both paths hand out the same `Spm`.
pub(crate) fn finish(
    maps: Tensor,
    cam_host: &[f32],
    stats: &[(f32, f64)],
) -> candle_core::Result<(Tensor, Vec<Norm>)> {
    let plane = cam_host.len() / stats.len().max(1);
    let norms: Vec<Norm> = stats
        .iter()
        .zip(cam_host.chunks_exact(plane))
        .map(|(&(min, sum), cam)| {
            let constant = cam.iter().all(|&v| v == cam[0]);
            let finite = cam.iter().all(|v| v.is_finite());
            Norm {
                min,
                sum,
                degenerate: constant || !finite || !(sum > 0.0 && sum.is_finite()),
            }
        })
        .collect();
    if norms.iter().any(|n| n.degenerate) {
        let keep: Vec<u8> = norms.iter().map(|n| u8::from(!n.degenerate)).collect();
        let keep = Tensor::from_vec(keep, (norms.len(), 1, 1), maps.device())?
            .broadcast_as(maps.shape())?;
        let maps = keep.where_cond(&maps, &maps.zeros_like()?)?;
        return Ok((maps, norms));
    }
    Ok((maps, norms))
}
