//! `cargo xtask`: the snapmix-rs runner. A thin layer that parses flags and calls the library
//! crates; every subcommand lives in its own module under `cmd/`.

mod cmd;
mod device;

use clap::{Parser, Subcommand};
use device::DeviceSpec;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    version,
    about = "SnapMix fine-grained training on candle"
)]
struct Cli {
    /// Where to run: cpu, cuda[:N] or metal. A GPU device rebuilds xtask with its feature.
    #[arg(long, global = true, default_value = "cpu")]
    device: DeviceSpec,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model (default: the built-in synthetic fine-grained set, on CPU).
    Train(cmd::train::Args),
    /// Evaluate saved weights on a dataset's test split.
    Eval(cmd::eval::Args),
    /// Time CAM->SPM and mixing for every method.
    BenchMix(cmd::bench_mix::Args),
    /// Time the data pipeline (decode + augment) against Pillow.
    BenchData(cmd::bench_data::Args),
    /// Time a training step against PyTorch.
    BenchTrain(cmd::bench_train::Args),
    /// Measure each mixing method's label error against ground-truth part masks.
    BenchLabels(cmd::bench_labels::Args),
    /// Count classes and images of a dataset, optionally decoding every image.
    DataStats(cmd::data_stats::Args),
    /// Draw a PNG grid showing what each mixing method does to a batch.
    ShowMix(cmd::show_mix::Args),
    /// Plot loss and accuracy curves of one or more runs to PNG.
    Plot(cmd::plot::Args),
    /// Build a release binary and pack it with a run script for machines without Rust.
    Dist(cmd::dist::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Command::Train(_) | Command::Eval(_) | Command::BenchTrain(_)
    ) {
        keep_candle_elementwise_ops_on_the_calling_thread();
        keep_freed_memory_for_reuse();
    }
    if let Some(code) = device::reinvoke_with_feature(cli.device)? {
        std::process::exit(code);
    }
    let device = cli.device;
    if !matches!(cli.command, Command::Dist(_)) {
        // Fail at once, naming the device, rather than deep inside a subcommand.
        device.open()?;
    }
    match cli.command {
        Command::Train(args) => cmd::train::run(args, device),
        Command::Eval(args) => cmd::eval::run(args, device),
        Command::BenchMix(args) => cmd::bench_mix::run(args, device),
        Command::BenchData(args) => cmd::bench_data::run(args, device),
        Command::BenchTrain(args) => cmd::bench_train::run(args, device),
        Command::BenchLabels(args) => cmd::bench_labels::run(args, device),
        Command::DataStats(args) => cmd::data_stats::run(args, device),
        Command::ShowMix(args) => cmd::show_mix::run(args, device),
        Command::Plot(args) => cmd::plot::run(args, device),
        Command::Dist(args) => cmd::dist::run(args, device),
    }
}

/// Every candle op allocates its output, and glibc hands large blocks back to the kernel when
/// freed, so each training step faulted in tens of MB of fresh zeroed pages again (about 1.5 us
/// per 4 KiB page here). Serving blocks up to 32 MiB from the heap and never trimming it keeps
/// those pages for reuse: R18 b32 64x64 on 2 cores, 3x fewer page faults and 10% less time
/// per step (docs/perf-notes.md). Memory stays at the step's peak instead of shrinking between
/// steps.
fn keep_freed_memory_for_reuse() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before any other thread
    // exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

/// candle runs its elementwise CPU ops (gradient accumulation, losses) on a pool of its own
/// whose idle workers spin, competing for the cores with rayon's (GEMMs and the fused ops):
/// with that pool off (`CANDLE_NUM_THREADS=1`) a ResNet training step took 20-25% less time and
/// CPU on 2 cores (docs/BENCHMARKS.md). A `CANDLE_NUM_THREADS` the user set is kept.
fn keep_candle_elementwise_ops_on_the_calling_thread() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Still single-threaded here: no other thread can read the environment concurrently.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}
