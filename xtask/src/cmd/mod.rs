//! One module per `cargo xtask` subcommand, each with its clap `Args` and a `run` function.

pub mod bench_data;
pub mod bench_labels;
pub mod bench_mix;
pub mod bench_train;
pub mod brief_model;
pub mod canvas;
pub mod data_stats;
pub mod dist;
pub mod eval;
pub mod label_fidelity;
pub mod plot;
pub mod show_mix;
pub mod train;
pub mod train_progress;

/// The workspace root (outputs go to its `target/`), or the current directory for a packaged
/// binary whose source tree is elsewhere.
pub fn repo_root() -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    if root.join("Cargo.toml").is_file() {
        root
    } else {
        std::path::PathBuf::from(".")
    }
}

/// The Python of the virtual environment `venv`, created and given `packages` (pip names) when
/// `import` (a Python import statement's module list) fails there. Benchmarks use it for their
/// same-run baselines.
pub fn python_venv(
    venv: &std::path::Path,
    packages: &[&str],
    import: &str,
) -> anyhow::Result<std::path::PathBuf> {
    use anyhow::{ensure, Context};
    use std::process::Command;
    let python = venv.join("bin").join("python");
    let imports = |python: &std::path::Path| {
        Command::new(python)
            .args(["-c", &format!("import {import}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if imports(&python) {
        return Ok(python);
    }
    eprintln!("installing {} into {}", packages.join(" "), venv.display());
    if !python.exists() {
        let status = Command::new("python3")
            .args(["-m", "venv"])
            .arg(venv)
            .status()
            .context("cannot run `python3 -m venv` (is Python 3 installed?)")?;
        ensure!(
            status.success(),
            "`python3 -m venv {}` failed",
            venv.display()
        );
    }
    let status = Command::new(&python)
        .args(["-m", "pip", "install", "--quiet"])
        .args(packages)
        .status()
        .with_context(|| format!("cannot run pip of {}", python.display()))?;
    ensure!(
        status.success() && imports(&python),
        "installing {} into {} failed",
        packages.join(" "),
        venv.display()
    );
    Ok(python)
}
