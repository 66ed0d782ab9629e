// CUDA twins of src/cpu.rs and apply.rs's label weights: the mixing of a batch (box paste with
// a bilinear align_corners=true resize, zero fill, blend) out of place or in place, and the
// SnapMix label weights from box masses. Pixel arithmetic uses explicit round-to-nearest
// intrinsics in the CPU kernel's order (no FMA contraction), so both give the same bits.
// Launched from src/cuda.rs, which builds the per-sample tables and checks all sizes.

// Per-sample paste table: 13 u32 entries.
#define KIND 0      // 0 keep, 1 zero `to`, 2 blend with the partner, 3 resize partner `from` into `to`
#define PARTNER 1
#define FROM 2      // row0, col0, row1, col1 of the partner box (the full image for a blend)
#define TO 6        // row0, col0, row1, col1 of the written box (the full image for a blend)
#define WA 10       // f32 bits: weight of the own pixel in a blend
#define WB 11       // f32 bits: weight of the partner pixel
#define OFFSET 12   // start of this sample's patch in the in-place snapshot buffer
#define ENTRIES 13

#define KEEP 0
#define ZERO 1
#define BLEND 2
#define REGION 3

struct Tap {
    int i0, i1;
    float w0, w1;
};

// `Taps::new(in_size, out_size, true)` of snapmix-cam (align_corners = true), in f32.
__device__ __forceinline__ Tap tap_corners(int in_size, int out_size, int dst) {
    float scale = out_size > 1 ? __fdiv_rn((float)(in_size - 1), (float)(out_size - 1)) : 0.0f;
    float src = __fmul_rn(scale, (float)dst);
    int i0 = min((int)floorf(src), in_size - 1);
    float lambda1 = fminf(fmaxf(__fsub_rn(src, (float)i0), 0.0f), 1.0f);
    Tap t;
    t.i0 = i0;
    t.i1 = i0 < in_size - 1 ? i0 + 1 : i0;
    t.w0 = __fsub_rn(1.0f, lambda1);
    t.w1 = lambda1;
    return t;
}

__device__ __forceinline__ float lerp2(float a, float wa, float b, float wb) {
    return __fadd_rn(__fmul_rn(a, wa), __fmul_rn(b, wb));
}

// Pixel (rr, cc) of a from_rows x from_cols box (top-left at base, row stride `stride`) resized
// to to_rows x to_cols, as `Resize::columns` + `Resize::rows`: a copy for equal sizes, else the
// columns interpolated first, then two such rows blended.
__device__ __forceinline__ float resized(const float* base, int stride, int from_rows,
                                         int from_cols, int to_rows, int to_cols, int rr, int cc) {
    if (from_rows == to_rows && from_cols == to_cols) return base[(size_t)rr * stride + cc];
    Tap tr = tap_corners(from_rows, to_rows, rr);
    Tap tc = tap_corners(from_cols, to_cols, cc);
    const float* top = base + (size_t)tr.i0 * stride;
    const float* bottom = base + (size_t)tr.i1 * stride;
    float t = lerp2(top[tc.i0], tc.w0, top[tc.i1], tc.w1);
    float b = lerp2(bottom[tc.i0], tc.w0, bottom[tc.i1], tc.w1);
    return lerp2(t, tr.w0, b, tr.w1);
}

// dst = the mixed batch [B, C, rows, cols], one thread per output element, each written once.
// grid.y strides over the B * C planes, so each block reads its sample's table entries once and
// indexes pixels with 32-bit arithmetic (64-bit divisions per element cost 5x the bandwidth).
// cuda.rs checks that a plane and the plane count fit u32.
extern "C" __global__ void mix_out_of_place(const float* src, float* dst,
                                            const unsigned int* table, int batch, int channels,
                                            int rows, int cols) {
    unsigned int plane = (unsigned int)rows * (unsigned int)cols;
    unsigned int planes = (unsigned int)batch * (unsigned int)channels;
    for (unsigned int g = blockIdx.y; g < planes; g += gridDim.y) {
        unsigned int b = g / (unsigned int)channels, channel = g - b * (unsigned int)channels;
        const unsigned int* t = table + (size_t)b * ENTRIES;
        unsigned int kind = t[KIND];
        int to_r0 = t[TO], to_c0 = t[TO + 1], to_r1 = t[TO + 2], to_c1 = t[TO + 3];
        const float* own = src + (size_t)g * plane;
        const float* partner = src + ((size_t)t[PARTNER] * channels + channel) * plane;
        float* out = dst + (size_t)g * plane;
        for (unsigned int p = blockIdx.x * blockDim.x + threadIdx.x; p < plane;
             p += gridDim.x * blockDim.x) {
            int r = (int)(p / (unsigned int)cols), c = (int)(p - (unsigned int)r * cols);
            bool inside = r >= to_r0 && r < to_r1 && c >= to_c0 && c < to_c1;
            float v = own[p];
            if (kind == ZERO && inside) {
                v = 0.0f;
            } else if (kind == BLEND) {
                v = lerp2(v, __uint_as_float(t[WA]), partner[p], __uint_as_float(t[WB]));
            } else if (kind == REGION && inside) {
                int from_r0 = t[FROM], from_c0 = t[FROM + 1];
                v = resized(partner + (size_t)from_r0 * cols + from_c0, cols,
                            t[FROM + 2] - from_r0, t[FROM + 3] - from_c0, to_r1 - to_r0,
                            to_c1 - to_c0, r - to_r0, c - to_c0);
            }
            out[p] = v;
        }
    }
}

// In place, step 1 (grid.y = sample): copy what sample b reads from its partner (the `from` box
// of every channel, packed [C, from rows, from cols]) to patches + OFFSET, before any write.
extern "C" __global__ void mix_gather_patches(const float* images, float* patches,
                                              const unsigned int* table, int channels, int rows,
                                              int cols) {
    const unsigned int* t = table + (size_t)blockIdx.y * ENTRIES;
    if (t[KIND] != BLEND && t[KIND] != REGION) return;
    int r0 = t[FROM], c0 = t[FROM + 1];
    int box_rows = t[FROM + 2] - r0, box_cols = t[FROM + 3] - c0;
    size_t area = (size_t)box_rows * box_cols;
    size_t plane = (size_t)rows * cols;
    const float* partner = images + (size_t)t[PARTNER] * channels * plane;
    float* out = patches + t[OFFSET];
    for (size_t j = (size_t)blockIdx.x * blockDim.x + threadIdx.x; j < channels * area;
         j += (size_t)gridDim.x * blockDim.x) {
        size_t channel = j / area;
        int rr = (int)((j % area) / box_cols), cc = (int)(j % box_cols);
        out[j] = partner[channel * plane + (size_t)(r0 + rr) * cols + c0 + cc];
    }
}

// In place, step 2 (grid.y = sample): write sample b's `to` box of every channel from its
// patch (zero fill, resize or blend); pixels outside the box are not touched.
extern "C" __global__ void mix_paste_patches(float* images, const float* patches,
                                             const unsigned int* table, int channels, int rows,
                                             int cols) {
    const unsigned int* t = table + (size_t)blockIdx.y * ENTRIES;
    unsigned int kind = t[KIND];
    if (kind == KEEP) return;
    int to_r0 = t[TO], to_c0 = t[TO + 1];
    int to_rows = t[TO + 2] - to_r0, to_cols = t[TO + 3] - to_c0;
    int from_rows = t[FROM + 2] - t[FROM], from_cols = t[FROM + 3] - t[FROM + 1];
    size_t area = (size_t)to_rows * to_cols;
    size_t from_area = (size_t)from_rows * from_cols;
    size_t plane = (size_t)rows * cols;
    float* own = images + (size_t)blockIdx.y * channels * plane;
    for (size_t j = (size_t)blockIdx.x * blockDim.x + threadIdx.x; j < channels * area;
         j += (size_t)gridDim.x * blockDim.x) {
        size_t channel = j / area;
        int rr = (int)((j % area) / to_cols), cc = (int)(j % to_cols);
        float* pixel = own + channel * plane + (size_t)(to_r0 + rr) * cols + to_c0 + cc;
        const float* patch = patches + t[OFFSET] + channel * from_area;
        if (kind == ZERO) {
            *pixel = 0.0f;
        } else if (kind == BLEND) {
            *pixel = lerp2(*pixel, __uint_as_float(t[WA]), patch[(size_t)rr * from_cols + cc],
                           __uint_as_float(t[WB]));
        } else {
            *pixel = resized(patch, from_cols, from_rows, from_cols, to_rows, to_cols, rr, cc);
        }
    }
}

// Label weights, one thread per sample, as apply.rs's `label_weights`. table [B, 5] f64:
// preset lam_a, preset lam_b, box_a area / image area, index k of the sample among the SnapMix
// pastes (-1: keep the presets), partner. masses[4k..4k+4]: own box_a, own image, partner
// box_b, partner image. out [2, B] f32: lam_a then lam_b.
extern "C" __global__ void mix_label_weights(const double* masses, const unsigned int* targets,
                                             const double* table, float* out, int batch,
                                             int same_label_rule) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= batch) return;
    const double* t = table + (size_t)i * 5;
    double lam_a = t[0], lam_b = t[1];
    int k = (int)t[3];
    if (k >= 0) {
        const double* m = masses + (size_t)k * 4;
        double a = 1.0 - m[0] / (m[1] + 1e-8);
        double b = m[2] / (m[3] + 1e-8);
        int partner = (int)t[4];
        if (same_label_rule && targets[i] == targets[partner]) {
            double sum = a + b;
            a = sum;
            b = sum;
        }
        lam_a = isnan(a) ? 1.0 - t[2] : a;
        lam_b = isnan(b) ? t[2] : b;
    }
    out[i] = (float)lam_a;
    out[batch + i] = (float)lam_b;
}
