//! `semantic_percent_maps`: the SPM of each sample's own label, with per-sample degenerate flags,
//! the raw CAM and box sums; fused kernels on CPU and CUDA, composed candle ops elsewhere.

use crate::cpu::{gather_cam, Norm, Upsample};
use crate::{composed, CamError, PixelBox, Result};
use candle_core::{DType, Device, Storage, Tensor};
use std::sync::OnceLock;

/// Semantic percent maps of a batch: each sample's CAM for its own label, bilinearly upsampled
/// to the image size, shifted to a minimum of 0 and divided by its sum (so it sums to 1).
///
/// A sample whose CAM is constant (e.g. all zero) or not finite has no SPM: it is flagged in
/// [`Spm::degenerate`], its map is all zero and its box sums are NaN, so a mixer can fall back
/// to area-based label weights as the official SnapMix does.
#[derive(Debug, Clone)]
pub struct Spm {
    /// Full-size maps, written on first use (mixing needs only box sums).
    maps: OnceLock<Tensor>,
    cam: Tensor,
    norms: Norms,
    upsample: Upsample,
}

/// Where each sample's normalisation lives.
#[derive(Debug, Clone)]
enum Norms {
    /// Computed on the host (the fused CPU path and the composed path).
    Host {
        /// Column-interpolated CAM rows `[B, h, cols]` the fused path writes the maps from
        /// (empty for the composed path, whose maps are already written).
        colint: Vec<f32>,
        cam_host: Vec<f32>,
        norms: Vec<Norm>,
    },
    /// On the GPU: `(min, sum, degenerate)` `[B, 3]` f64 from the stats kernel; read back
    /// only if the host asks for flags or box sums.
    #[cfg(feature = "cuda")]
    Device {
        stats: Tensor,
        host: OnceLock<Vec<Norm>>,
    },
}

impl Spm {
    /// The SPMs `[B, rows, cols]` (f32; all zero for degenerate samples). The fused path
    /// writes them on the first call only: mixing needs just [`Spm::box_sums`].
    pub fn maps(&self) -> Result<Tensor> {
        if let Some(maps) = self.maps.get() {
            return Ok(maps.clone());
        }
        let maps = match &self.norms {
            Norms::Host { colint, norms, .. } => Tensor::from_vec(
                self.upsample.write(colint, norms),
                (self.batch(), self.rows(), self.cols()),
                &Device::Cpu,
            )?,
            #[cfg(feature = "cuda")]
            Norms::Device { stats, .. } => {
                crate::cuda::maps(&self.cam, stats, self.rows(), self.cols())?
            }
        };
        Ok(self.maps.get_or_init(|| maps).clone())
    }

    /// The raw CAMs `[B, h, w]` before upsampling and normalisation, for visualisation.
    pub fn cam(&self) -> &Tensor {
        &self.cam
    }

    /// Per sample: `true` where the SPM is undefined (constant or non-finite CAM).
    ///
    /// On a GPU this reads the flags back (a device synchronisation), which can fail.
    pub fn degenerate(&self) -> Result<Vec<bool>> {
        Ok(self.host_norms()?.iter().map(|n| n.degenerate).collect())
    }

    /// Batch size B.
    pub fn batch(&self) -> usize {
        self.cam.dims()[0]
    }

    /// Image rows of the maps.
    pub fn rows(&self) -> usize {
        self.upsample.rows
    }

    /// Image cols of the maps.
    pub fn cols(&self) -> usize {
        self.upsample.cols
    }

    /// For each pair `(samples[k], boxes[k])`: the sum of that sample's SPM over that box, the
    /// semantic mass a box keeps or carries. NaN for degenerate samples; 0 for empty boxes.
    ///
    /// Computed from the low-resolution CAM and the summed interpolation weights, in f64: exact
    /// up to rounding and independent of the box size, never a pass over the full-size map.
    pub fn box_sums(&self, samples: &[usize], boxes: &[PixelBox]) -> Result<Vec<f64>> {
        self.check_requests(samples, boxes)?;
        match &self.norms {
            Norms::Host {
                cam_host, norms, ..
            } => Ok(self.host_box_sums(cam_host, norms, samples, boxes)),
            #[cfg(feature = "cuda")]
            Norms::Device { .. } => Ok(self.box_sums_tensor(samples, boxes)?.to_vec1::<f64>()?),
        }
    }

    /// [`Spm::box_sums`] as an f64 tensor `[N]` on the SPM's device, with no host round trip
    /// on a GPU: what a mixer running on the GPU feeds to its label-weight kernel.
    pub fn box_sums_tensor(&self, samples: &[usize], boxes: &[PixelBox]) -> Result<Tensor> {
        self.check_requests(samples, boxes)?;
        let device = self.cam.device();
        if samples.is_empty() {
            return Ok(Tensor::zeros(0, DType::F64, device)?);
        }
        match &self.norms {
            Norms::Host {
                cam_host, norms, ..
            } => {
                let sums = self.host_box_sums(cam_host, norms, samples, boxes);
                Ok(Tensor::from_vec(sums, samples.len(), device)?)
            }
            #[cfg(feature = "cuda")]
            Norms::Device { stats, .. } => {
                let requests: Vec<(usize, PixelBox)> =
                    samples.iter().copied().zip(boxes.iter().copied()).collect();
                Ok(crate::cuda::box_sums(
                    &self.cam,
                    stats,
                    &requests,
                    self.rows(),
                    self.cols(),
                )?)
            }
        }
    }

    /// Pairs of in-range sample indices and boxes inside the image.
    fn check_requests(&self, samples: &[usize], boxes: &[PixelBox]) -> Result<()> {
        if samples.len() != boxes.len() {
            return Err(CamError::BoxCountMismatch {
                samples: samples.len(),
                boxes: boxes.len(),
            });
        }
        for (&sample, &bbox) in samples.iter().zip(boxes) {
            if sample >= self.batch() {
                return Err(CamError::SampleOutOfRange {
                    index: sample,
                    batch: self.batch(),
                });
            }
            if !bbox.fits(self.rows(), self.cols()) {
                return Err(CamError::BoxOutside {
                    bbox,
                    rows: self.rows(),
                    cols: self.cols(),
                });
            }
        }
        Ok(())
    }

    fn host_box_sums(
        &self,
        cam_host: &[f32],
        norms: &[Norm],
        samples: &[usize],
        boxes: &[PixelBox],
    ) -> Vec<f64> {
        let plane = self.upsample.h * self.upsample.w;
        samples
            .iter()
            .zip(boxes)
            .map(|(&sample, &bbox)| {
                let cam = &cam_host[sample * plane..(sample + 1) * plane];
                self.upsample.box_sum(cam, norms[sample], bbox)
            })
            .collect()
    }

    /// Each sample's normalisation on the host (read back once from the GPU).
    fn host_norms(&self) -> Result<&[Norm]> {
        match &self.norms {
            Norms::Host { norms, .. } => Ok(norms),
            #[cfg(feature = "cuda")]
            Norms::Device { stats, host } => {
                if let Some(norms) = host.get() {
                    return Ok(norms);
                }
                let values = stats.flatten_all()?.to_vec1::<f64>()?;
                let norms = values
                    .chunks_exact(3)
                    .map(|s| Norm {
                        min: s[0] as f32,
                        sum: s[1],
                        degenerate: s[2] != 0.0,
                    })
                    .collect();
                Ok(host.get_or_init(|| norms))
            }
        }
    }
}

/// Computes the SPM of each sample's label `targets[b]` from last-conv `features` `[B, C, h, w]`
/// and the linear classifier `weight` `[K, C]`, `bias` `[K]`: `ReLU(features) . W[y] + b[y]`,
/// bilinear upsample to `(rows, cols)` with `align_corners = false` (PyTorch's
/// `F.interpolate` semantics), minus its minimum, divided by its sum.
///
/// Only the B needed classifier rows are used (the official code computes all K maps). With f32
/// features on CPU, or on CUDA when built with the `cuda` feature, this runs fused kernels and
/// writes the full-size maps only when [`Spm::maps`] is called (on CUDA the kernels are queued
/// without a host synchronisation; only the label range check reads the B targets back); on
/// other devices or dtypes it falls back to [`semantic_percent_maps_composed`]. Bad shapes, a C or K mismatch, labels outside `0..K`
/// and an empty size are errors; degenerate samples are flagged, never a panic.
pub fn semantic_percent_maps(
    features: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    targets: &Tensor,
    (rows, cols): (usize, usize),
) -> Result<Spm> {
    let inputs = Inputs::check(features, weight, bias, targets, rows, cols)?;
    #[cfg(feature = "cuda")]
    if features.device().is_cuda() && features.dtype() == DType::F32 {
        return cuda_spm(&inputs);
    }
    if !features.device().is_cpu() || features.dtype() != DType::F32 {
        return composed_spm(&inputs);
    }
    let (class_rows, class_bias) = inputs.class_rows()?;
    let class_rows = class_rows.flatten_all()?.to_vec1::<f32>()?;
    let class_bias = class_bias.to_vec1::<f32>()?;
    let features = features.contiguous()?;
    let cam_host = {
        let (storage, layout) = features.storage_and_layout();
        let Storage::Cpu(storage) = &*storage else {
            return composed_spm(&inputs);
        };
        let start = layout.start_offset();
        let len = inputs.batch * inputs.channels * inputs.h * inputs.w;
        let features = &storage.as_slice::<f32>()?[start..start + len];
        gather_cam(
            features,
            &class_rows,
            &class_bias,
            inputs.channels,
            inputs.h * inputs.w,
        )
    };
    let upsample = Upsample::new(inputs.h, inputs.w, rows, cols);
    let (colint, norms) = upsample.prepare(&cam_host);
    Ok(Spm {
        maps: OnceLock::new(),
        cam: Tensor::from_slice(&cam_host, (inputs.batch, inputs.h, inputs.w), &Device::Cpu)?,
        norms: Norms::Host {
            colint,
            cam_host,
            norms,
        },
        upsample,
    })
}

/// The fused CUDA path: the gather-matvec CAM and the stats kernel, queued on candle's stream;
/// the maps are written only if asked for.
#[cfg(feature = "cuda")]
fn cuda_spm(inputs: &Inputs<'_>) -> Result<Spm> {
    let device = inputs.features.device();
    let weight = inputs.weight.to_dtype(DType::F32)?.contiguous()?;
    let bias = match inputs.bias {
        Some(bias) => bias.to_dtype(DType::F32)?.contiguous()?,
        None => Tensor::zeros(weight.dims()[0], DType::F32, device)?,
    };
    let features = inputs.features.contiguous()?;
    // Labels may live on the host while the features are on the GPU: B values to upload.
    let targets = inputs.targets.to_device(device)?.contiguous()?;
    let cam = crate::cuda::cam(&features, &weight, &bias, &targets)?;
    let stats = crate::cuda::stats(&cam, inputs.rows, inputs.cols)?;
    Ok(Spm {
        maps: OnceLock::new(),
        cam,
        norms: Norms::Device {
            stats,
            host: OnceLock::new(),
        },
        upsample: Upsample::new(inputs.h, inputs.w, inputs.rows, inputs.cols),
    })
}

/// [`semantic_percent_maps`] computed with plain composed candle ops on any device: the
/// baseline of `cargo xtask bench-mix` and the reference the fused kernels are tested against.
pub fn semantic_percent_maps_composed(
    features: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    targets: &Tensor,
    (rows, cols): (usize, usize),
) -> Result<Spm> {
    composed_spm(&Inputs::check(features, weight, bias, targets, rows, cols)?)
}

fn composed_spm(inputs: &Inputs<'_>) -> Result<Spm> {
    let (class_rows, class_bias) = inputs.class_rows()?;
    let features = inputs.features.to_dtype(DType::F32)?;
    let composed::Composed { cam, maps, stats } = composed::spm(
        &features,
        &class_rows,
        &class_bias,
        inputs.rows,
        inputs.cols,
    )?;
    let cam_host = cam.flatten_all()?.to_vec1::<f32>()?;
    let (maps, norms) = composed::finish(maps, &cam_host, &stats)?;
    Ok(Spm {
        maps: OnceLock::from(maps),
        cam,
        norms: Norms::Host {
            colint: Vec::new(),
            cam_host,
            norms,
        },
        upsample: Upsample::new(inputs.h, inputs.w, inputs.rows, inputs.cols),
    })
}

/// Validated arguments of an SPM computation.
struct Inputs<'a> {
    features: &'a Tensor,
    weight: &'a Tensor,
    bias: Option<&'a Tensor>,
    targets: Tensor,
    batch: usize,
    channels: usize,
    h: usize,
    w: usize,
    rows: usize,
    cols: usize,
}

impl<'a> Inputs<'a> {
    fn check(
        features: &'a Tensor,
        weight: &'a Tensor,
        bias: Option<&'a Tensor>,
        targets: &Tensor,
        rows: usize,
        cols: usize,
    ) -> Result<Self> {
        let &[batch, channels, h, w] = features.dims() else {
            return Err(CamError::Shape {
                what: "features",
                expected: "[B, C, h, w]",
                got: features.dims().to_vec(),
            });
        };
        let &[classes, weight_channels] = weight.dims() else {
            return Err(CamError::Shape {
                what: "classifier weight",
                expected: "[K, C]",
                got: weight.dims().to_vec(),
            });
        };
        for (what, t) in [
            ("features", Some(features)),
            ("classifier weight", Some(weight)),
            ("classifier bias", bias),
        ] {
            if let Some(t) = t {
                if !t.dtype().is_float() {
                    return Err(CamError::FloatDType {
                        what,
                        dtype: t.dtype(),
                    });
                }
            }
        }
        if weight_channels != channels {
            return Err(CamError::ChannelMismatch {
                features: channels,
                weight: weight_channels,
            });
        }
        if let Some(bias) = bias {
            if bias.dims() != [classes] {
                return Err(match bias.dims() {
                    &[len] => CamError::BiasMismatch { classes, bias: len },
                    dims => CamError::Shape {
                        what: "classifier bias",
                        expected: "[K]",
                        got: dims.to_vec(),
                    },
                });
            }
        }
        if batch == 0 {
            return Err(CamError::EmptyBatch);
        }
        if h == 0 || w == 0 {
            return Err(CamError::Shape {
                what: "features",
                expected: "[B, C, h, w] with h, w >= 1",
                got: features.dims().to_vec(),
            });
        }
        if rows == 0 || cols == 0 {
            return Err(CamError::EmptySize { rows, cols });
        }
        let targets = check_targets(targets, batch, classes)?;
        Ok(Self {
            features,
            weight,
            bias,
            targets,
            batch,
            channels,
            h,
            w,
            rows,
            cols,
        })
    }

    /// The classifier rows `[B, C]` and biases `[B]` of each sample's label, in f32.
    fn class_rows(&self) -> Result<(Tensor, Tensor)> {
        let rows = self
            .weight
            .index_select(&self.targets, 0)?
            .to_dtype(DType::F32)?
            .contiguous()?;
        let bias = match self.bias {
            Some(bias) => bias.index_select(&self.targets, 0)?.to_dtype(DType::F32)?,
            None => Tensor::zeros(self.batch, DType::F32, self.weight.device())?,
        };
        Ok((rows, bias.contiguous()?))
    }
}

/// Checks targets `[B]` against the batch and the K classes; returns them as u32 on the
/// classifier's device.
fn check_targets(targets: &Tensor, batch: usize, classes: usize) -> Result<Tensor> {
    let &[len] = targets.dims() else {
        return Err(CamError::Shape {
            what: "targets",
            expected: "[B]",
            got: targets.dims().to_vec(),
        });
    };
    if len != batch {
        return Err(CamError::BatchMismatch {
            features: batch,
            targets: len,
        });
    }
    let values: Vec<i64> = match targets.dtype() {
        DType::U8 | DType::U32 | DType::I64 => targets.to_dtype(DType::I64)?.to_vec1()?,
        dtype => return Err(CamError::TargetDType(dtype)),
    };
    if let Some((sample, &target)) = values
        .iter()
        .enumerate()
        .find(|(_, &t)| t < 0 || t as u64 >= classes as u64)
    {
        return Err(CamError::TargetOutOfRange {
            sample,
            target,
            classes,
        });
    }
    Ok(targets.to_dtype(DType::U32)?)
}
