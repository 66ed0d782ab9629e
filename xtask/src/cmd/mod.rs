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
