// Matrix-matrix product for a batch of tokens (prefill): out[t, row0 + r] (+)=
// sum_k W[r, k] x[t, k], for the rows r of one part of a weight matrix. Needs a
// weight-format prelude (`q_*.wgsl`) that binds the weights at 4.. and defines `load8`.
//
// Each workgroup computes a tile of TN rows x TT tokens. Per step of KC k values it
// dequantises the weight tile once into shared memory (each weight read once per TT
// tokens) next to the x tile; each thread then accumulates a block of 4 * RV rows x 4
// tokens in registers. Workgroups: x, y over row tiles, z over token tiles
// (`Dim::Tokens`).

const TN: u32 = 128u;
const TT: u32 = 32u;
// Rows per thread, in vec4s.
const RV: u32 = 2u;
// One thread per block: (TN / 4 / RV) * (TT / 4).
const WG: u32 = 128u;
// k values per step, a multiple of 8 (pieces).
const KC: u32 = 16u;

//#include "common/matmul.wgsl"

// [kk][row / 4]: 4 consecutive rows of one k value.
var<workgroup> w_tile: array<vec4<f32>, KC * TN / 4u>;
// [kk][token / 4]: 4 consecutive tokens of one k value.
var<workgroup> x_tile: array<vec4<f32>, KC * TT / 4u>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r0 = (wid.y * params.groups_x + wid.x) * TN;
    let t0 = wid.z * TT;
    if r0 >= params.rows || t0 >= step.n_tokens {
        return;
    }
    let tr = lid % (TN / 4u / RV);
    let tt = lid / (TN / 4u / RV);
    let k4 = 2u * params.k8;
    // acc[4 v + j]: rows 4 (RV tr + v) .. + 4 of token 4 tt + j.
    var acc: array<vec4<f32>, 4u * RV>;
    for (var c = 0u; c < params.k8; c += KC / 8u) {
        // Weights: TN rows x KC / 8 pieces, consecutive threads on consecutive pieces.
        for (var i = lid; i < TN * (KC / 8u); i += WG) {
            let row = i / (KC / 8u);
            let pc = i % (KC / 8u);
            var w = mat2x4<f32>();
            if r0 + row < params.rows && c + pc < params.k8 {
                w = load8((r0 + row) * params.k8 + c + pc);
            }
            for (var e = 0u; e < 8u; e++) {
                w_tile[(pc * 8u + e) * (TN / 4u) + row / 4u][row % 4u] = w[e / 4u][e % 4u];
            }
        }
        // x: TT tokens x KC values.
        for (var i = lid; i < TT * (KC / 4u); i += WG) {
            let tok = i / (KC / 4u);
            let q = i % (KC / 4u);
            var v = vec4<f32>();
            if t0 + tok < step.n_tokens && 2u * c + q < k4 {
                v = x[(t0 + tok) * k4 + 2u * c + q];
            }
            for (var e = 0u; e < 4u; e++) {
                x_tile[(q * 4u + e) * (TT / 4u) + tok / 4u][tok % 4u] = v[e];
            }
        }
        workgroupBarrier();
        for (var kk = 0u; kk < KC; kk++) {
            let xv = x_tile[kk * (TT / 4u) + tt];
            for (var v = 0u; v < RV; v++) {
                let wv = w_tile[kk * (TN / 4u) + RV * tr + v];
                acc[4u * v] += wv * xv.x;
                acc[4u * v + 1u] += wv * xv.y;
                acc[4u * v + 2u] += wv * xv.z;
                acc[4u * v + 3u] += wv * xv.w;
            }
        }
        workgroupBarrier();
    }
    for (var j = 0u; j < 4u; j++) {
        let t = t0 + 4u * tt + j;
        if t >= step.n_tokens {
            break;
        }
        for (var e = 0u; e < 4u * RV; e++) {
            let r = r0 + 4u * RV * tr + e;
            if r < params.rows {
                store_out(t * params.n + params.row0 + r, acc[4u * (e / 4u) + j][e % 4u]);
            }
        }
    }
}
