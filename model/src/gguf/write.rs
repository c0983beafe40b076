//! Writing GGUF v3 files.
//!
//! Everything is validated when it is added, so `write` cannot produce a file that the
//! reader or llama.cpp would refuse, and fails only on I/O.

use std::io::{BufWriter, Cursor, Seek, SeekFrom, Write};
use std::path::Path;

use super::read::tensor_size;
use super::value::Value;
use super::{DEFAULT_ALIGNMENT, MAGIC, MAX_ALIGNMENT, MAX_DIMS, MAX_NESTING, MAX_TENSOR_NAME};
use crate::quant::GgmlType;
use crate::{Error, Result};

/// Where a tensor's bytes come from when the file is written.
pub enum TensorData {
    Bytes(Vec<u8>),
    /// All zero, left as a hole in a sparse file: a full-size model shape costs no disk.
    Zeros,
}

struct PendingTensor {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    data: TensorData,
    size: u64,
}

/// Collects metadata and tensors, then writes them as one GGUF v3 file.
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<PendingTensor>,
    alignment: u64,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    pub fn new() -> Self {
        GgufWriter { metadata: Vec::new(), tensors: Vec::new(), alignment: DEFAULT_ALIGNMENT }
    }

    /// Adds (or replaces) a metadata entry. `general.alignment` sets the data alignment.
    pub fn set(&mut self, key: impl Into<String>, value: Value) -> Result<()> {
        let key = key.into();
        if key.is_empty() {
            return Err(Error::Config("GGUF metadata key is empty".into()));
        }
        check_value(&key, &value, 0)?;
        if key == "general.alignment" {
            // llama.cpp refuses a `general.alignment` of any type but u32.
            self.alignment = match value {
                Value::U32(a) if a.is_power_of_two() && u64::from(a) <= MAX_ALIGNMENT => a.into(),
                _ => {
                    return Err(Error::Config(format!(
                        "general.alignment must be a u32 power of two up to {MAX_ALIGNMENT}, got {value:?}"
                    )));
                }
            };
        }
        match self.metadata.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key, value)),
        }
        Ok(())
    }

    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        ty: GgmlType,
        dims: Vec<u64>,
        data: TensorData,
    ) -> Result<()> {
        let name = name.into();
        let bad = |why: String| Error::Config(format!("tensor `{name}`: {why}"));
        if name.len() >= MAX_TENSOR_NAME {
            return Err(bad(format!("name is {} bytes, llama.cpp allows {}", name.len(), MAX_TENSOR_NAME - 1)));
        }
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(bad("added twice".into()));
        }
        if dims.is_empty() || dims.len() > MAX_DIMS as usize {
            return Err(bad(format!("{} dimensions (allowed 1..={MAX_DIMS})", dims.len())));
        }
        let size = tensor_size(ty, &dims).map_err(&bad)?;
        if let TensorData::Bytes(b) = &data
            && b.len() as u64 != size
        {
            return Err(bad(format!("{} bytes given, {size} expected for {ty} {dims:?}", b.len())));
        }
        self.tensors.push(PendingTensor { name, dims, ty, data, size });
        Ok(())
    }

    /// Writes the file; zero tensors become holes (the file is extended, not filled).
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let file = std::fs::File::create(path).map_err(|source| Error::Open { path: path.to_owned(), source })?;
        let mut w = BufWriter::new(file);
        let len = self.write_to(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        // Padding after the last tensor, and zero tensors, are holes.
        file.set_len(len)?;
        file.sync_all()?;
        Ok(())
    }

    /// The whole file in memory, zero tensors written out.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut c = Cursor::new(Vec::new());
        let len = self.write_to(&mut c)?;
        let mut bytes = c.into_inner();
        bytes.resize(len as usize, 0);
        Ok(bytes)
    }

    /// Writes all but the trailing zeros (which a seek skips); returns the full length.
    fn write_to<W: Write + Seek>(&self, w: &mut W) -> Result<u64> {
        w.write_all(&MAGIC.to_le_bytes())?;
        w.write_all(&3u32.to_le_bytes())?;
        w.write_all(&(self.tensors.len() as u64).to_le_bytes())?;
        w.write_all(&(self.metadata.len() as u64).to_le_bytes())?;
        for (k, v) in &self.metadata {
            write_str(w, k)?;
            w.write_all(&(v.value_type() as u32).to_le_bytes())?;
            write_value(w, v)?;
        }
        // llama.cpp wants each tensor exactly where the previous one, padded, ends.
        let mut offset = 0u64;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            write_str(w, &t.name)?;
            w.write_all(&(t.dims.len() as u32).to_le_bytes())?;
            for d in &t.dims {
                w.write_all(&d.to_le_bytes())?;
            }
            w.write_all(&t.ty.id().to_le_bytes())?;
            w.write_all(&offset.to_le_bytes())?;
            offsets.push(offset);
            offset = offset
                .checked_add(t.size)
                .and_then(|end| end.checked_next_multiple_of(self.alignment))
                .ok_or_else(|| Error::Config("GGUF data section overflows u64".into()))?;
        }
        let header_len = w.stream_position()?;
        let data_start = header_len.next_multiple_of(self.alignment);
        for (t, off) in self.tensors.iter().zip(&offsets) {
            if let TensorData::Bytes(b) = &t.data {
                w.seek(SeekFrom::Start(data_start + off))?;
                w.write_all(b)?;
            }
        }
        w.flush()?;
        Ok(data_start + offset)
    }
}

/// Arrays must hold one element type and nest no deeper than the reader accepts.
fn check_value(key: &str, v: &Value, depth: u32) -> Result<()> {
    if let Value::Array(elem, items) = v {
        if depth >= MAX_NESTING {
            return Err(Error::Config(format!("metadata `{key}`: arrays nested deeper than {MAX_NESTING}")));
        }
        for item in items {
            if item.value_type() != *elem {
                return Err(Error::Config(format!("metadata `{key}`: array of {elem:?} holds a {}", item.type_name())));
            }
            check_value(key, item, depth + 1)?;
        }
    }
    Ok(())
}

fn write_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn write_value(w: &mut impl Write, v: &Value) -> std::io::Result<()> {
    match v {
        Value::U8(x) => w.write_all(&[*x]),
        Value::I8(x) => w.write_all(&x.to_le_bytes()),
        Value::U16(x) => w.write_all(&x.to_le_bytes()),
        Value::I16(x) => w.write_all(&x.to_le_bytes()),
        Value::U32(x) => w.write_all(&x.to_le_bytes()),
        Value::I32(x) => w.write_all(&x.to_le_bytes()),
        Value::F32(x) => w.write_all(&x.to_le_bytes()),
        Value::U64(x) => w.write_all(&x.to_le_bytes()),
        Value::I64(x) => w.write_all(&x.to_le_bytes()),
        Value::F64(x) => w.write_all(&x.to_le_bytes()),
        Value::Bool(x) => w.write_all(&[u8::from(*x)]),
        Value::String(s) => write_str(w, s),
        Value::Array(elem, items) => {
            w.write_all(&(*elem as u32).to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|i| write_value(w, i))
        }
    }
}
