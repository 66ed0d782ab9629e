//! Loads every dataset tree of the fixtures (data/fixtures/datasets, or the tree named by
//! SNAPMIX_DATASET_FIXTURES) and checks the counts and unreadable files of its expected.json,
//! and that any object boxes lie inside their images (trees without box files are fine).

use std::path::{Path, PathBuf};

use serde::Deserialize;
use snapmix_data::aircraft::AircraftOptions;
use snapmix_data::{aircraft, cars, cub, folder, ImageDataset, LoadOptions, Splits};

#[derive(Deserialize)]
struct Expected {
    dataset: String,
    root: String,
    classes: usize,
    train: usize,
    test: usize,
    #[serde(default)]
    corrupt: Vec<String>,
    /// Served images (both splits) with an object box, where the tree's expected.json says.
    #[serde(default)]
    boxes: Option<usize>,
}

fn fixtures_dir() -> PathBuf {
    match std::env::var_os("SNAPMIX_DATASET_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/fixtures/datasets"),
    }
}

fn load(kind: &str, root: &Path, options: LoadOptions) -> Splits {
    let result = match kind {
        "cub" => cub::load(root, options),
        "cars" => cars::load(root, options),
        "aircraft" => aircraft::load(
            root,
            AircraftOptions {
                load: options,
                ..Default::default()
            },
        ),
        "folder" => folder::load(root, options),
        other => panic!("expected.json names an unknown dataset {other:?}"),
    };
    result.unwrap_or_else(|e| panic!("{kind} at {}: {e}", root.display()))
}

/// A corrupt entry as a path relative to the dataset root (it may be given with the root's
/// own folder name in front, and with either slash).
fn relative_to_root(corrupt: &str, root_name: &str) -> PathBuf {
    let corrupt = corrupt.replace('\\', "/");
    let trimmed = corrupt
        .strip_prefix(&format!("{root_name}/"))
        .unwrap_or(&corrupt);
    PathBuf::from(trimmed)
}

#[test]
fn every_fixture_dataset_loads_with_the_expected_counts() {
    let dir = fixtures_dir();
    let text = std::fs::read_to_string(dir.join("expected.json"))
        .unwrap_or_else(|e| panic!("{}/expected.json: {e}", dir.display()));
    let expected: Vec<Expected> = serde_json::from_str(&text).expect("expected.json parses");
    assert!(!expected.is_empty());
    for case in expected {
        let root = dir.join(&case.root);
        let what = format!("{} at {}", case.dataset, root.display());
        let options = LoadOptions {
            skip_unreadable: true,
            verify: true,
        };
        let splits = load(&case.dataset, &root, options);
        assert_eq!(splits.class_names().len(), case.classes, "{what}: classes");
        assert_eq!(splits.train.listed(), case.train, "{what}: train");
        assert_eq!(splits.test.listed(), case.test, "{what}: test");

        let skipped: Vec<PathBuf> = [&splits.train, &splits.test]
            .iter()
            .flat_map(|s| s.skipped())
            .map(|s| s.path.strip_prefix(&root).unwrap_or(&s.path).to_path_buf())
            .collect();
        let corrupt: Vec<PathBuf> = case
            .corrupt
            .iter()
            .map(|c| relative_to_root(c, &case.root))
            .collect();
        // Each corrupt entry matches a skipped path (component-wise suffix, so paths given
        // relative to `data/` or to the dataset root both match), and nothing else is skipped.
        assert_eq!(
            skipped.len(),
            corrupt.len(),
            "{what}: skipped {skipped:?}, expected {corrupt:?}"
        );
        for c in &corrupt {
            assert!(
                skipped.iter().any(|s| s.ends_with(c) || c.ends_with(s)),
                "{what}: {} is listed as corrupt but was not skipped (skipped: {skipped:?})",
                c.display()
            );
        }
        assert_eq!(
            splits.train.len() + splits.test.len(),
            case.train + case.test - corrupt.len(),
            "{what}: served images"
        );
        // Every served image decodes, labels are in range, every class has an image, and a
        // box (where there is one) holds pixels of its image.
        for split in [&splits.train, &splits.test] {
            for index in 0..split.len() {
                let image = split.load(index).unwrap_or_else(|e| panic!("{what}: {e}"));
                assert!(image.width() > 0 && image.height() > 0);
                assert!(split.label(index) < case.classes);
                if let Some(b) = split.object_box(index) {
                    assert!(
                        b.row_start < b.row_end
                            && b.col_start < b.col_end
                            && b.row_end <= image.height()
                            && b.col_end <= image.width(),
                        "{what}: box {b:?} of {}x{} image {}",
                        image.height(),
                        image.width(),
                        split.entries()[index].path.display()
                    );
                }
            }
        }
        if let Some(boxes) = case.boxes {
            assert_eq!(
                splits.train.boxed() + splits.test.boxed(),
                boxes,
                "{what}: images with a box"
            );
        }
        let counts = splits.train.class_counts();
        assert_eq!(counts.len(), case.classes);

        // Without skipping, a corrupt file is an error naming it.
        if let Some(first) = corrupt.first() {
            let strict = match case.dataset.as_str() {
                "cub" => cub::load(
                    &root,
                    LoadOptions {
                        verify: true,
                        skip_unreadable: false,
                    },
                )
                .err(),
                "cars" => cars::load(
                    &root,
                    LoadOptions {
                        verify: true,
                        skip_unreadable: false,
                    },
                )
                .err(),
                "aircraft" => aircraft::load(
                    &root,
                    AircraftOptions {
                        load: LoadOptions {
                            verify: true,
                            skip_unreadable: false,
                        },
                        ..Default::default()
                    },
                )
                .err(),
                _ => folder::load(
                    &root,
                    LoadOptions {
                        verify: true,
                        skip_unreadable: false,
                    },
                )
                .err(),
            };
            let message = strict.map(|e| e.to_string()).unwrap_or_default();
            let named = corrupt.iter().any(|c| {
                let name = c.file_name().map(|n| n.to_string_lossy().into_owned());
                name.is_some_and(|name| message.contains(&name))
            });
            assert!(
                named,
                "{what}: strict load should fail naming {} but said {message:?}",
                first.display()
            );
        }
    }
}
