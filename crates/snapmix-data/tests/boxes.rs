//! Object boxes of CUB, Stanford Cars and FGVC-Aircraft: one convention (0-based, half-open
//! pixel rows/cols of the decoded image), optional box files, clipping, and errors that name
//! the line.

use std::path::{Path, PathBuf};

use snapmix_data::aircraft::AircraftOptions;
use snapmix_data::{aircraft, cars, cub, ImageDataset, ImageList, LoadOptions, ObjectBox};

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// A PNG of `cols x rows` (the loaders go by content, so it may be named .jpg).
fn png(cols: u32, rows: u32) -> Vec<u8> {
    let image = image::RgbImage::from_pixel(cols, rows, image::Rgb([90, 120, 30]));
    let mut bytes = Vec::new();
    image
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .unwrap();
    bytes
}

fn bx(row_start: u32, row_end: u32, col_start: u32, col_end: u32) -> ObjectBox {
    ObjectBox {
        row_start,
        row_end,
        col_start,
        col_end,
    }
}

const VERIFY: LoadOptions = LoadOptions {
    skip_unreadable: false,
    verify: true,
};

/// The box of the image whose path ends with `name`.
fn box_of(split: &ImageList, name: &str) -> Option<ObjectBox> {
    let index = split
        .entries()
        .iter()
        .position(|e| e.path.ends_with(name))
        .unwrap_or_else(|| panic!("no {name}"));
    split.object_box(index)
}

/// A CUB tree of three images: a.jpg 32x16 and b.jpg 32x8 (cols x rows) for training, c.jpg
/// 6x5 for testing; no bounding_boxes.txt.
fn cub_tree(root: &Path) {
    write(&root.join("classes.txt"), b"1 001.A\n2 002.B\n");
    write(
        &root.join("images.txt"),
        b"1 001.A/a.jpg\n2 001.A/b.jpg\n3 002.B/c.jpg\n",
    );
    write(&root.join("image_class_labels.txt"), b"1 1\n2 1\n3 2\n");
    write(&root.join("train_test_split.txt"), b"1 1\n2 1\n3 0\n");
    write(&root.join("images/001.A/a.jpg"), &png(32, 16));
    write(&root.join("images/001.A/b.jpg"), &png(32, 8));
    write(&root.join("images/002.B/c.jpg"), &png(6, 5));
}

fn cub_error(root: &Path, boxes: &str) -> String {
    write(&root.join("bounding_boxes.txt"), boxes.as_bytes());
    cub::load(root, LoadOptions::default())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_else(|| panic!("{boxes:?} should not load"))
}

#[test]
fn cub_boxes_are_optional_converted_and_clipped() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    cub_tree(root);
    let splits = cub::load(root, LoadOptions::default()).unwrap();
    assert_eq!(splits.train.boxed() + splits.test.boxed(), 0);
    assert_eq!(splits.train.object_box(0), None);

    // CRLF, fractional values, a box running off the right edge, image 3 without a line.
    write(
        &root.join("bounding_boxes.txt"),
        b"1 1.0 2.0 20.0 10.0\r\n2 30.5 0 10 8\r\n\r\n",
    );
    for options in [LoadOptions::default(), VERIFY] {
        // Without verify the image headers give the sizes; with it, the decoded images.
        let splits = cub::load(root, options).unwrap();
        assert_eq!(box_of(&splits.train, "a.jpg"), Some(bx(2, 12, 1, 21)));
        // Columns 30..41 clipped to the 32 columns of b.jpg.
        assert_eq!(box_of(&splits.train, "b.jpg"), Some(bx(0, 8, 30, 32)));
        assert_eq!(box_of(&splits.test, "c.jpg"), None);
        assert_eq!((splits.train.boxed(), splits.test.boxed()), (2, 0));
    }

    // A box wholly outside its image is dropped; the image stays.
    write(
        &root.join("bounding_boxes.txt"),
        b"3 10 10 2 2\n1 0 0 1 1\n",
    );
    let splits = cub::load(root, LoadOptions::default()).unwrap();
    assert_eq!(splits.test.len(), 1);
    assert_eq!(box_of(&splits.test, "c.jpg"), None);
    assert_eq!(box_of(&splits.train, "a.jpg"), Some(bx(0, 1, 0, 1)));
}

#[test]
fn bad_cub_box_lines_name_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    cub_tree(root);
    for (boxes, expected) in [
        ("1 0 0 4 4\n2 0 0 six 5\n", "bounding_boxes.txt:2"),
        ("1 0 0 4 4\n\n2 0 0 4\n", "bounding_boxes.txt:3"),
        (
            "1 0 0 4 4\n9 0 0 1 1\n",
            "bounding_boxes.txt:2: image id not in",
        ),
        ("1 0 0 4 4\n1 0 0 2 2\n", "already given on line 1"),
        ("1 0 0 0 4\n", "width 0"),
        ("x 0 0 1 1\n", "bounding_boxes.txt:1"),
    ] {
        let message = cub_error(root, boxes);
        assert!(message.contains(expected), "{boxes:?}: {message}");
    }
    let message = cub_error(root, "1 0 0 4 4\n2 0 0 six 5\n");
    assert!(message.contains("six"), "{message}");
}

/// An Aircraft tree: trainval 0000001 (40x30 cols x rows), test 0000002 (40x30), and a box file
/// that also lists an image of no loaded split.
fn aircraft_tree(root: &Path, boxes: &str) -> PathBuf {
    let data = root.join("data");
    write(&data.join("variants.txt"), b"A 1\nB/2\n");
    write(&data.join("images_variant_trainval.txt"), b"0000001 A 1\n");
    write(&data.join("images_variant_test.txt"), b"0000002 B/2\n");
    write(&data.join("images/0000001.jpg"), &png(40, 30));
    write(&data.join("images/0000002.jpg"), &png(40, 30));
    write(&data.join("images_box.txt"), boxes.as_bytes());
    data
}

#[test]
fn aircraft_boxes_are_one_based_inclusive_and_follow_the_banner_crop() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    aircraft_tree(
        root,
        "0000001 1 1 40 30\n0000002 2 3 5 28\n0000003 1 1 2 2\n",
    );
    let splits = aircraft::load(root, AircraftOptions::default()).unwrap();
    // (1,1)..(40,30) inclusive is the whole 30x40 image.
    assert_eq!(splits.train.object_box(0), Some(bx(0, 30, 0, 40)));
    assert_eq!(splits.test.object_box(0), Some(bx(2, 28, 1, 5)));

    // Without the 20-row banner the images have 10 rows and the boxes are clipped to them.
    let cropped = aircraft::load(
        root,
        AircraftOptions {
            crop_banner: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(cropped.train.object_box(0), Some(bx(0, 10, 0, 40)));
    assert_eq!(cropped.test.object_box(0), Some(bx(2, 10, 1, 5)));
    assert_eq!(cropped.train.load(0).unwrap().height(), 10);

    // No box file: no boxes.
    std::fs::remove_file(root.join("data/images_box.txt")).unwrap();
    let splits = aircraft::load(root, AircraftOptions::default()).unwrap();
    assert_eq!(splits.train.boxed() + splits.test.boxed(), 0);

    for (boxes, expected) in [
        ("0000001 1 1 40\n", "images_box.txt:1"),
        ("0000001 1 1 40 30\n0000002 9 3 5 28\n", "images_box.txt:2"),
        (
            "0000001 1 1 40 30\n0000001 1 1 4 3\n",
            "already given on line 1",
        ),
    ] {
        aircraft_tree(root, boxes);
        let message = aircraft::load(root, AircraftOptions::default())
            .unwrap_err()
            .to_string();
        assert!(message.contains(expected), "{boxes:?}: {message}");
    }
}

#[test]
fn cars_boxes_come_from_the_annotation_struct() {
    // The fixture's devkit files have bbox_x1..bbox_y2; the images are small, so a box is either
    // inside (clipped) or dropped, and what remains lies in the image.
    let root =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/fixtures/datasets/stanford_cars");
    let splits = cars::load(&root, VERIFY).unwrap();
    for split in [&splits.train, &splits.test] {
        for index in 0..split.len() {
            let image = split.load(index).unwrap();
            let b = split
                .object_box(index)
                .unwrap_or_else(|| panic!("image {index} has no box"));
            assert!(b.row_end <= image.height() && b.col_end <= image.width());
        }
    }
}
