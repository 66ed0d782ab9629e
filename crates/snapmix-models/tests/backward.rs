//! Backward check: one SGD step on a small ResNet-18 (CPU, 32x32, f64) changes every trainable
//! parameter, and conv weight gradients match central finite differences.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, VarBuilder, VarMap, SGD};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use snapmix_models::{Arch, MidLevelConfig, ResNet, ResNetConfig};

/// A ResNet-18 at an eighth of torchvision's width (8 stem channels), so f64 finite
/// differences stay fast; the mid-level head is on so that its parameters are covered too.
fn small_resnet18(varmap: &VarMap) -> ResNet {
    let config = ResNetConfig {
        mid_level: Some(MidLevelConfig {
            detach_input: false,
            stop_detach_epoch: None,
        }),
        base_width: 8,
        ..ResNetConfig::new(Arch::ResNet18, 5)
    };
    let vb = VarBuilder::from_varmap(varmap, DType::F64, &Device::Cpu);
    let model = ResNet::from_config(config, vb).unwrap();
    model.init_weights(3).unwrap();
    model
}

fn batch(seed: u64) -> (Tensor, Tensor) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let pixels: Vec<f64> = (0..4 * 3 * 32 * 32)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let images = Tensor::from_vec(pixels, (4, 3, 32, 32), &Device::Cpu).unwrap();
    let labels = Tensor::new(&[0u32, 3, 1, 4], &Device::Cpu).unwrap();
    (images, labels)
}

/// Cross-entropy of the combined (classifier + mid-level) scores, in training mode.
fn loss(model: &ResNet, images: &Tensor, labels: &Tensor) -> Tensor {
    let outputs = model.forward_t(images, true).unwrap();
    candle_nn::loss::cross_entropy(&outputs.combined_logits().unwrap(), labels).unwrap()
}

#[test]
fn one_sgd_step_changes_every_parameter() {
    let varmap = VarMap::new();
    let model = small_resnet18(&varmap);
    let groups = model.param_groups().unwrap();
    let vars: Vec<Var> = groups.body.iter().chain(&groups.head).cloned().collect();
    assert_eq!(vars.len(), model.named_parameters().len());
    let before: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().copy().unwrap()).collect();
    let (images, labels) = batch(1);
    let mut sgd = SGD::new(vars.clone(), 0.1).unwrap();
    sgd.backward_step(&loss(&model, &images, &labels)).unwrap();
    for ((name, _), (var, old)) in model
        .named_parameters()
        .iter()
        .zip(vars.iter().zip(&before))
    {
        let change = (var.as_tensor() - old)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(change > 0.0, "parameter {name} did not change");
    }
}

#[test]
fn conv_weight_gradients_match_finite_differences() {
    let varmap = VarMap::new();
    let model = small_resnet18(&varmap);
    let (images, labels) = batch(2);
    let grads = loss(&model, &images, &labels).backward().unwrap();
    let params = model.named_parameters();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for name in [
        "conv1.weight",
        "layer1.0.conv2.weight",
        "layer2.0.downsample.0.weight",
        "layer3.1.conv1.weight",
        "layer4.0.conv2.weight",
    ] {
        let tensor = &params.iter().find(|(n, _)| n == name).unwrap().1;
        let var = Var::from_tensor(tensor).unwrap();
        let grad = grads
            .get(tensor)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let values = tensor.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for _ in 0..3 {
            let index = rng.random_range(0..values.len());
            let analytic = grad[index];
            // Central differences in f64 at two small steps: ReLU and max-pool kinks can sit
            // within a step of some activation (seen at 1e-5), and the smaller step dodges a
            // kink the larger one crosses; rounding error stays ~1e-9 at 1e-7.
            let mut best_error = f64::INFINITY;
            let mut best_numeric = f64::NAN;
            for step in [1e-6, 1e-7] {
                let eval_at = |delta: f64| {
                    let mut shifted = values.clone();
                    shifted[index] += delta;
                    var.set(&Tensor::from_vec(shifted, tensor.shape(), &Device::Cpu).unwrap())
                        .unwrap();
                    loss(&model, &images, &labels).to_scalar::<f64>().unwrap()
                };
                let numeric = (eval_at(step) - eval_at(-step)) / (2.0 * step);
                if (numeric - analytic).abs() < best_error {
                    best_error = (numeric - analytic).abs();
                    best_numeric = numeric;
                }
            }
            let original = Tensor::from_vec(values.clone(), tensor.shape(), &Device::Cpu).unwrap();
            var.set(&original).unwrap();
            assert!(
                best_error <= 1e-5 * analytic.abs().max(1e-2),
                "{name}[{index}]: numeric {best_numeric:e} vs analytic {analytic:e}"
            );
        }
    }
}

#[test]
fn detached_mid_level_head_sends_no_gradient_to_the_body() {
    let varmap = VarMap::new();
    let config = ResNetConfig {
        mid_level: Some(MidLevelConfig {
            detach_input: true,
            stop_detach_epoch: Some(2),
        }),
        base_width: 8,
        ..ResNetConfig::new(Arch::ResNet18, 5)
    };
    let model = ResNet::from_config(
        config,
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let (images, labels) = batch(3);
    let images = images.to_dtype(DType::F32).unwrap();
    let layer3_weight = &model
        .named_parameters()
        .iter()
        .find(|(n, _)| n == "layer3.0.conv1.weight")
        .unwrap()
        .1;
    let mid_loss = |model: &ResNet| {
        let outputs = model.forward_t(&images, true).unwrap();
        candle_nn::loss::cross_entropy(&outputs.mid_logits.unwrap(), &labels).unwrap()
    };
    assert!(model.mid_input_detached());
    let grads = mid_loss(&model).backward().unwrap();
    assert!(
        grads.get(layer3_weight).is_none(),
        "detached head reached layer3"
    );
    model.set_epoch(2);
    assert!(!model.mid_input_detached());
    let grads = mid_loss(&model).backward().unwrap();
    assert!(
        grads.get(layer3_weight).is_some(),
        "attached head did not reach layer3"
    );
}
