//! Image folders for users' own data: `root/<class>/<image>`, or `root/train/<class>/...` with
//! `root/test/` (or `root/val/`). Classes are the sorted folder names; files are sorted too.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::dataset::{ImageEntry, ImageList, LoadOptions, Splits};
use crate::error::DataError;

/// File extensions taken as images (case-insensitive).
const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// Sorted visible entries of `dir` for which `keep` holds.
fn sorted_entries(dir: &Path, keep: impl Fn(&Path) -> bool) -> Result<Vec<PathBuf>, DataError> {
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let path = entry.map_err(|e| DataError::io(dir, e))?.path();
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_none_or(|n| n.starts_with('.'));
        if !hidden && keep(&path) {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}

fn is_image(path: &Path) -> bool {
    path.is_file()
        && path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn class_dirs(dir: &Path) -> Result<Vec<String>, DataError> {
    Ok(sorted_entries(dir, Path::is_dir)?
        .iter()
        .filter_map(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_string))
        .collect())
}

fn entries(dir: &Path, class_names: &[String]) -> Result<Vec<ImageEntry>, DataError> {
    let mut entries = Vec::new();
    for (label, class) in class_names.iter().enumerate() {
        let class_dir = dir.join(class);
        if !class_dir.is_dir() {
            continue;
        }
        for path in sorted_entries(&class_dir, is_image)? {
            entries.push(ImageEntry {
                path,
                label,
                origin: None,
                object_box: None,
            });
        }
    }
    Ok(entries)
}

/// Loads an image folder. With `root/train/` present, it is the training split and
/// `root/test/` (else `root/val/`) the test split, classes being the union of both; otherwise
/// every class folder of `root` is training data and the test split is empty.
pub fn load(root: &Path, options: LoadOptions) -> Result<Splits, DataError> {
    if !root.is_dir() {
        return Err(DataError::layout(root, "not a directory"));
    }
    let train_dir = root.join("train");
    let (train_dir, test_dir) = if train_dir.is_dir() {
        let test = [root.join("test"), root.join("val")]
            .into_iter()
            .find(|d| d.is_dir());
        (train_dir, test)
    } else {
        (root.to_path_buf(), None)
    };
    let mut names: BTreeSet<String> = class_dirs(&train_dir)?.into_iter().collect();
    if let Some(test_dir) = &test_dir {
        names.extend(class_dirs(test_dir)?);
    }
    if names.is_empty() {
        return Err(DataError::layout(
            root,
            "no class folders (expected root/<class>/<image> or root/train/<class>/<image>)",
        ));
    }
    let names: Vec<String> = names.into_iter().collect();
    let train = entries(&train_dir, &names)?;
    let test = match &test_dir {
        Some(dir) => entries(dir, &names)?,
        None => Vec::new(),
    };
    let names = Arc::new(names);
    Ok(Splits {
        train: ImageList::new(root, train, names.clone(), options, 0)?,
        test: ImageList::new(root, test, names, options, 0)?,
    })
}
