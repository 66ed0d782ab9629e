//! `cargo xtask bench-train`: the median time of a full ResNet training step on the CPU with the
//! fused ops, with candle's composed ops, and with PyTorch (benches/torch_cpu_train.py), all at
//! the same thread count; a table and target/bench/bench-train.json. With `--device cuda`, the
//! same per precision on the GPU, with peak device memory (the `cuda` module below).

use crate::device::DeviceSpec;
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use serde::Serialize;
use snapmix_models::ops::dispatch::set_composed_ops;
use snapmix_models::{Arch, ResNet};
use snapmix_train::{NamedVar, ParamGroup, Sgd, SgdSettings};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

/// Flags of `cargo xtask bench-train`.
#[derive(clap::Args)]
pub struct Args {
    /// Configs as arch:batch:size (square images), comma-separated.
    #[arg(
        long,
        default_value = "resnet18:32:64,resnet18:16:112,resnet50:8:64,resnet50:16:112"
    )]
    configs: String,
    /// Timed steps per config and implementation (after the warm-up); the median is reported.
    /// PyTorch's CPU step keeps getting faster over its first few steps: with 5 steps after 2
    /// warm-up ones its median was 10-30% above the one over 15 steps.
    #[arg(long, default_value_t = 15)]
    steps: usize,
    /// Untimed steps first (allocations, scratch buffers, PyTorch's first-call work).
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// CPU: rounds of (ours, then PyTorch) per config, alternating, their steps pooled: the
    /// machine's speed drifts by 5-10% over minutes, and alternating makes both sides see the
    /// same drift. The table adds the lowest and highest per-round ratio.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Threads for every side: rayon here, `torch.set_num_threads` in the baseline.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Classifier outputs (200, as CUB).
    #[arg(long, default_value_t = 200)]
    classes: usize,
    /// Skip the PyTorch baseline (and its venv).
    #[arg(long)]
    no_torch: bool,
    /// Skip candle's composed-ops reference path.
    #[arg(long)]
    no_reference: bool,
    /// CUDA: the precisions to time, comma-separated: fp32 (strict) and tf32 (TF32
    /// convolutions); bf16 is not implemented yet.
    #[arg(long, default_value = "fp32,tf32")]
    precisions: String,
    /// CUDA: PyTorch's figures from `torch_baseline.py` (its torch_baseline.json, run in the
    /// same call on the same card) for the ratio columns; without it there are none.
    #[arg(long, value_name = "FILE")]
    torch_json: Option<std::path::PathBuf>,
}

/// One benchmark configuration.
#[derive(Clone, Copy, Debug, Serialize)]
struct BenchConfig {
    #[serde(serialize_with = "serialize_arch")]
    arch: Arch,
    batch: usize,
    size: usize,
}

fn serialize_arch<S: serde::Serializer>(arch: &Arch, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(arch.name())
}

impl BenchConfig {
    fn parse(spec: &str) -> Result<Self> {
        let parts: Vec<&str> = spec.trim().split(':').collect();
        let [arch, batch, size] = parts.as_slice() else {
            bail!("bad config `{spec}`: expected arch:batch:size, e.g. resnet18:32:64");
        };
        let config = Self {
            arch: arch
                .parse()
                .with_context(|| format!("in config `{spec}`"))?,
            batch: batch
                .parse()
                .with_context(|| format!("bad batch `{batch}` in config `{spec}`"))?,
            size: size
                .parse()
                .with_context(|| format!("bad size `{size}` in config `{spec}`"))?,
        };
        ensure!(
            config.batch >= 2 && config.size >= 32,
            "config `{spec}`: need batch >= 2 (train-mode BatchNorm) and size >= 32"
        );
        Ok(config)
    }

    fn label(&self) -> String {
        format!(
            "{} b{} {}x{}",
            self.arch.name(),
            self.batch,
            self.size,
            self.size
        )
    }
}

/// Per-step times of one implementation on one config.
#[derive(Serialize)]
struct Timing {
    median_ms: f64,
    images_per_s: f64,
    times_ms: Vec<f64>,
}

impl Timing {
    fn new(times_ms: Vec<f64>, batch: usize) -> Self {
        let median_ms = median(&times_ms);
        Self {
            median_ms,
            images_per_s: batch as f64 * 1000.0 / median_ms,
            times_ms,
        }
    }
}

/// One row of the report.
#[derive(Serialize)]
struct Row {
    config: BenchConfig,
    fused: Timing,
    composed: Option<Timing>,
    torch: Option<Timing>,
    /// PyTorch's ms per step over ours: above 1 means faster than PyTorch.
    speed_vs_torch: Option<f64>,
    /// Candle's composed-ops ms per step over ours.
    speed_vs_composed: Option<f64>,
    /// `speed_vs_torch` within each round (see `--rounds`).
    round_ratios_vs_torch: Vec<f64>,
}

#[derive(Serialize)]
struct Report {
    command: String,
    unix_time: u64,
    cpu: String,
    threads: usize,
    rounds: usize,
    steps: usize,
    warmup: usize,
    classes: usize,
    torch_version: Option<String>,
    rows: Vec<Row>,
}

/// Runs `cargo xtask bench-train`.
pub fn run(args: Args, device: DeviceSpec) -> Result<()> {
    match device {
        DeviceSpec::Cpu => {}
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(_) => return cuda::run(args, device),
        _ => bail!(
            "`cargo xtask bench-train --device {device}` is not implemented yet (issue 7); \
             use --device cpu or cuda"
        ),
    }
    if let Some(code) = rerun_optimised()? {
        std::process::exit(code);
    }
    ensure!(args.steps >= 1, "--steps must be at least 1");
    ensure!(args.rounds >= 1, "--rounds must be at least 1");
    ensure!(args.threads >= 1, "--threads must be at least 1");
    let configs = args
        .configs
        .split(',')
        .map(BenchConfig::parse)
        .collect::<Result<Vec<_>>>()?;
    // Before rayon's global pool (and candle's thread count) are first used.
    std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string());
    let repo = super::repo_root();

    let mut fused_times = vec![Vec::new(); configs.len()];
    let mut torch_times = vec![Vec::new(); configs.len()];
    let mut round_ratios = vec![Vec::new(); configs.len()];
    let mut composed: Vec<Option<Timing>> = configs.iter().map(|_| None).collect();
    let mut torch_version = None;
    for round in 0..args.rounds {
        let mut round_medians = Vec::with_capacity(configs.len());
        for (index, config) in configs.iter().enumerate() {
            eprintln!(
                "bench-train: {} (fused ops, round {}/{})",
                config.label(),
                round + 1,
                args.rounds
            );
            let times = time_steps(config, &args, false)?.times_ms;
            round_medians.push(median(&times));
            fused_times[index].extend(times);
            if round == 0 && !args.no_reference {
                eprintln!("bench-train: {} (candle composed ops)", config.label());
                composed[index] = Some(time_steps(config, &args, true)?);
            }
        }
        if !args.no_torch {
            let (version, times) = run_torch(&repo, &configs, &args)?;
            for (index, times) in times.into_iter().enumerate() {
                round_ratios[index].push(median(&times) / round_medians[index]);
                torch_times[index].extend(times);
            }
            torch_version = Some(version);
        }
    }
    let mut rows = Vec::with_capacity(configs.len());
    for (index, config) in configs.iter().enumerate() {
        let fused = Timing::new(std::mem::take(&mut fused_times[index]), config.batch);
        let torch = (!args.no_torch)
            .then(|| Timing::new(std::mem::take(&mut torch_times[index]), config.batch));
        let composed = composed[index].take();
        rows.push(Row {
            config: *config,
            speed_vs_torch: torch.as_ref().map(|t| t.median_ms / fused.median_ms),
            speed_vs_composed: composed.as_ref().map(|t| t.median_ms / fused.median_ms),
            round_ratios_vs_torch: std::mem::take(&mut round_ratios[index]),
            fused,
            composed,
            torch,
        });
    }
    print_table(&rows, args.threads);

    let report = Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        unix_time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        cpu: cpu_model(),
        threads: args.threads,
        rounds: args.rounds,
        steps: args.steps,
        warmup: args.warmup,
        classes: args.classes,
        torch_version,
        rows,
    };
    let out_dir = repo.join("target").join("bench");
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let out = out_dir.join("bench-train.json");
    std::fs::write(&out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("cannot write {}", out.display()))?;
    println!("wrote {}", out.display());
    Ok(())
}

/// Times `args.steps` training steps (after `args.warmup`): train-mode forward, cross-entropy,
/// backward, SGD momentum 0.9 update; `composed` selects candle's composed ops.
fn time_steps(config: &BenchConfig, args: &Args, composed: bool) -> Result<Timing> {
    set_composed_ops(composed);
    // On a rayon worker, as the trainer runs its steps (see snapmix-train's `Trainer::run`).
    let result = rayon::scope(|_| time_cpu_steps(config, args));
    set_composed_ops(false);
    result
}

/// The warm-up and timed steps of [`time_steps`], on a fresh model.
fn time_cpu_steps(config: &BenchConfig, args: &Args) -> Result<Timing> {
    let device = Device::Cpu;
    let (model, mut sgd) = model_and_optimizer(config, args.classes, &device, Recipe::Plain)?;
    let (images, labels) = synthetic_batch(config, args.classes, &device)?;
    let mut step = || -> Result<()> {
        let logits = model.forward_t(&images, true)?.logits;
        let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
        sgd.step(&loss.backward()?)?;
        Ok(())
    };
    for _ in 0..args.warmup {
        step()?;
    }
    let mut times = Vec::with_capacity(args.steps);
    for _ in 0..args.steps {
        let start = Instant::now();
        step()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    Ok(Timing::new(times, config.batch))
}

/// The optimiser and loss of a timed step, matched to the PyTorch script it is compared with.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Recipe {
    /// Plain momentum SGD and cross-entropy, as benches/torch_cpu_train.py.
    Plain,
    /// Nesterov momentum with weight decay 1e-4 and SnapMix's two-label weighted loss, as
    /// ../shared/gpu/torch_baseline.py (the CUDA comparison, so unused without `cuda`).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Mixed,
}

/// What every timed step trains: a freshly initialised model for `config` on `device` and
/// momentum SGD over all its parameters, by `recipe`.
fn model_and_optimizer(
    config: &BenchConfig,
    classes: usize,
    device: &Device,
    recipe: Recipe,
) -> Result<(ResNet, Sgd)> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let model = ResNet::new(config.arch, classes, None, vb)?;
    model.init_weights(0)?;
    let params = model
        .named_parameters()
        .iter()
        .map(|(name, tensor)| {
            Ok(NamedVar {
                name: name.clone(),
                var: Var::from_tensor(tensor)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mixed = recipe == Recipe::Mixed;
    let group = ParamGroup {
        label: "all".into(),
        base_lr: 0.01,
        weight_decay: if mixed { 1e-4 } else { 0.0 },
        params,
    };
    let settings = SgdSettings {
        momentum: 0.9,
        nesterov: mixed,
        decay_bn_and_bias: true,
    };
    Ok((model, Sgd::new(vec![group], settings)?))
}

/// One SnapMix training iteration as `cargo xtask train` runs it: the CAM forward of the
/// un-mixed batch (train mode, no gradient kept), its SPMs, SnapMix with Beta(5, 5) (the CUB
/// preset's) and the training step on the mixed batch with the two-label loss. Timed by the CUDA
/// rows; its test runs it on the CPU.
#[cfg(any(feature = "cuda", test))]
struct SnapMixIteration {
    model: ResNet,
    sgd: Sgd,
    images: Tensor,
    labels: Tensor,
    mix: snapmix_mix::MixConfig,
    rng: rand_chacha::ChaCha8Rng,
}

#[cfg(any(feature = "cuda", test))]
impl SnapMixIteration {
    fn new(config: &BenchConfig, classes: usize, device: &Device) -> Result<Self> {
        use rand::SeedableRng;
        let (model, sgd) = model_and_optimizer(config, classes, device, Recipe::Mixed)?;
        let (images, labels) = synthetic_batch(config, classes, device)?;
        let mut mix = snapmix_mix::MixConfig::new(snapmix_mix::Method::SnapMix);
        mix.beta = 5.0;
        Ok(Self {
            model,
            sgd,
            images,
            labels,
            mix,
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(0),
        })
    }

    /// One iteration; its loss.
    fn run(&mut self) -> Result<f32> {
        use snapmix_cam::CamSource;
        let (batch, _, rows, cols) = self.images.dims4()?;
        let features = self.model.cam_features(&self.images, true)?.detach();
        let weight = self.model.classifier_weight().detach();
        let bias = self.model.classifier_bias().map(Tensor::detach);
        let spm = snapmix_cam::semantic_percent_maps(
            &features,
            &weight,
            bias.as_ref(),
            &self.labels,
            (rows, cols),
        )?;
        let params = self.mix.sample(&mut self.rng, batch, rows, cols)?;
        let mixed = snapmix_mix::apply(&params, &self.images, &self.labels, Some(&spm))?;
        let logits = self.model.forward_t(&mixed.images, true)?.logits;
        let loss = snapmix_mix::mixed_cross_entropy(&logits, &mixed, 0.0)?;
        self.sgd.step(&loss.backward()?)?;
        Ok(loss.to_scalar::<f32>()?)
    }
}

/// A fixed pseudo-random batch: the values do not affect the timing, only the shapes do.
fn synthetic_batch(
    config: &BenchConfig,
    classes: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let len = config.batch * 3 * config.size * config.size;
    let images = (Tensor::arange(0u32, len as u32, device)?.to_dtype(DType::F32)? * 0.7311)?
        .sin()?
        .reshape((config.batch, 3, config.size, config.size))?;
    let labels: Vec<u32> = (0..config.batch).map(|i| (i % classes) as u32).collect();
    Ok((images, Tensor::new(labels, device)?))
}

/// Runs the PyTorch baseline in `<repo>/.venv-bench` (created, with torch from PyPI, if
/// missing); returns torch's version and the per-step times of each config.
fn run_torch(repo: &Path, configs: &[BenchConfig], args: &Args) -> Result<(String, Vec<Vec<f64>>)> {
    eprintln!("bench-train: PyTorch from PyPI in .venv-bench (about 5 GB with its CUDA wheels when first installed)");
    let python = super::python_venv(&repo.join(".venv-bench"), &["torch", "numpy"], "torch")
        .context("no PyTorch baseline; rerun with --no-torch to skip it")?;
    let specs: Vec<String> = configs
        .iter()
        .map(|c| format!("{}:{}:{}", c.arch.name(), c.batch, c.size))
        .collect();
    let script = repo.join("benches").join("torch_cpu_train.py");
    eprintln!("bench-train: PyTorch baseline ({})", script.display());
    let output = Command::new(&python)
        .arg(&script)
        .args(["--configs", &specs.join(",")])
        .args(["--threads", &args.threads.to_string()])
        .args(["--steps", &args.steps.to_string()])
        .args(["--warmup", &args.warmup.to_string()])
        .args(["--classes", &args.classes.to_string()])
        .env("OMP_NUM_THREADS", args.threads.to_string())
        .output()
        .with_context(|| format!("cannot run {}", script.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "{} failed:\n{}{}",
        script.display(),
        stdout,
        String::from_utf8_lossy(&output.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    let parsed: serde_json::Value = serde_json::from_str(last)
        .with_context(|| format!("the baseline's last line is not JSON: `{last}`"))?;
    let version = parsed["torch"].as_str().unwrap_or("unknown").to_string();
    let results = parsed["results"]
        .as_array()
        .context("the baseline's JSON has no `results` list")?;
    ensure!(
        results.len() == configs.len(),
        "the baseline returned {} results for {} configs",
        results.len(),
        configs.len()
    );
    let times = results
        .iter()
        .map(|r| {
            r["times_ms"]
                .as_array()
                .and_then(|ts| ts.iter().map(|t| t.as_f64()).collect::<Option<Vec<_>>>())
                .context("a baseline result has no numeric `times_ms`")
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((version, times))
}

/// Set on the child when bench-train re-runs itself optimised, so it can never loop.
const OPTIMISED_ENV: &str = "SNAPMIX_BENCH_TRAIN_OPTIMISED";

/// Timings of an unoptimised build mean nothing: from a debug build run through cargo, re-run the
/// same command with `--release` and return its exit code; `None` means carry on here.
fn rerun_optimised() -> Result<Option<i32>> {
    if !cfg!(debug_assertions) || std::env::var_os(OPTIMISED_ENV).is_some() {
        return Ok(None);
    }
    let Ok(cargo) = std::env::var("CARGO") else {
        eprintln!("bench-train: warning: unoptimised build, timings are not meaningful");
        return Ok(None);
    };
    eprintln!("bench-train: re-running with `cargo run --release` (timings need optimised code)");
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let status = Command::new(cargo)
        .args([
            "run",
            "--release",
            "--quiet",
            "--manifest-path",
            manifest,
            "--",
        ])
        .args(std::env::args_os().skip(1))
        .env(OPTIMISED_ENV, "1")
        .status()
        .context("cannot start cargo to build xtask optimised")?;
    Ok(Some(status.code().unwrap_or(1)))
}

/// The "vs PyTorch" cell: the pooled ratio, then with several rounds the lowest and highest
/// per-round one.
fn torch_ratio_cell(pooled: Option<f64>, rounds: &[f64]) -> String {
    let Some(pooled) = pooled else {
        return "-".to_string();
    };
    match rounds {
        [] | [_] => format!("{pooled:.2}x"),
        rounds => {
            let low = rounds.iter().copied().fold(f64::INFINITY, f64::min);
            let high = rounds.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            format!("{pooled:.2}x ({low:.2}-{high:.2})")
        }
    }
}

fn print_table(rows: &[Row], threads: usize) {
    let ms = |t: &Option<Timing>| {
        t.as_ref()
            .map_or("-".to_string(), |t| format!("{:.1}", t.median_ms))
    };
    let ratio = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.2}x"));
    println!("training step on the CPU, {threads} threads, median ms/step");
    println!("| config | ours ms | ours img/s | candle ms | PyTorch ms | vs PyTorch | vs candle |");
    println!("|---|---|---|---|---|---|---|");
    for row in rows {
        println!(
            "| {} | {:.1} | {:.1} | {} | {} | {} | {} |",
            row.config.label(),
            row.fused.median_ms,
            row.fused.images_per_s,
            ms(&row.composed),
            ms(&row.torch),
            torch_ratio_cell(row.speed_vs_torch, &row.round_ratios_vs_torch),
            ratio(row.speed_vs_composed),
        );
    }
    println!("(vs X = X's ms / ours: above 1.00x we are faster)");
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapmix_iteration_mixes_and_trains_on_the_cpu() {
        let config = BenchConfig {
            arch: Arch::ResNet18,
            batch: 4,
            size: 32,
        };
        let mut iteration = SnapMixIteration::new(&config, 3, &Device::Cpu).unwrap();
        let before = iteration.model.state_dict().unwrap();
        let losses: Vec<f32> = (0..2).map(|_| iteration.run().unwrap()).collect();
        assert!(
            losses.iter().all(|l| l.is_finite() && *l > 0.0),
            "{losses:?}"
        );
        let after = iteration.model.state_dict().unwrap();
        let changed = |name: &str| {
            let diff = (&before[name] - &after[name]).unwrap().abs().unwrap();
            diff.max_all().unwrap().to_scalar::<f32>().unwrap() > 0.0
        };
        assert!(changed("fc.weight") && changed("conv1.weight"));
        // The CAM forward runs in train mode, as in the official code: per iteration bn1 sees
        // the un-mixed batch and the mixed one.
        let tracked = after["bn1.num_batches_tracked"].to_scalar::<i64>().unwrap();
        assert_eq!(tracked, 4);
    }

    #[test]
    fn the_ratio_cell_shows_the_round_range_only_for_several_rounds() {
        assert_eq!(torch_ratio_cell(None, &[]), "-");
        assert_eq!(torch_ratio_cell(Some(0.8321), &[0.8321]), "0.83x");
        assert_eq!(
            torch_ratio_cell(Some(0.83), &[0.86, 0.79, 0.84]),
            "0.83x (0.79-0.86)"
        );
    }

    #[test]
    fn parses_configs_and_rejects_bad_ones() {
        let c = BenchConfig::parse("resnet50:16:112").unwrap();
        assert_eq!((c.arch, c.batch, c.size), (Arch::ResNet50, 16, 112));
        for bad in [
            "resnet50:16",
            "resnet19:8:64",
            "resnet18:x:64",
            "resnet18:1:64",
        ] {
            let err = BenchConfig::parse(bad).unwrap_err();
            assert!(
                format!("{err:#}").contains(bad.split(':').next().unwrap()),
                "{err:#}"
            );
        }
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}

/// `bench-train --device cuda`: the training step with the custom ops (cuDNN convolutions, our
/// batch-norm and max-pool kernels) per precision, its peak device memory, candle's composed ops
/// (fp32 rows), and PyTorch's figures read from `torch_baseline.py`'s JSON of the same call.
#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use snapmix_mix::MixedBatch;
    use snapmix_models::ops::cuda::memory;
    use snapmix_models::ops::dispatch::set_allow_tf32;

    /// The precision of one row.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Precision {
        /// Strict fp32 convolutions.
        Fp32,
        /// TF32 tensor-core convolutions (PyTorch's default for cuDNN convolutions).
        Tf32,
    }

    impl Precision {
        fn parse(name: &str) -> Result<Self> {
            match name.trim() {
                "fp32" => Ok(Self::Fp32),
                "tf32" => Ok(Self::Tf32),
                "bf16" => bail!("precision bf16 is not implemented yet (issue 7); use fp32,tf32"),
                other => bail!("unknown precision `{other}`: expected fp32 or tf32"),
            }
        }

        fn name(self) -> &'static str {
            match self {
                Self::Fp32 => "fp32",
                Self::Tf32 => "tf32",
            }
        }
    }

    /// PyTorch's figures for one row, from torch_baseline.py.
    #[derive(Clone, Serialize)]
    struct TorchFigures {
        median_ms: f64,
        images_per_s: f64,
        /// `torch.cuda.max_memory_allocated` after the warm-up, GiB.
        peak_gib: f64,
    }

    #[derive(Serialize)]
    struct CudaRow {
        config: BenchConfig,
        precision: &'static str,
        ours: Timing,
        /// Peak bytes held by live allocations in the device's memory pool during the timed
        /// steps (after the warm-up), GiB: PyTorch's `max_memory_allocated` counterpart.
        peak_used_gib: f64,
        /// The pool's peak reservation over the same steps, GiB.
        peak_reserved_gib: f64,
        composed: Option<Timing>,
        /// Why candle's composed-ops reference has no timing, when it failed.
        #[serde(skip_serializing_if = "Option::is_none")]
        composed_error: Option<String>,
        /// The whole SnapMix iteration (CAM forward, SPMs, mixing, the step), same precision.
        snapmix_iteration: Option<Timing>,
        /// Median ms until the host had enqueued a timed step's last op (near `ours` means
        /// host-bound).
        host_enqueue_ms: f64,
        /// Median ms of forward (with the loss), backward and optimiser, each synchronised.
        phases_ms: [f64; 3],
        torch: Option<TorchFigures>,
        /// PyTorch's ms per step over ours: above 1 means faster than PyTorch.
        speed_vs_torch: Option<f64>,
        /// Our peak used memory over PyTorch's peak allocated memory (target: at most 1.2).
        memory_vs_torch: Option<f64>,
    }

    #[derive(Serialize)]
    struct CudaReport {
        command: String,
        unix_time: u64,
        device: String,
        steps: usize,
        warmup: usize,
        classes: usize,
        /// torch_baseline.py's `meta` (torch, CUDA and cuDNN versions, GPU name).
        torch_meta: Option<serde_json::Value>,
        rows: Vec<CudaRow>,
    }

    /// Runs `bench-train --device cuda[:N]`.
    pub(super) fn run(args: Args, spec: DeviceSpec) -> Result<()> {
        ensure!(args.steps >= 1, "--steps must be at least 1");
        let device = spec.open()?;
        let configs = args
            .configs
            .split(',')
            .map(BenchConfig::parse)
            .collect::<Result<Vec<_>>>()?;
        let precisions = args
            .precisions
            .split(',')
            .map(Precision::parse)
            .collect::<Result<Vec<_>>>()?;
        let torch = match &args.torch_json {
            Some(path) => Some(read_torch_json(path)?),
            None => None,
        };
        let mut rows = Vec::new();
        for config in &configs {
            for &precision in &precisions {
                set_allow_tf32(precision == Precision::Tf32);
                eprintln!(
                    "bench-train: {} {} (custom ops)",
                    config.label(),
                    precision.name()
                );
                let measured = time_cuda_steps(config, &args, &device, false);
                let iteration = measured
                    .is_ok()
                    .then(|| time_cuda_iterations(config, &args, &device));
                set_allow_tf32(true);
                let CudaTiming {
                    timing: ours,
                    peak,
                    host_enqueue_ms,
                    phases_ms,
                } = measured?;
                let snapmix_iteration = iteration.transpose()?;
                // candle's own conv ignores our TF32 switch: one composed row, in fp32.
                let (composed, composed_error) =
                    if args.no_reference || precision != Precision::Fp32 {
                        (None, None)
                    } else {
                        eprintln!("bench-train: {} (candle composed ops)", config.label());
                        // Its convs need several times our memory (it ran out on an H100 at
                        // ResNet-50 b16 448): a reference that fails is reported, not fatal.
                        match time_cuda_steps(config, &args, &device, true) {
                            Ok(measured) => (Some(measured.timing), None),
                            Err(err) => {
                                eprintln!(
                                    "bench-train: {} candle composed ops failed: {err:#}",
                                    config.label()
                                );
                                (None, Some(format!("{err:#}")))
                            }
                        }
                    };
                let torch = torch
                    .as_ref()
                    .and_then(|(_, rows)| rows.get(&torch_key(config, precision)).cloned());
                let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
                let peak_used_gib = gib(peak.used_bytes);
                rows.push(CudaRow {
                    config: *config,
                    precision: precision.name(),
                    speed_vs_torch: torch.as_ref().map(|t| t.median_ms / ours.median_ms),
                    memory_vs_torch: torch.as_ref().map(|t| peak_used_gib / t.peak_gib),
                    ours,
                    peak_used_gib,
                    peak_reserved_gib: gib(peak.reserved_bytes),
                    composed,
                    composed_error,
                    snapmix_iteration,
                    host_enqueue_ms,
                    phases_ms,
                    torch,
                });
            }
        }
        let torch_meta = torch.map(|(meta, _)| meta);
        let device_name = torch_meta
            .as_ref()
            .and_then(|meta| meta["gpu"].as_str())
            .map_or_else(|| spec.to_string(), |gpu| format!("{spec} ({gpu})"));
        print_cuda_table(&rows, &device_name);
        let report = CudaReport {
            command: std::env::args().collect::<Vec<_>>().join(" "),
            unix_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            device: device_name,
            steps: args.steps,
            warmup: args.warmup,
            classes: args.classes,
            torch_meta,
            rows,
        };
        let out_dir = super::super::repo_root().join("target").join("bench");
        std::fs::create_dir_all(&out_dir)
            .with_context(|| format!("cannot create {}", out_dir.display()))?;
        let out = out_dir.join("bench-train.json");
        std::fs::write(&out, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", out.display()))?;
        println!("wrote {}", out.display());
        Ok(())
    }

    /// Like the CPU `time_steps`, on a CUDA device: each timed step ends with a device
    /// synchronisation, and the memory pool's peaks are taken over the timed steps. Also how
    /// long the host took to enqueue each step (a step whose enqueue time nears its total is
    /// bound by the host, not the GPU), and, from three more steps synchronised after each
    /// phase, the forward (with the loss), backward and optimiser times.
    fn time_cuda_steps(
        config: &BenchConfig,
        args: &Args,
        device: &Device,
        composed: bool,
    ) -> Result<CudaTiming> {
        set_composed_ops(composed);
        let result = (|| {
            let (model, mut sgd) =
                model_and_optimizer(config, args.classes, device, Recipe::Mixed)?;
            let (images, labels) = synthetic_batch(config, args.classes, device)?;
            let targets = mixed_targets(images, labels, args.classes)?;
            // ms since `start` at the end of each phase, and at the enqueue of the last op.
            let mut step = |split: bool| -> Result<[f64; 4]> {
                let start = Instant::now();
                let since = |start: Instant| start.elapsed().as_secs_f64() * 1e3;
                let logits = model.forward_t(&targets.images, true)?.logits;
                let loss = snapmix_mix::mixed_cross_entropy(&logits, &targets, 0.0)?;
                if split {
                    device.synchronize()?;
                }
                let forward = since(start);
                let grads = loss.backward()?;
                if split {
                    device.synchronize()?;
                }
                let backward = since(start);
                sgd.step(&grads)?;
                let enqueued = since(start);
                device.synchronize()?;
                Ok([forward, backward, enqueued, since(start)])
            };
            for _ in 0..args.warmup {
                step(false)?;
            }
            memory::reset_peak(device)?;
            let (mut times, mut enqueued) = (Vec::new(), Vec::new());
            for _ in 0..args.steps {
                let [_, _, host, total] = step(false)?;
                times.push(total);
                enqueued.push(host);
            }
            let peak = memory::peak(device)?;
            let mut phases: [Vec<f64>; 3] = Default::default();
            for _ in 0..3 {
                let [forward, backward, _, total] = step(true)?;
                for (phase, ms) in
                    phases
                        .iter_mut()
                        .zip([forward, backward - forward, total - backward])
                {
                    phase.push(ms);
                }
            }
            Ok(CudaTiming {
                timing: Timing::new(times, config.batch),
                peak,
                host_enqueue_ms: median(&enqueued),
                phases_ms: phases.map(|phase| median(&phase)),
            })
        })();
        set_composed_ops(false);
        result
    }

    /// What [`time_cuda_steps`] measures.
    struct CudaTiming {
        timing: Timing,
        peak: memory::PoolPeak,
        host_enqueue_ms: f64,
        phases_ms: [f64; 3],
    }

    /// [`SnapMixIteration`]s on a CUDA device, each ended by a synchronisation.
    fn time_cuda_iterations(config: &BenchConfig, args: &Args, device: &Device) -> Result<Timing> {
        let mut iteration = SnapMixIteration::new(config, args.classes, device)?;
        let mut times = Vec::with_capacity(args.steps);
        for i in 0..args.warmup + args.steps {
            let start = Instant::now();
            iteration.run()?;
            device.synchronize()?;
            if i >= args.warmup {
                times.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
        Ok(Timing::new(times, config.batch))
    }

    /// Two label sets with weights `lam_a + lam_b = 1`, as torch_baseline.py's step trains on.
    fn mixed_targets(images: Tensor, labels: Tensor, classes: usize) -> Result<MixedBatch> {
        let device = images.device().clone();
        let batch = labels.dims1()?;
        let partners: Vec<u32> = (0..batch).map(|i| ((i * 7 + 3) % classes) as u32).collect();
        let lam_a: Vec<f32> = (0..batch)
            .map(|i| (i as f32 + 0.5) / batch as f32)
            .collect();
        let lam_a = Tensor::new(lam_a, &device)?;
        Ok(MixedBatch {
            images,
            targets_a: labels,
            targets_b: Tensor::new(partners, &device)?,
            lam_b: lam_a.affine(-1.0, 1.0)?,
            lam_a,
        })
    }

    /// The key of a PyTorch row: `resnet50_train_step_448 b16 tf32`.
    fn torch_key(config: &BenchConfig, precision: Precision) -> String {
        format!(
            "{}_train_step_{} b{} {}",
            config.arch.name(),
            config.size,
            config.batch,
            precision.name()
        )
    }

    /// torch_baseline.py's JSON: its `meta` and its train rows by [`torch_key`].
    fn read_torch_json(
        path: &Path,
    ) -> Result<(
        serde_json::Value,
        std::collections::HashMap<String, TorchFigures>,
    )> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the PyTorch baseline {}", path.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        let rows = json["rows"]
            .as_array()
            .with_context(|| format!("{} has no `rows` list", path.display()))?;
        let mut figures = std::collections::HashMap::new();
        for row in rows.iter().filter(|r| r["section"] == "train") {
            let field = |name: &str| {
                row[name].as_f64().with_context(|| {
                    format!("a train row of {} has no numeric `{name}`", path.display())
                })
            };
            let key = format!(
                "{} b{} {}",
                row["name"].as_str().unwrap_or_default(),
                field("batch")?,
                row["precision"].as_str().unwrap_or_default()
            );
            figures.insert(
                key,
                TorchFigures {
                    median_ms: field("median_ms")?,
                    images_per_s: field("images_per_s")?,
                    peak_gib: field("peak_gib")?,
                },
            );
        }
        Ok((json["meta"].clone(), figures))
    }

    fn print_cuda_table(rows: &[CudaRow], device: &str) {
        let opt =
            |v: Option<f64>, unit: &str| v.map_or("-".to_string(), |v| format!("{v:.2}{unit}"));
        println!(
            "training step on {device}, median ms/step (PyTorch: torch_baseline.py, same call)"
        );
        println!(
            "| config | precision | ours ms | ours img/s | peak GiB | candle ms | PyTorch ms | PyTorch GiB | speed vs PyTorch | memory vs PyTorch | SnapMix iteration ms | iteration img/s | host enqueue ms | fwd / bwd / opt ms |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        for row in rows {
            println!(
                "| {} | {} | {:.1} | {:.1} | {:.2} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.1} / {:.1} / {:.1} |",
                row.config.label(),
                row.precision,
                row.ours.median_ms,
                row.ours.images_per_s,
                row.peak_used_gib,
                match (&row.composed, &row.composed_error) {
                    (_, Some(_)) => "failed".to_string(),
                    (composed, None) => opt(composed.as_ref().map(|t| t.median_ms), ""),
                },
                opt(row.torch.as_ref().map(|t| t.median_ms), ""),
                opt(row.torch.as_ref().map(|t| t.peak_gib), ""),
                opt(row.speed_vs_torch, "x"),
                opt(row.memory_vs_torch, "x"),
                opt(row.snapmix_iteration.as_ref().map(|t| t.median_ms), ""),
                opt(row.snapmix_iteration.as_ref().map(|t| t.images_per_s), ""),
                row.host_enqueue_ms,
                row.phases_ms[0],
                row.phases_ms[1],
                row.phases_ms[2],
            );
        }
        println!(
            "(speed = PyTorch ms / ours: above 1.00x we are faster; memory = our pool peak / \
             PyTorch's max_memory_allocated; both steps: Nesterov SGD with weight decay 1e-4 and \
             a two-label mixed cross-entropy)"
        );
    }
}
