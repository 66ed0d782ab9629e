//! Compiles the CUDA kernels in `src/ops/cuda/*.cu` to PTX under the `cuda` feature (snapmix-nvcc).

fn main() {
    snapmix_nvcc::compile_kernels("src/ops/cuda", &["batch_norm", "max_pool"]);
}
