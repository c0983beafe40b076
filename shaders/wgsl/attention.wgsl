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
//
// A row's keys come in chunks (`chunk_len`: at most SPLITS of them, of whole tiles, set by
// the row's own key count alone), each attended from a fresh softmax state, the chunks'
// states then combined in order (`combine`). How the chunks run is `params.mode`:
// - LOOP: the row's workgroup runs them one after another (prefill, large steps);
// - SPLIT: one workgroup per (row, head, chunk), each leaving its chunk's state in `parts`
//   (decode steps, whose few rows would otherwise give a GPU a workgroup per query head
//   for the whole context: 24 for a Qwen3.6-27B row), and then
// - MERGE: one workgroup per (row, head) combines them, in the same order.
// The same arithmetic in every mode, in one pipeline: a row's bits do not depend on which
// ran it, so batched, speculative and plain steps agree.

const HEAD_DIM: u32 = 64u;
const WG: u32 = 64u;
// ceil(HEAD_DIM / 2 / WG)
const PAIRS_PER_THREAD: u32 = 1u;
// max(1, WG / (HEAD_DIM / 2))
const SLICES: u32 = 2u;
// Chunks a row's keys are split into, at most, and the fewest keys in a chunk (whole
// tiles): `strata_model::plan::ATTENTION_SPLITS` and `ATTENTION_CHUNK_MIN`.
const SPLITS: u32 = 16u;
const CHUNK_MIN: u32 = 256u;

const LOOP: u32 = 0u;
const SPLIT: u32 = 1u;
const MERGE: u32 = 2u;

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
// SPLIT and MERGE: each (row, head, chunk)'s softmax state, HEAD_DIM + 2 values: m, l and
// the unnormalised sums of the values.
@group(0) @binding(9) var<storage, read_write> parts: array<f32>;

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

// The softmax state of a run of keys, as one thread holds it: the running max and sum
// (the same in every thread) and the thread's pairs of value sums.
struct State {
    m: f32,
    l: f32,
    acc: array<vec2<f32>, PAIRS_PER_THREAD>,
}

// Keys in each of a row's chunks: whole tiles, at least CHUNK_MIN, as many as make at
// most SPLITS chunks. A function of the row's key count only.
fn chunk_len(n_keys: u32) -> u32 {
    let even = (n_keys + SPLITS - 1u) / SPLITS;
    return max(CHUNK_MIN, (even + WG - 1u) / WG * WG);
}

// Attention of the row's query (in q_s) over keys begin..end of the sequence in `slot`,
// from a fresh state; the slices' sums are added up (in slice 0's threads).
fn attend(slot: u32, kvh: u32, begin: u32, end: u32, lid: u32) -> State {
    let pair0 = lid % PAIRS;
    let slice = lid / PAIRS;
    var st: State;
    st.m = NEG;
    st.l = 0.0;
    for (var start = begin; start < end; start += WG) {
        let n_tile = min(WG, end - start);
        // Chunks begin at whole tiles, so the parity alternates across chunks too.
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
        let m_new = max(st.m, m_tile);
        prob[lid] = exp(s - m_new);
        workgroupBarrier();
        // Every thread sees the same scores in the same order, so m and l agree everywhere.
        let corr = exp(st.m - m_new);
        st.m = m_new;
        st.l *= corr;
        for (var i = 0u; i < n_tile; i++) {
            st.l += prob[i];
        }
        for (var k = 0u; k < PAIRS_PER_THREAD; k++) {
            st.acc[k] *= corr;
        }
        if slice < SLICES {
            for (var i = slice; i < n_tile; i += SLICES) {
                let p = prob[i];
                let vb = (at_s[half + i] * params.n_kv_heads + kvh) * PAIRS;
                for (var k = 0u; k < PAIRS_PER_THREAD; k++) {
                    let pr = pair0 + k * WG;
                    if pr < PAIRS {
                        st.acc[k] += p * unpack2x16float(v_pool[vb + pr]);
                    }
                }
            }
        }
        // The next tile writes `score` only after the barrier above, which every thread
        // passes after reading it, and `prob` only after its own first barrier.
    }
    if SLICES > 1u {
        // Here PAIRS_PER_THREAD is 1 and slice s of pair p is thread s * PAIRS + p. Every
        // chunk has a tile, whose barriers keep this write after the last chunk's reads.
        partial[lid] = st.acc[0];
        workgroupBarrier();
        if slice == 0u {
            for (var s = 1u; s < SLICES; s++) {
                st.acc[0] += partial[lid + s * PAIRS];
            }
        }
    }
    return st;
}

// Two runs' states as one: `a` the earlier keys'. Products through fma, so that no
// compiler fuses them differently where this is inlined.
fn combine(a: State, b: State) -> State {
    var c: State;
    c.m = max(a.m, b.m);
    let ca = exp(a.m - c.m);
    let cb = exp(b.m - c.m);
    c.l = fma(a.l, ca, b.l * cb);
    for (var k = 0u; k < PAIRS_PER_THREAD; k++) {
        c.acc[k] = fma(a.acc[k], vec2<f32>(ca), b.acc[k] * cb);
    }
    return c;
}

// Where chunk c of (row, head) keeps its state in `parts`.
fn part_base(row: u32, c: u32) -> u32 {
    return (row * SPLITS + c) * (HEAD_DIM + 2u);
}

fn store_part(row: u32, c: u32, st: State, lid: u32) {
    let base = part_base(row, c);
    if lid == 0u {
        parts[base] = st.m;
        parts[base + 1u] = st.l;
    }
    if lid < PAIRS {
        for (var k = 0u; k < PAIRS_PER_THREAD; k++) {
            let pr = lid + k * WG;
            if pr < PAIRS {
                parts[base + 2u + 2u * pr] = st.acc[k].x;
                parts[base + 3u + 2u * pr] = st.acc[k].y;
            }
        }
    }
}

fn load_part(row: u32, c: u32, lid: u32) -> State {
    let base = part_base(row, c);
    var st: State;
    st.m = parts[base];
    st.l = parts[base + 1u];
    let pair0 = lid % PAIRS;
    for (var k = 0u; k < PAIRS_PER_THREAD; k++) {
        let pr = pair0 + k * WG;
        if pr < PAIRS {
            st.acc[k] = vec2<f32>(parts[base + 2u + 2u * pr], parts[base + 3u + 2u * pr]);
        }
    }
    return st;
}

// The row's output from its whole state, written by slice 0's threads.
fn finish(row: u32, st: State, lid: u32) {
    if lid >= PAIRS {
        return;
    }
    let inv_l = 1.0 / st.l;
    for (var k = 0u; k < PAIRS_PER_THREAD; k++) {
        let pr = lid + k * WG;
        if pr < PAIRS {
            var o = st.acc[k] * inv_l;
            if params.gated != 0u {
                let gb = row * params.gate_stride + params.gate_offset + 2u * pr;
                o /= 1.0 + exp(-vec2<f32>(gate[gb], gate[gb + 1u]));
            }
            out[row * PAIRS + pr] = o;
        }
    }
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    // Chunks vary fastest, so that an adapter handing out workgroups in ranges gives
    // each thread a share of the real chunks (a short row leaves most of them empty).
    let t = wid.z;
    let h = wid.y;
    if t >= step.n_tokens {
        return;
    }
    let kvh = h / params.group;
    let row = t * params.n_heads + h;
    for (var i = lid; i < QUADS; i += WG) {
        q_s[i] = q[row * QUADS + i] * params.scale;
    }
    // The uniform loads below are barriers too: q_s is complete after them.
    if lid == 0u {
        let info = rows[t];
        n_keys_s = keys_seen(info.pos);
        slot_s = info.slot;
    }
    let n_keys = workgroupUniformLoad(&n_keys_s);
    let slot = workgroupUniformLoad(&slot_s);
    let len = chunk_len(n_keys);
    let n_chunks = (n_keys + len - 1u) / len;
    if params.mode == MERGE {
        // A row of one chunk was finished by its SPLIT workgroup.
        if n_chunks > 1u {
            var st = load_part(row, 0u, lid);
            for (var c = 1u; c < n_chunks; c++) {
                st = combine(st, load_part(row, c, lid));
            }
            finish(row, st, lid);
        }
        return;
    }
    if params.mode == SPLIT {
        let c = wid.x;
        if c >= n_chunks {
            return;
        }
        let st = attend(slot, kvh, c * len, min(n_keys, (c + 1u) * len), lid);
        if n_chunks == 1u {
            finish(row, st, lid);
        } else {
            store_part(row, c, st, lid);
        }
        return;
    }
    var st = attend(slot, kvh, 0u, min(n_keys, len), lid);
    for (var c = 1u; c < n_chunks; c++) {
        st = combine(st, attend(slot, kvh, c * len, min(n_keys, (c + 1u) * len), lid));
    }
    finish(row, st, lid);
}
