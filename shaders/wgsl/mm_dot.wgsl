// Matrix product through integer dot products, for Q8_0 weights: out[t, row0 + r] (+)=
// sum_b dw[r, b] * dx[t, b] * (254 (q_w . q1_x) + q_w . q2_x) over the blocks b of 32
// values, with x quantised per block to two signed bytes a value by `quantize_x` and each
// block's 64 products summed exactly in integers (`dot4I8Packed`, one instruction on GPUs
// with 4x8-bit dot products; at most 254 * 32 * 127 * 128 < 2^31).
// Needs the Q8_0 prelude (`q_q8_0.wgsl`) for the weights' bindings (4, 5).
//
// Lanes come in groups of S; a group owns one row and lane s of it sums the blocks s,
// s + S, ... for TB tokens at once, the S partials meeting in `tree`. Each block's
// integer sum is exact, so every output is summed in the same order whatever TB, and a
// row's result does not depend on what else shares its step. Workgroups: x, y over
// blocks of WG / S rows, z over blocks of TB tokens (`Dim::Tokens`).

const WG: u32 = 64u;
const S: u32 = 4u;
const TB: u32 = 1u;

//#include "common/matmul.wgsl"

@group(0) @binding(2) var<storage, read> xq: array<vec4<u32>>;
@group(0) @binding(6) var<storage, read> xd: array<f32>;

var<workgroup> partial: array<f32, WG * TB>;

// The 32 products of a block's weight bytes (four pieces) with 32 bytes of x, exactly.
fn block_dot(w0: vec2<u32>, w1: vec2<u32>, w2: vec2<u32>, w3: vec2<u32>, a: vec4<u32>, c: vec4<u32>) -> i32 {
    return dot4I8Packed(w0.x, a.x) + dot4I8Packed(w0.y, a.y) + dot4I8Packed(w1.x, a.z) + dot4I8Packed(w1.y, a.w)
        + dot4I8Packed(w2.x, c.x) + dot4I8Packed(w2.y, c.y) + dot4I8Packed(w3.x, c.z) + dot4I8Packed(w3.y, c.w);
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    // No early return: every lane meets the barrier.
    let s = lid % S;
    let r = (wid.y * params.groups_x + wid.x) * (WG / S) + lid / S;
    // Rows past the part read its last row (their sums are never stored).
    let row = min(r, params.rows - 1u);
    let t0 = wid.z * TB;
    let n_tokens = max(step.n_tokens, 1u);
    let kb = params.k8 / 4u;
    var acc: array<f32, TB>;
    for (var b = s; b < kb; b += S) {
        let blk = row * kb + b;
        let p = blk * 4u;
        let w0 = w_q8_0[p];
        let w1 = w_q8_0[p + 1u];
        let w2 = w_q8_0[p + 2u];
        let w3 = w_q8_0[p + 3u];
        let dw = unpack2x16float(w_q8_0_d[blk >> 1u])[blk & 1u];
        for (var t = 0u; t < TB; t++) {
            let xb = min(t0 + t, n_tokens - 1u) * kb + b;
            let q = block_dot(w0, w1, w2, w3, xq[4u * xb], xq[4u * xb + 1u]) * 254
                + block_dot(w0, w1, w2, w3, xq[4u * xb + 2u], xq[4u * xb + 3u]);
            acc[t] += f32(q) * (dw * xd[xb]);
        }
    }
    if S > 1u {
        for (var t = 0u; t < TB; t++) {
            partial[lid * TB + t] = acc[t];
        }
        workgroupBarrier();
        if s != 0u {
            return;
        }
        for (var t = 0u; t < TB; t++) {
            var v: array<f32, S>;
            for (var j = 0u; j < S; j++) {
                v[j] = partial[(lid + j) * TB + t];
            }
            acc[t] = tree(v);
        }
    }
    if r >= params.rows {
        return;
    }
    for (var t = 0u; t < TB; t++) {
        if t0 + t >= step.n_tokens {
            break;
        }
        store_out(t0 + t, params.row0 + r, acc[t]);
    }
}
