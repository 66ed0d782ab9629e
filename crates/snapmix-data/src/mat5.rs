//! A small reader for MATLAB 5 (`-v5`/`-v7`) MAT-files: numeric, char, cell and struct arrays,
//! zlib-compressed elements, small-element tags and either byte order. Just what the Stanford
//! Cars devkit needs; the `matfile` crate skips struct and cell arrays, hence this module.

use std::path::Path;

use crate::error::DataError;

/// A decoded MATLAB array. Dimensions are MATLAB's (column-major, at least two).
#[derive(Debug, Clone, PartialEq)]
pub enum MatValue {
    /// Any numeric or logical array, converted to f64 (the real part only).
    Numeric {
        /// Dimensions.
        dims: Vec<usize>,
        /// Elements in column-major order.
        data: Vec<f64>,
    },
    /// A char array; a row vector is one string.
    Char {
        /// Dimensions.
        dims: Vec<usize>,
        /// Characters in column-major order.
        chars: Vec<char>,
    },
    /// A cell array.
    Cell {
        /// Dimensions.
        dims: Vec<usize>,
        /// Elements in column-major order.
        items: Vec<MatValue>,
    },
    /// A struct array: `items[element][field]`.
    Struct {
        /// Dimensions.
        dims: Vec<usize>,
        /// Field names, in file order.
        fields: Vec<String>,
        /// Per element (column-major), the value of each field.
        items: Vec<Vec<MatValue>>,
    },
}

impl MatValue {
    /// The value as a string, for a char row or column vector (or an empty char array).
    pub fn as_string(&self) -> Option<String> {
        match self {
            MatValue::Char { dims, chars } if dims.iter().filter(|&&d| d > 1).count() <= 1 => {
                Some(chars.iter().collect())
            }
            _ => None,
        }
    }

    /// The value as one number, for a numeric array with exactly one element.
    pub fn as_scalar(&self) -> Option<f64> {
        match self {
            MatValue::Numeric { data, .. } if data.len() == 1 => Some(data[0]),
            _ => None,
        }
    }

    /// A short name of the array kind, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            MatValue::Numeric { .. } => "numeric array",
            MatValue::Char { .. } => "char array",
            MatValue::Cell { .. } => "cell array",
            MatValue::Struct { .. } => "struct array",
        }
    }

    /// For a struct array: the value of `field` in element `index`.
    pub fn field(&self, index: usize, field: &str) -> Option<&MatValue> {
        match self {
            MatValue::Struct { fields, items, .. } => {
                let f = fields.iter().position(|name| name == field)?;
                items.get(index)?.get(f)
            }
            _ => None,
        }
    }
}

/// Reads every named variable of a MAT-file, in file order.
pub fn read_mat5(path: &Path) -> Result<Vec<(String, MatValue)>, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    parse_mat5(&bytes).map_err(|message| DataError::Mat {
        path: path.to_path_buf(),
        message,
    })
}

/// Parses a MAT-file held in memory; the error says what is wrong and at which byte offset.
pub fn parse_mat5(bytes: &[u8]) -> Result<Vec<(String, MatValue)>, String> {
    if bytes.len() < 128 {
        return Err(format!(
            "too short for a MAT-file header ({} bytes)",
            bytes.len()
        ));
    }
    if bytes.starts_with(b"MATLAB 7.3") {
        return Err("is MATLAB 7.3 (HDF5); re-save it with save(..., '-v7')".into());
    }
    let big_endian = match &bytes[126..128] {
        b"IM" => false,
        b"MI" => true,
        other => {
            return Err(format!(
                "has no MATLAB 5 endian indicator (bytes 126..128 are {other:?}; a MATLAB 4 file?)"
            ))
        }
    };
    let mut reader = Reader {
        bytes,
        pos: 128,
        big_endian,
        base: 0,
    };
    let mut variables = Vec::new();
    while reader.pos + 8 <= bytes.len() {
        let (data_type, data) = reader.element()?;
        match data_type {
            MI_COMPRESSED => {
                let inflated = inflate(data).map_err(|e| {
                    format!(
                        "compressed element at byte {}: {e}",
                        reader.pos - data.len()
                    )
                })?;
                let mut inner = Reader {
                    bytes: &inflated,
                    pos: 0,
                    big_endian,
                    base: 0,
                };
                let (inner_type, inner_data) = inner.element()?;
                if inner_type == MI_MATRIX {
                    variables.push(parse_matrix(inner_data, big_endian, 0)?);
                }
            }
            MI_MATRIX => variables.push(parse_matrix(data, big_endian, reader.base)?),
            // Other top-level elements (e.g. function handles' workspace) are not variables.
            _ => {}
        }
    }
    Ok(variables)
}

const MI_INT8: u32 = 1;
const MI_UINT8: u32 = 2;
const MI_INT16: u32 = 3;
const MI_UINT16: u32 = 4;
const MI_INT32: u32 = 5;
const MI_UINT32: u32 = 6;
const MI_SINGLE: u32 = 7;
const MI_DOUBLE: u32 = 9;
const MI_INT64: u32 = 12;
const MI_UINT64: u32 = 13;
const MI_MATRIX: u32 = 14;
const MI_COMPRESSED: u32 = 15;
const MI_UTF8: u32 = 16;
const MI_UTF16: u32 = 17;
const MI_UTF32: u32 = 18;

const MX_CELL: u8 = 1;
const MX_STRUCT: u8 = 2;
const MX_CHAR: u8 = 4;
const MX_SPARSE: u8 = 5;

/// Nesting deeper than this is rejected rather than risking the stack on a hostile file.
const MAX_DEPTH: usize = 64;
/// Decompressed elements larger than this are rejected (zip bombs).
const MAX_INFLATED: usize = 1 << 30;

fn inflate(data: &[u8]) -> Result<Vec<u8>, String> {
    miniz_oxide::inflate::decompress_to_vec_zlib_with_limit(data, MAX_INFLATED)
        .map_err(|e| format!("zlib error {:?}", e.status))
}

/// A cursor over tagged data elements.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    big_endian: bool,
    /// Offset of `bytes` in the file, for error messages (0 inside decompressed data).
    base: usize,
}

impl<'a> Reader<'a> {
    fn u32_at(&self, at: usize) -> Result<u32, String> {
        let raw: [u8; 4] = self
            .bytes
            .get(at..at + 4)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| format!("truncated at byte {}", self.base + at))?;
        Ok(if self.big_endian {
            u32::from_be_bytes(raw)
        } else {
            u32::from_le_bytes(raw)
        })
    }

    /// Reads the next data element: (type, payload). Handles the 4-byte small-element format
    /// and the 8-byte padding that follows uncompressed elements.
    fn element(&mut self) -> Result<(u32, &'a [u8]), String> {
        let first = self.u32_at(self.pos)?;
        if first >> 16 != 0 {
            // Small data element: size in the upper half, type in the lower, data in 4 bytes.
            let (data_type, size) = (first & 0xffff, (first >> 16) as usize);
            if size > 4 {
                return Err(format!(
                    "small element of {size} bytes at byte {}",
                    self.base + self.pos
                ));
            }
            let start = self.pos + 4;
            let data = self
                .bytes
                .get(start..start + size)
                .ok_or_else(|| format!("truncated at byte {}", self.base + start))?;
            self.pos += 8;
            return Ok((data_type, data));
        }
        let size = self.u32_at(self.pos + 4)? as usize;
        let start = self.pos + 8;
        let end = start
            .checked_add(size)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| {
                format!(
                    "element of {size} bytes at byte {} runs past the end ({} bytes)",
                    self.base + self.pos,
                    self.base + self.bytes.len()
                )
            })?;
        self.pos = if first == MI_COMPRESSED {
            end
        } else {
            end.div_ceil(8) * 8
        };
        Ok((first, &self.bytes[start..end]))
    }

    fn at_end(&self) -> bool {
        self.pos >= self.bytes.len()
    }
}

/// Decodes the numeric payload of an element of type `data_type` to f64.
fn numbers(data_type: u32, data: &[u8], big_endian: bool) -> Result<Vec<f64>, String> {
    macro_rules! decode {
        ($t:ty) => {{
            const N: usize = std::mem::size_of::<$t>();
            data.chunks_exact(N)
                .map(|c| {
                    let raw: [u8; N] = c.try_into().expect("chunks_exact yields N bytes");
                    (if big_endian {
                        <$t>::from_be_bytes(raw)
                    } else {
                        <$t>::from_le_bytes(raw)
                    }) as f64
                })
                .collect()
        }};
    }
    Ok(match data_type {
        MI_INT8 => decode!(i8),
        MI_UINT8 | MI_UTF8 => decode!(u8),
        MI_INT16 => decode!(i16),
        MI_UINT16 | MI_UTF16 => decode!(u16),
        MI_INT32 => decode!(i32),
        MI_UINT32 | MI_UTF32 => decode!(u32),
        MI_SINGLE => decode!(f32),
        MI_DOUBLE => decode!(f64),
        MI_INT64 => decode!(i64),
        MI_UINT64 => decode!(u64),
        other => return Err(format!("data type {other} where numbers were expected")),
    })
}

/// Decodes char data: UTF-8 and UTF-16 per their encodings, other integer types as code points.
fn chars(data_type: u32, data: &[u8], big_endian: bool) -> Result<Vec<char>, String> {
    Ok(match data_type {
        MI_UTF8 => String::from_utf8_lossy(data).chars().collect(),
        MI_UTF16 | MI_UINT16 => {
            let units: Vec<u16> = numbers(MI_UINT16, data, big_endian)?
                .into_iter()
                .map(|v| v as u16)
                .collect();
            char::decode_utf16(units)
                .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
                .collect()
        }
        _ => numbers(data_type, data, big_endian)?
            .into_iter()
            .map(|v| char::from_u32(v as u32).unwrap_or(char::REPLACEMENT_CHARACTER))
            .collect(),
    })
}

/// Parses the payload of an miMATRIX element into (name, value).
fn parse_matrix(data: &[u8], big_endian: bool, base: usize) -> Result<(String, MatValue), String> {
    parse_matrix_at_depth(data, big_endian, base, 0)
}

fn parse_matrix_at_depth(
    data: &[u8],
    big_endian: bool,
    base: usize,
    depth: usize,
) -> Result<(String, MatValue), String> {
    if depth > MAX_DEPTH {
        return Err(format!("arrays nested deeper than {MAX_DEPTH}"));
    }
    if data.is_empty() {
        // An empty miMATRIX element stands for an empty array (e.g. an empty cell).
        let empty = MatValue::Numeric {
            dims: vec![0, 0],
            data: Vec::new(),
        };
        return Ok((String::new(), empty));
    }
    let mut r = Reader {
        bytes: data,
        pos: 0,
        big_endian,
        base,
    };
    let (_, flags) = r.element()?;
    let class = *flags
        .first()
        .filter(|_| flags.len() >= 4)
        .ok_or("array flags shorter than 4 bytes")?;
    // The class is the low byte of the first flags word, whichever the byte order.
    let class = if big_endian { flags[3] } else { class };
    let (_, dims_raw) = r.element()?;
    let dims: Vec<usize> = numbers(MI_INT32, dims_raw, big_endian)?
        .into_iter()
        .map(|d| d.max(0.0) as usize)
        .collect();
    let count = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or("array dimensions overflow")?;
    let (_, name_raw) = r.element()?;
    let name = String::from_utf8_lossy(name_raw).into_owned();
    let value = match class {
        MX_CELL => {
            let mut items = Vec::with_capacity(count.min(1 << 20));
            for _ in 0..count {
                let (data_type, payload) = r.element()?;
                if data_type != MI_MATRIX {
                    return Err(format!("cell {name:?} holds data type {data_type}"));
                }
                items.push(parse_matrix_at_depth(payload, big_endian, 0, depth + 1)?.1);
            }
            MatValue::Cell { dims, items }
        }
        MX_STRUCT => {
            let (_, len_raw) = r.element()?;
            let field_len = numbers(MI_INT32, len_raw, big_endian)?
                .first()
                .copied()
                .ok_or("struct without field name length")? as usize;
            let (_, names_raw) = r.element()?;
            if field_len == 0 {
                return Err(format!("struct {name:?} has field name length 0"));
            }
            let fields: Vec<String> = names_raw
                .chunks(field_len)
                .map(|chunk| {
                    let end = chunk.iter().position(|&b| b == 0).unwrap_or(chunk.len());
                    String::from_utf8_lossy(&chunk[..end]).into_owned()
                })
                .filter(|f| !f.is_empty())
                .collect();
            let mut items = Vec::with_capacity(count.min(1 << 20));
            for _ in 0..count {
                let mut element = Vec::with_capacity(fields.len());
                for field in &fields {
                    let (data_type, payload) = r.element()?;
                    if data_type != MI_MATRIX {
                        return Err(format!(
                            "struct {name:?} field {field:?} holds data type {data_type}"
                        ));
                    }
                    element.push(parse_matrix_at_depth(payload, big_endian, 0, depth + 1)?.1);
                }
                items.push(element);
            }
            MatValue::Struct {
                dims,
                fields,
                items,
            }
        }
        MX_CHAR => {
            let chars = if r.at_end() {
                Vec::new()
            } else {
                let (data_type, payload) = r.element()?;
                chars(data_type, payload, big_endian)?
            };
            MatValue::Char { dims, chars }
        }
        MX_SPARSE => return Err(format!("sparse array {name:?} is not supported")),
        6..=15 => {
            let data = if r.at_end() {
                Vec::new()
            } else {
                let (data_type, payload) = r.element()?;
                numbers(data_type, payload, big_endian)?
            };
            if data.len() != count {
                return Err(format!(
                    "array {name:?} has {} elements for dimensions {dims:?}",
                    data.len()
                ));
            }
            MatValue::Numeric { dims, data }
        }
        other => return Err(format!("array {name:?} has unsupported class {other}")),
    };
    Ok((name, value))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal MAT-5 writer for tests: little endian, optional compression per variable.
    pub(crate) struct Writer {
        pub bytes: Vec<u8>,
    }

    pub(crate) fn element(data_type: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        if payload.len() <= 4 && data_type != MI_MATRIX {
            out.extend(((payload.len() as u32) << 16 | data_type).to_le_bytes());
            out.extend(payload);
            out.resize(8, 0);
            return out;
        }
        out.extend(data_type.to_le_bytes());
        out.extend((payload.len() as u32).to_le_bytes());
        out.extend(payload);
        while out.len() % 8 != 0 {
            out.push(0);
        }
        out
    }

    fn header(class: u8, dims: &[usize], name: &str) -> Vec<u8> {
        let mut out = element(MI_UINT32, &[class, 0, 0, 0, 0, 0, 0, 0]);
        let dims: Vec<u8> = dims
            .iter()
            .flat_map(|&d| (d as i32).to_le_bytes())
            .collect();
        out.extend(element(MI_INT32, &dims));
        out.extend(element(MI_INT8, name.as_bytes()));
        out
    }

    /// miMATRIX of doubles stored as `data_type` (MATLAB stores small integers compactly).
    pub(crate) fn numeric(name: &str, dims: &[usize], values: &[f64], data_type: u32) -> Vec<u8> {
        let mut body = header(6, dims, name);
        let payload: Vec<u8> = values
            .iter()
            .flat_map(|&v| match data_type {
                MI_UINT8 => vec![v as u8],
                MI_UINT16 => (v as u16).to_le_bytes().to_vec(),
                MI_INT32 => (v as i32).to_le_bytes().to_vec(),
                _ => v.to_le_bytes().to_vec(),
            })
            .collect();
        body.extend(element(data_type, &payload));
        element(MI_MATRIX, &body)
    }

    pub(crate) fn string(name: &str, text: &str) -> Vec<u8> {
        let units: Vec<u16> = text.encode_utf16().collect();
        let mut body = header(MX_CHAR, &[1, units.len()], name);
        let payload: Vec<u8> = units.iter().flat_map(|u| u.to_le_bytes()).collect();
        body.extend(element(MI_UINT16, &payload));
        element(MI_MATRIX, &body)
    }

    pub(crate) fn cell(name: &str, items: &[Vec<u8>]) -> Vec<u8> {
        let mut body = header(MX_CELL, &[1, items.len()], name);
        for item in items {
            body.extend(item);
        }
        element(MI_MATRIX, &body)
    }

    /// A 1xN struct array; `items[element]` holds one miMATRIX per field.
    pub(crate) fn structure(name: &str, fields: &[&str], items: &[Vec<Vec<u8>>]) -> Vec<u8> {
        let mut body = header(MX_STRUCT, &[1, items.len()], name);
        let field_len = 32usize;
        body.extend(element(MI_INT32, &(field_len as i32).to_le_bytes()));
        let mut names = Vec::new();
        for f in fields {
            let mut raw = f.as_bytes().to_vec();
            raw.resize(field_len, 0);
            names.extend(raw);
        }
        body.extend(element(MI_INT8, &names));
        for element_fields in items {
            for value in element_fields {
                body.extend(value);
            }
        }
        element(MI_MATRIX, &body)
    }

    impl Writer {
        pub(crate) fn new() -> Self {
            let mut bytes = b"MATLAB 5.0 MAT-file, test writer".to_vec();
            bytes.resize(116, b' ');
            bytes.extend([0u8; 8]);
            bytes.extend(0x0100u16.to_le_bytes());
            bytes.extend(b"IM");
            Self { bytes }
        }

        pub(crate) fn add(mut self, matrix: Vec<u8>, compressed: bool) -> Self {
            if compressed {
                let packed = miniz_oxide::deflate::compress_to_vec_zlib(&matrix, 6);
                self.bytes.extend(MI_COMPRESSED.to_le_bytes());
                self.bytes.extend((packed.len() as u32).to_le_bytes());
                self.bytes.extend(packed);
            } else {
                self.bytes.extend(matrix);
            }
            self
        }
    }

    fn annotations(compressed: bool) -> Vec<u8> {
        let fields = ["bbox_x1", "class", "fname"];
        let items = vec![
            vec![
                numeric("", &[1, 1], &[39.0], MI_UINT8),
                numeric("", &[1, 1], &[14.0], MI_UINT8),
                string("", "00001.jpg"),
            ],
            vec![
                numeric("", &[1, 1], &[1000.0], MI_UINT16),
                numeric("", &[1, 1], &[196.0], MI_DOUBLE),
                string("", "00002.jpg"),
            ],
        ];
        Writer::new()
            .add(numeric("version", &[1, 1], &[7.0], MI_DOUBLE), false)
            .add(structure("annotations", &fields, &items), compressed)
            .bytes
    }

    #[test]
    fn reads_struct_arrays_compressed_or_not() {
        for compressed in [false, true] {
            let vars = parse_mat5(&annotations(compressed)).unwrap();
            assert_eq!(vars.len(), 2);
            assert_eq!(vars[0].0, "version");
            assert_eq!(vars[0].1.as_scalar(), Some(7.0));
            let (name, annos) = &vars[1];
            assert_eq!(name, "annotations");
            assert_eq!(annos.field(0, "bbox_x1").unwrap().as_scalar(), Some(39.0));
            assert_eq!(annos.field(1, "bbox_x1").unwrap().as_scalar(), Some(1000.0));
            assert_eq!(annos.field(1, "class").unwrap().as_scalar(), Some(196.0));
            assert_eq!(
                annos.field(1, "fname").unwrap().as_string().as_deref(),
                Some("00002.jpg")
            );
            assert!(annos.field(2, "fname").is_none());
            assert!(annos.field(0, "nope").is_none());
        }
    }

    #[test]
    fn reads_cell_arrays_of_strings() {
        let names = cell(
            "class_names",
            &[
                string("", "AM General Hummer SUV 2000"),
                string("", "Ürban/Car 2012"),
            ],
        );
        let vars = parse_mat5(&Writer::new().add(names, true).bytes).unwrap();
        match &vars[0].1 {
            MatValue::Cell { dims, items } => {
                assert_eq!(dims, &[1, 2]);
                assert_eq!(items[0].as_string().unwrap(), "AM General Hummer SUV 2000");
                assert_eq!(items[1].as_string().unwrap(), "Ürban/Car 2012");
            }
            other => panic!("expected a cell, got {other:?}"),
        }
    }

    #[test]
    fn truncated_or_foreign_files_are_errors() {
        let bytes = annotations(false);
        for cut in [10, 127, 140, bytes.len() - 3] {
            assert!(parse_mat5(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let compressed = annotations(true);
        let mut corrupt = compressed.clone();
        let last = corrupt.len() - 20;
        corrupt[last] ^= 0xff;
        assert!(parse_mat5(&corrupt).is_err());
        let mut hdf5 = b"MATLAB 7.3 MAT-file".to_vec();
        hdf5.resize(200, 0);
        assert!(parse_mat5(&hdf5).unwrap_err().contains("7.3"));
    }

    #[test]
    fn reads_the_fixture_files() {
        let devkit = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../data/fixtures/datasets/stanford_cars/devkit");
        let meta = read_mat5(&devkit.join("cars_meta.mat")).unwrap();
        let (name, names) = &meta[0];
        assert_eq!(name, "class_names");
        match names {
            MatValue::Cell { items, .. } => {
                assert_eq!(items.len(), 3);
                assert_eq!(items[2].as_string().unwrap(), "Make2 Model2 2012");
            }
            other => panic!("expected a cell, got {}", other.kind()),
        }
        let train = read_mat5(&devkit.join("cars_train_annos.mat")).unwrap();
        let annos = &train.iter().find(|(n, _)| n == "annotations").unwrap().1;
        assert_eq!(
            annos.field(0, "fname").unwrap().as_string().unwrap(),
            "00001.jpg"
        );
    }
}
