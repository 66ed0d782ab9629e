//! `PixelBox`: a half-open rectangle of pixels, the one geometric type CAM box sums need.

use std::fmt;

/// A half-open pixel rectangle `[row0, row1) x [col0, col1)`, written `[row0, col0, row1, col1]`
/// like the official SnapMix boxes. Empty when `row0 == row1` or `col0 == col1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PixelBox {
    /// First row inside the box.
    pub row0: usize,
    /// First column inside the box.
    pub col0: usize,
    /// One past the last row.
    pub row1: usize,
    /// One past the last column.
    pub col1: usize,
}

impl PixelBox {
    /// The box `[row0, col0, row1, col1]`.
    pub const fn new(row0: usize, col0: usize, row1: usize, col1: usize) -> Self {
        Self {
            row0,
            col0,
            row1,
            col1,
        }
    }

    /// The whole `rows x cols` image.
    pub const fn full(rows: usize, cols: usize) -> Self {
        Self::new(0, 0, rows, cols)
    }

    /// Number of rows covered (0 for a malformed box).
    pub const fn rows(&self) -> usize {
        self.row1.saturating_sub(self.row0)
    }

    /// Number of columns covered (0 for a malformed box).
    pub const fn cols(&self) -> usize {
        self.col1.saturating_sub(self.col0)
    }

    /// Number of pixels covered.
    pub const fn area(&self) -> usize {
        self.rows() * self.cols()
    }

    /// Whether the box has its corners in order and lies inside a `rows x cols` image.
    pub const fn fits(&self, rows: usize, cols: usize) -> bool {
        self.row0 <= self.row1 && self.col0 <= self.col1 && self.row1 <= rows && self.col1 <= cols
    }
}

impl fmt::Display for PixelBox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{}, {}, {}, {}]",
            self.row0, self.col0, self.row1, self.col1
        )
    }
}
