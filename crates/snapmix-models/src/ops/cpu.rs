//! CPU plumbing shared by the custom training ops: borrowing contiguous f32 data from candle
//! storages, a per-thread pool of scratch buffers reused across calls, and a GEMM wrapper.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Device, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;
use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::ops::{Deref, DerefMut};

/// The contiguous f32 data of a CPU storage, or a clear error naming `what`.
pub(crate) fn storage_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> Result<&'a [f32]> {
    let data = match storage {
        CpuStorage::F32(data) => data.as_slice(),
        other => bail!(
            "{what}: only f32 is supported by this op on the CPU, got {:?}",
            other.dtype()
        ),
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{what}: the tensor must be contiguous"),
    }
}

/// Runs `f` on the contiguous f32 data of a CPU tensor (used in backward passes, where the op
/// receives tensors rather than storages).
pub(crate) fn with_tensor_f32<R>(
    tensor: &Tensor,
    what: &str,
    f: impl FnOnce(&[f32]) -> Result<R>,
) -> Result<R> {
    let (storage, layout) = tensor.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => f(storage_f32(cpu, layout, what)?),
        _ => bail!(
            "{what}: expected a CPU tensor, got one on {:?}",
            tensor.device().location()
        ),
    }
}

/// Wraps an owned f32 buffer as a CPU tensor without copying.
pub(crate) fn cpu_tensor(data: Vec<f32>, shape: impl Into<Shape>) -> Result<Tensor> {
    Tensor::from_vec(data, shape, &Device::Cpu)
}

/// `dst += src`, in parallel; the lengths must match.
pub(crate) fn add_assign(dst: &mut [f32], src: &[f32]) -> Result<()> {
    if dst.len() != src.len() {
        bail!("add_assign: {} values added to {}", src.len(), dst.len());
    }
    dst.par_chunks_mut(1 << 15)
        .zip(src.par_chunks(1 << 15))
        .for_each(|(dst, src)| {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d += s;
            }
        });
    Ok(())
}

/// The sum of row-major `rows x cols` matrices, transposed: element (j, i) of the result is the
/// sum over `parts` (added in their order, from zero) of their (i, j). Done in 16x16 tiles (a
/// cache line of each of 16 rows at a time) and in parallel over bands of rows, in one pass.
pub(crate) fn transposed_sum<P: Deref<Target = [f32]> + Sync>(
    parts: &[P],
    rows: usize,
    cols: usize,
) -> Result<Vec<f32>> {
    const TILE: usize = 16;
    if let Some(part) = parts.iter().find(|part| part.len() != rows * cols) {
        bail!(
            "transposed sum: a {rows}x{cols} matrix from {} values",
            part.len()
        );
    }
    let mut dst = zeros(rows * cols);
    if dst.is_empty() {
        return Ok(dst);
    }
    // A band: TILE rows of dst (TILE columns of the parts).
    dst.par_chunks_mut(TILE * rows)
        .enumerate()
        .for_each(|(band, dst)| {
            let first_col = band * TILE;
            let band_cols = dst.len() / rows;
            for first_row in (0..rows).step_by(TILE) {
                for part in parts {
                    for row in first_row..(first_row + TILE).min(rows) {
                        let src_row = &part[row * cols + first_col..][..band_cols];
                        for (j, &value) in src_row.iter().enumerate() {
                            dst[j * rows + row] += value;
                        }
                    }
                }
            }
        });
    Ok(dst)
}

/// A new vector of `len` zeros (`T::default()`), written by all threads: a serial
/// `vec![0.0; len]` of a few MB before a parallel kernel was one thread's time alone (perf:
/// 5-6% of a ResNet-18 step, mostly zeroed outputs and gradients).
pub(crate) fn zeros<T: Copy + Default + Send + Sync>(len: usize) -> Vec<T> {
    /// Values per task: 64 KiB of f32s, large enough that a task outlasts its scheduling.
    const CHUNK: usize = 1 << 14;
    let mut values = Vec::with_capacity(len);
    values.spare_capacity_mut()[..len]
        .par_chunks_mut(CHUNK)
        .for_each(|chunk| {
            zeroed(chunk);
        });
    // SAFETY: the capacity is at least `len` and the loop above initialised all `len` values.
    unsafe { values.set_len(len) };
    values
}

/// A new `len`-long vector written on all threads in `chunk`-long chunks by `fill(index,
/// chunk)`, each chunk zeroed (`T::default()`) just before by the task that fills it (in that
/// core's cache: no pass over the whole buffer first), and `fill`'s results in chunk order.
pub(crate) fn build_in_chunks<T: Copy + Default + Send + Sync, R: Send>(
    len: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [T]) -> Result<R> + Sync,
) -> Result<(Vec<T>, Vec<R>)> {
    let mut values = Vec::with_capacity(len);
    let results = values.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .map(|(index, chunk)| fill(index, zeroed(chunk)))
        .collect::<Result<Vec<R>>>()?;
    // SAFETY: `collect` returned Ok, so it ran every chunk of the first `len` values, each
    // initialised by `zeroed`.
    unsafe { values.set_len(len) };
    Ok((values, results))
}

/// `chunk` filled with `T::default()`, as the initialised slice it now is.
fn zeroed<T: Copy + Default>(chunk: &mut [MaybeUninit<T>]) -> &mut [T] {
    chunk.fill(MaybeUninit::new(T::default()));
    // SAFETY: every value of `chunk` was initialised just above.
    unsafe { &mut *(chunk as *mut [MaybeUninit<T>] as *mut [T]) }
}

/// Image planes (one channel of one image, `pixels` values) per rayon task in the elementwise
/// passes: small feature maps (2x2 in layer4 at low resolution) would otherwise make one task
/// per handful of values.
pub(crate) fn min_planes_per_task(pixels: usize) -> usize {
    (4096 / pixels.max(1)).max(1)
}

/// Buffers kept per thread between calls: the im2col matrices of a training step are the same
/// few sizes every step, so after the first step no large scratch allocation happens. Since
/// the batch-wide forwards keep their im2col until backward, a step holds more than 4 at once:
/// with 4, each ResNet-18 step grew (and zeroed) several again; with 16, none (perf), for a
/// peak RSS of R50 b16 112x112 of 852 -> 904 MB.
const MAX_POOLED_BUFFERS: usize = 16;

thread_local! {
    static POOL: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// A scratch buffer of `len` f32s with unspecified contents, returned to the pool on drop.
pub(crate) struct Scratch {
    buffer: Vec<f32>,
    len: usize,
}

impl Scratch {
    /// Takes the smallest pooled buffer that fits `len` (or grows the largest one).
    pub(crate) fn take(len: usize) -> Self {
        let mut buffer = POOL.with(|pool| {
            let mut pool = pool.borrow_mut();
            let fitting = pool
                .iter()
                .enumerate()
                .filter(|(_, b)| b.len() >= len)
                .min_by_key(|(_, b)| b.len())
                .map(|(i, _)| i);
            let largest = pool
                .iter()
                .enumerate()
                .max_by_key(|(_, b)| b.len())
                .map(|(i, _)| i);
            match fitting.or(largest) {
                Some(i) => pool.swap_remove(i),
                None => Vec::new(),
            }
        });
        if buffer.len() < len {
            // Zeroed once, on all threads; later takes of this size reuse it as it is.
            buffer = zeros(len);
        }
        Self { buffer, len }
    }
}

impl Deref for Scratch {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buffer[..self.len]
    }
}

impl DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.buffer[..self.len]
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let buffer = std::mem::take(&mut self.buffer);
        // `try_with`: during thread teardown the pool may already be gone; then just free.
        let _ = POOL.try_with(|pool| {
            let mut pool = pool.borrow_mut();
            pool.push(buffer);
            if pool.len() > MAX_POOLED_BUFFERS {
                // Drop the smallest: the large ones are the expensive ones to rebuild.
                if let Some((i, _)) = pool.iter().enumerate().min_by_key(|(_, b)| b.len()) {
                    pool.swap_remove(i);
                }
            }
        });
    }
}

/// A read-only matrix view: element (i, j) is `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major `rows x cols` matrix.
    pub(crate) fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// A `rows x cols` matrix whose element (i, j) is `data[i * row_stride + j * col_stride]`.
    pub(crate) fn strided(
        data: &'a [f32],
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        }
    }

    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

    /// Columns `start..start + len` of the matrix, as a view.
    pub(crate) fn columns(self, start: usize, len: usize) -> Self {
        let offset = (start * self.col_stride).min(self.data.len());
        Self {
            data: &self.data[offset..],
            cols: len.min(self.cols.saturating_sub(start)),
            ..self
        }
    }

    /// Rows `start..start + len` of the matrix, as a view.
    pub(crate) fn row_range(self, start: usize, len: usize) -> Self {
        self.t().columns(start, len).t()
    }

    /// The transpose, as a view.
    pub(crate) fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
                < self.data.len()
    }
}

/// `dst = lhs * rhs` (or `dst += lhs * rhs` when `accumulate`), with `dst` row-major
/// `lhs.rows x rhs.cols`; multi-threaded on rayon's pool (see [`PARALLEL_MIN_MACS`]).
pub(crate) fn matmul(dst: &mut [f32], accumulate: bool, lhs: MatRef, rhs: MatRef) -> Result<()> {
    gemm_into(dst, rhs.cols, accumulate, lhs, rhs, true)
}

/// `lhs * rhs` as a new row-major vector, multi-threaded like [`matmul`], never zero-filled
/// first: not accumulating, the GEMM writes every value without reading any.
pub(crate) fn matmul_new(lhs: MatRef, rhs: MatRef) -> Result<Vec<f32>> {
    let len = lhs.rows * rhs.cols;
    let mut dst = Vec::with_capacity(len);
    // SAFETY: `dst` has room for `len` values; not accumulating, `gemm_raw` writes all `len`
    // (m rows of n, `n` apart) and reads none; on an error it wrote nothing and `dst` stays
    // empty.
    unsafe {
        let out = dst.spare_capacity_mut().as_mut_ptr().cast::<f32>();
        gemm_raw(out, len, rhs.cols, false, lhs, rhs, true)?;
        dst.set_len(len);
    }
    Ok(dst)
}

/// [`matmul`] on the calling thread only, for GEMMs that are themselves tasks of a parallel loop.
pub(crate) fn matmul_serial(
    dst: &mut [f32],
    accumulate: bool,
    lhs: MatRef,
    rhs: MatRef,
) -> Result<()> {
    gemm_into(dst, rhs.cols, accumulate, lhs, rhs, false)
}

/// [`matmul_serial`] into a `lhs.rows x rhs.cols` block of a larger row-major matrix whose rows
/// are `dst_row_stride` apart, starting at `dst[0]`.
pub(crate) fn matmul_serial_into_block(
    dst: &mut [f32],
    dst_row_stride: usize,
    accumulate: bool,
    lhs: MatRef,
    rhs: MatRef,
) -> Result<()> {
    gemm_into(dst, dst_row_stride, accumulate, lhs, rhs, false)
}

/// Reduction length from which [`gemm_raw`] may split a parallel GEMM by columns though its
/// output is taller than wide.
const LONG_REDUCTION: usize = 2048;

/// Multiply-adds from which [`matmul`] splits its GEMM between threads; below it (about 10 us
/// of work) the split costs more than it saves.
const PARALLEL_MIN_MACS: usize = 1 << 20;

/// Rows or columns of a split GEMM's blocks are a multiple of this, the kernels' register tile.
const SPLIT_ALIGN: usize = 16;

/// Rows per block, at most, when a GEMM is split by rows (then into the same number of blocks
/// per thread). Layer4's input-gradient GEMM (4608 x 256 x 512, the weight transposed) ran at
/// 176-194 GFLOP/s in blocks of 2304, 1152 or 768 rows, 280 in blocks of 576, 255-263 in
/// smaller ones; the column splits measured showed no such step.
const MAX_ROWS_PER_BLOCK: usize = 576;

/// `dst`'s base pointer, shared by the tasks of a split GEMM that write disjoint blocks of it.
#[derive(Clone, Copy)]
struct SharedDst(*mut f32);

// SAFETY: the tasks holding a `SharedDst` write disjoint blocks of the buffer (see `gemm_into`).
unsafe impl Send for SharedDst {}
unsafe impl Sync for SharedDst {}

impl SharedDst {
    fn at(self, offset: usize) -> *mut f32 {
        // SAFETY (of the callers): `offset` lies within the buffer this pointer came from.
        self.0.wrapping_add(offset)
    }
}

fn gemm_into(
    dst: &mut [f32],
    dst_row_stride: usize,
    accumulate: bool,
    lhs: MatRef,
    rhs: MatRef,
    parallel: bool,
) -> Result<()> {
    // SAFETY: `dst` is an initialised buffer of `dst.len()` values.
    unsafe {
        gemm_raw(
            dst.as_mut_ptr(),
            dst.len(),
            dst_row_stride,
            accumulate,
            lhs,
            rhs,
            parallel,
        )
    }
}

/// The GEMM behind [`gemm_into`] and [`matmul_new`]: checks that the operands and the
/// `m x n` output (rows `dst_row_stride` apart) fit, then writes it, reading `dst` only when
/// `accumulate`.
///
/// # Safety
/// `dst` must be valid for writes of `dst_len` values, and initialised when `accumulate`.
unsafe fn gemm_raw(
    dst: *mut f32,
    dst_len: usize,
    dst_row_stride: usize,
    accumulate: bool,
    lhs: MatRef,
    rhs: MatRef,
    parallel: bool,
) -> Result<()> {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    let dst_fits = if dst_row_stride == n {
        dst_len == m * n
    } else {
        dst_row_stride >= n && (m == 0 || (m - 1) * dst_row_stride + n <= dst_len)
    };
    if rhs.rows != k || !dst_fits || !lhs.in_bounds() || !rhs.in_bounds() {
        bail!(
            "matmul: shape mismatch ({m}x{k}) * ({}x{n}) into a buffer of {dst_len} with rows {dst_row_stride} apart",
            rhs.rows
        );
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            for row in 0..m {
                // SAFETY: row `row`'s `n` values lie inside the checked output.
                unsafe { std::ptr::write_bytes(dst.add(row * dst_row_stride), 0, n) };
            }
        }
        return Ok(());
    }
    tune_gemm_once();
    let dst = SharedDst(dst);
    let threads = rayon::current_num_threads();
    if !parallel || threads < 2 || m * n * k < PARALLEL_MIN_MACS {
        // SAFETY: checked above: both operands are in bounds and `dst` holds m rows of n.
        unsafe { gemm_serial(dst.0, dst_row_stride, accumulate, lhs, rhs) };
        return Ok(());
    }
    // Blocks of the larger output axis, the same number per thread, each a serial GEMM: `gemm`'s
    // own threading ran ResNet layer4's shapes (e.g. 512 x 256 x 4608) at 0.7-0.9x of this.
    // Long reductions into outputs less than twice as tall as wide split by columns instead:
    // two threads, hot caches, M 512 x N 256 with K 4608 / 2304 / 2048 (ResNet's layer4
    // forwards) 332 / 324 / 310 -> 357 / 349 / 342 GFLOP/s, where with K 1152 or less rows
    // stayed ahead (M 384 x N 256 x K 1152: 348 against 303).
    let split_rows = m >= n && !(k >= LONG_REDUCTION && m <= 2 * n);
    let axis = if split_rows { m } else { n };
    let blocks_per_thread = if split_rows {
        axis.div_ceil(threads * MAX_ROWS_PER_BLOCK)
    } else {
        1
    };
    let block = axis
        .div_ceil(threads * blocks_per_thread)
        .next_multiple_of(SPLIT_ALIGN);
    (0..axis.div_ceil(block)).into_par_iter().for_each(|task| {
        let (start, len) = (task * block, block.min(axis - task * block));
        // SAFETY: each task writes its own rows (or columns) `start..start + len` of `dst`,
        // which lie inside the checked m x n output; the operand views are sub-views of
        // in-bounds ones.
        unsafe {
            if split_rows {
                let out = dst.at(start * dst_row_stride);
                gemm_serial(
                    out,
                    dst_row_stride,
                    accumulate,
                    lhs.row_range(start, len),
                    rhs,
                );
            } else {
                let out = dst.at(start);
                gemm_serial(
                    out,
                    dst_row_stride,
                    accumulate,
                    lhs,
                    rhs.columns(start, len),
                );
            }
        }
    });
    Ok(())
}

/// `gemm` packs a strided left operand into contiguous panels only when the output has more
/// than `threshold * 6` columns (threshold 8 by default). ResNet's input-gradient GEMMs read the
/// weight transposed; with 64 their packing is skipped and they ran 7-30% faster (layer2's per
/// image, layer4's batch-wide), other conv GEMMs within 3%.
fn tune_gemm_once() {
    static TUNED: std::sync::Once = std::sync::Once::new();
    TUNED.call_once(|| gemm::set_lhs_packing_threshold_single_thread(64));
}

/// One `gemm` call on the calling thread: `dst (+)= lhs * rhs`, `dst` rows `dst_row_stride`
/// apart.
///
/// # Safety
/// `lhs` and `rhs` must be in bounds, with `lhs.cols == rhs.rows`, and `dst` must be valid for
/// writes of `lhs.rows` rows of `rhs.cols` values, `dst_row_stride` apart, that no other thread
/// touches during the call.
unsafe fn gemm_serial(
    dst: *mut f32,
    dst_row_stride: usize,
    accumulate: bool,
    lhs: MatRef,
    rhs: MatRef,
) {
    gemm::gemm(
        lhs.rows,
        rhs.cols,
        lhs.cols,
        dst,
        1,
        dst_row_stride as isize,
        accumulate,
        lhs.data.as_ptr(),
        lhs.col_stride as isize,
        lhs.row_stride as isize,
        rhs.data.as_ptr(),
        rhs.col_stride as isize,
        rhs.row_stride as isize,
        if accumulate { 1.0 } else { 0.0 },
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(lhs: MatRef, rhs: MatRef) -> Vec<f32> {
        let mut out = vec![0.0; lhs.rows * rhs.cols];
        for i in 0..lhs.rows {
            for j in 0..rhs.cols {
                out[i * rhs.cols + j] = (0..lhs.cols)
                    .map(|p| {
                        lhs.data[i * lhs.row_stride + p * lhs.col_stride]
                            * rhs.data[p * rhs.row_stride + j * rhs.col_stride]
                    })
                    .sum();
            }
        }
        out
    }

    #[test]
    fn matmul_matches_a_naive_product_with_transposes_and_accumulation() -> Result<()> {
        let a: Vec<f32> = (0..35).map(|v| (v as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..42).map(|v| (v as f32 * 0.91).cos()).collect();
        // (5x7) * (7x6), and (7x5)^T * (6x7)^T
        for (lhs, rhs) in [
            (MatRef::row_major(&a, 5, 7), MatRef::row_major(&b, 7, 6)),
            (
                MatRef::row_major(&a, 7, 5).t(),
                MatRef::row_major(&b, 6, 7).t(),
            ),
        ] {
            let expected = naive(lhs, rhs);
            let mut dst = vec![0.0; 30];
            matmul(&mut dst, false, lhs, rhs)?;
            for (got, want) in dst.iter().zip(&expected) {
                assert!((got - want).abs() < 1e-5, "{got} vs {want}");
            }
            matmul(&mut dst, true, lhs, rhs)?;
            for (got, want) in dst.iter().zip(&expected) {
                assert!((got - 2.0 * want).abs() < 1e-5, "{got} vs 2 * {want}");
            }
        }
        let mut wrong = vec![0.0; 29];
        assert!(matmul(
            &mut wrong,
            false,
            MatRef::row_major(&a, 5, 7),
            MatRef::row_major(&b, 7, 6)
        )
        .is_err());
        Ok(())
    }

    #[test]
    fn parallel_matmul_splits_rows_or_columns_without_changing_the_product() -> Result<()> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .map_err(candle_core::Error::wrap)?;
        // Tall (split by rows) and wide (split by columns), each above PARALLEL_MIN_MACS, with
        // block ends that are not multiples of SPLIT_ALIGN; transposed operands for two.
        // The tallest in two blocks per thread (MAX_ROWS_PER_BLOCK); a long reduction into a
        // taller than wide output split by columns (LONG_REDUCTION).
        for (m, k, n, transposed) in [
            (200, 130, 45, false),
            (37, 150, 190, true),
            (1800, 16, 40, true),
            (50, LONG_REDUCTION, 45, false),
        ] {
            assert!(m * n * k >= PARALLEL_MIN_MACS);
            let a: Vec<f32> = (0..m * k).map(|v| (v as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..k * n).map(|v| (v as f32 * 0.91).cos()).collect();
            let (lhs, rhs) = if transposed {
                (
                    MatRef::row_major(&a, k, m).t(),
                    MatRef::row_major(&b, n, k).t(),
                )
            } else {
                (MatRef::row_major(&a, m, k), MatRef::row_major(&b, k, n))
            };
            let expected = naive(lhs, rhs);
            let mut dst = vec![1.0; m * n];
            pool.install(|| matmul(&mut dst, true, lhs, rhs))?;
            for (i, (got, want)) in dst.iter().zip(&expected).enumerate() {
                assert!(
                    (got - 1.0 - want).abs() < 1e-4,
                    "{m}x{n} [{i}]: {got} vs 1 + {want}"
                );
            }
            // A new product: every value written, none read.
            let new = pool.install(|| matmul_new(lhs, rhs))?;
            assert_eq!(new.len(), m * n);
            for (i, (got, want)) in new.iter().zip(&expected).enumerate() {
                assert!(
                    (got - want).abs() < 1e-4,
                    "new {m}x{n} [{i}]: {got} vs {want}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn new_products_of_an_empty_reduction_are_zeros_and_mismatches_are_errors() -> Result<()> {
        let none: [f32; 0] = [];
        let (lhs, rhs) = (
            MatRef::row_major(&none, 3, 0),
            MatRef::row_major(&none, 0, 2),
        );
        assert_eq!(matmul_new(lhs, rhs)?, vec![0.0; 6]);
        let a = [1.0f32; 6];
        let err = matmul_new(MatRef::row_major(&a, 2, 3), MatRef::row_major(&a, 2, 3))
            .unwrap_err()
            .to_string();
        assert!(err.contains("shape mismatch (2x3) * (2x3)"), "{err}");
        Ok(())
    }

    #[test]
    fn sums_and_transposes_in_tiles_with_ragged_edges() -> Result<()> {
        for (rows, cols) in [(37, 21), (5, 40), (16, 16), (1, 3)] {
            let parts: Vec<Vec<f32>> = (0..3)
                .map(|p| (0..rows * cols).map(|v| (v * 7 + p) as f32).collect())
                .collect();
            let single = transposed_sum(&parts[..1], rows, cols)?;
            let sum = transposed_sum(&parts, rows, cols)?;
            for i in 0..rows * cols {
                let (col, row) = (i / rows, i % rows);
                let at = row * cols + col;
                assert_eq!(single[i], parts[0][at], "{rows}x{cols} at ({row}, {col})");
                let want = (0.0 + parts[0][at]) + parts[1][at] + parts[2][at];
                assert_eq!(sum[i], want, "{rows}x{cols} at ({row}, {col})");
            }
        }
        assert!(transposed_sum(&[vec![0.0; 6], vec![0.0; 5]], 2, 3).is_err());
        Ok(())
    }

    #[test]
    fn matmul_into_a_block_writes_only_the_block() -> Result<()> {
        let a: Vec<f32> = (0..12).map(|v| (v as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..12).map(|v| (v as f32 * 0.91).cos()).collect();
        let (lhs, rhs) = (MatRef::row_major(&a, 3, 4), MatRef::row_major(&b, 4, 3));
        let expected = naive(lhs, rhs);
        // The 3x3 product into columns 2..5 of a 3x7 matrix of sevens.
        let mut dst = [7.0; 21];
        matmul_serial_into_block(&mut dst[2..], 7, true, lhs, rhs)?;
        for (i, value) in dst.iter().enumerate() {
            let (row, col) = (i / 7, i % 7);
            let want = if (2..5).contains(&col) {
                7.0 + expected[row * 3 + col - 2]
            } else {
                7.0
            };
            assert!(
                (value - want).abs() < 1e-5,
                "({row}, {col}): {value} vs {want}"
            );
        }
        let err = matmul_serial_into_block(&mut dst[5..], 7, false, lhs, rhs).unwrap_err();
        assert!(err.to_string().contains("rows 7 apart"), "{err}");
        Ok(())
    }

    #[test]
    fn scratch_buffers_are_reused() {
        let first_ptr = {
            let mut s = Scratch::take(1000);
            s[999] = 1.0;
            s.as_ptr()
        };
        let again = Scratch::take(800);
        assert_eq!(again.len(), 800);
        assert_eq!(again.as_ptr(), first_ptr);
    }

    #[test]
    fn zeros_everywhere_on_all_threads() {
        // Empty, shorter than a task's chunk, and ending in a partial chunk; over a buffer that
        // held other values, as the allocator's recycled memory does.
        drop(vec![2.5f32; 3 * (1 << 14) + 7]);
        for len in [0, 5, 3 * (1 << 14) + 7] {
            let values = zeros::<f32>(len);
            assert_eq!(values.len(), len);
            assert!(values.iter().all(|&v| v == 0.0));
        }
        assert_eq!(zeros::<u32>(3), vec![0, 0, 0]);
    }

    #[test]
    fn vectors_built_in_chunks_hand_each_chunk_zeroed_and_keep_the_results_in_order() -> Result<()>
    {
        let (values, firsts) = build_in_chunks(10, 4, |index, chunk| {
            assert!(chunk.iter().all(|&v| v == 0.0));
            chunk[0] = index as f32 + 1.0;
            Ok((index, chunk.len()))
        })?;
        assert_eq!(values, [1.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 3.0, 0.0]);
        assert_eq!(firsts, [(0, 4), (1, 4), (2, 2)]);
        assert!(build_in_chunks(0, 4, |_, _: &mut [f32]| Ok(()))?
            .0
            .is_empty());
        let failing = build_in_chunks(8, 2, |index, _: &mut [f32]| match index {
            2 => candle_core::bail!("chunk {index}"),
            _ => Ok(()),
        });
        assert!(failing.is_err());
        Ok(())
    }
}
