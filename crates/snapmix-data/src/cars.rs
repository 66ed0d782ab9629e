//! Stanford Cars: the devkit's MATLAB files (`annotations` struct arrays, `class_names` cell
//! array) and the `cars_train/`, `cars_test/` image folders. Labels are `class - 1`; object
//! boxes come from the annotations' `bbox_x1..bbox_y2` (1-based, inclusive) when present.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::dataset::{ImageEntry, ImageList, LoadOptions, Splits};
use crate::error::{DataError, Origin};
use crate::mat5::{read_mat5, MatValue};
use crate::object_box::{ListedBox, ObjectBox};

/// The box fields of an annotation: 1-based inclusive pixel corners, per the devkit.
const BOX_FIELDS: [&str; 4] = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"];

/// The first of `candidates` that is a file, or a layout error listing them all.
fn first_file(root: &Path, candidates: &[PathBuf]) -> Result<PathBuf, DataError> {
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            let names: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
            DataError::layout(root, format!("none of {} exists", names.join(", ")))
        })
}

/// The image folder of a split: `root/NAME`, or `root/NAME/NAME` as some mirrors nest it.
fn image_dir(root: &Path, name: &str) -> Result<PathBuf, DataError> {
    let nested = root.join(name).join(name);
    let flat = root.join(name);
    if nested.is_dir() {
        Ok(nested)
    } else if flat.is_dir() {
        Ok(flat)
    } else {
        Err(DataError::layout(root, format!("no {name}/ image folder")))
    }
}

/// The variable `name` of a MAT-file, or an error naming the file and the variables it has.
fn variable(path: &Path, name: &str) -> Result<MatValue, DataError> {
    let vars = read_mat5(path)?;
    let names: Vec<String> = vars.iter().map(|(n, _)| n.clone()).collect();
    vars.into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v)
        .ok_or_else(|| DataError::Mat {
            path: path.to_path_buf(),
            message: format!("has no variable {name:?} (it has {names:?})"),
        })
}

/// Reads the class names from `cars_meta.mat`.
fn class_names(path: &Path) -> Result<Vec<String>, DataError> {
    let bad = |message: String| DataError::Mat {
        path: path.to_path_buf(),
        message,
    };
    match variable(path, "class_names")? {
        MatValue::Cell { items, .. } => items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                item.as_string()
                    .map(|s| s.trim().to_string())
                    .ok_or_else(|| bad(format!("class_names{{{}}} is a {}", i + 1, item.kind())))
            })
            .collect(),
        other => Err(bad(format!(
            "class_names is a {}, not a cell array",
            other.kind()
        ))),
    }
}

/// Reads one annotation file into entries whose images live in `images`.
fn annotations(
    path: &Path,
    images: &Path,
    num_classes: usize,
) -> Result<Vec<ImageEntry>, DataError> {
    let bad = |message: String| DataError::Mat {
        path: path.to_path_buf(),
        message,
    };
    let annos = variable(path, "annotations")?;
    let (count, with_boxes) = match &annos {
        MatValue::Struct { items, fields, .. } => {
            for needed in ["class", "fname"] {
                if !fields.iter().any(|f| f == needed) {
                    return Err(bad(format!(
                        "annotations has no field {needed:?} (fields: {fields:?}); \
                         the test split needs cars_test_annos_withlabels.mat"
                    )));
                }
            }
            let box_fields = BOX_FIELDS
                .iter()
                .filter(|f| fields.iter().any(|name| name == *f))
                .count();
            if box_fields != 0 && box_fields != BOX_FIELDS.len() {
                return Err(bad(format!(
                    "annotations has only some of the box fields {BOX_FIELDS:?} (fields: {fields:?})"
                )));
            }
            (items.len(), box_fields == BOX_FIELDS.len())
        }
        other => {
            return Err(bad(format!(
                "annotations is a {}, not a struct array",
                other.kind()
            )))
        }
    };
    (0..count)
        .map(|i| {
            let class = annos.field(i, "class").and_then(MatValue::as_scalar);
            let fname = annos.field(i, "fname").and_then(MatValue::as_string);
            let (Some(class), Some(fname)) = (class, fname) else {
                return Err(bad(format!(
                    "annotations({}) lacks a scalar class or a string fname",
                    i + 1
                )));
            };
            if class.fract() != 0.0 || class < 1.0 || class > num_classes as f64 {
                return Err(bad(format!(
                    "annotations({}).class = {class} is not in 1..={num_classes}",
                    i + 1
                )));
            }
            let origin = Origin {
                file: path.to_path_buf(),
                line: i + 1,
            };
            let object_box = if with_boxes {
                let corner = |field: &str| {
                    annos
                        .field(i, field)
                        .and_then(MatValue::as_scalar)
                        .ok_or_else(|| {
                            bad(format!("annotations({}).{field} is not a number", i + 1))
                        })
                };
                let bounds = ObjectBox::from_one_based_corners(
                    corner("bbox_x1")?,
                    corner("bbox_y1")?,
                    corner("bbox_x2")?,
                    corner("bbox_y2")?,
                )
                .map_err(|why| bad(format!("annotations({}) box: {why}", i + 1)))?;
                Some(ListedBox {
                    bounds,
                    origin: origin.clone(),
                })
            } else {
                None
            };
            Ok(ImageEntry {
                path: images.join(fname.trim()),
                label: class as usize - 1,
                origin: Some(origin),
                object_box,
            })
        })
        .collect()
}

/// Loads Stanford Cars from its root (the folder holding `devkit/`, `cars_train/`,
/// `cars_test/`). The labelled test annotations may sit in `devkit/` or at the root. Object
/// boxes come from the annotations' `bbox_x1..bbox_y2` when the struct has them.
pub fn load(root: &Path, options: LoadOptions) -> Result<Splits, DataError> {
    let devkit = root.join("devkit");
    let meta = first_file(
        root,
        &[devkit.join("cars_meta.mat"), root.join("cars_meta.mat")],
    )?;
    let train_annos = first_file(
        root,
        &[
            devkit.join("cars_train_annos.mat"),
            root.join("cars_train_annos.mat"),
        ],
    )?;
    let test_annos = first_file(
        root,
        &[
            devkit.join("cars_test_annos_withlabels.mat"),
            root.join("cars_test_annos_withlabels.mat"),
        ],
    )?;
    let names = Arc::new(class_names(&meta)?);
    let train = annotations(&train_annos, &image_dir(root, "cars_train")?, names.len())?;
    let test = annotations(&test_annos, &image_dir(root, "cars_test")?, names.len())?;
    Ok(Splits {
        train: ImageList::new(root, train, names.clone(), options, 0)?,
        test: ImageList::new(root, test, names, options, 0)?,
    })
}
