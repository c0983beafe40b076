// Matrix-vector product for one token (decode): out[row0 + r] (+)= sum_k W[r, k] x[k], for
// the rows r of one part of a weight matrix. Needs a weight-format prelude (`q_*.wgsl`)
// that binds the weights at 4.. and defines `load8`.
//
// Each workgroup computes ROWS consecutive rows; its threads stride over k in pieces of 8
// values, reading x once per piece for all ROWS rows, then reduce in shared memory.

const WG: u32 = 64u;
const ROWS: u32 = 4u;

struct Step {
    n_tokens: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

struct Params {
    // Pieces of 8 values per row (k / 8).
    k8: u32,
    // Rows in this part.
    rows: u32,
    // Row stride of `out`: all rows of the matrix.
    n: u32,
    // First row of this part.
    row0: u32,
    // 1: add to `out` instead of overwriting it.
    accumulate: u32,
    // Workgroups along x; the group index is y * groups_x + x (past 65535 groups).
    groups_x: u32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<uniform> step: Step;
@group(0) @binding(1) var<uniform> params: Params;
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

var<workgroup> partial: array<f32, WG * ROWS>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r0 = (wid.y * params.groups_x + wid.x) * ROWS;
    if step.n_tokens == 0u || r0 >= params.rows {
        return;
    }
    // The last group may have fewer than ROWS rows: it recomputes the last one.
    var base: array<u32, ROWS>;
    for (var r = 0u; r < ROWS; r++) {
        base[r] = min(r0 + r, params.rows - 1u) * params.k8;
    }
    var acc: array<f32, ROWS>;
    for (var p = lid; p < params.k8; p += WG) {
        let xa = x[2u * p];
        let xb = x[2u * p + 1u];
        for (var r = 0u; r < ROWS; r++) {
            let w = load8(base[r] + p);
            acc[r] += dot(w[0], xa) + dot(w[1], xb);
        }
    }
    for (var r = 0u; r < ROWS; r++) {
        partial[r * WG + lid] = acc[r];
    }
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if lid < s {
            for (var r = 0u; r < ROWS; r++) {
                partial[r * WG + lid] += partial[r * WG + lid + s];
            }
        }
        workgroupBarrier();
    }
    if lid < ROWS && r0 + lid < params.rows {
        let i = params.row0 + r0 + lid;
        var v = partial[lid * WG];
        if params.accumulate != 0u {
            v += out[i];
        }
        out[i] = v;
    }
}
