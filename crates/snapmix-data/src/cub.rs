//! CUB-200-2011: `images.txt`, `image_class_labels.txt`, `train_test_split.txt` and
//! `classes.txt` joined by id; labels follow the order of `classes.txt`. Object boxes come from
//! `bounding_boxes.txt` when it is there.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::dataset::{ImageEntry, ImageList, LoadOptions, Splits};
use crate::error::{DataError, Origin};
use crate::object_box::{ListedBox, ObjectBox};
use crate::text::{parse_uint, TextLines};

/// The optional box file: `<image_id> <x> <y> <width> <height>` per line.
const BOX_FILE: &str = "bounding_boxes.txt";

/// Finds the folder holding `images.txt`: `root` itself, or `root/CUB_200_2011`.
fn resolve_root(root: &Path) -> Result<PathBuf, DataError> {
    [root.to_path_buf(), root.join("CUB_200_2011")]
        .into_iter()
        .find(|dir| dir.join("images.txt").is_file())
        .ok_or_else(|| {
            DataError::layout(
                root,
                "no images.txt here or in CUB_200_2011/ (expected the CUB_200_2011 folder)",
            )
        })
}

/// An `id -> (line, value)` map of a two-column file, rejecting duplicate ids.
fn id_map(lines: &TextLines, what: &str) -> Result<HashMap<u64, (usize, String)>, DataError> {
    let mut map = HashMap::new();
    for (line, key, value) in lines.key_rest(what)? {
        let id = parse_uint(&lines.path, line, "id", &key)?;
        if let Some((first, _)) = map.insert(id, (line, value)) {
            return Err(DataError::parse(
                &lines.path,
                line,
                format!("id already given on line {first}"),
                key,
            ));
        }
    }
    Ok(map)
}

/// Reads `bounding_boxes.txt` (`<image_id> <x> <y> <width> <height>`, real numbers, the
/// top-left corner taken as 0-based pixel coordinates) into boxes by image id. Every id must be
/// in images.txt (`image_ids`); images without a line get no box.
fn read_boxes(
    path: &Path,
    image_ids: &HashMap<u64, (usize, String)>,
    images_path: &Path,
) -> Result<HashMap<u64, ListedBox>, DataError> {
    let lines = TextLines::read(path)?;
    let mut boxes = HashMap::new();
    for (line, text) in &lines.lines {
        let fields: Vec<&str> = text.split_whitespace().collect();
        let [id, x, y, width, height] = fields[..] else {
            return Err(DataError::parse(
                path,
                *line,
                "expected `image_id x y width height`",
                text.as_str(),
            ));
        };
        let id_value = parse_uint(path, *line, "image id", id)?;
        if !image_ids.contains_key(&id_value) {
            return Err(DataError::parse(
                path,
                *line,
                format!("image id not in {}", images_path.display()),
                id,
            ));
        }
        let number = |value: &str| {
            value.parse::<f64>().map_err(|_| {
                DataError::parse(
                    path,
                    *line,
                    "expected a number in `x y width height`",
                    value,
                )
            })
        };
        let bounds = ObjectBox::from_corner_and_size(
            number(x)?,
            number(y)?,
            number(width)?,
            number(height)?,
        )
        .map_err(|why| DataError::parse(path, *line, why, text.as_str()))?;
        let listed = ListedBox {
            bounds,
            origin: Origin {
                file: path.to_path_buf(),
                line: *line,
            },
        };
        if let Some(first) = boxes.insert(id_value, listed) {
            return Err(DataError::parse(
                path,
                *line,
                format!("image id already given on line {}", first.origin.line),
                id,
            ));
        }
    }
    Ok(boxes)
}

/// Loads CUB-200-2011 from its root folder (the one containing `images.txt`). Object boxes are
/// read from `bounding_boxes.txt` when present (a malformed line, or an id not in images.txt,
/// is an error naming the line).
pub fn load(root: &Path, options: LoadOptions) -> Result<Splits, DataError> {
    let root = resolve_root(root)?;
    let classes = TextLines::read(&root.join("classes.txt"))?;
    let images = TextLines::read(&root.join("images.txt"))?;
    let labels = TextLines::read(&root.join("image_class_labels.txt"))?;
    let split = TextLines::read(&root.join("train_test_split.txt"))?;

    let mut class_index = HashMap::new();
    let mut class_names = Vec::new();
    for (line, key, name) in classes.key_rest("class_id class_name")? {
        let id = parse_uint(&classes.path, line, "class id", &key)?;
        if class_index.insert(id, class_names.len()).is_some() {
            return Err(DataError::parse(
                &classes.path,
                line,
                "duplicate class id",
                key,
            ));
        }
        class_names.push(name);
    }
    let class_names = Arc::new(class_names);

    let label_of = id_map(&labels, "image_id class_id")?;
    let split_of = id_map(&split, "image_id is_training_image")?;
    let image_ids = id_map(&images, "image_id path")?;
    // Ids present in the label or split file but not in images.txt are as wrong as the reverse.
    for (map, file) in [(&label_of, &labels.path), (&split_of, &split.path)] {
        if let Some(id) = map.keys().find(|id| !image_ids.contains_key(id)) {
            return Err(DataError::Mismatch {
                message: "image id".into(),
                value: id.to_string(),
                present_in: file.clone(),
                missing_from: images.path.clone(),
            });
        }
    }

    let box_path = root.join(BOX_FILE);
    let mut boxes = if box_path.is_file() {
        read_boxes(&box_path, &image_ids, &images.path)?
    } else {
        HashMap::new()
    };

    let mut train = Vec::new();
    let mut test = Vec::new();
    for (line, key, rel_path) in images.key_rest("image_id path")? {
        let id = parse_uint(&images.path, line, "image id", &key)?;
        let missing = |file: &PathBuf| DataError::Mismatch {
            message: "image id".into(),
            value: key.clone(),
            present_in: images.path.clone(),
            missing_from: file.clone(),
        };
        let (label_line, class_id) = label_of.get(&id).ok_or_else(|| missing(&labels.path))?;
        let (split_line, is_train) = split_of.get(&id).ok_or_else(|| missing(&split.path))?;
        let class_id = parse_uint(&labels.path, *label_line, "class id", class_id)?;
        let label = *class_index.get(&class_id).ok_or_else(|| {
            DataError::parse(
                &labels.path,
                *label_line,
                format!("class id not in {}", classes.path.display()),
                class_id.to_string(),
            )
        })?;
        let entry = ImageEntry {
            path: root.join("images").join(&rel_path),
            label,
            origin: Some(Origin {
                file: images.path.clone(),
                line,
            }),
            object_box: boxes.remove(&id),
        };
        match is_train.as_str() {
            "1" => train.push(entry),
            "0" => test.push(entry),
            other => {
                return Err(DataError::parse(
                    &split.path,
                    *split_line,
                    "expected is_training_image 0 or 1",
                    other,
                ))
            }
        }
    }
    Ok(Splits {
        train: ImageList::new(&root, train, class_names.clone(), options, 0)?,
        test: ImageList::new(&root, test, class_names, options, 0)?,
    })
}
