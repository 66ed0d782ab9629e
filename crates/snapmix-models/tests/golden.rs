//! Golden test: every `<name>.weights.safetensors` + `<name>.io.safetensors` pair in
//! `SNAPMIX_MODEL_GOLDEN_DIR` (default `data/golden/models`) must reproduce torchvision's eval
//! outputs, train-mode logits and `bn1` running statistics within relative error 1e-4.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use snapmix_models::{read_safetensors, Arch, LoadOptions, ResNet};

const REL_TOL: f64 = 1e-4;

fn golden_dir() -> PathBuf {
    match std::env::var_os("SNAPMIX_MODEL_GOLDEN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/golden/models"),
    }
}

/// `(name, weights path, io path)` of every complete case in `dir`.
fn cases(dir: &Path) -> Vec<(String, PathBuf, PathBuf)> {
    let entries = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list golden directory {}: {e}", dir.display()));
    let mut cases: Vec<_> = entries
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let file = path.file_name()?.to_str()?;
            let name = file.strip_suffix(".weights.safetensors")?.to_string();
            let io = dir.join(format!("{name}.io.safetensors"));
            io.exists().then(|| (name, path.clone(), io))
        })
        .collect();
    cases.sort();
    cases
}

fn metadata(path: &Path) -> HashMap<String, String> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    meta.metadata().clone().unwrap_or_default()
}

/// Relative error of `actual` against `expected`: the largest element difference over the
/// largest expected magnitude (a per-element ratio would explode on values near zero).
fn rel_error(actual: &Tensor, expected: &Tensor) -> f64 {
    assert_eq!(actual.dims(), expected.dims(), "shape");
    let to_vec = |t: &Tensor| {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    };
    let (actual, expected) = (to_vec(actual), to_vec(expected));
    let scale = expected.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-12);
    let max_diff = actual
        .iter()
        .zip(&expected)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
    max_diff / scale
}

#[test]
fn golden_models_match_torchvision() {
    let dir = golden_dir();
    let cases = cases(&dir);
    assert!(
        !cases.is_empty(),
        "no golden model case (<name>.weights.safetensors + <name>.io.safetensors) in {}",
        dir.display()
    );
    let device = Device::Cpu;
    for (name, weights, io_path) in cases {
        let meta = metadata(&io_path);
        let arch: Arch = meta
            .get("arch")
            .unwrap_or_else(|| panic!("{name}: io metadata lacks `arch`"))
            .parse()
            .unwrap();
        let num_classes: usize = meta
            .get("num_classes")
            .unwrap_or_else(|| panic!("{name}: io metadata lacks `num_classes`"))
            .parse()
            .unwrap_or_else(|e| panic!("{name}: num_classes: {e}"));
        let io = read_safetensors(&io_path, &device).unwrap();
        let get = |key: &str| {
            io.get(key)
                .unwrap_or_else(|| panic!("{name}: io file lacks `{key}`"))
                .to_dtype(DType::F32)
                .unwrap()
        };
        let varmap = VarMap::new();
        let model = ResNet::new(
            arch,
            num_classes,
            None,
            VarBuilder::from_varmap(&varmap, DType::F32, &device),
        )
        .unwrap();
        let report = model
            .load_safetensors(&weights, LoadOptions::strict())
            .unwrap();
        assert!(report.newly_initialised.is_empty(), "{report}");
        let input = get("input");

        let eval = model.forward_t(&input, false).unwrap();
        let train = model.forward_t(&input, true).unwrap();
        let stats = model.bn1().running_stats();
        let checks = [
            ("eval_logits", rel_error(&eval.logits, &get("eval_logits"))),
            ("eval_layer4", rel_error(&eval.layer4, &get("eval_layer4"))),
            ("eval_layer3", rel_error(&eval.layer3, &get("eval_layer3"))),
            (
                "train_logits",
                rel_error(&train.logits, &get("train_logits")),
            ),
            (
                "bn1 running_mean",
                rel_error(&stats.mean, &get("train_running_mean_bn1")),
            ),
            (
                "bn1 running_var",
                rel_error(&stats.var, &get("train_running_var_bn1")),
            ),
        ];
        assert_eq!(
            stats.num_batches_tracked,
            1 + report_counter(&weights, &device),
            "{name}: num_batches_tracked"
        );
        for (what, error) in checks {
            eprintln!("{name} ({arch}): {what} relative error {error:.2e}");
            assert!(
                error < REL_TOL,
                "{name} ({arch}): {what} relative error {error:.3e} >= {REL_TOL:e}"
            );
        }
    }
}

/// `bn1.num_batches_tracked` as stored in the weights file (0 when absent).
fn report_counter(weights: &Path, device: &Device) -> i64 {
    read_safetensors(weights, device)
        .unwrap()
        .get("bn1.num_batches_tracked")
        .map(|t| t.to_dtype(DType::I64).unwrap().to_scalar::<i64>().unwrap())
        .unwrap_or(0)
}
