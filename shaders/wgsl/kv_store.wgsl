// Stores the step's keys and values (f32 [T, n_kv_heads, head_dim]) into the f16 KV cache
// ([capacity, n_kv_heads, head_dim], two halves per u32) at each token's position.

const WG: u32 = 64u;

//#include "common/step.wgsl"

struct Params {
    // n_kv_heads * head_dim / 2: u32 words per position.
    row_pairs: u32,
    capacity: u32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(1) var<uniform> params: Params;
@group(0) @binding(2) var<storage, read> positions: array<u32>;
@group(0) @binding(3) var<storage, read> k: array<vec2<f32>>;
@group(0) @binding(4) var<storage, read> v: array<vec2<f32>>;
@group(0) @binding(5) var<storage, read_write> k_cache: array<u32>;
@group(0) @binding(6) var<storage, read_write> v_cache: array<u32>;

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
    let pos = positions[t];
    if pos >= params.capacity {
        return;
    }
    let src = t * params.row_pairs + i;
    let dst = pos * params.row_pairs + i;
    k_cache[dst] = pack(k[src]);
    v_cache[dst] = pack(v[src]);
}
