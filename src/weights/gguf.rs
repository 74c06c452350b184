//! GGUF files (ComfyUI-GGUF / stable-diffusion.cpp image-model files, llama.cpp-style T5 encoders): the header parsed
//! from the memory map, every tensor's type, row-major shape and byte range. The bytes themselves are never read here.
//!
//! Our own parser rather than candle-core's `gguf_file::Content::read`: it checks every length against the bytes that
//! are there (a truncated or corrupt file is an [`Error::Format`], never a panic or a huge allocation), names an
//! unsupported type in its error, and gives byte ranges the weight store maps in place.
//!
//! City96 conventions (ComfyUI-GGUF `loader.py`): the `model.diffusion_model.` prefix is stripped; a
//! `comfy.gguf.orig_shape.<name>` array gives the shape a reshaped tensor is read in; `general.architecture` names
//! the model (`flux`, `sd1`, ...; absent in stable-diffusion.cpp conversions).

use std::collections::HashMap;
use std::ops::Range;

use candle_core::DType;

use crate::error::{Error, Result};
use crate::weights::format::{QuantType, StoredFormat};
use crate::weights::source::{FilePart, TensorSpan};

/// The four bytes a GGUF file starts with.
pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";

/// The prefix ComfyUI-GGUF strips from tensor names.
const DIFFUSION_PREFIX: &str = "model.diffusion_model.";

/// GGML's limit on tensor dimensions.
const MAX_DIMS: usize = 4;

/// How a tensor of a GGUF file is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufKind {
    /// A dense array (F32, F16, BF16): converted once like a safetensors tensor.
    Dense(DType),
    /// Quantised blocks, kept as stored.
    Stored(StoredFormat),
}

/// One tensor of a GGUF file.
#[derive(Debug, Clone)]
pub struct GgufTensor {
    /// Its name with City96's `model.diffusion_model.` prefix stripped.
    pub name: String,
    /// Its name in the file.
    pub stored_name: String,
    /// Dense dtype or stored format.
    pub kind: GgufKind,
    /// Row-major shape (GGUF lists dimensions innermost first; reversed here), after any `comfy.gguf.orig_shape`.
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub bytes: Range<usize>,
}

impl GgufTensor {
    /// This tensor read as `name` (a family's mapping of llama.cpp-style names, e.g. T5's `enc.blk.0.attn_q.weight`
    /// → `encoder.block.0.layer.0.SelfAttention.q.weight`): a span over its bytes, `U8` for a quantised tensor (the
    /// store reads the format from the file).
    pub fn span(&self, name: impl Into<String>) -> TensorSpan {
        self.rows_span(name, 0..self.shape[0])
    }

    /// Rows `rows` of this tensor (dimension 0 of its row-major shape) read as `name`: quantised rows are whole
    /// blocks, so row ranges of several tensors can be concatenated into one span's parts.
    pub fn rows_span(&self, name: impl Into<String>, rows: Range<usize>) -> TensorSpan {
        let n = self.shape[0].max(1);
        let row = self.bytes.len() / n;
        let mut shape = self.shape.clone();
        shape[0] = rows.len();
        let dtype = match self.kind {
            GgufKind::Dense(d) => d,
            GgufKind::Stored(_) => DType::U8,
        };
        TensorSpan {
            name: name.into(),
            dtype,
            shape,
            parts: vec![FilePart::of(
                self.bytes.start + rows.start * row..self.bytes.start + rows.end * row,
            )],
            transposed: false,
        }
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    Int(i64),
    Uint(u64),
    Float(f64),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// The value as a string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }
    /// The value as a non-negative integer, if it is one.
    pub fn as_usize(&self) -> Option<usize> {
        match *self {
            GgufValue::Uint(u) => usize::try_from(u).ok(),
            GgufValue::Int(i) => usize::try_from(i).ok(),
            _ => None,
        }
    }
}

/// A parsed GGUF header.
#[derive(Debug, Clone)]
pub struct GgufHeader {
    /// Format version (2 or 3).
    pub version: u32,
    /// Every metadata key and value.
    pub metadata: HashMap<String, GgufValue>,
    /// Every tensor, in file order of their data.
    pub tensors: Vec<GgufTensor>,
    /// Start of the tensor data.
    pub data_offset: usize,
}

/// The GGML type names and ids no kernel here decodes (for the error message).
fn unsupported_type_name(id: u32) -> Option<&'static str> {
    Some(match id {
        9 => "Q8_1",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        40 => "NVFP4",
        41 => "Q1_0",
        _ => return None,
    })
}

/// The supported GGML types, for messages.
pub const SUPPORTED_TYPES: &str = "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K";

fn kind_of(id: u32, name: &str) -> Result<GgufKind> {
    Ok(match id {
        0 => GgufKind::Dense(DType::F32),
        1 => GgufKind::Dense(DType::F16),
        30 => GgufKind::Dense(DType::BF16),
        _ => match QuantType::ALL.iter().find(|q| q.ggml_id() == id) {
            Some(&q) => GgufKind::Stored(StoredFormat::Quant(q)),
            None => {
                let what = unsupported_type_name(id).map_or_else(|| format!("id {id} (unknown)"), |n| n.to_string());
                return Err(Error::unsupported(format!(
                    "tensor {name}: GGUF type {what} is not supported (supported: {SUPPORTED_TYPES})"
                )));
            }
        },
    })
}

/// A bounds-checked little-endian reader over the header bytes.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        match self.at.checked_add(n) {
            Some(end) if end <= self.b.len() => {
                let s = &self.b[self.at..end];
                self.at = end;
                Ok(s)
            }
            _ => Err(Error::format(format!(
                "GGUF header truncated reading {what} at byte {} ({} bytes in the file)",
                self.at,
                self.b.len()
            ))),
        }
    }
    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().expect("8 bytes")))
    }
    /// A count of items that take at least `min_item` bytes each: bounded by the bytes left, so a corrupt count
    /// cannot ask for a huge allocation.
    fn count(&mut self, min_item: usize, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        let left = (self.b.len() - self.at) as u64;
        if n.saturating_mul(min_item as u64) > left {
            return Err(Error::format(format!(
                "GGUF header: {what} is {n}, more than the {left} bytes left can hold"
            )));
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(1, what)?;
        let s = self.take(n, what)?;
        String::from_utf8(s.to_vec()).map_err(|_| Error::format(format!("GGUF header: {what} is not UTF-8")))
    }
    fn value(&mut self, ty: u32, depth: usize, key: &str) -> Result<GgufValue> {
        Ok(match ty {
            0 => GgufValue::Uint(self.u8(key)? as u64),
            1 => GgufValue::Int(self.u8(key)? as i8 as i64),
            2 => GgufValue::Uint(self.u16(key)? as u64),
            3 => GgufValue::Int(self.u16(key)? as i16 as i64),
            4 => GgufValue::Uint(self.u32(key)? as u64),
            5 => GgufValue::Int(self.u32(key)? as i32 as i64),
            6 => GgufValue::Float(f32::from_bits(self.u32(key)?) as f64),
            7 => GgufValue::Bool(self.u8(key)? != 0),
            8 => GgufValue::String(self.string(key)?),
            9 => {
                if depth > 2 {
                    return Err(Error::format(format!(
                        "GGUF header: metadata {key} nests arrays too deeply"
                    )));
                }
                let item = self.u32(key)?;
                let n = self.count(1, key)?;
                let mut v = Vec::with_capacity(n.min(1 << 16));
                for _ in 0..n {
                    v.push(self.value(item, depth + 1, key)?);
                }
                GgufValue::Array(v)
            }
            10 => GgufValue::Uint(self.u64(key)?),
            11 => GgufValue::Int(self.u64(key)? as i64),
            12 => GgufValue::Float(f64::from_bits(self.u64(key)?)),
            other => {
                return Err(Error::format(format!(
                    "GGUF header: metadata {key} has unknown value type {other}"
                )))
            }
        })
    }
}

/// Whether `bytes` start like a GGUF file.
pub fn is_gguf(bytes: &[u8]) -> bool {
    bytes.len() >= 4 && &bytes[..4] == GGUF_MAGIC
}

/// Whether the file at `path` starts like a GGUF file (false when it cannot be read).
pub fn is_gguf_file(path: &std::path::Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && is_gguf(&magic)
}

impl GgufHeader {
    /// Parse the header of the GGUF file whose bytes are `file` (the whole mapping: tensor ranges are checked against
    /// its length). Corrupt or truncated files give [`Error::Format`]; tensors of types without a decoder give
    /// [`Error::Unsupported`] naming the type.
    pub fn parse(file: &[u8]) -> Result<Self> {
        let mut r = Reader { b: file, at: 0 };
        if r.take(4, "the magic")? != GGUF_MAGIC {
            return Err(Error::format("not a GGUF file (magic is not GGUF)"));
        }
        let version = r.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::format(format!(
                "GGUF version {version} is not supported (supported: 2, 3)"
            )));
        }
        // A tensor info takes at least 8 (name length) + 4 (dims) + 4 (type) + 8 (offset) bytes; a metadata entry
        // at least 8 (key length) + 4 (type) + 1.
        let n_tensors = r.count(24, "the tensor count")?;
        let n_kv = r.count(13, "the metadata count")?;
        let mut metadata = HashMap::with_capacity(n_kv);
        for _ in 0..n_kv {
            let key = r.string("a metadata key")?;
            let ty = r.u32(&key)?;
            let v = r.value(ty, 0, &key)?;
            metadata.insert(key, v);
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_usize() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
                _ => {
                    return Err(Error::format(format!(
                        "GGUF header: general.alignment {v:?} is not a power of two"
                    )))
                }
            },
        };
        let mut raw = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let stored_name = r.string("a tensor name")?;
            let n_dims = r.u32(&stored_name)? as usize;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(Error::format(format!(
                    "GGUF tensor {stored_name}: {n_dims} dimensions (1 to {MAX_DIMS})"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                let d = r.u64(&stored_name)?;
                dims.push(
                    usize::try_from(d)
                        .map_err(|_| Error::format(format!("GGUF tensor {stored_name}: dimension {d}")))?,
                );
            }
            let ty = r.u32(&stored_name)?;
            let offset = r.u64(&stored_name)?;
            raw.push((stored_name, dims, ty, offset));
        }
        let data_offset = r.at.div_ceil(alignment) * alignment;
        let mut tensors = Vec::with_capacity(raw.len());
        let mut seen = std::collections::HashSet::with_capacity(raw.len());
        for (stored_name, mut dims, ty, offset) in raw {
            let kind = kind_of(ty, &stored_name)?;
            dims.reverse(); // GGUF: innermost first
            let elems = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let row = *dims.last().expect("at least one dimension");
            let (bytes, block) = match kind {
                GgufKind::Dense(d) => (elems.and_then(|n| n.checked_mul(d.size_in_bytes())), 1),
                GgufKind::Stored(f) => (
                    elems
                        .map(|n| n / f.block_elems())
                        .and_then(|b| b.checked_mul(f.block_bytes())),
                    f.block_elems(),
                ),
            };
            let Some(len) = bytes.filter(|_| row % block == 0) else {
                return Err(Error::format(format!(
                    "GGUF tensor {stored_name}: shape {dims:?} does not fit its type (rows must be whole blocks)"
                )));
            };
            let start = usize::try_from(offset).ok().and_then(|o| o.checked_add(data_offset));
            let range = match start.and_then(|s| s.checked_add(len).map(|e| s..e)) {
                Some(r) if r.end <= file.len() && offset as usize % alignment == 0 => r,
                _ => {
                    return Err(Error::format(format!(
                        "GGUF tensor {stored_name}: {len} bytes at data offset {offset} lie outside the file's {} \
                         bytes (or are misaligned): truncated or corrupt",
                        file.len()
                    )))
                }
            };
            let name = stored_name
                .strip_prefix(DIFFUSION_PREFIX)
                .unwrap_or(&stored_name)
                .to_string();
            if !seen.insert(name.clone()) {
                return Err(Error::format(format!("GGUF: tensor {name} appears twice")));
            }
            let shape = match orig_shape(&metadata, &stored_name, &name)? {
                Some(s) if s.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) == elems => s,
                Some(s) => {
                    return Err(Error::format(format!(
                        "GGUF tensor {stored_name}: comfy.gguf.orig_shape {s:?} has another element count than {dims:?}"
                    )))
                }
                None => dims,
            };
            tensors.push(GgufTensor {
                name,
                stored_name,
                kind,
                shape,
                bytes: range,
            });
        }
        tensors.sort_by_key(|t| t.bytes.start);
        Ok(Self {
            version,
            metadata,
            tensors,
            data_offset,
        })
    }

    /// Map the file at `path` and parse its header (family detection, building spans); errors name the file.
    pub fn read_file(path: &std::path::Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only mapping, dropped before returning; like every mmap-based loader we rely on the file not
        // being truncated meanwhile.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::parse(&mmap).map_err(|e| match e {
            Error::Format(m) => Error::format(format!("{}: {m}", path.display())),
            Error::Unsupported(m) => Error::unsupported(format!("{}: {m}", path.display())),
            e => e,
        })
    }

    /// `general.architecture` (`flux`, `sd1`, `t5encoder`, ...), if the file names one.
    pub fn architecture(&self) -> Option<&str> {
        self.metadata.get("general.architecture").and_then(GgufValue::as_str)
    }
}

/// City96's `comfy.gguf.orig_shape.<name>` (row-major, as PyTorch lists it), under the stored or stripped name.
fn orig_shape(meta: &HashMap<String, GgufValue>, stored: &str, name: &str) -> Result<Option<Vec<usize>>> {
    let key = format!("comfy.gguf.orig_shape.{stored}");
    let Some(v) = meta
        .get(&key)
        .or_else(|| meta.get(&format!("comfy.gguf.orig_shape.{name}")))
    else {
        return Ok(None);
    };
    let GgufValue::Array(items) = v else {
        return Err(Error::format(format!("GGUF: {key} is not an array")));
    };
    items
        .iter()
        .map(|i| {
            i.as_usize()
                .ok_or_else(|| Error::format(format!("GGUF: {key} holds {i:?}, not a dimension")))
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}
