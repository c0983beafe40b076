//! The recurrent state of one Gated DeltaNet layer for one sequence, on the GPU.

use strata_model::config::DeltaNetConfig;

use crate::gpu::Gpu;
use crate::{Error, Result};

/// The conv history and the delta-rule matrices of one layer, zero at creation. Unlike a
/// KV cache its size does not depend on the context length. Read and advanced by the ops
/// of [`crate::ops::deltanet`].
pub struct DeltaNetState {
    /// f32 `[conv_kernel - 1, channels]`: the previous inputs of each conv channel, oldest first.
    conv: wgpu::Buffer,
    /// f32 `[n_value_heads, head_dim, head_dim]`: per value head, rows by key dim and
    /// columns by value dim.
    matrices: wgpu::Buffer,
    config: DeltaNetConfig,
}

impl std::fmt::Debug for DeltaNetState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeltaNetState").field("config", &self.config).finish()
    }
}

impl DeltaNetState {
    /// The largest head the delta-rule kernel takes (each thread keeps a column of the
    /// state in private memory); heads must also be a multiple of 4 (it reads vec4s).
    pub const MAX_HEAD_DIM: usize = 256;

    /// Bytes of one layer's state for one sequence, e.g. for the planner.
    pub fn bytes_for(cfg: &DeltaNetConfig) -> u64 {
        cfg.state_values() as u64 * 4
    }

    pub fn new(gpu: &Gpu, cfg: &DeltaNetConfig) -> Result<DeltaNetState> {
        let shape = |message: String| Error::Shape { op: "deltanet state", message };
        let DeltaNetConfig { conv_kernel, n_key_heads, n_value_heads, head_dim } = *cfg;
        if conv_kernel == 0
            || n_key_heads == 0
            || head_dim == 0
            || head_dim > Self::MAX_HEAD_DIM
            || !head_dim.is_multiple_of(4)
            || !n_value_heads.is_multiple_of(n_key_heads)
        {
            return Err(shape(format!(
                "{cfg:?}: needs conv_kernel >= 1, key heads dividing value heads, head_dim a multiple of 4 up to {}",
                Self::MAX_HEAD_DIM
            )));
        }
        let matrix_bytes = (n_value_heads * head_dim * head_dim) as u64 * 4;
        if matrix_bytes > gpu.max_binding() {
            return Err(shape(format!(
                "{matrix_bytes} bytes of state matrices exceed the adapter's largest binding of {}",
                gpu.max_binding()
            )));
        }
        Ok(DeltaNetState {
            conv: gpu.storage("deltanet conv state", ((conv_kernel - 1) * cfg.conv_channels()) as u64 * 4),
            matrices: gpu.storage("deltanet state", matrix_bytes),
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &DeltaNetConfig {
        &self.config
    }

    pub fn conv(&self) -> &wgpu::Buffer {
        &self.conv
    }

    pub fn matrices(&self) -> &wgpu::Buffer {
        &self.matrices
    }

    /// Bytes held on the GPU.
    pub fn bytes(&self) -> u64 {
        self.conv.size() + self.matrices.size()
    }

    /// Zeroes the state, for a new sequence in old buffers. Ordered before any later
    /// submission on the same queue.
    pub fn reset(&self, gpu: &Gpu) {
        let mut enc =
            gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("deltanet reset") });
        enc.clear_buffer(&self.conv, 0, None);
        enc.clear_buffer(&self.matrices, 0, None);
        gpu.queue.submit([enc.finish()]);
    }
}
