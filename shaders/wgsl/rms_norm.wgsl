// RMSNorm of rows: out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w. One workgroup per row,
// row r = t * rows_per_token + i, so per-head Q/K norms use it too (row_len = head dim).
// Rows may be strided (x_stride, out_stride), e.g. to read the query half of each head of
// a fused [query | gate] projection and write the queries contiguously.

const WG: u32 = 256u;

//#include "common/step.wgsl"
//#include "common/workgroup_sum.wgsl"

struct Params {
    row_len: u32,
    rows_per_token: u32,
    x_stride: u32,
    out_stride: u32,
    eps: f32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(1) var<uniform> params: Params;
// read_write although only read: `out` may be `x` (in place), and one buffer cannot be
// bound read-only and writable in the same dispatch.
@group(0) @binding(2) var<storage, read_write> x: array<f32>;
@group(0) @binding(3) var<storage, read> w: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = wid.y;
    if t >= step.n_tokens {
        return;
    }
    let row = t * params.rows_per_token + wid.x;
    let xb = row * params.x_stride;
    let ob = row * params.out_stride;
    var ss = 0.0;
    for (var i = lid; i < params.row_len; i += WG) {
        let v = x[xb + i];
        ss += v * v;
    }
    let sum = workgroup_sum(lid, ss);
    let scale = 1.0 / sqrt(sum / f32(params.row_len) + params.eps);
    for (var i = lid; i < params.row_len; i += WG) {
        out[ob + i] = x[xb + i] * scale * w[i];
    }
}
