// Rotary position embedding of each head of x [T, n_heads, head_dim]: the first n_rot dims
// are rotated in pairs, the rest pass. NeoX style pairs (j, j + n_rot/2), the adjacent
// style (2j, 2j + 1); pair j turns by angle pos * inv_freq[j]. Optionally each head row is
// RMS-normed first (the Q/K norm of qwen3 and qwen35), so that it is read and written once;
// rows may then be strided (x_stride, out_stride), e.g. to take the query halves of a
// fused [query | gate] projection. Without the norm, the rotation is in place (out = x).
// One workgroup per (head, token).
//
// Angles reach 10^5 radians, where f32 keeps only a few bits of the fraction of a turn and
// GPU sin/cos are specified only on [-pi, pi]. So the angle is kept in turns as a 0.32
// fixed-point fraction: freq[j] holds inv_freq[j] / (2 pi) as a 0.64 fixed-point number
// (lo, hi), and pos * freq[j] mod 1 is exact integer arithmetic. The quadrant comes from
// its top bits and sin/cos of the rest (within pi/4) from minimax polynomials.

const WG: u32 = 64u;

//#include "common/step.wgsl"
//#include "common/workgroup_sum.wgsl"

struct Params {
    n_heads: u32,
    head_dim: u32,
    // n_rot / 2: pairs rotated per head.
    half: u32,
    // 1: NeoX pairs (j, j + half); 0: adjacent pairs (2j, 2j + 1).
    neox: u32,
    // 1: RMSNorm each head row with weight w first.
    norm: u32,
    eps: f32,
    // Values from one head row of x (out) to the next.
    x_stride: u32,
    out_stride: u32,
}

@group(0) @binding(1) var<uniform> params: Params;
@group(0) @binding(2) var<storage, read> positions: array<u32>;
@group(0) @binding(3) var<storage, read> freq: array<vec2<u32>>;
// read_write although only read: `out` may be `x`.
@group(0) @binding(4) var<storage, read_write> x: array<f32>;
@group(0) @binding(5) var<storage, read> w: array<f32>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;

// The high 32 bits of the 64-bit product a * b.
fn mul_hi(a: u32, b: u32) -> u32 {
    let a0 = a & 0xffffu;
    let a1 = a >> 16u;
    let b0 = b & 0xffffu;
    let b1 = b >> 16u;
    let p00 = a0 * b0;
    let p01 = a0 * b1;
    let p10 = a1 * b0;
    let carry = ((p00 >> 16u) + (p01 & 0xffffu) + (p10 & 0xffffu)) >> 16u;
    return a1 * b1 + (p01 >> 16u) + (p10 >> 16u) + carry;
}

// (sin, cos) of 2 pi * turns / 2^32.
fn sincos_turns(turns: u32) -> vec2<f32> {
    // Round to the nearest quarter turn q; r is what is left, within +-1/8 turn.
    let u = turns + 0x20000000u;
    let q = u >> 30u;
    let r = f32(i32(u & 0x3fffffffu) - 0x20000000) * 1.4629180792671596e-9; // (pi / 2) / 2^30
    let z = r * r;
    // Cephes sinf / cosf polynomials, accurate to about 1 ulp on [-pi/4, pi/4].
    let s = r + r * z * ((-1.9515295891e-4 * z + 8.3321608736e-3) * z - 1.6666654611e-1);
    let c = 1.0 - 0.5 * z + z * z * ((2.443315711809948e-5 * z - 1.388731625493765e-3) * z + 4.166664568298827e-2);
    switch q {
        case 0u: { return vec2<f32>(s, c); }
        case 1u: { return vec2<f32>(c, -s); }
        case 2u: { return vec2<f32>(-s, -c); }
        default: { return vec2<f32>(-c, s); }
    }
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = wid.y;
    if t >= step.n_tokens {
        return;
    }
    let row = t * params.n_heads + wid.x;
    let xb = row * params.x_stride;
    let ob = row * params.out_stride;
    var scale = 1.0;
    if params.norm != 0u {
        var ss = 0.0;
        for (var i = lid; i < params.head_dim; i += WG) {
            let v = x[xb + i];
            ss += v * v;
        }
        let sum = workgroup_sum(lid, ss);
        scale = 1.0 / sqrt(sum / f32(params.head_dim) + params.eps);
        // Each element is read (again) and written by one thread only, so out may be x.
        for (var i = 2u * params.half + lid; i < params.head_dim; i += WG) {
            out[ob + i] = x[xb + i] * scale * w[i];
        }
    }
    let pos = positions[t];
    for (var j = lid; j < params.half; j += WG) {
        var i0 = 2u * j;
        var i1 = i0 + 1u;
        if params.neox != 0u {
            i0 = j;
            i1 = j + params.half;
        }
        var x0 = x[xb + i0];
        var x1 = x[xb + i1];
        if params.norm != 0u {
            x0 *= scale * w[i0];
            x1 *= scale * w[i1];
        }
        let f = freq[j];
        let sc = sincos_turns(pos * f.y + mul_hi(pos, f.x));
        out[ob + i0] = x0 * sc.y - x1 * sc.x;
        out[ob + i1] = x0 * sc.x + x1 * sc.y;
    }
}
