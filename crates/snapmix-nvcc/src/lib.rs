//! Build-script helper of the snapmix crates: compiles a crate's CUDA kernels to PTX with nvcc
//! when its `cuda` feature is on, so every crate builds its kernels the same way.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The PTX virtual architecture when `CUDA_COMPUTE_CAP` is unset: the oldest CUDA 13 supports;
/// the driver JIT-compiles it for the card it runs on (and any newer one).
const DEFAULT_COMPUTE_CAP: &str = "75";

/// Compiles `<dir>/<kernel>.cu` to `$OUT_DIR/<kernel>.ptx` for each kernel, when the calling
/// build script's crate has its `cuda` feature on; does nothing otherwise. A missing nvcc, a
/// malformed `CUDA_COMPUTE_CAP` or a kernel that does not compile stops the build with a message
/// saying which (a build script reports errors by panicking).
pub fn compile_kernels(dir: &str, kernels: &[&str]) {
    println!("cargo:rerun-if-changed=build.rs");
    for var in ["NVCC", "CUDA_COMPUTE_CAP", "CUDA_HOME", "CUDA_PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = find_nvcc();
    let compute_cap = compute_cap(env::var("CUDA_COMPUTE_CAP").ok().as_deref())
        .unwrap_or_else(|message| panic!("{message}"));
    for kernel in kernels {
        let source = Path::new(dir).join(format!("{kernel}.cu"));
        println!("cargo:rerun-if-changed={}", source.display());
        let output = Command::new(&nvcc)
            .arg("--ptx")
            .arg(format!("-arch=compute_{compute_cap}"))
            .args(["-O3", "-std=c++17", "-lineinfo", "-o"])
            .arg(out_dir.join(format!("{kernel}.ptx")))
            .arg(&source)
            .output()
            .unwrap_or_else(|err| {
                panic!(
                    "the `cuda` feature compiles {} with nvcc, but `{}` could not be run ({err})",
                    source.display(),
                    nvcc.display()
                )
            });
        if !output.status.success() {
            panic!(
                "nvcc failed on {}:\n{}{}",
                source.display(),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}

/// The PTX architecture from `CUDA_COMPUTE_CAP` (`90`, `90a` or ` 80 `), or the default.
fn compute_cap(value: Option<&str>) -> Result<String, String> {
    let cap = value
        .map(|cap| cap.trim().trim_end_matches('a'))
        .filter(|cap| !cap.is_empty())
        .unwrap_or(DEFAULT_COMPUTE_CAP);
    if cap.chars().all(|c| c.is_ascii_digit()) {
        Ok(cap.to_string())
    } else {
        Err(format!(
            "CUDA_COMPUTE_CAP={value:?}: expected a compute capability such as 90 or 80"
        ))
    }
}

/// `$NVCC`, else `bin/nvcc` under `$CUDA_HOME` or `$CUDA_PATH`, else `nvcc` on `PATH`; a build
/// error saying what the `cuda` feature needs when there is none.
fn find_nvcc() -> PathBuf {
    if let Some(nvcc) = env::var_os("NVCC") {
        return PathBuf::from(nvcc);
    }
    let under_roots = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(env::var_os)
        .map(|root| Path::new(&root).join("bin").join("nvcc"));
    let on_path = env::var_os("PATH")
        .map(|path| {
            env::split_paths(&path)
                .map(|dir| dir.join("nvcc"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    under_roots
        .chain(on_path)
        .find(|nvcc| nvcc.is_file())
        .unwrap_or_else(|| {
            panic!(
                "the `cuda` feature compiles CUDA kernels and needs nvcc (a CUDA 12/13 toolkit): \
                 put it on PATH, or set NVCC or CUDA_HOME; without a CUDA toolkit build without \
                 `--features cuda`"
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compute_capability_from_the_environment() {
        assert_eq!(compute_cap(None).unwrap(), DEFAULT_COMPUTE_CAP);
        assert_eq!(compute_cap(Some("")).unwrap(), DEFAULT_COMPUTE_CAP);
        assert_eq!(compute_cap(Some("90a")).unwrap(), "90");
        assert_eq!(compute_cap(Some(" 80 ")).unwrap(), "80");
        let err = compute_cap(Some("sm_90")).unwrap_err();
        assert!(err.contains("sm_90"), "{err}");
    }
}
