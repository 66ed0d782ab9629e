// The fused SGD update of one parameter on CUDA, the twin of optim_cpu.rs's loop: parameter,
// gradient and momentum buffer read once, parameter and buffer written once. Explicit
// round-to-nearest intrinsics keep the CPU loop's order (no FMA contraction): both give the
// same bits. Launched from src/optim_cuda.rs.

extern "C" __global__ void sgd_momentum(float* param, const float* grad, float* buffer,
                                        unsigned long long n, float lr, float weight_decay,
                                        float momentum, int nesterov) {
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        float p = param[i];
        float d = grad[i];
        if (weight_decay != 0.0f) d = __fadd_rn(d, __fmul_rn(weight_decay, p));
        float b = __fadd_rn(__fmul_rn(momentum, buffer[i]), d);
        buffer[i] = b;
        float step = nesterov ? __fadd_rn(d, __fmul_rn(momentum, b)) : b;
        param[i] = __fsub_rn(p, __fmul_rn(lr, step));
    }
}
