//! The built-in synthetic fine-grained set: every image is the same kind of cluttered scene;
//! only a small black-and-white part, placed at a random position, tells the classes apart
//! (as a beak or a wing bar does for birds). Each image is rendered on demand from
//! (seed, split, index), so the set has any size at no memory cost, and comes with its
//! ground-truth part mask.

use candle_core::{Device, Tensor};
use image::{GrayImage, Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::dataset::ImageDataset;
use crate::error::DataError;

/// Cells per side of a class's part pattern.
pub const PART_CELLS: usize = 4;

/// Settings of the synthetic set. The defaults make a 10-class, 64x64 problem that a small
/// ResNet trained from scratch learns on CPU in minutes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntheticConfig {
    /// Number of classes (at most [`max_classes`]).
    pub classes: usize,
    /// Training images per class.
    pub train_per_class: usize,
    /// Test images per class.
    pub test_per_class: usize,
    /// Image side in pixels (images are square).
    pub size: usize,
    /// Seed of every random choice (backgrounds, positions, colours).
    pub seed: u64,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self {
            classes: 10,
            train_per_class: 100,
            test_per_class: 50,
            size: 64,
            seed: 0,
        }
    }
}

impl SyntheticConfig {
    /// Side of one pattern cell in pixels: 3 at 64x64, so the part is 12x12 (3.5% of the image).
    pub fn cell_px(&self) -> usize {
        (self.size * 3 / 64).max(1)
    }

    /// Side of the part in pixels.
    pub fn part_px(&self) -> usize {
        self.cell_px() * PART_CELLS
    }

    /// Checks that the classes fit and the part fits in the image.
    pub fn validate(&self) -> Result<(), DataError> {
        if self.classes < 2 || self.classes > max_classes() {
            return Err(DataError::config(
                "classes",
                self.classes,
                format!("the synthetic set has 2..={} classes", max_classes()),
            ));
        }
        if self.size < 8 {
            return Err(DataError::config("size", self.size, "at least 8 pixels"));
        }
        Ok(())
    }
}

/// Which half of the synthetic set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Training images.
    Train,
    /// Test images (rendered from a different stream, so never a copy of a training image).
    Test,
}

/// Where the part sits in an image (pixels; the part is a square).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartBox {
    /// First row.
    pub top: usize,
    /// First column.
    pub left: usize,
    /// Side length.
    pub side: usize,
}

/// One rendered image with its label and ground truth.
#[derive(Debug, Clone)]
pub struct SyntheticSample {
    /// The RGB image.
    pub image: RgbImage,
    /// The class.
    pub label: usize,
    /// Where the part is.
    pub part: PartBox,
    /// 255 on the part, 0 elsewhere.
    pub mask: GrayImage,
}

/// A left-right symmetric 4x4 pattern is fixed by its left two columns: 8 bits, bit
/// `row * 2 + col`. Symmetric patterns keep their class under horizontal flips.
fn pattern_cell(code: u8, row: usize, col: usize) -> bool {
    let col = if col < PART_CELLS / 2 {
        col
    } else {
        PART_CELLS - 1 - col
    };
    code >> (row * 2 + col) & 1 == 1
}

/// The class codes: greedily chosen 8-bit codes with 2..=6 bits set and pairwise Hamming
/// distance at least 3 (6 of the 16 cells differ between any two classes). Fixed, not seeded:
/// a class looks the same in every run.
fn class_codes() -> Vec<u8> {
    let mut codes: Vec<u8> = Vec::new();
    for code in 0..=255u8 {
        let ones = code.count_ones();
        if (2..=6).contains(&ones) && codes.iter().all(|c| (c ^ code).count_ones() >= 3) {
            codes.push(code);
        }
    }
    codes
}

/// The most classes the synthetic set can have.
pub fn max_classes() -> usize {
    class_codes().len()
}

/// One split of the synthetic set, rendered on demand.
#[derive(Debug, Clone)]
pub struct SyntheticSet {
    config: SyntheticConfig,
    split: Split,
    codes: Vec<u8>,
}

impl SyntheticSet {
    /// One split of the set described by `config`.
    pub fn new(config: &SyntheticConfig, split: Split) -> Result<Self, DataError> {
        config.validate()?;
        let mut codes = class_codes();
        codes.truncate(config.classes);
        Ok(Self {
            config: config.clone(),
            split,
            codes,
        })
    }

    /// Both splits: (train, test).
    pub fn splits(config: &SyntheticConfig) -> Result<(Self, Self), DataError> {
        Ok((
            Self::new(config, Split::Train)?,
            Self::new(config, Split::Test)?,
        ))
    }

    /// The configuration.
    pub fn config(&self) -> &SyntheticConfig {
        &self.config
    }

    /// Class names: "part-<code>" with the pattern's code in hex.
    pub fn class_names(&self) -> Vec<String> {
        self.codes.iter().map(|c| format!("part-{c:02x}")).collect()
    }

    fn per_class(&self) -> usize {
        match self.split {
            Split::Train => self.config.train_per_class,
            Split::Test => self.config.test_per_class,
        }
    }

    /// The random stream of image `index`: independent of every other image.
    fn rng(&self, index: usize) -> ChaCha8Rng {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&self.config.seed.to_le_bytes());
        key[8..16].copy_from_slice(&(index as u64).to_le_bytes());
        key[16] = match self.split {
            Split::Train => 1,
            Split::Test => 2,
        };
        key[24..].copy_from_slice(b"synthfg1");
        ChaCha8Rng::from_seed(key)
    }

    /// Renders image `index` (labels cycle through the classes: index % classes).
    pub fn sample(&self, index: usize) -> SyntheticSample {
        let size = self.config.size;
        let label = index % self.codes.len();
        let mut rng = self.rng(index);
        let mut image = render_clutter(size, &mut rng);
        let part_px = self.config.part_px().min(size);
        let part = PartBox {
            top: rng.random_range(0..=size - part_px),
            left: rng.random_range(0..=size - part_px),
            side: part_px,
        };
        draw_part(
            &mut image,
            self.codes[label],
            part,
            self.config.cell_px(),
            &mut rng,
        );
        let mut mask = GrayImage::new(size as u32, size as u32);
        for row in part.top..part.top + part.side {
            for col in part.left..part.left + part.side {
                mask.put_pixel(col as u32, row as u32, image::Luma([255]));
            }
        }
        SyntheticSample {
            image,
            label,
            part,
            mask,
        }
    }
}

/// A gradient base, overlapping mid-tone rectangles and discs, and pixel noise: a busy scene
/// drawn from one distribution for every class. Colours stay within 50..=205 so the part's
/// near-black and near-white cells are never matched exactly by the clutter.
fn render_clutter(size: usize, rng: &mut ChaCha8Rng) -> RgbImage {
    let colour = |rng: &mut ChaCha8Rng| -> [f32; 3] {
        std::array::from_fn(|_| rng.random_range(50.0..=205.0f32))
    };
    let (top, bottom) = (colour(rng), colour(rng));
    let mut pixels: Vec<[f32; 3]> = (0..size * size)
        .map(|i| {
            let t = (i / size) as f32 / size as f32;
            std::array::from_fn(|c| top[c] * (1.0 - t) + bottom[c] * t)
        })
        .collect();
    let shapes = rng.random_range(10..=18);
    for _ in 0..shapes {
        let fill = colour(rng);
        let extent = rng.random_range(size / 10..=size / 3).max(2);
        let (r0, c0) = (rng.random_range(0..size), rng.random_range(0..size));
        let disc = rng.random_bool(0.5);
        for row in r0.saturating_sub(extent / 2)..(r0 + extent / 2).min(size) {
            for col in c0.saturating_sub(extent / 2)..(c0 + extent / 2).min(size) {
                let (dr, dc) = (row as f32 - r0 as f32, col as f32 - c0 as f32);
                if !disc || dr * dr + dc * dc <= (extent * extent / 4) as f32 {
                    pixels[row * size + col] = fill;
                }
            }
        }
    }
    RgbImage::from_fn(size as u32, size as u32, |col, row| {
        let p = pixels[row as usize * size + col as usize];
        Rgb(std::array::from_fn(|c| {
            (p[c] + rng.random_range(-12.0..=12.0f32)).clamp(50.0, 205.0) as u8
        }))
    })
}

/// Draws the class pattern: near-black "on" cells and near-white "off" cells.
fn draw_part(image: &mut RgbImage, code: u8, part: PartBox, cell_px: usize, rng: &mut ChaCha8Rng) {
    let dark: [u8; 3] = std::array::from_fn(|_| rng.random_range(0..=30));
    let light: [u8; 3] = std::array::from_fn(|_| rng.random_range(225..=255));
    for row in 0..part.side {
        for col in 0..part.side {
            let on = pattern_cell(
                code,
                (row / cell_px).min(PART_CELLS - 1),
                (col / cell_px).min(PART_CELLS - 1),
            );
            let pixel = if on { dark } else { light };
            image.put_pixel(
                (part.left + col) as u32,
                (part.top + row) as u32,
                Rgb(pixel),
            );
        }
    }
}

impl SyntheticSet {
    /// The whole split as tensors, rendered in parallel: images `[len, 3, size, size]` f32 in
    /// [0, 1] (not normalised, as candle's vision datasets) and labels `[len]` u8.
    pub fn to_tensors(&self, device: &Device) -> Result<(Tensor, Tensor), DataError> {
        let size = self.config.size;
        let plane = size * size;
        let mut images = vec![0f32; self.len() * 3 * plane];
        images
            .par_chunks_mut(3 * plane)
            .enumerate()
            .for_each(|(index, out)| {
                let sample = self.sample(index);
                for (i, pixel) in sample.image.pixels().enumerate() {
                    for c in 0..3 {
                        out[c * plane + i] = f32::from(pixel[c]) / 255.0;
                    }
                }
            });
        let labels: Vec<u8> = (0..self.len()).map(|i| self.label(i) as u8).collect();
        Ok((
            Tensor::from_vec(images, (self.len(), 3, size, size), device)?,
            Tensor::from_vec(labels, self.len(), device)?,
        ))
    }
}

impl ImageDataset for SyntheticSet {
    fn len(&self) -> usize {
        self.per_class() * self.codes.len()
    }

    fn num_classes(&self) -> usize {
        self.codes.len()
    }

    fn label(&self, index: usize) -> usize {
        index % self.codes.len()
    }

    fn load(&self, index: usize) -> Result<RgbImage, DataError> {
        Ok(self.sample(index).image)
    }

    fn part_mask(&self, index: usize) -> Option<GrayImage> {
        Some(self.sample(index).mask)
    }

    fn has_part_masks(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_classes_fit_and_patterns_are_far_apart_and_flip_symmetric() {
        let codes = class_codes();
        assert!(codes.len() >= 10, "{} codes", codes.len());
        for (i, a) in codes.iter().enumerate() {
            for b in &codes[i + 1..] {
                assert!((a ^ b).count_ones() >= 3);
            }
            for row in 0..PART_CELLS {
                for col in 0..PART_CELLS {
                    assert_eq!(
                        pattern_cell(*a, row, col),
                        pattern_cell(*a, row, PART_CELLS - 1 - col)
                    );
                }
            }
        }
    }

    #[test]
    fn rendering_is_deterministic_and_seed_and_split_dependent() {
        let config = SyntheticConfig {
            train_per_class: 2,
            test_per_class: 2,
            ..Default::default()
        };
        let (train, test) = SyntheticSet::splits(&config).unwrap();
        assert_eq!(train.len(), 20);
        let a = train.sample(7);
        assert_eq!(a.image, train.sample(7).image);
        assert_eq!(a.label, 7);
        assert_ne!(a.image, test.sample(7).image);
        let other =
            SyntheticSet::new(&SyntheticConfig { seed: 1, ..config }, Split::Train).unwrap();
        assert_ne!(a.image, other.sample(7).image);
    }

    #[test]
    fn the_mask_covers_exactly_the_part_which_is_small() {
        let config = SyntheticConfig::default();
        let set = SyntheticSet::new(&config, Split::Train).unwrap();
        for index in 0..30 {
            let s = set.sample(index);
            assert_eq!(s.part.side, 12);
            let inside = s.mask.as_raw().iter().filter(|&&m| m == 255).count();
            assert_eq!(inside, 144);
            assert!((inside as f32) < 0.05 * 64.0 * 64.0);
            // Part pixels are near black or near white; clutter never is.
            for (i, (&m, p)) in s.mask.as_raw().iter().zip(s.image.pixels()).enumerate() {
                let extreme = p.0.iter().all(|&v| v <= 30) || p.0.iter().all(|&v| v >= 225);
                assert_eq!(m == 255, extreme, "pixel {i} of image {index}");
            }
        }
    }

    #[test]
    fn two_classes_differ_only_inside_the_part() {
        // Same seed stream position: render the part of class 0 and class 1 on one background.
        let config = SyntheticConfig::default();
        let set = SyntheticSet::new(&config, Split::Train).unwrap();
        let s = set.sample(0);
        let mut image = s.image.clone();
        draw_part(
            &mut image,
            set.codes[1],
            s.part,
            config.cell_px(),
            &mut set.rng(0),
        );
        let differing: Vec<usize> = (0..64 * 64)
            .filter(|&i| image.as_raw()[i * 3..i * 3 + 3] != s.image.as_raw()[i * 3..i * 3 + 3])
            .collect();
        assert!(!differing.is_empty());
        assert!(differing.iter().all(|&i| s.mask.as_raw()[i] == 255));
    }

    #[test]
    fn tensors_hold_the_rendered_images() {
        let config = SyntheticConfig {
            train_per_class: 1,
            size: 16,
            ..Default::default()
        };
        let set = SyntheticSet::new(&config, Split::Train).unwrap();
        let (images, labels) = set.to_tensors(&Device::Cpu).unwrap();
        assert_eq!(images.dims(), &[10, 3, 16, 16]);
        assert_eq!(
            labels.to_vec1::<u8>().unwrap(),
            (0..10).collect::<Vec<u8>>()
        );
        let pixel = set.sample(3).image.get_pixel(5, 2).0;
        let green = images
            .get(3)
            .unwrap()
            .get(1)
            .unwrap()
            .get(2)
            .unwrap()
            .get(5)
            .unwrap();
        assert_eq!(
            green.to_scalar::<f32>().unwrap(),
            f32::from(pixel[1]) / 255.0
        );
    }

    #[test]
    fn bad_configs_are_rejected() {
        let too_many = SyntheticConfig {
            classes: max_classes() + 1,
            ..Default::default()
        };
        assert!(SyntheticSet::new(&too_many, Split::Train).is_err());
        let tiny = SyntheticConfig {
            size: 4,
            ..Default::default()
        };
        assert!(SyntheticSet::new(&tiny, Split::Train).is_err());
    }
}
