// dst[i, :] = src[rows[i], :] for the step's rows i (the step uniform here is the output
// head's: its rows are the rows to sample), e.g. each sequence's last row of a step,
// so that the output head runs on those rows only.

const WG: u32 = 256u;

//#include "common/elementwise.wgsl"

@group(0) @binding(2) var<storage, read> rows: array<u32>;
@group(0) @binding(3) var<storage, read> src: array<f32>;
@group(0) @binding(4) var<storage, read_write> dst: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = wid.y;
    let i = wid.x * WG + lid;
    if r >= step.n_tokens || i >= params.n {
        return;
    }
    dst[r * params.n + i] = src[rows[r] * params.n + i];
}
