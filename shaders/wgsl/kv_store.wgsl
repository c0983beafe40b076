// Stores the step's keys and values (f32 [T, n_kv_heads, head_dim]) into the paged f16 KV
// pool ([blocks * block_size, n_kv_heads, head_dim], two halves per u32): each row at its
// position's slot in the block its sequence's block table names.

const WG: u32 = 64u;

//#include "common/step.wgsl"
//#include "common/batch.wgsl"

struct Params {
    // n_kv_heads * head_dim / 2: u32 words per position.
    row_pairs: u32,
    // log2 of the positions per block.
    block_shift: u32,
    // Entries per sequence slot of the block table.
    max_blocks: u32,
    // Blocks in the pool.
    n_blocks: u32,
}

@group(0) @binding(1) var<uniform> params: Params;
@group(0) @binding(2) var<storage, read> rows: array<RowInfo>;
// [slots, max_blocks]: each sequence's blocks in order.
@group(0) @binding(3) var<storage, read> table: array<u32>;
@group(0) @binding(4) var<storage, read> k: array<vec2<f32>>;
@group(0) @binding(5) var<storage, read> v: array<vec2<f32>>;
@group(0) @binding(6) var<storage, read_write> k_pool: array<u32>;
@group(0) @binding(7) var<storage, read_write> v_pool: array<u32>;

// f16 conversion of values beyond its range is undefined in WGSL: saturate them.
fn pack(a: vec2<f32>) -> u32 {
    return pack2x16float(clamp(a, vec2<f32>(-65504.0), vec2<f32>(65504.0)));
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = wid.y;
    let i = wid.x * WG + lid;
    if t >= step.n_tokens || i >= params.row_pairs {
        return;
    }
    let info = rows[t];
    let b = info.pos >> params.block_shift;
    if b >= params.max_blocks {
        return;
    }
    let block = table[info.slot * params.max_blocks + b];
    if block >= params.n_blocks {
        return;
    }
    let at = (block << params.block_shift) | (info.pos & ((1u << params.block_shift) - 1u));
    let src = t * params.row_pairs + i;
    let dst = at * params.row_pairs + i;
    k_pool[dst] = pack(k[src]);
    v_pool[dst] = pack(v[src]);
}
