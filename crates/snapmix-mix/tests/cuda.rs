//! CPU-vs-CUDA checks of the fused mixing kernels (out of place, in place, label weights): the
//! CUDA `apply` and `apply_in_place` must match the CPU `apply` within 1e-5 relative for every
//! method, random and hand-made edge-case parameters. Compiled only with `--features cuda`;
//! without a visible GPU each test prints that it was skipped and returns.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use snapmix_cam::semantic_percent_maps;
use snapmix_mix::{
    apply, apply_in_place, Method, MixConfig, MixMode, MixParams, MixedBatch, PixelBox, SampleMix,
};

const REL_TOL: f64 = 1e-5;

fn gpu(test: &str) -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(device) => Some(device),
        Err(e) => {
            let reason = e.to_string();
            let reason = reason.lines().next().unwrap_or_default();
            println!("{test}: CUDA check skipped for lack of a device ({reason})");
            None
        }
    }
}

/// A batch on the host: images, labels and what its SPMs are computed from.
struct Batch {
    images: Vec<f32>,
    dims: [usize; 4],
    labels: Vec<u32>,
    features: Vec<f32>,
    weight: Vec<f32>,
}

const CHANNELS: usize = 6;
const GRID: (usize, usize) = (5, 7);
const CLASSES: usize = 4;

impl Batch {
    fn random(rng: &mut ChaCha8Rng, dims: [usize; 4]) -> Self {
        let mut values =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
        let images = values(dims.iter().product());
        let features = values(dims[0] * CHANNELS * GRID.0 * GRID.1);
        let weight = values(CLASSES * CHANNELS);
        let labels = (0..dims[0])
            .map(|_| rng.random_range(0..CLASSES as u32))
            .collect();
        Self {
            images,
            dims,
            labels,
            features,
            weight,
        }
    }

    /// Makes sample `i`'s CAM all zero (negative features, zero bias), so its SPM is degenerate.
    fn make_degenerate(&mut self, i: usize) {
        let plane = CHANNELS * GRID.0 * GRID.1;
        self.features[i * plane..(i + 1) * plane]
            .iter_mut()
            .for_each(|v| *v = -v.abs() - 0.1);
    }

    /// `apply` (or `apply_in_place` on a copy) on `device`, results on the host.
    fn mix(&self, params: &MixParams, device: &Device, in_place: bool) -> Mixed {
        let b = self.dims[0];
        let images = Tensor::from_slice(&self.images, &self.dims[..], device).unwrap();
        let labels = Tensor::from_slice(&self.labels, b, device).unwrap();
        let spm = params.needs_spm().then(|| {
            let features =
                Tensor::from_slice(&self.features, (b, CHANNELS, GRID.0, GRID.1), device).unwrap();
            let weight = Tensor::from_slice(&self.weight, (CLASSES, CHANNELS), device).unwrap();
            let bias = Tensor::zeros(CLASSES, DType::F32, device).unwrap();
            semantic_percent_maps(
                &features,
                &weight,
                Some(&bias),
                &labels,
                (self.dims[2], self.dims[3]),
            )
            .unwrap()
        });
        let mixed = if in_place {
            let copy = images.copy().unwrap();
            let mixed = apply_in_place(params, &copy, &labels, spm.as_ref()).unwrap();
            let original: Vec<f32> = images.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(
                original, self.images,
                "in place must not touch the source tensor"
            );
            mixed
        } else {
            apply(params, &images, &labels, spm.as_ref()).unwrap()
        };
        Mixed::from(&mixed, device)
    }
}

struct Mixed {
    images: Vec<f32>,
    targets_b: Vec<u32>,
    lam_a: Vec<f32>,
    lam_b: Vec<f32>,
}

impl Mixed {
    fn from(m: &MixedBatch, device: &Device) -> Self {
        for t in [&m.images, &m.targets_b, &m.lam_a, &m.lam_b] {
            assert_eq!(
                t.device().is_cuda(),
                device.is_cuda(),
                "results stay on the inputs' device"
            );
        }
        let floats = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
        Self {
            images: floats(&m.images),
            targets_b: m.targets_b.to_vec1().unwrap(),
            lam_a: floats(&m.lam_a),
            lam_b: floats(&m.lam_b),
        }
    }
}

fn assert_close(what: &str, got: &[f32], want: &[f32], scale: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let diff = (f64::from(g) - f64::from(w)).abs();
        assert!(
            diff <= REL_TOL * scale,
            "{what}[{i}]: got {g}, want {w} (scale {scale})"
        );
    }
}

/// CUDA `apply` and `apply_in_place` against the CPU `apply`.
fn check(name: &str, batch: &Batch, params: &MixParams, gpu: &Device) {
    let want = batch.mix(params, &Device::Cpu, false);
    let scale = want
        .images
        .iter()
        .fold(0f64, |m, &v| m.max(f64::from(v).abs()));
    for in_place in [false, true] {
        let what = format!("{name} ({})", if in_place { "in place" } else { "apply" });
        let got = batch.mix(params, gpu, in_place);
        assert_close(&format!("{what} images"), &got.images, &want.images, scale);
        assert_eq!(got.targets_b, want.targets_b, "{what}: targets_b");
        let lam_scale = |v: &[f32]| v.iter().fold(1f64, |m, &x| m.max(f64::from(x).abs()));
        assert_close(
            &format!("{what} lam_a"),
            &got.lam_a,
            &want.lam_a,
            lam_scale(&want.lam_a),
        );
        assert_close(
            &format!("{what} lam_b"),
            &got.lam_b,
            &want.lam_b,
            lam_scale(&want.lam_b),
        );
    }
}

#[test]
fn sampled_params_match_the_cpu_for_every_method() {
    let Some(gpu) = gpu("sampled_params_match_the_cpu_for_every_method") else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(2021);
    // Odd sizes, batch 1, non-square images.
    for dims in [[1, 3, 17, 13], [4, 3, 31, 29], [6, 2, 40, 24]] {
        let mut batch = Batch::random(&mut rng, dims);
        if dims[0] > 2 {
            batch.make_degenerate(1);
        }
        for method in Method::ALL {
            for mode in [MixMode::Batch, MixMode::Elem] {
                let config = MixConfig {
                    mode,
                    beta: 0.8,
                    ..MixConfig::new(method)
                };
                for draw in 0..4 {
                    let params = config.sample(&mut rng, dims[0], dims[2], dims[3]).unwrap();
                    check(
                        &format!("{dims:?} {method} {mode:?} draw {draw}"),
                        &batch,
                        &params,
                        &gpu,
                    );
                }
            }
        }
        let switch = MixConfig {
            mode: MixMode::Elem,
            same_label_rule: false,
            switch: vec![
                (Method::CutMix, 0.2),
                (Method::AsCutMix, 0.2),
                (Method::Mixup, 0.2),
                (Method::Cutout, 0.2),
            ],
            ..MixConfig::new(Method::SnapMix)
        };
        for draw in 0..6 {
            let params = switch.sample(&mut rng, dims[0], dims[2], dims[3]).unwrap();
            check(
                &format!("{dims:?} switch draw {draw}"),
                &batch,
                &params,
                &gpu,
            );
        }
    }
}

#[test]
fn edge_cases_match_the_cpu() {
    let Some(gpu) = gpu("edge_cases_match_the_cpu") else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let (rows, cols) = (21, 19);
    let mut batch = Batch::random(&mut rng, [4, 3, rows, cols]);
    batch.labels = vec![2, 2, 1, 3]; // samples 0 and 1 share a label (same-label rule)
    batch.make_degenerate(3);
    let sample = |method, box_a, box_b, lam| SampleMix {
        method,
        box_a,
        box_b,
        lam,
        lam1: lam,
    };
    let cases = [
        // Clipped boxes: on the borders, the partner box larger than the target and smaller.
        (
            "clipped, stretched",
            vec![1, 0, 3, 2],
            sample(
                Method::SnapMix,
                PixelBox::new(0, 11, 6, 19),
                PixelBox::new(13, 0, 21, 15),
                0.5,
            ),
        ),
        // Equal sizes: a plain copy; partner is itself for sample 0.
        (
            "same size",
            vec![0, 3, 1, 2],
            sample(
                Method::SnapMix,
                PixelBox::new(2, 3, 9, 10),
                PixelBox::new(14, 12, 21, 19),
                0.5,
            ),
        ),
        // A one-row target box and a full-image source.
        (
            "one row",
            vec![3, 2, 1, 0],
            sample(
                Method::AsCutMix,
                PixelBox::new(20, 0, 21, 19),
                PixelBox::full(rows, cols),
                0.5,
            ),
        ),
        (
            "cutmix at the corner",
            vec![1, 2, 3, 0],
            sample(
                Method::CutMix,
                PixelBox::new(15, 13, 21, 19),
                PixelBox::new(15, 13, 21, 19),
                0.7,
            ),
        ),
        (
            "cutout whole image",
            vec![0, 1, 2, 3],
            sample(
                Method::Cutout,
                PixelBox::full(rows, cols),
                PixelBox::full(rows, cols),
                0.75,
            ),
        ),
        (
            "mixup",
            vec![2, 3, 0, 1],
            sample(Method::Mixup, PixelBox::default(), PixelBox::default(), 0.3),
        ),
        (
            "snapmix empty box",
            vec![1, 0, 3, 2],
            sample(
                Method::SnapMix,
                PixelBox::new(4, 4, 4, 9),
                PixelBox::new(1, 1, 5, 5),
                0.5,
            ),
        ),
    ];
    for (name, perm, s) in cases {
        let params = MixParams::batch_mode(rows, cols, perm, s);
        check(name, &batch, &params, &gpu);
    }
    // Batch of one: the sample mixes with itself.
    let mut single = Batch::random(&mut rng, [1, 3, 9, 11]);
    let params = MixParams::batch_mode(
        9,
        11,
        vec![0],
        sample(
            Method::SnapMix,
            PixelBox::new(1, 2, 8, 6),
            PixelBox::new(0, 0, 9, 11),
            0.5,
        ),
    );
    check("batch of one", &single, &params, &gpu);
    single.make_degenerate(0);
    check("batch of one, degenerate", &single, &params, &gpu);
}

#[test]
fn host_labels_with_gpu_images_match_the_cpu() {
    let Some(gpu) = gpu("host_labels_with_gpu_images_match_the_cpu") else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let batch = Batch::random(&mut rng, [3, 3, 15, 14]);
    let params = MixConfig::new(Method::SnapMix)
        .sample(&mut rng, 3, 15, 14)
        .unwrap();
    let want = batch.mix(&params, &Device::Cpu, false);
    let images = Tensor::from_slice(&batch.images, &batch.dims[..], &gpu).unwrap();
    let features =
        Tensor::from_slice(&batch.features, (3, CHANNELS, GRID.0, GRID.1), &gpu).unwrap();
    let weight = Tensor::from_slice(&batch.weight, (CLASSES, CHANNELS), &gpu).unwrap();
    let bias = Tensor::zeros(CLASSES, DType::F32, &gpu).unwrap();
    let labels = Tensor::from_slice(&batch.labels, 3, &Device::Cpu).unwrap();
    let spm = semantic_percent_maps(&features, &weight, Some(&bias), &labels, (15, 14)).unwrap();
    let mixed = apply(&params, &images, &labels, Some(&spm)).unwrap();
    let floats = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
    let scale = want
        .images
        .iter()
        .fold(0f64, |m, &v| m.max(f64::from(v).abs()));
    assert_close(
        "host labels images",
        &floats(&mixed.images),
        &want.images,
        scale,
    );
    assert_eq!(mixed.targets_b.to_vec1::<u32>().unwrap(), want.targets_b);
    assert_close("host labels lam_a", &floats(&mixed.lam_a), &want.lam_a, 1.0);
    assert_close("host labels lam_b", &floats(&mixed.lam_b), &want.lam_b, 1.0);
}
