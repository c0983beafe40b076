// The parameters of the attention kernels (`attention`, `attention_sg`; Rust:
// `ops::attention::AttnParams`) at binding 1, their block table at binding 3, and the
// rules both read the paged pool by.

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
    // attention.wgsl: LOOP, SPLIT or MERGE (see there); attention_sg: unread.
    mode: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(1) var<uniform> params: Params;
// [slots, max_blocks]: each sequence's blocks in order.
@group(0) @binding(3) var<storage, read> table: array<u32>;

// Keys a row at position `pos` sees: its own and every earlier one, up to what a slot's
// block table can hold.
fn keys_seen(pos: u32) -> u32 {
    return min(pos + 1u, params.max_blocks << params.block_shift);
}

// The pool block holding position `j` of the sequence in `slot`.
fn block_of(slot: u32, j: u32) -> u32 {
    return table[slot * params.max_blocks + (j >> params.block_shift)];
}
