//! `cargo xtask show-mix`: a PNG grid of what each mixing method does to a batch: per row image
//! a, its partner b, their CAM heat-maps with the boxes, and the mixed image of every method with
//! the label weights it assigns (and, on the synthetic set, the true shares).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ab_glyph::FontRef;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use image::{imageops, Rgb, RgbImage};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use snapmix_cam::CamSource;
use snapmix_data::synthetic::{Split, SyntheticSet};
use snapmix_data::transform::{IMAGENET_MEAN, IMAGENET_STD};
use snapmix_data::{ImageDataset, Loader, LoaderConfig, ResizeMode, Transform};
use snapmix_mix::{apply, Method, MixConfig, MixMode, MixParams, PixelBox, SampleMix};
use snapmix_models::{Arch, LoadOptions, MidLevelConfig, ResNet, ResNetConfig};

use super::brief_model::{self, BriefSpec};
use super::canvas::{self, BLACK, WHITE};
use super::label_fidelity::{resizemix_sample, true_shares, PartMask};
use crate::device::DeviceSpec;

/// Flags of `cargo xtask show-mix`.
#[derive(clap::Args)]
pub struct Args {
    /// Dataset: synthetic (built in), cub, cars, aircraft or folder (needs --root and --weights).
    #[arg(long, default_value = "synthetic")]
    dataset: String,
    /// Dataset root folder (not for the synthetic set).
    #[arg(long)]
    root: Option<PathBuf>,
    /// CAM model weights (safetensors, torchvision names); default on the synthetic set: the
    /// cached briefly trained model (trained now if missing).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Architecture of --weights for a real dataset.
    #[arg(long, default_value = "resnet50")]
    arch: String,
    /// Crop size for a real dataset (resized to 8/7 of it first, test transform).
    #[arg(long, default_value_t = 448)]
    crop: usize,
    /// Methods to show, comma-separated: snapmix, cutmix, as_cutmix, mixup, cutout, resizemix.
    #[arg(long, default_value = "snapmix,cutmix,resizemix")]
    methods: String,
    /// Seed of the images, partners and boxes.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Rows of the grid (images).
    #[arg(long, default_value_t = 6)]
    batch: usize,
    /// Beta(beta, beta) of the box and blend draws.
    #[arg(long, default_value_t = 5.0)]
    beta: f64,
    /// Output PNG; default <repo>/target/show-mix.png.
    #[arg(long)]
    output: Option<PathBuf>,
    #[command(flatten)]
    spec: BriefSpec,
}

/// A method column: a mixing method or the ResizeMix-style paste of the whole partner.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Column {
    Mix(Method),
    ResizeMix,
}

impl Column {
    fn parse(name: &str) -> Result<Self> {
        match name.trim() {
            "resizemix" => Ok(Column::ResizeMix),
            "none" => bail!("--methods: `none` shows nothing; pick from snapmix, cutmix, as_cutmix, mixup, cutout, resizemix"),
            other => Ok(Column::Mix(other.parse().with_context(|| {
                format!("--methods: unknown method `{other}` (snapmix, cutmix, as_cutmix, mixup, cutout, resizemix)")
            })?)),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Column::Mix(m) => m.name(),
            Column::ResizeMix => "resizemix",
        }
    }

    /// What the label weights are based on, for the column title.
    fn label_basis(self) -> &'static str {
        match self {
            Column::Mix(Method::SnapMix) => "CAM label",
            Column::Mix(Method::Mixup) => "blend label",
            Column::Mix(Method::Cutout) => "label kept",
            _ => "area label",
        }
    }
}

/// A batch to show: normalised images on the device, labels, class names and part masks.
struct ShowBatch {
    images: Tensor,
    labels: Tensor,
    label_values: Vec<u32>,
    masks: Option<Vec<f32>>,
    class_names: Vec<String>,
    size: usize,
}

/// Runs `cargo xtask show-mix`.
pub fn run(args: Args, device: DeviceSpec) -> Result<()> {
    let device = device.open()?;
    let columns = args
        .methods
        .split(',')
        .filter(|m| !m.trim().is_empty())
        .map(Column::parse)
        .collect::<Result<Vec<_>>>()?;
    if columns.is_empty() {
        bail!("--methods is empty");
    }
    if args.batch < 2 {
        bail!(
            "--batch {}: need at least 2 images to have partners",
            args.batch
        );
    }
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let (batch, model, model_note) = if args.dataset == "synthetic" {
        let brief = brief_model::load_or_train(&args.spec, args.weights.as_deref(), &device)?;
        let test = SyntheticSet::new(&args.spec.synthetic(), Split::Test)?;
        let mut indices: Vec<usize> = (0..test.len()).collect();
        indices.shuffle(&mut rng);
        indices.truncate(args.batch);
        let b = brief_model::synthetic_batch(&test, &indices, &device)?;
        let note = format!(
            "CAM model: {} ({}, test acc {:.0}%)",
            brief
                .path
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default(),
            brief.origin,
            brief.test_accuracy * 100.0
        );
        let batch = ShowBatch {
            images: b.images,
            labels: b.labels,
            label_values: b.label_values,
            masks: Some(b.masks),
            class_names: test.class_names(),
            size: args.spec.image_size,
        };
        (batch, brief.model, note)
    } else {
        let batch = real_batch(&args, &mut rng, &device)?;
        let weights = args.weights.as_deref().with_context(|| {
            format!(
                "--dataset {} needs --weights: the briefly trained model only knows the synthetic set",
                args.dataset
            )
        })?;
        let model = load_model(&args.arch, batch.class_names.len(), weights, &device)?;
        let note = format!("CAM model: {}", weights.display());
        (batch, model, note)
    };

    let size = batch.size;
    let len = batch.label_values.len();
    let spm = model.semantic_percent_maps(&batch.images, &batch.labels, false)?;
    // One partner per row shared by every method, never the image itself.
    let mut order: Vec<usize> = (0..len).collect();
    order.shuffle(&mut rng);
    let mut perm = vec![0; len];
    for k in 0..len {
        perm[order[k]] = order[(k + 1) % len];
    }
    let mut mixes = Vec::new();
    for &column in &columns {
        let samples: Vec<SampleMix> = match column {
            Column::ResizeMix => (0..len)
                .map(|_| resizemix_sample(&mut rng, size, size, (0.1, 0.8)))
                .collect(),
            Column::Mix(method) => {
                let config = MixConfig {
                    beta: args.beta,
                    mode: MixMode::Elem,
                    ..MixConfig::new(method)
                };
                config.sample(&mut rng, len, size, size)?.samples
            }
        };
        let params = MixParams {
            rows: size,
            cols: size,
            perm: perm.clone(),
            samples,
            same_label_rule: true,
        };
        let mixed = apply(&params, &batch.images, &batch.labels, Some(&spm))
            .with_context(|| format!("mixing with {}", column.name()))?;
        mixes.push((column, params, mixed));
    }

    let font = canvas::font()?;
    let tile = (size as u32).clamp(160, 256);
    let caption = 44u32;
    let gap = 6u32;
    let legend_h = 96u32;
    let header_h = 26u32;
    let cols_n = 4 + columns.len() as u32;
    let width = cols_n * (tile + gap) + gap;
    let row_h = tile + caption + gap;
    let height = legend_h + header_h + len as u32 * row_h + gap;
    let mut canvas_img = RgbImage::from_pixel(width, height, WHITE);

    draw_legend(
        &mut canvas_img,
        &font,
        &model_note,
        &columns
            .iter()
            .find(|c| !matches!(c, Column::Mix(Method::Mixup)))
            .map_or("no method's".to_string(), |c| format!("{}'s", c.name())),
        &batch,
        legend_h,
    );
    let mut titles = vec![
        "image a".to_string(),
        "partner b".to_string(),
        "CAM of a + box_a".to_string(),
        "CAM of b + box_b".to_string(),
    ];
    titles.extend(
        columns
            .iter()
            .map(|c| format!("{} ({})", c.name(), c.label_basis())),
    );
    for (c, title) in titles.iter().enumerate() {
        let x = (gap + c as u32 * (tile + gap)) as i32;
        canvas::draw_text(
            &mut canvas_img,
            &font,
            title,
            x,
            legend_h as i32 + 4,
            15.0,
            BLACK,
        );
    }

    let pictures = denormalise(&batch.images)?;
    let heat = spm.maps()?.to_dtype(DType::F32)?.to_vec3::<f32>()?;
    let degenerate = spm.degenerate()?;
    let scale = tile as f32 / size as f32;
    for i in 0..len {
        let partner = perm[i];
        let top = (legend_h + header_h + i as u32 * row_h) as i32;
        let x_of = |c: u32| (gap + c * (tile + gap)) as i32;
        // Columns 1-4 show the boxes of the first method that has boxes (not Mixup).
        let boxed = mixes
            .iter()
            .find(|(column, _, _)| !matches!(column, Column::Mix(Method::Mixup)));
        let has_boxes = boxed.is_some();
        let s = boxed.map_or(SampleMix::none(), |(_, params, _)| params.samples[i]);
        let class = |j: usize| {
            let label = batch.label_values[j] as usize;
            batch
                .class_names
                .get(label)
                .cloned()
                .unwrap_or_else(|| label.to_string())
        };
        // Image a and partner b, with the first method's boxes.
        let mut a = upscale(&pictures[i], tile);
        let mut b = upscale(&pictures[partner], tile);
        if has_boxes {
            draw_box(&mut a, s.box_a, scale, BOX_A);
            draw_box(&mut b, s.box_b, scale, BOX_B);
        }
        paste(&mut canvas_img, &a, x_of(0), top);
        paste(&mut canvas_img, &b, x_of(1), top);
        caption_line(
            &mut canvas_img,
            &font,
            &format!("a: {}", class(i)),
            x_of(0),
            top + tile as i32 + 2,
        );
        caption_line(
            &mut canvas_img,
            &font,
            &format!("b: {}", class(partner)),
            x_of(1),
            top + tile as i32 + 2,
        );
        // CAM overlays: the SPM of the image's own label, scaled to its maximum.
        for (c, j, bbox, colour) in [(2u32, i, s.box_a, BOX_A), (3, partner, s.box_b, BOX_B)] {
            let mut overlay = overlay_heat(&pictures[j], &heat[j], degenerate[j]);
            overlay = upscale(&overlay, tile);
            if has_boxes {
                draw_box(&mut overlay, bbox, scale, colour);
            }
            paste(&mut canvas_img, &overlay, x_of(c), top);
            let text = if degenerate[j] {
                "CAM degenerate: area fallback".to_string()
            } else if has_boxes {
                let mass = spm.box_sums(&[j], &[bbox])?[0];
                format!("CAM mass in box: {:.2}", mass)
            } else {
                String::new()
            };
            caption_line(
                &mut canvas_img,
                &font,
                &text,
                x_of(c),
                top + tile as i32 + 2,
            );
        }
        // Every method's mixed image and labels.
        for (k, (column, params, mixed)) in mixes.iter().enumerate() {
            let picture = denormalise(&mixed.images.narrow(0, i, 1)?)?.remove(0);
            let mut tile_img = upscale(&picture, tile);
            let sample = &params.samples[i];
            if !matches!(column, Column::Mix(Method::Mixup)) && sample.box_a.area() > 0 {
                draw_box(&mut tile_img, sample.box_a, scale, BOX_A);
            }
            let (lam_a, lam_b) = (
                mixed.lam_a.to_vec1::<f32>()?[i],
                mixed.lam_b.to_vec1::<f32>()?[i],
            );
            let x = x_of(4 + k as u32);
            paste(&mut canvas_img, &tile_img, x, top);
            // The assigned weights, big, on the tile itself.
            canvas::draw_label(
                &mut canvas_img,
                &font,
                &format!("a {lam_a:.2}  b {lam_b:.2}"),
                x + 2,
                top + 2,
                15.0,
                WHITE,
                Rgb([20, 20, 20]),
            );
            let truth = match &batch.masks {
                Some(masks) if sample.method.has_partner() || sample.method == Method::Cutout => {
                    let plane = size * size;
                    let mask = |j: usize| PartMask {
                        values: &masks[j * plane..(j + 1) * plane],
                        rows: size,
                        cols: size,
                    };
                    let t = true_shares(mask(i), mask(partner), sample)?;
                    format!("true parts: a {:.2}  b {:.2}", t.a, t.b)
                }
                _ => String::new(),
            };
            caption_line(&mut canvas_img, &font, &truth, x, top + tile as i32 + 2);
            if matches!(column, Column::Mix(Method::SnapMix)) {
                let area = sample.box_a.area() as f64 / (size * size) as f64;
                caption_line(
                    &mut canvas_img,
                    &font,
                    &format!("CutMix area label: a {:.2}  b {:.2}", 1.0 - area, area),
                    x,
                    top + tile as i32 + 22,
                );
            }
        }
    }

    let output = args
        .output
        .clone()
        .unwrap_or_else(|| super::repo_root().join("target/show-mix.png"));
    if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    canvas_img
        .save(&output)
        .with_context(|| format!("writing {}", output.display()))?;
    println!(
        "wrote {} ({}x{} px, {} rows, methods {})",
        output.display(),
        width,
        height,
        len,
        columns
            .iter()
            .map(|c| c.name())
            .collect::<Vec<_>>()
            .join(",")
    );
    Ok(())
}

/// Colour of box_a (the region of a that is replaced).
const BOX_A: Rgb<u8> = Rgb([0, 220, 60]);
/// Colour of box_b (the region of b that is pasted).
const BOX_B: Rgb<u8> = Rgb([255, 140, 0]);

fn draw_legend(
    image: &mut RgbImage,
    font: &FontRef,
    model_note: &str,
    first_method: &str,
    batch: &ShowBatch,
    height: u32,
) {
    let lines = [
        "Each row: image a, its partner b, the CAM (SPM) of each image's own label, then each method's mixed image.".to_string(),
        format!(
            "Green box: box_a, the region of a that is replaced.  Orange box: box_b, the region of b pasted (resized) into box_a.  Columns 1-4 show {} boxes.",
            first_method
        ),
        format!(
            "Numbers on a tile: label weights of a's class and b's class.{}",
            if batch.masks.is_some() {
                "  'true parts': share of each image's ground-truth part in the mixed image."
            } else {
                ""
            }
        ),
        model_note.to_string(),
    ];
    for (k, line) in lines.iter().enumerate() {
        canvas::draw_text(image, font, line, 8, 6 + 18 * k as i32, 14.0, BLACK);
    }
    // Heat scale.
    let (x0, y0, w) = (8i32, height as i32 - 16, 200u32);
    for dx in 0..w {
        let c = canvas::heat_colour(dx as f32 / (w - 1) as f32);
        let colour = Rgb(c.map(|v| (v * 255.0) as u8));
        canvas::fill_rect(image, x0 + dx as i32, y0, 1, 10, colour);
    }
    canvas::draw_text(
        image,
        font,
        "CAM low",
        x0 + w as i32 + 6,
        y0 - 4,
        13.0,
        BLACK,
    );
    canvas::draw_text(
        image,
        font,
        "-> high (scaled to its max)",
        x0 + w as i32 + 64,
        y0 - 4,
        13.0,
        BLACK,
    );
}

fn caption_line(image: &mut RgbImage, font: &FontRef, text: &str, col: i32, row: i32) {
    canvas::draw_text(image, font, text, col, row, 13.0, BLACK);
}

/// The images `[B, 3, rows, cols]` (ImageNet-normalised) as RGB pictures.
fn denormalise(images: &Tensor) -> Result<Vec<RgbImage>> {
    let (batch, _, rows, cols) = images.dims4()?;
    let values = images
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let plane = rows * cols;
    Ok((0..batch)
        .map(|b| {
            RgbImage::from_fn(cols as u32, rows as u32, |x, y| {
                let i = y as usize * cols + x as usize;
                Rgb(std::array::from_fn(|c| {
                    let v = values[(b * 3 + c) * plane + i] * IMAGENET_STD[c] + IMAGENET_MEAN[c];
                    (v * 255.0).round().clamp(0.0, 255.0) as u8
                }))
            })
        })
        .collect())
}

/// The picture blended 50/50 with the heat colours of `spm` (scaled to its maximum).
fn overlay_heat(picture: &RgbImage, spm: &[Vec<f32>], degenerate: bool) -> RgbImage {
    let max = spm
        .iter()
        .flatten()
        .copied()
        .fold(0.0f32, f32::max)
        .max(f32::MIN_POSITIVE);
    RgbImage::from_fn(picture.width(), picture.height(), |x, y| {
        let p = picture.get_pixel(x, y);
        if degenerate {
            return Rgb(p.0.map(|v| v / 2));
        }
        let heat = canvas::heat_colour(spm[y as usize][x as usize] / max);
        Rgb(std::array::from_fn(|c| {
            (f32::from(p[c]) * 0.45 + heat[c] * 255.0 * 0.55) as u8
        }))
    })
}

/// Scales a picture to `tile x tile` (nearest neighbour keeps the pixels honest).
fn upscale(picture: &RgbImage, tile: u32) -> RgbImage {
    imageops::resize(picture, tile, tile, imageops::FilterType::Nearest)
}

fn paste(canvas_img: &mut RgbImage, tile: &RgbImage, col: i32, row: i32) {
    imageops::replace(canvas_img, tile, i64::from(col), i64::from(row));
}

/// Outlines `bbox` (image pixels) on a picture scaled by `scale`.
fn draw_box(picture: &mut RgbImage, bbox: PixelBox, scale: f32, colour: Rgb<u8>) {
    if bbox.area() == 0 {
        return;
    }
    let x = (bbox.col0 as f32 * scale).round() as i32;
    let y = (bbox.row0 as f32 * scale).round() as i32;
    let w = (bbox.cols() as f32 * scale).round() as u32;
    let h = (bbox.rows() as f32 * scale).round() as u32;
    canvas::outline_rect(picture, x, y, w, h, 3, colour);
}

/// `--batch` test images of a real dataset (test transform, resize 8/7 of the crop).
fn real_batch(args: &Args, rng: &mut ChaCha8Rng, device: &Device) -> Result<ShowBatch> {
    let root = args
        .root
        .as_deref()
        .with_context(|| format!("--dataset {} needs --root DIR", args.dataset))?;
    let options = snapmix_data::LoadOptions::default();
    let (splits, mode) = match args.dataset.as_str() {
        "cub" => (
            snapmix_data::cub::load(root, options)?,
            ResizeMode::ShorterSide,
        ),
        "cars" => (snapmix_data::cars::load(root, options)?, ResizeMode::Warp),
        "aircraft" => (
            snapmix_data::aircraft::load(root, Default::default())?,
            ResizeMode::Warp,
        ),
        "folder" => (
            snapmix_data::folder::load(root, options)?,
            ResizeMode::ShorterSide,
        ),
        other => bail!("unknown --dataset `{other}`: synthetic, cub, cars, aircraft or folder"),
    };
    let class_names = splits.class_names().to_vec();
    let test: Arc<dyn ImageDataset> = Arc::new(splits.test);
    if test.len() < 2 {
        bail!(
            "the test split of {} has {} image(s): need 2",
            root.display(),
            test.len()
        );
    }
    let resize = args.crop * 8 / 7;
    let loader = Loader::new(
        test.clone(),
        Transform::test(mode, resize, args.crop),
        LoaderConfig::test(args.batch),
    )?;
    let indices: Vec<usize> = (0..args.batch.min(test.len()))
        .map(|_| rng.random_range(0..test.len()))
        .collect();
    let batch = loader.load_batch(0, &indices)?;
    Ok(ShowBatch {
        images: batch.images_tensor(device)?,
        labels: batch.labels_tensor(device)?,
        label_values: batch.labels.clone(),
        masks: None,
        class_names,
        size: args.crop,
    })
}

/// A ResNet of `arch` with `classes` outputs (and a mid-level head if the file has one), loaded
/// strictly from `weights`.
fn load_model(arch: &str, classes: usize, weights: &Path, device: &Device) -> Result<ResNet> {
    let arch: Arch = arch.parse().with_context(|| format!("--arch {arch}"))?;
    let tensors = snapmix_models::read_safetensors(weights, device)
        .with_context(|| format!("reading {}", weights.display()))?;
    let base_width = tensors
        .get("conv1.weight")
        .map(|t| t.dims()[0])
        .with_context(|| format!("{} has no conv1.weight", weights.display()))?;
    let config = ResNetConfig {
        base_width,
        mid_level: tensors
            .contains_key("mid_fc.weight")
            .then(MidLevelConfig::default),
        ..ResNetConfig::new(arch, classes)
    };
    let varmap = VarMap::new();
    let model = ResNet::from_config(config, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
    model
        .load_state_dict(
            &tensors,
            &weights.display().to_string(),
            LoadOptions::strict(),
        )
        .with_context(|| {
            format!(
                "loading {} as {arch} with {classes} classes",
                weights.display()
            )
        })?;
    Ok(model)
}
