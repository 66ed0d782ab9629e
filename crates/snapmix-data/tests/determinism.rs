//! Same seed, same batches: whatever the number of decoding threads or the prefetch depth.

use std::path::Path;
use std::sync::Arc;

use snapmix_data::synthetic::Split;
use snapmix_data::{
    cub, Batch, ImageDataset, LoadOptions, Loader, LoaderConfig, ResizeMode, SyntheticConfig,
    SyntheticSet, Transform,
};

fn epoch(
    dataset: Arc<dyn ImageDataset>,
    transform: &Transform,
    threads: usize,
    prefetch: usize,
    epoch: u64,
) -> Vec<Batch> {
    let config = LoaderConfig {
        threads: Some(threads),
        prefetch,
        ..LoaderConfig::train(4, 1234)
    };
    Loader::new(dataset, transform.clone(), config)
        .unwrap()
        .epoch(epoch)
        .collect::<Result<_, _>>()
        .unwrap()
}

#[test]
fn cub_fixture_batches_do_not_depend_on_thread_count() {
    let root =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/fixtures/datasets/CUB_200_2011");
    let splits = cub::load(&root, LoadOptions::default()).unwrap();
    let train: Arc<dyn ImageDataset> = Arc::new(splits.train);
    let transform = Transform::train(ResizeMode::ShorterSide, 40, 32);
    let reference = epoch(train.clone(), &transform, 1, 0, 3);
    assert_eq!(reference.len(), 1);
    for (threads, prefetch) in [(2, 1), (3, 2)] {
        assert_eq!(
            epoch(train.clone(), &transform, threads, prefetch, 3),
            reference
        );
    }
    assert_ne!(
        epoch(train, &transform, 1, 0, 4),
        reference,
        "a new epoch draws anew"
    );
}

#[test]
fn synthetic_batches_do_not_depend_on_thread_count() {
    let config = SyntheticConfig {
        train_per_class: 2,
        size: 32,
        ..Default::default()
    };
    let train: Arc<dyn ImageDataset> = Arc::new(SyntheticSet::new(&config, Split::Train).unwrap());
    let transform = Transform::train(ResizeMode::Warp, 36, 32);
    let reference = epoch(train.clone(), &transform, 1, 0, 0);
    assert_eq!(reference.len(), 5);
    assert!(reference.iter().all(|b| b.masks.is_some()));
    assert_eq!(epoch(train, &transform, 2, 3, 0), reference);
}
