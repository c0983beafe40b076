//! Per-step values that every kernel of a step may read.

/// The uniform written once per step (before the step's one submission). Bind groups are
/// built once for the largest step, so kernels dispatched per row guard on `n_tokens` and
/// those dispatched per sequence on `n_seqs`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Step {
    /// Rows in the step, all sequences together.
    pub n_tokens: u32,
    /// Sequences in the step, each a run of consecutive rows.
    pub n_seqs: u32,
    pub _pad: [u32; 2],
}

impl Step {
    pub fn new(n_tokens: u32, n_seqs: u32) -> Step {
        Step { n_tokens, n_seqs, _pad: [0; 2] }
    }

    /// A step of `n_tokens` rows of one sequence.
    pub fn rows(n_tokens: u32) -> Step {
        Step::new(n_tokens, 1)
    }
}
