// Expert matrix products of a mixture-of-experts layer (llama.cpp's MUL_MAT_ID): for each
// slot v = t * n_used + j (token t's j-th chosen expert e = ids[v]),
//   out[v, r] = sum_p piece_dot(W_e[r, p], x[xrow(v), p])   for the rows r of one expert,
// where xrow(v) = t (gate and up read the token's input) or v (down reads the slot's own).
// W holds the part's experts end to end, each `rows` rows; needs a weight-format prelude
// (`q_*.wgsl`) binding them at 4.. and defining `load8`.
//
// Every output sums its pieces in increasing order in one lane, whichever mode runs it, so
// a slot's result does not depend on what else shares the step.
//
// GROUPED = 0 (indexed): workgroup (x, y = j, z = t) takes slot v = t * n_used + j alone.
// GROUPED = 1 (grouped by expert): workgroup (x, y = e - expert0) gathers every slot of the
// step that chose expert e and runs them TB at a time, so each chosen expert's weights are
// read once per step however many tokens chose it.
// Either way a lane owns R consecutive rows of the expert, WG lanes per workgroup.

//#include "common/step.wgsl"

const WG: u32 = 32u;
const R: u32 = 2u;
const TB: u32 = 8u;
const GROUPED: u32 = 0u;

struct IdParams {
    // Pieces of 8 values per weight row (k / 8).
    k8: u32,
    // Rows of one expert, the width of an output slot.
    rows: u32,
    // Experts chosen per token.
    n_used: u32,
    // The first expert of this part of the weights, and how many it holds.
    expert0: u32,
    experts: u32,
    // 1: x has one row per slot (down), 0: one per token (gate, up).
    x_per_slot: u32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(1) var<uniform> params: IdParams;
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(8) var<storage, read> ids: array<u32>;

// Adds the dots of weight piece `w` with the first `count` slots' pieces of x to `acc`.
fn slot_dots(acc: array<f32, TB>, w: mat2x4<f32>, xs: array<mat2x4<f32>, TB>, count: u32) -> array<f32, TB> {
    var a = acc;
    for (var i = 0u; i < TB; i++) {
        if i < count {
            a[i] += dot(w[0], xs[i][0]) + dot(w[1], xs[i][1]);
        }
    }
    return a;
}

// The first weight piece of the lane's row r of expert e (rows past the expert read its
// last row; their sums are never stored).
fn expert_base(e: u32, r0: u32, r: u32) -> u32 {
    return ((e - params.expert0) * params.rows + min(r0 + r, params.rows - 1u)) * params.k8;
}

// Runs slots `list[0..count]`, all routed to expert `e` (of this part), for rows r0.. .
//
// The lane's rows (R is at most 4) are written out one by one and the slots' loops run
// to the constant TB with a branch, rather than looping over arrays by a counter the
// compiler may not unroll: Mesa 22.3's lavapipe keeps such arrays in scratch memory and
// reaches them lane by lane, which cost more than the arithmetic.
fn run_slots(e: u32, list: array<u32, TB>, count: u32, r0: u32) {
    var xrow: array<u32, TB>;
    for (var i = 0u; i < TB; i++) {
        let v = list[min(i, count - 1u)];
        xrow[i] = select(v / params.n_used, v, params.x_per_slot != 0u) * 2u * params.k8;
    }
    let b0 = expert_base(e, r0, 0u);
    let b1 = expert_base(e, r0, min(1u, R - 1u));
    let b2 = expert_base(e, r0, min(2u, R - 1u));
    let b3 = expert_base(e, r0, min(3u, R - 1u));
    var a0: array<f32, TB>;
    var a1: array<f32, TB>;
    var a2: array<f32, TB>;
    var a3: array<f32, TB>;
    for (var p = 0u; p < params.k8; p++) {
        var xs: array<mat2x4<f32>, TB>;
        for (var i = 0u; i < TB; i++) {
            if i < count {
                let xi = xrow[i] + 2u * p;
                xs[i] = mat2x4<f32>(x[xi], x[xi + 1u]);
            }
        }
        a0 = slot_dots(a0, load8(b0 + p), xs, count);
        if R > 1u {
            a1 = slot_dots(a1, load8(b1 + p), xs, count);
        }
        if R > 2u {
            a2 = slot_dots(a2, load8(b2 + p), xs, count);
            a3 = slot_dots(a3, load8(b3 + p), xs, count);
        }
    }
    for (var i = 0u; i < TB; i++) {
        if i < count {
            let o = list[i] * params.rows + r0;
            out[o] = a0[i];
            if R > 1u && r0 + 1u < params.rows {
                out[o + 1u] = a1[i];
            }
            if R > 2u && r0 + 2u < params.rows {
                out[o + 2u] = a2[i];
            }
            if R > 3u && r0 + 3u < params.rows {
                out[o + 3u] = a3[i];
            }
        }
    }
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r0 = (wid.x * WG + lid) * R;
    if r0 >= params.rows {
        return;
    }
    var list: array<u32, TB>;
    if GROUPED == 0u {
        let v = wid.z * params.n_used + wid.y;
        let e = ids[v];
        if wid.z >= step.n_tokens || e < params.expert0 || e >= params.expert0 + params.experts {
            return;
        }
        list[0] = v;
        run_slots(e, list, 1u, r0);
        return;
    }
    let e = params.expert0 + wid.y;
    var count = 0u;
    for (var v = 0u; v < step.n_tokens * params.n_used; v++) {
        if ids[v] == e {
            list[count] = v;
            count++;
            if count == TB {
                run_slots(e, list, count, r0);
                count = 0u;
            }
        }
    }
    if count > 0u {
        run_slots(e, list, count, r0);
    }
}
