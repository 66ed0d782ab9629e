//! SPM behaviour through the public API: fused kernels against the composed-candle reference,
//! degenerate samples, box sums, the `CamSource` helper and every input error.

use candle_core::{DType, Device, Result as CandleResult, Tensor};
use snapmix_cam::{
    semantic_percent_maps, semantic_percent_maps_composed, CamError, CamSource, PixelBox, Spm,
};

fn randn(shape: &[usize], seed: u64) -> Tensor {
    // A small deterministic generator keeps these tests independent of candle's RNG.
    let n: usize = shape.iter().product();
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let values: Vec<f32> = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).expect("shape matches the values")
}

fn maps(spm: &Spm) -> Vec<f32> {
    spm.maps()
        .expect("maps")
        .flatten_all()
        .and_then(|t| t.to_vec1())
        .expect("f32 maps")
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn fused_matches_composed_for_many_shapes() {
    // (batch, channels, h, w, rows, cols): square, non-square, B = 1, downsampling, 1x1 CAM.
    let shapes = [
        (3, 8, 4, 4, 32, 32),
        (2, 5, 3, 7, 20, 45),
        (1, 4, 6, 6, 17, 9),
        (2, 3, 9, 8, 5, 4),
        (2, 3, 1, 1, 6, 6),
    ];
    for (k, &(b, c, h, w, rows, cols)) in shapes.iter().enumerate() {
        let features = randn(&[b, c, h, w], k as u64);
        let weight = randn(&[4, c], 100 + k as u64);
        let bias = randn(&[4], 200 + k as u64);
        let targets = Tensor::from_vec(
            (0..b as u32).map(|i| i % 4).collect::<Vec<_>>(),
            b,
            &Device::Cpu,
        )
        .unwrap();
        let fused =
            semantic_percent_maps(&features, &weight, Some(&bias), &targets, (rows, cols)).unwrap();
        let composed =
            semantic_percent_maps_composed(&features, &weight, Some(&bias), &targets, (rows, cols))
                .unwrap();
        assert_eq!(
            fused.degenerate().unwrap(),
            composed.degenerate().unwrap(),
            "shape {k}"
        );
        let (f, r) = (maps(&fused), maps(&composed));
        let scale = r.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(
            max_abs_diff(&f, &r) <= 1e-4 * scale,
            "shape {k}: {}",
            max_abs_diff(&f, &r)
        );
        let cam_f: Vec<f32> = fused.cam().flatten_all().unwrap().to_vec1().unwrap();
        let cam_r: Vec<f32> = composed.cam().flatten_all().unwrap().to_vec1().unwrap();
        assert!(max_abs_diff(&cam_f, &cam_r) < 1e-5);
        // 1x1 CAMs are constant: degenerate.
        assert_eq!(
            fused.degenerate().unwrap().iter().all(|&d| d),
            h * w == 1,
            "shape {k}"
        );
    }
}

#[test]
fn spm_is_non_negative_sums_to_one_and_box_sums_match_the_maps() {
    let (b, rows, cols) = (2, 23, 31);
    let features = randn(&[b, 6, 5, 4], 7);
    let weight = randn(&[3, 6], 8);
    let targets = Tensor::new(&[2u32, 0], &Device::Cpu).unwrap();
    let spm = semantic_percent_maps(&features, &weight, None, &targets, (rows, cols)).unwrap();
    let m = maps(&spm);
    assert!(m.iter().all(|&v| v >= 0.0));
    let boxes = [
        PixelBox::full(rows, cols),
        PixelBox::new(3, 4, 17, 30),
        PixelBox::new(5, 5, 5, 9),
    ];
    for sample in 0..b {
        let plane = &m[sample * rows * cols..(sample + 1) * rows * cols];
        assert_eq!(plane.iter().copied().fold(f32::INFINITY, f32::min), 0.0);
        for bbox in boxes {
            let direct: f64 = (bbox.row0..bbox.row1)
                .flat_map(|r| (bbox.col0..bbox.col1).map(move |c| (r, c)))
                .map(|(r, c)| f64::from(plane[r * cols + c]))
                .sum();
            let sum = spm.box_sums(&[sample], &[bbox]).unwrap()[0];
            assert!(
                (sum - direct).abs() < 1e-5,
                "sample {sample} box {bbox}: {sum} vs {direct}"
            );
        }
    }
    let whole = spm.box_sums(&[0, 1], &[boxes[0]; 2]).unwrap();
    assert!(whole.iter().all(|s| (s - 1.0).abs() < 1e-9));
}

#[test]
fn all_zero_cam_is_degenerate_not_a_panic() {
    // Sample 1 has only negative features (ReLU -> 0) and its class has zero bias: CAM == 0.
    let mut values = randn(&[2, 4, 3, 3], 3)
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    values[36..].iter_mut().for_each(|v| *v = -v.abs() - 0.1);
    let features = Tensor::from_vec(values, (2, 4, 3, 3), &Device::Cpu).unwrap();
    let weight = randn(&[2, 4], 4);
    let bias = Tensor::new(&[0.3f32, 0.0], &Device::Cpu).unwrap();
    let targets = Tensor::new(&[0i64, 1], &Device::Cpu).unwrap();
    for spm in [
        semantic_percent_maps(&features, &weight, Some(&bias), &targets, (12, 12)).unwrap(),
        semantic_percent_maps_composed(&features, &weight, Some(&bias), &targets, (12, 12))
            .unwrap(),
    ] {
        assert_eq!(spm.degenerate().unwrap(), vec![false, true]);
        let m = maps(&spm);
        assert!(m[144..].iter().all(|&v| v == 0.0));
        let sums = spm.box_sums(&[0, 1], &[PixelBox::full(12, 12); 2]).unwrap();
        assert!((sums[0] - 1.0).abs() < 1e-5 && sums[1].is_nan(), "{sums:?}");
    }
}

#[test]
fn non_finite_features_are_degenerate() {
    let mut values = randn(&[1, 2, 2, 2], 5)
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    values[3] = f32::INFINITY;
    let features = Tensor::from_vec(values, (1, 2, 2, 2), &Device::Cpu).unwrap();
    let weight = Tensor::new(&[[1.0f32, 1.0]], &Device::Cpu).unwrap();
    let targets = Tensor::new(&[0u32], &Device::Cpu).unwrap();
    let spm = semantic_percent_maps(&features, &weight, None, &targets, (4, 4)).unwrap();
    assert_eq!(spm.degenerate().unwrap(), vec![true]);
}

#[test]
fn half_precision_inputs_take_the_composed_path() {
    let features = randn(&[2, 3, 4, 4], 9);
    let weight = randn(&[5, 3], 10);
    let targets = Tensor::new(&[4u32, 1], &Device::Cpu).unwrap();
    let f32_spm = semantic_percent_maps(&features, &weight, None, &targets, (8, 8)).unwrap();
    let f16_spm = semantic_percent_maps(
        &features.to_dtype(DType::F16).unwrap(),
        &weight.to_dtype(DType::F16).unwrap(),
        None,
        &targets,
        (8, 8),
    )
    .unwrap();
    assert_eq!(f16_spm.maps().unwrap().dtype(), DType::F32);
    assert!(max_abs_diff(&maps(&f32_spm), &maps(&f16_spm)) < 2e-3);
}

#[test]
fn bad_inputs_are_errors_naming_the_value() {
    let dev = Device::Cpu;
    let features = randn(&[2, 4, 3, 3], 1);
    let weight = randn(&[5, 4], 2);
    let targets = Tensor::new(&[1u32, 4], &dev).unwrap();
    let run = |f: &Tensor, w: &Tensor, b: Option<&Tensor>, t: &Tensor, size| {
        semantic_percent_maps(f, w, b, t, size).unwrap_err()
    };

    let err = run(&features, &randn(&[5, 3], 3), None, &targets, (8, 8));
    assert!(
        matches!(
            err,
            CamError::ChannelMismatch {
                features: 4,
                weight: 3
            }
        ),
        "{err}"
    );
    let err = run(&features, &weight, Some(&randn(&[4], 3)), &targets, (8, 8));
    assert!(
        matches!(
            err,
            CamError::BiasMismatch {
                classes: 5,
                bias: 4
            }
        ),
        "{err}"
    );
    let err = run(
        &features,
        &weight,
        None,
        &Tensor::new(&[1u32, 5], &dev).unwrap(),
        (8, 8),
    );
    assert!(
        matches!(
            err,
            CamError::TargetOutOfRange {
                sample: 1,
                target: 5,
                classes: 5
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("target 5"));
    let err = run(
        &features,
        &weight,
        None,
        &Tensor::new(&[-1i64, 0], &dev).unwrap(),
        (8, 8),
    );
    assert!(
        matches!(err, CamError::TargetOutOfRange { target: -1, .. }),
        "{err}"
    );
    let err = run(
        &features,
        &weight,
        None,
        &Tensor::new(&[1u32], &dev).unwrap(),
        (8, 8),
    );
    assert!(
        matches!(
            err,
            CamError::BatchMismatch {
                features: 2,
                targets: 1
            }
        ),
        "{err}"
    );
    let err = run(&features, &weight, None, &targets, (0, 8));
    assert!(
        matches!(err, CamError::EmptySize { rows: 0, cols: 8 }),
        "{err}"
    );
    let err = run(&randn(&[2, 4, 9], 1), &weight, None, &targets, (8, 8));
    assert!(
        matches!(
            err,
            CamError::Shape {
                what: "features",
                ..
            }
        ),
        "{err}"
    );
    let err = run(
        &features,
        &weight,
        None,
        &Tensor::new(&[1f32, 0.0], &dev).unwrap(),
        (8, 8),
    );
    assert!(matches!(err, CamError::TargetDType(DType::F32)), "{err}");

    let spm = semantic_percent_maps(&features, &weight, None, &targets, (8, 8)).unwrap();
    let err = spm
        .box_sums(&[0], &[PixelBox::new(2, 2, 9, 4)])
        .unwrap_err();
    assert!(
        matches!(
            err,
            CamError::BoxOutside {
                rows: 8,
                cols: 8,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("[2, 2, 9, 4]"));
    let err = spm
        .box_sums(&[0], &[PixelBox::new(5, 2, 3, 4)])
        .unwrap_err();
    assert!(matches!(err, CamError::BoxOutside { .. }), "{err}");
    let err = spm.box_sums(&[2], &[PixelBox::full(8, 8)]).unwrap_err();
    assert!(
        matches!(err, CamError::SampleOutOfRange { index: 2, batch: 2 }),
        "{err}"
    );
}

/// A two-layer toy network: features are the image pooled to 2x2 and repeated in 3 channels.
struct Toy {
    weight: Tensor,
    bias: Tensor,
}

impl CamSource for Toy {
    fn cam_features(&self, images: &Tensor, _train: bool) -> CandleResult<Tensor> {
        images.avg_pool2d(4)
    }
    fn classifier_weight(&self) -> &Tensor {
        &self.weight
    }
    fn classifier_bias(&self) -> Option<&Tensor> {
        Some(&self.bias)
    }
}

#[test]
fn cam_source_helper_uses_the_images_size() {
    let toy = Toy {
        weight: randn(&[4, 3], 11),
        bias: randn(&[4], 12),
    };
    let images = randn(&[2, 3, 8, 12], 13);
    let targets = Tensor::new(&[3u32, 0], &Device::Cpu).unwrap();
    let spm = toy.semantic_percent_maps(&images, &targets, true).unwrap();
    assert_eq!(spm.maps().unwrap().dims(), &[2, 8, 12]);
    assert_eq!(spm.cam().dims(), &[2, 2, 3]);
    let direct = semantic_percent_maps(
        &images.avg_pool2d(4).unwrap(),
        &toy.weight,
        Some(&toy.bias),
        &targets,
        (8, 12),
    )
    .unwrap();
    assert_eq!(maps(&spm), maps(&direct));
}
