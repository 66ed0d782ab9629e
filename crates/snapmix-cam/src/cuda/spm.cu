// CUDA twins of src/cpu.rs: the gather-matvec CAM, the SPM statistics (min and sum of the
// upsampled map, degenerate flag), the full-size SPM maps and box sums from the low-res CAM.
//
// Interpolation and the f64 sums use the CPU kernels' exact arithmetic and order (explicit
// round-to-nearest intrinsics, so nvcc cannot contract a*b + c*d into an FMA): only the CAM's
// channel sum runs in a different order. Launched from src/cuda.rs; all sizes are checked there.

#include <math.h>

// One bilinear tap with align_corners = false, exactly as `Taps::new` (src/interp.rs) computes
// it in f32: the lower source index, the upper one and their weights.
struct Tap {
    int i0, i1;
    float w0, w1;
};

__device__ __forceinline__ Tap tap(int in_size, int out_size, int dst) {
    float scale = __fdiv_rn((float)in_size, (float)out_size);
    float src = fmaxf(__fsub_rn(__fmul_rn(scale, __fadd_rn((float)dst, 0.5f)), 0.5f), 0.0f);
    int i0 = min((int)floorf(src), in_size - 1);
    float lambda1 = fminf(fmaxf(__fsub_rn(src, (float)i0), 0.0f), 1.0f);
    Tap t;
    t.i0 = i0;
    t.i1 = i0 < in_size - 1 ? i0 + 1 : i0;
    t.w0 = __fsub_rn(1.0f, lambda1);
    t.w1 = lambda1;
    return t;
}

// `Taps::extreme_positions`: the first and last output reading each source interval.
__device__ __forceinline__ bool extreme(int in_size, int out_size, int dst) {
    if (dst == 0 || dst + 1 == out_size) return true;
    int here = tap(in_size, out_size, dst).i0;
    return tap(in_size, out_size, dst - 1).i0 != here || tap(in_size, out_size, dst + 1).i0 != here;
}

__device__ __forceinline__ float lerp2(float a, float wa, float b, float wb) {
    return __fadd_rn(__fmul_rn(a, wa), __fmul_rn(b, wb));
}

// The upsampled (unnormalised) CAM at output (r, c): columns first, then the two rows, as
// `Upsample::column_pass` + `Upsample::output_row`.
__device__ __forceinline__ float upsampled(const float* plane, int h, int w, Tap tr, Tap tc) {
    const float* top = plane + (size_t)tr.i0 * w;
    const float* bottom = plane + (size_t)tr.i1 * w;
    float t = lerp2(top[tc.i0], tc.w0, top[tc.i1], tc.w1);
    float b = lerp2(bottom[tc.i0], tc.w0, bottom[tc.i1], tc.w1);
    return lerp2(t, tr.w0, b, tr.w1);
}

// `Upsample::box_sum_raw`, by one block: the sum of the upsampled CAM over rows [r0, r1) and
// cols [c0, c1), from the summed interpolation weights, in f64 and in the CPU's order (each
// source row's dot product left to right, then the rows top to bottom). `shared` holds h + w + h
// doubles. The result is valid in thread 0 only.
__device__ double box_sum_raw(const float* plane, int h, int w, int rows, int cols, int r0, int r1,
                              int c0, int c1, double* shared) {
    double* row_weights = shared;
    double* col_weights = shared + h;
    double* row_terms = shared + h + w;
    if (r1 <= r0 || c1 <= c0) return 0.0;
    // `Taps::source_weights`: each source index accumulates its weight over the output range
    // in increasing order, so the f64 sums round exactly as on the CPU. Only the outputs whose
    // source position lies in [src - 1, src + 1) can read `src`: that window (widened by two
    // outputs on each side against rounding) is all that is visited.
    for (int s = threadIdx.x; s < h + w; s += blockDim.x) {
        bool is_row = s < h;
        int src = is_row ? s : s - h;
        int in_size = is_row ? h : w, out_size = is_row ? rows : cols;
        float outputs_per_input = (float)out_size / (float)in_size;
        int lo = max(is_row ? r0 : c0, (int)floorf((src - 0.5f) * outputs_per_input - 0.5f) - 2);
        int hi = min(is_row ? r1 : c1, (int)ceilf((src + 1.5f) * outputs_per_input - 0.5f) + 2);
        double acc = 0.0;
        for (int d = lo; d < hi; ++d) {
            Tap t = tap(in_size, out_size, d);
            if (t.i0 == src) acc += (double)t.w0;
            if (t.i1 == src) acc += (double)t.w1;
        }
        (is_row ? row_weights : col_weights)[src] = acc;
    }
    __syncthreads();
    for (int s = threadIdx.x; s < h; s += blockDim.x) {
        double rw = row_weights[s];
        double term = 0.0;
        if (rw != 0.0) {
            const float* row = plane + (size_t)s * w;
            double dot = 0.0;
            for (int c = 0; c < w; ++c) dot = __dadd_rn(dot, __dmul_rn((double)row[c], col_weights[c]));
            term = rw * dot;
        }
        row_terms[s] = term;
    }
    __syncthreads();
    double total = 0.0;
    if (threadIdx.x == 0) {
        // Rows with zero weight are skipped, as the CPU's filter does (0 * inf would be NaN).
        for (int s = 0; s < h; ++s)
            if (row_weights[s] != 0.0) total += row_terms[s];
    }
    __syncthreads();
    return total;
}

// cam[b, p] = bias[y_b] + sum_c relu(features[b, c, p]) * weight[y_b, c]: only each sample's own
// class row is read. Block (32, CHANNEL_GROUPS): 32 neighbouring pixels (coalesced loads), the
// channels split over the groups and summed in shared memory in a fixed order (deterministic).
#define CHANNEL_GROUPS 16
extern "C" __global__ void cam_gather_matvec(const float* features, const float* weight,
                                             const float* bias, const unsigned int* targets,
                                             float* cam, int channels, int pixels) {
    __shared__ float partial[CHANNEL_GROUPS][33];
    int b = blockIdx.y;
    int p = blockIdx.x * 32 + threadIdx.x;
    unsigned int label = targets[b];
    const float* w = weight + (size_t)label * channels;
    const float* f = features + (size_t)b * channels * pixels;
    float acc = 0.0f;
    if (p < pixels) {
#pragma unroll 4
        for (int c = threadIdx.y; c < channels; c += CHANNEL_GROUPS)
            acc += fmaxf(f[(size_t)c * pixels + p], 0.0f) * w[c];
    }
    partial[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && p < pixels) {
        float sum = 0.0f;
        for (int g = 0; g < CHANNEL_GROUPS; ++g) sum += partial[g][threadIdx.x];
        cam[(size_t)b * pixels + p] = sum + bias[label];
    }
}

// One block per sample: stats[b] = (min, sum, degenerate) as `Upsample::norm`: the minimum of
// the upsampled CAM over the output rows where it can occur, the sum of (upsampled - min) from
// the interpolation weights, and whether the SPM is undefined (non-finite or constant CAM, or a
// sum that is not positive and finite). Dynamic shared memory: (2h + w) doubles.
extern "C" __global__ void spm_stats(const float* cam, double* stats, int h, int w, int rows,
                                     int cols) {
    extern __shared__ double shared[];
    __shared__ float red_lo[256], red_hi[256], red_min[256];
    __shared__ int red_bad[256];
    int b = blockIdx.x;
    const float* plane = cam + (size_t)b * h * w;

    float lo = INFINITY, hi = -INFINITY;
    int bad = 0;
    for (int i = threadIdx.x; i < h * w; i += blockDim.x) {
        float v = plane[i];
        lo = fminf(lo, v);
        hi = fmaxf(hi, v);
        bad |= !isfinite(v);
    }
    // One warp per candidate row (few rows are extreme), its lanes across the columns.
    float low = INFINITY;
    int lane = threadIdx.x % 32, warps = blockDim.x / 32;
    for (int r = threadIdx.x / 32; r < rows; r += warps) {
        if (!extreme(h, rows, r)) continue;
        Tap tr = tap(h, rows, r);
        for (int c = lane; c < cols; c += 32)
            low = fminf(low, upsampled(plane, h, w, tr, tap(w, cols, c)));
    }
    red_lo[threadIdx.x] = lo;
    red_hi[threadIdx.x] = hi;
    red_min[threadIdx.x] = low;
    red_bad[threadIdx.x] = bad;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (threadIdx.x < stride) {
            int o = threadIdx.x + stride;
            red_lo[threadIdx.x] = fminf(red_lo[threadIdx.x], red_lo[o]);
            red_hi[threadIdx.x] = fmaxf(red_hi[threadIdx.x], red_hi[o]);
            red_min[threadIdx.x] = fminf(red_min[threadIdx.x], red_min[o]);
            red_bad[threadIdx.x] |= red_bad[o];
        }
        __syncthreads();
    }
    double total = box_sum_raw(plane, h, w, rows, cols, 0, rows, 0, cols, shared);
    if (threadIdx.x == 0) {
        float minimum = red_min[0];
        double sum = __dsub_rn(total, __dmul_rn((double)minimum, (double)rows * (double)cols));
        bool degenerate = red_bad[0] || red_lo[0] == red_hi[0] || !(sum > 0.0 && isfinite(sum));
        stats[b * 3 + 0] = (double)minimum;
        stats[b * 3 + 1] = sum;
        stats[b * 3 + 2] = degenerate ? 1.0 : 0.0;
    }
}

// The SPMs [B, rows, cols], one thread per pixel, as `Upsample::write`: (upsampled - min) / sum
// clamped at 0, all zero for a degenerate sample.
extern "C" __global__ void spm_maps(const float* cam, const double* stats, float* maps, int batch,
                                    int h, int w, int rows, int cols) {
    size_t total = (size_t)batch * rows * cols;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        int c = (int)(i % cols);
        int r = (int)((i / cols) % rows);
        int b = (int)(i / ((size_t)rows * cols));
        const double* s = stats + (size_t)b * 3;
        if (s[2] != 0.0) {
            maps[i] = 0.0f;
            continue;
        }
        float minimum = (float)s[0];
        float scale = (float)(1.0 / s[1]);
        float v = upsampled(cam + (size_t)b * h * w, h, w, tap(h, rows, r), tap(w, cols, c));
        maps[i] = fmaxf(__fmul_rn(__fsub_rn(v, minimum), scale), 0.0f);
    }
}

// One block per request (sample, row0, col0, row1, col1): the SPM mass of that box, as
// `Upsample::box_sum`: NaN for a degenerate sample, 0 for an empty box. Dynamic shared memory:
// (2h + w) doubles.
extern "C" __global__ void spm_box_sums(const float* cam, const double* stats,
                                        const unsigned int* requests, double* sums, int h, int w,
                                        int rows, int cols) {
    extern __shared__ double shared[];
    const unsigned int* q = requests + (size_t)blockIdx.x * 5;
    int b = (int)q[0];
    int r0 = (int)q[1], c0 = (int)q[2], r1 = (int)q[3], c1 = (int)q[4];
    const double* s = stats + (size_t)b * 3;
    if (s[2] != 0.0) {
        if (threadIdx.x == 0) sums[blockIdx.x] = nan("");
        return;
    }
    double raw = box_sum_raw(cam + (size_t)b * h * w, h, w, rows, cols, r0, r1, c0, c1, shared);
    if (threadIdx.x == 0) {
        double area = (double)(r1 > r0 ? r1 - r0 : 0) * (double)(c1 > c0 ? c1 - c0 : 0);
        sums[blockIdx.x] = __dsub_rn(raw, __dmul_rn(s[0], area)) / s[1];
    }
}
