//! Builds the train and test loaders a config asks for, with the official transforms (resize
//! then random/centre crop; CUB and folders keep the aspect, Cars and Aircraft are warped).

use std::sync::Arc;

use snapmix_data::aircraft::AircraftOptions;
use snapmix_data::synthetic::{SyntheticConfig, SyntheticSet};
use snapmix_data::{ImageDataset, LoadOptions, Loader, LoaderConfig, ResizeMode, Transform};

use crate::config::{DataSettings, DatasetKind};
use crate::error::TrainError;

/// The loaders of a run and the class names.
#[derive(Clone)]
pub struct DataBundle {
    /// Shuffled, augmented training batches.
    pub train: Loader,
    /// Test batches in dataset order, centre-cropped.
    pub test: Loader,
    /// Class names, index = label.
    pub class_names: Vec<String>,
}

/// The two splits of a dataset, before any loader.
#[derive(Clone)]
pub struct Datasets {
    /// The training split.
    pub train: Arc<dyn ImageDataset>,
    /// The test split.
    pub test: Arc<dyn ImageDataset>,
    /// Class names, index = label.
    pub class_names: Vec<String>,
}

/// The datasets named by `settings`.
pub fn load_datasets(settings: &DataSettings, seed: u64) -> Result<Datasets, TrainError> {
    let root = || {
        settings.root.as_deref().ok_or_else(|| {
            TrainError::InvalidSetting(format!(
                "data.root is required for dataset `{}`",
                settings.dataset
            ))
        })
    };
    let options = LoadOptions::default();
    let splits = match settings.dataset {
        DatasetKind::Synthetic => {
            let config = synthetic_config(settings, seed);
            let (train, test) = SyntheticSet::splits(&config)?;
            return Ok(Datasets {
                class_names: train.class_names(),
                train: Arc::new(train),
                test: Arc::new(test),
            });
        }
        DatasetKind::Cub => snapmix_data::cub::load(root()?, options)?,
        DatasetKind::Cars => snapmix_data::cars::load(root()?, options)?,
        DatasetKind::Aircraft => snapmix_data::aircraft::load(
            root()?,
            AircraftOptions {
                load: options,
                ..AircraftOptions::default()
            },
        )?,
        DatasetKind::Folder => snapmix_data::folder::load(root()?, options)?,
    };
    Ok(Datasets {
        class_names: splits.class_names().to_vec(),
        train: Arc::new(splits.train),
        test: Arc::new(splits.test),
    })
}

/// The synthetic set's settings; its content is seeded by the run's seed.
pub fn synthetic_config(settings: &DataSettings, seed: u64) -> SyntheticConfig {
    SyntheticConfig {
        classes: settings.synthetic.classes,
        train_per_class: settings.synthetic.train_per_class,
        test_per_class: settings.synthetic.test_per_class,
        size: settings.synthetic.image_size,
        seed,
    }
}

/// How the dataset's images are resized, as in the official code.
pub fn resize_mode(dataset: DatasetKind) -> ResizeMode {
    match dataset {
        DatasetKind::Cub | DatasetKind::Folder => ResizeMode::ShorterSide,
        DatasetKind::Cars | DatasetKind::Aircraft => ResizeMode::Warp,
        DatasetKind::Synthetic => ResizeMode::Keep,
    }
}

/// The test loader alone (evaluation of saved weights).
pub fn test_loader(
    settings: &DataSettings,
    dataset: Arc<dyn ImageDataset>,
) -> Result<Loader, TrainError> {
    let transform = Transform::test(
        resize_mode(settings.dataset),
        settings.resize,
        settings.crop,
    );
    let mut config = LoaderConfig::test(settings.test_batch_size);
    config.threads = threads(settings.workers);
    Ok(Loader::new(dataset, transform, config)?)
}

/// Both loaders of a run.
pub fn build(settings: &DataSettings, seed: u64) -> Result<DataBundle, TrainError> {
    let Datasets {
        train: train_set,
        test: test_set,
        class_names,
    } = load_datasets(settings, seed)?;
    if train_set.is_empty() || test_set.is_empty() {
        return Err(TrainError::InvalidSetting(format!(
            "dataset `{}` has {} training and {} test images: both splits need images",
            settings.dataset,
            train_set.len(),
            test_set.len()
        )));
    }
    let transform = Transform::train(
        resize_mode(settings.dataset),
        settings.resize,
        settings.crop,
    );
    let mut config = LoaderConfig::train(settings.batch_size, seed);
    config.drop_last = settings.drop_last;
    config.threads = threads(settings.workers);
    let train = Loader::new(train_set, transform, config)?;
    if train.batches_per_epoch() == 0 {
        return Err(TrainError::InvalidSetting(format!(
            "{} training images make no batch of {} with drop_last",
            train.dataset().len(),
            settings.batch_size
        )));
    }
    Ok(DataBundle {
        train,
        test: test_loader(settings, test_set)?,
        class_names,
    })
}

fn threads(workers: usize) -> Option<usize> {
    (workers > 0).then_some(workers)
}
