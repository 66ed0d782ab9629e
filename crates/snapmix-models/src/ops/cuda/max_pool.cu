// Max pooling over NCHW f32 planes, the CUDA twin of ops/max_pool.rs: the first maximum of each
// window wins (NaN wins and propagates), padding never does; backward gathers, for each input,
// the output gradients of the windows whose argmax it is (no atomics: deterministic).
#include <stddef.h>

struct Pool {
    size_t rows, cols, out_rows, out_cols, kernel, stride, padding;
};

// Index in the plane of the first maximum of output cell (out_row, out_col).
__device__ size_t window_argmax(const float* plane, const Pool& p, size_t out_row,
                                size_t out_col) {
    size_t row_start = out_row * p.stride > p.padding ? out_row * p.stride - p.padding : 0;
    size_t row_end = min(out_row * p.stride + p.kernel - p.padding, p.rows);
    size_t col_start = out_col * p.stride > p.padding ? out_col * p.stride - p.padding : 0;
    size_t col_end = min(out_col * p.stride + p.kernel - p.padding, p.cols);
    size_t best = row_start * p.cols + col_start;
    float best_value = plane[best];
    for (size_t row = row_start; row < row_end; ++row) {
        for (size_t col = col_start; col < col_end; ++col) {
            size_t index = row * p.cols + col;
            float value = plane[index];
            if (value > best_value || value != value) {
                best = index;
                best_value = value;
                if (best_value != best_value) return best;
            }
        }
    }
    return best;
}

extern "C" __global__ void max_pool_forward(const float* x, float* out, size_t planes,
                                            size_t rows, size_t cols, size_t out_rows,
                                            size_t out_cols, size_t kernel, size_t stride,
                                            size_t padding) {
    Pool p = {rows, cols, out_rows, out_cols, kernel, stride, padding};
    size_t total = planes * out_rows * out_cols;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        size_t plane = idx / (out_rows * out_cols);
        size_t cell = idx - plane * out_rows * out_cols;
        const float* in_plane = x + plane * rows * cols;
        out[idx] = in_plane[window_argmax(in_plane, p, cell / out_cols, cell % out_cols)];
    }
}

// One thread per input element: sums, in output order like the CPU, the gradients of the
// windows that contain it and whose first maximum it is.
extern "C" __global__ void max_pool_backward(const float* x, const float* grad_out,
                                             float* grad_in, size_t planes, size_t rows,
                                             size_t cols, size_t out_rows, size_t out_cols,
                                             size_t kernel, size_t stride, size_t padding) {
    Pool p = {rows, cols, out_rows, out_cols, kernel, stride, padding};
    size_t total = planes * rows * cols;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        size_t plane = idx / (rows * cols);
        size_t index = idx - plane * rows * cols;
        size_t row = index / cols, col = index % cols;
        const float* in_plane = x + plane * rows * cols;
        const float* grad_plane = grad_out + plane * out_rows * out_cols;
        // Windows containing `row`: out_row * stride - padding <= row < ... + kernel.
        size_t padded_row = row + padding, padded_col = col + padding;
        size_t first_row = padded_row + 1 > kernel ? (padded_row + 1 - kernel + stride - 1) / stride : 0;
        size_t last_row = min(padded_row / stride + 1, out_rows);
        size_t first_col = padded_col + 1 > kernel ? (padded_col + 1 - kernel + stride - 1) / stride : 0;
        size_t last_col = min(padded_col / stride + 1, out_cols);
        float sum = 0.0f;
        for (size_t out_row = first_row; out_row < last_row; ++out_row) {
            for (size_t out_col = first_col; out_col < last_col; ++out_col) {
                if (window_argmax(in_plane, p, out_row, out_col) == index) {
                    sum += grad_plane[out_row * out_cols + out_col];
                }
            }
        }
        grad_in[idx] = sum;
    }
}
