//! Compiles the CUDA kernels in src/ops/cuda/*.cu to PTX with nvcc, only under the `cuda`
//! feature; the CPU build runs nothing here.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The kernels, each compiled to `$OUT_DIR/<name>.ptx` and embedded by its Rust wrapper.
const KERNELS: &[&str] = &["batch_norm", "max_pool"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = find_nvcc();
    // PTX for one virtual architecture: the driver JIT-compiles it for the actual card (and any
    // newer one). CUDA_COMPUTE_CAP=90 (Hopper) as for candle's kernels; 75 is CUDA 13's oldest.
    let compute_cap = std::env::var("CUDA_COMPUTE_CAP")
        .ok()
        .map(|cap| cap.trim().trim_end_matches('a').to_string())
        .filter(|cap| !cap.is_empty())
        .unwrap_or_else(|| "75".to_string());
    if !compute_cap.chars().all(|c| c.is_ascii_digit()) {
        panic!("snapmix-models: CUDA_COMPUTE_CAP must be a number like 90, got `{compute_cap}`");
    }
    for kernel in KERNELS {
        let source = Path::new("src/ops/cuda").join(format!("{kernel}.cu"));
        println!("cargo:rerun-if-changed={}", source.display());
        let ptx = out_dir.join(format!("{kernel}.ptx"));
        let output = Command::new(&nvcc)
            .arg("--ptx")
            .arg(format!("-arch=compute_{compute_cap}"))
            .args(["-O3", "-std=c++17", "-o"])
            .arg(&ptx)
            .arg(&source)
            .output()
            .unwrap_or_else(|err| {
                panic!(
                    "snapmix-models: cannot run nvcc ({}) for the `cuda` feature: {err}",
                    nvcc.display()
                )
            });
        if !output.status.success() {
            panic!(
                "snapmix-models: nvcc failed on {}:\n{}{}",
                source.display(),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}

/// nvcc from $NVCC, $CUDA_HOME/bin or PATH, or a build error saying what the feature needs.
fn find_nvcc() -> PathBuf {
    if let Some(nvcc) = std::env::var_os("NVCC") {
        return PathBuf::from(nvcc);
    }
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        let nvcc = Path::new(&home).join("bin").join("nvcc");
        if nvcc.is_file() {
            return nvcc;
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let nvcc = dir.join("nvcc");
            if nvcc.is_file() {
                return nvcc;
            }
        }
    }
    panic!(
        "snapmix-models: the `cuda` feature compiles CUDA kernels and needs nvcc (a CUDA 12/13 \
         toolkit): put it on PATH, or set NVCC or CUDA_HOME; without a GPU toolchain build \
         without `--features cuda`"
    );
}
