// Causal softmax attention over the paged f16 KV pool: one workgroup per (row t, query
// head h), attending to positions 0..=pos of row t's own sequence, KV head
// h / (n_heads / n_kv_heads), each position found through the sequence's block table. One
// kernel serves decode and prefill rows of any sequences: the step's own keys are stored
// (kv_store) before it runs.
//
// Keys are taken in tiles of WG with an online softmax (running max m and sum l; earlier
// partial sums are rescaled by exp(m_old - m_new)), so any context length runs in fixed
// workgroup memory. Per tile each thread scores one key; then each thread accumulates
// PAIRS_PER_THREAD pairs of output dims over every SLICES-th key of the tile (SLICES > 1
// when the head has fewer pairs than the workgroup has threads; slices are summed at
// the end). Optionally the output is gated: out *= sigmoid(gate).

const HEAD_DIM: u32 = 64u;
const WG: u32 = 64u;
// ceil(HEAD_DIM / 2 / WG)
const PAIRS_PER_THREAD: u32 = 1u;
// max(1, WG / (HEAD_DIM / 2))
const SLICES: u32 = 2u;

const PAIRS: u32 = HEAD_DIM / 2u;
const QUADS: u32 = HEAD_DIM / 4u;
// Below every score, yet finite, so that exp(NEG - NEG) is no NaN.
const NEG: f32 = -3.0e38;

//#include "common/step.wgsl"
//#include "common/batch.wgsl"

//#include "common/attention.wgsl"
@group(0) @binding(2) var<storage, read> rows: array<RowInfo>;
@group(0) @binding(4) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read> k_pool: array<vec2<u32>>;
@group(0) @binding(6) var<storage, read> v_pool: array<u32>;
@group(0) @binding(7) var<storage, read> gate: array<f32>;
@group(0) @binding(8) var<storage, read_write> out: array<vec2<f32>>;

// Where position j of the sequence in `slot` is in the pool.
fn pool_position(slot: u32, j: u32) -> u32 {
    return (block_of(slot, j) << params.block_shift) | (j & ((1u << params.block_shift) - 1u));
}

var<workgroup> q_s: array<vec4<f32>, QUADS>;
var<workgroup> score: array<f32, WG>;
var<workgroup> prob: array<f32, WG>;
// Each key of the tile's place in the pool, in two halves by tile parity: a thread may
// write the next tile's while another still reads this one's.
var<workgroup> at_s: array<u32, 2u * WG>;
var<workgroup> partial: array<vec2<f32>, WG>;
var<workgroup> n_keys_s: u32;
var<workgroup> slot_s: u32;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = wid.x;
    let h = wid.y;
    if t >= step.n_tokens {
        return;
    }
    let kvh = h / params.group;
    let row = t * params.n_heads + h;
    for (var i = lid; i < QUADS; i += WG) {
        q_s[i] = q[row * QUADS + i] * params.scale;
    }
    if lid == 0u {
        let info = rows[t];
        n_keys_s = keys_seen(info.pos);
        slot_s = info.slot;
    }
    let n_keys = workgroupUniformLoad(&n_keys_s);
    let slot = workgroupUniformLoad(&slot_s);

    let pair0 = lid % PAIRS;
    let slice = lid / PAIRS;
    var m = NEG;
    var l = 0.0;
    var acc: array<vec2<f32>, PAIRS_PER_THREAD>;
    for (var start = 0u; start < n_keys; start += WG) {
        let n_tile = min(WG, n_keys - start);
        let half = ((start / WG) & 1u) * WG;
        var s = NEG;
        if lid < n_tile {
            let at = pool_position(slot, start + lid);
            at_s[half + lid] = at;
            let kb = (at * params.n_kv_heads + kvh) * QUADS;
            var d = 0.0;
            for (var i = 0u; i < QUADS; i++) {
                let w = k_pool[kb + i];
                d += dot(q_s[i], vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y)));
            }
            s = d;
        }
        score[lid] = s;
        workgroupBarrier();
        var m_tile = NEG;
        for (var i = 0u; i < n_tile; i++) {
            m_tile = max(m_tile, score[i]);
        }
        let m_new = max(m, m_tile);
        prob[lid] = exp(s - m_new);
        workgroupBarrier();
        // Every thread sees the same scores in the same order, so m and l agree everywhere.
        let corr = exp(m - m_new);
        m = m_new;
        l *= corr;
        for (var i = 0u; i < n_tile; i++) {
            l += prob[i];
        }
        for (var k = 0u; k < PAIRS_PER_THREAD; k++) {
            acc[k] *= corr;
        }
        if slice < SLICES {
            for (var i = slice; i < n_tile; i += SLICES) {
                let p = prob[i];
                let vb = (at_s[half + i] * params.n_kv_heads + kvh) * PAIRS;
                for (var k = 0u; k < PAIRS_PER_THREAD; k++) {
                    let pr = pair0 + k * WG;
                    if pr < PAIRS {
                        acc[k] += p * unpack2x16float(v_pool[vb + pr]);
                    }
                }
            }
        }
        // The next tile writes `score` only after the barrier above, which every thread
        // passes after reading it, and `prob` only after its own first barrier.
    }
    if SLICES > 1u {
        // Here PAIRS_PER_THREAD is 1 and slice s of pair p is thread s * PAIRS + p.
        partial[lid] = acc[0];
        workgroupBarrier();
        if slice == 0u {
            for (var s = 1u; s < SLICES; s++) {
                acc[0] += partial[lid + s * PAIRS];
            }
        }
    }
    if slice != 0u {
        return;
    }
    let inv_l = 1.0 / l;
    for (var k = 0u; k < PAIRS_PER_THREAD; k++) {
        let pr = pair0 + k * WG;
        if pr < PAIRS {
            var o = acc[k] * inv_l;
            if params.gated != 0u {
                let gb = row * params.gate_stride + params.gate_offset + 2u * pr;
                o /= 1.0 + exp(-vec2<f32>(gate[gb], gate[gb + 1u]));
            }
            out[row * PAIRS + pr] = o;
        }
    }
}
