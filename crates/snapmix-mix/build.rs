//! Compiles the CUDA kernels in `src/cuda/*.cu` to PTX with nvcc, only when the `cuda` feature
//! is on (a CPU build needs no CUDA toolkit). `NVCC` picks the compiler (default: `nvcc` from
//! `CUDA_HOME`/`CUDA_PATH` or `PATH`), `CUDA_COMPUTE_CAP` the target (default 90, Hopper).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const KERNELS: &[&str] = &["mix"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    for var in ["NVCC", "CUDA_COMPUTE_CAP", "CUDA_HOME", "CUDA_PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = nvcc();
    let cap = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_string());
    if cap.is_empty() || !cap.chars().all(|c| c.is_ascii_alphanumeric()) {
        panic!("CUDA_COMPUTE_CAP={cap:?}: expected a compute capability such as 90 or 80");
    }
    for kernel in KERNELS {
        let source = format!("src/cuda/{kernel}.cu");
        println!("cargo:rerun-if-changed={source}");
        let ptx = out_dir.join(format!("{kernel}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "--std=c++17", "-lineinfo"])
            .arg(format!("-arch=sm_{cap}"))
            .arg("-o")
            .arg(&ptx)
            .arg(&source)
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "the `cuda` feature compiles {source} with nvcc, but `{}` could not be run ({e}): \
                     install a CUDA toolkit (12.x or 13.x), put nvcc on PATH or set NVCC",
                    nvcc.display()
                )
            });
        if !status.success() {
            panic!("nvcc failed on {source} ({status})");
        }
    }
}

/// `$NVCC`, else `bin/nvcc` under `$CUDA_HOME` or `$CUDA_PATH` if present, else `nvcc` (PATH).
fn nvcc() -> PathBuf {
    if let Some(nvcc) = env::var_os("NVCC") {
        return PathBuf::from(nvcc);
    }
    ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(env::var_os)
        .map(|root| Path::new(&root).join("bin/nvcc"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("nvcc"))
}
