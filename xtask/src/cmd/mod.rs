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
