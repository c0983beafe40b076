//! The KV cache of one attention layer for one sequence, on the GPU.

use crate::gpu::Gpu;
use crate::{Error, Result};

/// Keys and values `[capacity, n_kv_heads, head_dim]` stored as f16, two per u32 word: half
/// the memory of f32, and the attention kernel reads them with aligned word loads.
/// Written by [`crate::ops::attention::kv_store`], read by [`crate::ops::attention::attention`].
pub struct KvCache {
    k: wgpu::Buffer,
    v: wgpu::Buffer,
    capacity: u32,
    n_kv_heads: u32,
    head_dim: u32,
}

impl std::fmt::Debug for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache")
            .field("capacity", &self.capacity)
            .field("n_kv_heads", &self.n_kv_heads)
            .field("head_dim", &self.head_dim)
            .finish()
    }
}

impl KvCache {
    /// The largest head the attention kernel takes.
    pub const MAX_HEAD_DIM: u32 = 512;

    /// Bytes of K and V together per position, e.g. for the planner.
    pub fn bytes_per_position(n_kv_heads: u32, head_dim: u32) -> u64 {
        2 * u64::from(n_kv_heads) * u64::from(head_dim) * 2
    }

    /// An empty cache for positions `0..capacity`. `head_dim` must be a multiple of 4 (the
    /// kernels read 4 halves at a time) and at most [`KvCache::MAX_HEAD_DIM`]; K and V must
    /// each fit one storage binding.
    pub fn new(gpu: &Gpu, capacity: u32, n_kv_heads: u32, head_dim: u32) -> Result<KvCache> {
        let shape = |message: String| Error::Shape { op: "kv cache", message };
        if capacity == 0
            || n_kv_heads == 0
            || head_dim == 0
            || !head_dim.is_multiple_of(4)
            || head_dim > Self::MAX_HEAD_DIM
        {
            return Err(shape(format!(
                "capacity {capacity}, {n_kv_heads} KV heads of {head_dim}: head_dim must be a multiple of 4 up to {}",
                Self::MAX_HEAD_DIM
            )));
        }
        let bytes = u64::from(capacity) * Self::bytes_per_position(n_kv_heads, head_dim) / 2;
        if bytes > gpu.max_binding() {
            return Err(shape(format!(
                "{capacity} positions of {n_kv_heads} x {head_dim} f16 need {bytes} bytes each for K and V, over the \
                 adapter's largest binding of {} bytes",
                gpu.max_binding()
            )));
        }
        Ok(KvCache {
            k: gpu.storage("kv cache k", bytes),
            v: gpu.storage("kv cache v", bytes),
            capacity,
            n_kv_heads,
            head_dim,
        })
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    pub fn n_kv_heads(&self) -> u32 {
        self.n_kv_heads
    }

    pub fn head_dim(&self) -> u32 {
        self.head_dim
    }

    /// Keys, f16 pairs `[capacity, n_kv_heads, head_dim / 2]` of u32.
    pub fn k(&self) -> &wgpu::Buffer {
        &self.k
    }

    /// Values, laid out as the keys.
    pub fn v(&self) -> &wgpu::Buffer {
        &self.v
    }

    /// Bytes held on the GPU.
    pub fn bytes(&self) -> u64 {
        self.k.size() + self.v.size()
    }
}
