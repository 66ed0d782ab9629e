//! `cargo xtask data-stats`: classes, split sizes, per-class counts and how many images have an
//! object box; with `--verify` every image is decoded and the unreadable ones are listed.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;
use snapmix_data::aircraft::{AircraftLevel, AircraftOptions};
use snapmix_data::synthetic::Split;
use snapmix_data::{
    aircraft, cars, cub, folder, ImageDataset, LoadOptions, ResizeMode, Splits, SyntheticConfig,
    SyntheticSet,
};

use crate::device::DeviceSpec;

/// The datasets the runner knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DatasetKind {
    /// CUB-200-2011 (the `CUB_200_2011` folder).
    Cub,
    /// Stanford Cars (the folder with `devkit/`, `cars_train/`, `cars_test/`).
    Cars,
    /// FGVC-Aircraft 2013b (`fgvc-aircraft-2013b` or its `data/`).
    Aircraft,
    /// An image folder: `root/<class>/<image>` or `root/{train,test}/<class>/<image>`.
    Folder,
    /// The built-in synthetic fine-grained set (no root).
    Synthetic,
}

impl DatasetKind {
    /// The name used on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            DatasetKind::Cub => "cub",
            DatasetKind::Cars => "cars",
            DatasetKind::Aircraft => "aircraft",
            DatasetKind::Folder => "folder",
            DatasetKind::Synthetic => "synthetic",
        }
    }

    /// The official resize of the dataset: CUB and folders keep the aspect ratio, Cars and
    /// Aircraft are warped to a square.
    pub fn resize_mode(self) -> ResizeMode {
        match self {
            DatasetKind::Cars | DatasetKind::Aircraft => ResizeMode::Warp,
            DatasetKind::Cub | DatasetKind::Folder => ResizeMode::ShorterSide,
            DatasetKind::Synthetic => ResizeMode::Keep,
        }
    }
}

/// Loads a file-backed dataset's splits (every kind but `synthetic`).
pub fn load_splits(
    kind: DatasetKind,
    root: &Path,
    level: AircraftLevel,
    options: LoadOptions,
) -> Result<Splits> {
    let splits = match kind {
        DatasetKind::Cub => cub::load(root, options),
        DatasetKind::Cars => cars::load(root, options),
        DatasetKind::Aircraft => aircraft::load(
            root,
            AircraftOptions {
                level,
                load: options,
                ..Default::default()
            },
        ),
        DatasetKind::Folder => folder::load(root, options),
        DatasetKind::Synthetic => anyhow::bail!("the synthetic set has no files to load"),
    };
    splits.with_context(|| format!("loading {} from {}", kind.name(), root.display()))
}

/// Label level of FGVC-Aircraft on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LevelArg {
    /// 100 variants.
    Variant,
    /// 70 families.
    Family,
    /// 30 manufacturers.
    Manufacturer,
}

impl From<LevelArg> for AircraftLevel {
    fn from(level: LevelArg) -> Self {
        match level {
            LevelArg::Variant => AircraftLevel::Variant,
            LevelArg::Family => AircraftLevel::Family,
            LevelArg::Manufacturer => AircraftLevel::Manufacturer,
        }
    }
}

/// Flags of `cargo xtask data-stats`.
#[derive(clap::Args)]
pub struct Args {
    /// Which dataset layout.
    #[arg(long, value_enum)]
    dataset: DatasetKind,
    /// The dataset root (not needed for `synthetic`).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Decode every image and list the unreadable ones.
    #[arg(long)]
    verify: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// FGVC-Aircraft label level.
    #[arg(long, value_enum, default_value = "variant")]
    level: LevelArg,
}

/// Smallest and largest number of images per class in a split.
#[derive(Serialize)]
struct MinMax {
    min: usize,
    max: usize,
}

#[derive(Serialize)]
struct PerClass {
    train: MinMax,
    test: MinMax,
}

/// Served images with an object box, per split.
#[derive(Serialize)]
struct Boxed {
    train: usize,
    test: usize,
}

#[derive(Serialize)]
struct Stats {
    dataset: &'static str,
    root: Option<String>,
    classes: usize,
    /// Images listed by the split files (readable or not).
    train: usize,
    test: usize,
    /// Images that are missing, or (with --verify) fail to decode; relative to the root.
    unreadable: Vec<String>,
    verified: bool,
    per_class: PerClass,
    /// Images with an object box (the dataset's box file; none for folders and synthetic).
    boxes: Boxed,
}

fn min_max(counts: &[usize]) -> MinMax {
    MinMax {
        min: counts.iter().copied().min().unwrap_or(0),
        max: counts.iter().copied().max().unwrap_or(0),
    }
}

fn per_class_counts(dataset: &dyn ImageDataset) -> Vec<usize> {
    let mut counts = vec![0; dataset.num_classes()];
    for index in 0..dataset.len() {
        counts[dataset.label(index)] += 1;
    }
    counts
}

fn synthetic_stats(verify: bool) -> Result<Stats> {
    let config = SyntheticConfig::default();
    let (train, test) = (
        SyntheticSet::new(&config, Split::Train)?,
        SyntheticSet::new(&config, Split::Test)?,
    );
    let mut unreadable = Vec::new();
    if verify {
        for (name, set) in [("train", &train), ("test", &test)] {
            for index in 0..set.len() {
                if set.load(index).is_err() {
                    unreadable.push(format!("{name}/{index}"));
                }
            }
        }
    }
    Ok(Stats {
        dataset: DatasetKind::Synthetic.name(),
        root: None,
        classes: config.classes,
        train: train.len(),
        test: test.len(),
        unreadable,
        verified: verify,
        per_class: PerClass {
            train: min_max(&per_class_counts(&train)),
            test: min_max(&per_class_counts(&test)),
        },
        boxes: Boxed { train: 0, test: 0 },
    })
}

fn file_stats(args: &Args) -> Result<Stats> {
    let root = args
        .root
        .as_ref()
        .with_context(|| format!("--root is required for --dataset {}", args.dataset.name()))?;
    let options = LoadOptions {
        skip_unreadable: true,
        verify: args.verify,
    };
    let splits = load_splits(args.dataset, root, args.level.into(), options)?;
    let unreadable = [&splits.train, &splits.test]
        .iter()
        .flat_map(|split| split.skipped())
        .map(|skipped| {
            let path = skipped.path.strip_prefix(root).unwrap_or(&skipped.path);
            path.to_string_lossy().replace('\\', "/")
        })
        .collect();
    Ok(Stats {
        dataset: args.dataset.name(),
        root: Some(root.display().to_string()),
        classes: splits.class_names().len(),
        train: splits.train.listed(),
        test: splits.test.listed(),
        unreadable,
        verified: args.verify,
        per_class: PerClass {
            train: min_max(&splits.train.class_counts()),
            test: min_max(&splits.test.class_counts()),
        },
        boxes: Boxed {
            train: splits.train.boxed(),
            test: splits.test.boxed(),
        },
    })
}

/// Runs `cargo xtask data-stats`.
pub fn run(args: Args, _device: DeviceSpec) -> Result<()> {
    let stats = match args.dataset {
        DatasetKind::Synthetic => synthetic_stats(args.verify)?,
        _ => file_stats(&args)?,
    };
    if args.json {
        println!("{}", serde_json::to_string(&stats)?);
        return Ok(());
    }
    println!("dataset     {}", stats.dataset);
    if let Some(root) = &stats.root {
        println!("root        {root}");
    }
    println!("classes     {}", stats.classes);
    println!(
        "train       {:>6} images, per class {}..{}",
        stats.train, stats.per_class.train.min, stats.per_class.train.max
    );
    println!(
        "test        {:>6} images, per class {}..{}",
        stats.test, stats.per_class.test.min, stats.per_class.test.max
    );
    let checked = if stats.verified {
        "decoded"
    } else {
        "existence checked; --verify decodes"
    };
    println!(
        "boxes       {:>6} train, {} test images with an object box",
        stats.boxes.train, stats.boxes.test
    );
    println!("unreadable  {:>6} ({checked})", stats.unreadable.len());
    for path in &stats.unreadable {
        println!("  {path}");
    }
    Ok(())
}
