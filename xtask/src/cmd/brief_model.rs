//! The briefly trained CAM model of `show-mix` and `bench-labels`: a narrow ResNet-18 trained
//! from scratch on the synthetic set for a few CPU minutes, cached under target/, plus the
//! synthetic batches (normalised images, part masks, labels) both commands draw.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use snapmix_data::synthetic::{Split, SyntheticConfig, SyntheticSet};
use snapmix_data::transform::{IMAGENET_MEAN, IMAGENET_STD};
use snapmix_data::ImageDataset;
use snapmix_models::{Arch, LoadOptions, ResNet, ResNetConfig};
use snapmix_train::{NamedVar, ParamGroup, Sgd, SgdSettings};

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

/// The repository root (xtask lives in `<root>/xtask`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
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
    let cached = spec.cache_path(&repo_root());
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
            let seconds = train(&model, spec, device)?;
            if let Some(dir) = cached.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            model
                .save_safetensors(&cached)
                .with_context(|| format!("saving {}", cached.display()))?;
            (
                cached,
                format!("trained now ({:.0} s, minimal local loop)", seconds),
            )
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

/// Plain supervised training (no mixing): SGD with Nesterov momentum, cosine learning rate,
/// random horizontal flips (the class patterns are flip-symmetric). Returns the seconds spent.
fn train(model: &ResNet, spec: &BriefSpec, device: &Device) -> Result<f64> {
    let start = Instant::now();
    model.init_weights(spec.data_seed)?;
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
    let mut sgd = Sgd::new(
        vec![ParamGroup {
            label: "all".into(),
            base_lr: 0.05,
            weight_decay: 5e-4,
            params,
        }],
        SgdSettings {
            momentum: 0.9,
            nesterov: true,
            decay_bn_and_bias: true,
        },
    )?;
    let set = SyntheticSet::new(&spec.synthetic(), Split::Train)?;
    let batch_size = 32;
    let steps_per_epoch = set.len() / batch_size;
    let total_steps = (steps_per_epoch * spec.train_epochs).max(1);
    let mut rng = ChaCha8Rng::seed_from_u64(spec.data_seed ^ 0x6272_6965_66);
    eprintln!(
        "training the brief CAM model (ResNet-18 width {}, {} images of {}x{}, {} epochs) on {:?}; \
         cached afterwards",
        spec.base_width,
        set.len(),
        spec.image_size,
        spec.image_size,
        spec.train_epochs,
        device
    );
    let all = synthetic_batch(&set, &(0..set.len()).collect::<Vec<_>>(), device)?;
    let mut step = 0;
    for epoch in 0..spec.train_epochs {
        let mut order: Vec<usize> = (0..set.len()).collect();
        order.shuffle(&mut rng);
        let mut loss_sum = 0.0;
        for chunk in order.chunks_exact(batch_size) {
            let progress = step as f64 / total_steps as f64;
            sgd.set_lr_factor(0.5 * (1.0 + (std::f64::consts::PI * progress).cos()));
            let index = Tensor::from_vec(
                chunk.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                batch_size,
                device,
            )?;
            let mut images = all.images.index_select(&index, 0)?;
            if rand::Rng::random_bool(&mut rng, 0.5) {
                images = images.flip(&[3])?;
            }
            let labels = all.labels.index_select(&index, 0)?;
            let logits = model.forward_t(&images, true)?.logits;
            let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
            let value = loss.to_scalar::<f32>()?;
            anyhow::ensure!(
                value.is_finite(),
                "brief model: loss {value} at step {step}"
            );
            loss_sum += f64::from(value);
            sgd.step(&loss.backward()?)?;
            step += 1;
        }
        eprintln!(
            "  epoch {}/{}: loss {:.3} ({:.0} s)",
            epoch + 1,
            spec.train_epochs,
            loss_sum / steps_per_epoch.max(1) as f64,
            start.elapsed().as_secs_f64()
        );
    }
    Ok(start.elapsed().as_secs_f64())
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
