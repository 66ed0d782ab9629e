//! Every mixing method through the public API: sampling (modes, switch, reproducibility),
//! pixels and label weights of `apply` (fused against composed), edge cases and errors.

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use snapmix_cam::semantic_percent_maps;
use snapmix_mix::{
    apply, apply_composed, apply_in_place, rand_bbox, Method, MixConfig, MixError, MixMode,
    MixParams, MixedBatch, PixelBox, SampleMix, Spm,
};

const B: usize = 4;
const C: usize = 3;
const ROWS: usize = 12;
const COLS: usize = 10;

/// Image `i`, channel `c`, pixel `(r, q)` holds a value unique to all four.
fn images() -> Tensor {
    let values: Vec<f32> = (0..B * C * ROWS * COLS).map(|k| k as f32 * 0.01).collect();
    Tensor::from_vec(values, (B, C, ROWS, COLS), &Device::Cpu).unwrap()
}

fn pixel(i: usize, c: usize, r: usize, q: usize) -> f32 {
    (((i * C + c) * ROWS + r) * COLS + q) as f32 * 0.01
}

fn targets(labels: &[u32]) -> Tensor {
    Tensor::from_slice(labels, labels.len(), &Device::Cpu).unwrap()
}

/// SPMs of a deterministic batch; samples listed in `zero` get an all-zero (degenerate) CAM.
fn spm_for(labels: &Tensor, zero: &[usize]) -> Spm {
    let (h, w, k) = (3, 4, 5);
    let values: Vec<f32> = (0..B * 2 * h * w)
        .map(|n| {
            let sample = n / (2 * h * w);
            if zero.contains(&sample) {
                -1.0
            } else {
                ((n * 7919) % 23) as f32 / 23.0
            }
        })
        .collect();
    let features = Tensor::from_vec(values, (B, 2, h, w), &Device::Cpu).unwrap();
    let weight = Tensor::from_vec(
        (0..k * 2).map(|n| 0.5 + n as f32 * 0.1).collect::<Vec<_>>(),
        (k, 2),
        &Device::Cpu,
    )
    .unwrap();
    semantic_percent_maps(&features, &weight, None, labels, (ROWS, COLS)).unwrap()
}

fn vec4(t: &Tensor) -> Vec<Vec<Vec<Vec<f32>>>> {
    let flat: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    let (b, c, r, q) = t.dims4().unwrap();
    (0..b)
        .map(|i| {
            (0..c)
                .map(|j| {
                    (0..r)
                        .map(|y| {
                            flat[((i * c + j) * r + y) * q..((i * c + j) * r + y + 1) * q].to_vec()
                        })
                        .collect()
                })
                .collect()
        })
        .collect()
}

fn lams(m: &MixedBatch) -> (Vec<f32>, Vec<f32>) {
    (m.lam_a.to_vec1().unwrap(), m.lam_b.to_vec1().unwrap())
}

fn params(method: Method, perm: &[usize], box_a: PixelBox, box_b: PixelBox, lam: f64) -> MixParams {
    MixParams::batch_mode(
        ROWS,
        COLS,
        perm.to_vec(),
        SampleMix {
            method,
            box_a,
            box_b,
            lam,
            lam1: lam,
        },
    )
}

/// Runs the fused, in-place and composed paths, asserts they agree, returns the fused result.
fn both(p: &MixParams, labels: &Tensor, spm: Option<&Spm>) -> MixedBatch {
    let input = images();
    let fused = apply(p, &input, labels, spm).unwrap();
    assert_eq!(
        vec4(&input),
        vec4(&images()),
        "apply must not modify its input"
    );
    let in_place = apply_in_place(p, &input, labels, spm).unwrap();
    assert_eq!(vec4(&in_place.images), vec4(&fused.images));
    assert_eq!(
        vec4(&input),
        vec4(&fused.images),
        "apply_in_place writes into its input"
    );
    assert_eq!(lams(&in_place), lams(&fused));
    let composed = apply_composed(p, &images(), labels, spm).unwrap();
    let (a, b) = (vec4(&fused.images), vec4(&composed.images));
    for (x, y) in a
        .iter()
        .flatten()
        .flatten()
        .flatten()
        .zip(b.iter().flatten().flatten().flatten())
    {
        assert!((x - y).abs() < 1e-5, "fused {x} vs composed {y}");
    }
    let ((fa, fb), (ca, cb)) = (lams(&fused), lams(&composed));
    for (x, y) in fa.iter().chain(&fb).zip(ca.iter().chain(&cb)) {
        assert!(
            (x - y).abs() < 1e-5 || (x.is_nan() && y.is_nan()),
            "lam fused {x} vs composed {y}"
        );
    }
    assert_eq!(
        fused.targets_b.to_vec1::<u32>().unwrap(),
        composed.targets_b.to_vec1::<u32>().unwrap()
    );
    fused
}

#[test]
fn same_seed_same_params_and_seeds_differ() {
    let config = MixConfig {
        mode: MixMode::Elem,
        switch: vec![(Method::Mixup, 0.3), (Method::CutMix, 0.3)],
        ..MixConfig::new(Method::SnapMix)
    };
    let draw = |seed| {
        config
            .sample(&mut ChaCha8Rng::seed_from_u64(seed), 8, 64, 48)
            .unwrap()
    };
    assert_eq!(draw(5), draw(5));
    assert_ne!(draw(5), draw(6));
}

#[test]
fn batch_mode_shares_one_draw_elem_mode_draws_per_sample() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let batch = MixConfig::new(Method::SnapMix)
        .sample(&mut rng, 8, 64, 64)
        .unwrap();
    assert!(batch.samples.iter().all(|s| *s == batch.samples[0]));
    let mut sorted = batch.perm.clone();
    sorted.sort();
    assert_eq!(sorted, (0..8).collect::<Vec<_>>());
    let elem = MixConfig {
        mode: MixMode::Elem,
        ..MixConfig::new(Method::SnapMix)
    }
    .sample(&mut rng, 8, 64, 64)
    .unwrap();
    assert!(elem.samples.iter().any(|s| *s != elem.samples[0]));
    assert!(elem.samples.iter().all(|s| s.method == Method::SnapMix));
}

#[test]
fn prob_gates_mixing() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let never = MixConfig {
        prob: 0.0,
        mode: MixMode::Elem,
        ..MixConfig::new(Method::CutMix)
    };
    let p = never.sample(&mut rng, 16, 32, 32).unwrap();
    assert!(p.samples.iter().all(|s| s.method == Method::None));
    let half = MixConfig {
        prob: 0.5,
        mode: MixMode::Elem,
        ..MixConfig::new(Method::CutMix)
    };
    let p = half.sample(&mut rng, 400, 32, 32).unwrap();
    let mixed = p
        .samples
        .iter()
        .filter(|s| s.method == Method::CutMix)
        .count();
    assert!((140..260).contains(&mixed), "{mixed} of 400");
}

#[test]
fn switch_picks_methods_with_their_probabilities() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let always = MixConfig {
        switch: vec![(Method::Mixup, 1.0)],
        ..MixConfig::new(Method::CutMix)
    };
    for _ in 0..10 {
        assert!(always
            .sample(&mut rng, 2, 8, 8)
            .unwrap()
            .samples
            .iter()
            .all(|s| s.method == Method::Mixup));
    }
    let split = MixConfig {
        mode: MixMode::Elem,
        switch: vec![(Method::Mixup, 0.25), (Method::Cutout, 0.25)],
        ..MixConfig::new(Method::CutMix)
    };
    let p = split.sample(&mut rng, 800, 16, 16).unwrap();
    let count = |m| p.samples.iter().filter(|s| s.method == m).count();
    assert!(
        (140..260).contains(&count(Method::Mixup)),
        "mixup {}",
        count(Method::Mixup)
    );
    assert!(
        (140..260).contains(&count(Method::Cutout)),
        "cutout {}",
        count(Method::Cutout)
    );
    assert!(
        (320..480).contains(&count(Method::CutMix)),
        "cutmix {}",
        count(Method::CutMix)
    );
}

#[test]
fn sampled_boxes_follow_the_official_geometry() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for lam in [0.0, 0.3, 0.75, 0.99, 1.0] {
        let cut_rows = (40.0 * (1.0f64 - lam).sqrt()) as usize;
        let cut_cols = (30.0 * (1.0f64 - lam).sqrt()) as usize;
        for _ in 0..50 {
            let b = rand_bbox(&mut rng, 40, 30, lam);
            assert!(b.fits(40, 30), "{b}");
            assert!(
                b.rows() <= 2 * (cut_rows / 2) && b.cols() <= 2 * (cut_cols / 2),
                "{b} for lam {lam}"
            );
        }
    }
    assert_eq!(rand_bbox(&mut rng, 40, 30, 1.0).area(), 0);
    // Clipping: some boxes of a large cut touch a border and are smaller than the cut.
    let clipped = (0..100)
        .map(|_| rand_bbox(&mut rng, 40, 30, 0.1))
        .filter(|b| b.rows() < 2 * (37 / 2))
        .count();
    assert!(clipped > 0);
}

#[test]
fn none_and_prob_zero_leave_the_batch_alone() {
    let labels = targets(&[0, 1, 2, 3]);
    let m = both(&MixParams::identity(B, ROWS, COLS), &labels, None);
    assert_eq!(vec4(&m.images), vec4(&images()));
    assert_eq!(lams(&m), (vec![1.0; B], vec![0.0; B]));
    assert_eq!(m.targets_b.to_vec1::<u32>().unwrap(), vec![0, 1, 2, 3]);
}

#[test]
fn cutmix_pastes_the_same_region_with_area_labels() {
    let labels = targets(&[0, 1, 2, 3]);
    let bbox = PixelBox::new(2, 3, 8, 7);
    let m = both(
        &params(Method::CutMix, &[1, 2, 3, 0], bbox, bbox, 0.5),
        &labels,
        None,
    );
    let out = vec4(&m.images);
    assert_eq!(out[0][1][2][3], pixel(1, 1, 2, 3));
    assert_eq!(out[0][1][7][6], pixel(1, 1, 7, 6));
    assert_eq!(out[0][1][8][6], pixel(0, 1, 8, 6));
    assert_eq!(out[3][2][5][5], pixel(0, 2, 5, 5));
    let lam_a = 1.0 - 24.0 / 120.0;
    let (a, b) = lams(&m);
    assert!(
        a.iter().all(|&v| (v - lam_a).abs() < 1e-6)
            && b.iter().all(|&v| (v - (1.0 - lam_a)).abs() < 1e-6)
    );
    assert_eq!(m.targets_b.to_vec1::<u32>().unwrap(), vec![1, 2, 3, 0]);
    // An empty box pastes nothing and keeps the own label.
    let m = both(
        &params(
            Method::CutMix,
            &[1, 2, 3, 0],
            PixelBox::new(4, 4, 4, 9),
            PixelBox::new(4, 4, 4, 9),
            1.0,
        ),
        &labels,
        None,
    );
    assert_eq!(vec4(&m.images), vec4(&images()));
    assert_eq!(lams(&m), (vec![1.0; B], vec![0.0; B]));
}

#[test]
fn as_cutmix_resizes_and_needs_more_than_four_pixels() {
    let labels = targets(&[0, 1, 2, 3]);
    let (box_a, box_b) = (PixelBox::new(0, 0, 4, 4), PixelBox::new(6, 5, 9, 7));
    let m = both(
        &params(Method::AsCutMix, &[1, 0, 3, 2], box_a, box_b, 0.5),
        &labels,
        None,
    );
    let out = vec4(&m.images);
    // align_corners = true: the box corners take the partner box corners exactly.
    assert!((out[0][0][0][0] - pixel(1, 0, 6, 5)).abs() < 1e-6);
    assert!((out[0][0][3][3] - pixel(1, 0, 8, 6)).abs() < 1e-6);
    assert_eq!(out[0][0][4][0], pixel(0, 0, 4, 0));
    let (a, _) = lams(&m);
    assert!((a[0] - (1.0 - 16.0 / 120.0)).abs() < 1e-6);
    // A box of exactly 4 pixels: no paste, lam_a = 1.
    for small in [PixelBox::new(6, 5, 8, 7), PixelBox::new(6, 5, 7, 9)] {
        let m = both(
            &params(Method::AsCutMix, &[1, 0, 3, 2], box_a, small, 0.5),
            &labels,
            None,
        );
        assert_eq!(vec4(&m.images), vec4(&images()));
        assert_eq!(lams(&m), (vec![1.0; B], vec![0.0; B]));
    }
}

#[test]
fn mixup_blends_whole_images() {
    let labels = targets(&[0, 1, 2, 3]);
    let m = both(
        &params(
            Method::Mixup,
            &[2, 3, 0, 1],
            PixelBox::default(),
            PixelBox::default(),
            0.3,
        ),
        &labels,
        None,
    );
    let out = vec4(&m.images);
    let want = pixel(1, 2, 5, 4) * 0.3 + pixel(3, 2, 5, 4) * 0.7;
    assert!((out[1][2][5][4] - want).abs() < 1e-5);
    let (a, b) = lams(&m);
    assert!(a.iter().all(|&v| (v - 0.3).abs() < 1e-7) && b.iter().all(|&v| (v - 0.7).abs() < 1e-7));
    assert_eq!(m.targets_b.to_vec1::<u32>().unwrap(), vec![2, 3, 0, 1]);
}

#[test]
fn cutout_zeroes_the_box_and_keeps_labels() {
    let labels = targets(&[0, 1, 2, 3]);
    let bbox = PixelBox::new(0, 6, 5, 10);
    let m = both(
        &params(Method::Cutout, &[3, 2, 1, 0], bbox, bbox, 0.75),
        &labels,
        None,
    );
    let out = vec4(&m.images);
    assert_eq!(out[2][1][4][9], 0.0);
    assert_eq!(out[2][1][5][9], pixel(2, 1, 5, 9));
    assert_eq!(out[2][1][4][5], pixel(2, 1, 4, 5));
    assert_eq!(lams(&m), (vec![1.0; B], vec![0.0; B]));
    assert_eq!(m.targets_b.to_vec1::<u32>().unwrap(), vec![0, 1, 2, 3]);
}

#[test]
fn snapmix_weights_are_semantic_mass() {
    let labels = targets(&[0, 1, 2, 3]);
    let spm = spm_for(&labels, &[]);
    let (box_a, box_b) = (PixelBox::new(1, 2, 9, 8), PixelBox::new(4, 0, 12, 5));
    let perm = [2, 0, 3, 1];
    let m = both(
        &params(Method::SnapMix, &perm, box_a, box_b, 0.5),
        &labels,
        Some(&spm),
    );
    let mass = |i: usize, b: PixelBox| spm.box_sums(&[i], &[b]).unwrap()[0];
    let (a, b) = lams(&m);
    for i in 0..B {
        assert!(
            (f64::from(a[i]) - (1.0 - mass(i, box_a))).abs() < 1e-6,
            "lam_a[{i}]"
        );
        assert!(
            (f64::from(b[i]) - mass(perm[i], box_b)).abs() < 1e-6,
            "lam_b[{i}]"
        );
        assert!(a[i] > 0.0 && a[i] < 1.0 && b[i] > 0.0 && b[i] < 1.0);
    }
    assert_eq!(m.targets_b.to_vec1::<u32>().unwrap(), vec![2, 0, 3, 1]);
}

#[test]
fn same_label_rule_adds_both_weights_only_when_on() {
    let labels = targets(&[4, 4, 1, 2]);
    let spm = spm_for(&labels, &[]);
    let (box_a, box_b) = (PixelBox::new(1, 2, 9, 8), PixelBox::new(4, 0, 12, 5));
    let mut p = params(Method::SnapMix, &[1, 0, 3, 2], box_a, box_b, 0.5);
    let off = {
        p.same_label_rule = false;
        lams(&both(&p, &labels, Some(&spm)))
    };
    p.same_label_rule = true;
    let on = lams(&both(&p, &labels, Some(&spm)));
    for i in 0..2 {
        let sum = off.0[i] + off.1[i];
        assert!((on.0[i] - sum).abs() < 1e-6 && (on.1[i] - sum).abs() < 1e-6);
    }
    assert_eq!((on.0[2], on.1[3]), (off.0[2], off.1[3]));
}

#[test]
fn degenerate_spm_falls_back_to_area_weights() {
    let labels = targets(&[0, 1, 2, 3]);
    let spm = spm_for(&labels, &[1]);
    assert_eq!(spm.degenerate().unwrap(), vec![false, true, false, false]);
    let (box_a, box_b) = (PixelBox::new(0, 0, 6, 5), PixelBox::new(2, 2, 10, 10));
    let m = both(
        &params(Method::SnapMix, &[1, 2, 3, 0], box_a, box_b, 0.5),
        &labels,
        Some(&spm),
    );
    let (a, b) = lams(&m);
    let ratio = 30.0 / 120.0;
    // Sample 0 takes from degenerate sample 1: lam_b falls back; sample 1 itself: lam_a does.
    assert!((b[0] - ratio).abs() < 1e-7 && a[0] < 1.0 && (a[0] - (1.0 - ratio)).abs() > 1e-3);
    assert!((a[1] - (1.0 - ratio)).abs() < 1e-7 && (b[1] - ratio).abs() > 1e-3);
    assert!(a.iter().chain(&b).all(|v| v.is_finite()));
}

#[test]
fn snapmix_with_an_empty_box_keeps_the_batch() {
    let labels = targets(&[0, 1, 2, 3]);
    let spm = spm_for(&labels, &[]);
    for (box_a, box_b) in [
        (PixelBox::new(2, 2, 8, 8), PixelBox::new(3, 3, 3, 8)),
        (PixelBox::new(2, 2, 2, 8), PixelBox::new(3, 3, 9, 8)),
    ] {
        let m = both(
            &params(Method::SnapMix, &[1, 2, 3, 0], box_a, box_b, 0.5),
            &labels,
            Some(&spm),
        );
        assert_eq!(vec4(&m.images), vec4(&images()));
        assert_eq!(lams(&m), (vec![1.0; B], vec![0.0; B]));
        assert_eq!(m.targets_b.to_vec1::<u32>().unwrap(), vec![1, 2, 3, 0]);
    }
}

#[test]
fn batch_of_one_mixes_with_itself() {
    let image = images().narrow(0, 0, 1).unwrap();
    let labels = targets(&[3]);
    let features = Tensor::from_vec(
        (0..2 * 3 * 3).map(|n| n as f32 * 0.1).collect::<Vec<_>>(),
        (1, 2, 3, 3),
        &Device::Cpu,
    )
    .unwrap();
    let weight = Tensor::ones((4, 2), DType::F32, &Device::Cpu).unwrap();
    let spm = semantic_percent_maps(&features, &weight, None, &labels, (ROWS, COLS)).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let config = MixConfig {
        beta: 2.0,
        ..MixConfig::new(Method::SnapMix)
    };
    let p = loop {
        let p = config.sample(&mut rng, 1, ROWS, COLS).unwrap();
        if p.samples[0].box_a.area() > 0 && p.samples[0].box_b.area() > 0 {
            break p;
        }
    };
    let m = apply(&p, &image, &labels, Some(&spm)).unwrap();
    let (a, b) = lams(&m);
    // Own label on both sides: both weights are lam_a + lam_b.
    assert_eq!(a, b);
    assert_eq!(m.targets_b.to_vec1::<u32>().unwrap(), vec![3]);
}

#[test]
fn elem_mode_fused_matches_composed_for_every_method() {
    let labels = targets(&[0, 1, 1, 3]);
    let spm = spm_for(&labels, &[2]);
    let config = MixConfig {
        mode: MixMode::Elem,
        beta: 0.7,
        switch: vec![
            (Method::CutMix, 0.2),
            (Method::AsCutMix, 0.2),
            (Method::Mixup, 0.2),
            (Method::Cutout, 0.2),
        ],
        ..MixConfig::new(Method::SnapMix)
    };
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for _ in 0..25 {
        let p = config.sample(&mut rng, B, ROWS, COLS).unwrap();
        both(&p, &labels, Some(&spm));
    }
}

#[test]
fn bad_configs_and_inputs_are_errors() {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let err = MixConfig {
        beta: 0.0,
        ..MixConfig::new(Method::CutMix)
    }
    .sample(&mut rng, 2, 8, 8)
    .unwrap_err();
    assert!(matches!(err, MixError::InvalidBeta(b) if b == 0.0), "{err}");
    let err = MixConfig {
        beta: -1.0,
        ..MixConfig::new(Method::CutMix)
    }
    .validate()
    .unwrap_err();
    assert!(err.to_string().contains("-1"), "{err}");
    let err = MixConfig {
        prob: 1.5,
        ..MixConfig::new(Method::CutMix)
    }
    .validate()
    .unwrap_err();
    assert!(
        matches!(err, MixError::InvalidProb { value, .. } if value == 1.5),
        "{err}"
    );
    let err = MixConfig {
        switch: vec![(Method::Mixup, 0.7), (Method::Cutout, 0.6)],
        ..MixConfig::new(Method::CutMix)
    }
    .validate()
    .unwrap_err();
    assert!(matches!(err, MixError::SwitchTotal(_)), "{err}");
    assert!(matches!(
        MixConfig::new(Method::CutMix).sample(&mut rng, 0, 8, 8),
        Err(MixError::EmptyBatch)
    ));
    assert!(matches!("snap".parse::<Method>(), Err(MixError::UnknownMethod(s)) if s == "snap"));
    assert_eq!("as_cutmix".parse::<Method>().unwrap(), Method::AsCutMix);

    let labels = targets(&[0, 1, 2, 3]);
    let good = params(
        Method::CutMix,
        &[1, 2, 3, 0],
        PixelBox::new(0, 0, 4, 4),
        PixelBox::new(0, 0, 4, 4),
        0.5,
    );
    let err = apply(&good, &images().narrow(2, 0, 11).unwrap(), &labels, None).unwrap_err();
    assert!(
        matches!(err, MixError::Shape { what: "images", .. }),
        "{err}"
    );
    let err = apply(&good, &images(), &targets(&[0, 1, 2]), None).unwrap_err();
    assert!(
        matches!(
            err,
            MixError::Shape {
                what: "targets",
                ..
            }
        ),
        "{err}"
    );
    let err = apply(
        &good,
        &images(),
        &images()
            .narrow(1, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .narrow(0, 0, 4)
            .unwrap(),
        None,
    )
    .unwrap_err();
    assert!(matches!(err, MixError::TargetDType(DType::F32)), "{err}");
    let outside = params(
        Method::CutMix,
        &[1, 2, 3, 0],
        PixelBox::new(0, 0, 13, 4),
        PixelBox::new(0, 0, 13, 4),
        0.5,
    );
    let err = apply(&outside, &images(), &labels, None).unwrap_err();
    assert!(
        matches!(
            err,
            MixError::BoxOutside {
                sample: 0,
                rows: 12,
                cols: 10,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("[0, 0, 13, 4]"));
    let swapped = params(
        Method::SnapMix,
        &[1, 2, 3, 0],
        PixelBox::new(0, 0, 4, 4),
        PixelBox::new(5, 0, 2, 4),
        0.5,
    );
    assert!(matches!(
        apply(&swapped, &images(), &labels, Some(&spm_for(&labels, &[]))),
        Err(MixError::BoxOutside { .. })
    ));
    let bad_perm = params(
        Method::Mixup,
        &[1, 2, 4, 0],
        PixelBox::default(),
        PixelBox::default(),
        0.5,
    );
    let err = apply(&bad_perm, &images(), &labels, None).unwrap_err();
    assert!(
        matches!(
            err,
            MixError::PermOutOfRange {
                sample: 2,
                partner: 4,
                batch: 4
            }
        ),
        "{err}"
    );
    let bad_lam = params(
        Method::Mixup,
        &[1, 2, 3, 0],
        PixelBox::default(),
        PixelBox::default(),
        1.5,
    );
    assert!(
        matches!(apply(&bad_lam, &images(), &labels, None), Err(MixError::InvalidLam { lam, .. }) if lam == 1.5)
    );
    let snap = params(
        Method::SnapMix,
        &[1, 2, 3, 0],
        PixelBox::new(0, 0, 4, 4),
        PixelBox::new(2, 2, 6, 6),
        0.5,
    );
    assert!(matches!(
        apply(&snap, &images(), &labels, None),
        Err(MixError::MissingSpm)
    ));
    let small = semantic_percent_maps(
        &Tensor::ones((4, 2, 3, 3), DType::F32, &Device::Cpu).unwrap(),
        &Tensor::ones((4, 2), DType::F32, &Device::Cpu).unwrap(),
        None,
        &labels,
        (6, 6),
    )
    .unwrap();
    let err = apply(&snap, &images(), &labels, Some(&small)).unwrap_err();
    assert!(matches!(err, MixError::Shape { what: "spm", .. }), "{err}");
}
