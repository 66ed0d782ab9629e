//! What `cargo xtask train` shows while it runs: an indicatif bar per epoch (loss, lr, img/s,
//! ETA) on a terminal, one plain line per epoch otherwise; and the Ctrl-C handler that asks
//! the trainer to checkpoint and stop at the next step boundary.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use snapmix_train::{EpochSummary, Observer, StepProgress};

/// Installs the Ctrl-C handler (once per process) and returns the flag it raises. A second
/// Ctrl-C exits at once, without a checkpoint.
pub fn stop_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    let handler_flag = flag.clone();
    ctrlc::set_handler(move || {
        if handler_flag.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond Ctrl-C: exiting now, without a checkpoint");
            std::process::exit(130);
        }
        eprintln!("\nCtrl-C: saving a checkpoint at the next step, then stopping (Ctrl-C again to quit at once)");
    })
    .context("cannot install the Ctrl-C handler")?;
    Ok(flag)
}

/// Progress display for one run.
pub struct Progress {
    bar: Option<ProgressBar>,
    plain: bool,
    label: String,
    run_start: Instant,
    epochs_done_here: usize,
    /// Exponential moving average of images/s, for a steady readout.
    images_per_sec: f64,
}

impl Progress {
    /// Bars when stdout is a terminal and `plain` was not asked for; `label` prefixes every
    /// line (the method, in `--compare`).
    pub fn new(plain: bool, label: &str) -> Self {
        Self {
            bar: None,
            plain: plain || !std::io::stdout().is_terminal(),
            label: label.to_string(),
            run_start: Instant::now(),
            epochs_done_here: 0,
            images_per_sec: 0.0,
        }
    }

    fn print(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| println!("{line}")),
            None => println!("{line}"),
        }
    }
}

impl Observer for Progress {
    fn epoch_started(&mut self, epoch: usize, epochs: usize, steps: usize, first_step: usize) {
        if self.plain {
            return;
        }
        let bar = ProgressBar::with_draw_target(Some(steps as u64), ProgressDrawTarget::stdout());
        let style = ProgressStyle::with_template(
            "{prefix} [{bar:30.cyan/blue}] {pos}/{len} {msg} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(format!("{}epoch {}/{}", self.label, epoch + 1, epochs));
        bar.set_position(first_step as u64);
        bar.reset_eta();
        self.bar = Some(bar);
    }

    fn step_done(&mut self, progress: &StepProgress) {
        self.images_per_sec = if self.images_per_sec == 0.0 {
            progress.images_per_sec
        } else {
            0.9 * self.images_per_sec + 0.1 * progress.images_per_sec
        };
        if let Some(bar) = &self.bar {
            bar.set_message(format!(
                "loss {:.4} lr {:.3e} {:.0} img/s",
                progress.loss, progress.lr, self.images_per_sec
            ));
            bar.inc(1);
        }
    }

    fn evaluating(&mut self, _epoch: usize) {
        if let Some(bar) = &self.bar {
            bar.set_message("evaluating on the test split...");
        }
    }

    fn epoch_done(&mut self, summary: &EpochSummary) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        self.epochs_done_here += 1;
        let per_epoch = self.run_start.elapsed().as_secs_f64() / self.epochs_done_here as f64;
        let remaining = per_epoch * (summary.epochs - summary.epoch - 1) as f64;
        let eval = match (&summary.eval, &summary.best) {
            (Some(eval), Some(best)) => {
                let combined = eval
                    .top1_combined
                    .map(|c| format!(" combined {:.2}%", 100.0 * c))
                    .unwrap_or_default();
                format!(
                    "  test top-1 {:.2}%{combined} (best {:.2}% @ epoch {})",
                    100.0 * eval.top1,
                    100.0 * best.score(),
                    best.epoch + 1
                )
            }
            _ => String::new(),
        };
        self.print(&format!(
            "{}epoch {:>3}/{}  loss {:.4}  lr {:.3e}  {:.0} img/s{eval}  ETA {}",
            self.label,
            summary.epoch + 1,
            summary.epochs,
            summary.train_loss,
            summary.lr,
            summary.images_per_sec,
            format_seconds(remaining)
        ));
    }

    fn message(&mut self, text: &str) {
        self.print(&format!("{}{text}", self.label));
    }
}

/// `m:ss` or `h:mm:ss`.
pub fn format_seconds(seconds: f64) -> String {
    let total = seconds.max(0.0).round() as u64;
    let (h, m, s) = (total / 3600, total / 60 % 60, total % 60);
    if h > 0 {
        format!("{h}:{m:02}:{s:02}")
    } else {
        format!("{m}:{s:02}")
    }
}
