//! The training loop end to end on a tiny synthetic set and a narrow ResNet-18 (CPU, seconds):
//! the loss goes down, a resumed run matches an uninterrupted one bit for bit, a non-finite
//! loss stops the run without touching the last checkpoint, and a stop request checkpoints.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::Device;
use snapmix_train::config::resolve;
use snapmix_train::{
    read_metrics, MetricRecord, Observer, Outcome, Overrides, RunDir, StartMode, StepProgress,
    TrainConfig, TrainError, Trainer, TrainerOptions,
};

/// 4 classes x 8 training images at 32x32, batch 8 (4 steps per epoch), width-4 ResNet-18.
fn tiny(method: &str, epochs: usize) -> TrainConfig {
    let mut flags = Overrides::new();
    flags
        .set("data.synthetic.classes", 4)
        .set("data.synthetic.train_per_class", 8)
        .set("data.synthetic.test_per_class", 4)
        .set("data.synthetic.image_size", 32)
        .set("data.resize", 32)
        .set("data.crop", 32)
        .set("data.batch_size", 8)
        .set("data.test_batch_size", 16)
        .set("data.workers", 1)
        .set("model.base_width", 4)
        .set("schedule.epochs", epochs as i64)
        .set("schedule.milestones", vec![1i64])
        .set("run.log_every_steps", 2)
        .set("seed", 3);
    flags
        .set_assignment(&format!("mix.method={method}"))
        .unwrap();
    resolve(None, None, &flags).unwrap()
}

fn options(dir: &Path, stop: Arc<AtomicBool>) -> TrainerOptions {
    TrainerOptions {
        device: Device::Cpu,
        run_dir: dir.to_path_buf(),
        stop,
    }
}

fn never() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(false))
}

/// Raises the stop flag once `global_step` is reached, like a Ctrl-C at that moment.
struct StopAt {
    global_step: usize,
    flag: Arc<AtomicBool>,
}

impl Observer for StopAt {
    fn step_done(&mut self, progress: &StepProgress) {
        if progress.global_step == self.global_step {
            self.flag.store(true, Ordering::SeqCst);
        }
    }
}

fn train_to_end(config: TrainConfig, dir: &Path) -> snapmix_train::RunSummary {
    let mut observer = snapmix_train::Silent;
    let mut trainer =
        Trainer::start(config, options(dir, never()), StartMode::New, &mut observer).unwrap();
    match trainer.run(&mut observer).unwrap() {
        Outcome::Completed(summary) => summary,
        Outcome::Interrupted { .. } => panic!("not asked to stop"),
    }
}

#[test]
fn the_loss_goes_down() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = tiny("none", 10);
    config.model.base_width = 8;
    config.schedule.milestones = vec![];
    config.optim.lr_body = 0.02;
    config.optim.lr_new = 0.02;
    let summary = train_to_end(config, tmp.path());
    let losses: Vec<f64> = read_metrics(&tmp.path().join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter_map(|record| match record {
            MetricRecord::Epoch { train_loss, .. } => Some(train_loss),
            MetricRecord::Step { .. } => None,
        })
        .collect();
    assert_eq!(losses.len(), 10);
    // Per-epoch losses on 32 images are noisy: compare the first and last three epochs.
    let first: f64 = losses[..3].iter().sum::<f64>() / 3.0;
    let last: f64 = losses[7..].iter().sum::<f64>() / 3.0;
    assert!(last < 0.9 * first, "training loss per epoch: {losses:?}");
    assert!(summary.best_eval.top1 >= summary.final_eval.top1 || summary.best_eval.epoch == 5);
    assert!(summary.best_weights.is_file() && summary.final_weights.is_file());
}

/// Model weights (parameters and batch-norm statistics) of a checkpoint, as raw bytes.
fn weight_bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[test]
fn a_resumed_run_matches_an_uninterrupted_one_bitwise() {
    // SnapMix: exercises CAMs from the live model (train mode, batch-norm statistics updated
    // by that pass too) and the seeded mixing streams.
    let config = tiny("snapmix", 2);
    let whole_dir = tempfile::tempdir().unwrap();
    let whole = train_to_end(config.clone(), whole_dir.path());

    let split_dir = tempfile::tempdir().unwrap();
    let flag = never();
    // Stop in the middle of epoch 1 (steps 4..8), after global step 6.
    let mut stopper = StopAt {
        global_step: 6,
        flag: flag.clone(),
    };
    let mut trainer = Trainer::start(
        config,
        options(split_dir.path(), flag),
        StartMode::New,
        &mut stopper,
    )
    .unwrap();
    match trainer.run(&mut stopper).unwrap() {
        Outcome::Interrupted {
            epoch,
            step_in_epoch,
            ..
        } => assert_eq!((epoch, step_in_epoch), (1, 2)),
        Outcome::Completed(_) => panic!("the stop request was ignored"),
    }
    drop(trainer);
    let mut observer = snapmix_train::Silent;
    let mut resumed = Trainer::resume(options(split_dir.path(), never()), &mut observer).unwrap();
    let Outcome::Completed(split) = resumed.run(&mut observer).unwrap() else {
        panic!("resumed run did not complete");
    };
    assert_eq!(
        weight_bytes(&whole.final_weights),
        weight_bytes(&split.final_weights),
        "weights differ after resume"
    );
    assert_eq!(whole.final_eval, split.final_eval);
    // The metrics file holds each step once, as if never interrupted.
    let steps = |dir: &Path| -> Vec<usize> {
        read_metrics(&dir.join("metrics.jsonl"))
            .unwrap()
            .iter()
            .map(MetricRecord::global_step)
            .collect()
    };
    assert_eq!(steps(whole_dir.path()), steps(split_dir.path()));
}

#[test]
fn a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint() {
    // A milestone at epoch 1 with an absurd gamma makes the weights overflow in epoch 1.
    let mut config = tiny("cutmix", 3);
    config.schedule.gamma = 1e30;
    let tmp = tempfile::tempdir().unwrap();
    let mut observer = snapmix_train::Silent;
    let mut trainer = Trainer::start(
        config,
        options(tmp.path(), never()),
        StartMode::New,
        &mut observer,
    )
    .unwrap();
    let err = trainer.run(&mut observer).unwrap_err();
    let TrainError::NonFiniteLoss {
        epoch,
        global_step,
        ref mixing,
        ..
    } = err
    else {
        panic!("expected the NaN guard, got {err}");
    };
    assert_eq!(epoch, 1, "{err}");
    assert!(global_step > 4, "{err}");
    let message = err.to_string();
    assert!(
        message.contains("cutmix") || message.contains("none"),
        "{message}"
    );
    assert!(message.contains("lam="), "{message}");
    assert!(!mixing.is_empty());
    // The last checkpoint is the one written at the end of epoch 0.
    let run = RunDir::existing(tmp.path()).unwrap();
    let last = run.last_checkpoint().unwrap().unwrap();
    assert_eq!((last.state.epoch, last.state.global_step), (1, 4));
}

#[test]
fn an_existing_run_is_refused_unless_resumed_or_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny("none", 1);
    train_to_end(config.clone(), tmp.path());
    let mut observer = snapmix_train::Silent;
    let Err(err) = Trainer::start(
        config.clone(),
        options(tmp.path(), never()),
        StartMode::New,
        &mut observer,
    ) else {
        panic!("an existing run was overwritten silently");
    };
    assert!(err.to_string().contains("--overwrite"), "{err}");
    let mut trainer = Trainer::start(
        config,
        options(tmp.path(), never()),
        StartMode::Overwrite,
        &mut observer,
    )
    .unwrap();
    assert!(matches!(
        trainer.run(&mut observer).unwrap(),
        Outcome::Completed(_)
    ));
}
