//! What every dataset offers the loader (`ImageDataset`), and the file-backed split shared by
//! CUB, Cars, Aircraft and image folders (`ImageList`), with its checks for unreadable files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::{GrayImage, RgbImage};
use rayon::prelude::*;

use crate::decode::{decode_rgb, image_dimensions};
use crate::error::{DataError, Origin};
use crate::object_box::{ListedBox, ObjectBox};

/// A labelled image collection the loader can draw from by index. Implemented by the file-backed
/// [`ImageList`] and the in-memory [`crate::synthetic::SyntheticSet`].
pub trait ImageDataset: Send + Sync {
    /// Number of images.
    fn len(&self) -> usize;
    /// True when there are no images.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Number of classes (labels are `0..num_classes`).
    fn num_classes(&self) -> usize;
    /// The label of image `index`.
    fn label(&self, index: usize) -> usize;
    /// Decodes image `index` to RGB. Fails naming the file (and the line that listed it).
    fn load(&self, index: usize) -> Result<RgbImage, DataError>;
    /// The ground-truth mask of the discriminative part (255 inside), where the dataset has one.
    fn part_mask(&self, _index: usize) -> Option<GrayImage> {
        None
    }
    /// True when [`ImageDataset::part_mask`] returns masks, so the loader carries them.
    fn has_part_masks(&self) -> bool {
        false
    }
    /// The annotated object box of image `index` (see [`ObjectBox`] for the convention), where
    /// the dataset ships one. Loaded when present, not used by the loader.
    fn object_box(&self, _index: usize) -> Option<ObjectBox> {
        None
    }
}

/// How thoroughly image files are checked when a split is built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Skip images that are missing or fail the check (counted in [`ImageList::skipped`] and
    /// reported once on stderr) instead of failing.
    pub skip_unreadable: bool,
    /// Decode every image fully when the split is built (in parallel). Without it only
    /// existence and a non-zero size are checked, and a corrupt file fails later, in the loader,
    /// with an error naming it.
    pub verify: bool,
}

/// One image of a file-backed split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageEntry {
    /// Path of the image file.
    pub path: PathBuf,
    /// Class index.
    pub label: usize,
    /// The split-file line that listed it (None for image folders).
    pub origin: Option<Origin>,
    /// The object's bounding box, where the dataset has a box file (None otherwise).
    pub object_box: Option<ListedBox>,
}

/// An image that was skipped because it could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The image path.
    pub path: PathBuf,
    /// The split-file line that listed it.
    pub origin: Option<Origin>,
    /// Why it was skipped.
    pub reason: String,
}

/// A split (train or test) of a dataset stored as image files.
#[derive(Debug, Clone)]
pub struct ImageList {
    root: PathBuf,
    entries: Vec<ImageEntry>,
    class_names: Arc<Vec<String>>,
    listed: usize,
    skipped: Vec<Skipped>,
    crop_bottom_rows: u32,
}

/// The train and test splits of a dataset, sharing one class list.
#[derive(Debug, Clone)]
pub struct Splits {
    /// The training split.
    pub train: ImageList,
    /// The test split.
    pub test: ImageList,
}

impl Splits {
    /// Class names, index = label.
    pub fn class_names(&self) -> &[String] {
        self.train.class_names()
    }
}

impl ImageList {
    /// Builds a split from listed entries, checking each file as `options` says. `root` is the
    /// dataset root (paths in [`Skipped`] and reports are shown relative to it);
    /// `crop_bottom_rows` rows are cut from the bottom of every decoded image (FGVC-Aircraft's
    /// copyright banner).
    ///
    /// An entry with an object box also has its image header read (when not fully decoded),
    /// and the box is clipped to the image as decoded; a box wholly outside its image is
    /// dropped (the image is kept, without a box) and reported once on stderr.
    pub fn new(
        root: &Path,
        entries: Vec<ImageEntry>,
        class_names: Arc<Vec<String>>,
        options: LoadOptions,
        crop_bottom_rows: u32,
    ) -> Result<Self, DataError> {
        if let Some(bad) = entries.iter().find(|e| e.label >= class_names.len()) {
            return Err(DataError::config(
                "label",
                bad.label,
                format!(
                    "{} has a label outside the {} classes",
                    bad.path.display(),
                    class_names.len()
                ),
            ));
        }
        let listed = entries.len();
        let checks: Vec<Result<Option<(u32, u32)>, String>> = entries
            .par_iter()
            .map(|entry| {
                check_image(
                    &entry.path,
                    options.verify,
                    entry.object_box.is_some(),
                    crop_bottom_rows,
                )
            })
            .collect();
        let mut kept = Vec::with_capacity(entries.len());
        let mut skipped = Vec::new();
        let mut dropped_boxes: Vec<(ListedBox, PathBuf, (u32, u32))> = Vec::new();
        for (mut entry, check) in entries.into_iter().zip(checks) {
            match check {
                Ok(size) => {
                    if let (Some(listed), Some((rows, cols))) = (entry.object_box.take(), size) {
                        match listed.bounds.clip(rows, cols) {
                            Some(bounds) => {
                                entry.object_box = Some(ListedBox { bounds, ..listed });
                            }
                            None => dropped_boxes.push((listed, entry.path.clone(), (rows, cols))),
                        }
                    }
                    kept.push(entry);
                }
                Err(reason) if options.skip_unreadable => skipped.push(Skipped {
                    path: entry.path,
                    origin: entry.origin,
                    reason,
                }),
                Err(reason) => {
                    return Err(DataError::Image {
                        path: entry.path,
                        origin: entry.origin,
                        reason,
                    })
                }
            }
        }
        if let Some((listed, path, (rows, cols))) = dropped_boxes.first() {
            eprintln!(
                "snapmix-data: dropped {} object box(es) lying wholly outside their image under {} \
                 (first: {} {:?} outside the {rows}x{cols} image {})",
                dropped_boxes.len(),
                root.display(),
                listed.origin,
                listed.bounds,
                path.display()
            );
        }
        if let Some(first) = skipped.first() {
            eprintln!(
                "snapmix-data: skipped {} unreadable image(s) of {} listed under {} (first: {}: {})",
                skipped.len(),
                listed,
                root.display(),
                first.path.display(),
                first.reason
            );
        }
        Ok(Self {
            root: root.to_path_buf(),
            entries: kept,
            class_names,
            listed,
            skipped,
            crop_bottom_rows,
        })
    }

    /// The dataset root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The images that will be served, in listing order.
    pub fn entries(&self) -> &[ImageEntry] {
        &self.entries
    }

    /// Class names, index = label.
    pub fn class_names(&self) -> &[String] {
        &self.class_names
    }

    /// How many images the split files listed (served + skipped).
    pub fn listed(&self) -> usize {
        self.listed
    }

    /// Images skipped as unreadable (only with `skip_unreadable`).
    pub fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }

    /// Number of served images that have an object box.
    pub fn boxed(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| e.object_box.is_some())
            .count()
    }

    /// Number of images per class, index = label.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.class_names.len()];
        for entry in &self.entries {
            counts[entry.label] += 1;
        }
        counts
    }
}

/// Reads (and with `verify`, decodes) one image file; the error is the reason. With `verify`
/// or `need_size`, returns the (rows, cols) the image has once decoded and cropped.
fn check_image(
    path: &Path,
    verify: bool,
    need_size: bool,
    crop_bottom_rows: u32,
) -> Result<Option<(u32, u32)>, String> {
    if verify {
        let image = load_image(path, crop_bottom_rows)?;
        return Ok(Some((image.height(), image.width())));
    }
    match std::fs::metadata(path) {
        Ok(meta) if !meta.is_file() => Err("not a regular file".to_string()),
        Ok(meta) if meta.len() == 0 => Err("empty file".to_string()),
        Ok(_) if need_size => header_size(path, crop_bottom_rows).map(Some),
        Ok(_) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// (rows, cols) of an image from its header, less the cropped rows. Reads a prefix first (the
/// header is usually within it) and the whole file only when that is not enough.
fn header_size(path: &Path, crop_bottom_rows: u32) -> Result<(u32, u32), String> {
    use std::io::Read;
    const PREFIX: u64 = 64 * 1024;
    let mut prefix = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(PREFIX).read_to_end(&mut prefix))
        .map_err(|e| e.to_string())?;
    let (rows, cols) = match image_dimensions(&prefix) {
        Ok(size) => size,
        Err(_) if prefix.len() as u64 == PREFIX => {
            image_dimensions(&std::fs::read(path).map_err(|e| e.to_string())?)?
        }
        Err(e) => return Err(e),
    };
    let (rows, cols) = (rows as u32, cols as u32);
    if rows <= crop_bottom_rows {
        return Err(format!(
            "{rows} rows, too few to crop a {crop_bottom_rows}-row banner"
        ));
    }
    Ok((rows - crop_bottom_rows, cols))
}

/// Reads and decodes one image file, cutting `crop_bottom_rows` rows off the bottom.
fn load_image(path: &Path, crop_bottom_rows: u32) -> Result<RgbImage, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let image = decode_rgb(&bytes)?;
    if crop_bottom_rows == 0 {
        return Ok(image);
    }
    let (cols, rows) = image.dimensions();
    if rows <= crop_bottom_rows {
        return Err(format!(
            "{rows} rows, too few to crop a {crop_bottom_rows}-row banner"
        ));
    }
    Ok(image::imageops::crop_imm(&image, 0, 0, cols, rows - crop_bottom_rows).to_image())
}

impl ImageDataset for ImageList {
    fn len(&self) -> usize {
        self.entries.len()
    }

    fn num_classes(&self) -> usize {
        self.class_names.len()
    }

    fn label(&self, index: usize) -> usize {
        self.entries[index].label
    }

    fn object_box(&self, index: usize) -> Option<ObjectBox> {
        self.entries[index].object_box.as_ref().map(|b| b.bounds)
    }

    fn load(&self, index: usize) -> Result<RgbImage, DataError> {
        let entry = &self.entries[index];
        load_image(&entry.path, self.crop_bottom_rows).map_err(|reason| DataError::Image {
            path: entry.path.clone(),
            origin: entry.origin.clone(),
            reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_size_reads_past_a_long_prefix_and_subtracts_the_banner() {
        let gray = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/gray.jpg"))
            .unwrap();
        // Two 60 KB comment segments after the start-of-image marker push the frame header
        // past the first read.
        let mut padded = gray[..2].to_vec();
        for _ in 0..2 {
            let len: u16 = 60_000;
            padded.extend_from_slice(&[0xff, 0xfe]);
            padded.extend_from_slice(&len.to_be_bytes());
            padded.extend(std::iter::repeat_n(b'x', usize::from(len) - 2));
        }
        padded.extend_from_slice(&gray[2..]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("padded.jpg");
        std::fs::write(&path, &padded).unwrap();
        assert_eq!(header_size(&path, 0), Ok((8, 32)));
        assert_eq!(header_size(&path, 3), Ok((5, 32)));
        assert!(header_size(&path, 8).is_err());
        // The padded file decodes to the same size.
        let image = load_image(&path, 0).unwrap();
        assert_eq!((image.height(), image.width()), (8, 32));
    }
}
