//! Writing GGUF v3 files.

use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::Path;

use super::value::Value;
use super::{DEFAULT_ALIGNMENT, MAGIC};
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
        if key == "general.alignment" {
            let a = value.as_u64().filter(|a| a.is_power_of_two()).ok_or_else(|| Error::Config("general.alignment must be a power of two".into()))?;
            self.alignment = a;
        }
        match self.metadata.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key, value)),
        }
        Ok(())
    }

    pub fn add_tensor(&mut self, name: impl Into<String>, ty: GgmlType, dims: Vec<u64>, data: TensorData) -> Result<()> {
        let name = name.into();
        let n: u64 = dims.iter().product();
        let size = ty
            .bytes_for(n)
            .filter(|_| dims.first().is_some_and(|d| d % ty.block_len() == 0))
            .ok_or_else(|| Error::Config(format!("tensor `{name}`: shape {dims:?} does not fit type {ty}")))?;
        if let TensorData::Bytes(b) = &data
            && b.len() as u64 != size
        {
            return Err(Error::Config(format!("tensor `{name}`: {} bytes given, {size} expected", b.len())));
        }
        self.tensors.push(PendingTensor { name, dims, ty, data, size });
        Ok(())
    }

    /// Writes the file; zero tensors become holes (the file is extended, not filled).
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let file = std::fs::File::create(path).map_err(|source| Error::Open { path: path.to_owned(), source })?;
        let mut w = BufWriter::new(file);
        w.write_all(&MAGIC.to_le_bytes())?;
        w.write_all(&3u32.to_le_bytes())?;
        w.write_all(&(self.tensors.len() as u64).to_le_bytes())?;
        w.write_all(&(self.metadata.len() as u64).to_le_bytes())?;
        for (k, v) in &self.metadata {
            write_str(&mut w, k)?;
            w.write_all(&(v.value_type() as u32).to_le_bytes())?;
            write_value(&mut w, v)?;
        }
        let mut offset = 0u64;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            write_str(&mut w, &t.name)?;
            w.write_all(&(t.dims.len() as u32).to_le_bytes())?;
            for d in &t.dims {
                w.write_all(&d.to_le_bytes())?;
            }
            w.write_all(&t.ty.id().to_le_bytes())?;
            w.write_all(&offset.to_le_bytes())?;
            offsets.push(offset);
            offset = (offset + t.size).div_ceil(self.alignment) * self.alignment;
        }
        let header_len = w.stream_position()?;
        let data_start = header_len.div_ceil(self.alignment) * self.alignment;
        for (t, off) in self.tensors.iter().zip(&offsets) {
            if let TensorData::Bytes(b) = &t.data {
                w.seek(SeekFrom::Start(data_start + off))?;
                w.write_all(b)?;
            }
        }
        let file = w.into_inner().map_err(|e| e.into_error())?;
        // Padding after the last tensor, and zero tensors, are holes.
        file.set_len(data_start + offset)?;
        file.sync_all()?;
        Ok(())
    }
}

fn write_str(w: &mut impl Write, s: &str) -> Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())?;
    Ok(())
}

fn write_value(w: &mut impl Write, v: &Value) -> Result<()> {
    match v {
        Value::U8(x) => w.write_all(&[*x])?,
        Value::I8(x) => w.write_all(&x.to_le_bytes())?,
        Value::U16(x) => w.write_all(&x.to_le_bytes())?,
        Value::I16(x) => w.write_all(&x.to_le_bytes())?,
        Value::U32(x) => w.write_all(&x.to_le_bytes())?,
        Value::I32(x) => w.write_all(&x.to_le_bytes())?,
        Value::F32(x) => w.write_all(&x.to_le_bytes())?,
        Value::U64(x) => w.write_all(&x.to_le_bytes())?,
        Value::I64(x) => w.write_all(&x.to_le_bytes())?,
        Value::F64(x) => w.write_all(&x.to_le_bytes())?,
        Value::Bool(x) => w.write_all(&[*x as u8])?,
        Value::String(s) => write_str(w, s)?,
        Value::Array(elem, items) => {
            if let Some(bad) = items.iter().find(|i| i.value_type() != *elem) {
                return Err(Error::Config(format!("array of {elem:?} holds a {}", bad.type_name())));
            }
            w.write_all(&(*elem as u32).to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            for i in items {
                write_value(w, i)?;
            }
        }
    }
    Ok(())
}

