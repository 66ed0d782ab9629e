//! Label fidelity of mixing methods: the true semantic share of each label in a mixed image,
//! measured on ground-truth part masks, and how far a method's assigned label weights are from it.

use anyhow::{bail, ensure, Result};
use rand::Rng;
use snapmix_mix::{Method, PixelBox, SampleMix};

/// A pair of label weights: `a` for the image's own label, `b` for its partner's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shares {
    /// Weight (or true share) of the image's own label.
    pub a: f64,
    /// Weight (or true share) of the partner's label.
    pub b: f64,
}

/// A ground-truth part mask `rows x cols`, row-major, non-negative (1 on the part).
#[derive(Debug, Clone, Copy)]
pub struct PartMask<'a> {
    /// The mask values.
    pub values: &'a [f32],
    /// Image rows.
    pub rows: usize,
    /// Image cols.
    pub cols: usize,
}

impl PartMask<'_> {
    /// The part mass inside `bbox` (f64 sum of the mask values).
    pub fn mass(&self, bbox: PixelBox) -> f64 {
        (bbox.row0..bbox.row1)
            .map(|row| {
                let line = &self.values[row * self.cols..(row + 1) * self.cols];
                line[bbox.col0..bbox.col1]
                    .iter()
                    .map(|&v| f64::from(v))
                    .sum::<f64>()
            })
            .sum()
    }

    /// The whole part mass.
    pub fn total(&self) -> f64 {
        self.mass(PixelBox::full(self.rows, self.cols))
    }

    fn check(&self, which: &str) -> Result<()> {
        ensure!(
            self.values.len() == self.rows * self.cols,
            "part mask of image {which} has {} values, expected {} x {}",
            self.values.len(),
            self.rows,
            self.cols
        );
        if let Some(v) = self.values.iter().find(|v| !(v.is_finite() && **v >= 0.0)) {
            bail!("part mask of image {which} holds {v}: masks must be finite and >= 0");
        }
        Ok(())
    }
}

/// Whether `sample` actually pastes a region, with the official conditions `snapmix_mix::apply`
/// uses: SnapMix and CutMix need both boxes non-empty, asymmetric CutMix (and so ResizeMix)
/// both boxes larger than 4 pixels.
pub fn pastes(sample: &SampleMix) -> bool {
    let min_area = match sample.method {
        Method::SnapMix | Method::CutMix => 0,
        Method::AsCutMix => 4,
        Method::Mixup | Method::Cutout | Method::None => return false,
    };
    sample.box_a.area() > min_area && sample.box_b.area() > min_area
}

/// The true semantic share of each label in the image that `sample` makes from image a (mask
/// `mask_a`) and its partner b (`mask_b`):
/// - box methods: `a` = the fraction of a's part mass outside `box_a` (what survives), `b` =
///   the fraction of b's part mass inside `box_b` (what is pasted; resizing keeps the fraction);
///   `(1, 0)` when nothing is pasted;
/// - Mixup: `(lam, 1 - lam)`, each part is blended at that opacity;
/// - Cutout: `a` = the fraction of a's part outside the box, `b` = 0.
///
/// An image without part mass has no share to measure: an error.
pub fn true_shares(mask_a: PartMask, mask_b: PartMask, sample: &SampleMix) -> Result<Shares> {
    mask_a.check("a")?;
    mask_b.check("b")?;
    ensure!(
        (mask_a.rows, mask_a.cols) == (mask_b.rows, mask_b.cols),
        "part masks differ in size: {}x{} and {}x{}",
        mask_a.rows,
        mask_a.cols,
        mask_b.rows,
        mask_b.cols
    );
    let (rows, cols) = (mask_a.rows, mask_a.cols);
    for (name, bbox) in [("box_a", sample.box_a), ("box_b", sample.box_b)] {
        ensure!(
            bbox.fits(rows, cols),
            "{name} {bbox} lies outside the {rows}x{cols} image"
        );
    }
    let (total_a, total_b) = (mask_a.total(), mask_b.total());
    ensure!(total_a > 0.0, "image a has an empty part mask");
    ensure!(total_b > 0.0, "image b has an empty part mask");
    let survives_a = |bbox| 1.0 - mask_a.mass(bbox) / total_a;
    Ok(match sample.method {
        Method::Mixup => Shares {
            a: sample.lam,
            b: 1.0 - sample.lam,
        },
        Method::Cutout if sample.box_a.area() > 0 => Shares {
            a: survives_a(sample.box_a),
            b: 0.0,
        },
        _ if pastes(sample) => Shares {
            a: survives_a(sample.box_a),
            b: mask_b.mass(sample.box_b) / total_b,
        },
        _ => Shares { a: 1.0, b: 0.0 },
    })
}

/// Draws a ResizeMix-style sample (Qin et al. 2020): the WHOLE partner image is shrunk by a
/// side ratio `tau ~ U(scale.0, scale.1)` and pasted at a uniform position inside the image.
///
/// Expressed as an asymmetric CutMix with `box_b` = the full image, so `snapmix_mix::apply`
/// pastes it and assigns exactly ResizeMix's area label (`lam_b` = area of `box_a`).
pub fn resizemix_sample<R: Rng + ?Sized>(
    rng: &mut R,
    rows: usize,
    cols: usize,
    scale: (f64, f64),
) -> SampleMix {
    let tau = rng.random_range(scale.0..=scale.1);
    let cut_rows = ((rows as f64 * tau) as usize).clamp(1, rows);
    let cut_cols = ((cols as f64 * tau) as usize).clamp(1, cols);
    let row0 = rng.random_range(0..=rows - cut_rows);
    let col0 = rng.random_range(0..=cols - cut_cols);
    SampleMix {
        method: Method::AsCutMix,
        box_a: PixelBox::new(row0, col0, row0 + cut_rows, col0 + cut_cols),
        box_b: PixelBox::full(rows, cols),
        lam: tau,
        lam1: tau,
    }
}

/// How far one mix's assigned label weights are from the true shares.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LabelError {
    /// Mean of `|assigned.a - truth.a|` and `|assigned.b - truth.b|`.
    pub error: f64,
    /// Whether the assigned weights favour the other label than the truth does; `None` when
    /// the true shares are equal (e.g. both parts gone), so there is no dominant label.
    pub dominant_wrong: Option<bool>,
}

/// Compares `assigned` label weights with the `truth`. An assigned tie where the truth has a
/// dominant label counts as wrong: the labels fail to say which class the image shows.
pub fn label_error(assigned: Shares, truth: Shares) -> LabelError {
    let error = ((assigned.a - truth.a).abs() + (assigned.b - truth.b).abs()) / 2.0;
    let dominant_wrong = if (truth.a - truth.b).abs() <= 1e-9 {
        None
    } else {
        let truth_a = truth.a > truth.b;
        let assigned_a = assigned.a > assigned.b;
        let assigned_b = assigned.b > assigned.a;
        Some(if truth_a { !assigned_a } else { !assigned_b })
    };
    LabelError {
        error,
        dominant_wrong,
    }
}

/// Statistics of the label errors of many mixes.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Summary {
    /// Number of mixes.
    pub mixes: usize,
    /// Mean absolute label error.
    pub mean_error: f64,
    /// Median absolute label error.
    pub median_error: f64,
    /// 90th percentile (nearest rank).
    pub p90_error: f64,
    /// Largest error.
    pub max_error: f64,
    /// Fraction of the mixes with a true dominant label where the assigned one is wrong.
    pub dominant_wrong_fraction: f64,
    /// Mixes without a true dominant label (equal true shares), left out of that fraction.
    pub no_true_dominant: usize,
}

/// Summarises `errors`; an empty list is an error (no statistics of nothing).
pub fn summarize(errors: &[LabelError]) -> Result<Summary> {
    ensure!(!errors.is_empty(), "no mixes to summarise");
    let mut sorted: Vec<f64> = errors.iter().map(|e| e.error).collect();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let rank = |q: f64| sorted[((q * n as f64).ceil() as usize).clamp(1, n) - 1];
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    let judged: Vec<bool> = errors.iter().filter_map(|e| e.dominant_wrong).collect();
    let wrong = judged.iter().filter(|&&w| w).count();
    Ok(Summary {
        mixes: n,
        mean_error: sorted.iter().sum::<f64>() / n as f64,
        median_error: median,
        p90_error: rank(0.9),
        max_error: sorted[n - 1],
        dominant_wrong_fraction: if judged.is_empty() {
            0.0
        } else {
            wrong as f64 / judged.len() as f64
        },
        no_true_dominant: n - judged.len(),
    })
}

/// Counts `values` in `bins` equal bins over `[0, max]`; values at or above `max` go to the
/// last bin.
pub fn histogram(values: &[f64], bins: usize, max: f64) -> Vec<usize> {
    let mut counts = vec![0; bins];
    if bins == 0 {
        return counts;
    }
    for &v in values {
        let bin = ((v / max * bins as f64).floor().max(0.0) as usize).min(bins - 1);
        counts[bin] += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// An 8x8 mask with the part on `[row0, row1) x [col0, col1)`.
    fn mask(row0: usize, col0: usize, row1: usize, col1: usize) -> Vec<f32> {
        let mut m = vec![0.0; 64];
        for row in row0..row1 {
            for col in col0..col1 {
                m[row * 8 + col] = 1.0;
            }
        }
        m
    }

    fn part(values: &[f32]) -> PartMask<'_> {
        PartMask {
            values,
            rows: 8,
            cols: 8,
        }
    }

    fn sample(method: Method, box_a: PixelBox, box_b: PixelBox, lam: f64) -> SampleMix {
        SampleMix {
            method,
            box_a,
            box_b,
            lam,
            lam1: lam,
        }
    }

    #[test]
    fn box_paste_shares_count_surviving_and_pasted_part_mass() {
        // a's part: rows 0..2, cols 0..4 (8 px); box_a covers its left half (4 px).
        let a = mask(0, 0, 2, 4);
        // b's part: rows 4..8, cols 4..8 (16 px); box_b covers a quarter of it (rows 4..6, cols 4..6).
        let b = mask(4, 4, 8, 8);
        let s = sample(
            Method::SnapMix,
            PixelBox::new(0, 0, 4, 2),
            PixelBox::new(2, 2, 6, 6),
            0.5,
        );
        let t = true_shares(part(&a), part(&b), &s).unwrap();
        assert!((t.a - 0.5).abs() < 1e-12, "{t:?}");
        assert!((t.b - 0.25).abs() < 1e-12, "{t:?}");
        // A box missing both parts: a keeps all, b brings nothing.
        let miss = sample(
            Method::CutMix,
            PixelBox::new(4, 0, 8, 2),
            PixelBox::new(4, 0, 8, 2),
            0.5,
        );
        assert_eq!(
            true_shares(part(&a), part(&b), &miss).unwrap(),
            Shares { a: 1.0, b: 0.0 }
        );
    }

    #[test]
    fn resizemix_brings_the_whole_partner_part() {
        let a = mask(0, 0, 2, 2);
        let b = mask(6, 6, 8, 8);
        let s = sample(
            Method::AsCutMix,
            PixelBox::new(0, 0, 4, 4),
            PixelBox::full(8, 8),
            0.5,
        );
        assert_eq!(
            true_shares(part(&a), part(&b), &s).unwrap(),
            Shares { a: 0.0, b: 1.0 }
        );
    }

    #[test]
    fn no_paste_and_mixup_and_cutout() {
        let a = mask(0, 0, 4, 4);
        let b = mask(0, 0, 4, 4);
        // AsCutMix pastes only boxes above 4 pixels: a 2x2 box_b means no paste.
        let tiny = sample(
            Method::AsCutMix,
            PixelBox::new(0, 0, 4, 4),
            PixelBox::new(0, 0, 2, 2),
            0.5,
        );
        assert!(!pastes(&tiny));
        assert_eq!(
            true_shares(part(&a), part(&b), &tiny).unwrap(),
            Shares { a: 1.0, b: 0.0 }
        );
        let mix = sample(Method::Mixup, PixelBox::default(), PixelBox::default(), 0.3);
        let t = true_shares(part(&a), part(&b), &mix).unwrap();
        assert!((t.a - 0.3).abs() < 1e-12 && (t.b - 0.7).abs() < 1e-12);
        let cut = sample(
            Method::Cutout,
            PixelBox::new(0, 0, 4, 1),
            PixelBox::new(0, 0, 4, 1),
            0.75,
        );
        let t = true_shares(part(&a), part(&b), &cut).unwrap();
        assert!((t.a - 0.75).abs() < 1e-12 && t.b == 0.0);
    }

    #[test]
    fn bad_masks_and_boxes_are_errors() {
        let a = mask(0, 0, 2, 2);
        let empty = vec![0.0; 64];
        let s = sample(
            Method::CutMix,
            PixelBox::new(0, 0, 2, 2),
            PixelBox::new(0, 0, 2, 2),
            0.5,
        );
        let err = true_shares(part(&a), part(&empty), &s).unwrap_err();
        assert!(err.to_string().contains("image b"), "{err}");
        let short = [1.0f32; 10];
        assert!(true_shares(part(&short), part(&a), &s).is_err());
        let outside = sample(
            Method::CutMix,
            PixelBox::new(0, 0, 9, 2),
            PixelBox::new(0, 0, 9, 2),
            0.5,
        );
        let err = true_shares(part(&a), part(&a), &outside).unwrap_err();
        assert!(err.to_string().contains("box_a"), "{err}");
        let mut negative = a.clone();
        negative[5] = -1.0;
        assert!(true_shares(part(&negative), part(&a), &s).is_err());
    }

    #[test]
    fn errors_and_dominant_labels() {
        let truth = Shares { a: 0.2, b: 0.9 };
        // Area label says a dominates: wrong, error (0.5 + 0.6) / 2.
        let e = label_error(Shares { a: 0.7, b: 0.3 }, truth);
        assert!((e.error - 0.55).abs() < 1e-12);
        assert_eq!(e.dominant_wrong, Some(true));
        let e = label_error(Shares { a: 0.3, b: 0.6 }, truth);
        assert!((e.error - 0.2).abs() < 1e-12);
        assert_eq!(e.dominant_wrong, Some(false));
        // An assigned tie fails to name the dominant label.
        assert_eq!(
            label_error(Shares { a: 0.5, b: 0.5 }, truth).dominant_wrong,
            Some(true)
        );
        // Both parts gone: no true dominant label.
        let gone = Shares { a: 0.0, b: 0.0 };
        let e = label_error(Shares { a: 0.6, b: 0.4 }, gone);
        assert_eq!(e.dominant_wrong, None);
        assert!((e.error - 0.5).abs() < 1e-12);
        assert_eq!(label_error(truth, truth).error, 0.0);
    }

    #[test]
    fn summary_statistics() {
        let errors: Vec<LabelError> = [0.1, 0.4, 0.2, 0.3]
            .iter()
            .zip([Some(true), Some(false), None, Some(false)])
            .map(|(&error, dominant_wrong)| LabelError {
                error,
                dominant_wrong,
            })
            .collect();
        let s = summarize(&errors).unwrap();
        assert_eq!(s.mixes, 4);
        assert!((s.mean_error - 0.25).abs() < 1e-12);
        assert!((s.median_error - 0.25).abs() < 1e-12);
        assert_eq!(s.p90_error, 0.4);
        assert_eq!(s.max_error, 0.4);
        assert!((s.dominant_wrong_fraction - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(s.no_true_dominant, 1);
        assert!(summarize(&[]).is_err());
    }

    #[test]
    fn histogram_bins_and_clamps() {
        let counts = histogram(&[0.0, 0.05, 0.1, 0.55, 0.99, 1.0, 3.0], 4, 1.0);
        assert_eq!(counts, vec![3, 0, 1, 3]);
    }

    #[test]
    fn resizemix_samples_fit_and_label_like_their_area() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for _ in 0..200 {
            let s = resizemix_sample(&mut rng, 32, 48, (0.1, 0.8));
            assert!(s.box_a.fits(32, 48));
            assert_eq!(s.box_b, PixelBox::full(32, 48));
            assert_eq!(s.method, Method::AsCutMix);
            let side = s.box_a.rows() as f64 / 32.0;
            assert!((side - s.lam).abs() < 1.0 / 32.0 + 1e-12, "{s:?}");
            assert!(s.lam >= 0.1 && s.lam <= 0.8);
        }
    }

    #[test]
    fn snapmix_with_ground_truth_spm_assigns_the_true_shares() {
        use candle_core::{Device, Tensor};
        // SnapMix's labels, computed by snapmix-mix from SPMs that are the normalised part
        // masks, must equal the true shares: the oracle the benchmark's bound relies on.
        let (a, b) = (mask(1, 1, 5, 4), mask(3, 2, 8, 7));
        let dev = Device::Cpu;
        let masks: Vec<f32> = a.iter().chain(&b).copied().collect();
        let features = Tensor::from_vec(masks, (2, 1, 8, 8), &dev).unwrap();
        let weight = Tensor::ones((3, 1), candle_core::DType::F32, &dev).unwrap();
        let labels = Tensor::new(&[0u32, 2], &dev).unwrap();
        let spm =
            snapmix_cam::semantic_percent_maps(&features, &weight, None, &labels, (8, 8)).unwrap();
        let s = sample(
            Method::SnapMix,
            PixelBox::new(0, 0, 3, 3),
            PixelBox::new(4, 3, 7, 8),
            0.5,
        );
        let params = snapmix_mix::MixParams::batch_mode(8, 8, vec![1, 0], s);
        let images = Tensor::zeros((2, 3, 8, 8), candle_core::DType::F32, &dev).unwrap();
        let mixed = snapmix_mix::apply(&params, &images, &labels, Some(&spm)).unwrap();
        let lam_a = mixed.lam_a.to_vec1::<f32>().unwrap();
        let lam_b = mixed.lam_b.to_vec1::<f32>().unwrap();
        let t = true_shares(part(&a), part(&b), &s).unwrap();
        assert!(
            (f64::from(lam_a[0]) - t.a).abs() < 1e-5,
            "{lam_a:?} vs {t:?}"
        );
        assert!(
            (f64::from(lam_b[0]) - t.b).abs() < 1e-5,
            "{lam_b:?} vs {t:?}"
        );
        assert!(
            t.a < 1.0 && t.b > 0.0,
            "the boxes must touch both parts: {t:?}"
        );
    }
}
