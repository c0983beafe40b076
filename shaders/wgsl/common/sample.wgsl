// What each sampled row asks of the sampling kernels (Rust: `ops::sample::RowSampling`),
// one entry per row of the output head.

struct RowSampling {
    // Candidates to return (top_k): 1 for the argmax, up to the kernel's K; 0 for none.
    k: u32,
    // Recent ids the penalties look at (penalize), 0 for none.
    count: u32,
    repeat: f32,
    frequency: f32,
    presence: f32,
    // 1: only the tokens its row of the grammar mask allows (top_k).
    masked: u32,
    pad1: u32,
    pad2: u32,
}
