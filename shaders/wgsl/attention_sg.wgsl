// Causal softmax attention over the paged f16 KV pool for adapters that run a subgroup as
// the SIMD lanes of one CPU thread (lavapipe): one subgroup of SG lanes per (row t, query
// head h), the lanes splitting the head's dims, keys taken one at a time in order with an
// online softmax. No workgroup memory and no barriers: on such adapters every access to
// workgroup memory is a loop over the lanes, so the tiled `attention` kernel spends most
// of its time there. Same inputs, outputs and parameters as `attention`.

const HEAD_DIM: u32 = 64u;
const SG: u32 = 8u;
// Dims per lane, in quads: HEAD_DIM / SG / 4.
const LANE_QUADS: u32 = 2u;

//#include "common/step.wgsl"
//#include "common/batch.wgsl"

//#include "common/attention.wgsl"
@group(0) @binding(2) var<storage, read> rows: array<RowInfo>;
// [slots, max_blocks]: each sequence's blocks in order.
@group(0) @binding(3) var<storage, read> table: array<u32>;
@group(0) @binding(4) var<storage, read> q: array<vec4<f32>>;
// f16 quads: [positions, n_kv_heads, HEAD_DIM / 4] of vec2<u32>.
@group(0) @binding(5) var<storage, read> k_pool: array<vec2<u32>>;
@group(0) @binding(6) var<storage, read> v_pool: array<vec2<u32>>;
@group(0) @binding(7) var<storage, read> gate: array<f32>;
@group(0) @binding(8) var<storage, read_write> out: array<vec4<f32>>;

const QUADS: u32 = HEAD_DIM / 4u;

fn half4(w: vec2<u32>) -> vec4<f32> {
    return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));
}

@compute @workgroup_size(SG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    let t = wid.x;
    let h = wid.y;
    if t >= step.n_tokens {
        return;
    }
    let info = rows[t];
    let n_keys = min(info.pos + 1u, params.max_blocks << params.block_shift);
    let kvh = h / params.group;
    let row = t * params.n_heads + h;
    // This lane's quads of the head: lane, lane + SG, ...
    var qs: array<vec4<f32>, LANE_QUADS>;
    for (var i = 0u; i < LANE_QUADS; i++) {
        qs[i] = q[row * QUADS + lane + i * SG] * params.scale;
    }
    let mask = (1u << params.block_shift) - 1u;
    var m = -3.0e38;
    var l = 0.0;
    var acc: array<vec4<f32>, LANE_QUADS>;
    for (var j = 0u; j < n_keys; j++) {
        let block = table[info.slot * params.max_blocks + (j >> params.block_shift)];
        let base = (((block << params.block_shift) | (j & mask)) * params.n_kv_heads + kvh) * QUADS + lane;
        var d = 0.0;
        for (var i = 0u; i < LANE_QUADS; i++) {
            d += dot(qs[i], half4(k_pool[base + i * SG]));
        }
        let s = subgroupAdd(d);
        let m_new = max(m, s);
        let corr = exp(m - m_new);
        let p = exp(s - m_new);
        l = l * corr + p;
        m = m_new;
        for (var i = 0u; i < LANE_QUADS; i++) {
            acc[i] = acc[i] * corr + p * half4(v_pool[base + i * SG]);
        }
    }
    let inv_l = 1.0 / l;
    for (var i = 0u; i < LANE_QUADS; i++) {
        var o = acc[i] * inv_l;
        let quad = lane + i * SG;
        if params.gated != 0u {
            let gb = row * params.gate_stride + params.gate_offset + 4u * quad;
            o /= 1.0 + exp(-vec4<f32>(gate[gb], gate[gb + 1u], gate[gb + 2u], gate[gb + 3u]));
        }
        out[row * QUADS + quad] = o;
    }
}
