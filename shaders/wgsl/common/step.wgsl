// The per-step uniform (Rust: `gpu::Step`) at binding 0: a step carries rows of several
// sequences while bind groups are built once for the largest step, so per-row kernels
// guard on `n_tokens` and per-sequence kernels on `n_seqs`.

struct Step {
    // Rows in the step (each a token of one of its sequences).
    n_tokens: u32,
    // Sequences in the step, each a run of consecutive rows.
    n_seqs: u32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<uniform> step: Step;
