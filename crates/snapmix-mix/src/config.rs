//! `MixConfig`: the user's choice of method, probabilities and Beta concentration, and the
//! seeded sampling of `MixParams` from it. The only random code of this crate.

use crate::{Method, MixError, MixParams, Result, SampleMix};
use rand::seq::SliceRandom;
use rand::Rng;
use rand_distr::{Beta, Distribution};
use snapmix_cam::PixelBox;

/// Whether one draw serves the whole batch or every sample draws its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MixMode {
    /// One method, box pair and lambda for the whole batch (the official code).
    #[default]
    Batch,
    /// Every sample draws whether to mix, its method, boxes and lambdas (timm's `elem` mode).
    Elem,
}

/// How to mix: which method, how often, and the Beta(beta, beta) behind boxes and blends.
///
/// With `switch` empty, `method` is used whenever the `prob` draw says so. Each `(m, p)` in
/// `switch` replaces `method` by `m` with probability `p` (timm's `switch_prob`); what is left,
/// `1 - sum(p)`, keeps `method`.
#[derive(Debug, Clone, PartialEq)]
pub struct MixConfig {
    /// The method used when no switch entry is drawn.
    pub method: Method,
    /// Probability that a batch (or, in elem mode, a sample) is mixed at all.
    pub prob: f64,
    /// Concentration of the symmetric Beta distribution the lambdas are drawn from.
    pub beta: f64,
    /// SnapMix's same-label rule (see [`MixParams::same_label_rule`]).
    pub same_label_rule: bool,
    /// Batch or per-sample draws.
    pub mode: MixMode,
    /// Other methods and the probability each is used instead of `method`.
    pub switch: Vec<(Method, f64)>,
}

impl MixConfig {
    /// `method` on every batch (prob 1), Beta(1, 1), same-label rule on, batch mode: the
    /// official SnapMix defaults apart from beta, which its configs set per dataset.
    pub fn new(method: Method) -> Self {
        Self {
            method,
            prob: 1.0,
            beta: 1.0,
            same_label_rule: true,
            mode: MixMode::Batch,
            switch: Vec::new(),
        }
    }

    /// Checks beta, the probabilities and their total.
    pub fn validate(&self) -> Result<()> {
        if !(self.beta > 0.0 && self.beta.is_finite()) {
            return Err(MixError::InvalidBeta(self.beta));
        }
        check_prob("prob", self.prob)?;
        let mut total = 0.0;
        for &(_, p) in &self.switch {
            check_prob("switch probability", p)?;
            total += p;
        }
        if total > 1.0 + 1e-12 {
            return Err(MixError::SwitchTotal(total));
        }
        Ok(())
    }

    /// Draws the parameters of one mixing step for a batch of `batch` images of `rows x cols`.
    /// The same RNG state gives the same parameters.
    pub fn sample<R: Rng + ?Sized>(
        &self,
        rng: &mut R,
        batch: usize,
        rows: usize,
        cols: usize,
    ) -> Result<MixParams> {
        self.validate()?;
        if batch == 0 {
            return Err(MixError::EmptyBatch);
        }
        if rows == 0 || cols == 0 {
            return Err(MixError::EmptyImage { rows, cols });
        }
        let beta = Beta::new(self.beta, self.beta).map_err(|_| MixError::InvalidBeta(self.beta))?;
        let mut perm: Vec<usize> = (0..batch).collect();
        perm.shuffle(rng);
        let samples = match self.mode {
            MixMode::Batch => vec![self.sample_one(rng, &beta, rows, cols); batch],
            MixMode::Elem => (0..batch)
                .map(|_| self.sample_one(rng, &beta, rows, cols))
                .collect(),
        };
        Ok(MixParams {
            rows,
            cols,
            perm,
            samples,
            same_label_rule: self.same_label_rule,
        })
    }

    /// One draw: mix or not, which method, its lambdas and boxes.
    fn sample_one<R: Rng + ?Sized>(
        &self,
        rng: &mut R,
        beta: &Beta<f64>,
        rows: usize,
        cols: usize,
    ) -> SampleMix {
        if rng.random::<f64>() >= self.prob {
            return SampleMix::none();
        }
        let method = self.pick_method(rng);
        match method {
            Method::None => SampleMix::none(),
            Method::SnapMix => {
                let (lam, lam1) = (beta.sample(rng), beta.sample(rng));
                let box_a = rand_bbox(rng, rows, cols, lam);
                let box_b = rand_bbox(rng, rows, cols, lam1);
                SampleMix {
                    method,
                    box_a,
                    box_b,
                    lam,
                    lam1,
                }
            }
            // The official asymmetric CutMix draws both boxes from one lambda.
            Method::AsCutMix => {
                let lam = beta.sample(rng);
                let box_a = rand_bbox(rng, rows, cols, lam);
                let box_b = rand_bbox(rng, rows, cols, lam);
                SampleMix {
                    method,
                    box_a,
                    box_b,
                    lam,
                    lam1: lam,
                }
            }
            Method::CutMix => {
                let lam = beta.sample(rng);
                let box_a = rand_bbox(rng, rows, cols, lam);
                SampleMix {
                    method,
                    box_a,
                    box_b: box_a,
                    lam,
                    lam1: lam,
                }
            }
            Method::Cutout => {
                let lam = CUTOUT_LAM;
                let box_a = rand_bbox(rng, rows, cols, lam);
                SampleMix {
                    method,
                    box_a,
                    box_b: box_a,
                    lam,
                    lam1: lam,
                }
            }
            Method::Mixup => {
                let lam = beta.sample(rng);
                SampleMix {
                    method,
                    box_a: PixelBox::default(),
                    box_b: PixelBox::default(),
                    lam,
                    lam1: lam,
                }
            }
        }
    }

    fn pick_method<R: Rng + ?Sized>(&self, rng: &mut R) -> Method {
        if self.switch.is_empty() {
            return self.method;
        }
        let u = rng.random::<f64>();
        let mut acc = 0.0;
        for &(method, p) in &self.switch {
            acc += p;
            if u < acc {
                return method;
            }
        }
        self.method
    }
}

/// The official Cutout removes a box of a fixed lambda.
const CUTOUT_LAM: f64 = 0.75;

fn check_prob(what: &'static str, value: f64) -> Result<()> {
    if (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(MixError::InvalidProb { what, value })
    }
}

/// The official `rand_bbox`: sides `int(side * sqrt(1 - lam))`, centre uniform over the image,
/// corners `centre -/+ side // 2` clipped to the image (so boxes near a border are smaller).
pub fn rand_bbox<R: Rng + ?Sized>(rng: &mut R, rows: usize, cols: usize, lam: f64) -> PixelBox {
    let ratio = (1.0 - lam).max(0.0).sqrt();
    let cut_rows = (rows as f64 * ratio) as i64;
    let cut_cols = (cols as f64 * ratio) as i64;
    let centre_row = rng.random_range(0..rows) as i64;
    let centre_col = rng.random_range(0..cols) as i64;
    let clip = |v: i64, side: usize| v.clamp(0, side as i64) as usize;
    PixelBox::new(
        clip(centre_row - cut_rows / 2, rows),
        clip(centre_col - cut_cols / 2, cols),
        clip(centre_row + cut_rows / 2, rows),
        clip(centre_col + cut_cols / 2, cols),
    )
}
