// Matrix product through cooperative matrices (tensor cores, Apple's simdgroup matrices):
// out[t, row0 + r] (+)= sum_k W[r, k] x[t, k], for the rows r of one part of a weight
// matrix. Needs, in this order, a cooperative-matrix prelude (`coop_8.wgsl`,
// `coop_16.wgsl`: CM and the matrix types), a weight-format prelude (`q_*.wgsl`: `load8`
// and the weights at 4..) and `x_storage.wgsl`.
//
// A workgroup is one subgroup of SG lanes and computes a tile of TM * CM rows x CM
// tokens. Per chunk of KC pieces (8 values of k each) its lanes dequantise the weight
// tile into workgroup memory as f16 (each weight read once for CM tokens) beside the x
// tile, each value as two f16 (`split`), then the subgroup multiplies them CM values of k
// at a time into TM sum matrices: three products per pair of matrices (cut x cut, and
// each cut by the other's remainder), about float accuracy.
//
// The products are of f16 values summed in f32, in an order the hardware fixes; they
// differ from the other kernels' float sums, so a plan that uses this kernel uses it for
// every class of step. A token's sums depend on its own column of x alone, so a row's
// result still does not depend on what shares its step. x beyond f16's range is clamped
// to it. Workgroups: x, y over row tiles, z over token tiles (`Dim::Tokens`).

const SG: u32 = 8u;
const TM: u32 = 1u;
// Pieces per chunk: a multiple of CM / 8.
const KC: u32 = 2u;
// The kernels' shared summation constant (common/matmul.wgsl's `tree`), unused here.
const S: u32 = 1u;

//#include "common/tile.wgsl"

const ROWS: u32 = TM * CM;
// Values of k per chunk.
const KV: u32 = KC * 8u;

// The weight tile [row][k] (A, row-major) from W_AT, then the x tile [token][k] (B,
// column-major) from X_AT, each twice: the values cut to f16, then what the cut left
// (`split`), one tile further on. The sums [token][row] (C, column-major) apart.
const W_AT: u32 = 0u;
const X_AT: u32 = 2u * ROWS * KV;
var<workgroup> tiles: array<f16, 2u * (ROWS + CM) * KV>;
var<workgroup> sum_tile: array<f32, ROWS * CM>;

const F16_MAX: f32 = 65504.0;

// `v` cut to f16 (clamped to its range), and what the cut left, also in f16: the two
// carry about 22 bits of each value. Products of the cut values alone put SmolLM2-135M's
// logits 0.046 from the float64 goldens (the bar is 0.05); with the remainders' products
// too, as far as float sums put them. The cut clears the low 13 of f32's 23 mantissa
// bits, leaving the 10 f16 has: a conversion to f16 and back would do as much, but
// compilers fold that pair away (Mesa's lavapipe does), and the remainder with it.
fn split(v: vec4<f32>) -> array<vec4<f16>, 2> {
    let f = clamp(v, vec4<f32>(-F16_MAX), vec4<f32>(F16_MAX));
    let hi = bitcast<vec4<f32>>(bitcast<vec4<u32>>(f) & vec4<u32>(0xffffe000u));
    return array<vec4<f16>, 2>(vec4<f16>(hi), vec4<f16>(f - hi));
}

// Writes piece `p` (8 values of k) into `tiles` at `at`, as `split` cuts it: the cut
// values there, what the cut left `tile` values further on.
fn stage(p: mat2x4<f32>, at: u32, tile: u32) {
    for (var half = 0u; half < 2u; half++) {
        let h = split(p[half]);
        for (var j = 0u; j < 4u; j++) {
            tiles[at + 4u * half + j] = h[0][j];
            tiles[at + tile + 4u * half + j] = h[1][j];
        }
    }
}

@compute @workgroup_size(SG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r0 = (wid.y * params.groups_x + wid.x) * ROWS;
    let t0 = wid.z * CM;
    // No early return for a tile past the rows (the grid's padding): cooperative
    // operations need control flow that never diverged. Its loads are guarded to zeros
    // and its stores skipped.
    var sums: array<CoopSum, TM>;
    for (var c = 0u; c < params.k8; c += KC) {
        for (var i = lid; i < ROWS * KC; i += SG) {
            let row = i / KC;
            let pc = i % KC;
            stage(tile_weights(r0 + row, c + pc), W_AT + row * KV + pc * 8u, ROWS * KV);
        }
        for (var i = lid; i < CM * KC; i += SG) {
            let tok = i / KC;
            let pc = i % KC;
            stage(tile_x(t0 + tok, c + pc), X_AT + tok * KV + pc * 8u, CM * KV);
        }
        workgroupBarrier();
        for (var kk = 0u; kk < KV; kk += CM) {
            let xs = coopLoad<CoopX>(&tiles[X_AT + kk], KV);
            let xr = coopLoad<CoopX>(&tiles[X_AT + CM * KV + kk], KV);
            for (var m = 0u; m < TM; m++) {
                let ws = coopLoadT<CoopW>(&tiles[W_AT + m * CM * KV + kk], KV);
                let wr = coopLoadT<CoopW>(&tiles[W_AT + ROWS * KV + m * CM * KV + kk], KV);
                // The remainders' products first (the smaller terms), then the main one.
                sums[m] = coopMultiplyAdd(wr, xs, sums[m]);
                sums[m] = coopMultiplyAdd(ws, xr, sums[m]);
                sums[m] = coopMultiplyAdd(ws, xs, sums[m]);
            }
        }
        workgroupBarrier();
    }
    for (var m = 0u; m < TM; m++) {
        coopStore(sums[m], &sum_tile[m * CM], ROWS);
    }
    workgroupBarrier();
    for (var i = lid; i < ROWS * CM; i += SG) {
        let tok = i / ROWS;
        let row = i % ROWS;
        if t0 + tok < step.n_tokens && r0 + row < params.rows {
            store_out(t0 + tok, params.row0 + r0 + row, sum_tile[i]);
        }
    }
}
