// Copies one row of src [T, n] to dst[0..n]: a fixed row, or the step's last token (row
// 0xffffffff), e.g. so that only the last token goes through the output head.

const WG: u32 = 256u;

//#include "common/elementwise.wgsl"

@group(0) @binding(2) var<storage, read> src: array<f32>;
@group(0) @binding(3) var<storage, read_write> dst: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if step.n_tokens == 0u || i >= params.n {
        return;
    }
    var row = params.row;
    if row == 0xffffffffu {
        row = step.n_tokens - 1u;
    }
    dst[i] = src[row * params.n + i];
}
