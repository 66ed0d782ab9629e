//! `mixed_cross_entropy`: the two-label, per-sample weighted loss of a mixed batch, with
//! optional label smoothing, differentiable through candle's autograd.

use crate::{MixError, MixedBatch, Result};
use candle_core::{DType, Tensor, D};

/// Mean over the batch of `lam_a[i] * CE(logits[i], targets_a[i]) + lam_b[i] * CE(logits[i],
/// targets_b[i])`, where CE with `smoothing` = ε is the cross-entropy against
/// `(1 - ε) * one_hot + ε / K` (PyTorch's `label_smoothing`).
///
/// Built from `log_softmax` and `gather` because candle's `cross_entropy` only returns the batch
/// mean and cannot weight samples. `logits` is `[B, K]`; labels outside `0..K` are errors.
pub fn mixed_cross_entropy(logits: &Tensor, batch: &MixedBatch, smoothing: f64) -> Result<Tensor> {
    if !(0.0..1.0).contains(&smoothing) {
        return Err(MixError::InvalidSmoothing(smoothing));
    }
    let &[size, classes] = logits.dims() else {
        return Err(MixError::Shape {
            what: "logits",
            expected: "[B, K]".into(),
            got: logits.dims().to_vec(),
        });
    };
    for (what, t) in [
        ("targets_a", &batch.targets_a),
        ("targets_b", &batch.targets_b),
        ("lam_a", &batch.lam_a),
        ("lam_b", &batch.lam_b),
    ] {
        if t.dims() != [size] {
            return Err(MixError::Shape {
                what,
                expected: format!("[{size}] (the logits' batch)"),
                got: t.dims().to_vec(),
            });
        }
    }
    let log_probs = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let smooth = if smoothing > 0.0 {
        Some(log_probs.mean(D::Minus1)?.neg()?)
    } else {
        None
    };
    let loss_for = |targets: &Tensor, lam: &Tensor| -> Result<Tensor> {
        let index = label_index(targets, classes)?.to_device(logits.device())?;
        let mut ce = log_probs
            .gather(&index.unsqueeze(1)?, 1)?
            .squeeze(1)?
            .neg()?;
        if let Some(uniform) = &smooth {
            ce = (ce.affine(1.0 - smoothing, 0.0)? + uniform.affine(smoothing, 0.0)?)?;
        }
        Ok(ce.mul(&lam.to_dtype(logits.dtype())?.to_device(logits.device())?)?)
    };
    let per_sample =
        (loss_for(&batch.targets_a, &batch.lam_a)? + loss_for(&batch.targets_b, &batch.lam_b)?)?;
    Ok(per_sample.mean_all()?)
}

/// Labels as u32 gather indices, after checking they are in `0..classes`.
fn label_index(targets: &Tensor, classes: usize) -> Result<Tensor> {
    let values: Vec<i64> = match targets.dtype() {
        DType::U8 | DType::U32 | DType::I64 => targets.to_dtype(DType::I64)?.to_vec1()?,
        dtype => return Err(MixError::TargetDType(dtype)),
    };
    if let Some((sample, &target)) = values
        .iter()
        .enumerate()
        .find(|(_, &t)| t < 0 || t as u64 >= classes as u64)
    {
        return Err(MixError::TargetOutOfRange {
            sample,
            target,
            classes,
        });
    }
    Ok(targets.to_dtype(DType::U32)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn batch(targets_a: &[u32], targets_b: &[u32], lam_a: &[f32], lam_b: &[f32]) -> MixedBatch {
        let dev = Device::Cpu;
        let n = targets_a.len();
        MixedBatch {
            images: Tensor::zeros((n, 1, 1, 1), DType::F32, &dev).unwrap(),
            targets_a: Tensor::from_slice(targets_a, n, &dev).unwrap(),
            targets_b: Tensor::from_slice(targets_b, n, &dev).unwrap(),
            lam_a: Tensor::from_slice(lam_a, n, &dev).unwrap(),
            lam_b: Tensor::from_slice(lam_b, n, &dev).unwrap(),
        }
    }

    fn log_softmax_row(row: &[f64]) -> Vec<f64> {
        let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
        row.iter().map(|v| v - lse).collect()
    }

    const LOGITS: [[f64; 3]; 2] = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]];

    /// The loss and its gradient, by hand in f64.
    fn expected(mixed: &MixedBatch, smoothing: f64) -> (f64, Vec<[f64; 3]>) {
        let ta: Vec<u32> = mixed.targets_a.to_vec1().unwrap();
        let tb: Vec<u32> = mixed.targets_b.to_vec1().unwrap();
        let la: Vec<f32> = mixed.lam_a.to_vec1().unwrap();
        let lb: Vec<f32> = mixed.lam_b.to_vec1().unwrap();
        let n = LOGITS.len() as f64;
        let mut loss = 0.0;
        let mut grad = Vec::new();
        for (i, row) in LOGITS.iter().enumerate() {
            let lp = log_softmax_row(row);
            let ce = |t: u32| {
                (1.0 - smoothing) * -lp[t as usize] + smoothing * -lp.iter().sum::<f64>() / 3.0
            };
            let (a, b) = (f64::from(la[i]), f64::from(lb[i]));
            loss += (a * ce(ta[i]) + b * ce(tb[i])) / n;
            let mut g = [0.0; 3];
            for (k, gk) in g.iter_mut().enumerate() {
                let target = |t: u32| {
                    (1.0 - smoothing) * f64::from(u8::from(t as usize == k)) + smoothing / 3.0
                };
                *gk = ((a + b) * lp[k].exp() - a * target(ta[i]) - b * target(tb[i])) / n;
            }
            grad.push(g);
        }
        (loss, grad)
    }

    #[test]
    fn loss_and_gradient_match_the_formula() {
        let logits = Var::from_tensor(
            &Tensor::new(&LOGITS, &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap(),
        )
        .unwrap();
        let mixed = batch(&[1, 2], &[0, 1], &[0.7, 1.0], &[0.3, 0.0]);
        for smoothing in [0.0, 0.1] {
            let loss = mixed_cross_entropy(logits.as_tensor(), &mixed, smoothing).unwrap();
            let (want, want_grad) = expected(&mixed, smoothing);
            assert!((f64::from(loss.to_scalar::<f32>().unwrap()) - want).abs() < 1e-5);
            let grads = loss.backward().unwrap();
            let grad: Vec<Vec<f32>> = grads.get(logits.as_tensor()).unwrap().to_vec2().unwrap();
            for (g, w) in grad.iter().flatten().zip(want_grad.iter().flatten()) {
                assert!((f64::from(*g) - w).abs() < 1e-5, "{g} vs {w}");
            }
        }
    }

    #[test]
    fn weights_select_the_labels() {
        let logits = Tensor::new(&LOGITS, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let only_a = mixed_cross_entropy(
            &logits,
            &batch(&[1, 2], &[0, 0], &[1.0, 1.0], &[0.0, 0.0]),
            0.0,
        )
        .unwrap();
        let swapped = mixed_cross_entropy(
            &logits,
            &batch(&[0, 0], &[1, 2], &[0.0, 0.0], &[1.0, 1.0]),
            0.0,
        )
        .unwrap();
        let plain = candle_nn::loss::cross_entropy(
            &logits,
            &Tensor::new(&[1u32, 2], &Device::Cpu).unwrap(),
        )
        .unwrap();
        let (a, b, c) = (
            only_a.to_scalar::<f32>().unwrap(),
            swapped.to_scalar::<f32>().unwrap(),
            plain.to_scalar::<f32>().unwrap(),
        );
        assert!((a - c).abs() < 1e-6 && (b - c).abs() < 1e-6);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let logits = Tensor::new(&LOGITS, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let ok = batch(&[1, 2], &[0, 1], &[0.5, 0.5], &[0.5, 0.5]);
        assert!(
            matches!(mixed_cross_entropy(&logits, &ok, 1.0), Err(MixError::InvalidSmoothing(s)) if s == 1.0)
        );
        assert!(matches!(
            mixed_cross_entropy(&logits, &ok, -0.1),
            Err(MixError::InvalidSmoothing(_))
        ));
        let out_of_range = batch(&[1, 3], &[0, 1], &[0.5, 0.5], &[0.5, 0.5]);
        let err = mixed_cross_entropy(&logits, &out_of_range, 0.0).unwrap_err();
        assert!(
            matches!(
                err,
                MixError::TargetOutOfRange {
                    sample: 1,
                    target: 3,
                    classes: 3
                }
            ),
            "{err}"
        );
        let short = batch(&[1], &[0], &[0.5], &[0.5]);
        assert!(matches!(
            mixed_cross_entropy(&logits, &short, 0.0),
            Err(MixError::Shape {
                what: "targets_a",
                ..
            })
        ));
        let flat = logits.flatten_all().unwrap();
        assert!(matches!(
            mixed_cross_entropy(&flat, &ok, 0.0),
            Err(MixError::Shape { what: "logits", .. })
        ));
    }
}
