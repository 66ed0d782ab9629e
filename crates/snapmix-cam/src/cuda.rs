//! The CUDA path of `semantic_percent_maps`: candle CustomOps that launch the fused kernels of
//! `cuda/spm.cu` (compiled to PTX by build.rs) on candle's stream, with no host synchronisation.

use crate::PixelBox;
use candle_core::cuda::cudarc::driver::{CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda::{CudaDType, WrapErr};
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape,
    Storage, Tensor,
};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/spm.ptx"));
const MODULE: &str = "snapmix_cam_spm";
/// Threads of the one-block-per-sample and one-block-per-box kernels (a power of two: the
/// stats kernel reduces in shared arrays of this size).
const BLOCK: u32 = 256;
/// Channel groups of `cam_gather_matvec` (`CHANNEL_GROUPS` in spm.cu).
const CHANNEL_GROUPS: u32 = 16;
/// Static shared memory of `spm_stats` (its reduction arrays); the dynamic part must fit too.
const STATS_STATIC_SHARED: usize = 4 * 4 * BLOCK as usize;
const SHARED_LIMIT: usize = 48 * 1024;

/// The CAM `[B, h, w]` of each sample's label from features `[B, C, h, w]`, classifier weight
/// `[K, C]` and bias `[K]` (all f32) and labels `[B]` (u32, already checked against K).
pub(crate) fn cam(
    features: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    targets: &Tensor,
) -> Result<Tensor> {
    features.apply_op3_no_bwd(weight, targets, &CamOp { bias: bias.clone() })
}

/// Per sample `(min, sum, degenerate)` `[B, 3]` f64 of the CAM upsampled to `rows x cols`.
pub(crate) fn stats(cam: &Tensor, rows: usize, cols: usize) -> Result<Tensor> {
    cam.apply_op1_no_bwd(&StatsOp { rows, cols })
}

/// The full-size SPMs `[B, rows, cols]` from the CAM and its stats.
pub(crate) fn maps(cam: &Tensor, stats: &Tensor, rows: usize, cols: usize) -> Result<Tensor> {
    cam.apply_op2_no_bwd(stats, &MapsOp { rows, cols })
}

/// The SPM mass of each `(sample, box)` request as an f64 tensor `[N]` on the CAM's device
/// (requests already validated).
pub(crate) fn box_sums(
    cam: &Tensor,
    stats: &Tensor,
    requests: &[(usize, PixelBox)],
    rows: usize,
    cols: usize,
) -> Result<Tensor> {
    let mut table = Vec::with_capacity(requests.len() * 5);
    for &(sample, b) in requests {
        for v in [sample, b.row0, b.col0, b.row1, b.col1] {
            table.push(u32::try_from(v).map_err(|_| {
                candle_core::Error::Msg(format!("box sum request {v} does not fit in u32"))
            })?);
        }
    }
    let table = Tensor::from_vec(table, (requests.len(), 5), cam.device())?;
    cam.apply_op2_no_bwd(stats, &BoxSumsOp { rows, cols, table })
}

struct CamOp {
    bias: Tensor,
}

struct StatsOp {
    rows: usize,
    cols: usize,
}

struct MapsOp {
    rows: usize,
    cols: usize,
}

struct BoxSumsOp {
    rows: usize,
    cols: usize,
    table: Tensor,
}

/// A contiguous view of an op's input.
fn view<'a, T: CudaDType>(
    storage: &'a CudaStorage,
    layout: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("snapmix-cam CUDA kernels: {what} must be contiguous");
    };
    Ok(storage.as_cuda_slice::<T>()?.slice(start..end))
}

/// A size as the kernels' `int`.
fn int(value: usize, what: &str) -> Result<i32> {
    i32::try_from(value).map_err(|_| {
        candle_core::Error::Msg(format!(
            "snapmix-cam CUDA kernels: {what} = {value} exceeds i32"
        ))
    })
}

/// Dynamic shared memory of the kernels that sum with interpolation weights: `2h + w` doubles.
fn weight_shared(h: usize, w: usize, extra: usize) -> Result<u32> {
    let bytes = (2 * h + w) * std::mem::size_of::<f64>();
    if bytes + extra > SHARED_LIMIT {
        bail!("snapmix-cam CUDA kernels: a {h}x{w} CAM needs {bytes} bytes of shared memory, more than {SHARED_LIMIT}");
    }
    Ok(bytes as u32)
}

/// A batch as the second grid dimension (at most 65535 blocks).
fn grid_y(batch: usize) -> Result<u32> {
    match u32::try_from(batch) {
        Ok(b) if b <= 65535 => Ok(b),
        _ => bail!("snapmix-cam CUDA kernels: batch {batch} exceeds 65535"),
    }
}

fn cpu_only(name: &str) -> Result<(CpuStorage, Shape)> {
    bail!("{name} is a CUDA kernel: CPU tensors take the fused CPU path in snapmix-cam's cpu.rs")
}

impl CustomOp3 for CamOp {
    fn name(&self) -> &'static str {
        "snapmix-cam-gather-matvec"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_only(self.name())
    }

    fn cuda_fwd(
        &self,
        features: &CudaStorage,
        features_layout: &Layout,
        weight: &CudaStorage,
        weight_layout: &Layout,
        targets: &CudaStorage,
        targets_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (batch, channels, h, w) = features_layout.shape().dims4()?;
        let dev = &features.device;
        let (bias_storage, bias_layout) = self.bias.storage_and_layout();
        let Storage::Cuda(bias_storage) = &*bias_storage else {
            bail!("snapmix-cam CUDA kernels: the classifier bias must be on the GPU");
        };
        let bias = view::<f32>(bias_storage, bias_layout, "bias")?;
        let features = view::<f32>(features, features_layout, "features")?;
        let weight = view::<f32>(weight, weight_layout, "weight")?;
        let targets = view::<u32>(targets, targets_layout, "targets")?;
        let pixels = h * w;
        let mut cam = unsafe { dev.alloc::<f32>(batch * pixels)? };
        let (channels_arg, pixels_arg) = (int(channels, "channels")?, int(pixels, "h * w")?);
        let func = dev.get_or_load_custom_func("cam_gather_matvec", MODULE, PTX)?;
        let mut launch = func.builder();
        launch
            .arg(&features)
            .arg(&weight)
            .arg(&bias)
            .arg(&targets)
            .arg(&mut cam)
            .arg(&channels_arg)
            .arg(&pixels_arg);
        let cfg = LaunchConfig {
            grid_dim: (pixels.div_ceil(32) as u32, grid_y(batch)?, 1),
            block_dim: (32, CHANNEL_GROUPS, 1),
            shared_mem_bytes: 0,
        };
        unsafe { launch.launch(cfg) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(cam, dev.clone()),
            Shape::from((batch, h, w)),
        ))
    }
}

impl CustomOp1 for StatsOp {
    fn name(&self) -> &'static str {
        "snapmix-cam-spm-stats"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_only(self.name())
    }

    fn cuda_fwd(&self, cam: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let (batch, h, w) = layout.shape().dims3()?;
        let dev = &cam.device;
        let cam = view::<f32>(cam, layout, "cam")?;
        let mut stats = unsafe { dev.alloc::<f64>(batch * 3)? };
        let args = [
            int(h, "h")?,
            int(w, "w")?,
            int(self.rows, "rows")?,
            int(self.cols, "cols")?,
        ];
        let func = dev.get_or_load_custom_func("spm_stats", MODULE, PTX)?;
        let mut launch = func.builder();
        launch.arg(&cam).arg(&mut stats);
        for a in &args {
            launch.arg(a);
        }
        let cfg = LaunchConfig {
            grid_dim: (int(batch, "batch")? as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: weight_shared(h, w, STATS_STATIC_SHARED)?,
        };
        unsafe { launch.launch(cfg) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(stats, dev.clone()),
            Shape::from((batch, 3)),
        ))
    }
}

impl CustomOp2 for MapsOp {
    fn name(&self) -> &'static str {
        "snapmix-cam-spm-maps"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_only(self.name())
    }

    fn cuda_fwd(
        &self,
        cam: &CudaStorage,
        cam_layout: &Layout,
        stats: &CudaStorage,
        stats_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (batch, h, w) = cam_layout.shape().dims3()?;
        let dev = &cam.device;
        let cam = view::<f32>(cam, cam_layout, "cam")?;
        let stats = view::<f64>(stats, stats_layout, "stats")?;
        let total = batch * self.rows * self.cols;
        let mut maps = unsafe { dev.alloc::<f32>(total)? };
        let args = [
            int(batch, "batch")?,
            int(h, "h")?,
            int(w, "w")?,
            int(self.rows, "rows")?,
            int(self.cols, "cols")?,
        ];
        let func = dev.get_or_load_custom_func("spm_maps", MODULE, PTX)?;
        let mut launch = func.builder();
        launch.arg(&cam).arg(&stats).arg(&mut maps);
        for a in &args {
            launch.arg(a);
        }
        let cfg = LaunchConfig {
            grid_dim: (total.div_ceil(BLOCK as usize).min(1 << 20) as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { launch.launch(cfg) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(maps, dev.clone()),
            Shape::from((batch, self.rows, self.cols)),
        ))
    }
}

impl CustomOp2 for BoxSumsOp {
    fn name(&self) -> &'static str {
        "snapmix-cam-spm-box-sums"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_only(self.name())
    }

    fn cuda_fwd(
        &self,
        cam: &CudaStorage,
        cam_layout: &Layout,
        stats: &CudaStorage,
        stats_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (_, h, w) = cam_layout.shape().dims3()?;
        let requests = self.table.dims()[0];
        let dev = &cam.device;
        if self.table.dtype() != DType::U32 {
            bail!("snapmix-cam CUDA kernels: the box table must be u32");
        }
        let (table_storage, table_layout) = self.table.storage_and_layout();
        let Storage::Cuda(table_storage) = &*table_storage else {
            bail!("snapmix-cam CUDA kernels: the box table must be on the GPU");
        };
        let table = view::<u32>(table_storage, table_layout, "box table")?;
        let cam = view::<f32>(cam, cam_layout, "cam")?;
        let stats = view::<f64>(stats, stats_layout, "stats")?;
        if requests == 0 {
            bail!("snapmix-cam CUDA kernels: no box sum requested");
        }
        let mut sums = unsafe { dev.alloc::<f64>(requests)? };
        let args = [
            int(h, "h")?,
            int(w, "w")?,
            int(self.rows, "rows")?,
            int(self.cols, "cols")?,
        ];
        let func = dev.get_or_load_custom_func("spm_box_sums", MODULE, PTX)?;
        let mut launch = func.builder();
        launch.arg(&cam).arg(&stats).arg(&table).arg(&mut sums);
        for a in &args {
            launch.arg(a);
        }
        let cfg = LaunchConfig {
            grid_dim: (int(requests, "box requests")? as u32, 1, 1),
            block_dim: (64, 1, 1),
            shared_mem_bytes: weight_shared(h, w, 0)?,
        };
        unsafe { launch.launch(cfg) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(sums, dev.clone()),
            Shape::from(requests),
        ))
    }
}
