//! Small raster drawing for the PNGs of `show-mix` and `bench-labels`: text in the shipped
//! DejaVu Sans font (ab_glyph), filled and outlined rectangles, a heat-map colour scale and a
//! histogram chart.

use ab_glyph::{Font, FontRef, PxScale, ScaleFont};
use anyhow::{Context, Result};
use image::{Rgb, RgbImage};

/// DejaVu Sans (data/fonts, with its licence), built into the binary so a packaged xtask needs
/// no data files.
const FONT_BYTES: &[u8] = include_bytes!("../../../data/fonts/DejaVuSans.ttf");

/// Black.
pub const BLACK: Rgb<u8> = Rgb([0, 0, 0]);
/// White.
pub const WHITE: Rgb<u8> = Rgb([255, 255, 255]);

/// The shipped font.
pub fn font() -> Result<FontRef<'static>> {
    FontRef::try_from_slice(FONT_BYTES).context("parsing the built-in DejaVuSans.ttf")
}

/// Width in pixels of `text` at `px` pixels.
pub fn text_width(font: &FontRef, text: &str, px: f32) -> u32 {
    let scaled = font.as_scaled(PxScale::from(px));
    let mut width = 0.0;
    let mut previous = None;
    for c in text.chars() {
        let id = scaled.glyph_id(c);
        if let Some(prev) = previous {
            width += scaled.kern(prev, id);
        }
        width += scaled.h_advance(id);
        previous = Some(id);
    }
    width.ceil() as u32
}

/// Draws `text` with its top-left corner at (`col`, `row`), `px` pixels tall, blending by
/// glyph coverage. Parts outside the image are clipped.
pub fn draw_text(
    image: &mut RgbImage,
    font: &FontRef,
    text: &str,
    col: i32,
    row: i32,
    px: f32,
    colour: Rgb<u8>,
) {
    let scaled = font.as_scaled(PxScale::from(px));
    let baseline = row as f32 + scaled.ascent();
    let mut caret = col as f32;
    let mut previous = None;
    for c in text.chars() {
        let id = scaled.glyph_id(c);
        if let Some(prev) = previous {
            caret += scaled.kern(prev, id);
        }
        let glyph = id.with_scale_and_position(px, ab_glyph::point(caret, baseline));
        caret += scaled.h_advance(id);
        previous = Some(id);
        let Some(outline) = font.outline_glyph(glyph) else {
            continue;
        };
        let bounds = outline.px_bounds();
        outline.draw(|gx, gy, coverage| {
            let (x, y) = (
                bounds.min.x as i32 + gx as i32,
                bounds.min.y as i32 + gy as i32,
            );
            if x < 0 || y < 0 || x >= image.width() as i32 || y >= image.height() as i32 {
                return;
            }
            let pixel = image.get_pixel_mut(x as u32, y as u32);
            let a = coverage.clamp(0.0, 1.0);
            for c in 0..3 {
                pixel[c] = (f32::from(pixel[c]) * (1.0 - a) + f32::from(colour[c]) * a) as u8;
            }
        });
    }
}

/// Draws `text` on a filled background box (padding 2 px): readable on any picture.
#[allow(clippy::too_many_arguments)]
pub fn draw_label(
    image: &mut RgbImage,
    font: &FontRef,
    text: &str,
    col: i32,
    row: i32,
    px: f32,
    colour: Rgb<u8>,
    background: Rgb<u8>,
) {
    let width = text_width(font, text, px) + 4;
    let height = (px * 1.2).ceil() as u32 + 2;
    fill_rect(image, col, row, width, height, background);
    draw_text(image, font, text, col + 2, row + 1, px, colour);
}

/// Fills a rectangle (clipped to the image).
pub fn fill_rect(
    image: &mut RgbImage,
    col: i32,
    row: i32,
    width: u32,
    height: u32,
    colour: Rgb<u8>,
) {
    let (w, h) = (image.width() as i32, image.height() as i32);
    for y in row.max(0)..(row + height as i32).min(h) {
        for x in col.max(0)..(col + width as i32).min(w) {
            image.put_pixel(x as u32, y as u32, colour);
        }
    }
}

/// Outlines a rectangle with lines `thickness` pixels wide, drawn inside its bounds.
pub fn outline_rect(
    image: &mut RgbImage,
    col: i32,
    row: i32,
    width: u32,
    height: u32,
    thickness: u32,
    colour: Rgb<u8>,
) {
    let t = thickness.min(width).min(height);
    fill_rect(image, col, row, width, t, colour);
    fill_rect(image, col, row + height as i32 - t as i32, width, t, colour);
    fill_rect(image, col, row, t, height, colour);
    fill_rect(image, col + width as i32 - t as i32, row, t, height, colour);
}

/// A perceptual-ish heat colour for `v` in [0, 1]: dark blue -> cyan -> yellow -> red.
pub fn heat_colour(v: f32) -> [f32; 3] {
    const STOPS: [[f32; 3]; 5] = [
        [0.0, 0.0, 0.5],
        [0.0, 0.5, 1.0],
        [0.3, 1.0, 0.7],
        [1.0, 0.9, 0.0],
        [0.9, 0.0, 0.0],
    ];
    let v = if v.is_finite() {
        v.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let scaled = v * (STOPS.len() - 1) as f32;
    let i = (scaled.floor() as usize).min(STOPS.len() - 2);
    let t = scaled - i as f32;
    std::array::from_fn(|c| STOPS[i][c] * (1.0 - t) + STOPS[i + 1][c] * t)
}

/// A bar chart of `counts` over `[0, max]`, with a title, axis ticks and a marker at `mean`.
pub fn histogram_png(
    font: &FontRef,
    title: &str,
    counts: &[usize],
    max: f64,
    mean: f64,
) -> RgbImage {
    let (width, height) = (640u32, 360u32);
    let (left, right, top, bottom) = (56i32, 16i32, 40i32, 44i32);
    let mut image = RgbImage::from_pixel(width, height, WHITE);
    draw_text(&mut image, font, title, left, 8, 18.0, BLACK);
    let plot_w = width as i32 - left - right;
    let plot_h = height as i32 - top - bottom;
    let highest = counts.iter().copied().max().unwrap_or(0).max(1);
    let bar_w = plot_w as f32 / counts.len().max(1) as f32;
    for (i, &count) in counts.iter().enumerate() {
        let h = (count as f32 / highest as f32 * plot_h as f32).round() as u32;
        let x0 = left + (i as f32 * bar_w).round() as i32;
        let x1 = left + ((i + 1) as f32 * bar_w).round() as i32;
        fill_rect(
            &mut image,
            x0,
            top + plot_h - h as i32,
            (x1 - x0 - 1).max(1) as u32,
            h,
            Rgb([70, 110, 180]),
        );
    }
    // Axes, ticks and labels.
    fill_rect(&mut image, left, top + plot_h, plot_w as u32, 2, BLACK);
    fill_rect(&mut image, left - 2, top, 2, plot_h as u32 + 2, BLACK);
    for k in 0..=5 {
        let value = max * k as f64 / 5.0;
        let x = left + (plot_w as f64 * k as f64 / 5.0).round() as i32;
        fill_rect(&mut image, x, top + plot_h, 1, 6, BLACK);
        let text = format!("{value:.1}");
        let tw = text_width(font, &text, 14.0) as i32;
        draw_text(
            &mut image,
            font,
            &text,
            x - tw / 2,
            top + plot_h + 8,
            14.0,
            BLACK,
        );
    }
    let axis = "absolute label error";
    let tw = text_width(font, axis, 14.0) as i32;
    draw_text(
        &mut image,
        font,
        axis,
        left + plot_w / 2 - tw / 2,
        height as i32 - 18,
        14.0,
        BLACK,
    );
    draw_text(
        &mut image,
        font,
        &highest.to_string(),
        4,
        top - 2,
        14.0,
        BLACK,
    );
    draw_text(&mut image, font, "0", 40, top + plot_h - 14, 14.0, BLACK);
    // The mean, as a red line with its value.
    let x = left + ((mean / max).clamp(0.0, 1.0) * plot_w as f64).round() as i32;
    fill_rect(&mut image, x, top, 2, plot_h as u32, Rgb([210, 30, 30]));
    draw_label(
        &mut image,
        font,
        &format!("mean {mean:.3}"),
        (x + 4).min(width as i32 - 110),
        top + 2,
        14.0,
        Rgb([210, 30, 30]),
        WHITE,
    );
    image
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_drawn_inside_its_measured_box() {
        let font = font().unwrap();
        let mut image = RgbImage::from_pixel(120, 30, WHITE);
        draw_text(&mut image, &font, "lam 0.42", 5, 5, 16.0, BLACK);
        let width = text_width(&font, "lam 0.42", 16.0);
        assert!(width > 40 && width < 100, "{width}");
        let dark: Vec<(u32, u32)> = image
            .enumerate_pixels()
            .filter(|(_, _, p)| p[0] < 128)
            .map(|(x, y, _)| (x, y))
            .collect();
        assert!(dark.len() > 30, "{} dark pixels", dark.len());
        assert!(dark
            .iter()
            .all(|&(x, y)| x >= 5 && x <= 6 + width && (5..25).contains(&y)));
    }

    #[test]
    fn heat_colours_run_from_blue_to_red() {
        let cold = heat_colour(0.0);
        let hot = heat_colour(1.0);
        assert!(cold[2] > cold[0] && hot[0] > hot[2]);
        assert_eq!(heat_colour(f32::NAN), cold);
    }
}
