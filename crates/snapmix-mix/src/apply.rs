//! `apply`: replays `MixParams` on a batch, deterministically. On CPU, label weights are computed
//! on the host from box sums; on CUDA both label weights and pixels run as fused kernels.

use crate::{composed, cpu, Method, MixError, MixParams, Result, SampleMix};
use candle_core::{DType, Device, Tensor};
use snapmix_cam::{PixelBox, Spm};

/// A mixed batch and its two-label targets: sample `i` is weighted `lam_a[i]` on its own label
/// `targets_a[i]` and `lam_b[i]` on its partner's `targets_b[i]`. Feed it to
/// [`crate::mixed_cross_entropy`].
#[derive(Debug, Clone)]
pub struct MixedBatch {
    /// The mixed images `[B, channels, rows, cols]`, same dtype and device as the input.
    pub images: Tensor,
    /// Each sample's own label `[B]` (the input targets).
    pub targets_a: Tensor,
    /// The partner's label `[B]` (the own label where nothing was mixed in).
    pub targets_b: Tensor,
    /// Weight of `targets_a`, `[B]` f32.
    pub lam_a: Tensor,
    /// Weight of `targets_b`, `[B]` f32.
    pub lam_b: Tensor,
}

/// What happens to one image's pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Paste {
    /// Unchanged.
    Keep,
    /// The box is filled with 0.
    Zero(PixelBox),
    /// `lam * own + (1 - lam) * partner`.
    Blend { partner: usize, lam: f64 },
    /// The partner's `from` box, resized bilinearly (align_corners = true), replaces `to`.
    Region {
        partner: usize,
        from: PixelBox,
        to: PixelBox,
    },
}

/// Applies `params` to `images` `[B, channels, rows, cols]` with labels `targets` `[B]`.
/// `spm` (from [`snapmix_cam::semantic_percent_maps`] on the same batch) is required when a
/// sample uses SnapMix. Deterministic; the inputs are not modified.
///
/// Semantics follow the official SnapMix code exactly (see `data/golden/mix/README.md`): for
/// SnapMix `lam_a = 1 - spm_i(box_a) / (spm_i(all) + 1e-8)`, `lam_b = spm_p(box_b) /
/// (spm_p(all) + 1e-8)`, the same-label rule, then NaN (degenerate SPM) falls back to area
/// weights; no paste and `lam_a = 1` when a box is empty (AsCutMix: 4 pixels or fewer).
/// Runs fused kernels on f32 tensors on CPU and (with the `cuda` feature) on CUDA, where no
/// host synchronisation happens; composed candle ops elsewhere.
pub fn apply(
    params: &MixParams,
    images: &Tensor,
    targets: &Tensor,
    spm: Option<&Spm>,
) -> Result<MixedBatch> {
    check(params, images, targets, spm)?;
    let plan = Plan::new(params);
    #[cfg(feature = "cuda")]
    if on_cuda(images) {
        let mixed = crate::cuda::mix_images(images, &plan.pastes)?;
        return cuda_finish(mixed, params, targets, spm, &plan);
    }
    let weights = plan.resolve(params, targets, |requests| exact_box_sums(spm, requests))?;
    let mixed = match cpu::mix_images(images, &plan.pastes)? {
        Some(mixed) => mixed,
        None => composed::mix_images(images, &plan.pastes)?,
    };
    finish(mixed, targets, &plan, weights)
}

/// [`apply`] writing the mixed pixels into `images` itself, as the official code does: no
/// batch copy, and on CPU only the pasted boxes are touched (Mixup rewrites every image).
/// `images` must be contiguous and must not share its storage with a tensor you still need
/// unmixed; the returned `MixedBatch::images` is `images`. On CUDA the read boxes are
/// snapshotted first and only the pasted boxes are written; on other devices the composed path
/// computes the mix and copies it back.
pub fn apply_in_place(
    params: &MixParams,
    images: &Tensor,
    targets: &Tensor,
    spm: Option<&Spm>,
) -> Result<MixedBatch> {
    check(params, images, targets, spm)?;
    if !images.is_contiguous() {
        return Err(MixError::Shape {
            what: "images (in place)",
            expected: "a contiguous tensor".into(),
            got: images.dims().to_vec(),
        });
    }
    let plan = Plan::new(params);
    #[cfg(feature = "cuda")]
    if on_cuda(images) {
        crate::cuda::mix_in_place(images, &plan.pastes)?;
        return cuda_finish(images.clone(), params, targets, spm, &plan);
    }
    let weights = plan.resolve(params, targets, |requests| exact_box_sums(spm, requests))?;
    let (_, channels, rows, cols) = images.dims4()?;
    if images.device().is_cpu() && images.dtype() == DType::F32 {
        images.inplace_op1(&cpu::MixInPlace {
            pastes: &plan.pastes,
            channels,
            rows,
            cols,
        })?;
    } else {
        let mixed = composed::mix_images(images, &plan.pastes)?;
        images.slice_set(&mixed, 0, 0)?;
    }
    finish(images.clone(), targets, &plan, weights)
}

/// [`apply`] computed with plain composed candle ops (index_select, narrow, sum,
/// upsample_bilinear2d, slice_assign) on any device: the baseline of `cargo xtask bench-mix`
/// and the reference the fused kernel is tested against.
pub fn apply_composed(
    params: &MixParams,
    images: &Tensor,
    targets: &Tensor,
    spm: Option<&Spm>,
) -> Result<MixedBatch> {
    check(params, images, targets, spm)?;
    let plan = Plan::new(params);
    let weights = plan.resolve(params, targets, |requests| {
        composed::box_sums(spm.ok_or(MixError::MissingSpm)?, requests)
    })?;
    let mixed = composed::mix_images(images, &plan.pastes)?;
    finish(mixed, targets, &plan, weights)
}

/// Whether the fused CUDA kernels handle these images.
#[cfg(feature = "cuda")]
fn on_cuda(images: &Tensor) -> bool {
    images.device().is_cuda() && images.dtype() == DType::F32
}

/// The label weights on the GPU (box masses and the label-weight kernel, no host round trip)
/// and the mixed batch around `mixed`.
#[cfg(feature = "cuda")]
fn cuda_finish(
    mixed: Tensor,
    params: &MixParams,
    targets: &Tensor,
    spm: Option<&Spm>,
    plan: &Plan,
) -> Result<MixedBatch> {
    let device = mixed.device().clone();
    let (lam_a, lam_b) = if plan.requests.is_empty() {
        let to_f32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        let batch = plan.lam_a.len();
        (
            Tensor::from_vec(to_f32(&plan.lam_a), batch, &device)?,
            Tensor::from_vec(to_f32(&plan.lam_b), batch, &device)?,
        )
    } else {
        let spm = spm.ok_or(MixError::MissingSpm)?;
        let (samples, boxes): (Vec<usize>, Vec<PixelBox>) = plan.requests.iter().copied().unzip();
        let masses = spm.box_sums_tensor(&samples, &boxes)?.to_device(&device)?;
        let table = plan.label_table(params);
        crate::cuda::label_weights(&masses, targets, table, params.same_label_rule)?
    };
    let partners = Tensor::from_slice(&plan.label_partners, plan.lam_a.len(), targets.device())?;
    Ok(MixedBatch {
        targets_a: targets.clone(),
        targets_b: targets.index_select(&partners, 0)?,
        lam_a,
        lam_b,
        images: mixed,
    })
}

/// Box sums from the low-resolution CAM (see [`Spm::box_sums`]).
fn exact_box_sums(spm: Option<&Spm>, requests: &[(usize, PixelBox)]) -> Result<Vec<f64>> {
    let spm = spm.ok_or(MixError::MissingSpm)?;
    let (samples, boxes): (Vec<usize>, Vec<PixelBox>) = requests.iter().copied().unzip();
    Ok(spm.box_sums(&samples, &boxes)?)
}

/// Validates shapes and dtypes (metadata only: nothing is read from the device).
fn check(params: &MixParams, images: &Tensor, targets: &Tensor, spm: Option<&Spm>) -> Result<()> {
    params.validate()?;
    let batch = params.batch();
    let dims = images.dims();
    if dims.len() != 4 || dims[0] != batch || dims[2] != params.rows || dims[3] != params.cols {
        return Err(MixError::Shape {
            what: "images",
            expected: format!(
                "[{batch}, channels, {}, {}] (from the params)",
                params.rows, params.cols
            ),
            got: dims.to_vec(),
        });
    }
    if !images.dtype().is_float() {
        return Err(MixError::ImageDType(images.dtype()));
    }
    if targets.dims() != [batch] {
        return Err(MixError::Shape {
            what: "targets",
            expected: format!("[{batch}]"),
            got: targets.dims().to_vec(),
        });
    }
    if !matches!(targets.dtype(), DType::U8 | DType::U32 | DType::I64) {
        return Err(MixError::TargetDType(targets.dtype()));
    }
    if params.needs_spm() {
        let spm = spm.ok_or(MixError::MissingSpm)?;
        if (spm.batch(), spm.rows(), spm.cols()) != (batch, params.rows, params.cols) {
            return Err(MixError::Shape {
                what: "spm",
                expected: format!("[{batch}, {}, {}]", params.rows, params.cols),
                got: vec![spm.batch(), spm.rows(), spm.cols()],
            });
        }
    }
    Ok(())
}

/// Everything about a step that needs no pixels and no labels: each sample's pixel operation,
/// label partner and preset label weights, and the SPM masses SnapMix samples need.
pub(crate) struct Plan {
    pub pastes: Vec<Paste>,
    label_partners: Vec<u32>,
    /// Label weights of every sample except the SnapMix pastes, which `resolve` fills in.
    lam_a: Vec<f64>,
    lam_b: Vec<f64>,
    /// Area of box_a over the image area (SnapMix's fallback weight).
    area_ratio: Vec<f64>,
    /// The SnapMix samples that paste, in order.
    snap: Vec<usize>,
    /// Four `(sample, box)` masses per SnapMix paste: own box_a and image, partner box_b and image.
    requests: Vec<(usize, PixelBox)>,
}

impl Plan {
    fn new(params: &MixParams) -> Self {
        let batch = params.batch();
        let full = PixelBox::full(params.rows, params.cols);
        let pixels = (params.rows * params.cols) as f64;
        let pastes: Vec<Paste> = params
            .samples
            .iter()
            .zip(&params.perm)
            .map(|(s, &partner)| paste_of(s, partner))
            .collect();
        let snap: Vec<usize> = (0..batch)
            .filter(|&i| {
                params.samples[i].method == Method::SnapMix
                    && matches!(pastes[i], Paste::Region { .. })
            })
            .collect();
        let mut requests = Vec::with_capacity(snap.len() * 4);
        for &i in &snap {
            let (s, partner) = (&params.samples[i], params.perm[i]);
            requests.extend([(i, s.box_a), (i, full), (partner, s.box_b), (partner, full)]);
        }
        let mut label_partners = Vec::with_capacity(batch);
        let mut lam_a = vec![1.0f64; batch];
        let mut lam_b = vec![0.0f64; batch];
        let mut area_ratio = Vec::with_capacity(batch);
        for (i, s) in params.samples.iter().enumerate() {
            let partner = params.perm[i];
            label_partners.push(if s.method.has_partner() { partner } else { i } as u32);
            let ratio = s.box_a.area() as f64 / pixels;
            area_ratio.push(ratio);
            match (s.method, pastes[i]) {
                (Method::Mixup, _) => {
                    lam_a[i] = s.lam;
                    lam_b[i] = 1.0 - s.lam;
                }
                (Method::CutMix | Method::AsCutMix, Paste::Region { .. }) => {
                    lam_a[i] = 1.0 - ratio;
                    lam_b[i] = ratio;
                }
                _ => {}
            }
        }
        Self {
            pastes,
            label_partners,
            lam_a,
            lam_b,
            area_ratio,
            snap,
            requests,
        }
    }

    /// The per-sample table of the CUDA label-weight kernel (`mix_label_weights` in mix.cu):
    /// preset lam_a, preset lam_b, area ratio, index among the SnapMix pastes (-1 for none),
    /// partner.
    #[cfg(feature = "cuda")]
    fn label_table(&self, params: &MixParams) -> Vec<f64> {
        let mut snap_index = vec![-1.0f64; self.lam_a.len()];
        for (k, &i) in self.snap.iter().enumerate() {
            snap_index[i] = k as f64;
        }
        (0..self.lam_a.len())
            .flat_map(|i| {
                [
                    self.lam_a[i],
                    self.lam_b[i],
                    self.area_ratio[i],
                    snap_index[i],
                    params.perm[i] as f64,
                ]
            })
            .collect()
    }

    /// The label weights `(lam_a, lam_b)` on the host: SnapMix samples from the masses
    /// `box_sums` returns for [`Plan::requests`], the same-label rule (reading the labels), then
    /// the NaN (degenerate SPM) fallback to area weights.
    fn resolve(
        &self,
        params: &MixParams,
        targets: &Tensor,
        box_sums: impl FnOnce(&[(usize, PixelBox)]) -> Result<Vec<f64>>,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let (mut lam_a, mut lam_b) = (self.lam_a.clone(), self.lam_b.clone());
        if !self.requests.is_empty() {
            let masses = box_sums(&self.requests)?;
            let labels = targets.to_dtype(DType::I64)?.to_vec1::<i64>()?;
            for (k, &i) in self.snap.iter().enumerate() {
                let m = &masses[k * 4..k * 4 + 4];
                let mut a = 1.0 - m[0] / (m[1] + 1e-8);
                let mut b = m[2] / (m[3] + 1e-8);
                if params.same_label_rule && labels[i] == labels[params.perm[i]] {
                    (a, b) = (a + b, b + a);
                }
                lam_a[i] = if a.is_nan() {
                    1.0 - self.area_ratio[i]
                } else {
                    a
                };
                lam_b[i] = if b.is_nan() { self.area_ratio[i] } else { b };
            }
        }
        let to_f32 = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect();
        Ok((to_f32(lam_a), to_f32(lam_b)))
    }
}

/// The pixel operation of one sample, with the official paste conditions.
fn paste_of(s: &SampleMix, partner: usize) -> Paste {
    let region = |min_area: usize| {
        if s.box_a.area() > min_area && s.box_b.area() > min_area {
            Paste::Region {
                partner,
                from: s.box_b,
                to: s.box_a,
            }
        } else {
            Paste::Keep
        }
    };
    match s.method {
        Method::None => Paste::Keep,
        Method::Cutout if s.box_a.area() > 0 => Paste::Zero(s.box_a),
        Method::Cutout => Paste::Keep,
        Method::Mixup => Paste::Blend {
            partner,
            lam: s.lam,
        },
        Method::SnapMix | Method::CutMix => region(0),
        Method::AsCutMix => region(4),
    }
}

fn finish(
    images: Tensor,
    targets: &Tensor,
    plan: &Plan,
    (lam_a, lam_b): (Vec<f32>, Vec<f32>),
) -> Result<MixedBatch> {
    let batch = lam_a.len();
    let partners = Tensor::from_slice(&plan.label_partners, batch, targets.device())?;
    let device: &Device = images.device();
    Ok(MixedBatch {
        targets_a: targets.clone(),
        targets_b: targets.index_select(&partners, 0)?,
        lam_a: Tensor::from_vec(lam_a, batch, device)?,
        lam_b: Tensor::from_vec(lam_b, batch, device)?,
        images,
    })
}
