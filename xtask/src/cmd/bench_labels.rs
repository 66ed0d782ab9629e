//! `cargo xtask bench-labels`: how far each mixing method's label weights are from the true
//! semantic share of each class in the mixed image, on the synthetic set whose part masks are
//! known. JSON and per-method histogram PNGs under target/bench/, a table on stdout.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use snapmix_cam::{semantic_percent_maps, CamSource, Spm};
use snapmix_data::synthetic::{Split, SyntheticSet};
use snapmix_data::ImageDataset;
use snapmix_mix::{apply, Method, MixConfig, MixMode, MixParams};

use super::brief_model::{self, BriefSpec};
use super::canvas;
use super::label_fidelity::{
    histogram, label_error, resizemix_sample, summarize, true_shares, LabelError, PartMask, Shares,
    Summary,
};
use crate::device::DeviceSpec;

/// Flags of `cargo xtask bench-labels`.
#[derive(clap::Args)]
pub struct Args {
    /// CAM model weights (a ResNet-18 of the --base-width/--classes shape trained on the
    /// synthetic set); default: the cached brief model, trained now if missing.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Mixes measured per method (only pairs of different classes count).
    #[arg(long, default_value_t = 2000)]
    mixes: usize,
    /// Images per mixed batch (partners are drawn within the batch).
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Beta(beta, beta) of the box and blend draws, the same for every method so that only the
    /// labelling differs (official SnapMix configs: 5 for SnapMix).
    #[arg(long, default_value_t = 5.0)]
    beta: f64,
    /// ResizeMix's range of the pasted image's side ratio.
    #[arg(long, num_args = 2, default_values_t = [0.1, 0.8])]
    resizemix_scale: Vec<f64>,
    /// Seed of the batches and mixes.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    spec: BriefSpec,
}

/// One labelling scheme measured by the benchmark.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Variant {
    /// SnapMix with CAMs of the model.
    SnapMixCam,
    /// SnapMix with SPMs = ground-truth masks, full resolution (equals the oracle).
    SnapMixMask,
    /// SnapMix with the masks average-pooled to the CAM grid and upsampled like a CAM: the best
    /// a CAM of that resolution could do.
    SnapMixMaskGrid,
    CutMix,
    AsCutMix,
    Mixup,
    ResizeMix,
    /// The true shares themselves (on SnapMix's boxes).
    Oracle,
}

impl Variant {
    const ALL: [Variant; 8] = [
        Variant::SnapMixCam,
        Variant::SnapMixMask,
        Variant::SnapMixMaskGrid,
        Variant::CutMix,
        Variant::AsCutMix,
        Variant::Mixup,
        Variant::ResizeMix,
        Variant::Oracle,
    ];

    fn name(self) -> &'static str {
        match self {
            Variant::SnapMixCam => "snapmix",
            Variant::SnapMixMask => "snapmix-gt-mask",
            Variant::SnapMixMaskGrid => "snapmix-gt-cam-grid",
            Variant::CutMix => "cutmix",
            Variant::AsCutMix => "as_cutmix",
            Variant::Mixup => "mixup",
            Variant::ResizeMix => "resizemix",
            Variant::Oracle => "oracle",
        }
    }

    fn description(self) -> &'static str {
        match self {
            Variant::SnapMixCam => "SnapMix, label weights from the model's CAMs",
            Variant::SnapMixMask => "SnapMix with SPM = ground-truth part mask (bound)",
            Variant::SnapMixMaskGrid => {
                "SnapMix with SPM = part mask pooled to the CAM grid and upsampled (CAM-resolution bound)"
            }
            Variant::CutMix => "CutMix, area label",
            Variant::AsCutMix => "asymmetric CutMix, area label",
            Variant::Mixup => "Mixup, blend coefficient",
            Variant::ResizeMix => "ResizeMix-style: whole partner resized into box_a, area label",
            Variant::Oracle => "the true shares (reference, error 0 by definition)",
        }
    }
}

/// Runs `cargo xtask bench-labels`.
pub fn run(args: Args, device: DeviceSpec) -> Result<()> {
    let device = device.open()?;
    if args.batch < 2 {
        bail!(
            "--batch {} is too small: partners come from the batch, use at least 2",
            args.batch
        );
    }
    let &[scale_min, scale_max] = args.resizemix_scale.as_slice() else {
        bail!("--resizemix-scale takes two values");
    };
    if !(0.0 < scale_min && scale_min <= scale_max && scale_max <= 1.0) {
        bail!("--resizemix-scale {scale_min} {scale_max}: need 0 < min <= max <= 1");
    }
    let brief = brief_model::load_or_train(&args.spec, args.weights.as_deref(), &device)?;
    eprintln!(
        "CAM model: {} ({}), test accuracy {:.1}%",
        brief.path.display(),
        brief.origin,
        brief.test_accuracy * 100.0
    );
    let test = SyntheticSet::new(&args.spec.synthetic(), Split::Test)?;
    let size = args.spec.image_size;
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let mut errors: Vec<Vec<LabelError>> = vec![Vec::new(); Variant::ALL.len()];
    let mut fallback = (0usize, 0usize);
    let mut cam_grid = (0, 0);
    while errors.iter().any(|e| e.len() < args.mixes) {
        let mut indices: Vec<usize> = (0..test.len()).collect();
        indices.shuffle(&mut rng);
        indices.truncate(args.batch.min(test.len()));
        let batch = brief_model::synthetic_batch(&test, &indices, &device)?;
        let spms = Spms::compute(&brief.model, &batch, size, &device)?;
        cam_grid = spms.grid;
        let snap_params = sample(&mut rng, Method::SnapMix, &args, size)?;
        for (k, variant) in Variant::ALL.into_iter().enumerate() {
            if errors[k].len() >= args.mixes {
                continue;
            }
            let (params, spm) = match variant {
                Variant::SnapMixCam | Variant::Oracle => (snap_params.clone(), &spms.cam),
                Variant::SnapMixMask => (snap_params.clone(), &spms.mask),
                Variant::SnapMixMaskGrid => (snap_params.clone(), &spms.mask_grid),
                Variant::CutMix => (sample(&mut rng, Method::CutMix, &args, size)?, &spms.cam),
                Variant::AsCutMix => (sample(&mut rng, Method::AsCutMix, &args, size)?, &spms.cam),
                Variant::Mixup => (sample(&mut rng, Method::Mixup, &args, size)?, &spms.cam),
                Variant::ResizeMix => {
                    let mut perm: Vec<usize> = (0..indices.len()).collect();
                    perm.shuffle(&mut rng);
                    let samples = (0..indices.len())
                        .map(|_| resizemix_sample(&mut rng, size, size, (scale_min, scale_max)))
                        .collect();
                    let params = MixParams {
                        rows: size,
                        cols: size,
                        perm,
                        samples,
                        same_label_rule: false,
                    };
                    (params, &spms.cam)
                }
            };
            let mixed = apply(&params, &batch.images, &batch.labels, Some(spm))
                .with_context(|| format!("mixing with {}", variant.name()))?;
            let lam_a = mixed.lam_a.to_vec1::<f32>()?;
            let lam_b = mixed.lam_b.to_vec1::<f32>()?;
            let plane = size * size;
            let degenerate = spms.cam.degenerate()?;
            for (i, &partner) in params.perm.iter().enumerate() {
                if batch.label_values[i] == batch.label_values[partner] {
                    continue; // Same class: no two labels to tell apart.
                }
                let mask = |j: usize| PartMask {
                    values: &batch.masks[j * plane..(j + 1) * plane],
                    rows: size,
                    cols: size,
                };
                let truth = true_shares(mask(i), mask(partner), &params.samples[i])?;
                let assigned = match variant {
                    Variant::Oracle => truth,
                    _ => Shares {
                        a: f64::from(lam_a[i]),
                        b: f64::from(lam_b[i]),
                    },
                };
                if variant == Variant::SnapMixCam {
                    fallback.1 += 1;
                    if degenerate[i] || degenerate[partner] {
                        fallback.0 += 1;
                    }
                }
                errors[k].push(label_error(assigned, truth));
            }
        }
    }

    let font = canvas::font()?;
    let out_dir = super::repo_root().join("target/bench");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    const BINS: usize = 20;
    let mut rows = Vec::new();
    for (variant, errs) in Variant::ALL.into_iter().zip(&errors) {
        let errs = &errs[..args.mixes.min(errs.len())];
        let summary = summarize(errs)?;
        let values: Vec<f64> = errs.iter().map(|e| e.error).collect();
        let counts = histogram(&values, BINS, 1.0);
        let png = out_dir.join(format!("bench-labels-{}.png", variant.name()));
        canvas::histogram_png(
            &font,
            &format!("{}: {} mixes", variant.description(), summary.mixes),
            &counts,
            1.0,
            summary.mean_error,
        )
        .save(&png)
        .with_context(|| format!("writing {}", png.display()))?;
        rows.push((variant, summary, counts, png));
    }

    println!(
        "label fidelity on the synthetic set ({}x{} images, part {}x{} px, CAM grid {}x{}, beta {}, \
         {} mixes per method, pairs of different classes)",
        size,
        size,
        args.spec.synthetic().part_px(),
        args.spec.synthetic().part_px(),
        cam_grid.0,
        cam_grid.1,
        args.beta,
        args.mixes
    );
    println!(
        "CAM model: {} ({}), test accuracy {:.1}%; CAM fallback to area labels in {} of {} SnapMix mixes",
        brief.path.display(),
        brief.origin,
        brief.test_accuracy * 100.0,
        fallback.0,
        fallback.1
    );
    println!(
        "{:<20} {:>8} {:>8} {:>8} {:>8} {:>16} {:>10}",
        "method", "mean", "median", "p90", "max", "dominant wrong", "no truth"
    );
    for (variant, s, _, _) in &rows {
        println!(
            "{:<20} {:>8.4} {:>8.4} {:>8.4} {:>8.4} {:>15.1}% {:>10}",
            variant.name(),
            s.mean_error,
            s.median_error,
            s.p90_error,
            s.max_error,
            s.dominant_wrong_fraction * 100.0,
            s.no_true_dominant
        );
    }
    let find = |v: Variant| -> &Summary {
        &rows
            .iter()
            .find(|r| r.0 == v)
            .expect("every variant runs")
            .1
    };
    let (snap, cut) = (find(Variant::SnapMixCam), find(Variant::CutMix));
    let closer = snap.mean_error < cut.mean_error;
    let verdict = format!(
        "SnapMix's CAM labels are {} the truth than CutMix's on this data: mean abs error {:.4} vs {:.4} \
         ({:.2}x), dominant label wrong {:.1}% vs {:.1}%",
        if closer { "closer to" } else { "NOT closer to" },
        snap.mean_error,
        cut.mean_error,
        cut.mean_error / snap.mean_error.max(1e-12),
        snap.dominant_wrong_fraction * 100.0,
        cut.dominant_wrong_fraction * 100.0
    );
    println!("{verdict}");

    let json = serde_json::json!({
        "benchmark": "bench-labels",
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "data": {
            "dataset": "synthetic (test split)",
            "image_size": size,
            "part_px": args.spec.synthetic().part_px(),
            "classes": args.spec.classes,
            "data_seed": args.spec.data_seed,
        },
        "cam_model": {
            "weights": brief.path.display().to_string(),
            "origin": brief.origin,
            "test_accuracy": brief.test_accuracy,
            "cam_grid": [cam_grid.0, cam_grid.1],
            "snapmix_area_fallbacks": fallback.0,
            "snapmix_mixes": fallback.1,
        },
        "beta": args.beta,
        "resizemix_scale": [scale_min, scale_max],
        "batch": args.batch,
        "seed": args.seed,
        "error_definition": "per mix: (|lam_a - true_a| + |lam_b - true_b|) / 2; true_a = share of image a's part outside box_a, true_b = share of b's part inside box_b",
        "methods": rows.iter().map(|(variant, summary, counts, png)| serde_json::json!({
            "name": variant.name(),
            "description": variant.description(),
            "summary": summary,
            "histogram": { "bins": BINS, "range": [0.0, 1.0], "counts": counts },
            "png": png.display().to_string(),
        })).collect::<Vec<_>>(),
        "snapmix_closer_than_cutmix": closer,
        "verdict": verdict,
    });
    let path = out_dir.join("bench-labels.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!(
        "wrote {} and the histograms bench-labels-<method>.png there",
        path.display()
    );
    Ok(())
}

/// Mixing parameters of `method` for one batch: per-sample draws (elem mode), same-label rule
/// off (same-class pairs are left out of the statistics anyway).
fn sample(rng: &mut ChaCha8Rng, method: Method, args: &Args, size: usize) -> Result<MixParams> {
    let config = MixConfig {
        beta: args.beta,
        same_label_rule: false,
        mode: MixMode::Elem,
        ..MixConfig::new(method)
    };
    // Draw from a child stream so that one method's draws do not shift another's.
    let mut child = ChaCha8Rng::seed_from_u64(rng.random());
    Ok(config.sample(&mut child, args.batch, size, size)?)
}

/// The three SPMs of a batch: from the model's CAMs, from the part masks, and from the part
/// masks pooled to the CAM grid.
struct Spms {
    cam: Spm,
    mask: Spm,
    mask_grid: Spm,
    grid: (usize, usize),
}

impl Spms {
    fn compute(
        model: &snapmix_models::ResNet,
        batch: &brief_model::SyntheticBatch,
        size: usize,
        device: &Device,
    ) -> Result<Self> {
        let cam = model.semantic_percent_maps(&batch.images, &batch.labels, false)?;
        let &[len, h, w] = cam.cam().dims() else {
            bail!("unexpected CAM shape {:?}", cam.cam().dims());
        };
        if !size.is_multiple_of(h) || !size.is_multiple_of(w) {
            bail!("image size {size} is not a multiple of the CAM grid {h}x{w}");
        }
        // A part mask is a one-channel "feature map" with a classifier weight of 1 for every
        // class: semantic_percent_maps then normalises (and upsamples) it like a CAM.
        let masks = Tensor::from_slice(&batch.masks, (len, 1, size, size), device)?;
        let classes = model.config().num_classes;
        let ones = Tensor::ones((classes, 1), DType::F32, device)?;
        let mask = semantic_percent_maps(&masks, &ones, None, &batch.labels, (size, size))?;
        let pooled = masks.avg_pool2d((size / h, size / w))?;
        let mask_grid = semantic_percent_maps(&pooled, &ones, None, &batch.labels, (size, size))?;
        Ok(Self {
            cam,
            mask,
            mask_grid,
            grid: (h, w),
        })
    }
}
