//! The in-memory synthetic set handed out as `candle_datasets::vision::Dataset`, for candle
//! users who train with their own loops (feature `candle-datasets`).

use candle_core::Device;

use crate::error::DataError;
use crate::synthetic::{Split, SyntheticConfig, SyntheticSet};

/// Renders both splits of the synthetic set into a `candle_datasets::vision::Dataset`: images
/// `[N, 3, size, size]` f32 in [0, 1], labels u8, as candle's CIFAR loader gives them.
pub fn synthetic_vision_dataset(
    config: &SyntheticConfig,
    device: &Device,
) -> Result<candle_datasets::vision::Dataset, DataError> {
    let (train_images, train_labels) =
        SyntheticSet::new(config, Split::Train)?.to_tensors(device)?;
    let (test_images, test_labels) = SyntheticSet::new(config, Split::Test)?.to_tensors(device)?;
    Ok(candle_datasets::vision::Dataset {
        train_images,
        train_labels,
        test_images,
        test_labels,
        labels: config.classes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_splits_have_the_configured_sizes() {
        let config = SyntheticConfig {
            train_per_class: 2,
            test_per_class: 1,
            size: 16,
            ..Default::default()
        };
        let dataset = synthetic_vision_dataset(&config, &Device::Cpu).unwrap();
        assert_eq!(dataset.train_images.dims(), &[20, 3, 16, 16]);
        assert_eq!(dataset.test_labels.dims(), &[10]);
        assert_eq!(dataset.labels, 10);
    }
}
