// The end of a mixture-of-experts layer, per token t and value c:
//   x[t, c] += sum_j weights[t, j] * experts[t * n_used + j, c] + sigmoid(gate[t]) * shared[t, c]
// the chosen experts' outputs weighted in the order they were chosen, then the shared
// expert behind its scalar sigmoid gate.

//#include "common/step.wgsl"

const WG: u32 = 256u;

struct CombineParams {
    // Values per token (the embedding).
    n: u32,
    n_used: u32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(1) var<uniform> params: CombineParams;
@group(0) @binding(2) var<storage, read_write> x: array<f32>;
@group(0) @binding(3) var<storage, read> experts: array<f32>;
@group(0) @binding(4) var<storage, read> weights: array<f32>;
@group(0) @binding(5) var<storage, read> shared_out: array<f32>;
@group(0) @binding(6) var<storage, read> shared_gate: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = wid.y;
    let c = wid.x * WG + lid;
    if t >= step.n_tokens || c >= params.n {
        return;
    }
    var moe = 0.0;
    for (var j = 0u; j < params.n_used; j++) {
        let v = t * params.n_used + j;
        moe += weights[v] * experts[v * params.n + c];
    }
    let g = 1.0 / (1.0 + exp(-shared_gate[t]));
    let i = t * params.n + c;
    x[i] = x[i] + (moe + g * shared_out[i]);
}
