//! The CUDA path of `apply` and `apply_in_place`: candle CustomOps launching the kernels of
//! `cuda/mix.cu` (compiled to PTX by build.rs) on candle's stream, with no host synchronisation.

use crate::apply::Paste;
use candle_core::cuda::cudarc::driver::{CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda::{CudaDType, WrapErr};
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, CustomOp2, DType, InplaceOp1, Layout, Result, Shape,
    Storage, Tensor,
};
use snapmix_cam::PixelBox;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/mix.ptx"));
const MODULE: &str = "snapmix_mix";
const BLOCK: u32 = 256;
/// Entries per sample of the paste table (`ENTRIES` in mix.cu).
const ENTRIES: usize = 13;
const KEEP: u32 = 0;
const ZERO: u32 = 1;
const BLEND: u32 = 2;
const REGION: u32 = 3;

/// Mixes f32 `images` `[B, channels, rows, cols]` by `pastes` into a new tensor.
pub(crate) fn mix_images(images: &Tensor, pastes: &[Paste]) -> Result<Tensor> {
    let (_, _, rows, cols) = images.dims4()?;
    let table = paste_table(pastes, 0, rows, cols)?;
    let table = Tensor::from_vec(table.entries, (pastes.len(), ENTRIES), images.device())?;
    images.contiguous()?.apply_op1_no_bwd(&MixOp { table })
}

/// Mixes a contiguous f32 batch in place: the pasted boxes (whole images for Mixup) are
/// rewritten from a snapshot of what they read, taken first.
pub(crate) fn mix_in_place(images: &Tensor, pastes: &[Paste]) -> Result<()> {
    let (_, channels, rows, cols) = images.dims4()?;
    let table = paste_table(pastes, channels, rows, cols)?;
    images.inplace_op1(&MixInPlaceOp {
        patches: table.patches,
        gather_work: table.gather_work,
        paste_work: table.paste_work,
        table: Tensor::from_vec(table.entries, (pastes.len(), ENTRIES), images.device())?,
    })
}

/// `(lam_a, lam_b)` `[B]` f32 from the presets and, for SnapMix samples, the box masses.
/// `table` holds per sample: preset lam_a, preset lam_b, area ratio of box_a, index among the
/// SnapMix pastes (-1 for none), partner; `masses` `[4 * pastes]` f64 on the GPU, where the
/// results are too.
pub(crate) fn label_weights(
    masses: &Tensor,
    targets: &Tensor,
    table: Vec<f64>,
    same_label_rule: bool,
) -> Result<(Tensor, Tensor)> {
    let batch = targets.dims1()?;
    let device = masses.device();
    let table = Tensor::from_vec(table, (batch, 5), device)?;
    // Labels may live on the host while the images are on the GPU: B values to upload.
    let targets = targets
        .to_device(device)?
        .to_dtype(DType::U32)?
        .contiguous()?;
    let lams = masses.contiguous()?.apply_op2_no_bwd(
        &targets,
        &LabelWeightsOp {
            table,
            same_label_rule,
        },
    )?;
    Ok((lams.get(0)?, lams.get(1)?))
}

/// The per-sample table of mix.cu and, when `channels > 0`, the in-place snapshot's layout.
struct PasteTable {
    entries: Vec<u32>,
    /// Length of the snapshot buffer (each sample's offset is in its entries).
    patches: usize,
    /// The most elements one sample copies into the snapshot / writes back.
    gather_work: usize,
    paste_work: usize,
}

fn paste_table(pastes: &[Paste], channels: usize, rows: usize, cols: usize) -> Result<PasteTable> {
    let full = PixelBox::full(rows, cols);
    let mut table = Vec::with_capacity(pastes.len() * ENTRIES);
    let (mut patches, mut gather_work, mut paste_work) = (0usize, 0usize, 0usize);
    let empty = PixelBox::default();
    for paste in pastes {
        let (kind, partner, from, to, (wa, wb)) = match *paste {
            Paste::Keep => (KEEP, 0, empty, empty, (0.0, 0.0)),
            Paste::Zero(bbox) => (ZERO, 0, empty, bbox, (0.0, 0.0)),
            // As the CPU kernel: both weights rounded to f32 from the f64 lam.
            Paste::Blend { partner, lam } => {
                (BLEND, partner, full, full, (lam as f32, (1.0 - lam) as f32))
            }
            Paste::Region { partner, from, to } => (REGION, partner, from, to, (0.0, 0.0)),
        };
        let offset = patches;
        if kind == BLEND || kind == REGION {
            patches += channels * from.area();
            gather_work = gather_work.max(channels * from.area());
        }
        paste_work = paste_work.max(channels * to.area());
        for v in [
            partner, from.row0, from.col0, from.row1, from.col1, to.row0, to.col0, to.row1, to.col1,
        ] {
            if v > u32::MAX as usize {
                bail!("snapmix-mix CUDA kernels: index {v} exceeds u32");
            }
        }
        if patches > u32::MAX as usize {
            bail!("snapmix-mix CUDA kernels: the in-place snapshot needs {patches} values, more than u32 indexes");
        }
        table.extend([
            kind,
            partner as u32,
            from.row0 as u32,
            from.col0 as u32,
            from.row1 as u32,
            from.col1 as u32,
            to.row0 as u32,
            to.col0 as u32,
            to.row1 as u32,
            to.col1 as u32,
            f32::to_bits(wa),
            f32::to_bits(wb),
            offset as u32,
        ]);
    }
    Ok(PasteTable {
        entries: table,
        patches,
        gather_work,
        paste_work,
    })
}

/// A contiguous view of a tensor the op holds (a table).
fn held_view<'a, T: CudaDType>(
    storage: &'a Storage,
    layout: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>> {
    let Storage::Cuda(storage) = storage else {
        bail!("snapmix-mix CUDA kernels: the {what} must be on the GPU");
    };
    view(storage, layout, what)
}

fn view<'a, T: CudaDType>(
    storage: &'a CudaStorage,
    layout: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("snapmix-mix CUDA kernels: the {what} must be contiguous");
    };
    Ok(storage.as_cuda_slice::<T>()?.slice(start..end))
}

/// Image geometry as the kernels' `int`s: batch, channels, rows, cols.
fn geometry(shape: &Shape) -> Result<[i32; 4]> {
    let (batch, channels, rows, cols) = shape.dims4()?;
    let mut out = [0i32; 4];
    for (o, v) in out.iter_mut().zip([batch, channels, rows, cols]) {
        *o = i32::try_from(v).map_err(|_| {
            candle_core::Error::Msg(format!(
                "snapmix-mix CUDA kernels: image dimension {v} exceeds i32"
            ))
        })?;
    }
    Ok(out)
}

/// A grid-stride launch over `work` elements per row of `rows_y` blocks.
fn grid(work: usize, rows_y: usize) -> Result<LaunchConfig> {
    if rows_y > 65535 {
        bail!("snapmix-mix CUDA kernels: batch {rows_y} exceeds 65535");
    }
    Ok(LaunchConfig {
        grid_dim: (
            work.div_ceil(BLOCK as usize).clamp(1, 1 << 20) as u32,
            rows_y as u32,
            1,
        ),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    })
}

fn cpu_only(name: &str) -> Result<(CpuStorage, Shape)> {
    bail!("{name} is a CUDA kernel: CPU tensors take the fused CPU path in snapmix-mix's cpu.rs")
}

struct MixOp {
    table: Tensor,
}

impl CustomOp1 for MixOp {
    fn name(&self) -> &'static str {
        "snapmix-mix-out-of-place"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_only(self.name())
    }

    fn cuda_fwd(&self, images: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let dims = geometry(layout.shape())?;
        let dev = &images.device;
        let (table_storage, table_layout) = self.table.storage_and_layout();
        let table = held_view::<u32>(&table_storage, table_layout, "paste table")?;
        let src = view::<f32>(images, layout, "images")?;
        let total = layout.shape().elem_count();
        let mut dst = unsafe { dev.alloc::<f32>(total)? };
        let func = dev.get_or_load_custom_func("mix_out_of_place", MODULE, PTX)?;
        let mut launch = func.builder();
        launch.arg(&src).arg(&mut dst).arg(&table);
        for d in &dims {
            launch.arg(d);
        }
        let [batch, channels, rows, cols] = dims.map(|d| d as usize);
        let (plane, planes) = (rows * cols, batch * channels);
        if plane > u32::MAX as usize || planes > u32::MAX as usize {
            bail!("snapmix-mix CUDA kernels: {planes} planes of {rows}x{cols} exceed u32 indexes");
        }
        let config = LaunchConfig {
            grid_dim: (
                plane.div_ceil(BLOCK as usize).clamp(1, 1 << 16) as u32,
                planes.clamp(1, 65535) as u32,
                1,
            ),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { launch.launch(config) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(dst, dev.clone()),
            layout.shape().clone(),
        ))
    }
}

struct MixInPlaceOp {
    table: Tensor,
    /// Length of the snapshot buffer (the `from` boxes of every channel).
    patches: usize,
    gather_work: usize,
    paste_work: usize,
}

impl InplaceOp1 for MixInPlaceOp {
    fn name(&self) -> &'static str {
        "snapmix-mix-in-place-cuda"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> Result<()> {
        cpu_only(self.name()).map(drop)
    }

    fn cuda_fwd(&self, images: &mut CudaStorage, layout: &Layout) -> Result<()> {
        let [batch, channels, rows, cols] = geometry(layout.shape())?;
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("snapmix-mix CUDA kernels: in-place images must be contiguous");
        };
        let dev = images.device.clone();
        let (table_storage, table_layout) = self.table.storage_and_layout();
        let table = held_view::<u32>(&table_storage, table_layout, "paste table")?;
        // At least one element so that the buffer exists when nothing is read from partners.
        let mut patches = unsafe { dev.alloc::<f32>(self.patches.max(1))? };
        {
            let src = view::<f32>(images, layout, "images")?;
            let func = dev.get_or_load_custom_func("mix_gather_patches", MODULE, PTX)?;
            let mut launch = func.builder();
            launch
                .arg(&src)
                .arg(&mut patches)
                .arg(&table)
                .arg(&channels)
                .arg(&rows)
                .arg(&cols);
            unsafe { launch.launch(grid(self.gather_work, batch as usize)?) }.w()?;
        }
        let mut dst = images.as_cuda_slice_mut::<f32>()?.slice_mut(start..end);
        let func = dev.get_or_load_custom_func("mix_paste_patches", MODULE, PTX)?;
        let mut launch = func.builder();
        launch
            .arg(&mut dst)
            .arg(&patches)
            .arg(&table)
            .arg(&channels)
            .arg(&rows)
            .arg(&cols);
        unsafe { launch.launch(grid(self.paste_work, batch as usize)?) }.w()?;
        Ok(())
    }
}

struct LabelWeightsOp {
    table: Tensor,
    same_label_rule: bool,
}

impl CustomOp2 for LabelWeightsOp {
    fn name(&self) -> &'static str {
        "snapmix-mix-label-weights"
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
        masses: &CudaStorage,
        masses_layout: &Layout,
        targets: &CudaStorage,
        targets_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let batch = targets_layout.shape().dims1()?;
        let dev = &targets.device;
        let (table_storage, table_layout) = self.table.storage_and_layout();
        let table = held_view::<f64>(&table_storage, table_layout, "label table")?;
        let masses = view::<f64>(masses, masses_layout, "box masses")?;
        let targets = view::<u32>(targets, targets_layout, "targets")?;
        let mut out = unsafe { dev.alloc::<f32>(2 * batch)? };
        let batch_arg = i32::try_from(batch)
            .map_err(|_| candle_core::Error::Msg(format!("batch {batch} exceeds i32")))?;
        let rule = i32::from(self.same_label_rule);
        let func = dev.get_or_load_custom_func("mix_label_weights", MODULE, PTX)?;
        let mut launch = func.builder();
        launch
            .arg(&masses)
            .arg(&targets)
            .arg(&table)
            .arg(&mut out)
            .arg(&batch_arg)
            .arg(&rule);
        let cfg = LaunchConfig {
            grid_dim: (batch.div_ceil(BLOCK as usize) as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { launch.launch(cfg) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((2, batch)),
        ))
    }
}
