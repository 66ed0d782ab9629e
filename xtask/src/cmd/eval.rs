//! `cargo xtask eval`: top-1 (and combined with the mid-level head) of saved weights on a
//! dataset's test split, per-class accuracy to JSON and a confusion-matrix PNG.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use plotters::prelude::*;
use snapmix_train::config::resolve;
use snapmix_train::data::{load_datasets, test_loader};
use snapmix_train::eval::load_model;
use snapmix_train::{evaluate, EvalResult, RunDir, TrainConfig};

use super::plot::{render_png, DrawResult, FONT};
use super::train::ConfigArgs;
use crate::device::DeviceSpec;

/// The most classes a confusion-matrix PNG is drawn for.
const MAX_CONFUSION_CLASSES: usize = 200;

/// Flags of `cargo xtask eval`. Model shape and data settings come from the run the weights
/// belong to (when they sit in a run directory), else from the preset/config, then the flags.
#[derive(clap::Args)]
pub struct Args {
    /// A model.safetensors, a checkpoint folder, or a run directory (its best checkpoint).
    #[arg(long, value_name = "PATH")]
    weights: PathBuf,
    // Settings; `--preset` and `--config` only matter for weights outside a run directory.
    #[command(flatten)]
    common: ConfigArgs,
    /// Output folder for per_class.json and confusion.png [default: <run>/eval, or
    /// <repo>/target/eval/<weights file stem>].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

/// Where the weights file is and which run (if any) it came from.
struct WeightsLocation {
    file: PathBuf,
    run: Option<RunDir>,
}

fn locate(path: &Path) -> Result<WeightsLocation> {
    if path.is_file() {
        // runs/<run>/checkpoints/<checkpoint>/model.safetensors
        let run = path
            .parent()
            .and_then(Path::parent)
            .and_then(Path::parent)
            .and_then(|root| RunDir::existing(root).ok());
        return Ok(WeightsLocation {
            file: path.to_path_buf(),
            run,
        });
    }
    if path.join("model.safetensors").is_file() {
        let run = path
            .parent()
            .and_then(Path::parent)
            .and_then(|root| RunDir::existing(root).ok());
        return Ok(WeightsLocation {
            file: path.join("model.safetensors"),
            run,
        });
    }
    if path.is_dir() {
        let run = RunDir::existing(path)?;
        let best = run
            .best_checkpoint()?
            .or(run.last_checkpoint()?)
            .ok_or_else(|| anyhow!("{} has no checkpoint yet", path.display()))?;
        return Ok(WeightsLocation {
            file: best.model_path(),
            run: Some(run),
        });
    }
    bail!("{} does not exist", path.display())
}

/// Runs `cargo xtask eval`.
pub fn run(args: Args, device: DeviceSpec) -> Result<()> {
    let device = device.open()?;
    let location = locate(&args.weights)?;
    let overrides = args.common.overrides()?;
    let config = match &location.run {
        Some(run) => {
            // The run's own settings, with any flags on top (through a temporary file).
            let tmp =
                std::env::temp_dir().join(format!("snapmix-eval-{}.toml", std::process::id()));
            std::fs::write(&tmp, run.read_config()?.to_toml()?)?;
            let resolved = resolve(None, Some(&tmp), &overrides);
            let _ = std::fs::remove_file(&tmp);
            resolved?
        }
        None => resolve(
            args.common.preset.as_deref(),
            args.common.config.as_deref(),
            &overrides,
        )?,
    };
    let datasets = load_datasets(&config.data, config.seed)?;
    let classes = datasets.class_names.len();
    let model = load_model(&config, classes, &location.file, &device)
        .with_context(|| format!("loading {}", location.file.display()))?;
    let loader = test_loader(&config.data, datasets.test)?;
    println!(
        "evaluating {} on {} ({} test images, {classes} classes)",
        location.file.display(),
        config.data.dataset,
        loader.dataset().len()
    );
    let result = evaluate(&model, &loader, &device)?;
    println!("top-1: {:.2}%", 100.0 * result.top1);
    if let Some(combined) = result.top1_combined {
        println!(
            "top-1 combined (logits + mid-level logits): {:.2}%",
            100.0 * combined
        );
    }
    println!("mean cross-entropy: {:.4}", result.loss);

    let out = args.out.clone().unwrap_or_else(|| match &location.run {
        Some(run) => run.root().join("eval"),
        None => super::train::runs_dir()
            .with_file_name("eval")
            .join(location.file.file_stem().unwrap_or_default()),
    });
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let json = out.join("per_class.json");
    std::fs::write(
        &json,
        serde_json::to_string_pretty(&report_json(
            &config,
            &location.file,
            &datasets.class_names,
            &result,
        ))?,
    )
    .with_context(|| format!("writing {}", json.display()))?;
    println!("per-class accuracy: {}", json.display());
    if classes <= MAX_CONFUSION_CLASSES {
        let png = out.join("confusion.png");
        draw_confusion(&result.confusion, &png)
            .map_err(|err| anyhow!("drawing {}: {err}", png.display()))?;
        println!("confusion matrix: {}", png.display());
    } else {
        println!(
            "confusion matrix: not drawn for {classes} classes (at most {MAX_CONFUSION_CLASSES})"
        );
    }
    Ok(())
}

fn report_json(
    config: &TrainConfig,
    weights: &Path,
    class_names: &[String],
    result: &EvalResult,
) -> serde_json::Value {
    let per_class: Vec<serde_json::Value> = result
        .per_class
        .iter()
        .enumerate()
        .map(|(class, count)| {
            serde_json::json!({
                "class": class,
                "name": class_names.get(class),
                "images": count.total,
                "correct": count.correct,
                "accuracy": count.accuracy(),
            })
        })
        .collect();
    serde_json::json!({
        "weights": weights,
        "dataset": config.data.dataset.to_string(),
        "root": config.data.root,
        "arch": config.model.arch.to_string(),
        "images": result.images,
        "top1": result.top1,
        "top1_combined": result.top1_combined,
        "loss": result.loss,
        "per_class_prediction": if result.top1_combined.is_some() { "combined" } else { "logits" },
        "per_class": per_class,
        "confusion": result.confusion,
    })
}

/// Rows: true class, columns: predicted class; each row shaded by its share of the class.
fn draw_confusion(confusion: &[Vec<u32>], out: &Path) -> DrawResult {
    let classes = confusion.len();
    let cell = (800 / classes.max(1)).clamp(3, 40) as i32;
    let side = cell * classes as i32;
    let (left, top) = (60i32, 50i32);
    let size = ((left + side + 30).max(520) as u32, (top + side + 50) as u32);
    render_png(out, size, |root| {
        root.draw(&Text::new(
            "confusion matrix: rows = true class, columns = predicted (row-normalised)",
            (10, 12),
            (FONT, 15),
        ))?;
        for (truth, row) in confusion.iter().enumerate() {
            let total: u32 = row.iter().sum();
            for (predicted, &count) in row.iter().enumerate() {
                let share = if total > 0 {
                    f64::from(count) / f64::from(total)
                } else {
                    0.0
                };
                let shade = (255.0 * (1.0 - share)).round() as u8;
                let (x, y) = (left + predicted as i32 * cell, top + truth as i32 * cell);
                root.draw(&Rectangle::new(
                    [(x, y), (x + cell, y + cell)],
                    RGBColor(shade, shade, 255).filled(),
                ))?;
            }
        }
        root.draw(&Rectangle::new(
            [(left, top), (left + side, top + side)],
            BLACK.stroke_width(1),
        ))?;
        let step = classes.div_ceil(10).max(1);
        for class in (0..classes).step_by(step) {
            let centre = class as i32 * cell + cell / 2;
            root.draw(&Text::new(
                class.to_string(),
                (left + centre - 4, top + side + 6),
                (FONT, 12),
            ))?;
            root.draw(&Text::new(
                class.to_string(),
                (left - 30, top + centre - 6),
                (FONT, 12),
            ))?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn shared_flags_become_the_same_overrides_as_for_train() {
        let flags = [
            "eval",
            "--weights",
            "w.safetensors",
            "--set",
            "data.crop=224",
            "--dataset",
            "cub",
            "--root",
            "/data/CUB_200_2011",
            "--arch",
            "resnet50",
            "--midlevel",
            "--preset",
            "cub-resnet50",
        ];
        let args = Cli::try_parse_from(flags).unwrap().args;
        let config = resolve(
            args.common.preset.as_deref(),
            args.common.config.as_deref(),
            &args.common.overrides().unwrap(),
        )
        .unwrap();
        assert_eq!(config.data.crop, 224);
        assert_eq!(config.data.dataset.to_string(), "cub");
        assert_eq!(
            config.data.root.as_deref(),
            Some(Path::new("/data/CUB_200_2011"))
        );
        assert_eq!(config.model.arch.to_string(), "resnet50");
        assert!(config.model.midlevel);
    }
}
