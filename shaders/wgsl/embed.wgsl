// Embedding gather: out[t, :] = row ids[t] of a weight table, dequantised to f32. Needs a
// weight-format prelude (`q_*.wgsl`) that binds the table at 4.. and defines `load8`.
// A table split into parts runs once per part; each run writes the tokens whose id falls
// in its rows, and the first also zeroes the tokens whose id is past the table.
// Workgroups: x over pieces of 8 values of a row, y over tokens (`Dim::Tokens`).

const WG: u32 = 64u;

//#include "common/step.wgsl"

struct Params {
    // Pieces of 8 values per row (k / 8).
    k8: u32,
    // Rows in this part.
    rows: u32,
    // First row of this part.
    row0: u32,
    // Rows in the whole table.
    n: u32,
    // 1: zero the tokens whose id is not a row of the table.
    zero_missing: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(1) var<uniform> params: Params;
@group(0) @binding(2) var<storage, read> ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let p = gid.x;
    let t = gid.y;
    if t >= step.n_tokens || p >= params.k8 {
        return;
    }
    let id = ids[t];
    let o = 2u * (t * params.k8 + p);
    if id >= params.row0 && id - params.row0 < params.rows {
        let w = load8((id - params.row0) * params.k8 + p);
        out[o] = w[0];
        out[o + 1u] = w[1];
    } else if params.zero_missing != 0u && id >= params.n {
        out[o] = vec4<f32>();
        out[o + 1u] = vec4<f32>();
    }
}
