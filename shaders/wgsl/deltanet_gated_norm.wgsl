// Gated DeltaNet, part 3: the gated RMSNorm of each value head's output,
// o = o / sqrt(mean(o^2) + eps) * w * silu(z), in place. One workgroup per (head, token).

const WG: u32 = 64u;

//#include "common/step.wgsl"
//#include "common/workgroup_sum.wgsl"

struct Params {
    head_dim: u32,
    n_heads: u32,
    eps: f32,
    pad0: u32,
}

@group(0) @binding(1) var<uniform> params: Params;
// [n_tokens, n_heads, head_dim] each.
@group(0) @binding(2) var<storage, read_write> o: array<f32>;
@group(0) @binding(3) var<storage, read> z: array<f32>;
// [head_dim].
@group(0) @binding(4) var<storage, read> w: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = wid.y;
    if t >= step.n_tokens {
        return;
    }
    let n = params.head_dim;
    let base = (t * params.n_heads + wid.x) * n;
    var ss = 0.0;
    for (var i = lid; i < n; i += WG) {
        let v = o[base + i];
        ss += v * v;
    }
    let sum = workgroup_sum(lid, ss);
    let scale = 1.0 / sqrt(sum / f32(n) + params.eps);
    for (var i = lid; i < n; i += WG) {
        let g = z[base + i];
        o[base + i] = o[base + i] * scale * w[i] * (g / (1.0 + exp(-g)));
    }
}
