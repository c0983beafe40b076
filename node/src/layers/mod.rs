//! The parts a layer is made of (attention, DeltaNet, feed-forward), each loaded from the
//! tensors `strata_model::arch` names and able to record its ops for one sequence. The
//! architectures in [`crate::arch`] put them together.

pub mod attention;
pub mod deltanet;
pub mod ffn;
pub mod moe;
pub mod projections;

use strata_model::arch::TensorSpec;
use strata_model::gguf::Gguf;

use crate::gpu::{Gpu, KernelCache};
use crate::ops::matmul::MAX_OUTPUTS;
use crate::weights::QuantMatrix;
use crate::{Error, Result};

/// What loading needs: the file, the device and the kernel cache.
pub struct LoadCtx<'a> {
    pub gguf: &'a Gguf,
    pub gpu: &'a Gpu,
    pub kernels: &'a KernelCache,
}

impl LoadCtx<'_> {
    /// The file's tensor named by `spec`, with the shape the schema gives it.
    fn tensor(&self, spec: &TensorSpec) -> Result<&strata_model::gguf::TensorInfo> {
        let t = self.gguf.require_tensor(&spec.name)?;
        if !spec.matches(&t.dims) {
            return Err(Error::Shape {
                op: "load",
                message: format!("`{}` has shape {:?}, expected {:?}", spec.name, t.dims, spec.dims),
            });
        }
        Ok(t)
    }

    /// A weight matrix `[k, n]` in its quantised form.
    pub fn matrix(&self, spec: &TensorSpec) -> Result<QuantMatrix> {
        let t = self.tensor(spec)?;
        QuantMatrix::upload(self.gpu, &spec.name, t.ty, spec.k(), spec.n(), self.gguf.tensor_data(t))
    }

    /// Matrices of one input (the same `k`) end to end as one `[k, n1 + n2 + ..]`, for
    /// [`crate::ops::Recorder::matmul_into`] to run as one product writing each its own
    /// output; `None` where they are stored in different formats (then each runs alone).
    pub fn fused(&self, specs: &[&TensorSpec]) -> Result<Option<QuantMatrix>> {
        let tensors = specs.iter().map(|s| self.tensor(s)).collect::<Result<Vec<_>>>()?;
        let (ty, k) = (tensors[0].ty, specs[0].k());
        let same = tensors.iter().zip(specs).all(|(t, s)| t.ty == ty && s.k() == k);
        // Rows not of whole blocks: each alone, whose upload says what is wrong.
        let Some(row_bytes) = ty.bytes_for(k as u64).filter(|_| same && specs.len() <= MAX_OUTPUTS) else {
            return Ok(None);
        };
        let mut data = Vec::new();
        for (t, s) in tensors.iter().zip(specs) {
            let bytes = row_bytes as usize * s.n();
            let stored = self.gguf.tensor_data(t);
            if stored.len() < bytes {
                return Err(Error::Shape { op: "load", message: format!("`{}` holds {} bytes", s.name, stored.len()) });
            }
            data.extend_from_slice(&stored[..bytes]);
        }
        let n = specs.iter().map(|s| s.n()).sum();
        let name = specs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(" + ");
        QuantMatrix::upload(self.gpu, &name, ty, k, n, &data).map(Some)
    }

    /// A matrix `[k, n]` as two matrices `[k / 2, n]`: the first and the second half of
    /// each row (the MTP block's `eh_proj`, whose input is two vectors end to end, so that
    /// each half multiplies its own vector and no concatenation is needed).
    pub fn matrix_halves(&self, spec: &TensorSpec) -> Result<(QuantMatrix, QuantMatrix)> {
        let t = self.tensor(spec)?;
        let (k, n) = (spec.k(), spec.n());
        let half = t.ty.bytes_for(k as u64 / 2).filter(|_| k % 2 == 0).ok_or_else(|| Error::Shape {
            op: "load",
            message: format!(
                "`{}`: rows of {k} {} values do not split into two halves of whole blocks",
                spec.name, t.ty
            ),
        })? as usize;
        let data = self.gguf.tensor_data(t);
        if data.len() < 2 * half * n {
            return Err(Error::Shape { op: "load", message: format!("`{}` holds {} bytes", spec.name, data.len()) });
        }
        let rows = data[..2 * half * n].chunks_exact(2 * half);
        let (first, second): (Vec<&[u8]>, Vec<&[u8]>) = rows.map(|r| r.split_at(half)).unzip();
        let upload = |which: &str, parts: Vec<&[u8]>| {
            QuantMatrix::upload(self.gpu, &format!("{} ({which} half)", spec.name), t.ty, k / 2, n, &parts.concat())
        };
        Ok((upload("first", first)?, upload("second", second)?))
    }

    /// A 3-D tensor of stacked matrices `[k, n, matrices]` (a MoE layer's experts), kept
    /// quantised as stored, split across bindings between experts.
    pub fn experts(&self, spec: &TensorSpec) -> Result<QuantMatrix> {
        let t = self.tensor(spec)?;
        let dims = (spec.k(), spec.n(), spec.matrices());
        QuantMatrix::upload_experts(self.gpu, &spec.name, t.ty, dims, self.gguf.tensor_data(t), self.gpu.max_binding())
    }

    /// A tensor read whole as f32 (norm weights, biases, conv taps), dequantised if stored
    /// otherwise.
    pub fn vector(&self, spec: &TensorSpec) -> Result<wgpu::Buffer> {
        self.vectors(&spec.name, &[spec])
    }

    /// Several such tensors end to end in one buffer, for a kernel that binds them as one.
    pub fn vectors(&self, label: &str, specs: &[&TensorSpec]) -> Result<wgpu::Buffer> {
        let mut all = Vec::new();
        for spec in specs {
            let t = self.tensor(spec)?;
            all.extend(strata_model::quant::dequantize(t.ty, self.gguf.tensor_data(t))?);
        }
        Ok(self.gpu.storage_init(label, bytemuck::cast_slice(&all)))
    }
}
