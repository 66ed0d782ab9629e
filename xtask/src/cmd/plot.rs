//! `cargo xtask plot RUN_DIR...`: training-loss and test-accuracy curves of one or more runs,
//! drawn into one PNG so runs can be compared.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use plotters::prelude::*;
use snapmix_train::{read_metrics, MetricRecord};

use crate::device::DeviceSpec;

/// DejaVu Sans (data/fonts, with its licence), built in so a packaged xtask needs no files.
const FONT_BYTES: &[u8] = include_bytes!("../../../data/fonts/DejaVuSans.ttf");
/// The family name the charts ask for.
pub const FONT: &str = "sans-serif";

/// Flags of `cargo xtask plot`.
#[derive(clap::Args)]
pub struct Args {
    /// Run directories (each holding metrics.jsonl).
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Output PNG [default: RUN_DIR/curves.png for one run, else compare.png next to the first].
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Runs `cargo xtask plot`.
pub fn run(args: Args, _device: DeviceSpec) -> Result<()> {
    let out = match args.out {
        Some(out) => out,
        None if args.runs.len() == 1 => args.runs[0].join("curves.png"),
        None => args.runs[0]
            .parent()
            .unwrap_or(Path::new("."))
            .join("compare.png"),
    };
    plot_runs(&args.runs, &out)?;
    println!("wrote {}", out.display());
    Ok(())
}

/// The curves of one run, x in epochs.
struct RunCurves {
    name: String,
    /// (epoch end, mean training loss of the epoch).
    epoch_loss: Vec<(f64, f64)>,
    /// (fractional epoch, training loss over the logging window).
    step_loss: Vec<(f64, f64)>,
    /// (epoch end, test top-1 in %).
    top1: Vec<(f64, f64)>,
    /// (epoch end, combined top-1 in %), with a mid-level head.
    top1_combined: Vec<(f64, f64)>,
}

fn read_curves(run_dir: &Path) -> Result<RunCurves> {
    let path = run_dir.join("metrics.jsonl");
    let records = read_metrics(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut curves = RunCurves {
        name: run_dir.file_name().map_or_else(
            || run_dir.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        ),
        epoch_loss: Vec::new(),
        step_loss: Vec::new(),
        top1: Vec::new(),
        top1_combined: Vec::new(),
    };
    // Steps per epoch, from the epoch records, to place step records on the epoch axis.
    let steps_per_epoch = records
        .iter()
        .find_map(|r| match r {
            MetricRecord::Epoch {
                epoch, global_step, ..
            } => Some(*global_step as f64 / (*epoch + 1) as f64),
            MetricRecord::Step { .. } => None,
        })
        .filter(|s| *s > 0.0);
    for record in &records {
        match record {
            MetricRecord::Step {
                global_step, loss, ..
            } => {
                if let Some(per_epoch) = steps_per_epoch {
                    curves
                        .step_loss
                        .push((*global_step as f64 / per_epoch, *loss));
                }
            }
            MetricRecord::Epoch {
                epoch,
                train_loss,
                test_top1,
                test_top1_combined,
                ..
            } => {
                let x = (*epoch + 1) as f64;
                if train_loss.is_finite() {
                    curves.epoch_loss.push((x, *train_loss));
                }
                if let Some(top1) = test_top1 {
                    curves.top1.push((x, 100.0 * top1));
                }
                if let Some(top1) = test_top1_combined {
                    curves.top1_combined.push((x, 100.0 * top1));
                }
            }
        }
    }
    if curves.epoch_loss.is_empty() && curves.step_loss.is_empty() {
        bail!("{} has no records yet", path.display());
    }
    Ok(curves)
}

/// Makes the built-in font available to plotters (idempotent).
pub fn register_font() -> Result<()> {
    plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES)
        .map_err(|_| anyhow!("the built-in DejaVuSans.ttf could not be parsed"))
}

/// Draws the loss (left) and test top-1 (right) of every run in `run_dirs` into `out`.
pub fn plot_runs(run_dirs: &[PathBuf], out: &Path) -> Result<()> {
    let runs: Vec<RunCurves> = run_dirs
        .iter()
        .map(|dir| read_curves(dir))
        .collect::<Result<_>>()?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    draw(&runs, out).map_err(|err| anyhow!("drawing {}: {err}", out.display()))
}

/// Error type of the drawing code (plotters' errors are generic over the backend).
pub type DrawResult = Result<(), Box<dyn std::error::Error>>;

/// Draws with `draw` into a white `size` RGB canvas and saves it as PNG through the `image`
/// crate (plotters' own encoder would pull in a second, older `image`).
pub fn render_png(
    out: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend, plotters::coord::Shift>) -> DrawResult,
) -> DrawResult {
    register_font()?;
    let mut pixels = vec![0u8; size.0 as usize * size.1 as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, size).into_drawing_area();
        root.fill(&WHITE)?;
        draw(&root)?;
        root.present()?;
    }
    let image = image::RgbImage::from_raw(size.0, size.1, pixels)
        .ok_or("canvas size does not match its buffer")?;
    image.save(out)?;
    Ok(())
}

fn draw(runs: &[RunCurves], out: &Path) -> DrawResult {
    render_png(out, (1280, 520), |root| draw_curves(runs, root))
}

fn draw_curves(
    runs: &[RunCurves],
    root: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
) -> DrawResult {
    let (left, right) = root.split_horizontally(640);

    let all = |select: fn(&RunCurves) -> Vec<&(f64, f64)>| -> Vec<(f64, f64)> {
        runs.iter().flat_map(select).copied().collect()
    };
    let losses = all(|r| r.epoch_loss.iter().chain(&r.step_loss).collect());
    let accuracies = all(|r| r.top1.iter().chain(&r.top1_combined).collect());
    let max_epoch = losses
        .iter()
        .chain(&accuracies)
        .map(|p| p.0)
        .fold(1.0, f64::max);
    let max_loss = losses.iter().map(|p| p.1).fold(0.1, f64::max) * 1.05;

    let mut chart = ChartBuilder::on(&left)
        .caption("training loss", (FONT, 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..max_epoch, 0f64..max_loss)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("loss")
        .label_style((FONT, 14))
        .draw()?;
    for (index, run) in runs.iter().enumerate() {
        let color = Palette99::pick(index).to_rgba();
        chart.draw_series(LineSeries::new(run.step_loss.clone(), color.mix(0.25)))?;
        chart
            .draw_series(LineSeries::new(
                run.epoch_loss.clone(),
                color.stroke_width(2),
            ))?
            .label(run.name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;

    let mut chart = ChartBuilder::on(&right)
        .caption("test top-1 (%)", (FONT, 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..max_epoch, 0f64..100f64)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("top-1 %")
        .label_style((FONT, 14))
        .draw()?;
    for (index, run) in runs.iter().enumerate() {
        let color = Palette99::pick(index).to_rgba();
        chart
            .draw_series(LineSeries::new(run.top1.clone(), color.stroke_width(2)))?
            .label(run.name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(
            run.top1
                .iter()
                .map(|&(x, y)| Circle::new((x, y), 3, color.filled())),
        )?;
        if !run.top1_combined.is_empty() {
            chart
                .draw_series(LineSeries::new(run.top1_combined.clone(), color.mix(0.5)))?
                .label(format!("{} (combined)", run.name))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.mix(0.5)));
        }
    }
    chart
        .configure_series_labels()
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    Ok(())
}
