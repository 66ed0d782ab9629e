//! Structure: every depth has torchvision's parameter count and names, and the expected output
//! shapes.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use snapmix_models::{Arch, MidLevelConfig, ResNet, ResNetConfig};

fn zero_model(config: ResNetConfig) -> ResNet {
    ResNet::from_config(config, VarBuilder::zeros(DType::F32, &Device::Cpu)).unwrap()
}

#[test]
fn parameter_counts_and_names_match_torchvision() {
    // sum(p.numel() for p in torchvision.models.<arch>().parameters()) with 1000 classes.
    let expected = [
        (Arch::ResNet18, 11_689_512usize, 62usize),
        (Arch::ResNet34, 21_797_672, 110),
        (Arch::ResNet50, 25_557_032, 161),
        (Arch::ResNet101, 44_549_160, 314),
        (Arch::ResNet152, 60_192_808, 467),
    ];
    for (arch, count, tensors) in expected {
        let model = zero_model(ResNetConfig::new(arch, 1000));
        let params = model.named_parameters();
        let total: usize = params.iter().map(|(_, t)| t.elem_count()).sum();
        assert_eq!((total, params.len()), (count, tensors), "{arch}");
        let state = model.state_dict().unwrap();
        // Each batch norm adds running_mean, running_var and num_batches_tracked.
        let batch_norms = params
            .iter()
            .filter(|(n, t)| n.ends_with(".weight") && t.rank() == 1)
            .count();
        assert_eq!(state.len(), tensors + 3 * batch_norms, "{arch}");
        assert!(
            state.contains_key("layer1.0.bn1.num_batches_tracked"),
            "{arch}"
        );
    }
}

#[test]
fn bottleneck_shapes_and_outputs() {
    let model = zero_model(ResNetConfig::new(Arch::ResNet50, 1000));
    let shape = |name: &str| {
        model
            .named_parameters()
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no parameter {name}"))
            .1
            .dims()
            .to_vec()
    };
    assert_eq!(shape("layer2.0.conv1.weight"), [128, 256, 1, 1]);
    assert_eq!(shape("layer2.0.conv2.weight"), [128, 128, 3, 3]);
    assert_eq!(shape("layer2.0.conv3.weight"), [512, 128, 1, 1]);
    assert_eq!(shape("layer2.0.downsample.0.weight"), [512, 256, 1, 1]);
    assert_eq!(shape("fc.weight"), [1000, 2048]);

    // Output shapes of a narrow ResNet-50 with the mid-level head.
    let narrow = zero_model(ResNetConfig {
        base_width: 4,
        mid_level: Some(MidLevelConfig::default()),
        ..ResNetConfig::new(Arch::ResNet50, 7)
    });
    let images = Tensor::zeros((1, 3, 64, 64), DType::F32, &Device::Cpu).unwrap();
    let outputs = narrow.forward_t(&images, false).unwrap();
    assert_eq!(outputs.layer3.dims(), &[1, 64, 4, 4]);
    assert_eq!(outputs.layer4.dims(), &[1, 128, 2, 2]);
    assert_eq!(outputs.mid_logits.unwrap().dims(), &[1, 7]);
}
