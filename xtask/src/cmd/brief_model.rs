//! The briefly trained CAM model of `show-mix` and `bench-labels`: a narrow ResNet-18 trained
//! from scratch on the synthetic set for a few CPU minutes with snapmix-train's `Trainer`,
//! cached under target/, plus the synthetic batches (normalised images, part masks, labels)
//! both commands draw.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use snapmix_data::synthetic::{Split, SyntheticConfig, SyntheticSet};
use snapmix_data::transform::{IMAGENET_MEAN, IMAGENET_STD};
use snapmix_data::ImageDataset;
use snapmix_models::{Arch, LoadOptions, ResNet, ResNetConfig};
use snapmix_train::config::{
    preset, MixMethod, ScheduleSettings, SyntheticSettings, SYNTHETIC_PRESET,
};
use snapmix_train::{EpochSummary, Observer, Outcome, StartMode, Trainer, TrainerOptions};

/// What the brief model is trained on and how long: also the key of its cache file.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct BriefSpec {
    /// Classes of the synthetic set.
    #[arg(long, default_value_t = 10)]
    pub classes: usize,
    /// Side of the synthetic images (the CAM grid is 1/32 of it: 128 -> 4x4).
    #[arg(long, default_value_t = 128)]
    pub image_size: usize,
    /// Training images per class of the brief model.
    #[arg(long, default_value_t = 150)]
    pub train_per_class: usize,
    /// Training epochs of the brief model (when no --weights and no cached model).
    #[arg(long, default_value_t = 4)]
    pub train_epochs: usize,
    /// Channels of the ResNet-18 stem (torchvision: 64).
    #[arg(long, default_value_t = 16)]
    pub base_width: usize,
    /// Seed of the synthetic set and of the brief model's training.
    #[arg(long, default_value_t = 0)]
    pub data_seed: u64,
}

impl BriefSpec {
    /// The synthetic set this spec describes (50 test images per class).
    pub fn synthetic(&self) -> SyntheticConfig {
        SyntheticConfig {
            classes: self.classes,
            train_per_class: self.train_per_class,
            test_per_class: 50,
            size: self.image_size,
            seed: self.data_seed,
        }
    }

    fn model_config(&self) -> ResNetConfig {
        ResNetConfig {
            base_width: self.base_width,
            ..ResNetConfig::new(Arch::ResNet18, self.classes)
        }
    }

    fn cache_path(&self, root: &Path) -> PathBuf {
        root.join("target/brief-model").join(format!(
            "synthetic-c{}-s{}-n{}-resnet18w{}-e{}-seed{}.safetensors",
            self.classes,
            self.image_size,
            self.train_per_class,
            self.base_width,
            self.train_epochs,
            self.data_seed
        ))
    }
}

/// A CAM model ready for use, and where it came from.
pub struct BriefModel {
    /// The network (evaluate it with `train = false`).
    pub model: ResNet,
    /// Its weights file.
    pub path: PathBuf,
    /// Top-1 accuracy on the synthetic test split.
    pub test_accuracy: f64,
    /// How it was obtained, for reports.
    pub origin: String,
}

/// Loads `weights` (a narrow ResNet-18 of `spec`'s shape) or the cached brief model, or trains
/// and caches one; then measures its test accuracy on the synthetic set.
pub fn load_or_train(
    spec: &BriefSpec,
    weights: Option<&Path>,
    device: &Device,
) -> Result<BriefModel> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let model = ResNet::from_config(spec.model_config(), vb).context("building the ResNet")?;
    let cached = spec.cache_path(&super::repo_root());
    let (path, origin) = match weights {
        Some(path) => {
            model
                .load_safetensors(path, LoadOptions::strict())
                .with_context(|| {
                    format!(
                        "loading {} into a ResNet-18 of width {} with {} classes",
                        path.display(),
                        spec.base_width,
                        spec.classes
                    )
                })?;
            (path.to_path_buf(), "--weights".to_string())
        }
        None if cached.is_file() => {
            model
                .load_safetensors(&cached, LoadOptions::strict())
                .with_context(|| format!("loading the cached model {}", cached.display()))?;
            (cached, "cached brief model".to_string())
        }
        None => {
            let seconds = train(&model, spec, &cached, device)?;
            if let Some(dir) = cached.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            model
                .save_safetensors(&cached)
                .with_context(|| format!("saving {}", cached.display()))?;
            (cached, format!("trained now ({seconds:.0} s)"))
        }
    };
    let test = SyntheticSet::new(&spec.synthetic(), Split::Test)?;
    let test_accuracy = accuracy(&model, &test, device)?;
    Ok(BriefModel {
        model,
        path,
        test_accuracy,
        origin,
    })
}

/// Synthetic images `indices` of `set`: ImageNet-normalised NCHW pixels, part masks (1 on the
/// part) `[len, rows, cols]` and labels.
pub struct SyntheticBatch {
    /// `[len, 3, size, size]` normalised.
    pub images: Tensor,
    /// `[len]` u32.
    pub labels: Tensor,
    /// Part masks, row-major, `len * size * size`.
    pub masks: Vec<f32>,
    /// Labels on the host.
    pub label_values: Vec<u32>,
}

/// Renders and normalises images `indices` of `set`.
pub fn synthetic_batch(
    set: &SyntheticSet,
    indices: &[usize],
    device: &Device,
) -> Result<SyntheticBatch> {
    let size = set.config().size;
    let plane = size * size;
    let mut pixels = vec![0f32; indices.len() * 3 * plane];
    let mut masks = vec![0f32; indices.len() * plane];
    let mut label_values = Vec::with_capacity(indices.len());
    for (k, &index) in indices.iter().enumerate() {
        let sample = set.sample(index);
        let out = &mut pixels[k * 3 * plane..(k + 1) * 3 * plane];
        for (i, pixel) in sample.image.pixels().enumerate() {
            for c in 0..3 {
                out[c * plane + i] =
                    (f32::from(pixel[c]) / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
            }
        }
        for (m, &v) in masks[k * plane..(k + 1) * plane]
            .iter_mut()
            .zip(sample.mask.as_raw())
        {
            *m = if v > 0 { 1.0 } else { 0.0 };
        }
        label_values.push(sample.label as u32);
    }
    Ok(SyntheticBatch {
        images: Tensor::from_vec(pixels, (indices.len(), 3, size, size), device)?,
        labels: Tensor::from_slice(&label_values, indices.len(), device)?,
        masks,
        label_values,
    })
}

/// Plain supervised training (no mixing) with snapmix-train's `Trainer`: the `synthetic`
/// preset (narrow ResNet-18 from scratch, SGD with Nesterov momentum, flips) at this spec's
/// size and length. The run directory sits next to the cache file; the final weights are
/// loaded into `model`. Returns the seconds spent.
fn train(model: &ResNet, spec: &BriefSpec, cache: &Path, device: &Device) -> Result<f64> {
    let start = Instant::now();
    let mut config = preset(SYNTHETIC_PRESET)?;
    config.name = "brief-cam-model".into();
    config.seed = spec.data_seed;
    config.data.synthetic = SyntheticSettings {
        classes: spec.classes,
        train_per_class: spec.train_per_class,
        test_per_class: spec.synthetic().test_per_class,
        image_size: spec.image_size,
    };
    // Whole images: the synthetic set is rendered at its size (no resize), flips stay on.
    config.data.resize = spec.image_size;
    config.data.crop = spec.image_size;
    config.model.base_width = spec.base_width;
    config.mix.method = MixMethod::None;
    config.schedule = ScheduleSettings {
        epochs: spec.train_epochs,
        milestones: vec![(spec.train_epochs * 3).div_ceil(4)],
        gamma: 0.1,
    };
    config.run.eval_every_epochs = spec.train_epochs.max(1);
    let run_dir = cache.with_extension("run");
    eprintln!(
        "training the brief CAM model (ResNet-18 width {}, {} images of {}x{}, {} epochs, \
         snapmix-train's Trainer) in {}; cached afterwards",
        spec.base_width,
        spec.classes * spec.train_per_class,
        spec.image_size,
        spec.image_size,
        spec.train_epochs,
        run_dir.display()
    );
    let options = TrainerOptions {
        device: device.clone(),
        run_dir: run_dir.clone(),
        stop: Arc::new(AtomicBool::new(false)),
    };
    let mut observer = EpochLog { start };
    let mut trainer = Trainer::start(config, options, StartMode::Overwrite, &mut observer)
        .context("starting the brief model's training run")?;
    let summary = match trainer.run(&mut observer)? {
        Outcome::Completed(summary) => summary,
        Outcome::Interrupted { .. } => bail!("the brief model's training was interrupted"),
    };
    model
        .load_safetensors(&summary.final_weights, LoadOptions::strict())
        .with_context(|| format!("loading {}", summary.final_weights.display()))?;
    Ok(start.elapsed().as_secs_f64())
}

/// Prints one line per finished epoch of the brief model's training.
struct EpochLog {
    start: Instant,
}

impl Observer for EpochLog {
    fn epoch_done(&mut self, summary: &EpochSummary) {
        eprintln!(
            "  epoch {}/{}: loss {:.3} ({:.0} s)",
            summary.epoch + 1,
            summary.epochs,
            summary.train_loss,
            self.start.elapsed().as_secs_f64()
        );
    }
}

/// Top-1 accuracy of `model` (eval mode) on `set`.
fn accuracy(model: &ResNet, set: &SyntheticSet, device: &Device) -> Result<f64> {
    let mut correct = 0usize;
    let indices: Vec<usize> = (0..set.len()).collect();
    for chunk in indices.chunks(100) {
        let batch = synthetic_batch(set, chunk, device)?;
        let predicted = model
            .forward_t(&batch.images, false)?
            .logits
            .argmax(1)?
            .to_vec1::<u32>()?;
        correct += predicted
            .iter()
            .zip(&batch.label_values)
            .filter(|(p, l)| p == l)
            .count();
    }
    Ok(correct as f64 / set.len().max(1) as f64)
}
