//! Reading and validating a GGUF file.

use std::collections::HashMap;
use std::path::Path;

use super::value::{Value, ValueType, expect};
use super::{DEFAULT_ALIGNMENT, MAGIC, MAX_ALIGNMENT, MAX_DIMS, MAX_NESTING};
use crate::quant::GgmlType;
use crate::{Error, Result};

/// Fewest bytes of one metadata entry: key length, value type, a one-byte value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Fewest bytes of one tensor entry: name length, n_dims, one dim, type, offset.
const MIN_TENSOR_BYTES: u64 = 8 + 4 + 8 + 4 + 8;

/// One entry of the tensor index.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the contiguous (row) dimension.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
    /// Bytes of data.
    pub size: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Length of one row (`dims[0]`).
    pub fn row_len(&self) -> u64 {
        self.dims.first().copied().unwrap_or(1)
    }

    /// Number of rows (product of all but the first dimension).
    pub fn n_rows(&self) -> u64 {
        self.dims.iter().skip(1).product()
    }
}

enum Backing {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mmap(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

/// What a header and tensor index alone tell (see [`Gguf::header_index`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderIndex {
    pub header_len: u64,
    /// Absolute offset of the data section.
    pub data_start: u64,
    /// Length of the whole file: the end of its last tensor.
    pub file_len: u64,
    /// [`Gguf::identity`] of the file.
    pub identity: [u8; 8],
}

/// A parsed GGUF file whose tensor data stays in the (memory-mapped) file.
pub struct Gguf {
    backing: Backing,
    pub version: u32,
    pub alignment: u64,
    /// Metadata in file order.
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    /// Absolute offset of the data section.
    pub data_start: u64,
    /// Length of the header (magic to the end of the tensor index, before padding).
    pub header_len: u64,
    meta_index: HashMap<String, usize>,
    tensor_index: HashMap<String, usize>,
}

impl std::fmt::Debug for Gguf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gguf")
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl Gguf {
    /// Memory-maps and parses `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|source| Error::Open { path: path.to_owned(), source })?;
        // SAFETY: the map is read-only; a file truncated underneath us would fault, which
        // is the usual contract of memory-mapped model files (llama.cpp does the same).
        let mmap =
            unsafe { memmap2::Mmap::map(&file) }.map_err(|source| Error::Open { path: path.to_owned(), source })?;
        let gguf = Self::parse(Backing::Mmap(mmap), true)?;
        tracing::debug!(path = %path.display(), version = gguf.version, tensors = gguf.tensors.len(), "opened GGUF");
        Ok(gguf)
    }

    /// Parses a GGUF held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        Self::parse(Backing::Owned(bytes), true)
    }

    /// Reads a header and tensor index alone (exactly `bytes()[..header_len]` of a file):
    /// what a node assembling a file from streamed pieces needs before any tensor data.
    pub fn header_index(header: &[u8]) -> Result<HeaderIndex> {
        let g = Self::parse(Backing::Owned(header.to_vec()), false)?;
        if g.header_len != header.len() as u64 {
            return Err(Error::Malformed {
                offset: g.header_len,
                reason: format!(
                    "{} bytes given, but the header and tensor index end at {}",
                    header.len(),
                    g.header_len
                ),
            });
        }
        let data_len = g.tensors.iter().map(|t| t.offset.saturating_add(t.size)).max().unwrap_or(0);
        let file_len = g
            .data_start
            .checked_add(data_len)
            .ok_or_else(|| Error::Malformed { offset: 0, reason: "tensor data ends past 2^64".into() })?;
        Ok(HeaderIndex { header_len: g.header_len, data_start: g.data_start, file_len, identity: g.identity() })
    }

    /// `whole`: the buffer is the whole file, so every tensor must lie within it.
    fn parse(backing: Backing, whole: bool) -> Result<Self> {
        let mut r = Reader { buf: backing.bytes(), pos: 0 };
        let Header { version, n_tensors, n_kv } = read_header(&mut r)?;
        let Metadata { metadata, meta_index, alignment } = read_metadata(&mut r, n_kv)?;
        let (tensors, tensor_index) = read_tensor_index(&mut r, n_tensors, alignment)?;
        let header_len = r.pos as u64;
        let data_start = header_len.div_ceil(alignment) * alignment;
        if whole {
            check_tensors_in_file(&tensors, data_start, r.buf.len() as u64)?;
        }
        Ok(Gguf { backing, version, alignment, metadata, tensors, data_start, header_len, meta_index, tensor_index })
    }

    /// The model's identity: a 64-bit FNV-1a hash of the header and tensor index
    /// (`bytes()[..header_len]`: metadata, tensor names, shapes, types and offsets), as
    /// 8 little-endian bytes. Two files with the same identity hold the same tensors in
    /// the same places; it is cheap (one pass over a few MB at most) and not a guard
    /// against deliberate collisions: nodes and coordinator trust each other.
    pub fn identity(&self) -> [u8; 8] {
        const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        let header = &self.bytes()[..self.header_len as usize];
        header.iter().fold(OFFSET, |h, &b| (h ^ u64::from(b)).wrapping_mul(PRIME)).to_le_bytes()
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        self.backing.bytes()
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    pub fn require(&self, key: &str) -> Result<&Value> {
        self.get(key).ok_or_else(|| Error::MissingKey(key.to_owned()))
    }

    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        self.get(key).map(|v| expect(key, "unsigned integer", v, Value::as_u64)).transpose()
    }

    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key).map(|v| expect(key, "number", v, Value::as_f64)).transpose()
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        self.get(key).map(|v| v.as_str().ok_or_else(|| super::value::key_type(key, "string", v))).transpose()
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key).map(|v| expect(key, "bool", v, Value::as_bool)).transpose()
    }

    pub fn require_u64(&self, key: &str) -> Result<u64> {
        self.get_u64(key)?.ok_or_else(|| Error::MissingKey(key.to_owned()))
    }

    pub fn require_str(&self, key: &str) -> Result<&str> {
        self.get_str(key)?.ok_or_else(|| Error::MissingKey(key.to_owned()))
    }

    /// The architecture name (`general.architecture`).
    pub fn architecture(&self) -> Result<&str> {
        self.require_str("general.architecture")
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    pub fn require_tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor(name).ok_or_else(|| Error::MissingTensor(name.to_owned()))
    }

    /// The raw bytes of a tensor (bounds were checked when the file was parsed).
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        let start = (self.data_start + t.offset) as usize;
        &self.bytes()[start..start + t.size as usize]
    }
}

/// Bytes of a tensor of type `ty` and shape `dims`, or why that shape is impossible.
/// llama.cpp keeps dimensions and element counts in i64, so anything larger is refused.
pub(crate) fn tensor_size(ty: GgmlType, dims: &[u64]) -> std::result::Result<u64, String> {
    if let Some(d) = dims.iter().find(|&&d| d > i64::MAX as u64) {
        return Err(format!("dimension {d} is too large"));
    }
    let n = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= i64::MAX as u64)
        .ok_or_else(|| format!("shape {dims:?}: the element count overflows"))?;
    let row = dims.first().copied().unwrap_or(1);
    if !row.is_multiple_of(ty.block_len()) {
        return Err(format!(
            "shape {dims:?}: rows of {row} are not a whole number of {ty} blocks of {}",
            ty.block_len()
        ));
    }
    ty.bytes_for(n).ok_or_else(|| format!("shape {dims:?}: the byte size of {ty} overflows"))
}

/// The fixed header after the magic.
struct Header {
    version: u32,
    n_tensors: u64,
    n_kv: u64,
}

/// Magic, version and the two counts, each count refused if it cannot fit in the file.
fn read_header(r: &mut Reader) -> Result<Header> {
    let magic = r.u32("magic")?;
    if magic != MAGIC {
        return Err(r.err_at(0, format!("bad magic {magic:#010x}: not a GGUF file")));
    }
    let version = r.u32("version")?;
    if !(2..=3).contains(&version) {
        // The magic is stored as bytes, so only the version shows a big-endian file.
        let hint = if (2..=3).contains(&version.swap_bytes()) { " (a big-endian GGUF?)" } else { "" };
        return Err(r.err_at(4, format!("unsupported GGUF version {version}{hint} (supported: 2, 3)")));
    }
    let n_tensors = r.u64("tensor count")?;
    let n_kv = r.u64("metadata count")?;
    // Refuse counts that cannot fit before allocating for them; the tensor count is
    // checked again, against what the metadata left, before the index is allocated.
    r.check_count(n_kv, MIN_KV_BYTES, "metadata count")?;
    r.check_count(n_tensors, MIN_TENSOR_BYTES, "tensor count")?;
    Ok(Header { version, n_tensors, n_kv })
}

/// The metadata section: entries in file order, keyed, and the data alignment they set.
struct Metadata {
    metadata: Vec<(String, Value)>,
    meta_index: HashMap<String, usize>,
    alignment: u64,
}

fn read_metadata(r: &mut Reader, n_kv: u64) -> Result<Metadata> {
    let mut metadata = Vec::with_capacity(n_kv as usize);
    let mut meta_index = HashMap::with_capacity(n_kv as usize);
    let mut alignment_at = 0;
    for _ in 0..n_kv {
        let at = r.pos;
        let key = r.string("metadata key")?;
        if key.is_empty() {
            return Err(r.err_at(at, "empty metadata key".into()));
        }
        let ty = r.value_type("metadata value type")?;
        let value = r.value(ty, 0)?;
        if meta_index.insert(key.clone(), metadata.len()).is_some() {
            return Err(r.err_at(at, format!("duplicate metadata key `{key}`")));
        }
        if key == "general.alignment" {
            alignment_at = at;
        }
        metadata.push((key, value));
    }
    let alignment = match meta_index.get("general.alignment").map(|&i| &metadata[i].1) {
        None => DEFAULT_ALIGNMENT,
        Some(v) => {
            let a = expect("general.alignment", "integer", v, Value::as_u64)?;
            if !a.is_power_of_two() || a > MAX_ALIGNMENT {
                return Err(r.err_at(
                    alignment_at,
                    format!("general.alignment {a} is not a power of two up to {MAX_ALIGNMENT}"),
                ));
            }
            a
        }
    };
    Ok(Metadata { metadata, meta_index, alignment })
}

/// The tensor index: each entry's shape, type and offset checked, names unique.
fn read_tensor_index(
    r: &mut Reader,
    n_tensors: u64,
    alignment: u64,
) -> Result<(Vec<TensorInfo>, HashMap<String, usize>)> {
    r.check_count(n_tensors, MIN_TENSOR_BYTES, "tensor count")?;
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    let mut tensor_index = HashMap::with_capacity(n_tensors as usize);
    for _ in 0..n_tensors {
        let at = r.pos;
        let t = read_tensor_info(r, alignment)?;
        if tensor_index.insert(t.name.clone(), tensors.len()).is_some() {
            return Err(r.err_at(at, format!("duplicate tensor `{}`", t.name)));
        }
        tensors.push(t);
    }
    Ok((tensors, tensor_index))
}

fn read_tensor_info(r: &mut Reader, alignment: u64) -> Result<TensorInfo> {
    let at = r.pos;
    let name = r.string("tensor name")?;
    let n_dims = r.u32("tensor dimension count")?;
    if n_dims == 0 || n_dims > MAX_DIMS {
        return Err(r.err_at(at, format!("tensor `{name}` has {n_dims} dimensions (allowed 1..={MAX_DIMS})")));
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    for _ in 0..n_dims {
        dims.push(r.u64("tensor dimension")?);
    }
    let ty_id = r.u32("tensor type")?;
    let ty =
        GgmlType::from_id(ty_id).map_err(|_| r.err_at(at, format!("tensor `{name}` has unknown type id {ty_id}")))?;
    let offset = r.u64("tensor offset")?;
    let size = tensor_size(ty, &dims).map_err(|why| r.err_at(at, format!("tensor `{name}` {why}")))?;
    if !offset.is_multiple_of(alignment) {
        return Err(r.err_at(at, format!("tensor `{name}` offset {offset} is not aligned to {alignment}")));
    }
    Ok(TensorInfo { name, dims, ty, offset, size })
}

/// Every tensor's data lies within a file of `file_len` bytes.
fn check_tensors_in_file(tensors: &[TensorInfo], data_start: u64, file_len: u64) -> Result<()> {
    for t in tensors {
        let end = data_start.checked_add(t.offset).and_then(|o| o.checked_add(t.size));
        if end.is_none_or(|e| e > file_len) {
            return Err(Error::Malformed {
                offset: data_start.saturating_add(t.offset),
                reason: format!(
                    "tensor `{}` ({} bytes at data offset {}) runs past the end of the file ({} bytes): truncated?",
                    t.name, t.size, t.offset, file_len
                ),
            });
        }
    }
    Ok(())
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn err_at(&self, offset: usize, reason: String) -> Error {
        Error::Malformed { offset: offset as u64, reason }
    }

    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&[u8]> {
        if n > self.remaining() {
            return Err(self.err_at(
                self.pos,
                format!("file ends while reading {what}: need {n} bytes, {} left (truncated?)", self.remaining()),
            ));
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.take(N as u64, what)?.try_into().expect("take returned N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A count claims `n` items of at least `min` bytes each: refuse what cannot fit.
    fn check_count(&self, n: u64, min: u64, what: &str) -> Result<()> {
        if n.checked_mul(min).is_none_or(|b| b > self.remaining()) {
            return Err(self.err_at(
                self.pos,
                format!(
                    "{what} {n} is impossible: at least {min} bytes each, only {} bytes left (truncated?)",
                    self.remaining()
                ),
            ));
        }
        Ok(())
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let at = self.pos;
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.err_at(at, format!("{what} is not valid UTF-8")))
    }

    fn value_type(&mut self, what: &str) -> Result<ValueType> {
        let at = self.pos;
        let t = self.u32(what)?;
        ValueType::from_u32(t).ok_or_else(|| self.err_at(at, format!("unknown {what} {t}")))
    }

    fn value(&mut self, ty: ValueType, depth: u32) -> Result<Value> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.array::<1>("u8")?[0]),
            ValueType::I8 => Value::I8(self.array::<1>("i8")?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array("u16")?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array("i16")?)),
            ValueType::U32 => Value::U32(self.u32("u32")?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array("i32")?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array("f32")?)),
            ValueType::U64 => Value::U64(self.u64("u64")?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array("i64")?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array("f64")?)),
            ValueType::Bool => {
                let at = self.pos;
                match self.array::<1>("bool")?[0] {
                    0 => Value::Bool(false),
                    1 => Value::Bool(true),
                    b => return Err(self.err_at(at, format!("bool value {b} is neither 0 nor 1"))),
                }
            }
            ValueType::String => Value::String(self.string("string value")?),
            ValueType::Array => {
                let at = self.pos;
                if depth >= MAX_NESTING {
                    return Err(self.err_at(at, format!("arrays nested deeper than {MAX_NESTING}")));
                }
                let elem = self.value_type("array element type")?;
                let n = self.u64("array length")?;
                self.check_count(n, elem.min_size(), "array length")?;
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(elem, depth + 1)?);
                }
                Value::Array(elem, items)
            }
        })
    }
}
