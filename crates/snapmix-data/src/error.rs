//! The one error type of this crate: every variant names the file, line or value at fault.

use std::fmt;
use std::path::PathBuf;

/// Where an image was listed: a split file and its 1-based line (for Stanford Cars, the `.mat`
/// file and the 1-based index into its `annotations` struct array).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The split or annotation file that listed the image.
    pub file: PathBuf,
    /// 1-based line number (or struct-array index for `.mat` files).
    pub line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// Formats an optional origin as " (listed at FILE:LINE)", or nothing.
pub(crate) struct ListedAt<'a>(pub &'a Option<Origin>);

impl fmt::Display for ListedAt<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(origin) => write!(f, " (listed at {origin})"),
            None => Ok(()),
        }
    }
}

/// Everything that can go wrong while reading a dataset or building a batch.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file or directory could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A line of a text file does not have the expected form.
    #[error("{path}:{line}: {message}: {value:?}")]
    Parse {
        /// The text file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What was expected.
        message: String,
        /// The offending text.
        value: String,
    },
    /// Files that must describe the same images disagree (an id missing from one of them).
    #[error("{message}: {value:?} is in {present_in} but not in {missing_from}")]
    Mismatch {
        /// What disagrees.
        message: String,
        /// The id or name found in one file only.
        value: String,
        /// The file that has it.
        present_in: PathBuf,
        /// The file that lacks it.
        missing_from: PathBuf,
    },
    /// An image is missing or cannot be decoded.
    #[error("cannot load image {path}{}: {reason}", ListedAt(origin))]
    Image {
        /// The image file.
        path: PathBuf,
        /// The split-file line that listed it, if any.
        origin: Option<Origin>,
        /// Why it failed.
        reason: String,
    },
    /// A MATLAB 5 file is malformed or lacks what the dataset needs.
    #[error("{path}: MAT-file {message}")]
    Mat {
        /// The `.mat` file.
        path: PathBuf,
        /// What is wrong, naming the variable/field/offset.
        message: String,
    },
    /// A dataset layout is incomplete (a required file or folder is missing).
    #[error("{root}: {message}")]
    Layout {
        /// The dataset root that was given.
        root: PathBuf,
        /// What is missing.
        message: String,
    },
    /// An option or argument has an unusable value.
    #[error("invalid {name}: {value} ({message})")]
    Config {
        /// The option.
        name: &'static str,
        /// Its value.
        value: String,
        /// Why it is unusable.
        message: String,
    },
    /// The batch tensor could not be built.
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
}

impl DataError {
    /// An I/O error on `path`.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }

    /// A parse error at `path:line` on `value`.
    pub(crate) fn parse(
        path: impl Into<PathBuf>,
        line: usize,
        message: impl Into<String>,
        value: impl Into<String>,
    ) -> Self {
        DataError::Parse {
            path: path.into(),
            line,
            message: message.into(),
            value: value.into(),
        }
    }

    /// A layout error under `root`.
    pub(crate) fn layout(root: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        DataError::Layout {
            root: root.into(),
            message: message.into(),
        }
    }

    /// An unusable option value.
    pub(crate) fn config(
        name: &'static str,
        value: impl fmt::Display,
        message: impl Into<String>,
    ) -> Self {
        DataError::Config {
            name,
            value: value.to_string(),
            message: message.into(),
        }
    }
}
