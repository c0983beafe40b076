// The SwiGLU activation of a feed-forward layer: out = silu(gate) * up, per token of width n.

const WG: u32 = 256u;

//#include "common/elementwise.wgsl"

// read_write although only read: `out` may be `gate`.
@group(0) @binding(2) var<storage, read_write> gate: array<f32>;
@group(0) @binding(3) var<storage, read> up: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = wid.y;
    let i = wid.x * WG + lid;
    if t >= step.n_tokens || i >= params.n {
        return;
    }
    let j = t * params.n + i;
    let g = gate[j];
    out[j] = g / (1.0 + exp(-g)) * up[j];
}
