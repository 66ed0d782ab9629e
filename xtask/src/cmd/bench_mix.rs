//! `cargo xtask bench-mix`: times CAM -> SPM, mixing given the SPM, and both, for every method
//! and batch size at 448x448 (C = 2048, h = w = 14, K = 200), fused path against the
//! composed-candle baseline in the same run. JSON to `target/bench/bench-mix.json`.

use crate::device::DeviceSpec;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use snapmix_cam::{semantic_percent_maps, semantic_percent_maps_composed, Spm};
use snapmix_mix::{apply, apply_composed, apply_in_place, Method, MixConfig, MixParams};
use std::time::Instant;

/// Flags of `cargo xtask bench-mix`.
#[derive(clap::Args)]
pub struct Args {
    /// Batch sizes to time, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "16,32,64")]
    batches: Vec<usize>,
    /// Timed calls per measurement (the median is reported).
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Untimed calls before each measurement.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Methods to time, comma separated (default: all).
    #[arg(long, value_delimiter = ',')]
    methods: Vec<String>,
}

/// The problem size of the official SnapMix ResNet-50 setting.
const SIZE: usize = 448;
const CHANNELS: usize = 2048;
const GRID: usize = 14;
const CLASSES: usize = 200;

/// Medians of one implementation, milliseconds per call.
#[derive(Serialize)]
struct Timing {
    /// (a) CAM -> SPM, ready for box sums (None for methods that need no SPM).
    spm_ms: Option<f64>,
    /// CAM -> SPM including writing the full-size maps (the fused path skips that unless asked).
    spm_with_maps_ms: Option<f64>,
    /// (b) Mixing given the SPM, into a new tensor (`apply`).
    mix_ms: f64,
    /// (c) Both, as a training step runs them (`semantic_percent_maps` + `apply`).
    total_ms: f64,
    images_per_s: f64,
    /// Mixing given the SPM, written into the input (`apply_in_place`, fused only).
    mix_in_place_ms: Option<f64>,
    /// CAM -> SPM + `apply_in_place` (fused only).
    total_in_place_ms: Option<f64>,
}

#[derive(Serialize)]
struct Row {
    method: String,
    batch: usize,
    fused: Timing,
    composed: Timing,
    /// composed total / fused total (both out of place).
    speedup: f64,
}

#[derive(Serialize)]
struct Report {
    command: String,
    device: String,
    date_utc: String,
    rows_cols: [usize; 2],
    channels: usize,
    grid: usize,
    classes: usize,
    iters: usize,
    warmup: usize,
    threads: usize,
    results: Vec<Row>,
}

/// Runs `cargo xtask bench-mix`.
pub fn run(args: Args, device: DeviceSpec) -> Result<()> {
    anyhow::ensure!(args.iters > 0, "--iters must be at least 1");
    let dev = device.open()?;
    let methods: Vec<Method> = if args.methods.is_empty() {
        Method::ALL.to_vec()
    } else {
        args.methods
            .iter()
            .map(|m| m.parse::<Method>().map_err(anyhow::Error::from))
            .collect::<Result<_>>()?
    };
    let mut results = Vec::new();
    println!("times: median ms per call; (a) CAM->SPM, (b) mix given SPM, (c) both; in-place: apply_in_place");
    println!(
        "{:<10} {:>5} | {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} | {:>8} {:>8} {:>8} {:>6} | {:>7}",
        "method", "batch", "(a)", "(a)+map", "(b)", "(b)inpl", "(c)", "(c)inpl", "img/s", "base (a)", "base (b)", "base (c)", "img/s", "speedup"
    );
    for &batch in &args.batches {
        anyhow::ensure!(batch > 0, "batch sizes must be positive");
        let inputs = Inputs::new(batch, &dev)
            .with_context(|| format!("cannot build batch {batch} on {device}"))?;
        for &method in &methods {
            let fused = time_impl(&args, &inputs, method, Impl::Fused, &dev)
                .with_context(|| format!("fused {method} at batch {batch}"))?;
            let composed = time_impl(&args, &inputs, method, Impl::Composed, &dev)
                .with_context(|| format!("composed {method} at batch {batch}"))?;
            let row = Row {
                method: method.to_string(),
                batch,
                speedup: composed.total_ms / fused.total_ms,
                fused,
                composed,
            };
            let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
            println!(
                "{:<10} {:>5} | {:>7} {:>7} {:>7.2} {:>7} {:>7.2} {:>7} {:>7.0} | {:>8} {:>8.2} {:>8.2} {:>6.0} | {:>6.1}x",
                row.method,
                batch,
                opt(row.fused.spm_ms),
                opt(row.fused.spm_with_maps_ms),
                row.fused.mix_ms,
                opt(row.fused.mix_in_place_ms),
                row.fused.total_ms,
                opt(row.fused.total_in_place_ms),
                row.fused.images_per_s,
                opt(row.composed.spm_ms),
                row.composed.mix_ms,
                row.composed.total_ms,
                row.composed.images_per_s,
                row.speedup
            );
            results.push(row);
        }
    }
    let report = Report {
        command: std::iter::once("cargo xtask".to_string())
            .chain(std::env::args().skip(1))
            .collect::<Vec<_>>()
            .join(" "),
        device: device.to_string(),
        date_utc: today_utc(),
        rows_cols: [SIZE, SIZE],
        channels: CHANNELS,
        grid: GRID,
        classes: CLASSES,
        iters: args.iters,
        warmup: args.warmup,
        threads: rayon_threads(),
        results,
    };
    let dir = super::repo_root().join("target/bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join("bench-mix.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

/// One batch's inputs: images, labels, last-conv features and a classifier.
struct Inputs {
    batch: usize,
    images: Tensor,
    targets: Tensor,
    features: Tensor,
    weight: Tensor,
    bias: Tensor,
}

impl Inputs {
    fn new(batch: usize, dev: &Device) -> Result<Self> {
        let labels: Vec<u32> = (0..batch).map(|i| ((i * 37) % CLASSES) as u32).collect();
        Ok(Self {
            batch,
            images: Tensor::randn(0f32, 1.0, (batch, 3, SIZE, SIZE), dev)?,
            targets: Tensor::from_vec(labels, batch, dev)?,
            // Post-ReLU-like features: half of them positive.
            features: Tensor::randn(0f32, 1.0, (batch, CHANNELS, GRID, GRID), dev)?,
            weight: (Tensor::randn(0f32, 1.0, (CLASSES, CHANNELS), dev)? * 0.02)?,
            bias: Tensor::zeros(CLASSES, DType::F32, dev)?,
        })
    }

    fn spm(&self, which: Impl) -> Result<Spm> {
        let f = match which {
            Impl::Fused | Impl::InPlace => semantic_percent_maps,
            Impl::Composed => semantic_percent_maps_composed,
        };
        Ok(f(
            &self.features,
            &self.weight,
            Some(&self.bias),
            &self.targets,
            (SIZE, SIZE),
        )?)
    }

    fn mix(&self, which: Impl, params: &MixParams, spm: Option<&Spm>) -> Result<Tensor> {
        let f = match which {
            Impl::Fused => apply,
            Impl::Composed => apply_composed,
            Impl::InPlace => apply_in_place,
        };
        Ok(f(params, &self.images, &self.targets, spm)?.images)
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Impl {
    Fused,
    Composed,
    /// The fused SPM with `apply_in_place` (rewrites the benchmark's images, which is harmless).
    InPlace,
}

/// Medians of (a) CAM -> SPM, (b) mixing given the SPM, (c) both, for one implementation
/// (the fused one also in place). Parameters are drawn from the same seed for every run.
fn time_impl(
    args: &Args,
    inputs: &Inputs,
    method: Method,
    which: Impl,
    dev: &Device,
) -> Result<Timing> {
    let config = MixConfig {
        beta: 1.0,
        ..MixConfig::new(method)
    };
    let needs_spm = method == Method::SnapMix;
    let spm_ms = needs_spm
        .then(|| median_ms(args, dev, || inputs.spm(which).map(drop)))
        .transpose()?;
    let spm_with_maps_ms = needs_spm
        .then(|| {
            median_ms(args, dev, || {
                inputs.spm(which)?.maps().map(drop).map_err(Into::into)
            })
        })
        .transpose()?;
    let spm = if needs_spm {
        Some(inputs.spm(which)?)
    } else {
        None
    };
    let time_mix = |how: Impl| -> Result<(f64, f64)> {
        let mut rng = ChaCha8Rng::seed_from_u64(2021);
        let mix = median_ms(args, dev, || {
            let params = config.sample(&mut rng, inputs.batch, SIZE, SIZE)?;
            inputs.mix(how, &params, spm.as_ref()).map(drop)
        })?;
        let mut rng = ChaCha8Rng::seed_from_u64(2021);
        let total = median_ms(args, dev, || {
            let params = config.sample(&mut rng, inputs.batch, SIZE, SIZE)?;
            let spm = if params.needs_spm() {
                Some(inputs.spm(how)?)
            } else {
                None
            };
            inputs.mix(how, &params, spm.as_ref()).map(drop)
        })?;
        Ok((mix, total))
    };
    let (mix_ms, total_ms) = time_mix(which)?;
    let in_place = if which == Impl::Fused {
        Some(time_mix(Impl::InPlace)?)
    } else {
        None
    };
    Ok(Timing {
        spm_ms,
        spm_with_maps_ms,
        mix_ms,
        total_ms,
        images_per_s: inputs.batch as f64 / (total_ms / 1e3),
        mix_in_place_ms: in_place.map(|t| t.0),
        total_in_place_ms: in_place.map(|t| t.1),
    })
}

/// Median wall time of `f` in milliseconds, synchronising the device around each call.
fn median_ms(args: &Args, dev: &Device, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..args.warmup {
        f()?;
    }
    dev.synchronize()?;
    let mut times = Vec::with_capacity(args.iters);
    for _ in 0..args.iters {
        let start = Instant::now();
        f()?;
        dev.synchronize()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let mid = times.len() / 2;
    Ok(if times.len() % 2 == 1 {
        times[mid]
    } else {
        (times[mid - 1] + times[mid]) / 2.0
    })
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Today's date (UTC) as YYYY-MM-DD, from the system clock.
fn today_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}
