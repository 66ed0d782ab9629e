//! The official fine-grained transforms: resize (shorter side or warp), crop (random or
//! centre), horizontal flip and ImageNet normalisation, written straight into one image's slot
//! of an NCHW f32 batch. Sampling the geometry (random) is separate from applying it (pure).

use std::borrow::Cow;

use fast_image_resize as fir;
use image::{GrayImage, RgbImage};
use rand::Rng;

use crate::error::DataError;

/// ImageNet channel means (RGB), as in torchvision.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations (RGB), as in torchvision.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// How an image is resized before cropping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeMode {
    /// Shorter side to `resize`, keeping the aspect ratio (CUB, image folders).
    ShorterSide,
    /// Both sides to `resize`, ignoring the aspect ratio (Stanford Cars, FGVC-Aircraft).
    Warp,
    /// No resize: crop from the image as it is (the synthetic set, already at its size).
    Keep,
}

/// Which resizer runs: kept selectable so `cargo xtask bench-data` can compare them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Resizer {
    /// `fast_image_resize` (SIMD convolution), the default.
    #[default]
    FastImageResize,
    /// `image::imageops::resize` with the triangle (bilinear) filter.
    ImageCrate,
}

/// A per-image transform producing a `3 x crop x crop` normalised f32 tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Transform {
    /// How to resize.
    pub resize_mode: ResizeMode,
    /// Target size of the resize (shorter side, or both sides for `Warp`).
    pub resize: usize,
    /// Side of the square crop; the output is `3 x crop x crop`.
    pub crop: usize,
    /// Random crop position (training) instead of the centre (testing).
    pub random_crop: bool,
    /// Random horizontal flip with probability 1/2.
    pub flip: bool,
    /// Channel means subtracted after scaling to [0, 1].
    pub mean: [f32; 3],
    /// Channel standard deviations divided by.
    pub std: [f32; 3],
    /// The resizer implementation.
    pub resizer: Resizer,
}

/// Where and how one image is resized, cropped and flipped: sampled once per image and epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Rows after the resize.
    pub resized_rows: usize,
    /// Columns after the resize.
    pub resized_cols: usize,
    /// First row of the crop in the resized image.
    pub top: usize,
    /// First column of the crop in the resized image.
    pub left: usize,
    /// Mirror left-right.
    pub flip: bool,
}

impl Transform {
    /// The training recipe: resize, random crop, random flip, ImageNet normalisation
    /// (the paper's: `train(mode, 512, 448)`).
    pub fn train(resize_mode: ResizeMode, resize: usize, crop: usize) -> Self {
        Self {
            resize_mode,
            resize,
            crop,
            random_crop: true,
            flip: true,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
            resizer: Resizer::default(),
        }
    }

    /// The test recipe: resize, centre crop, ImageNet normalisation.
    pub fn test(resize_mode: ResizeMode, resize: usize, crop: usize) -> Self {
        Self {
            random_crop: false,
            flip: false,
            ..Self::train(resize_mode, resize, crop)
        }
    }

    /// Checks that the sizes can work (crop fits in the resize, nothing is zero).
    pub fn validate(&self) -> Result<(), DataError> {
        if self.crop == 0 {
            return Err(DataError::config("crop", self.crop, "must be positive"));
        }
        if self.resize_mode != ResizeMode::Keep && self.resize < self.crop {
            return Err(DataError::config(
                "resize",
                self.resize,
                format!("smaller than the crop {}", self.crop),
            ));
        }
        if let Some(s) = self.std.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Err(DataError::config("std", s, "must be positive"));
        }
        Ok(())
    }

    /// The size after the resize, for a `rows x cols` input.
    pub fn resized_size(&self, rows: usize, cols: usize) -> (usize, usize) {
        match self.resize_mode {
            ResizeMode::Keep => (rows, cols),
            ResizeMode::Warp => (self.resize, self.resize),
            // torchvision: the longer side is int(size * long / short).
            ResizeMode::ShorterSide if rows <= cols => {
                let long = (self.resize as f64 * cols as f64 / rows as f64) as usize;
                (self.resize, long.max(self.resize))
            }
            ResizeMode::ShorterSide => {
                let long = (self.resize as f64 * rows as f64 / cols as f64) as usize;
                (long.max(self.resize), self.resize)
            }
        }
    }

    /// Draws the crop position and flip for a `rows x cols` image.
    pub fn sample_geometry<R: Rng>(&self, rows: usize, cols: usize, rng: &mut R) -> Geometry {
        let (resized_rows, resized_cols) = self.resized_size(rows, cols);
        let (spare_rows, spare_cols) = (
            resized_rows.saturating_sub(self.crop),
            resized_cols.saturating_sub(self.crop),
        );
        let (top, left) = if self.random_crop {
            (
                rng.random_range(0..=spare_rows),
                rng.random_range(0..=spare_cols),
            )
        } else {
            (centre_offset(spare_rows), centre_offset(spare_cols))
        };
        let flip = self.flip && rng.random_bool(0.5);
        Geometry {
            resized_rows,
            resized_cols,
            top,
            left,
            flip,
        }
    }

    /// Resizes, crops, flips and normalises `image` into `out` (`3 * crop * crop` floats, NCHW
    /// planes). A crop larger than the resized image is zero-padded (after normalisation: the
    /// padding reads as 0, the mean colour).
    pub fn apply(
        &self,
        image: &RgbImage,
        geometry: &Geometry,
        out: &mut [f32],
    ) -> Result<(), DataError> {
        let plane = self.crop * self.crop;
        check_len(out.len(), 3 * plane)?;
        let region = self.resize_rgb(image, geometry)?;
        let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * self.std[c]));
        let bias: [f32; 3] = std::array::from_fn(|c| -self.mean[c] / self.std[c]);
        let (rows, cols) = visible(self.crop, geometry);
        if rows < self.crop || cols < self.crop {
            out.fill(0.0);
        }
        let (red, rest) = out.split_at_mut(plane);
        let (green, blue) = rest.split_at_mut(plane);
        for row in 0..rows {
            let src_start = ((region.top + row) * region.stride_cols + region.left) * 3;
            let src = &region.pixels[src_start..src_start + cols * 3];
            let dst = row * self.crop;
            let (r_out, g_out, b_out) = (
                &mut red[dst..dst + cols],
                &mut green[dst..dst + cols],
                &mut blue[dst..dst + cols],
            );
            if geometry.flip {
                for (col, pixel) in src.chunks_exact(3).enumerate() {
                    let target = cols - 1 - col;
                    r_out[target] = f32::from(pixel[0]) * scale[0] + bias[0];
                    g_out[target] = f32::from(pixel[1]) * scale[1] + bias[1];
                    b_out[target] = f32::from(pixel[2]) * scale[2] + bias[2];
                }
            } else {
                for (((pixel, r), g), b) in src
                    .chunks_exact(3)
                    .zip(r_out.iter_mut())
                    .zip(g_out.iter_mut())
                    .zip(b_out.iter_mut())
                {
                    *r = f32::from(pixel[0]) * scale[0] + bias[0];
                    *g = f32::from(pixel[1]) * scale[1] + bias[1];
                    *b = f32::from(pixel[2]) * scale[2] + bias[2];
                }
            }
        }
        Ok(())
    }

    /// Applies the same geometry to a part mask (nearest-neighbour resize) into `out`
    /// (`crop * crop` floats, 1.0 inside the part).
    pub fn apply_mask(
        &self,
        mask: &GrayImage,
        geometry: &Geometry,
        out: &mut [f32],
    ) -> Result<(), DataError> {
        check_len(out.len(), self.crop * self.crop)?;
        let (cols, rows) = mask.dimensions();
        let (rows, cols) = (rows as usize, cols as usize);
        out.fill(0.0);
        let crop_rows = self.crop.min(geometry.resized_rows - geometry.top);
        let crop_cols = self.crop.min(geometry.resized_cols - geometry.left);
        for row in 0..crop_rows {
            // Nearest source row/col of the resized pixel's centre.
            let src_row = ((geometry.top + row) * 2 + 1) * rows / (2 * geometry.resized_rows);
            for col in 0..crop_cols {
                let src_col = ((geometry.left + col) * 2 + 1) * cols / (2 * geometry.resized_cols);
                let target = if geometry.flip {
                    crop_cols - 1 - col
                } else {
                    col
                };
                let inside = mask.as_raw()[src_row * cols + src_col] > 127;
                out[row * self.crop + target] = if inside { 1.0 } else { 0.0 };
            }
        }
        Ok(())
    }

    /// The pixels of the crop window after the resize. `fast_image_resize` resizes only the
    /// window (its convolution still reads the source pixels around it, so the result equals
    /// resizing everything and cropping); `image` resizes everything. No resize: borrowed.
    fn resize_rgb<'a>(
        &self,
        image: &'a RgbImage,
        geometry: &Geometry,
    ) -> Result<Region<'a>, DataError> {
        let (cols, rows) = image.dimensions();
        if (rows as usize, cols as usize) == (geometry.resized_rows, geometry.resized_cols) {
            return Ok(Region {
                pixels: Cow::Borrowed(image.as_raw()),
                stride_cols: cols as usize,
                top: geometry.top,
                left: geometry.left,
            });
        }
        let (out_rows, out_cols) = (geometry.resized_rows as u32, geometry.resized_cols as u32);
        if out_rows == 0 || out_cols == 0 || rows == 0 || cols == 0 {
            return Err(DataError::config(
                "image size",
                format!("{rows}x{cols}"),
                "cannot resize an empty image",
            ));
        }
        let failed = |e: String| {
            DataError::config(
                "resize",
                format!("{rows}x{cols} -> {out_rows}x{out_cols}"),
                e,
            )
        };
        match self.resizer {
            Resizer::ImageCrate => {
                let resized = image::imageops::resize(
                    image,
                    out_cols,
                    out_rows,
                    image::imageops::FilterType::Triangle,
                );
                Ok(Region {
                    pixels: Cow::Owned(resized.into_raw()),
                    stride_cols: geometry.resized_cols,
                    top: geometry.top,
                    left: geometry.left,
                })
            }
            Resizer::FastImageResize => {
                let (window_rows, window_cols) = visible(self.crop, geometry);
                let src =
                    fir::images::ImageRef::new(cols, rows, image.as_raw(), fir::PixelType::U8x3)
                        .map_err(|e| failed(e.to_string()))?;
                let mut dst = fir::images::Image::new(
                    window_cols as u32,
                    window_rows as u32,
                    fir::PixelType::U8x3,
                );
                let (row_scale, col_scale) = (
                    f64::from(rows) / f64::from(out_rows),
                    f64::from(cols) / f64::from(out_cols),
                );
                // The window in source coordinates, clamped against float rounding at the edges.
                let (src_rows, src_cols) = (f64::from(rows), f64::from(cols));
                let src_top = (geometry.top as f64 * row_scale).min(src_rows);
                let src_left = (geometry.left as f64 * col_scale).min(src_cols);
                let src_height = (window_rows as f64 * row_scale).min(src_rows - src_top);
                let src_width = (window_cols as f64 * col_scale).min(src_cols - src_left);
                let options = fir::ResizeOptions::new()
                    .resize_alg(fir::ResizeAlg::Convolution(fir::FilterType::Bilinear))
                    .crop(src_left, src_top, src_width, src_height);
                RESIZER
                    .with_borrow_mut(|resizer| resizer.resize(&src, &mut dst, &options))
                    .map_err(|e| failed(e.to_string()))?;
                Ok(Region {
                    pixels: Cow::Owned(dst.into_vec()),
                    stride_cols: window_cols,
                    top: 0,
                    left: 0,
                })
            }
        }
    }
}

thread_local! {
    /// One resizer per decoding thread: it keeps its scratch buffers between images.
    static RESIZER: std::cell::RefCell<fir::Resizer> = std::cell::RefCell::new(fir::Resizer::new());
}

/// Resized RGB pixels holding the crop window at (`top`, `left`), rows `stride_cols` wide.
struct Region<'a> {
    pixels: Cow<'a, [u8]>,
    stride_cols: usize,
    top: usize,
    left: usize,
}

/// Rows and columns of the crop that fall inside the resized image.
fn visible(crop: usize, geometry: &Geometry) -> (usize, usize) {
    (
        crop.min(geometry.resized_rows.saturating_sub(geometry.top)),
        crop.min(geometry.resized_cols.saturating_sub(geometry.left)),
    )
}

/// torchvision's CenterCrop offset `int(round(spare / 2))`, with Python's round-half-to-even.
fn centre_offset(spare: usize) -> usize {
    let half = spare / 2;
    if spare % 2 == 1 && half % 2 == 1 {
        half + 1
    } else {
        half
    }
}

fn check_len(got: usize, want: usize) -> Result<(), DataError> {
    if got != want {
        return Err(DataError::config(
            "output slice length",
            got,
            format!("expected {want}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// Every pixel encodes its position: red = col, green = row, blue = 7.
    fn coordinate_image(rows: u32, cols: u32) -> RgbImage {
        RgbImage::from_fn(cols, rows, |c, r| image::Rgb([c as u8, r as u8, 7]))
    }

    fn unnormalise(t: &Transform, value: f32, channel: usize) -> f32 {
        (value * t.std[channel] + t.mean[channel]) * 255.0
    }

    #[test]
    fn shorter_side_keeps_aspect_and_warp_does_not() {
        let t = Transform::train(ResizeMode::ShorterSide, 512, 448);
        assert_eq!(t.resized_size(375, 500), (512, 682));
        assert_eq!(t.resized_size(500, 375), (682, 512));
        let w = Transform::train(ResizeMode::Warp, 512, 448);
        assert_eq!(w.resized_size(375, 500), (512, 512));
        let k = Transform::train(ResizeMode::Keep, 0, 32);
        assert_eq!(k.resized_size(40, 50), (40, 50));
    }

    #[test]
    fn crop_and_flip_pick_the_right_pixels() {
        let image = coordinate_image(40, 60);
        let mut t = Transform::test(ResizeMode::Keep, 0, 16);
        let geometry = Geometry {
            resized_rows: 40,
            resized_cols: 60,
            top: 5,
            left: 9,
            flip: false,
        };
        let mut out = vec![0.0; 3 * 16 * 16];
        t.apply(&image, &geometry, &mut out).unwrap();
        let plane = 16 * 16;
        // Pixel (row 2, col 3) of the crop is source (7, 12).
        assert!((unnormalise(&t, out[2 * 16 + 3], 0) - 12.0).abs() < 1e-3);
        assert!((unnormalise(&t, out[plane + 2 * 16 + 3], 1) - 7.0).abs() < 1e-3);
        assert!((unnormalise(&t, out[2 * plane + 2 * 16 + 3], 2) - 7.0).abs() < 1e-3);
        t.flip = true;
        let flipped = Geometry {
            flip: true,
            ..geometry
        };
        t.apply(&image, &flipped, &mut out).unwrap();
        // Flipped: col 3 now shows source col 9 + 15 - 3 = 21.
        assert!((unnormalise(&t, out[2 * 16 + 3], 0) - 21.0).abs() < 1e-3);
    }

    #[test]
    fn centre_crop_is_centred_and_values_are_normalised() {
        let t = Transform::test(ResizeMode::ShorterSide, 64, 56);
        let g = t.sample_geometry(30, 40, &mut ChaCha8Rng::seed_from_u64(0));
        assert_eq!((g.resized_rows, g.resized_cols), (64, 85));
        // Spare 8 rows and 29 cols: round(14.5) is 14 in Python.
        assert_eq!((g.top, g.left), (4, 14));
        assert_eq!(centre_offset(27), 14);
        let white = RgbImage::from_pixel(40, 30, image::Rgb([255, 255, 255]));
        let mut out = vec![0.0; 3 * 56 * 56];
        t.apply(&white, &g, &mut out).unwrap();
        for c in 0..3 {
            let expected = (1.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
            let plane = &out[c * 56 * 56..(c + 1) * 56 * 56];
            assert!(
                plane.iter().all(|v| (v - expected).abs() < 1e-4),
                "channel {c}"
            );
        }
    }

    #[test]
    fn random_geometry_stays_inside_and_flips_about_half() {
        let t = Transform::train(ResizeMode::ShorterSide, 512, 448);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut flips = 0;
        for _ in 0..400 {
            let g = t.sample_geometry(375, 500, &mut rng);
            assert!(g.top + 448 <= g.resized_rows && g.left + 448 <= g.resized_cols);
            flips += usize::from(g.flip);
        }
        assert!((150..250).contains(&flips), "{flips} flips of 400");
    }

    #[test]
    fn both_resizers_give_close_results_and_the_output_range_is_bounded() {
        let image = RgbImage::from_fn(50, 37, |c, r| {
            image::Rgb([(c * 5) as u8, (r * 6) as u8, ((c + r) * 3) as u8])
        });
        let mut t = Transform::train(ResizeMode::ShorterSide, 64, 48);
        let g = t.sample_geometry(37, 50, &mut ChaCha8Rng::seed_from_u64(1));
        let mut fast = vec![0.0; 3 * 48 * 48];
        t.apply(&image, &g, &mut fast).unwrap();
        t.resizer = Resizer::ImageCrate;
        let mut slow = vec![0.0; 3 * 48 * 48];
        t.apply(&image, &g, &mut slow).unwrap();
        let max_diff = fast
            .iter()
            .zip(&slow)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        // Resizers differ in rounding and edge handling by a few grey levels at most.
        assert!(max_diff < 8.0 / (255.0 * 0.224), "max diff {max_diff}");
        for (c, plane) in fast.chunks(48 * 48).enumerate() {
            let (lo, hi) = (
                -IMAGENET_MEAN[c] / IMAGENET_STD[c],
                (1.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c],
            );
            assert!(plane
                .iter()
                .all(|v| v.is_finite() && *v >= lo - 1e-4 && *v <= hi + 1e-4));
        }
    }

    #[test]
    fn resizing_the_window_equals_resizing_everything_then_cropping() {
        let image = RgbImage::from_fn(50, 37, |c, r| {
            image::Rgb([(c * 5) as u8, (r * 6) as u8, ((c * r) % 251) as u8])
        });
        let t = Transform::test(ResizeMode::ShorterSide, 64, 48);
        let mut full = t.clone();
        full.crop = 86; // the whole resized width: 64 x 86
        let g_full = Geometry {
            resized_rows: 64,
            resized_cols: 86,
            top: 0,
            left: 0,
            flip: false,
        };
        let mut everything = vec![0.0; 3 * 86 * 86];
        full.apply(&image, &g_full, &mut everything).unwrap();
        for (top, left) in [(0, 0), (16, 38), (7, 21)] {
            let g = Geometry {
                top,
                left,
                ..g_full
            };
            let mut window = vec![0.0; 3 * 48 * 48];
            t.apply(&image, &g, &mut window).unwrap();
            for c in 0..3 {
                for row in 0..48 {
                    for col in 0..48 {
                        let a = window[c * 48 * 48 + row * 48 + col];
                        let b = everything[c * 86 * 86 + (top + row) * 86 + left + col];
                        assert!(
                            (a - b).abs() <= 1.01 / (255.0 * 0.224),
                            "({top},{left}) c{c} ({row},{col}): {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn masks_follow_the_image_geometry() {
        let mut mask = GrayImage::new(20, 10);
        for r in 2..4 {
            for c in 1..3 {
                mask.put_pixel(c, r, image::Luma([255]));
            }
        }
        let t = Transform::train(ResizeMode::Warp, 20, 10);
        // Resized to 20x20 (rows doubled), crop rows 4.., cols 0.., flipped.
        let g = Geometry {
            resized_rows: 20,
            resized_cols: 20,
            top: 4,
            left: 0,
            flip: true,
        };
        let mut out = vec![0.0; 100];
        t.apply_mask(&mask, &g, &mut out).unwrap();
        // Source rows 2..4 -> resized rows 4..8 -> crop rows 0..4; cols 1..3 -> flipped 7..9.
        for row in 0..10 {
            for col in 0..10 {
                let inside = row < 4 && (7..9).contains(&col);
                assert_eq!(
                    out[row * 10 + col],
                    if inside { 1.0 } else { 0.0 },
                    "({row},{col})"
                );
            }
        }
    }

    #[test]
    fn bad_sizes_are_rejected() {
        assert!(Transform::train(ResizeMode::Warp, 100, 200)
            .validate()
            .is_err());
        assert!(Transform::train(ResizeMode::Warp, 100, 0)
            .validate()
            .is_err());
        assert!(Transform::train(ResizeMode::Keep, 0, 32).validate().is_ok());
    }
}
