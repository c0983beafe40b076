// The k largest logits of each sampled row, sorted (ties: lower id first), with the row's
// max and log-sum-exp; k = 1 is the argmax. Each row has its own k (at most K) in
// `sampling`. Two dispatches of this kernel, workgroups along y over rows:
//   merge = 0: workgroup (c, r) takes chunk c (WG * PER logits) of row r and writes to
//              `partial` its (max, sum exp(x - max)) and its own top k as (logit bits, id);
//   merge = 1: one workgroup per row merges the chunks' candidates and sums, and writes
//              the row's out = [ids[K], logit bits[K], max bits, log-sum-exp bits].
// Each of k rounds takes every thread's best untaken value and reduces them in workgroup
// memory; no subgroup operations, so any subgroup size works.
// A row whose `masked` is set (a grammar constrains it) reads its logits through its row of
// `mask` (bit v % 32 of word v / 32 set: token v allowed); a token not allowed counts as
// -inf, so its max, log-sum-exp and candidates are those of the allowed tokens alone.

const WG: u32 = 256u;
// Values per thread (at most 32: one bit each in `taken`).
const PER: u32 = 32u;
const NONE: u32 = 0xffffffffu;

//#include "common/step.wgsl"
//#include "common/sample.wgsl"

struct Params {
    n_vocab: u32,
    // The largest k of any row: the stride of `partial` and `out`.
    k_max: u32,
    n_chunks: u32,
    merge: u32,
}

@group(0) @binding(1) var<uniform> params: Params;
@group(0) @binding(2) var<storage, read> sampling: array<RowSampling>;
@group(0) @binding(3) var<storage, read> logits: array<f32>;
// Per row and chunk k_max + 1 entries: (max bits, sum bits), then (logit bits, id) k times.
@group(0) @binding(4) var<storage, read_write> partial: array<vec2<u32>>;
// Per row 2 k_max + 2 words.
@group(0) @binding(5) var<storage, read_write> out: array<u32>;
// Per row ceil(n_vocab / 32) words; read only for masked rows.
@group(0) @binding(6) var<storage, read> mask: array<u32>;

var<workgroup> red_v: array<f32, WG>;
var<workgroup> red_i: array<u32, WG>;
var<workgroup> red_s: array<f32, WG>;

fn neg_inf() -> f32 {
    return bitcast<f32>(0xff800000u);
}

// Whether (v, i) sorts before (bv, bi): larger value, then lower id.
fn before(v: f32, i: u32, bv: f32, bi: u32) -> bool {
    return v > bv || (v == bv && i < bi);
}

// s * exp(m - to), where a sum over nothing (m = -inf) stays 0.
fn rescale(m: f32, s: f32, to: f32) -> f32 {
    if m == neg_inf() {
        return 0.0;
    }
    return s * exp(m - to);
}

// Logit i of `row`, or -inf where the row is masked and its mask does not allow i.
fn row_logit(row: u32, i: u32, masked: bool) -> f32 {
    let words = (params.n_vocab + 31u) / 32u;
    if masked && ((mask[row * words + i / 32u] >> (i % 32u)) & 1u) == 0u {
        return neg_inf();
    }
    return logits[row * params.n_vocab + i];
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wid.y;
    if row >= step.n_tokens {
        return;
    }
    let k = min(sampling[row].k, params.k_max);
    let stride = params.k_max + 1u;
    let part = row * params.n_chunks * stride;
    let o = row * (2u * params.k_max + 2u);
    var vals: array<f32, PER>;
    var ids: array<u32, PER>;
    var m = neg_inf();
    var s = 0.0;
    // A row asking for at most one candidate (greedy, or log-sum-exp only) streams its
    // values through a running best and a running sum instead of holding them in arrays:
    // CPU adapters keep such arrays in memory and reach them lane by lane.
    let one = k <= 1u;
    var one_v = neg_inf();
    var one_i = NONE;
    if params.merge == 0u {
        let base = wid.x * WG * PER;
        let masked = sampling[row].masked != 0u;
        if one {
            for (var j = 0u; j < PER; j++) {
                let i = base + j * WG + lid;
                if i >= params.n_vocab {
                    break;
                }
                let v = row_logit(row, i, masked);
                if before(v, i, one_v, one_i) {
                    one_v = v;
                    one_i = i;
                }
                let mm = max(m, v);
                s = rescale(m, s, mm) + rescale(v, 1.0, mm);
                m = mm;
            }
        } else {
            for (var j = 0u; j < PER; j++) {
                let i = base + j * WG + lid;
                vals[j] = neg_inf();
                ids[j] = NONE;
                if i < params.n_vocab {
                    ids[j] = i;
                    vals[j] = row_logit(row, i, masked);
                    m = max(m, vals[j]);
                }
            }
            for (var j = 0u; j < PER; j++) {
                if ids[j] != NONE {
                    s += rescale(vals[j], 1.0, m);
                }
            }
        }
    } else {
        if one {
            // k is 1 (or 0: no candidates): each chunk's one candidate.
            for (var c = lid; c < params.n_chunks * k; c += WG) {
                let b = partial[part + c * stride + 1u];
                if before(bitcast<f32>(b.x), b.y, one_v, one_i) {
                    one_v = bitcast<f32>(b.x);
                    one_i = b.y;
                }
            }
        } else {
            for (var j = 0u; j < PER; j++) {
                let c = j * WG + lid;
                vals[j] = neg_inf();
                ids[j] = NONE;
                if c < params.n_chunks * k {
                    let e = partial[part + (c / k) * stride + 1u + c % k];
                    vals[j] = bitcast<f32>(e.x);
                    ids[j] = e.y;
                }
            }
        }
        for (var c = lid; c < params.n_chunks; c += WG) {
            let e = partial[part + c * stride];
            let cm = bitcast<f32>(e.x);
            let mm = max(m, cm);
            s = rescale(m, s, mm) + rescale(cm, bitcast<f32>(e.y), mm);
            m = mm;
        }
    }

    // The (max, sum) of the workgroup.
    red_v[lid] = m;
    red_s[lid] = s;
    for (var w = WG / 2u; w > 0u; w >>= 1u) {
        workgroupBarrier();
        if lid < w {
            let m1 = red_v[lid];
            let m2 = red_v[lid + w];
            let mm = max(m1, m2);
            red_s[lid] = rescale(m1, red_s[lid], mm) + rescale(m2, red_s[lid + w], mm);
            red_v[lid] = mm;
        }
    }
    workgroupBarrier();
    let row_max = red_v[0];
    let row_sum = red_s[0];
    workgroupBarrier();

    var taken = 0u;
    for (var r = 0u; r < k; r++) {
        var bv = one_v;
        var bi = one_i;
        var bj = PER;
        if !one {
            for (var j = 0u; j < PER; j++) {
                if (taken & (1u << j)) == 0u && ids[j] != NONE && before(vals[j], ids[j], bv, bi) {
                    bv = vals[j];
                    bi = ids[j];
                    bj = j;
                }
            }
        }
        red_v[lid] = bv;
        red_i[lid] = bi;
        for (var w = WG / 2u; w > 0u; w >>= 1u) {
            workgroupBarrier();
            if lid < w && before(red_v[lid + w], red_i[lid + w], red_v[lid], red_i[lid]) {
                red_v[lid] = red_v[lid + w];
                red_i[lid] = red_i[lid + w];
            }
        }
        workgroupBarrier();
        let win_v = red_v[0];
        let win_i = red_i[0];
        // Ids are unique, so only the owner of the winner marks it.
        if bj < PER && bi == win_i {
            taken |= 1u << bj;
        }
        if lid == 0u {
            if params.merge == 0u {
                partial[part + wid.x * stride + 1u + r] = vec2<u32>(bitcast<u32>(win_v), win_i);
            } else {
                out[o + r] = win_i;
                out[o + params.k_max + r] = bitcast<u32>(win_v);
            }
        }
        // Before the next round overwrites red_v and red_i.
        workgroupBarrier();
    }
    if lid == 0u {
        if params.merge == 0u {
            partial[part + wid.x * stride] = vec2<u32>(bitcast<u32>(row_max), bitcast<u32>(row_sum));
        } else {
            out[o + 2u * params.k_max] = bitcast<u32>(row_max);
            out[o + 2u * params.k_max + 1u] = bitcast<u32>(row_max + log(row_sum));
        }
    }
}
