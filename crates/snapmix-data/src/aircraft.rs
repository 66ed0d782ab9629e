//! FGVC-Aircraft 2013b: `data/images_<level>_<split>.txt` lines `<id> <name>` (names contain
//! spaces and '/'), the class order of `variants.txt`/`families.txt`/`manufacturers.txt`, and
//! images `data/images/<id>.jpg`, optionally without their 20-row copyright banner. Object
//! boxes come from `data/images_box.txt` when it is there.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::dataset::{ImageEntry, ImageList, LoadOptions, Splits};
use crate::error::{DataError, Origin};
use crate::object_box::{ListedBox, ObjectBox};
use crate::text::TextLines;

/// The optional box file in `data/`: `<image_id> <xmin> <ymin> <xmax> <ymax>` per line.
const BOX_FILE: &str = "images_box.txt";

/// Rows of the copyright banner at the bottom of every FGVC-Aircraft image.
pub const BANNER_ROWS: u32 = 20;

/// The label granularity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AircraftLevel {
    /// 100 variants (e.g. "Boeing 737-300"): the usual benchmark.
    #[default]
    Variant,
    /// 70 families (e.g. "Boeing 737").
    Family,
    /// 30 manufacturers (e.g. "Boeing").
    Manufacturer,
}

impl AircraftLevel {
    /// The word in the split file names (`images_<word>_<split>.txt`).
    fn split_word(self) -> &'static str {
        match self {
            AircraftLevel::Variant => "variant",
            AircraftLevel::Family => "family",
            AircraftLevel::Manufacturer => "manufacturer",
        }
    }

    /// The class-list file that fixes the label order.
    fn class_file(self) -> &'static str {
        match self {
            AircraftLevel::Variant => "variants.txt",
            AircraftLevel::Family => "families.txt",
            AircraftLevel::Manufacturer => "manufacturers.txt",
        }
    }
}

/// Which official split pair becomes (train, test).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AircraftSplit {
    /// train = trainval, test = test (the official protocol).
    #[default]
    TrainvalTest,
    /// train = train, test = val (for tuning).
    TrainVal,
}

/// Options of the FGVC-Aircraft loader.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AircraftOptions {
    /// Label granularity.
    pub level: AircraftLevel,
    /// Which splits to use.
    pub split: AircraftSplit,
    /// Cut the 20-row copyright banner off the bottom (common practice; off by default, as in
    /// the official protocol).
    pub crop_banner: bool,
    /// File checks.
    pub load: LoadOptions,
}

/// The `data/` folder: `root` itself or `root/data`.
fn resolve_data_dir(root: &Path, first_split: &str) -> Result<PathBuf, DataError> {
    [root.to_path_buf(), root.join("data")]
        .into_iter()
        .find(|dir| dir.join(first_split).is_file())
        .ok_or_else(|| {
            DataError::layout(
                root,
                format!(
                    "no {first_split} here or in data/ (expected fgvc-aircraft-2013b or its data/)"
                ),
            )
        })
}

/// Reads `images_box.txt`: `<image_id> <xmin> <ymin> <xmax> <ymax>`, pixel corners of which the
/// dataset's README says "the top-left pixel of an image has coordinate (1,1)", read as
/// 1-based and inclusive (MATLAB's convention, as the dataset's evaluation code).
fn read_boxes(path: &Path) -> Result<HashMap<String, ListedBox>, DataError> {
    let lines = TextLines::read(path)?;
    let mut boxes: HashMap<String, ListedBox> = HashMap::new();
    for (line, text) in &lines.lines {
        let fields: Vec<&str> = text.split_whitespace().collect();
        let (id, corners) = fields.split_first().unwrap_or((&"", &[]));
        let corners: Vec<f64> = corners
            .iter()
            .map(|v| v.parse::<f64>())
            .collect::<Result<_, _>>()
            .ok()
            .filter(|c: &Vec<f64>| c.len() == 4)
            .ok_or_else(|| {
                DataError::parse(
                    path,
                    *line,
                    "expected `image_id xmin ymin xmax ymax`",
                    text.as_str(),
                )
            })?;
        let bounds =
            ObjectBox::from_one_based_corners(corners[0], corners[1], corners[2], corners[3])
                .map_err(|why| DataError::parse(path, *line, why, text.as_str()))?;
        let listed = ListedBox {
            bounds,
            origin: Origin {
                file: path.to_path_buf(),
                line: *line,
            },
        };
        if let Some(first) = boxes.insert(id.to_string(), listed) {
            return Err(DataError::parse(
                path,
                *line,
                format!("image id already given on line {}", first.origin.line),
                *id,
            ));
        }
    }
    Ok(boxes)
}

/// Loads FGVC-Aircraft from `fgvc-aircraft-2013b` or its `data/` folder. Object boxes are read
/// from `data/images_box.txt` when present (a malformed line is an error naming it); the file
/// covers every image of the dataset, so ids of images outside the two loaded splits are
/// ignored.
pub fn load(root: &Path, options: AircraftOptions) -> Result<Splits, DataError> {
    let (train_name, test_name) = match options.split {
        AircraftSplit::TrainvalTest => ("trainval", "test"),
        AircraftSplit::TrainVal => ("train", "val"),
    };
    let word = options.level.split_word();
    let train_file = format!("images_{word}_{train_name}.txt");
    let data = resolve_data_dir(root, &train_file)?;
    let train_lines = TextLines::read(&data.join(&train_file))?;
    let test_lines = TextLines::read(&data.join(format!("images_{word}_{test_name}.txt")))?;
    let train_pairs = train_lines.key_rest("image_id name")?;
    let test_pairs = test_lines.key_rest("image_id name")?;

    let class_path = data.join(options.level.class_file());
    let class_names: Vec<String> = if class_path.is_file() {
        let lines = TextLines::read(&class_path)?;
        let mut seen = BTreeSet::new();
        for (line, name) in &lines.lines {
            if !seen.insert(name.clone()) {
                return Err(DataError::parse(
                    &class_path,
                    *line,
                    "duplicate class name",
                    name.as_str(),
                ));
            }
        }
        lines.lines.into_iter().map(|(_, name)| name).collect()
    } else {
        // No class list: sorted unique names, and both splits must name the same classes.
        let names_of = |pairs: &[(usize, String, String)]| -> BTreeSet<String> {
            pairs.iter().map(|(_, _, name)| name.clone()).collect()
        };
        let (train_set, test_set) = (names_of(&train_pairs), names_of(&test_pairs));
        for (a, b, a_path, b_path) in [
            (&train_set, &test_set, &train_lines.path, &test_lines.path),
            (&test_set, &train_set, &test_lines.path, &train_lines.path),
        ] {
            if let Some(name) = a.difference(b).next() {
                return Err(DataError::Mismatch {
                    message: format!(
                        "class name (no {} to fix the classes)",
                        class_path.display()
                    ),
                    value: name.clone(),
                    present_in: a_path.clone(),
                    missing_from: b_path.clone(),
                });
            }
        }
        train_set.into_iter().collect()
    };
    let index: HashMap<&str, usize> = class_names
        .iter()
        .enumerate()
        .map(|(i, name)| (name.as_str(), i))
        .collect();

    let box_path = data.join(BOX_FILE);
    let boxes = if box_path.is_file() {
        read_boxes(&box_path)?
    } else {
        HashMap::new()
    };

    let entries = |lines: &TextLines, pairs: &[(usize, String, String)]| {
        pairs
            .iter()
            .map(|(line, id, name)| {
                let label = *index.get(name.as_str()).ok_or_else(|| {
                    DataError::parse(
                        &lines.path,
                        *line,
                        format!("class not in {}", class_path.display()),
                        name.as_str(),
                    )
                })?;
                Ok(ImageEntry {
                    path: data.join("images").join(format!("{id}.jpg")),
                    label,
                    origin: Some(Origin {
                        file: lines.path.clone(),
                        line: *line,
                    }),
                    object_box: boxes.get(id).cloned(),
                })
            })
            .collect::<Result<Vec<_>, DataError>>()
    };
    let train = entries(&train_lines, &train_pairs)?;
    let test = entries(&test_lines, &test_pairs)?;
    let names = Arc::new(class_names);
    let crop = if options.crop_banner { BANNER_ROWS } else { 0 };
    Ok(Splits {
        train: ImageList::new(root, train, names.clone(), options.load, crop)?,
        test: ImageList::new(root, test, names, options.load, crop)?,
    })
}
