//! The MultiStep learning-rate schedule of the official recipe: the lr drops by `gamma` at each
//! milestone epoch.

use serde::{Deserialize, Serialize};

/// Multiplies the base learning rate by `gamma` once per milestone reached, like PyTorch's
/// `MultiStepLR` stepped at the end of every epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MultiStepLr {
    /// Epochs (0-based, the first epoch run at the reduced rate) where the lr drops.
    pub milestones: Vec<usize>,
    /// The factor applied at each milestone (official: 0.1).
    pub gamma: f64,
}

impl MultiStepLr {
    /// The official schedule when fine-tuning a pretrained network (200 epochs).
    pub fn pretrained() -> Self {
        Self {
            milestones: vec![80, 150, 180],
            gamma: 0.1,
        }
    }

    /// The official schedule when training from scratch (300 epochs).
    pub fn scratch() -> Self {
        Self {
            milestones: vec![150, 225, 270],
            gamma: 0.1,
        }
    }

    /// The factor on the base lr during 0-based `epoch`: `gamma` to the number of milestones
    /// `<= epoch`. With milestones [80, ...], epochs 0..=79 run at the base lr and 80 at 0.1x.
    pub fn factor(&self, epoch: usize) -> f64 {
        let reached = self.milestones.iter().filter(|&&m| m <= epoch).count();
        self.gamma.powi(reached as i32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pretrained_schedule_drops_after_each_milestone() {
        let schedule = MultiStepLr::pretrained();
        assert_eq!(schedule.factor(0), 1.0);
        assert_eq!(schedule.factor(79), 1.0);
        assert!((schedule.factor(80) - 0.1).abs() < 1e-15);
        assert!((schedule.factor(149) - 0.1).abs() < 1e-15);
        assert!((schedule.factor(150) - 0.01).abs() < 1e-15);
        assert!((schedule.factor(180) - 0.001).abs() < 1e-15);
        assert!((schedule.factor(199) - 0.001).abs() < 1e-15);
    }

    #[test]
    fn scratch_schedule_and_unsorted_milestones() {
        let schedule = MultiStepLr::scratch();
        assert_eq!(schedule.factor(149), 1.0);
        assert!((schedule.factor(225) - 0.01).abs() < 1e-15);
        let unsorted = MultiStepLr {
            milestones: vec![5, 2],
            gamma: 0.5,
        };
        assert_eq!(unsorted.factor(1), 1.0);
        assert_eq!(unsorted.factor(3), 0.5);
        assert_eq!(unsorted.factor(5), 0.25);
    }
}
