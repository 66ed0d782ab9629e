//! Reading the datasets' plain-text lists: tolerant of CRLF endings, a UTF-8 byte-order mark,
//! stray whitespace and blank lines, and precise about the line that was wrong.

use std::path::{Path, PathBuf};

use crate::error::DataError;

/// The non-blank lines of a text file, each with its 1-based line number, trimmed of
/// surrounding whitespace (so CRLF endings and trailing spaces do not leak into names).
pub(crate) struct TextLines {
    /// The file, for error messages.
    pub path: PathBuf,
    /// (1-based line number, trimmed content) of every non-blank line.
    pub lines: Vec<(usize, String)>,
}

impl TextLines {
    /// Reads `path`; fails naming the file if it is missing or not valid UTF-8.
    pub fn read(path: &Path) -> Result<Self, DataError> {
        let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count();
            DataError::parse(path, line, "not valid UTF-8", e.utf8_error().to_string())
        })?;
        Ok(Self::parse(path, &text))
    }

    /// Splits `text` (the content of `path`) into its non-blank trimmed lines.
    pub fn parse(path: &Path, text: &str) -> Self {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let lines = text
            .split('\n')
            .enumerate()
            .map(|(i, line)| (i + 1, line.trim().to_string()))
            .filter(|(_, line)| !line.is_empty())
            .collect();
        Self {
            path: path.to_path_buf(),
            lines,
        }
    }

    /// Splits every line into its first whitespace-separated field and the rest (trimmed):
    /// `"12 Boeing 737-300"` -> `("12", "Boeing 737-300")`. Fails naming the line when a line
    /// has a single field.
    pub fn key_rest(&self, what: &str) -> Result<Vec<(usize, String, String)>, DataError> {
        self.lines
            .iter()
            .map(
                |(line_no, line)| match line.split_once(char::is_whitespace) {
                    Some((key, rest)) if !rest.trim().is_empty() => {
                        Ok((*line_no, key.to_string(), rest.trim().to_string()))
                    }
                    _ => Err(DataError::parse(
                        &self.path,
                        *line_no,
                        format!("expected `{what}`"),
                        line.as_str(),
                    )),
                },
            )
            .collect()
    }
}

/// Parses `value` as an unsigned integer, failing with the file, line and value.
pub(crate) fn parse_uint(
    path: &Path,
    line: usize,
    what: &str,
    value: &str,
) -> Result<u64, DataError> {
    value
        .parse::<u64>()
        .map_err(|_| DataError::parse(path, line, format!("expected {what} (an integer)"), value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crlf_bom_and_blank_lines_are_tolerated() {
        let text = "\u{feff}1 a b\r\n\r\n2  c \r\n\n\n";
        let lines = TextLines::parse(Path::new("f.txt"), text);
        assert_eq!(
            lines.lines,
            vec![(1, "1 a b".to_string()), (3, "2  c".to_string())]
        );
        let pairs = lines.key_rest("id name").unwrap();
        assert_eq!(pairs[0], (1, "1".into(), "a b".into()));
        assert_eq!(pairs[1], (3, "2".into(), "c".into()));
    }

    #[test]
    fn a_line_without_a_value_is_an_error_naming_the_line() {
        let lines = TextLines::parse(Path::new("f.txt"), "1 a\n7\n");
        let err = lines.key_rest("id name").unwrap_err().to_string();
        assert!(err.contains("f.txt:2"), "{err}");
        assert!(err.contains("\"7\""), "{err}");
    }

    #[test]
    fn bad_integers_name_the_value() {
        let err = parse_uint(Path::new("g.txt"), 4, "image id", "x1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("g.txt:4") && err.contains("x1"), "{err}");
    }
}
