// The parameters of the attention kernels (`attention`, `attention_sg`; Rust:
// `ops::attention::AttnParams`) at binding 1.

struct Params {
    n_heads: u32,
    n_kv_heads: u32,
    // n_heads / n_kv_heads
    group: u32,
    // log2 of the positions per block.
    block_shift: u32,
    scale: f32,
    // 1: multiply by sigmoid(gate[row * gate_stride + gate_offset + d]), row = t * n_heads + h.
    gated: u32,
    gate_stride: u32,
    gate_offset: u32,
    // Entries per sequence slot of the block table.
    max_blocks: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(1) var<uniform> params: Params;
