//! Image decoding to 8-bit RGB, whatever the file holds (RGB, grayscale or CMYK JPEG, PNG with
//! or without alpha or 16-bit samples). JPEGs go straight to zune-jpeg (`cargo xtask
//! bench-data` compares it with `image`'s path).

use image::RgbImage;
use zune_core::bytestream::ZCursor;
use zune_core::colorspace::ColorSpace;
use zune_core::options::DecoderOptions;

/// Which JPEG decoder to use: kept selectable so `cargo xtask bench-data` can compare them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum JpegDecoder {
    /// zune-jpeg called directly, decoding into RGB (CMYK/YCCK converted by zune-jpeg).
    #[default]
    Zune,
    /// The `image` crate's JPEG path (zune-jpeg behind `image`'s `DynamicImage`).
    ImageCrate,
}

/// True when `bytes` starts with the JPEG start-of-image marker.
fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xff, 0xd8])
}

/// Decodes an image file's bytes to RGB with the default decoder.
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage, String> {
    decode_rgb_with(bytes, JpegDecoder::default())
}

/// Decodes an image file's bytes to RGB, choosing the JPEG decoder.
pub fn decode_rgb_with(bytes: &[u8], jpeg: JpegDecoder) -> Result<RgbImage, String> {
    if is_jpeg(bytes) && jpeg == JpegDecoder::Zune {
        return decode_jpeg_zune(bytes);
    }
    let image = image::load_from_memory(bytes).map_err(|e| e.to_string())?;
    Ok(image.into_rgb8())
}

/// zune-jpeg straight into an RGB buffer; grayscale and CMYK/YCCK are converted by zune-jpeg.
fn decode_jpeg_zune(bytes: &[u8]) -> Result<RgbImage, String> {
    // Strict: a truncated or damaged JPEG is an error (as in Pillow), not gray-filled pixels.
    let options = DecoderOptions::default()
        .jpeg_set_out_colorspace(ColorSpace::RGB)
        .set_strict_mode(true);
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(bytes), options);
    let pixels = decoder
        .decode()
        .map_err(|e| e.to_string().trim().to_string())?;
    let info = decoder
        .info()
        .ok_or_else(|| "JPEG without image information".to_string())?;
    let (cols, rows) = (u32::from(info.width), u32::from(info.height));
    RgbImage::from_raw(cols, rows, pixels).ok_or_else(|| {
        format!("JPEG decoder returned a buffer that does not fit {cols}x{rows} RGB")
    })
}

/// Reads only the header: (rows, cols). Catches empty, truncated-header and non-image files
/// without paying for a full decode.
pub fn image_dimensions(bytes: &[u8]) -> Result<(usize, usize), String> {
    if is_jpeg(bytes) {
        let mut decoder = zune_jpeg::JpegDecoder::new(ZCursor::new(bytes));
        decoder.decode_headers().map_err(|e| e.to_string())?;
        let info = decoder
            .info()
            .ok_or_else(|| "JPEG without image information".to_string())?;
        return Ok((usize::from(info.height), usize::from(info.width)));
    }
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| e.to_string())?;
    let (cols, rows) = reader.into_dimensions().map_err(|e| e.to_string())?;
    Ok((rows as usize, cols as usize))
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{DynamicImage, ImageFormat};

    fn encode(image: DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut bytes = Vec::new();
        image
            .write_to(&mut std::io::Cursor::new(&mut bytes), format)
            .unwrap();
        bytes
    }

    fn gradient(cols: u32, rows: u32) -> RgbImage {
        RgbImage::from_fn(cols, rows, |c, r| {
            image::Rgb([(c * 8) as u8, (r * 8) as u8, 128])
        })
    }

    #[test]
    fn both_jpeg_decoders_agree_and_keep_the_size() {
        let bytes = encode(DynamicImage::ImageRgb8(gradient(20, 12)), ImageFormat::Jpeg);
        let zune = decode_rgb_with(&bytes, JpegDecoder::Zune).unwrap();
        let via_image = decode_rgb_with(&bytes, JpegDecoder::ImageCrate).unwrap();
        assert_eq!(zune.dimensions(), (20, 12));
        let max_diff = zune
            .as_raw()
            .iter()
            .zip(via_image.as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        assert!(max_diff <= 2, "decoders differ by {max_diff}");
        assert_eq!(image_dimensions(&bytes).unwrap(), (12, 20));
    }

    #[test]
    fn grayscale_jpeg_and_png_become_rgb() {
        let gray = image::GrayImage::from_fn(9, 7, |c, _| image::Luma([(c * 20) as u8]));
        for format in [ImageFormat::Jpeg, ImageFormat::Png] {
            let bytes = encode(DynamicImage::ImageLuma8(gray.clone()), format);
            let rgb = decode_rgb(&bytes).unwrap();
            assert_eq!(rgb.dimensions(), (9, 7));
            let p = rgb.get_pixel(4, 3);
            assert!(
                p[0].abs_diff(80) <= 3 && p[0] == p[1] && p[1] == p[2],
                "{p:?}"
            );
        }
    }

    #[test]
    fn png_with_alpha_and_16_bits_becomes_rgb() {
        let rgba = image::RgbaImage::from_pixel(5, 4, image::Rgba([200, 100, 50, 10]));
        let rgb = decode_rgb(&encode(DynamicImage::ImageRgba8(rgba), ImageFormat::Png)).unwrap();
        assert_eq!(rgb.get_pixel(2, 2).0, [200, 100, 50]);
        let wide = image::ImageBuffer::<image::Rgb<u16>, _>::from_pixel(
            3,
            3,
            image::Rgb([65535u16, 0, 32896]),
        );
        let rgb = decode_rgb(&encode(DynamicImage::ImageRgb16(wide), ImageFormat::Png)).unwrap();
        assert_eq!(rgb.get_pixel(1, 1).0, [255, 0, 128]);
    }

    #[test]
    fn garbage_and_truncated_files_are_errors_not_panics() {
        assert!(decode_rgb(b"").is_err());
        assert!(decode_rgb(b"not an image at all").is_err());
        assert!(decode_rgb(&[0xff, 0xd8, 0xff]).is_err());
        assert!(image_dimensions(&[0xff, 0xd8]).is_err());
        let bytes = encode(DynamicImage::ImageRgb8(gradient(16, 16)), ImageFormat::Png);
        assert!(decode_rgb(&bytes[..bytes.len() / 2]).is_err());
        let noisy = RgbImage::from_fn(64, 48, |c, r| {
            image::Rgb([
                (c * 37 % 256) as u8,
                (r * 91 % 256) as u8,
                ((c ^ r) * 13 % 256) as u8,
            ])
        });
        let jpeg = encode(DynamicImage::ImageRgb8(noisy), ImageFormat::Jpeg);
        // (Only a missing end-of-image marker is tolerated, as libjpeg does.)
        for keep in [jpeg.len() / 3, jpeg.len() * 2 / 3, jpeg.len() * 9 / 10] {
            assert!(
                decode_rgb(&jpeg[..keep]).is_err(),
                "JPEG truncated to {keep} of {} bytes",
                jpeg.len()
            );
        }
    }
}
