//! `cargo xtask bench-data`: training-pipeline throughput (decode, resize, crop, flip,
//! normalise into NCHW batches) against the Pillow + NumPy baseline in
//! `benches/pillow_pipeline.py`, run in the same invocation with one process per thread, plus
//! single-thread timings of the decoder and resizer choices. JSON to
//! `target/bench/bench-data.json`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use snapmix_data::aircraft::AircraftLevel;
use snapmix_data::decode::{decode_rgb_with, JpegDecoder};
use snapmix_data::transform::Resizer;
use snapmix_data::{folder, ImageList, LoadOptions, Loader, LoaderConfig, ResizeMode, Transform};

use super::data_stats::{load_splits, DatasetKind};
use crate::device::DeviceSpec;

/// Flags of `cargo xtask bench-data`.
#[derive(clap::Args)]
pub struct Args {
    /// Dataset layout of --root (default: generated CUB-like JPEGs).
    #[arg(long, value_enum)]
    dataset: Option<DatasetKind>,
    /// Dataset root; its training split is timed.
    #[arg(long)]
    root: Option<PathBuf>,
    /// Decoding threads for the Rust pipeline and worker processes for Pillow (default: cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Timed batches per run.
    #[arg(long, default_value_t = 8)]
    batches: usize,
    /// Images per batch.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Runs of each pipeline (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Resize target (shorter side, or both sides for Cars/Aircraft).
    #[arg(long, default_value_t = 512)]
    resize: usize,
    /// Crop side.
    #[arg(long, default_value_t = 448)]
    crop: usize,
    /// How many JPEGs to generate when no --root is given.
    #[arg(long, default_value_t = 64)]
    generated: usize,
    /// Skip the Pillow baseline.
    #[arg(long)]
    no_pillow: bool,
}

/// Throughput of one pipeline: the median run and every run.
#[derive(Serialize)]
struct Throughput {
    images_per_s: f64,
    images_per_s_per_core: f64,
    runs_images_per_s: Vec<f64>,
}

/// Single-thread medians, milliseconds per image.
#[derive(Serialize)]
struct Components {
    decode_zune_jpeg_ms: f64,
    decode_image_crate_ms: f64,
    resize_fast_image_resize_ms: f64,
    resize_image_crate_ms: f64,
}

#[derive(Serialize)]
struct Report {
    command: String,
    dataset: String,
    images: usize,
    mean_file_kib: f64,
    threads: usize,
    batch_size: usize,
    batches: usize,
    resize: usize,
    crop: usize,
    resize_mode: String,
    rust: Throughput,
    pillow: Option<Throughput>,
    /// Rust images/s over Pillow images/s, same thread/process count.
    ratio_vs_pillow: Option<f64>,
    /// The target: 2x Pillow's 118 images/s per core measured 2026-11-26.
    target_per_core: f64,
    components: Components,
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// A photo-like 500x375 scene: smooth gradients, soft blobs and sensor-like noise, so the
/// JPEG's size and decode cost resemble a CUB image's.
fn photo_like(rng: &mut ChaCha8Rng, cols: u32, rows: u32) -> RgbImage {
    let base: [f32; 3] = std::array::from_fn(|_| rng.random_range(40.0..200.0));
    let slope: [f32; 3] = std::array::from_fn(|_| rng.random_range(-0.2..0.2));
    let blobs: Vec<(f32, f32, f32, [f32; 3])> = (0..12)
        .map(|_| {
            (
                rng.random_range(0.0..cols as f32),
                rng.random_range(0.0..rows as f32),
                rng.random_range(15.0..90.0),
                std::array::from_fn(|_| rng.random_range(-80.0..80.0)),
            )
        })
        .collect();
    let mut image = RgbImage::new(cols, rows);
    for (col, row, pixel) in image.enumerate_pixels_mut() {
        let (c, r) = (col as f32, row as f32);
        let mut value: [f32; 3] = std::array::from_fn(|k| base[k] + slope[k] * (c + r));
        for (bc, br, radius, tint) in &blobs {
            let d2 = ((c - bc).powi(2) + (r - br).powi(2)) / (radius * radius);
            let weight = (-d2).exp();
            for k in 0..3 {
                value[k] += tint[k] * weight;
            }
        }
        let texture = ((c * 0.31).sin() * (r * 0.17).cos()) * 10.0;
        *pixel = image::Rgb(std::array::from_fn(|k| {
            (value[k] + texture + rng.random_range(-9.0..9.0)).clamp(0.0, 255.0) as u8
        }));
    }
    image
}

/// Writes `count` CUB-like JPEGs (about 500x375, quality 90) under `dir/generated/`, unless
/// they are already there.
fn generate_jpegs(dir: &Path, count: usize) -> Result<()> {
    let class_dir = dir.join("generated");
    let existing = std::fs::read_dir(&class_dir)
        .map(|d| d.count())
        .unwrap_or(0);
    if existing == count {
        return Ok(());
    }
    if class_dir.exists() {
        std::fs::remove_dir_all(&class_dir)
            .with_context(|| format!("clearing {}", class_dir.display()))?;
    }
    std::fs::create_dir_all(&class_dir)
        .with_context(|| format!("creating {}", class_dir.display()))?;
    let mut rng = ChaCha8Rng::seed_from_u64(2011);
    for index in 0..count {
        // CUB's typical sizes: 500 wide, 300..=500 high, or portrait.
        let (cols, rows) = if index % 5 == 4 {
            (rng.random_range(333..=375), 500)
        } else {
            (500, rng.random_range(333..=400))
        };
        let image = photo_like(&mut rng, cols, rows);
        let path = class_dir.join(format!("{index:04}.jpg"));
        let file =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut writer = std::io::BufWriter::new(file);
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut writer, 90)
            .encode_image(&image)
            .with_context(|| format!("encoding {}", path.display()))?;
    }
    Ok(())
}

/// Runs the Rust pipeline: `batches` timed batches after one warm-up batch, epochs chained.
fn time_rust(
    list: &ImageList,
    transform: &Transform,
    args: &Args,
    threads: usize,
    seed: u64,
) -> Result<f64> {
    let config = LoaderConfig {
        threads: Some(threads),
        prefetch: 2,
        ..LoaderConfig::train(args.batch_size, seed)
    };
    let loader = Loader::new(Arc::new(list.clone()), transform.clone(), config)?;
    if loader.batches_per_epoch() == 0 {
        bail!(
            "{} images are fewer than one batch of {}",
            list.entries().len(),
            args.batch_size
        );
    }
    let mut batches = (0u64..).flat_map(|epoch| loader.epoch(epoch));
    let mut checksum = 0.0f64;
    batches.next().context("no batch")??;
    let start = Instant::now();
    for _ in 0..args.batches {
        let batch = batches.next().context("no batch")??;
        checksum += f64::from(batch.images[0]);
    }
    let seconds = start.elapsed().as_secs_f64();
    std::hint::black_box(checksum);
    Ok((args.batches * args.batch_size) as f64 / seconds)
}

/// Single-thread per-image medians of both decoders and both resizers on the first images.
fn time_components(list: &ImageList, transform: &Transform) -> Result<Components> {
    let files: Vec<Vec<u8>> = list
        .entries()
        .iter()
        .take(24)
        .map(|e| std::fs::read(&e.path).with_context(|| e.path.display().to_string()))
        .collect::<Result<_>>()?;
    let per_image = |f: &mut dyn FnMut(usize) -> Result<()>| -> Result<f64> {
        let mut times = Vec::new();
        for _ in 0..3 {
            let start = Instant::now();
            for i in 0..files.len() {
                f(i)?;
            }
            times.push(start.elapsed().as_secs_f64() * 1e3 / files.len() as f64);
        }
        Ok(median(&mut times))
    };
    let decode = |decoder: JpegDecoder| {
        per_image(&mut |i| {
            std::hint::black_box(decode_rgb_with(&files[i], decoder).map_err(anyhow::Error::msg)?);
            Ok(())
        })
    };
    let decoded: Vec<RgbImage> = files
        .iter()
        .map(|f| decode_rgb_with(f, JpegDecoder::Zune).map_err(anyhow::Error::msg))
        .collect::<Result<_>>()?;
    let resize = |resizer: Resizer| {
        let mut t = transform.clone();
        t.resizer = resizer;
        // Resize + centre crop + normalise: the resizer dominates; the rest is shared.
        t.random_crop = false;
        t.flip = false;
        let mut out = vec![0f32; 3 * t.crop * t.crop];
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        per_image(&mut |i| {
            let (cols, rows) = decoded[i].dimensions();
            let geometry = t.sample_geometry(rows as usize, cols as usize, &mut rng);
            t.apply(&decoded[i], &geometry, &mut out)?;
            Ok(())
        })
    };
    Ok(Components {
        decode_zune_jpeg_ms: decode(JpegDecoder::Zune)?,
        decode_image_crate_ms: decode(JpegDecoder::ImageCrate)?,
        resize_fast_image_resize_ms: resize(Resizer::FastImageResize)?,
        resize_image_crate_ms: resize(Resizer::ImageCrate)?,
    })
}

/// The Python of `<repo>/.venv`, created with Pillow and NumPy when missing.
fn pillow_python(repo: &Path) -> Result<PathBuf> {
    super::python_venv(&repo.join(".venv"), &["pillow", "numpy"], "PIL, numpy")
}

/// One Pillow run; images/s.
fn time_pillow(
    python: &Path,
    script: &Path,
    list_file: &Path,
    args: &Args,
    threads: usize,
    warp: bool,
) -> Result<f64> {
    let mut command = Command::new(python);
    command
        .arg(script)
        .arg("--list")
        .arg(list_file)
        .args(["--workers", &threads.to_string()])
        .args(["--images", &(args.batches * args.batch_size).to_string()])
        .args(["--resize", &args.resize.to_string()])
        .args(["--crop", &args.crop.to_string()])
        .args(["--batch", &args.batch_size.to_string()]);
    if warp {
        command.arg("--warp");
    }
    let output = command
        .output()
        .context("running benches/pillow_pipeline.py")?;
    if !output.status.success() {
        bail!(
            "benches/pillow_pipeline.py failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let json: serde_json::Value = serde_json::from_slice(&output.stdout)
        .with_context(|| format!("parsing {:?}", String::from_utf8_lossy(&output.stdout)))?;
    json["images_per_s"]
        .as_f64()
        .context("pillow_pipeline.py printed no images_per_s")
}

fn throughput(mut runs: Vec<f64>, threads: usize) -> Throughput {
    let images_per_s = median(&mut runs);
    Throughput {
        images_per_s,
        images_per_s_per_core: images_per_s / threads as f64,
        runs_images_per_s: runs,
    }
}

/// Runs `cargo xtask bench-data`.
pub fn run(args: Args, _device: DeviceSpec) -> Result<()> {
    let repo = super::repo_root();
    let bench_dir = repo.join("target/bench");
    std::fs::create_dir_all(&bench_dir)
        .with_context(|| format!("creating {}", bench_dir.display()))?;
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if threads == 0 || args.batches == 0 || args.runs == 0 {
        bail!("--threads, --batches and --runs must be positive");
    }

    let (kind, list) = match (args.dataset, &args.root) {
        (Some(DatasetKind::Synthetic), _) => {
            bail!("bench-data times file decoding; the synthetic set has no files")
        }
        (Some(kind), Some(root)) => {
            let splits = load_splits(
                kind,
                root,
                AircraftLevel::Variant,
                LoadOptions {
                    skip_unreadable: true,
                    verify: false,
                },
            )?;
            (kind, splits.train)
        }
        (Some(kind), None) => bail!("--dataset {} needs --root", kind.name()),
        (None, Some(root)) => bail!("--root {} needs --dataset", root.display()),
        (None, None) => {
            let dir = bench_dir.join("data-images");
            generate_jpegs(&dir, args.generated)?;
            (
                DatasetKind::Folder,
                folder::load(&dir, LoadOptions::default())?.train,
            )
        }
    };
    let dataset_name = match (&args.root, kind) {
        (None, _) => format!("generated CUB-like JPEGs ({})", args.generated),
        (Some(root), kind) => format!("{} at {}", kind.name(), root.display()),
    };
    let resize_mode = kind.resize_mode();
    let transform = Transform::train(resize_mode, args.resize, args.crop);
    let sizes: Vec<u64> = list
        .entries()
        .iter()
        .filter_map(|e| std::fs::metadata(&e.path).ok().map(|m| m.len()))
        .collect();
    let mean_file_kib = sizes.iter().sum::<u64>() as f64 / sizes.len().max(1) as f64 / 1024.0;

    eprintln!(
        "bench-data: {dataset_name}, {} images, {threads} thread(s)",
        list.entries().len()
    );
    let components = time_components(&list, &transform)?;
    // Rust and Pillow runs alternate, so load from other processes hits both alike.
    let pillow_setup = if args.no_pillow {
        None
    } else {
        let python = pillow_python(&repo)?;
        let list_file = bench_dir.join("bench-data-files.txt");
        let paths: Vec<String> = list
            .entries()
            .iter()
            .map(|e| e.path.display().to_string())
            .collect();
        std::fs::write(&list_file, paths.join("\n"))
            .with_context(|| format!("writing {}", list_file.display()))?;
        Some((python, list_file, repo.join("benches/pillow_pipeline.py")))
    };
    let (mut rust_runs, mut pillow_runs) = (Vec::new(), Vec::new());
    for run in 0..args.runs {
        rust_runs.push(time_rust(&list, &transform, &args, threads, run as u64)?);
        if let Some((python, list_file, script)) = &pillow_setup {
            let warp = resize_mode == ResizeMode::Warp;
            pillow_runs.push(time_pillow(
                python, script, list_file, &args, threads, warp,
            )?);
        }
    }
    let rust = throughput(rust_runs, threads);
    let pillow = pillow_setup.map(|_| throughput(pillow_runs, threads));
    let ratio_vs_pillow = pillow.as_ref().map(|p| rust.images_per_s / p.images_per_s);

    let report = Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        dataset: dataset_name,
        images: list.entries().len(),
        mean_file_kib,
        threads,
        batch_size: args.batch_size,
        batches: args.batches,
        resize: args.resize,
        crop: args.crop,
        resize_mode: format!("{resize_mode:?}"),
        rust,
        pillow,
        ratio_vs_pillow,
        target_per_core: 235.0,
        components,
    };
    let json_path = bench_dir.join("bench-data.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", json_path.display()))?;

    println!(
        "{} ({} images, {:.0} KiB mean), {} -> crop {}, batch {}, {} thread(s), {} runs x {} batches",
        report.dataset, report.images, report.mean_file_kib, report.resize, report.crop, report.batch_size,
        threads, args.runs, args.batches
    );
    println!("| pipeline | images/s (median) | per core | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| snapmix-data (rust) | {:.1} | {:.1} | {} |",
        report.rust.images_per_s,
        report.rust.images_per_s_per_core,
        report
            .ratio_vs_pillow
            .map_or("-".to_string(), |r| format!("{r:.2}x"))
    );
    if let Some(p) = &report.pillow {
        println!(
            "| Pillow + NumPy | {:.1} | {:.1} | 1.00x |",
            p.images_per_s, p.images_per_s_per_core
        );
    }
    let c = &report.components;
    println!("single thread, ms/image: decode zune-jpeg {:.2}, image crate {:.2}; resize+crop+normalise fast_image_resize {:.2}, image crate {:.2}",
        c.decode_zune_jpeg_ms, c.decode_image_crate_ms, c.resize_fast_image_resize_ms, c.resize_image_crate_ms);
    println!(
        "target: {:.0} images/s per core; JSON: {}",
        report.target_per_core,
        json_path.display()
    );
    Ok(())
}
