//! Object bounding boxes of CUB, Stanford Cars and FGVC-Aircraft in one convention: 0-based,
//! half-open pixel rows and columns of the image as decoded (after any banner crop).

use crate::error::Origin;

/// A box of pixels: rows `row_start..row_end` and columns `col_start..col_end` (0-based,
/// half-open, so `row_end - row_start` rows). Once a split is built, every box lies inside its
/// image and holds at least one pixel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ObjectBox {
    /// First row.
    pub row_start: u32,
    /// One past the last row.
    pub row_end: u32,
    /// First column.
    pub col_start: u32,
    /// One past the last column.
    pub col_end: u32,
}

impl ObjectBox {
    /// Number of rows.
    pub fn rows(&self) -> u32 {
        self.row_end - self.row_start
    }

    /// Number of columns.
    pub fn cols(&self) -> u32 {
        self.col_end - self.col_start
    }

    /// From 1-based inclusive corners, as the Stanford Cars devkit (`bbox_x1..bbox_y2`) and
    /// FGVC-Aircraft (`xmin ymin xmax ymax`, "the top-left pixel has coordinate (1,1)") give
    /// them: columns `x1 - 1 .. x2`, rows `y1 - 1 .. y2`. See [`ObjectBox::enclosing`].
    pub fn from_one_based_corners(x1: f64, y1: f64, x2: f64, y2: f64) -> Result<Self, String> {
        Self::enclosing(y1 - 1.0, y2, x1 - 1.0, x2)
    }

    /// From CUB's `x y width height`, taken as the 0-based top-left corner and the size:
    /// columns `x .. x + width`, rows `y .. y + height`. See [`ObjectBox::enclosing`].
    pub fn from_corner_and_size(x: f64, y: f64, width: f64, height: f64) -> Result<Self, String> {
        if !(width > 0.0 && height > 0.0) {
            return Err(format!("width {width} and height {height} must be > 0"));
        }
        Self::enclosing(y, y + height, x, x + width)
    }

    /// The smallest pixel box holding the real-valued half-open box `[row_start, row_end) x
    /// [col_start, col_end)`; a start below 0 is clipped to 0. Fails on non-finite values and
    /// on an end not after its start.
    pub fn enclosing(
        row_start: f64,
        row_end: f64,
        col_start: f64,
        col_end: f64,
    ) -> Result<Self, String> {
        let values = [row_start, row_end, col_start, col_end];
        if values
            .iter()
            .any(|v| !v.is_finite() || v.abs() > f64::from(u32::MAX))
        {
            return Err(format!(
                "coordinates {values:?} are not finite pixel positions"
            ));
        }
        if row_end <= row_start || col_end <= col_start {
            return Err(format!(
                "empty or inverted box: rows {row_start}..{row_end}, cols {col_start}..{col_end}"
            ));
        }
        if row_end <= 0.0 || col_end <= 0.0 {
            return Err(format!(
                "box ends before the image starts: rows ..{row_end}, cols ..{col_end}"
            ));
        }
        // Bounded by u32::MAX above, so the casts keep the value.
        let start = |v: f64| v.max(0.0).floor() as u32;
        let end = |v: f64| v.ceil() as u32;
        Ok(Self {
            row_start: start(row_start),
            row_end: end(row_end),
            col_start: start(col_start),
            col_end: end(col_end),
        })
    }

    /// The part inside an image of `rows x cols`, or `None` when the box lies wholly outside.
    pub fn clip(&self, rows: u32, cols: u32) -> Option<Self> {
        let clipped = Self {
            row_start: self.row_start,
            row_end: self.row_end.min(rows),
            col_start: self.col_start,
            col_end: self.col_end.min(cols),
        };
        (clipped.row_start < clipped.row_end && clipped.col_start < clipped.col_end)
            .then_some(clipped)
    }
}

/// A box and the annotation line (or `.mat` struct index) that gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedBox {
    /// The box, in the convention of [`ObjectBox`].
    pub bounds: ObjectBox,
    /// Where it was listed.
    pub origin: Origin,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bx(row_start: u32, row_end: u32, col_start: u32, col_end: u32) -> ObjectBox {
        ObjectBox {
            row_start,
            row_end,
            col_start,
            col_end,
        }
    }

    #[test]
    fn one_based_inclusive_corners_become_zero_based_half_open() {
        // Pixels 1..=3 (1-based) are 0..3 (0-based, half-open).
        let b = ObjectBox::from_one_based_corners(1.0, 2.0, 3.0, 5.0).unwrap();
        assert_eq!(b, bx(1, 5, 0, 3));
        assert_eq!((b.rows(), b.cols()), (4, 3));
        // A single pixel.
        let b = ObjectBox::from_one_based_corners(7.0, 7.0, 7.0, 7.0).unwrap();
        assert_eq!(b, bx(6, 7, 6, 7));
        // Inverted corners are an error.
        assert!(ObjectBox::from_one_based_corners(5.0, 1.0, 4.0, 3.0).is_err());
    }

    #[test]
    fn cub_corner_and_size_enclose_fractional_pixels() {
        assert_eq!(
            ObjectBox::from_corner_and_size(1.0, 2.0, 20.0, 15.0).unwrap(),
            bx(2, 17, 1, 21)
        );
        // 60.5 .. 60.5 + 10.2 covers pixels 60..71.
        assert_eq!(
            ObjectBox::from_corner_and_size(60.5, 0.0, 10.2, 3.0).unwrap(),
            bx(0, 3, 60, 71)
        );
        for (w, h) in [(0.0, 3.0), (3.0, -1.0), (f64::NAN, 2.0)] {
            assert!(ObjectBox::from_corner_and_size(0.0, 0.0, w, h).is_err());
        }
        assert!(ObjectBox::from_corner_and_size(f64::INFINITY, 0.0, 1.0, 1.0).is_err());
    }

    #[test]
    fn boxes_are_clipped_to_the_image_and_outside_ones_vanish() {
        // Negative starts are clipped at construction, ends at clip time.
        let b = ObjectBox::enclosing(-3.0, 12.0, -0.5, 4.0).unwrap();
        assert_eq!(b, bx(0, 12, 0, 4));
        assert_eq!(b.clip(10, 40), Some(bx(0, 10, 0, 4)));
        assert_eq!(bx(5, 9, 50, 60).clip(10, 40), None);
        assert_eq!(bx(10, 12, 0, 4).clip(10, 40), None);
        assert!(ObjectBox::enclosing(-5.0, -1.0, 0.0, 3.0).is_err());
    }
}
