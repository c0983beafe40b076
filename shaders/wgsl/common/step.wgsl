// The per-step uniform (Rust: `gpu::Step`) at binding 0: prefill batches vary in size
// while bind groups are built once for the largest, so per-token kernels guard on it.

struct Step {
    n_tokens: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<uniform> step: Step;
