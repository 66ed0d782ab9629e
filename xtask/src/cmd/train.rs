//! `cargo xtask train`: resolves the config (preset < --config file < flags), trains with
//! progress display, Ctrl-C checkpointing and resume, and reports final- and best-epoch
//! accuracy; `--compare` trains several mixing methods on the same budget side by side.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use snapmix_train::config::{resolve, MixMethod};
use snapmix_train::{
    Observer, Outcome, Overrides, RunSummary, StartMode, TrainConfig, Trainer, TrainerOptions,
};

use super::train_progress::{format_seconds, stop_flag, Progress};
use crate::device::DeviceSpec;

/// The settings flags `train` and `eval` share: where the config comes from (preset, file,
/// `--set`) and the dataset and network flags.
#[derive(clap::Args)]
pub struct ConfigArgs {
    /// Starting preset: `synthetic` (the default) or
    /// {cub,cars,aircraft}-{resnet18,resnet34,resnet50,resnet101,resnet152}[-midlevel][-scratch].
    #[arg(long)]
    pub preset: Option<String>,
    /// A TOML file with any settings (a run's config.toml lists every key).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Any setting as a dotted key and a TOML value, e.g. `--set schedule.epochs=5`. Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Dataset: cub, cars, aircraft, folder or synthetic.
    #[arg(long)]
    pub dataset: Option<String>,
    /// Dataset root folder.
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// Network: resnet18, resnet34, resnet50, resnet101 or resnet152.
    #[arg(long)]
    pub arch: Option<String>,
    /// Add (train) or expect (eval) the mid-level head.
    #[arg(long)]
    pub midlevel: bool,
}

impl ConfigArgs {
    /// The `--set` assignments, then the named flags (which win over them).
    pub fn overrides(&self) -> Result<Overrides> {
        let mut overrides = Overrides::new();
        for assignment in &self.set {
            overrides.set_assignment(assignment)?;
        }
        if let Some(dataset) = &self.dataset {
            overrides.set("data.dataset", dataset.as_str());
        }
        if let Some(root) = &self.root {
            overrides.set("data.root", root.display().to_string());
        }
        if let Some(arch) = &self.arch {
            overrides.set("model.arch", arch.as_str());
        }
        if self.midlevel {
            overrides.set("model.midlevel", true);
        }
        Ok(overrides)
    }
}

/// Flags of `cargo xtask train`. Settings come from the preset, then the `--config` file, then
/// `--set`, then the named flags; the effective config is written to the run directory.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    common: ConfigArgs,
    /// Pretrained body: a safetensors file, `hub`, or `none` (from scratch).
    #[arg(long)]
    pretrained: Option<String>,
    /// Mixing method: none, snapmix, cutmix, as_cutmix, mixup or cutout.
    #[arg(long = "mix")]
    mix: Option<String>,
    /// Beta(beta, beta) of the mixing method [default: the method's official value].
    #[arg(long)]
    beta: Option<f64>,
    /// Probability a batch is mixed [default: the method's official value].
    #[arg(long)]
    prob: Option<f64>,
    /// Several mixing methods, each used with its probability when a batch is mixed, e.g.
    /// `snapmix:0.5,cutmix:0.5` (probabilities in [0, 1] summing to 1; overrides --mix).
    #[arg(long, value_name = "METHOD:PROB,...")]
    mix_switch: Option<String>,
    /// Epochs.
    #[arg(long)]
    epochs: Option<usize>,
    /// Training batch size.
    #[arg(long)]
    batch_size: Option<usize>,
    /// The seed of every random choice.
    #[arg(long)]
    seed: Option<u64>,
    /// Run name (its folder under the runs directory).
    #[arg(long)]
    name: Option<String>,
    /// Run directory [default: <repo>/target/runs/<name>, with a timestamp unless --name is given].
    #[arg(long, value_name = "DIR")]
    run_dir: Option<PathBuf>,
    /// Continue the run in DIR from its last checkpoint, with its saved config.
    #[arg(long, value_name = "DIR")]
    resume: Option<PathBuf>,
    /// Replace a run already in the run directory.
    #[arg(long)]
    overwrite: bool,
    /// Train each of these methods on the same budget and print a table, e.g.
    /// `--compare none,cutmix,snapmix`.
    #[arg(long, value_delimiter = ',', value_name = "METHODS")]
    compare: Vec<String>,
    /// One plain line per epoch even on a terminal.
    #[arg(long)]
    plain: bool,
}

impl Args {
    /// The flags that set config values, in precedence order (`--set` first, named flags win).
    fn overrides(&self) -> Result<Overrides> {
        let mut overrides = self.common.overrides()?;
        let text = |o: &mut Overrides, key: &str, value: &Option<String>| {
            if let Some(value) = value {
                o.set(key, value.as_str());
            }
        };
        text(&mut overrides, "model.pretrained", &self.pretrained);
        text(&mut overrides, "mix.method", &self.mix);
        text(&mut overrides, "name", &self.name);
        if let Some(beta) = self.beta {
            overrides.set("mix.beta", beta);
        }
        if let Some(prob) = self.prob {
            overrides.set("mix.prob", prob);
        }
        if let Some(spec) = &self.mix_switch {
            overrides.set_switch(spec)?;
        }
        for (key, value) in [
            ("schedule.epochs", self.epochs.map(|v| v as u64)),
            ("data.batch_size", self.batch_size.map(|v| v as u64)),
            ("seed", self.seed),
        ] {
            if let Some(value) = value {
                let value = i64::try_from(value).with_context(|| format!("{key} is too large"))?;
                overrides.set(key, value);
            }
        }
        Ok(overrides)
    }
}

/// Runs `cargo xtask train`.
pub fn run(args: Args, device: DeviceSpec) -> Result<()> {
    let candle_device = device.open()?;
    let stop = stop_flag()?;
    if let Some(dir) = &args.resume {
        let overrides = args.overrides()?;
        if !overrides.is_empty()
            || args.common.preset.is_some()
            || args.common.config.is_some()
            || args.overwrite
        {
            bail!(
                "--resume continues the run with its saved config: drop the other settings flags"
            );
        }
        if !args.compare.is_empty() {
            bail!("--resume and --compare cannot be combined");
        }
        let mut progress = Progress::new(args.plain, "");
        let options = TrainerOptions {
            device: candle_device,
            run_dir: dir.clone(),
            stop,
        };
        let mut trainer = Trainer::resume(options, &mut progress)?;
        return finish(&mut trainer, &mut progress);
    }
    let overrides = args.overrides()?;
    let config = resolve(
        args.common.preset.as_deref(),
        args.common.config.as_deref(),
        &overrides,
    )?;
    let mode = if args.overwrite {
        StartMode::Overwrite
    } else {
        StartMode::New
    };
    if !args.compare.is_empty() {
        return compare(&args, config, mode, candle_device, stop);
    }
    let run_dir = run_dir_for(&args, &config);
    println!("run directory: {}", run_dir.display());
    let mut progress = Progress::new(args.plain, "");
    let options = TrainerOptions {
        device: candle_device,
        run_dir,
        stop,
    };
    let mut trainer = Trainer::start(config, options, mode, &mut progress)?;
    print_plan(&trainer);
    finish(&mut trainer, &mut progress)
}

fn print_plan(trainer: &Trainer) {
    let config = trainer.config();
    println!(
        "{} ({} classes) | {} width {} | {} | {} epochs, batch {}, lr {} (body {}) | seed {}",
        config.data.dataset,
        trainer.class_names().len(),
        config.model.arch,
        config.model.base_width,
        describe_mix(config),
        config.schedule.epochs,
        config.data.batch_size,
        config.optim.lr_new,
        config.optim.lr_body,
        config.seed
    );
}

fn describe_mix(config: &TrainConfig) -> String {
    let methods = if config.mix.switch.is_empty() {
        config.mix.method.to_string()
    } else {
        let entries: Vec<String> = config
            .mix
            .switch
            .iter()
            .map(|entry| format!("{}:{}", entry.method, entry.prob))
            .collect();
        format!("switch {}", entries.join(","))
    };
    match config.mix.methods().as_slice() {
        [MixMethod::None] => "no mixing".into(),
        _ => format!(
            "{methods} beta {} prob {}",
            config.mix.beta_or_default(),
            config.mix.prob_or_default()
        ),
    }
}

/// Trains to the end (or a stop request) and prints the outcome.
fn finish(trainer: &mut Trainer, progress: &mut Progress) -> Result<()> {
    match trainer.run(progress)? {
        Outcome::Completed(summary) => {
            report(&summary);
            let curves = summary.run_dir.join("curves.png");
            match super::plot::plot_runs(std::slice::from_ref(&summary.run_dir), &curves) {
                Ok(()) => println!("curves: {}", curves.display()),
                Err(err) => eprintln!("warning: no curves plot: {err:#}"),
            }
            Ok(())
        }
        Outcome::Interrupted {
            checkpoint,
            epoch,
            step_in_epoch,
        } => {
            println!(
                "stopped at epoch {}, step {step_in_epoch}; checkpoint {}",
                epoch + 1,
                checkpoint.display()
            );
            println!(
                "resume with: cargo xtask train --resume {}",
                trainer.run_dir().display()
            );
            std::process::exit(130);
        }
    }
}

fn report(summary: &RunSummary) {
    let percent = |x: f64| format!("{:.2}%", 100.0 * x);
    let final_eval = &summary.final_eval;
    let best = &summary.best_eval;
    println!(
        "test top-1 after the last epoch ({}): {}{}",
        final_eval.epoch + 1,
        percent(final_eval.top1),
        final_eval
            .top1_combined
            .map(|c| format!(", combined with the mid-level head {}", percent(c)))
            .unwrap_or_default()
    );
    println!(
        "best test top-1: {} at epoch {} (the official SnapMix numbers are best-epoch accuracies \
         on the test split)",
        percent(best.score()),
        best.epoch + 1
    );
    println!(
        "training time: {} | run directory: {}",
        format_seconds(summary.train_seconds),
        summary.run_dir.display()
    );
    println!("best weights: {}", summary.best_weights.display());
}

/// The runs folder.
pub fn runs_dir() -> PathBuf {
    super::repo_root().join("target").join("runs")
}

/// `--run-dir`, else runs/<name>; a name not chosen by the user gets a UTC timestamp so that
/// repeated default runs do not collide.
fn run_dir_for(args: &Args, config: &TrainConfig) -> PathBuf {
    if let Some(dir) = &args.run_dir {
        return dir.clone();
    }
    let named = args.name.is_some()
        || args
            .common
            .set
            .iter()
            .any(|s| s.trim_start().starts_with("name"));
    if named {
        runs_dir().join(&config.name)
    } else {
        runs_dir().join(format!("{}-{}", config.name, timestamp()))
    }
}

/// Now as `YYYYmmdd-HHMMSS` in UTC.
fn timestamp() -> String {
    format_utc(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    )
}

/// Seconds since the Unix epoch as `YYYYmmdd-HHMMSS` in UTC.
fn format_utc(secs: u64) -> String {
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

/// `--compare`: the same config once per method, then a table and one plot.
fn compare(
    args: &Args,
    base: TrainConfig,
    mode: StartMode,
    device: candle_core::Device,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    if !base.mix.switch.is_empty() {
        bail!("--compare trains one method per run: drop mix.switch (--mix-switch)");
    }
    let methods: Vec<MixMethod> = args
        .compare
        .iter()
        .map(|name| MixMethod::parse(name.trim()))
        .collect::<Result<_, _>>()?;
    let stamp = timestamp();
    let group_dir = match &args.run_dir {
        Some(dir) => dir.clone(),
        None if args.name.is_some() => runs_dir().join(&base.name),
        None => runs_dir().join(format!("compare-{}-{stamp}", base.preset)),
    };
    println!("comparison directory: {}", group_dir.display());
    let mut rows = Vec::new();
    for method in methods {
        let mut config = base.clone();
        config.mix.method = method;
        // beta/prob stay unset (each method's official value) unless the user set them.
        config.name = method.to_string();
        let label = format!("[{method}] ");
        let mut progress = Progress::new(args.plain, &label);
        let options = TrainerOptions {
            device: device.clone(),
            run_dir: group_dir.join(method.to_string()),
            stop: stop.clone(),
        };
        let mut trainer = Trainer::start(config, options, mode, &mut progress)?;
        progress.message(&format!("training {}", describe_mix(trainer.config())));
        match trainer.run(&mut progress)? {
            Outcome::Completed(summary) => rows.push((method, summary)),
            Outcome::Interrupted { .. } => {
                println!(
                    "stopped during {method}; resume it with: cargo xtask train --resume {}",
                    trainer.run_dir().display()
                );
                std::process::exit(130);
            }
        }
    }
    println!();
    println!(
        "{:<10} {:>12} {:>20} {:>10}  run directory",
        "method", "final top-1", "best top-1 (epoch)", "train time"
    );
    for (method, summary) in &rows {
        println!(
            "{:<10} {:>11.2}% {:>13.2}% ({:>3}) {:>10}  {}",
            method.to_string(),
            100.0 * summary.final_eval.score(),
            100.0 * summary.best_eval.score(),
            summary.best_eval.epoch + 1,
            format_seconds(summary.train_seconds),
            summary.run_dir.display()
        );
    }
    println!("(best = best epoch on the test split, as the official SnapMix numbers; final = last epoch)");
    let dirs: Vec<PathBuf> = rows.iter().map(|(_, s)| s.run_dir.clone()).collect();
    let png = group_dir.join("compare.png");
    super::plot::plot_runs(&dirs, &png)?;
    println!("plot: {}", png.display());
    let table: Vec<serde_json::Value> = rows
        .iter()
        .map(|(method, s)| {
            serde_json::json!({
                "method": method.to_string(),
                "final_top1": s.final_eval.top1,
                "final_top1_combined": s.final_eval.top1_combined,
                "final_epoch": s.final_eval.epoch,
                "best_top1": s.best_eval.top1,
                "best_top1_combined": s.best_eval.top1_combined,
                "best_epoch": s.best_eval.epoch,
                "train_seconds": s.train_seconds,
                "run_dir": s.run_dir,
            })
        })
        .collect();
    let json = group_dir.join("compare.json");
    std::fs::write(&json, serde_json::to_string_pretty(&table)?)
        .with_context(|| format!("writing {}", json.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// `cargo xtask train` alone, for parsing its flags.
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn resolve_flags(flags: &[&str]) -> Result<TrainConfig> {
        let cli = Cli::try_parse_from(std::iter::once("train").chain(flags.iter().copied()))?;
        let args = cli.args;
        Ok(resolve(
            args.common.preset.as_deref(),
            args.common.config.as_deref(),
            &args.overrides()?,
        )?)
    }

    #[test]
    fn shared_flags_reach_the_config_and_win_over_set() {
        let config = resolve_flags(&[
            "--preset",
            "cars-resnet50",
            "--set",
            "model.arch=\"resnet34\"",
            "--arch",
            "resnet18",
            "--root",
            "/data/cars",
            "--midlevel",
            "--set",
            "data.crop=224",
        ])
        .unwrap();
        assert_eq!(config.model.arch.to_string(), "resnet18");
        assert_eq!(config.data.root, Some(PathBuf::from("/data/cars")));
        assert!(config.model.midlevel);
        assert_eq!(config.data.crop, 224);
        assert_eq!(config.preset, "cars-resnet50");
    }

    #[test]
    fn mix_switch_flag_beats_set_and_reaches_the_config() {
        let config = resolve_flags(&[
            "--set",
            "mix.switch=[{method=\"mixup\",prob=1.0}]",
            "--mix-switch",
            "snapmix:0.5,cutmix:0.5",
            "--beta",
            "4",
        ])
        .unwrap();
        assert_eq!(
            config.mix.methods(),
            vec![MixMethod::Snapmix, MixMethod::Cutmix]
        );
        assert_eq!(config.mix.beta_or_default(), 4.0);
        assert!(config.to_toml().unwrap().contains("cutmix"));
        assert_eq!(
            describe_mix(&config),
            "switch snapmix:0.5,cutmix:0.5 beta 4 prob 1"
        );
        // --set alone works too.
        let config = resolve_flags(&["--set", "mix.switch=[{method=\"mixup\",prob=1.0}]"]).unwrap();
        assert_eq!(config.mix.methods(), vec![MixMethod::Mixup]);

        for (flags, expected) in [
            (
                &["--mix-switch", "snapmix:0.5,cutmix:0.4", "--beta", "1"][..],
                "sum to 0.9",
            ),
            (&["--mix-switch", "snapmix:0.5,dance:0.5"][..], "dance"),
            (
                &["--mix-switch", "snapmix:0.5,cutmix:0.5"][..],
                "set mix.beta",
            ),
        ] {
            let err = format!("{:#}", resolve_flags(flags).unwrap_err());
            assert!(err.contains(expected), "{flags:?}: {err}");
        }
    }

    #[test]
    fn utc_stamps_match_known_dates() {
        assert_eq!(format_utc(0), "19700101-000000");
        assert_eq!(format_utc(951_782_400), "20000229-000000");
        assert_eq!(format_utc(1_700_000_000), "20231114-221320");
        assert_eq!(format_utc(4_107_542_399), "21000228-235959");
    }
}
