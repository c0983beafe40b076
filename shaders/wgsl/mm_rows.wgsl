// Matrix product for a step of a few rows: out[t, row0 + r] (+)= sum_p piece_dot(W[r, p],
// x[t, p]), for the rows r of one part of a weight matrix and the step's tokens t. Needs
// a weight-format prelude (`q_*.wgsl`) that binds the weights at 4.. and defines `load8`.
//
// Lanes come in groups of S; a group owns R consecutive rows and lane s of it sums the
// pieces s, s + S, ... (common/matmul.wgsl), for TB tokens at once, so each weight piece
// is read once for TB tokens. Workgroups: x, y over blocks of WG / S * R rows, z over
// blocks of TB tokens (`Dim::Tokens`). With S > 1 the partials meet in workgroup memory.
//
// XB = 1 (S = 1, a subgroup of SG lanes per workgroup): the lanes share every piece of x
// through subgroup broadcasts instead of each loading all of it. CPU adapters (lavapipe)
// load memory lane by lane, so this divides x's loads by the subgroup size.

const WG: u32 = 8u;
const R: u32 = 8u;
const S: u32 = 1u;
const TB: u32 = 1u;
const XB: u32 = 0u;
const SG: u32 = 8u;

//#include "common/matmul.wgsl"

const PARTIALS: u32 = select(1u, WG * R * TB, S > 1u);
var<workgroup> partial: array<f32, PARTIALS>;

// Piece p of token row `tok` of x: loaded, or put together from the subgroup's lanes.
fn x_piece(tok: u32, p: u32, lane: u32) -> mat2x4<f32> {
    let i = tok * 2u * params.k8 + 2u * p;
    if XB == 0u {
        return mat2x4<f32>(x[i], x[i + 1u]);
    }
    var e: array<f32, 8>;
    if SG == 8u {
        let v = x[i + (lane >> 2u)][lane & 3u];
        e[0] = subgroupBroadcast(v, 0u);
        e[1] = subgroupBroadcast(v, 1u);
        e[2] = subgroupBroadcast(v, 2u);
        e[3] = subgroupBroadcast(v, 3u);
        e[4] = subgroupBroadcast(v, 4u);
        e[5] = subgroupBroadcast(v, 5u);
        e[6] = subgroupBroadcast(v, 6u);
        e[7] = subgroupBroadcast(v, 7u);
    } else {
        let a = x[i][lane & 3u];
        let b = x[i + 1u][lane & 3u];
        e[0] = subgroupBroadcast(a, 0u);
        e[1] = subgroupBroadcast(a, 1u);
        e[2] = subgroupBroadcast(a, 2u);
        e[3] = subgroupBroadcast(a, 3u);
        e[4] = subgroupBroadcast(b, 0u);
        e[5] = subgroupBroadcast(b, 1u);
        e[6] = subgroupBroadcast(b, 2u);
        e[7] = subgroupBroadcast(b, 3u);
    }
    return mat2x4<f32>(vec4<f32>(e[0], e[1], e[2], e[3]), vec4<f32>(e[4], e[5], e[6], e[7]));
}

// Adds the dots of weight piece `w` with the TB tokens' pieces of x to `acc`.
fn row_dots(acc: array<f32, TB>, w: mat2x4<f32>, xs: array<mat2x4<f32>, TB>) -> array<f32, TB> {
    var a = acc;
    for (var t = 0u; t < TB; t++) {
        a[t] += piece_dot(w, xs[t][0], xs[t][1]);
    }
    return a;
}

// The first weight piece of the lane's row r: rows past the matrix read its last row
// (their sums are computed and never stored).
fn row_base(r0: u32, r: u32) -> u32 {
    return min(r0 + r, params.rows - 1u) * params.k8;
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    // No early return: every lane meets the broadcasts and the barrier.
    let s = lid % S;
    let g = lid / S;
    let r0 = ((wid.y * params.groups_x + wid.x) * (WG / S) + g) * R;
    let t0 = wid.z * TB;
    let n_tokens = max(step.n_tokens, 1u);
    // The lane's rows are written out one by one (R is at most 8), each with its own sums,
    // rather than as a loop over arrays: a compiler that does not unroll such a loop (Mesa
    // 22.3's lavapipe does not, once TB > 1) keeps arrays indexed by its counter in scratch
    // memory and reaches them lane by lane, which cost more than the arithmetic. Rows past
    // R are constant-false branches.
    let b0 = row_base(r0, 0u);
    let b1 = row_base(r0, min(1u, R - 1u));
    let b2 = row_base(r0, min(2u, R - 1u));
    let b3 = row_base(r0, min(3u, R - 1u));
    let b4 = row_base(r0, min(4u, R - 1u));
    let b5 = row_base(r0, min(5u, R - 1u));
    let b6 = row_base(r0, min(6u, R - 1u));
    let b7 = row_base(r0, min(7u, R - 1u));
    var a0: array<f32, TB>;
    var a1: array<f32, TB>;
    var a2: array<f32, TB>;
    var a3: array<f32, TB>;
    var a4: array<f32, TB>;
    var a5: array<f32, TB>;
    var a6: array<f32, TB>;
    var a7: array<f32, TB>;
    for (var p = s; p < params.k8; p += S) {
        var xs: array<mat2x4<f32>, TB>;
        for (var t = 0u; t < TB; t++) {
            xs[t] = x_piece(min(t0 + t, n_tokens - 1u), p, lane);
        }
        a0 = row_dots(a0, load8(b0 + p), xs);
        if R > 1u {
            a1 = row_dots(a1, load8(b1 + p), xs);
        }
        if R > 2u {
            a2 = row_dots(a2, load8(b2 + p), xs);
            a3 = row_dots(a3, load8(b3 + p), xs);
        }
        if R > 4u {
            a4 = row_dots(a4, load8(b4 + p), xs);
            a5 = row_dots(a5, load8(b5 + p), xs);
            a6 = row_dots(a6, load8(b6 + p), xs);
            a7 = row_dots(a7, load8(b7 + p), xs);
        }
    }
    // Out of the hot loop, the sums go to one array, row-major.
    var acc: array<f32, R * TB>;
    for (var t = 0u; t < TB; t++) {
        acc[t] = a0[t];
        if R > 1u {
            acc[TB + t] = a1[t];
        }
        if R > 2u {
            acc[2u * TB + t] = a2[t];
            acc[3u * TB + t] = a3[t];
        }
        if R > 4u {
            acc[4u * TB + t] = a4[t];
            acc[5u * TB + t] = a5[t];
            acc[6u * TB + t] = a6[t];
            acc[7u * TB + t] = a7[t];
        }
    }
    if S > 1u {
        for (var i = 0u; i < R * TB; i++) {
            partial[lid * R * TB + i] = acc[i];
        }
        workgroupBarrier();
        if s != 0u {
            return;
        }
        for (var i = 0u; i < R * TB; i++) {
            var v: array<f32, S>;
            for (var j = 0u; j < S; j++) {
                v[j] = partial[(lid + j) * R * TB + i];
            }
            acc[i] = tree(v);
        }
    }
    for (var t = 0u; t < TB; t++) {
        if t0 + t >= step.n_tokens {
            break;
        }
        for (var r = 0u; r < R; r++) {
            if r0 + r < params.rows {
                store_out(t0 + t, params.row0 + r0 + r, acc[r * TB + t]);
            }
        }
    }
}
