//! Per-step values that every kernel of a step may read.

/// The uniform written once per step (before the step's one submission). Kernels
/// dispatched per token guard on `n_tokens`, since prefill batches vary in size while
/// their bind groups are built once for the largest batch.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Step {
    pub n_tokens: u32,
    pub _pad: [u32; 3],
}
