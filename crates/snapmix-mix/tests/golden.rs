//! Golden cases from the official SnapMix code: every `*.safetensors` file in
//! `$SNAPMIX_GOLDEN_DIR` (default `data/golden/mix`) is replayed through `semantic_percent_maps`
//! and `apply` (fused and composed) and compared with relative tolerance 1e-4.
//! Device: `$SNAPMIX_TEST_DEVICE` (`cpu` by default, `cuda` with `--features cuda`).

use candle_core::{DType, Device, Tensor};
use snapmix_cam::{semantic_percent_maps, semantic_percent_maps_composed, PixelBox, Spm};
use snapmix_mix::{
    apply, apply_composed, apply_in_place, Method, MixParams, MixedBatch, SampleMix,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const REL_TOL: f32 = 1e-4;

fn golden_dir() -> PathBuf {
    match std::env::var_os("SNAPMIX_GOLDEN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/golden/mix"),
    }
}

fn device() -> Device {
    match std::env::var("SNAPMIX_TEST_DEVICE").as_deref() {
        Err(_) | Ok("cpu") => Device::Cpu,
        Ok("cuda") => Device::new_cuda(0)
            .expect("SNAPMIX_TEST_DEVICE=cuda needs `--features cuda` and a visible GPU"),
        Ok(other) => panic!("SNAPMIX_TEST_DEVICE={other}: expected cpu or cuda"),
    }
}

#[test]
fn every_golden_case_matches_the_official_code() {
    let dir = golden_dir();
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read golden directory {}: {e}", dir.display()));
    let mut cases: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    cases.sort();
    assert!(
        !cases.is_empty(),
        "no *.safetensors golden case in {}",
        dir.display()
    );
    let device = device();
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|case| {
            run_case(case, &device)
                .err()
                .map(|e| format!("{}: {e}", case.display()))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} golden cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

type CaseResult = Result<(), String>;

fn run_case(path: &Path, device: &Device) -> CaseResult {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| format!("bad safetensors: {e}"))?;
    let meta: HashMap<String, String> = header.metadata().clone().unwrap_or_default();
    let method: Method = meta
        .get("method")
        .ok_or("no `method` in the metadata")?
        .parse()
        .map_err(|e| format!("{e}"))?;
    let tensors =
        candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| e.to_string())?;
    let get = |name: &str| {
        tensors
            .get(name)
            .ok_or_else(|| format!("missing tensor `{name}`"))
    };
    let ints = |name: &str| -> Result<Vec<i64>, String> {
        get(name)?
            .flatten_all()
            .and_then(|t| t.to_dtype(DType::I64)?.to_vec1())
            .map_err(|e| e.to_string())
    };
    let floats = |t: &Tensor| -> Result<Vec<f32>, String> {
        t.flatten_all()
            .and_then(|t| t.to_dtype(DType::F32)?.to_vec1())
            .map_err(|e| e.to_string())
    };
    let scalar = |name: &str| -> Result<Option<f64>, String> {
        match tensors.get(name) {
            None => Ok(None),
            Some(t) => Ok(Some(
                t.flatten_all()
                    .and_then(|t| t.to_dtype(DType::F64)?.to_vec1::<f64>())
                    .map_err(|e| e.to_string())?[0],
            )),
        }
    };
    let pixel_box = |name: &str| -> Result<PixelBox, String> {
        if !tensors.contains_key(name) {
            return Ok(PixelBox::default());
        }
        let v: Vec<usize> = ints(name)?
            .into_iter()
            .map(|x| usize::try_from(x).map_err(|_| format!("negative corner in {name}")))
            .collect::<Result<_, _>>()?;
        match v[..] {
            [row0, col0, row1, col1] => Ok(PixelBox::new(row0, col0, row1, col1)),
            _ => Err(format!("{name} must have 4 entries")),
        }
    };

    let images = get("images")?;
    let targets = get("targets")?;
    let (batch, _, rows, cols) = images.dims4().map_err(|e| e.to_string())?;
    let perm: Vec<usize> = if tensors.contains_key("perm") {
        ints("perm")?.into_iter().map(|p| p as usize).collect()
    } else {
        (0..batch).collect()
    };
    let lam = scalar("lam")?.unwrap_or(1.0);
    let sample = SampleMix {
        method,
        box_a: pixel_box("box_a")?,
        box_b: pixel_box("box_b")?,
        lam,
        lam1: scalar("lam1")?.unwrap_or(lam),
    };
    let params = MixParams::batch_mode(rows, cols, perm, sample);

    let spms = if method == Method::SnapMix {
        let args = (
            get("features")?,
            get("weight")?,
            tensors.get("bias"),
            targets,
        );
        let fused = semantic_percent_maps(args.0, args.1, args.2, args.3, (rows, cols))
            .map_err(|e| e.to_string())?;
        let composed = semantic_percent_maps_composed(args.0, args.1, args.2, args.3, (rows, cols))
            .map_err(|e| e.to_string())?;
        let want = floats(get("spm")?)?;
        check_spm("spm (fused)", &fused, &want)?;
        check_spm("spm (composed)", &composed, &want)?;
        Some((fused, composed))
    } else {
        None
    };

    let want_mixed = floats(get("mixed")?)?;
    let want_targets_b = ints("targets_b")?;
    let want_lam_a = floats(get("lam_a")?)?;
    let want_lam_b = floats(get("lam_b")?)?;
    let runs = [
        (
            "fused",
            apply(&params, images, targets, spms.as_ref().map(|s| &s.0)),
        ),
        (
            "composed",
            apply_composed(&params, images, targets, spms.as_ref().map(|s| &s.1)),
        ),
        (
            "in place",
            images
                .copy()
                .map_err(|e| e.to_string())
                .and_then(|copy| {
                    apply_in_place(&params, &copy, targets, spms.as_ref().map(|s| &s.0))
                        .map_err(|e| e.to_string())
                })
                .map_err(|e| snapmix_mix::MixError::Candle(candle_core::Error::Msg(e))),
        ),
    ];
    for (path_name, mixed) in runs {
        let mixed: MixedBatch = mixed.map_err(|e| format!("apply ({path_name}): {e}"))?;
        close(
            &format!("mixed ({path_name})"),
            &floats(&mixed.images)?,
            &want_mixed,
        )?;
        let targets_b: Vec<i64> = mixed
            .targets_b
            .to_dtype(DType::I64)
            .and_then(|t| t.to_vec1())
            .map_err(|e| e.to_string())?;
        if targets_b != want_targets_b {
            return Err(format!(
                "targets_b ({path_name}): got {targets_b:?}, want {want_targets_b:?}"
            ));
        }
        close(
            &format!("lam_a ({path_name})"),
            &floats(&mixed.lam_a)?,
            &want_lam_a,
        )?;
        close(
            &format!("lam_b ({path_name})"),
            &floats(&mixed.lam_b)?,
            &want_lam_b,
        )?;
    }
    Ok(())
}

/// Finite expected entries within `REL_TOL` of the tensor's largest magnitude; an expected NaN
/// sample must be degenerate in ours and a degenerate one must be NaN in the expected.
fn check_spm(what: &str, spm: &Spm, want: &[f32]) -> CaseResult {
    let got = spm
        .maps()
        .map_err(|e| e.to_string())?
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| e.to_string())?;
    if got.len() != want.len() {
        return Err(format!("{what}: {} values, want {}", got.len(), want.len()));
    }
    let plane = want.len() / spm.batch();
    for (b, degenerate) in spm
        .degenerate()
        .map_err(|e| e.to_string())?
        .into_iter()
        .enumerate()
    {
        let want_nan = want[b * plane..(b + 1) * plane].iter().any(|v| v.is_nan());
        if want_nan != degenerate {
            return Err(format!("{what}: sample {b} degenerate = {degenerate}, but the expected map has NaN = {want_nan}"));
        }
    }
    close(what, &got, want)
}

fn close(what: &str, got: &[f32], want: &[f32]) -> CaseResult {
    if got.len() != want.len() {
        return Err(format!("{what}: {} values, want {}", got.len(), want.len()));
    }
    let scale = want
        .iter()
        .filter(|v| v.is_finite())
        .fold(0f32, |m, v| m.max(v.abs()));
    let tol = REL_TOL * scale;
    match got
        .iter()
        .zip(want)
        .enumerate()
        .find(|(_, (g, w))| !w.is_nan() && ((*g - *w).abs() > tol || g.is_nan()))
    {
        Some((i, (g, w))) => Err(format!(
            "{what}: index {i} got {g}, want {w} (tolerance {tol})"
        )),
        None => Ok(()),
    }
}
