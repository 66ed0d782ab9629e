// Training-mode BatchNorm (+ optional ReLU) on NCHW f32, the CUDA twin of ops/batch_norm.rs:
// per-channel sums (shifted by the channel's first value, as on the CPU, so the one-pass
// variance does not cancel), finalised in double; then one elementwise pass. Backward likewise.
#include <stddef.h>

// Block-wide sum of two values; the result is valid in thread 0. blockDim.x is a multiple of 32.
__device__ void block_sum2(float& a, float& b) {
    __shared__ float shared_a[32], shared_b[32];
    for (int offset = 16; offset > 0; offset /= 2) {
        a += __shfl_down_sync(0xffffffff, a, offset);
        b += __shfl_down_sync(0xffffffff, b, offset);
    }
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) { shared_a[warp] = a; shared_b[warp] = b; }
    __syncthreads();
    int warps = blockDim.x / 32;
    a = lane < warps ? shared_a[lane] : 0.0f;
    b = lane < warps ? shared_b[lane] : 0.0f;
    if (warp == 0) {
        for (int offset = 16; offset > 0; offset /= 2) {
            a += __shfl_down_sync(0xffffffff, a, offset);
            b += __shfl_down_sync(0xffffffff, b, offset);
        }
    }
}

// Block (c, s) adds the sums of (x - shift) and (x - shift)^2 over channel c of the images
// s, s + gridDim.y, ... into sums[c] and sums[channels + c] (zeroed by the caller).
extern "C" __global__ void bn_channel_sums(const float* x, size_t batch, size_t channels,
                                           size_t pixels, double* sums) {
    size_t c = blockIdx.x;
    float shift = x[c * pixels];
    float sum = 0.0f, sum_sq = 0.0f;
    for (size_t n = blockIdx.y; n < batch; n += gridDim.y) {
        const float* plane = x + (n * channels + c) * pixels;
        for (size_t i = threadIdx.x; i < pixels; i += blockDim.x) {
            float v = plane[i] - shift;
            sum += v;
            sum_sq += v * v;
        }
    }
    block_sum2(sum, sum_sq);
    if (threadIdx.x == 0) {
        atomicAdd(&sums[c], (double)sum);
        atomicAdd(&sums[channels + c], (double)sum_sq);
    }
}

// mean, biased variance and 1/sqrt(var + eps) per channel from the shifted sums.
extern "C" __global__ void bn_finalize_stats(const double* sums, const float* x, size_t channels,
                                             size_t pixels, size_t count, double eps, float* mean,
                                             float* var, float* inv_std) {
    size_t c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= channels) return;
    double shift = x[c * pixels];
    double mean_shifted = sums[c] / (double)count;
    double v = sums[channels + c] / (double)count - mean_shifted * mean_shifted;
    v = v > 0.0 ? v : 0.0;
    float var_f = (float)v;
    mean[c] = (float)(shift + mean_shifted);
    var[c] = var_f;
    inv_std[c] = (float)(1.0 / sqrt((double)var_f + (double)(float)eps));
}

// out = x * scale + shift with scale = gamma * inv_std, shift = beta - mean * scale; then ReLU.
// Grid (planes, y): block (p, y) covers plane p = n * channels + c from pixel y * blockDim.x on,
// striding by the grid's height.
extern "C" __global__ void bn_apply(const float* x, const float* mean, const float* inv_std,
                                    const float* gamma, const float* beta, float* out,
                                    size_t channels, size_t pixels, int relu) {
    size_t plane = blockIdx.x, c = plane % channels;
    float scale = gamma[c] * inv_std[c];
    float shift = beta[c] - mean[c] * scale;
    for (size_t i = blockIdx.y * (size_t)blockDim.x + threadIdx.x; i < pixels;
         i += (size_t)gridDim.y * blockDim.x) {
        size_t idx = plane * pixels + i;
        float v = x[idx] * scale + shift;
        out[idx] = relu && v < 0.0f ? 0.0f : v;
    }
}

// out = max(x * scale + shift + residual, 0): the end of a residual block (the CPU's order:
// scale and shift first, then the residual). Grid as bn_apply's.
extern "C" __global__ void bn_apply_add_relu(const float* x, const float* mean,
                                             const float* inv_std, const float* gamma,
                                             const float* beta, const float* residual,
                                             float* out, size_t channels, size_t pixels) {
    size_t plane = blockIdx.x, c = plane % channels;
    float scale = gamma[c] * inv_std[c];
    float shift = beta[c] - mean[c] * scale;
    for (size_t i = blockIdx.y * (size_t)blockDim.x + threadIdx.x; i < pixels;
         i += (size_t)gridDim.y * blockDim.x) {
        size_t idx = plane * pixels + i;
        float v = (x[idx] * scale + shift) + residual[idx];
        out[idx] = v < 0.0f ? 0.0f : v;
    }
}

// dst = grad where out > 0, else 0: a residual's gradient through the fused ReLU.
extern "C" __global__ void relu_masked_grad(const float* out, const float* grad, float* dst,
                                            size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        dst[i] = out[i] <= 0.0f ? 0.0f : grad[i];
    }
}

// The output gradient, zeroed where the fused ReLU was inactive (output <= 0).
__device__ __forceinline__ float masked_grad(const float* grad, const float* out, size_t idx,
                                             int relu) {
    return relu && out[idx] <= 0.0f ? 0.0f : grad[idx];
}

// Block (c, s) adds sum g and sum g * (x - mean) over channel c of the images s, s + gridDim.y,
// ... into sums[c] and sums[channels + c] (zeroed by the caller).
extern "C" __global__ void bn_grad_sums(const float* x, const float* out, const float* grad,
                                        const float* mean, size_t batch, size_t channels,
                                        size_t pixels, int relu, double* sums) {
    size_t c = blockIdx.x;
    float m = mean[c];
    float sum_g = 0.0f, sum_gx = 0.0f;
    for (size_t n = blockIdx.y; n < batch; n += gridDim.y) {
        size_t start = (n * channels + c) * pixels;
        for (size_t i = threadIdx.x; i < pixels; i += blockDim.x) {
            float g = masked_grad(grad, out, start + i, relu);
            sum_g += g;
            sum_gx += g * (x[start + i] - m);
        }
    }
    block_sum2(sum_g, sum_gx);
    if (threadIdx.x == 0) {
        atomicAdd(&sums[c], (double)sum_g);
        atomicAdd(&sums[channels + c], (double)sum_gx);
    }
}

// d beta = sum g; d gamma = inv_std * sum g * (x - mean).
extern "C" __global__ void bn_grad_params(const double* sums, const float* inv_std,
                                          size_t channels, float* grad_gamma, float* grad_beta) {
    size_t c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= channels) return;
    grad_beta[c] = (float)sums[c];
    grad_gamma[c] = (float)(sums[channels + c] * (double)inv_std[c]);
}

// dx = gamma * inv_std * (g - mean(g) - x_hat * mean(g * x_hat)), as a * g + b * x + d.
// Grid as bn_apply's.
extern "C" __global__ void bn_grad_input(const float* x, const float* out, const float* grad,
                                         const float* mean, const float* inv_std,
                                         const float* gamma, const float* grad_gamma,
                                         const float* grad_beta, size_t channels, size_t pixels,
                                         size_t count, int relu, float* grad_x) {
    size_t plane = blockIdx.x, c = plane % channels;
    float n = (float)count;
    float s = inv_std[c];
    float a = gamma[c] * s;
    float b = -a * s * grad_gamma[c] / n;
    float d = -a * grad_beta[c] / n - b * mean[c];
    for (size_t i = blockIdx.y * (size_t)blockDim.x + threadIdx.x; i < pixels;
         i += (size_t)gridDim.y * blockDim.x) {
        size_t idx = plane * pixels + i;
        grad_x[idx] = a * masked_grad(grad, out, idx, relu) + b * x[idx] + d;
    }
}
