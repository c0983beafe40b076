// Causal softmax attention over the paged f16 KV pool for adapters that run a subgroup as
// the SIMD lanes of one CPU thread (lavapipe): one subgroup of SG lanes per (row, KV
// head), the lanes splitting the head dims, keys taken one at a time in order with an
// online softmax per row and query head; rows of one sequence go ROWS at a time. Such an
// adapter loads storage memory lane by lane, each value in a loop with a bounds check, so
// loads are what attention costs there; each key and value is therefore loaded and
// unpacked once for what shares it: a lone row's GQ query heads (every decode row), or
// one query head of a group's rows (a prefill chunk's, or a speculative step's drafts),
// and each block's table entry once for its positions. No workgroup memory and no
// barriers: on such adapters every access to workgroup memory is a loop over the lanes.
// Every (row, head) is computed with the same operations in the same order (a key past a
// row's position leaves its sums as they are), so a row's output has the same bits alone
// or beside others. Same inputs, outputs and parameters as `attention`.

const HEAD_DIM: u32 = 64u;
const SG: u32 = 8u;
// Dims per lane, in quads: HEAD_DIM / SG / 4.
const LANE_QUADS: u32 = 2u;
// Rows of one sequence per workgroup.
const ROWS: u32 = 4u;
// Query heads per KV head (params.group).
const GQ: u32 = 2u;

//#include "common/step.wgsl"
//#include "common/batch.wgsl"

//#include "common/attention.wgsl"
@group(0) @binding(2) var<storage, read> rows: array<RowInfo>;
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

// A query row's lane quads of head row `row` (t * n_heads + h), scaled.
fn query(row: u32, lane: u32) -> array<vec4<f32>, LANE_QUADS> {
    var qs: array<vec4<f32>, LANE_QUADS>;
    for (var i = 0u; i < LANE_QUADS; i++) {
        qs[i] = q[row * QUADS + lane + i * SG] * params.scale;
    }
    return qs;
}

// The lane's quads of key and value `j - j0` of `block` (which starts at position j0),
// KV head `kvh`, unpacked.
struct KeyValue {
    k: array<vec4<f32>, LANE_QUADS>,
    v: array<vec4<f32>, LANE_QUADS>,
}

fn load_kv(block: u32, offset: u32, kvh: u32, lane: u32) -> KeyValue {
    let base = (((block << params.block_shift) | offset) * params.n_kv_heads + kvh) * QUADS + lane;
    var kv: KeyValue;
    for (var i = 0u; i < LANE_QUADS; i++) {
        kv.k[i] = half4(k_pool[base + i * SG]);
        kv.v[i] = half4(v_pool[base + i * SG]);
    }
    return kv;
}

// One (row, query head)'s online softmax over the keys so far.
struct Softmax {
    acc: array<vec4<f32>, LANE_QUADS>,
    m: f32,
    l: f32,
}

fn softmax_start() -> Softmax {
    var st: Softmax;
    st.m = -3.0e38;
    st.l = 0.0;
    return st;
}

// `st` after one more key and value: every (row, head) takes the same operations in the
// same order, whichever path runs it.
fn softmax_add(st: Softmax, qs: array<vec4<f32>, LANE_QUADS>, kv: KeyValue) -> Softmax {
    var d = 0.0;
    for (var i = 0u; i < LANE_QUADS; i++) {
        d += dot(qs[i], kv.k[i]);
    }
    let s = subgroupAdd(d);
    let m_new = max(st.m, s);
    let corr = exp(st.m - m_new);
    let p = exp(s - m_new);
    var o: Softmax;
    o.l = st.l * corr + p;
    o.m = m_new;
    for (var i = 0u; i < LANE_QUADS; i++) {
        o.acc[i] = st.acc[i] * corr + p * kv.v[i];
    }
    return o;
}

// One row alone (a decode row): its GQ query heads of KV head `kvh` together, each key
// and value loaded once for all of them.
fn one_row(t: u32, kvh: u32, lane: u32) {
    let info = rows[t];
    let n_keys = keys_seen(info.pos);
    let row0 = t * params.n_heads + kvh * GQ;
    var qs: array<array<vec4<f32>, LANE_QUADS>, GQ>;
    var st: array<Softmax, GQ>;
    for (var g = 0u; g < GQ; g++) {
        qs[g] = query(row0 + g, lane);
        st[g] = softmax_start();
    }
    let size = 1u << params.block_shift;
    for (var j0 = 0u; j0 < n_keys; j0 += size) {
        let block = block_of(info.slot, j0);
        for (var j = j0; j < min(j0 + size, n_keys); j++) {
            let kv = load_kv(block, j - j0, kvh, lane);
            for (var g = 0u; g < GQ; g++) {
                st[g] = softmax_add(st[g], qs[g], kv);
            }
        }
    }
    for (var g = 0u; g < GQ; g++) {
        write_row(row0 + g, st[g], lane);
    }
}

fn write_row(row: u32, st: Softmax, lane: u32) {
    let inv_l = 1.0 / st.l;
    for (var i = 0u; i < LANE_QUADS; i++) {
        var o = st.acc[i] * inv_l;
        let quad = lane + i * SG;
        if params.gated != 0u {
            let gb = row * params.gate_stride + params.gate_offset + 4u * quad;
            o /= 1.0 + exp(-vec4<f32>(gate[gb], gate[gb + 1u], gate[gb + 2u], gate[gb + 3u]));
        }
        out[row * QUADS + quad] = o;
    }
}

// Workgroups: x over rows, y over KV heads. A group of rows takes one workgroup per query
// head, not one per KV head taking its GQ heads in turn: the workgroups of the group's
// rows share its query heads out (row r of n takes heads r, r + n, ...), so the adapter's
// threads get the same work in more, evener pieces (a CPU adapter has few threads, and a
// verifying step few groups). A row alone takes its KV head's query heads together.
@compute @workgroup_size(SG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    let t = wid.x;
    let kvh = wid.y;
    if t >= step.n_tokens {
        return;
    }
    let info = rows[t];
    // Rows go ROWS at a time from the start of their sequence's run.
    let r = (t - info.first) % ROWS;
    let t0 = t - r;
    var n = 1u;
    for (; n < ROWS; n++) {
        if t0 + n >= step.n_tokens || rows[t0 + n].first != info.first {
            break;
        }
    }
    // A row alone in its group (decode rows, the last of a run) takes the plain path.
    if n == 1u {
        one_row(t, kvh, lane);
        return;
    }
    for (var g = r; g < GQ; g += n) {
        rows_of_head(t0, n, kvh * GQ + g, lane);
    }
}

// The `n` rows of the group starting at `t0` for query head `h`, each key and value
// loaded once for all of them.
fn rows_of_head(t0: u32, n: u32, h: u32, lane: u32) {
    let info = rows[t0];
    let kvh = h / GQ;
    // Keys each row of the group sees: 0 for slots past its last row.
    var n_keys: array<u32, ROWS>;
    var qs: array<array<vec4<f32>, LANE_QUADS>, ROWS>;
    var st: array<Softmax, ROWS>;
    var most = 0u;
    for (var r = 0u; r < ROWS; r++) {
        let t = t0 + min(r, n - 1u);
        n_keys[r] = select(0u, keys_seen(rows[t].pos), r < n);
        most = max(most, n_keys[r]);
        qs[r] = query(t * params.n_heads + h, lane);
        st[r] = softmax_start();
    }
    let size = 1u << params.block_shift;
    for (var j0 = 0u; j0 < most; j0 += size) {
        let block = block_of(info.slot, j0);
        for (var j = j0; j < min(j0 + size, most); j++) {
            let kv = load_kv(block, j - j0, kvh, lane);
            for (var r = 0u; r < ROWS; r++) {
                // Whether row r sees key j (rows past the group's last see none): the same
                // on every lane, so a branch the lanes take together skips the work outright.
                if j < n_keys[r] {
                    st[r] = softmax_add(st[r], qs[r], kv);
                }
            }
        }
    }
    for (var r = 0u; r < ROWS; r++) {
        if n_keys[r] == 0u {
            break;
        }
        write_row((t0 + r) * params.n_heads + h, st[r], lane);
    }
}
