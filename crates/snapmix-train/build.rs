//! Compiles the CUDA kernels in `src/cuda/*.cu` to PTX under the `cuda` feature (snapmix-nvcc).

fn main() {
    snapmix_nvcc::compile_kernels("src/cuda", &["sgd"]);
}
