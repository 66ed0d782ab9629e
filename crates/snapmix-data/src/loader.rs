//! The batch loader: per-epoch shuffling and sharding from a seed, parallel decode + transform
//! (rayon) straight into one contiguous NCHW f32 buffer per batch, and a background thread
//! keeping a few batches ready. Each image's augmentation draws from its own stream keyed by
//! (seed, epoch, index), so batches are identical whatever the number of threads.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::dataset::ImageDataset;
use crate::error::DataError;
use crate::transform::Transform;

/// How the loader batches, shuffles, shards and parallelises.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoaderConfig {
    /// Images per batch.
    pub batch_size: usize,
    /// Seed of the shuffling and of every augmentation draw.
    pub seed: u64,
    /// Shuffle the order every epoch (training) or keep the dataset order (testing).
    pub shuffle: bool,
    /// Drop the last batch when it is smaller than `batch_size`.
    pub drop_last: bool,
    /// This process's rank among `world_size` (each rank sees a disjoint, equal-sized shard).
    pub rank: usize,
    /// Number of ranks.
    pub world_size: usize,
    /// Batches kept ready by the background thread (0: load in the caller's thread).
    pub prefetch: usize,
    /// Decoding threads (a dedicated rayon pool); `None` uses rayon's global pool.
    pub threads: Option<usize>,
}

impl LoaderConfig {
    /// Training defaults: shuffled, `drop_last`, two batches prefetched, one rank.
    pub fn train(batch_size: usize, seed: u64) -> Self {
        Self {
            batch_size,
            seed,
            shuffle: true,
            drop_last: true,
            rank: 0,
            world_size: 1,
            prefetch: 2,
            threads: None,
        }
    }

    /// Evaluation defaults: dataset order, every image kept.
    pub fn test(batch_size: usize) -> Self {
        Self {
            shuffle: false,
            drop_last: false,
            ..Self::train(batch_size, 0)
        }
    }
}

/// One batch: `images` is `[len, 3, rows, cols]` row-major (NCHW), normalised.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Pixels, NCHW, `len * 3 * rows * cols` floats.
    pub images: Vec<f32>,
    /// Class of each image.
    pub labels: Vec<u32>,
    /// Dataset index of each image.
    pub indices: Vec<usize>,
    /// Part masks `[len, rows, cols]` (1.0 on the part) after the same crop/flip, for datasets
    /// with ground truth (the synthetic set).
    pub masks: Option<Vec<f32>>,
    /// Rows of each image.
    pub rows: usize,
    /// Columns of each image.
    pub cols: usize,
}

impl Batch {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True for an empty batch.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The images as an f32 tensor `[len, 3, rows, cols]` on `device`.
    pub fn images_tensor(&self, device: &Device) -> Result<Tensor, DataError> {
        Ok(Tensor::from_slice(
            &self.images,
            (self.len(), 3, self.rows, self.cols),
            device,
        )?)
    }

    /// The labels as a u32 tensor `[len]` on `device`.
    pub fn labels_tensor(&self, device: &Device) -> Result<Tensor, DataError> {
        Ok(Tensor::from_slice(&self.labels, self.len(), device)?)
    }

    /// The part masks as an f32 tensor `[len, rows, cols]`, where the dataset has them.
    pub fn masks_tensor(&self, device: &Device) -> Result<Option<Tensor>, DataError> {
        self.masks
            .as_ref()
            .map(|m| {
                Ok(Tensor::from_slice(
                    m,
                    (self.len(), self.rows, self.cols),
                    device,
                )?)
            })
            .transpose()
    }
}

/// A 32-byte ChaCha key from (seed, epoch, index, purpose): independent streams per image.
fn stream(seed: u64, epoch: u64, index: u64, purpose: &[u8; 8]) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&epoch.to_le_bytes());
    key[16..24].copy_from_slice(&index.to_le_bytes());
    key[24..].copy_from_slice(purpose);
    ChaCha8Rng::from_seed(key)
}

/// Draws batches from a dataset. Cheap to clone (the dataset is shared).
#[derive(Clone)]
pub struct Loader {
    dataset: Arc<dyn ImageDataset>,
    transform: Transform,
    config: LoaderConfig,
    pool: Option<Arc<rayon::ThreadPool>>,
}

impl Loader {
    /// A loader over `dataset`, checking the transform and configuration.
    pub fn new(
        dataset: Arc<dyn ImageDataset>,
        transform: Transform,
        config: LoaderConfig,
    ) -> Result<Self, DataError> {
        transform.validate()?;
        if config.batch_size == 0 {
            return Err(DataError::config("batch_size", 0, "must be positive"));
        }
        if config.world_size == 0 || config.rank >= config.world_size {
            return Err(DataError::config(
                "rank",
                format!("{}/{}", config.rank, config.world_size),
                "rank must be below a positive world size",
            ));
        }
        let pool = match config.threads {
            Some(0) => return Err(DataError::config("threads", 0, "must be positive")),
            Some(n) => Some(Arc::new(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .thread_name(|i| format!("snapmix-data-{i}"))
                    .build()
                    .map_err(|e| DataError::config("threads", n, e.to_string()))?,
            )),
            None => None,
        };
        Ok(Self {
            dataset,
            transform,
            config,
            pool,
        })
    }

    /// The dataset.
    pub fn dataset(&self) -> &Arc<dyn ImageDataset> {
        &self.dataset
    }

    /// The transform.
    pub fn transform(&self) -> &Transform {
        &self.transform
    }

    /// The configuration.
    pub fn config(&self) -> &LoaderConfig {
        &self.config
    }

    /// This rank's dataset indices for `epoch`, in order: shuffled from (seed, epoch) when
    /// shuffling, then every `world_size`-th from `rank`, cut so every rank has the same count.
    pub fn epoch_indices(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.dataset.len()).collect();
        if self.config.shuffle {
            order.shuffle(&mut stream(self.config.seed, epoch, u64::MAX, b"shuffle "));
        }
        let per_rank = order.len() / self.config.world_size;
        order
            .into_iter()
            .skip(self.config.rank)
            .step_by(self.config.world_size)
            .take(per_rank)
            .collect()
    }

    /// Number of batches this rank gets per epoch.
    pub fn batches_per_epoch(&self) -> usize {
        let n = self.dataset.len() / self.config.world_size;
        if self.config.drop_last {
            n / self.config.batch_size
        } else {
            n.div_ceil(self.config.batch_size)
        }
    }

    /// The batches of `epoch`, as lists of dataset indices.
    fn epoch_batches(&self, epoch: u64) -> Vec<Vec<usize>> {
        let indices = self.epoch_indices(epoch);
        let mut batches: Vec<Vec<usize>> = indices
            .chunks(self.config.batch_size)
            .map(<[usize]>::to_vec)
            .collect();
        if self.config.drop_last
            && batches
                .last()
                .is_some_and(|b| b.len() < self.config.batch_size)
        {
            batches.pop();
        }
        batches
    }

    /// Loads the images `indices` as they are augmented in `epoch`, in parallel.
    pub fn load_batch(&self, epoch: u64, indices: &[usize]) -> Result<Batch, DataError> {
        match &self.pool {
            Some(pool) => pool.install(|| self.load_batch_here(epoch, indices)),
            None => self.load_batch_here(epoch, indices),
        }
    }

    fn load_batch_here(&self, epoch: u64, indices: &[usize]) -> Result<Batch, DataError> {
        let side = self.transform.crop;
        let image_len = 3 * side * side;
        let mut images = vec![0.0f32; indices.len() * image_len];
        let with_masks = self.dataset.has_part_masks();
        let mut masks = vec![
            0.0f32;
            if with_masks {
                indices.len() * side * side
            } else {
                0
            }
        ];
        let mask_len = if with_masks { side * side } else { 0 };
        let mut mask_chunks: Vec<&mut [f32]> = if with_masks {
            masks.chunks_mut(mask_len).collect()
        } else {
            (0..indices.len()).map(|_| &mut [][..]).collect()
        };
        images
            .par_chunks_mut(image_len)
            .zip(mask_chunks.par_iter_mut())
            .zip(indices.par_iter())
            .try_for_each(|((out, mask_out), &index)| {
                let image = self.dataset.load(index)?;
                let mut rng = stream(self.config.seed, epoch, index as u64, b"augment ");
                let (cols, rows) = image.dimensions();
                let geometry =
                    self.transform
                        .sample_geometry(rows as usize, cols as usize, &mut rng);
                self.transform.apply(&image, &geometry, out)?;
                if with_masks {
                    if let Some(mask) = self.dataset.part_mask(index) {
                        self.transform.apply_mask(&mask, &geometry, mask_out)?;
                    }
                }
                Ok::<(), DataError>(())
            })?;
        Ok(Batch {
            images,
            labels: indices
                .iter()
                .map(|&i| self.dataset.label(i) as u32)
                .collect(),
            indices: indices.to_vec(),
            masks: with_masks.then_some(masks),
            rows: side,
            cols: side,
        })
    }

    /// The batches of `epoch`, loaded ahead by a background thread (`prefetch` batches deep).
    pub fn epoch(&self, epoch: u64) -> EpochIter {
        self.epoch_from(epoch, 0)
    }

    /// The batches of `epoch` from batch `first_batch` on (0-based), bitwise those an
    /// uninterrupted [`Loader::epoch`] yields from there: a resumed run continues mid-epoch
    /// without decoding the batches it already trained on. Past the last batch it is empty.
    pub fn epoch_from(&self, epoch: u64, first_batch: usize) -> EpochIter {
        let mut batches = self.epoch_batches(epoch);
        batches.drain(..first_batch.min(batches.len()));
        if self.config.prefetch == 0 {
            return EpochIter {
                inner: Inner::Inline {
                    loader: self.clone(),
                    epoch,
                    batches: batches.into_iter(),
                },
            };
        }
        let (sender, receiver) = sync_channel(self.config.prefetch);
        let loader = self.clone();
        let worker = std::thread::spawn(move || {
            for indices in batches {
                let batch = loader.load_batch(epoch, &indices);
                let failed = batch.is_err();
                if sender.send(batch).is_err() || failed {
                    break;
                }
            }
        });
        EpochIter {
            inner: Inner::Prefetch {
                receiver: Some(receiver),
                worker: Some(worker),
            },
        }
    }
}

/// The batches of one epoch. After an error it ends.
pub struct EpochIter {
    inner: Inner,
}

enum Inner {
    Inline {
        loader: Loader,
        epoch: u64,
        batches: std::vec::IntoIter<Vec<usize>>,
    },
    Prefetch {
        receiver: Option<Receiver<Result<Batch, DataError>>>,
        worker: Option<JoinHandle<()>>,
    },
}

impl Iterator for EpochIter {
    type Item = Result<Batch, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        match &mut self.inner {
            Inner::Inline {
                loader,
                epoch,
                batches,
            } => {
                let indices = batches.next()?;
                let batch = loader.load_batch(*epoch, &indices);
                if batch.is_err() {
                    batches.by_ref().for_each(drop);
                }
                Some(batch)
            }
            Inner::Prefetch { receiver, .. } => receiver.as_ref()?.recv().ok(),
        }
    }
}

impl Drop for EpochIter {
    fn drop(&mut self) {
        if let Inner::Prefetch { receiver, worker } = &mut self.inner {
            // Closing the channel first makes the worker stop after its current batch.
            drop(receiver.take());
            if let Some(worker) = worker.take() {
                let _ = worker.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::{Split, SyntheticConfig, SyntheticSet};
    use crate::transform::ResizeMode;

    fn synthetic(per_class: usize) -> Arc<dyn ImageDataset> {
        let config = SyntheticConfig {
            train_per_class: per_class,
            size: 32,
            ..Default::default()
        };
        Arc::new(SyntheticSet::new(&config, Split::Train).unwrap())
    }

    #[test]
    fn epochs_are_permutations_and_differ_between_epochs() {
        let loader = Loader::new(
            synthetic(3),
            Transform::train(ResizeMode::Keep, 32, 32),
            LoaderConfig::train(4, 9),
        )
        .unwrap();
        let e0 = loader.epoch_indices(0);
        let mut sorted = e0.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..30).collect::<Vec<_>>());
        assert_ne!(e0, loader.epoch_indices(1));
        assert_eq!(e0, loader.epoch_indices(0));
        assert_eq!(loader.batches_per_epoch(), 7);
        let batches: Vec<Batch> = loader.epoch(0).collect::<Result<_, _>>().unwrap();
        assert_eq!(batches.len(), 7);
        assert!(batches
            .iter()
            .all(|b| b.len() == 4 && b.images.len() == 4 * 3 * 32 * 32));
        let served: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
        assert_eq!(served, e0[..28]);
    }

    #[test]
    fn keep_last_and_shards_partition_the_data() {
        let mut config = LoaderConfig::test(8);
        config.world_size = 3;
        let mut seen = Vec::new();
        for rank in 0..3 {
            config.rank = rank;
            let loader = Loader::new(
                synthetic(2),
                Transform::test(ResizeMode::Keep, 32, 32),
                config.clone(),
            )
            .unwrap();
            let shard = loader.epoch_indices(0);
            assert_eq!(shard.len(), 6);
            let batches: Vec<Batch> = loader.epoch(0).collect::<Result<_, _>>().unwrap();
            assert_eq!(batches.iter().map(Batch::len).collect::<Vec<_>>(), vec![6]);
            seen.extend(shard);
        }
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 18);
    }

    #[test]
    fn batches_match_single_image_transforms_and_carry_masks() {
        let dataset = synthetic(1);
        let transform = Transform::train(ResizeMode::Keep, 32, 24);
        let loader = Loader::new(
            dataset.clone(),
            transform.clone(),
            LoaderConfig::train(5, 1),
        )
        .unwrap();
        let batch = loader.epoch(2).next().unwrap().unwrap();
        let masks = batch.masks.as_ref().unwrap();
        for (slot, &index) in batch.indices.iter().enumerate() {
            let mut rng = stream(1, 2, index as u64, b"augment ");
            let geometry = transform.sample_geometry(32, 32, &mut rng);
            let mut expected = vec![0.0; 3 * 24 * 24];
            transform
                .apply(&dataset.load(index).unwrap(), &geometry, &mut expected)
                .unwrap();
            assert_eq!(
                batch.images[slot * 3 * 24 * 24..(slot + 1) * 3 * 24 * 24],
                expected[..]
            );
            assert_eq!(batch.labels[slot] as usize, dataset.label(index));
            let mask = &masks[slot * 24 * 24..(slot + 1) * 24 * 24];
            assert!(mask.iter().all(|&m| m == 0.0 || m == 1.0));
        }
        let t = batch.images_tensor(&Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[5, 3, 24, 24]);
        assert_eq!(batch.labels_tensor(&Device::Cpu).unwrap().dims(), &[5]);
    }

    /// Counts the images decoded, to show that skipped batches are never loaded.
    struct Counting {
        inner: Arc<dyn ImageDataset>,
        loads: std::sync::atomic::AtomicUsize,
    }

    impl ImageDataset for Counting {
        fn len(&self) -> usize {
            self.inner.len()
        }
        fn num_classes(&self) -> usize {
            self.inner.num_classes()
        }
        fn label(&self, index: usize) -> usize {
            self.inner.label(index)
        }
        fn load(&self, index: usize) -> Result<image::RgbImage, DataError> {
            self.loads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.inner.load(index)
        }
    }

    #[test]
    fn epoch_from_continues_bitwise_without_decoding_the_skipped_batches() {
        for prefetch in [0, 2] {
            let counting = Arc::new(Counting {
                inner: synthetic(3),
                loads: Default::default(),
            });
            let config = LoaderConfig {
                prefetch,
                drop_last: false,
                ..LoaderConfig::train(4, 5)
            };
            let loader = Loader::new(
                counting.clone(),
                Transform::train(ResizeMode::Keep, 32, 24),
                config,
            )
            .unwrap();
            let full: Vec<Batch> = loader.epoch(3).collect::<Result<_, _>>().unwrap();
            assert_eq!(full.len(), 8); // 30 images: 7 of 4, then 2
            for first in [0, 1, 5, 7] {
                counting.loads.store(0, std::sync::atomic::Ordering::SeqCst);
                let rest: Vec<Batch> = loader
                    .epoch_from(3, first)
                    .collect::<Result<_, _>>()
                    .unwrap();
                assert_eq!(rest, full[first..], "prefetch {prefetch}, from {first}");
                let decoded: usize = full[first..].iter().map(Batch::len).sum();
                assert_eq!(
                    counting.loads.load(std::sync::atomic::Ordering::SeqCst),
                    decoded,
                    "only the served batches are decoded"
                );
            }
            assert_eq!(loader.epoch_from(3, 8).count(), 0);
            assert_eq!(loader.epoch_from(3, 100).count(), 0);
        }
    }

    #[test]
    fn invalid_configs_are_errors() {
        let t = Transform::train(ResizeMode::Keep, 32, 32);
        let mut c = LoaderConfig::train(0, 0);
        assert!(Loader::new(synthetic(1), t.clone(), c.clone()).is_err());
        c.batch_size = 2;
        c.rank = 1;
        assert!(Loader::new(synthetic(1), t.clone(), c.clone()).is_err());
        c.rank = 0;
        c.threads = Some(0);
        assert!(Loader::new(synthetic(1), t, c).is_err());
    }
}
