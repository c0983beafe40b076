//! The blocks a stage is made of, each loaded from GGUF tensors named as in the file
//! and able to record its dispatches for one sequence.

pub mod attention;
pub mod deltanet;
pub mod ffn;

use strata_model::gguf::Gguf;

use crate::gpu::{Gpu, KernelCache};
use crate::weights::QuantMatrix;
use crate::{Error, Result};

/// What loading needs: the file, the device and the kernel cache.
pub struct LoadCtx<'a> {
    pub gguf: &'a Gguf,
    pub gpu: &'a Gpu,
    pub kernels: &'a KernelCache,
}

impl LoadCtx<'_> {
    /// A weight matrix `[k, n]` in its quantised form.
    pub fn matrix(&self, name: &str, k: usize, n: usize) -> Result<QuantMatrix> {
        let t = self.gguf.require_tensor(name)?;
        if t.dims != [k as u64, n as u64] {
            return Err(Error::Shape { op: "load", message: format!("`{name}` has shape {:?}, expected [{k}, {n}]", t.dims) });
        }
        QuantMatrix::upload(self.gpu, name, t.ty, k, n, self.gguf.tensor_data(t))
    }

    /// Rows `rows` of a weight matrix `[k, n]` (quantised rows are independent, so
    /// selecting rows needs no dequantisation).
    pub fn matrix_rows(&self, name: &str, k: usize, n: usize, rows: impl Iterator<Item = std::ops::Range<usize>>) -> Result<QuantMatrix> {
        let t = self.gguf.require_tensor(name)?;
        if t.dims != [k as u64, n as u64] {
            return Err(Error::Shape { op: "load", message: format!("`{name}` has shape {:?}, expected [{k}, {n}]", t.dims) });
        }
        let row_bytes = (t.size / n as u64) as usize;
        let data = self.gguf.tensor_data(t);
        let mut picked = Vec::new();
        let mut count = 0;
        for r in rows {
            picked.extend_from_slice(&data[r.start * row_bytes..r.end * row_bytes]);
            count += r.len();
        }
        QuantMatrix::upload(self.gpu, name, t.ty, k, count, &picked)
    }

    /// A 1-D f32 vector (norm weights), dequantised if stored otherwise.
    pub fn vector(&self, name: &str, len: usize) -> Result<wgpu::Buffer> {
        let t = self.gguf.require_tensor(name)?;
        if t.dims != [len as u64] {
            return Err(Error::Shape { op: "load", message: format!("`{name}` has shape {:?}, expected [{len}]", t.dims) });
        }
        let v = strata_model::quant::dequantize(t.ty, self.gguf.tensor_data(t))?;
        Ok(self.gpu.storage_init(name, bytemuck::cast_slice(&v)))
    }
}
