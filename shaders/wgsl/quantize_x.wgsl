// x for the integer-dot matrix kernel (`mm_dot`): each block of 32 values of a row as two
// signed bytes per value and one f32 scale d, value ~ d * (254 q1 + q2), where
// q1 = round(x * 127 / max|x|) is llama.cpp's Q8_0 of the activations and q2 the rounding
// left over, in 254ths of a step. One byte alone moved SmolLM2-135M's logits by up to 0.16
// from the float64 reference (the bar is 0.05); with the second, x keeps about 15 bits.
//
// Per block: the 32 q1 bytes (four per u32, lowest first), then the 32 q2 bytes, as four
// vec4<u32>. Workgroups: x (and y past 65535) over the blocks of a row, z over the rows.

//#include "common/step.wgsl"

const WG: u32 = 64u;

struct Params {
    // Blocks of 32 values per row (k / 32).
    blocks: u32,
    // Workgroups along x; the group's index is y * groups_x + x.
    groups_x: u32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(1) var<uniform> params: Params;
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> xq: array<vec4<u32>>;
@group(0) @binding(4) var<storage, read_write> xd: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let b = (wid.y * params.groups_x + wid.x) * WG + lid;
    let t = wid.z;
    if b >= params.blocks || t >= step.n_tokens {
        return;
    }
    let i = t * params.blocks + b;
    var v: array<vec4<f32>, 8>;
    var m = vec4<f32>(0.0);
    for (var j = 0u; j < 8u; j++) {
        v[j] = x[i * 8u + j];
        m = max(m, abs(v[j]));
    }
    let amax = max(max(m.x, m.y), max(m.z, m.w));
    // One division per block; the values are multiplied.
    let inv = select(0.0, 127.0 / amax, amax > 0.0);
    var hi: array<u32, 8>;
    var lo: array<u32, 8>;
    for (var j = 0u; j < 8u; j++) {
        let u = v[j] * inv;
        let q1 = round(u);
        hi[j] = pack4xI8(vec4<i32>(q1));
        lo[j] = pack4xI8(vec4<i32>(round((u - q1) * 254.0)));
    }
    xq[i * 4u] = vec4<u32>(hi[0], hi[1], hi[2], hi[3]);
    xq[i * 4u + 1u] = vec4<u32>(hi[4], hi[5], hi[6], hi[7]);
    xq[i * 4u + 2u] = vec4<u32>(lo[0], lo[1], lo[2], lo[3]);
    xq[i * 4u + 3u] = vec4<u32>(lo[4], lo[5], lo[6], lo[7]);
    xd[i] = amax / (127.0 * 254.0);
}
