//! CPU-vs-CUDA checks of the fused SPM kernels (CAM, stats, maps, box sums): the CUDA result
//! must match its CPU twin within 1e-5 relative. Compiled only with `--features cuda`; without a
//! visible GPU each test prints that it was skipped and returns.
#![cfg(feature = "cuda")]

use candle_core::{Device, Tensor};
use snapmix_cam::{semantic_percent_maps, PixelBox, Spm};

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

/// Deterministic uniform values in [-1, 1) from one seed.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn below(&mut self, n: usize) -> usize {
        (((self.next() + 1.0) * 0.5 * n as f32) as usize).min(n - 1)
    }

    fn tensor(&mut self, shape: &[usize]) -> Vec<f32> {
        (0..shape.iter().product::<usize>())
            .map(|_| self.next())
            .collect()
    }
}

fn host(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("f32 tensor")
}

/// Every finite `want` within `REL_TOL` of the largest finite magnitude; non-finite values
/// exactly where `want` has them.
fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want
        .iter()
        .filter(|v| v.is_finite())
        .fold(0f64, |m, &v| m.max(f64::from(v).abs()))
        .max(f64::MIN_POSITIVE);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if !w.is_finite() {
            assert!(
                g == w || (g.is_nan() && w.is_nan()),
                "{what}[{i}]: got {g}, want {w}"
            );
            continue;
        }
        let diff = (f64::from(g) - f64::from(w)).abs();
        assert!(
            diff <= REL_TOL * scale,
            "{what}[{i}]: got {g}, want {w} (scale {scale})"
        );
    }
}

struct Case {
    features: Vec<f32>,
    weight: Vec<f32>,
    bias: Option<Vec<f32>>,
    labels: Vec<u32>,
    dims: [usize; 4],
    classes: usize,
    size: (usize, usize),
}

impl Case {
    fn random(rng: &mut Lcg, dims: [usize; 4], classes: usize, size: (usize, usize)) -> Self {
        let [b, c, _, _] = dims;
        Self {
            features: rng.tensor(&dims),
            weight: rng.tensor(&[classes, c]),
            bias: Some(rng.tensor(&[classes])),
            labels: (0..b).map(|_| rng.below(classes) as u32).collect(),
            dims,
            classes,
            size,
        }
    }

    fn spm(&self, device: &Device) -> Spm {
        let [b, c, _, _] = self.dims;
        let features = Tensor::from_slice(&self.features, &self.dims[..], device).unwrap();
        let weight = Tensor::from_slice(&self.weight, (self.classes, c), device).unwrap();
        let bias = self
            .bias
            .as_ref()
            .map(|bias| Tensor::from_slice(bias, self.classes, device).unwrap());
        let labels = Tensor::from_slice(&self.labels, b, device).unwrap();
        semantic_percent_maps(&features, &weight, bias.as_ref(), &labels, self.size).unwrap()
    }

    /// Runs the case on both devices and compares everything the `Spm` exposes.
    fn check(&self, name: &str, gpu: &Device, rng: &mut Lcg) {
        let cpu = self.spm(&Device::Cpu);
        let cuda = self.spm(gpu);
        assert!(
            cuda.cam().device().is_cuda(),
            "{name}: the CAM stays on the GPU"
        );
        assert_close(&format!("{name} cam"), &host(cuda.cam()), &host(cpu.cam()));
        assert_eq!(
            cuda.degenerate().unwrap(),
            cpu.degenerate().unwrap(),
            "{name}: degenerate"
        );
        let maps = cuda.maps().unwrap();
        assert!(maps.device().is_cuda(), "{name}: the maps stay on the GPU");
        assert_close(
            &format!("{name} maps"),
            &host(&maps),
            &host(&cpu.maps().unwrap()),
        );
        let (rows, cols) = self.size;
        let mut samples = Vec::new();
        let mut boxes = Vec::new();
        for sample in 0..self.dims[0] {
            // Whole image, an empty box, boxes touching the borders (as clipping leaves them)
            // and random interior boxes.
            let (r, c) = (rng.below(rows), rng.below(cols));
            let mut candidates = vec![
                PixelBox::full(rows, cols),
                PixelBox::new(r, c, r, cols),
                PixelBox::new(0, 0, r + 1, c + 1),
                PixelBox::new(r, c, rows, cols),
            ];
            for _ in 0..3 {
                let (r0, c0) = (rng.below(rows), rng.below(cols));
                let (r1, c1) = (r0 + 1 + rng.below(rows - r0), c0 + 1 + rng.below(cols - c0));
                candidates.push(PixelBox::new(r0, c0, r1, c1));
            }
            for bbox in candidates {
                samples.push(sample);
                boxes.push(bbox);
            }
        }
        let want = cpu.box_sums(&samples, &boxes).unwrap();
        let got = cuda.box_sums(&samples, &boxes).unwrap();
        let on_device = cuda.box_sums_tensor(&samples, &boxes).unwrap();
        assert!(
            on_device.device().is_cuda(),
            "{name}: box sums stay on the GPU"
        );
        // The same sums, bit for bit; a degenerate sample's NaN counts as equal to NaN.
        let bits = |sums: &[f64]| {
            let canonical = |s: f64| if s.is_nan() { f64::NAN } else { s };
            sums.iter()
                .map(|&s| canonical(s).to_bits())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            bits(&on_device.to_vec1::<f64>().unwrap()),
            bits(&got),
            "{name}: box_sums_tensor vs box_sums"
        );
        for (k, (&g, &w)) in got.iter().zip(&want).enumerate() {
            let ok = if w.is_nan() {
                g.is_nan()
            } else {
                (g - w).abs() <= REL_TOL * w.abs().max(1.0)
            };
            assert!(
                ok,
                "{name}: box sum of sample {} over {}: got {g}, want {w}",
                samples[k], boxes[k]
            );
        }
    }
}

#[test]
fn random_shapes_match_the_cpu() {
    let Some(gpu) = gpu("random_shapes_match_the_cpu") else {
        return;
    };
    let mut rng = Lcg(2021);
    // [B, C, h, w], classes, (rows, cols): odd sizes, batch 1, a 1x1 CAM, downsampling, and
    // the ResNet-50 geometry at a reduced size.
    let shapes = [
        ([1, 5, 3, 3], 3, (17, 13)),
        ([3, 37, 7, 5], 11, (45, 61)),
        ([2, 3, 1, 1], 2, (6, 6)),
        ([5, 16, 6, 4], 7, (3, 5)),
        ([4, 256, 14, 14], 200, (112, 112)),
        ([2, 33, 9, 11], 5, (99, 101)),
    ];
    for (k, &(dims, classes, size)) in shapes.iter().enumerate() {
        let case = Case::random(&mut rng, dims, classes, size);
        case.check(&format!("shape {k} {dims:?} -> {size:?}"), &gpu, &mut rng);
    }
}

#[test]
fn degenerate_cams_match_the_cpu() {
    let Some(gpu) = gpu("degenerate_cams_match_the_cpu") else {
        return;
    };
    let mut rng = Lcg(7);
    let dims = [4, 6, 5, 5];
    let mut case = Case::random(&mut rng, dims, 4, (20, 20));
    let plane = 6 * 25;
    case.labels = vec![1, 2, 3, 0];
    // Sample 1: negative features only (ReLU -> 0) and a zero bias: an all-zero CAM.
    case.bias.as_mut().unwrap()[2] = 0.0;
    case.features[plane..2 * plane]
        .iter_mut()
        .for_each(|v| *v = -v.abs() - 0.1);
    // Sample 2: a NaN in its class row (a NaN feature would be cut by the ReLU).
    case.weight[3 * 6 + 4] = f32::NAN;
    // Sample 3: an infinite feature.
    case.features[3 * plane + 7] = f32::INFINITY;
    let cpu = case.spm(&Device::Cpu);
    assert_eq!(cpu.degenerate().unwrap(), vec![false, true, true, true]);
    case.check("degenerate", &gpu, &mut rng);
    // Without a bias, every sample's CAM is the bare ReLU dot product.
    case.bias = None;
    case.check("degenerate, no bias", &gpu, &mut rng);
}

#[test]
fn host_labels_with_gpu_features_match_the_cpu() {
    let Some(gpu) = gpu("host_labels_with_gpu_features_match_the_cpu") else {
        return;
    };
    let mut rng = Lcg(11);
    let case = Case::random(&mut rng, [3, 9, 4, 6], 5, (19, 23));
    let features = Tensor::from_slice(&case.features, &case.dims[..], &gpu).unwrap();
    let weight = Tensor::from_slice(&case.weight, (5, 9), &gpu).unwrap();
    let labels = Tensor::from_slice(&case.labels, 3, &Device::Cpu).unwrap();
    let cuda = semantic_percent_maps(&features, &weight, None, &labels, case.size).unwrap();
    let mut host_case = case;
    host_case.bias = None;
    let cpu = host_case.spm(&Device::Cpu);
    assert_close("host labels cam", &host(cuda.cam()), &host(cpu.cam()));
    assert_close(
        "host labels maps",
        &host(&cuda.maps().unwrap()),
        &host(&cpu.maps().unwrap()),
    );
}
