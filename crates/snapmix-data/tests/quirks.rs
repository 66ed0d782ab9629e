//! Real-world file quirks on generated dataset trees: CRLF and trailing blank lines, grayscale,
//! CMYK and PNG images (named .jpg), missing and corrupt files, SciPy-written MAT files.

use std::path::{Path, PathBuf};

use snapmix_data::aircraft::{AircraftLevel, AircraftOptions};
use snapmix_data::mat5::read_mat5;
use snapmix_data::{aircraft, cub, decode, folder, DataError, ImageDataset, LoadOptions};

fn test_data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn png_bytes() -> Vec<u8> {
    let image = image::RgbaImage::from_pixel(6, 5, image::Rgba([10, 20, 30, 255]));
    let mut bytes = Vec::new();
    image
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .unwrap();
    bytes
}

/// A CUB tree with CRLF lines, trailing blank lines, a CMYK, a grayscale and a PNG image,
/// image 4 corrupt and image 5 missing.
fn quirky_cub(root: &Path) {
    let crlf = |lines: &[&str]| format!("{}\r\n\r\n\r\n", lines.join("\r\n"));
    write(
        &root.join("classes.txt"),
        crlf(&["1 001.A", "2 002.B"]).as_bytes(),
    );
    write(
        &root.join("images.txt"),
        crlf(&[
            "1 001.A/cmyk.jpg",
            "2 001.A/gray.jpg",
            "3 002.B/png.jpg",
            "4 002.B/bad.jpg",
            "5 002.B/gone.jpg",
        ])
        .as_bytes(),
    );
    write(
        &root.join("image_class_labels.txt"),
        crlf(&["1 1", "2 1", "3 2", "4 2", "5 2"]).as_bytes(),
    );
    write(
        &root.join("train_test_split.txt"),
        crlf(&["1 1", "2 0", "3 1", "4 0", "5 1"]).as_bytes(),
    );
    write(
        &root.join("images/001.A/cmyk.jpg"),
        &std::fs::read(test_data("cmyk.jpg")).unwrap(),
    );
    write(
        &root.join("images/001.A/gray.jpg"),
        &std::fs::read(test_data("gray.jpg")).unwrap(),
    );
    write(&root.join("images/002.B/png.jpg"), &png_bytes());
    write(
        &root.join("images/002.B/bad.jpg"),
        b"\xff\xd8\xff\xe0 this is not a jpeg",
    );
}

#[test]
fn cmyk_jpeg_from_pillow_decodes_to_the_right_colours() {
    let rgb = decode::decode_rgb(&std::fs::read(test_data("cmyk.jpg")).unwrap()).unwrap();
    assert_eq!(rgb.dimensions(), (32, 16));
    let (left, right) = (rgb.get_pixel(4, 8).0, rgb.get_pixel(28, 8).0);
    assert!(
        left[0] > 240 && left[1] < 15 && left[2] < 15,
        "left {left:?} should be red"
    );
    assert!(
        right[0] < 15 && right[1] < 15 && right[2] > 240,
        "right {right:?} should be blue"
    );
}

#[test]
fn quirky_cub_tree_skips_or_names_the_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    quirky_cub(dir.path());
    let skip = LoadOptions {
        skip_unreadable: true,
        verify: true,
    };
    let splits = cub::load(dir.path(), skip).unwrap();
    assert_eq!(splits.class_names(), ["001.A", "002.B"]);
    assert_eq!((splits.train.listed(), splits.test.listed()), (3, 2));
    assert_eq!((splits.train.len(), splits.test.len()), (2, 1));
    let skipped: Vec<&Path> = splits
        .train
        .skipped()
        .iter()
        .chain(splits.test.skipped())
        .map(|s| s.path.as_path())
        .collect();
    assert_eq!(skipped.len(), 2);
    assert!(
        skipped.iter().any(|p| p.ends_with("gone.jpg"))
            && skipped.iter().any(|p| p.ends_with("bad.jpg"))
    );
    for split in [&splits.train, &splits.test] {
        for i in 0..split.len() {
            let image = split.load(i).unwrap();
            assert!(image.width() > 0);
        }
    }

    // Strict: the missing file is named with its images.txt line (5), even without verify.
    let err = cub::load(dir.path(), LoadOptions::default()).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, DataError::Image { .. }), "{message}");
    assert!(
        message.contains("gone.jpg") && message.contains("images.txt:5"),
        "{message}"
    );
    // Once the missing file exists, verify finds the corrupt one and names its line (4).
    write(&dir.path().join("images/002.B/gone.jpg"), &png_bytes());
    let message = cub::load(
        dir.path(),
        LoadOptions {
            verify: true,
            skip_unreadable: false,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        message.contains("bad.jpg") && message.contains("images.txt:4"),
        "{message}"
    );

    // Without verify, the corrupt file is only met when loaded: the error names its line too.
    let lazy = cub::load(dir.path(), LoadOptions::default()).unwrap();
    let bad = (0..lazy.test.len())
        .find(|&i| lazy.test.entries()[i].path.ends_with("bad.jpg"))
        .unwrap();
    let message = lazy.test.load(bad).unwrap_err().to_string();
    assert!(
        message.contains("bad.jpg") && message.contains("images.txt:4"),
        "{message}"
    );
}

#[test]
fn cub_files_that_disagree_name_the_missing_id() {
    let dir = tempfile::tempdir().unwrap();
    quirky_cub(dir.path());
    write(
        &dir.path().join("train_test_split.txt"),
        b"1 1\n2 0\n3 1\n4 0\n",
    );
    let message = cub::load(dir.path(), LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("\"5\"") && message.contains("train_test_split.txt"),
        "{message}"
    );
    write(
        &dir.path().join("train_test_split.txt"),
        b"1 1\n2 0\n3 1\n4 0\n5 1\n6 1\n",
    );
    let message = cub::load(dir.path(), LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("\"6\"") && message.contains("images.txt"),
        "{message}"
    );
    write(
        &dir.path().join("train_test_split.txt"),
        b"1 1\n2 0\n3 1\n4 0\n5 yes\n",
    );
    let message = cub::load(dir.path(), LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("train_test_split.txt:5") && message.contains("yes"),
        "{message}"
    );
}

#[test]
fn aircraft_names_with_spaces_and_slashes_levels_and_banner() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("fgvc-aircraft-2013b/data");
    let jpeg = {
        let mut bytes = Vec::new();
        image::RgbImage::from_pixel(40, 60, image::Rgb([90, 90, 90]))
            .write_to(
                &mut std::io::Cursor::new(&mut bytes),
                image::ImageFormat::Jpeg,
            )
            .unwrap();
        bytes
    };
    for id in ["0001", "0002", "0003", "0004"] {
        write(&data.join(format!("images/{id}.jpg")), &jpeg);
    }
    write(
        &data.join("images_variant_trainval.txt"),
        b"0001 Boeing 737-300\r\n0002 F/A-18\r\n\r\n",
    );
    write(
        &data.join("images_variant_test.txt"),
        b"0003 F/A-18\r\n0004 Boeing 737-300\r\n",
    );
    write(
        &data.join("images_manufacturer_trainval.txt"),
        b"0001 Boeing\n0002 McDonnell Douglas\n",
    );
    write(
        &data.join("images_manufacturer_test.txt"),
        b"0003 McDonnell Douglas\n",
    );
    // No variants.txt: sorted unique names; both roots work.
    for root in [dir.path().join("fgvc-aircraft-2013b"), data.clone()] {
        let splits = aircraft::load(&root, AircraftOptions::default()).unwrap();
        assert_eq!(splits.class_names(), ["Boeing 737-300", "F/A-18"]);
        assert_eq!(splits.test.label(0), 1);
    }
    // The manufacturer test split lacks Boeing: without manufacturers.txt that is an error.
    let options = AircraftOptions {
        level: AircraftLevel::Manufacturer,
        ..Default::default()
    };
    let message = aircraft::load(&data, options).unwrap_err().to_string();
    assert!(
        message.contains("Boeing") && message.contains("images_manufacturer_test.txt"),
        "{message}"
    );
    write(
        &data.join("manufacturers.txt"),
        b"McDonnell Douglas\nBoeing\n",
    );
    let splits = aircraft::load(&data, options).unwrap();
    assert_eq!(splits.train.label(0), 1);
    // The class file fixes the order; unknown names are errors naming the line.
    write(&data.join("variants.txt"), b"F/A-18\nBoeing 737-300\n");
    let splits = aircraft::load(&data, AircraftOptions::default()).unwrap();
    assert_eq!(splits.class_names(), ["F/A-18", "Boeing 737-300"]);
    write(&data.join("variants.txt"), b"F/A-18\n");
    let message = aircraft::load(&data, AircraftOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("images_variant_trainval.txt:1") && message.contains("Boeing 737-300"),
        "{message}"
    );
    // Banner crop removes 20 rows.
    write(&data.join("variants.txt"), b"F/A-18\nBoeing 737-300\n");
    let cropped = aircraft::load(
        &data,
        AircraftOptions {
            crop_banner: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(cropped.train.load(0).unwrap().dimensions(), (40, 40));
}

#[test]
fn image_folders_with_and_without_splits() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("cat/a.PNG"), &png_bytes());
    write(&dir.path().join("cat/notes.txt"), b"not an image");
    write(
        &dir.path().join("dog/b.jpg"),
        &std::fs::read(test_data("gray.jpg")).unwrap(),
    );
    write(
        &dir.path().join("dog/c.jpeg"),
        &std::fs::read(test_data("cmyk.jpg")).unwrap(),
    );
    let splits = folder::load(
        dir.path(),
        LoadOptions {
            verify: true,
            skip_unreadable: false,
        },
    )
    .unwrap();
    assert_eq!(splits.class_names(), ["cat", "dog"]);
    assert_eq!((splits.train.len(), splits.test.len()), (3, 0));
    assert_eq!(splits.train.class_counts(), vec![1, 2]);

    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("train/a/1.png"), &png_bytes());
    write(&dir.path().join("val/b/2.png"), &png_bytes());
    let splits = folder::load(dir.path(), LoadOptions::default()).unwrap();
    assert_eq!(splits.class_names(), ["a", "b"]);
    assert_eq!((splits.train.label(0), splits.test.label(0)), (0, 1));
}

#[test]
fn scipy_written_mat_files_read_like_the_cars_devkit() {
    for name in ["scipy_cars.mat", "scipy_cars_uncompressed.mat"] {
        let vars = read_mat5(&test_data(name)).unwrap();
        let annos = &vars.iter().find(|(n, _)| n == "annotations").unwrap().1;
        let expect = [
            (39.0, 14.0, "00001.jpg"),
            (36.0, 3.0, "00002.jpg"),
            (85.0, 196.0, "sub dir/00003.jpg"),
        ];
        for (i, (x1, class, fname)) in expect.iter().enumerate() {
            assert_eq!(
                annos.field(i, "bbox_x1").unwrap().as_scalar(),
                Some(*x1),
                "{name}"
            );
            assert_eq!(
                annos.field(i, "class").unwrap().as_scalar(),
                Some(*class),
                "{name}"
            );
            assert_eq!(
                annos.field(i, "fname").unwrap().as_string().unwrap(),
                *fname,
                "{name}"
            );
        }
        assert_eq!(annos.field(1, "bbox_x2").unwrap().as_scalar(), Some(868.0));
        assert_eq!(annos.field(2, "bbox_y2").unwrap().as_scalar(), Some(381.0));
        let names = &vars.iter().find(|(n, _)| n == "class_names").unwrap().1;
        match names {
            snapmix_data::mat5::MatValue::Cell { items, .. } => {
                assert_eq!(items[1].as_string().unwrap(), "Škoda Octavia/Combi 2012");
            }
            other => panic!("{name}: class_names is a {}", other.kind()),
        }
    }
}

#[test]
fn cars_with_labels_at_the_root_nested_folders_and_bad_classes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let annos = std::fs::read(test_data("scipy_cars.mat")).unwrap();
    write(
        &root.join("devkit/cars_meta.mat"),
        &std::fs::read(test_data("scipy_cars_meta.mat")).unwrap(),
    );
    write(&root.join("devkit/cars_train_annos.mat"), &annos);
    write(&root.join("cars_test_annos_withlabels.mat"), &annos);
    for split in ["cars_train/cars_train", "cars_test"] {
        for name in ["00001.jpg", "00002.jpg", "sub dir/00003.jpg"] {
            write(
                &root.join(split).join(name),
                &std::fs::read(test_data("cmyk.jpg")).unwrap(),
            );
        }
    }
    let splits = snapmix_data::cars::load(
        root,
        LoadOptions {
            verify: true,
            skip_unreadable: false,
        },
    )
    .unwrap();
    assert_eq!(splits.class_names().len(), 196);
    assert_eq!(splits.class_names()[13], "Make13 Model13 2012");
    let labels: Vec<usize> = (0..3).map(|i| splits.train.label(i)).collect();
    assert_eq!(labels, vec![13, 2, 195]);
    assert!(splits.train.entries()[0]
        .path
        .starts_with(root.join("cars_train/cars_train")));
    assert_eq!(splits.test.len(), 3);

    // Only two class names: class 14 of annotation 1 is out of range, and the error says so.
    write(&root.join("devkit/cars_meta.mat"), &annos);
    let message = snapmix_data::cars::load(root, LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("cars_train_annos.mat") && message.contains("annotations(1).class = 14"),
        "{message}"
    );

    // A missing image names the annotation file and its index.
    write(
        &root.join("devkit/cars_meta.mat"),
        &std::fs::read(test_data("scipy_cars_meta.mat")).unwrap(),
    );
    std::fs::remove_file(root.join("cars_test/00002.jpg")).unwrap();
    let message = snapmix_data::cars::load(root, LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("00002.jpg") && message.contains("cars_test_annos_withlabels.mat:2"),
        "{message}"
    );
}
