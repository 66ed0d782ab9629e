//! Loading and saving: round trips of our checkpoints, f16 files, replaced heads, the load
//! report, clear errors for wrong shapes and names, and the hub's offline error.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use snapmix_cam::CamSource;
use snapmix_models::{
    load_pretrained, read_safetensors, Arch, HubWeights, LoadOptions, MidLevelConfig, ModelError,
    ResNet, ResNetConfig, WeightSource,
};

fn small(num_classes: usize, mid: bool, seed: u64) -> (ResNet, VarMap) {
    let config = ResNetConfig {
        mid_level: mid.then(MidLevelConfig::default),
        base_width: 8,
        ..ResNetConfig::new(Arch::ResNet18, num_classes)
    };
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = ResNet::from_config(config, vb).unwrap();
    model.init_weights(seed).unwrap();
    (model, varmap)
}

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("snapmix-models-weights");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn images() -> Tensor {
    let values: Vec<f32> = (0..2 * 3 * 32 * 32)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    Tensor::from_vec(values, (2, 3, 32, 32), &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn checkpoint_round_trip_restores_parameters_and_running_stats() {
    let (model, _) = small(6, true, 1);
    model.forward_t(&images(), true).unwrap(); // moves the running statistics
    model.forward_t(&images(), true).unwrap();
    let path = scratch("round_trip.safetensors");
    model.save_safetensors(&path).unwrap();
    let stored = read_safetensors(&path, &Device::Cpu).unwrap();
    assert!(stored.contains_key("bn1.running_mean"));
    assert!(stored.contains_key("layer2.0.downsample.1.running_var"));
    assert_eq!(
        stored["layer1.0.bn1.num_batches_tracked"]
            .to_scalar::<i64>()
            .unwrap(),
        2
    );

    let (restored, _) = small(6, true, 2);
    let report = restored
        .load_safetensors(&path, LoadOptions::strict())
        .unwrap();
    assert_eq!(report.loaded.len(), stored.len());
    assert!(report.newly_initialised.is_empty() && report.skipped.is_empty());
    let (a, b) = (
        model.forward_t(&images(), false).unwrap(),
        restored.forward_t(&images(), false).unwrap(),
    );
    assert_eq!(max_diff(&a.logits, &b.logits), 0.0);
    assert_eq!(
        max_diff(&a.mid_logits.unwrap(), &b.mid_logits.unwrap()),
        0.0
    );
    assert_eq!(restored.bn1().running_stats().num_batches_tracked, 2);
}

#[test]
fn f16_files_load_as_f32() {
    let (model, _) = small(4, false, 3);
    let halves: HashMap<String, Tensor> = model
        .state_dict()
        .unwrap()
        .into_iter()
        .map(|(name, t)| {
            let t = if t.dtype().is_float() {
                t.to_dtype(DType::F16).unwrap()
            } else {
                t
            };
            (name, t)
        })
        .collect();
    let path = scratch("half.safetensors");
    candle_core::safetensors::save(&halves, &path).unwrap();
    let (restored, _) = small(4, false, 4);
    restored
        .load_safetensors(&path, LoadOptions::strict())
        .unwrap();
    let expected = halves["conv1.weight"].to_dtype(DType::F32).unwrap();
    let loaded = restored.state_dict().unwrap()["conv1.weight"].clone();
    assert_eq!(loaded.dtype(), DType::F32);
    assert_eq!(max_diff(&loaded, &expected), 0.0);
}

#[test]
fn a_new_head_is_reported_and_initialised_like_torch_linear() {
    let (pretrained, _) = small(10, false, 5);
    let path = scratch("ten_classes.safetensors");
    pretrained.save_safetensors(&path).unwrap();

    // Strict loading refuses the other class count, naming the tensor and both shapes.
    let (strict, _) = small(3, false, 6);
    let err = strict
        .load_safetensors(&path, LoadOptions::strict())
        .unwrap_err();
    assert!(
        matches!(&err, ModelError::ShapeMismatch { name, .. } if name.starts_with("fc.")),
        "{err}"
    );
    assert!(
        err.to_string().contains("[10") && err.to_string().contains("[3"),
        "{err}"
    );

    let config = ResNetConfig {
        mid_level: Some(MidLevelConfig::default()),
        base_width: 8,
        ..ResNetConfig::new(Arch::ResNet18, 3)
    };
    let source = WeightSource::File(path.clone());
    let first = load_pretrained(config, &source, 42, &Device::Cpu).unwrap();
    let report = &first.report;
    let mut fresh = report.newly_initialised.clone();
    fresh.sort();
    assert_eq!(
        fresh,
        [
            "fc.bias",
            "fc.weight",
            "mid_conv.bias",
            "mid_conv.weight",
            "mid_fc.bias",
            "mid_fc.weight"
        ]
    );
    assert_eq!(report.skipped, ["fc.bias", "fc.weight"]);
    assert!(report.loaded.contains(&"conv1.weight".to_string()));
    assert!(report.to_string().contains("newly initialised"), "{report}");

    // The body is the file's; the head is U(-1/sqrt(64), 1/sqrt(64)) and depends only on the seed.
    let body = |m: &ResNet| m.state_dict().unwrap()["layer4.1.conv2.weight"].clone();
    assert_eq!(max_diff(&body(&first.model), &body(&pretrained)), 0.0);
    let fc = first.model.classifier_weight();
    let bound = 1.0 / 8.0;
    let largest = fc
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        largest <= bound && largest > 0.5 * bound,
        "fc weight range {largest}"
    );
    let second = load_pretrained(config, &source, 42, &Device::Cpu).unwrap();
    assert_eq!(max_diff(fc, second.model.classifier_weight()), 0.0);
    let other_seed = load_pretrained(config, &source, 43, &Device::Cpu).unwrap();
    assert!(max_diff(fc, other_seed.model.classifier_weight()) > 0.0);
    assert_eq!(first.model.param_groups().unwrap().head.len(), 6);
}

#[test]
fn wrong_names_and_body_shapes_are_clear_errors() {
    let (model, _) = small(4, false, 7);
    let dict: BTreeMap<String, Tensor> = model.state_dict().unwrap();

    let mut extra = dict.clone();
    extra.insert(
        "layer5.0.conv1.weight".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    let err = model
        .load_state_dict(&extra, "extra", LoadOptions::pretrained(0))
        .unwrap_err();
    assert!(
        matches!(&err, ModelError::UnexpectedTensors { names, .. } if names == &["layer5.0.conv1.weight"]),
        "{err}"
    );

    let mut missing = dict.clone();
    missing.remove("layer1.0.conv1.weight");
    missing.remove("layer3.1.bn2.running_var");
    let err = model
        .load_state_dict(&missing, "missing", LoadOptions::pretrained(0))
        .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("layer1.0.conv1.weight") && message.contains("layer3.1.bn2.running_var"),
        "{message}"
    );

    // A counter may be absent (some exports drop it); it is reported, not an error.
    let mut no_counter = dict.clone();
    no_counter.remove("bn1.num_batches_tracked");
    let report = model
        .load_state_dict(&no_counter, "no counter", LoadOptions::strict())
        .unwrap();
    assert_eq!(report.defaulted, ["bn1.num_batches_tracked"]);

    // A body of another width never loads, even when the head may be replaced.
    let wider = ResNet::from_config(
        ResNetConfig {
            base_width: 16,
            ..ResNetConfig::new(Arch::ResNet18, 4)
        },
        VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu),
    )
    .unwrap();
    let err = wider
        .load_state_dict(&dict, "narrow.safetensors", LoadOptions::pretrained(0))
        .unwrap_err();
    assert!(matches!(&err, ModelError::ShapeMismatch { .. }), "{err}");
    assert!(err.to_string().contains("narrow.safetensors"), "{err}");

    // Nothing was written by the failed loads.
    let after = model.state_dict().unwrap();
    assert_eq!(max_diff(&after["conv1.weight"], &dict["conv1.weight"]), 0.0);
}

#[test]
fn a_missing_file_names_its_path() {
    let (model, _) = small(4, false, 8);
    let path = scratch("does_not_exist.safetensors");
    let err = model
        .load_safetensors(&path, LoadOptions::strict())
        .unwrap_err();
    assert!(
        err.to_string().contains("does_not_exist.safetensors"),
        "{err}"
    );
}

#[test]
fn hub_offline_miss_names_the_local_file_alternative() {
    let cache = scratch("empty-hub-cache");
    std::fs::create_dir_all(&cache).unwrap();
    let hub = HubWeights {
        cache_dir: Some(cache),
        offline: true,
        ..HubWeights::for_arch(Arch::ResNet50)
    };
    assert_eq!(hub.repo_id, "timm/resnet50.tv_in1k");
    let err = WeightSource::Hub(hub).resolve().unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(err, ModelError::Hub { offline: true, .. }),
        "{message}"
    );
    assert!(message.contains("WeightSource::File"), "{message}");
    assert!(
        message.contains("https://huggingface.co/timm/resnet50.tv_in1k"),
        "{message}"
    );
}

#[test]
fn cam_source_gives_layer4_and_the_classifier() {
    let (model, _) = small(5, false, 9);
    let features = model.cam_features(&images(), false).unwrap();
    let outputs = model.forward_t(&images(), false).unwrap();
    assert_eq!(features.dims(), &[2, 64, 1, 1]);
    assert_eq!(max_diff(&features, &outputs.layer4), 0.0);
    assert_eq!(model.classifier_weight().dims(), &[5, 64]);
    assert_eq!(outputs.layer3.dims(), &[2, 32, 2, 2]);
    assert!(outputs.mid_logits.is_none());
    assert_eq!(
        max_diff(&outputs.combined_logits().unwrap(), &outputs.logits),
        0.0
    );
    // The CAM's class scores reproduce the logits: mean over positions of W f + b.
    let pooled = features.mean((2, 3)).unwrap();
    let logits = pooled
        .matmul(&model.classifier_weight().t().unwrap())
        .unwrap()
        .broadcast_add(model.classifier_bias().unwrap())
        .unwrap();
    assert!(max_diff(&logits, &outputs.logits) < 1e-5);
}

#[test]
fn a_state_dict_snapshot_survives_training_and_restores_the_model() {
    let (model, _) = small(4, true, 10);
    model.forward_t(&images(), true).unwrap();
    let snapshot = model.state_dict().unwrap();
    let before = model
        .forward_t(&images(), false)
        .unwrap()
        .combined_logits()
        .unwrap();
    // Training changes parameters in place and moves the running statistics.
    model.init_weights(11).unwrap();
    model.forward_t(&images(), true).unwrap();
    let changed = model
        .forward_t(&images(), false)
        .unwrap()
        .combined_logits()
        .unwrap();
    assert!(max_diff(&before, &changed) > 0.0);
    model
        .load_state_dict(&snapshot, "snapshot", LoadOptions::strict())
        .unwrap();
    let restored = model
        .forward_t(&images(), false)
        .unwrap()
        .combined_logits()
        .unwrap();
    assert_eq!(max_diff(&before, &restored), 0.0);
    assert_eq!(model.bn1().running_stats().num_batches_tracked, 1);
}
