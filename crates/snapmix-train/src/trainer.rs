//! The training loop: per step CAMs (when the method needs them), mixing, forward, mixed loss,
//! backward and SGD; per epoch the schedule, evaluation and checkpoints; resume from any
//! checkpoint with bitwise-identical results on CPU.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use snapmix_cam::{semantic_percent_maps, CamSource, Spm};
use snapmix_mix::{apply, mixed_cross_entropy, Method, MixConfig, MixParams};
use snapmix_models::{
    is_head_param, load_pretrained, LoadOptions, MidLevelConfig, ResNet, ResNetConfig, WeightSource,
};

use crate::config::{Arch, CamMode, MixMethod, MixMode, TrainConfig};
use crate::data::{self, DataBundle};
use crate::error::TrainError;
use crate::eval::{evaluate, EvalResult};
use crate::metrics::{MetricRecord, MetricsWriter};
use crate::optim::{NamedVar, ParamGroup, Sgd, SgdSettings};
use crate::rundir::{Checkpoint, EvalRecord, RngState, RunDir, StartMode, TrainState};

/// How the random streams of a run are keyed (recorded in every checkpoint).
const RNG_SCHEME: &str = "ChaCha8 keyed by (seed, epoch, step or image index, purpose)";

/// Receives progress as it happens (progress bars, logs); every method has a no-op default.
pub trait Observer {
    /// An epoch starts; `first_step` > 0 when resuming in the middle of it.
    fn epoch_started(&mut self, _epoch: usize, _epochs: usize, _steps: usize, _first_step: usize) {}
    /// A step finished.
    fn step_done(&mut self, _progress: &StepProgress) {}
    /// Evaluation starts (it may take a while).
    fn evaluating(&mut self, _epoch: usize) {}
    /// An epoch finished (with its evaluation, when one ran).
    fn epoch_done(&mut self, _summary: &EpochSummary) {}
    /// Something worth telling the user (weights loaded, checkpoint written, ...).
    fn message(&mut self, _text: &str) {}
}

/// An observer that ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct Silent;

impl Observer for Silent {}

/// One finished step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepProgress {
    /// 0-based epoch.
    pub epoch: usize,
    /// 0-based step within the epoch.
    pub step: usize,
    /// Steps per epoch.
    pub steps: usize,
    /// Optimiser steps since the start, this one included.
    pub global_step: usize,
    /// The step's loss.
    pub loss: f32,
    /// Learning rate of the new layers.
    pub lr: f64,
    /// Images per second of this step.
    pub images_per_sec: f64,
}

/// One finished epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochSummary {
    /// 0-based epoch.
    pub epoch: usize,
    /// Number of epochs of the run.
    pub epochs: usize,
    /// Mean training loss of the epoch (of the steps this process ran).
    pub train_loss: f64,
    /// Learning rate of the new layers.
    pub lr: f64,
    /// Training images per second.
    pub images_per_sec: f64,
    /// The evaluation, when one ran.
    pub eval: Option<EvalRecord>,
    /// The best evaluation so far.
    pub best: Option<EvalRecord>,
}

/// How a run ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// All epochs trained.
    Completed(RunSummary),
    /// Stopped on request (Ctrl-C) after saving a checkpoint to resume from.
    Interrupted {
        /// The checkpoint written.
        checkpoint: PathBuf,
        /// Where it stands.
        epoch: usize,
        /// Batches of `epoch` done.
        step_in_epoch: usize,
    },
}

/// The result of a completed run. Both the final-epoch and the best-epoch accuracy are given:
/// the official SnapMix numbers are best-epoch accuracies on the test split (there is no
/// separate validation split), which flatters them; the final epoch is the honest figure.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// The run directory.
    pub run_dir: PathBuf,
    /// The evaluation after the last epoch.
    pub final_eval: EvalRecord,
    /// The best evaluation (by combined score with a mid-level head, else top-1).
    pub best_eval: EvalRecord,
    /// Weights of the best epoch.
    pub best_weights: PathBuf,
    /// Weights after the last epoch.
    pub final_weights: PathBuf,
    /// Training time (evaluation excluded), in seconds, across resumes.
    pub train_seconds: f64,
}

/// A run being trained: model, optimiser, data, and where it stands.
pub struct Trainer {
    config: TrainConfig,
    device: Device,
    model: ResNet,
    _varmap: VarMap,
    cam_model: Option<ResNet>,
    sgd: Sgd,
    data: DataBundle,
    mix: MixConfig,
    run: RunDir,
    metrics: MetricsWriter,
    state: TrainState,
    stop: Arc<AtomicBool>,
}

/// Builds the network a config describes: seeded init from scratch, or a pretrained body with
/// fresh new layers.
pub fn build_model(
    config: &TrainConfig,
    num_classes: usize,
    device: &Device,
    observer: &mut dyn Observer,
) -> Result<(ResNet, VarMap), TrainError> {
    let model_config = resnet_config(config, num_classes);
    let init_seed = derive_seed(config.seed, b"init    ");
    match config.model.pretrained.as_deref() {
        None => {
            let varmap = VarMap::new();
            let model = ResNet::from_config(
                model_config,
                VarBuilder::from_varmap(&varmap, DType::F32, device),
            )?;
            model.init_weights(init_seed)?;
            Ok((model, varmap))
        }
        Some(source) => {
            let source = if source == "hub" {
                WeightSource::hub(model_config.arch)
            } else {
                WeightSource::File(PathBuf::from(source))
            };
            let pretrained = load_pretrained(model_config, &source, init_seed, device)?;
            observer.message(&pretrained.report.to_string());
            Ok((pretrained.model, pretrained.varmap))
        }
    }
}

/// The model shape a config asks for.
pub fn resnet_config(config: &TrainConfig, num_classes: usize) -> ResNetConfig {
    ResNetConfig {
        arch: models_arch(config.model.arch),
        num_classes,
        mid_level: config.model.midlevel.then_some(MidLevelConfig {
            detach_input: true,
            stop_detach_epoch: config.model.mid_detach_until,
        }),
        base_width: config.model.base_width,
    }
}

fn models_arch(arch: Arch) -> snapmix_models::Arch {
    match arch {
        Arch::Resnet18 => snapmix_models::Arch::ResNet18,
        Arch::Resnet34 => snapmix_models::Arch::ResNet34,
        Arch::Resnet50 => snapmix_models::Arch::ResNet50,
        Arch::Resnet101 => snapmix_models::Arch::ResNet101,
        Arch::Resnet152 => snapmix_models::Arch::ResNet152,
    }
}

/// The method in snapmix-mix's terms.
fn mix_method(method: MixMethod) -> Method {
    match method {
        MixMethod::None => Method::None,
        MixMethod::Snapmix => Method::SnapMix,
        MixMethod::Cutmix => Method::CutMix,
        MixMethod::AsCutmix => Method::AsCutMix,
        MixMethod::Mixup => Method::Mixup,
        MixMethod::Cutout => Method::Cutout,
    }
}

/// The mixing configuration of the run, in snapmix-mix's terms. A `mix.switch` (probabilities
/// summing to 1) becomes snapmix-mix's switch of all entries but the last, which takes the
/// place of `method` and so gets exactly what the others leave; probabilities are divided by
/// their sum first, so the up to 1e-6 a config may be off does not trip snapmix-mix's check.
pub fn mix_config(config: &TrainConfig) -> MixConfig {
    let (method, switch) = match config.mix.switch.split_last() {
        None => (mix_method(config.mix.method), Vec::new()),
        Some((last, others)) => {
            let total: f64 = config.mix.switch.iter().map(|entry| entry.prob).sum();
            let switch = others
                .iter()
                .map(|entry| (mix_method(entry.method), entry.prob / total))
                .collect();
            (mix_method(last.method), switch)
        }
    };
    MixConfig {
        method,
        prob: config.mix.prob_or_default(),
        beta: config.mix.beta_or_default(),
        same_label_rule: config.mix.same_label_rule,
        mode: match config.mix.mode {
            MixMode::Batch => snapmix_mix::MixMode::Batch,
            MixMode::Elem => snapmix_mix::MixMode::Elem,
        },
        switch,
    }
}

/// A 64-bit seed for one purpose, derived from the run's seed.
fn derive_seed(seed: u64, purpose: &[u8; 8]) -> u64 {
    let mut rng = stream(seed, 0, 0, purpose);
    rand::Rng::random(&mut rng)
}

/// An independent ChaCha8 stream for (seed, epoch, step, purpose).
fn stream(seed: u64, epoch: u64, step: u64, purpose: &[u8; 8]) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&epoch.to_le_bytes());
    key[16..24].copy_from_slice(&step.to_le_bytes());
    key[24..].copy_from_slice(purpose);
    ChaCha8Rng::from_seed(key)
}

/// The parameters of `model` as the optimiser groups them: the body at `lr_body`, the new
/// layers (classifier, mid-level head) at `lr_new`.
fn param_groups(model: &ResNet, config: &TrainConfig) -> Result<Vec<ParamGroup>, TrainError> {
    let (mut body, mut head) = (Vec::new(), Vec::new());
    for (name, tensor) in model.named_parameters() {
        let param = NamedVar {
            name: name.clone(),
            var: candle_core::Var::from_tensor(tensor)?,
        };
        if is_head_param(name) {
            head.push(param);
        } else {
            body.push(param);
        }
    }
    let group = |label: &str, base_lr, params| ParamGroup {
        label: label.to_string(),
        base_lr,
        weight_decay: config.optim.weight_decay,
        params,
    };
    Ok(vec![
        group("body", config.optim.lr_body, body),
        group("new_layers", config.optim.lr_new, head),
    ])
}

/// Options that are not part of the run's config (they do not change its results).
pub struct TrainerOptions {
    /// Where tensors live.
    pub device: Device,
    /// The run directory.
    pub run_dir: PathBuf,
    /// Set (e.g. by a Ctrl-C handler) to stop at the next step boundary with a checkpoint.
    pub stop: Arc<AtomicBool>,
}

impl Trainer {
    /// Starts a new run of `config` in `options.run_dir` (`StartMode::New` or `Overwrite`),
    /// writing the effective config there.
    pub fn start(
        config: TrainConfig,
        options: TrainerOptions,
        mode: StartMode,
        observer: &mut dyn Observer,
    ) -> Result<Self, TrainError> {
        if mode == StartMode::Resume {
            return Self::resume(options, observer);
        }
        config.validate()?;
        let data = data::build(&config.data, config.seed)?;
        let run = RunDir::open(&options.run_dir, mode)?;
        run.write_config(&config)?;
        let (model, varmap) =
            build_model(&config, data.class_names.len(), &options.device, observer)?;
        let metrics = MetricsWriter::open(&run.metrics_path(), None)?;
        let state = TrainState {
            epoch: 0,
            step_in_epoch: 0,
            global_step: 0,
            rng: RngState {
                seed: config.seed,
                scheme: RNG_SCHEME.into(),
            },
            best: None,
            last_eval: None,
            train_seconds: 0.0,
            config: config.clone(),
        };
        Self::assemble(config, options, model, varmap, data, run, metrics, state)
    }

    /// Continues the run in `options.run_dir` from its last checkpoint, with the config saved
    /// there: model weights (and batch-norm statistics), momentum buffers, position and best
    /// score are restored, and every random stream is keyed by the position, so the result is
    /// the one an uninterrupted run reaches.
    pub fn resume(
        options: TrainerOptions,
        observer: &mut dyn Observer,
    ) -> Result<Self, TrainError> {
        let run = RunDir::open(&options.run_dir, StartMode::Resume)?;
        let checkpoint = run
            .last_checkpoint()?
            .ok_or_else(|| TrainError::CannotResume {
                path: options.run_dir.clone(),
                reason: "no checkpoint".into(),
            })?;
        let config = checkpoint.state.config.clone();
        let data = data::build(&config.data, config.seed)?;
        let mut quiet = Silent;
        let mut scratch = config.clone();
        // The checkpoint provides every weight: skip loading pretrained ones.
        scratch.model.pretrained = None;
        let (model, varmap) = build_model(
            &scratch,
            data.class_names.len(),
            &options.device,
            &mut quiet,
        )?;
        model.load_safetensors(&checkpoint.model_path(), LoadOptions::strict())?;
        let metrics = MetricsWriter::open(&run.metrics_path(), Some(checkpoint.state.global_step))?;
        observer.message(&format!(
            "resuming {} at epoch {}, step {} (global step {})",
            run.root().display(),
            checkpoint.state.epoch,
            checkpoint.state.step_in_epoch,
            checkpoint.state.global_step
        ));
        let state = checkpoint.state.clone();
        let mut trainer =
            Self::assemble(config, options, model, varmap, data, run, metrics, state)?;
        trainer
            .sgd
            .load_state_tensors(checkpoint.load_optimizer_tensors(&trainer.device)?)?;
        Ok(trainer)
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        config: TrainConfig,
        options: TrainerOptions,
        model: ResNet,
        varmap: VarMap,
        data: DataBundle,
        run: RunDir,
        metrics: MetricsWriter,
        state: TrainState,
    ) -> Result<Self, TrainError> {
        // A fixed CAM model (official `--weightfile`): same shape as the trained one.
        let cam_model = match &config.mix.cam_weights {
            Some(path) => Some(crate::eval::load_model(
                &config,
                data.class_names.len(),
                path,
                &options.device,
            )?),
            None => None,
        };
        let sgd = Sgd::new(
            param_groups(&model, &config)?,
            SgdSettings {
                momentum: config.optim.momentum,
                nesterov: config.optim.nesterov,
                decay_bn_and_bias: config.optim.decay_bn_and_bias,
            },
        )?;
        let mix = mix_config(&config);
        mix.validate()?;
        Ok(Self {
            config,
            device: options.device,
            model,
            _varmap: varmap,
            cam_model,
            sgd,
            data,
            mix,
            run,
            metrics,
            state,
            stop: options.stop,
        })
    }

    /// The run's config.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// The run directory.
    pub fn run_dir(&self) -> &Path {
        self.run.root()
    }

    /// The model being trained.
    pub fn model(&self) -> &ResNet {
        &self.model
    }

    /// Class names of the dataset.
    pub fn class_names(&self) -> &[String] {
        &self.data.class_names
    }

    /// Trains until the last epoch (or a stop request), evaluating and checkpointing as the
    /// config says.
    pub fn run(&mut self, observer: &mut dyn Observer) -> Result<Outcome, TrainError> {
        let epochs = self.config.schedule.epochs;
        let steps = self.data.train.batches_per_epoch();
        let schedule = self.config.schedule.multistep();
        while self.state.epoch < epochs {
            let epoch = self.state.epoch;
            let first_step = self.state.step_in_epoch;
            self.sgd.set_lr_factor(schedule.factor(epoch));
            self.model.set_epoch(epoch);
            let lr = self.lr();
            observer.epoch_started(epoch, epochs, steps, first_step);
            let (mut loss_sum, mut loss_count, mut images) = (0.0f64, 0usize, 0usize);
            let (mut window_loss, mut window_steps, mut window_images) = (0.0f64, 0usize, 0usize);
            let mut window_start = Instant::now();
            let epoch_start = Instant::now();
            // A resumed epoch starts at its first untrained batch; the ones before are not decoded.
            let batches = self.data.train.epoch_from(epoch as u64, first_step);
            for (step, batch) in (first_step..).zip(batches) {
                let batch = batch?;
                let step_start = Instant::now();
                // On a rayon worker: the step's many parallel ops then start on the pool's own
                // threads instead of waking them from outside and parking this one each time
                // (2 cores: 100x fewer preemptions). Nothing inside waits on another thread.
                let loss = rayon::scope(|_| self.train_step(epoch, step, &batch))?;
                let seconds = step_start.elapsed().as_secs_f64();
                self.state.train_seconds += seconds;
                self.state.global_step += 1;
                self.state.step_in_epoch = step + 1;
                loss_sum += f64::from(loss);
                loss_count += 1;
                images += batch.len();
                window_loss += f64::from(loss);
                window_steps += 1;
                window_images += batch.len();
                observer.step_done(&StepProgress {
                    epoch,
                    step,
                    steps,
                    global_step: self.state.global_step,
                    loss,
                    lr,
                    images_per_sec: batch.len() as f64 / seconds.max(1e-9),
                });
                if self
                    .state
                    .global_step
                    .is_multiple_of(self.config.run.log_every_steps)
                {
                    self.metrics.write(&MetricRecord::Step {
                        epoch,
                        global_step: self.state.global_step,
                        loss: window_loss / window_steps as f64,
                        lr,
                        images_per_sec: window_images as f64
                            / window_start.elapsed().as_secs_f64().max(1e-9),
                        device_memory_gib: device_memory_gib(&self.device),
                    })?;
                    (window_loss, window_steps, window_images) = (0.0, 0, 0);
                    window_start = Instant::now();
                }
                let last_step = step + 1 == steps;
                if !last_step {
                    if self.stop.load(Ordering::SeqCst) {
                        let checkpoint = self.checkpoint(false)?;
                        observer
                            .message(&format!("stopped: checkpoint {}", checkpoint.dir.display()));
                        return Ok(self.interrupted(checkpoint));
                    }
                    let every = self.config.run.checkpoint_every_steps;
                    if every > 0 && self.state.global_step.is_multiple_of(every) {
                        self.checkpoint(false)?;
                    }
                }
            }
            let train_seconds = epoch_start.elapsed().as_secs_f64();
            let eval = if (epoch + 1).is_multiple_of(self.config.run.eval_every_epochs)
                || epoch + 1 == epochs
            {
                observer.evaluating(epoch);
                let result = evaluate(&self.model, &self.data.test, &self.device)?;
                Some(eval_record(epoch, &result))
            } else {
                None
            };
            let is_best = match (&eval, &self.state.best) {
                (Some(new), Some(best)) => new.score() > best.score(),
                (Some(_), None) => true,
                (None, _) => false,
            };
            if let Some(eval) = eval {
                self.state.last_eval = Some(eval);
                if is_best {
                    self.state.best = Some(eval);
                }
            }
            let train_loss = if loss_count > 0 {
                loss_sum / loss_count as f64
            } else {
                f64::NAN
            };
            let images_per_sec = images as f64 / train_seconds.max(1e-9);
            self.metrics.write(&MetricRecord::Epoch {
                epoch,
                global_step: self.state.global_step,
                train_loss,
                lr,
                images_per_sec,
                test_top1: eval.map(|e| e.top1),
                test_top1_combined: eval.and_then(|e| e.top1_combined),
                test_loss: eval.map(|e| e.loss),
            })?;
            self.state.epoch = epoch + 1;
            self.state.step_in_epoch = 0;
            let checkpoint = self.checkpoint(is_best)?;
            observer.epoch_done(&EpochSummary {
                epoch,
                epochs,
                train_loss,
                lr,
                images_per_sec,
                eval,
                best: self.state.best,
            });
            if self.stop.load(Ordering::SeqCst) && self.state.epoch < epochs {
                observer.message(&format!("stopped: checkpoint {}", checkpoint.dir.display()));
                return Ok(self.interrupted(checkpoint));
            }
        }
        self.summary()
    }

    /// One optimiser step on `batch`; returns its loss. A non-finite loss stops the run
    /// before any update, naming the step and the batch's mixing parameters.
    fn train_step(
        &mut self,
        epoch: usize,
        step: usize,
        batch: &snapmix_data::Batch,
    ) -> Result<f32, TrainError> {
        let images = batch.images_tensor(&self.device)?;
        let labels = batch.labels_tensor(&self.device)?;
        let mut rng = stream(self.config.seed, epoch as u64, step as u64, b"mixing  ");
        let params = self
            .mix
            .sample(&mut rng, batch.len(), batch.rows, batch.cols)?;
        let spm = if params.needs_spm() {
            Some(self.spm(&images, &labels)?)
        } else {
            None
        };
        let mixed = apply(&params, &images, &labels, spm.as_ref())?;
        let outputs = self.model.forward_t(&mixed.images, true)?;
        let smoothing = self.config.mix.label_smoothing;
        let mut loss = mixed_cross_entropy(&outputs.logits, &mixed, smoothing)?;
        if let Some(mid_logits) = &outputs.mid_logits {
            loss = (loss + mixed_cross_entropy(mid_logits, &mixed, smoothing)?)?;
        }
        let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        if !value.is_finite() {
            return Err(TrainError::NonFiniteLoss {
                loss: value,
                epoch,
                step,
                global_step: self.state.global_step,
                mixing: describe_mixing(&params),
            });
        }
        let grads = loss.backward()?;
        self.sgd.step(&grads)?;
        Ok(value)
    }

    /// SPMs of the un-mixed batch from the CAM model (the live one unless a fixed one was
    /// given), without gradients; in train mode this forward also updates batch-norm
    /// statistics, as in the official code.
    fn spm(&self, images: &Tensor, labels: &Tensor) -> Result<Spm, TrainError> {
        let source: &ResNet = self.cam_model.as_ref().unwrap_or(&self.model);
        let train = self.config.mix.cam_mode == CamMode::Train;
        let features = source.cam_features(images, train)?.detach();
        let weight = source.classifier_weight().detach();
        let bias = source.classifier_bias().map(Tensor::detach);
        let (_, _, rows, cols) = images.dims4()?;
        Ok(semantic_percent_maps(
            &features,
            &weight,
            bias.as_ref(),
            labels,
            (rows, cols),
        )?)
    }

    fn lr(&self) -> f64 {
        self.sgd
            .learning_rates()
            .iter()
            .find(|(label, _)| *label == "new_layers")
            .map_or(0.0, |(_, lr)| *lr)
    }

    fn checkpoint(&mut self, is_best: bool) -> Result<Checkpoint, TrainError> {
        self.metrics.sync()?;
        let model: HashMap<String, Tensor> = self.model.state_dict()?.into_iter().collect();
        self.run
            .save_checkpoint(&model, &self.sgd.state_tensors()?, &self.state, is_best)
    }

    fn interrupted(&self, checkpoint: Checkpoint) -> Outcome {
        Outcome::Interrupted {
            epoch: checkpoint.state.epoch,
            step_in_epoch: checkpoint.state.step_in_epoch,
            checkpoint: checkpoint.dir,
        }
    }

    fn summary(&self) -> Result<Outcome, TrainError> {
        let missing = |what: &str| TrainError::CannotResume {
            path: self.run.root().to_path_buf(),
            reason: format!("the finished run has no {what}"),
        };
        let last = self
            .run
            .last_checkpoint()?
            .ok_or_else(|| missing("checkpoint"))?;
        let best = self
            .run
            .best_checkpoint()?
            .ok_or_else(|| missing("best checkpoint"))?;
        Ok(Outcome::Completed(RunSummary {
            run_dir: self.run.root().to_path_buf(),
            final_eval: self.state.last_eval.ok_or_else(|| missing("evaluation"))?,
            best_eval: self.state.best.ok_or_else(|| missing("best evaluation"))?,
            best_weights: best.model_path(),
            final_weights: last.model_path(),
            train_seconds: self.state.train_seconds,
        }))
    }
}

fn eval_record(epoch: usize, result: &EvalResult) -> EvalRecord {
    EvalRecord {
        epoch,
        top1: result.top1,
        top1_combined: result.top1_combined,
        loss: result.loss,
    }
}

/// The mixing parameters of a batch in a line (for the NaN guard's message).
fn describe_mixing(params: &MixParams) -> String {
    let Some(first) = params.samples.first() else {
        return "empty batch".into();
    };
    let same = params.samples.iter().all(|s| s == first);
    let describe = |s: &snapmix_mix::SampleMix| {
        format!(
            "{} lam={:.4} lam1={:.4} box_a={:?} box_b={:?}",
            s.method, s.lam, s.lam1, s.box_a, s.box_b
        )
    };
    if same {
        format!(
            "{} (whole batch), partners {:?}",
            describe(first),
            params.perm
        )
    } else {
        let per_sample: Vec<String> = params.samples.iter().map(describe).collect();
        format!(
            "per sample [{}], partners {:?}",
            per_sample.join("; "),
            params.perm
        )
    }
}

/// Bytes held by live allocations in `device`'s memory pool, GiB: CUDA devices with memory
/// pools only (a diagnostic, so a device without pools records none rather than failing).
fn device_memory_gib(device: &Device) -> Option<f64> {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        return snapmix_models::ops::cuda::memory::used_bytes(device)
            .ok()
            .map(|bytes| bytes as f64 / (1u64 << 30) as f64);
    }
    let _ = device;
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{resolve, Overrides};

    #[test]
    fn mix_switch_maps_to_snapmix_mix_with_the_last_entry_as_the_rest() {
        let mut flags = Overrides::new();
        flags
            .set_switch("snapmix:0.2,mixup:0.3,cutmix:0.5000001")
            .unwrap()
            .set("mix.beta", 2.0)
            .set("mix.prob", 1.0);
        let config = resolve(None, None, &flags).unwrap();
        let mix = mix_config(&config);
        mix.validate().unwrap();
        assert_eq!(mix.method, Method::CutMix);
        let expected = [
            (Method::SnapMix, 0.2 / 1.0000001),
            (Method::Mixup, 0.3 / 1.0000001),
        ];
        assert_eq!(mix.switch.len(), expected.len());
        for ((method, prob), (want_method, want_prob)) in mix.switch.iter().zip(expected) {
            assert_eq!(*method, want_method);
            assert!((prob - want_prob).abs() < 1e-12, "{method}: {prob}");
        }
        assert_eq!((mix.beta, mix.prob), (2.0, 1.0));
        // Every method of the switch is drawn, each about as often as asked.
        let mut counts = HashMap::new();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for _ in 0..2000 {
            let params = mix.sample(&mut rng, 1, 8, 8).unwrap();
            *counts.entry(params.samples[0].method).or_insert(0usize) += 1;
        }
        for (method, share) in [
            (Method::SnapMix, 0.2),
            (Method::Mixup, 0.3),
            (Method::CutMix, 0.5),
        ] {
            let got = counts.get(&method).copied().unwrap_or(0) as f64 / 2000.0;
            assert!((got - share).abs() < 0.05, "{method}: {got} vs {share}");
        }

        // Without a switch: the method alone.
        let config = resolve(None, None, &Overrides::new()).unwrap();
        let mix = mix_config(&config);
        assert_eq!((mix.method, mix.switch.len()), (Method::SnapMix, 0));
    }
}
