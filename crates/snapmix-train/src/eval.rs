//! Evaluation on a test split: top-1 of the classifier and, with a mid-level head, of the
//! combined score (logits + mid_logits), mean cross-entropy, per-class accuracy and the
//! confusion matrix.

use candle_core::{DType, Device, Tensor, D};
use snapmix_data::Loader;
use snapmix_models::ResNet;

use crate::error::TrainError;

/// What one pass over a test split measured.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalResult {
    /// Images evaluated.
    pub images: usize,
    /// Top-1 accuracy of the classifier, in [0, 1].
    pub top1: f64,
    /// Top-1 accuracy of logits + mid_logits, with a mid-level head.
    pub top1_combined: Option<f64>,
    /// Mean cross-entropy of the classifier.
    pub loss: f64,
    /// Per true class: images, and those predicted right (by the combined score where there is
    /// one, else the classifier).
    pub per_class: Vec<ClassCount>,
    /// `confusion[true][predicted]` counts, same predictions as `per_class`.
    pub confusion: Vec<Vec<u32>>,
}

/// Images and correct predictions of one class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClassCount {
    /// Images of the class.
    pub total: u32,
    /// Of those, predicted as the class.
    pub correct: u32,
}

impl ClassCount {
    /// Accuracy of the class (None without images).
    pub fn accuracy(&self) -> Option<f64> {
        (self.total > 0).then(|| f64::from(self.correct) / f64::from(self.total))
    }
}

/// Runs `model` in eval mode over every batch of `loader`.
pub fn evaluate(
    model: &ResNet,
    loader: &Loader,
    device: &Device,
) -> Result<EvalResult, TrainError> {
    let classes = model.config().num_classes;
    let mut confusion = vec![vec![0u32; classes]; classes];
    let (mut images, mut correct, mut correct_combined) = (0usize, 0usize, 0usize);
    let mut loss_sum = 0.0f64;
    let mut has_mid = false;
    for batch in loader.epoch(0) {
        let batch = batch?;
        let input = batch.images_tensor(device)?;
        let labels = batch.labels_tensor(device)?;
        let outputs = model.forward_t(&input, false)?;
        let logits = outputs.logits.detach();
        let batch_loss = candle_nn::loss::cross_entropy(&logits, &labels)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        loss_sum += batch_loss * batch.len() as f64;
        let predicted = argmax(&logits)?;
        let scored = match &outputs.mid_logits {
            Some(_) => {
                has_mid = true;
                let combined = argmax(&outputs.combined_logits()?.detach())?;
                correct_combined += count_equal(&combined, &batch.labels);
                combined
            }
            None => predicted.clone(),
        };
        correct += count_equal(&predicted, &batch.labels);
        for (&truth, &guess) in batch.labels.iter().zip(&scored) {
            let (truth, guess) = (truth as usize, guess as usize);
            if truth >= classes {
                return Err(TrainError::InvalidSetting(format!(
                    "label {truth} in the test split but the model has {classes} classes"
                )));
            }
            confusion[truth][guess] += 1;
        }
        images += batch.len();
    }
    if images == 0 {
        return Err(TrainError::InvalidSetting(
            "the test split has no images".into(),
        ));
    }
    let per_class = confusion
        .iter()
        .enumerate()
        .map(|(class, row)| ClassCount {
            total: row.iter().sum(),
            correct: row[class],
        })
        .collect();
    let n = images as f64;
    Ok(EvalResult {
        images,
        top1: correct as f64 / n,
        top1_combined: has_mid.then(|| correct_combined as f64 / n),
        loss: loss_sum / n,
        per_class,
        confusion,
    })
}

fn argmax(logits: &Tensor) -> Result<Vec<u32>, TrainError> {
    Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?)
}

fn count_equal(predicted: &[u32], labels: &[u32]) -> usize {
    predicted.iter().zip(labels).filter(|(p, l)| p == l).count()
}

/// Builds the model `config` describes for `num_classes` and loads `weights` into it (every
/// tensor must match: a file saved by a run of the same shape).
pub fn load_model(
    config: &crate::TrainConfig,
    num_classes: usize,
    weights: &std::path::Path,
    device: &Device,
) -> Result<ResNet, TrainError> {
    let varmap = candle_nn::VarMap::new();
    let model = ResNet::from_config(
        crate::trainer::resnet_config(config, num_classes),
        candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, device),
    )?;
    model.load_safetensors(weights, snapmix_models::LoadOptions::strict())?;
    Ok(model)
}
