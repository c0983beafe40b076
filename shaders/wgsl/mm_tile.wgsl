// Matrix product for a step of many rows (prefill, large batches) on GPUs:
// out[t, row0 + r] (+)= sum_p piece_dot(W[r, p], x[t, p]), for the rows r of one part of a
// weight matrix. Needs a weight-format prelude (`q_*.wgsl`) that binds the weights at 4..
// and defines `load8`.
//
// Each workgroup computes a tile of TN rows x TT tokens. Per chunk of KC pieces it
// dequantises the weight tile once into workgroup memory (each weight read once per TT
// tokens) next to the x tile; each thread then accumulates RB rows x TK tokens. Every
// output keeps S partial sums, piece p adding to partial p mod S, combined by `tree` at
// the end: exactly the sums of `mm_rows` with the same S, so a row's result does not
// depend on which kernel ran it. Workgroups: x, y over row tiles, z over token tiles
// (`Dim::Tokens`).

const TN: u32 = 64u;
const TT: u32 = 32u;
const RB: u32 = 4u;
const TK: u32 = 4u;
// Pieces per chunk: a multiple of S.
const KC: u32 = 4u;
const S: u32 = 4u;
// (TN / RB) * (TT / TK) threads: one per block.
const WG: u32 = 128u;

//#include "common/tile.wgsl"

// [row][piece][half] and [token][piece][half].
var<workgroup> w_tile: array<vec4<f32>, TN * KC * 2u>;
var<workgroup> x_tile: array<vec4<f32>, TT * KC * 2u>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r0 = (wid.y * params.groups_x + wid.x) * TN;
    let t0 = wid.z * TT;
    if r0 >= params.rows || t0 >= step.n_tokens {
        return;
    }
    let tr = lid % (TN / RB);
    let tt = lid / (TN / RB);
    // acc[(r * TK + t) * S + s]: partial s of row tr * RB + r, token tt * TK + t.
    var acc: array<f32, RB * TK * S>;
    for (var c = 0u; c < params.k8; c += KC) {
        for (var i = lid; i < TN * KC; i += WG) {
            let row = i / KC;
            let pc = i % KC;
            let w = tile_weights(r0 + row, c + pc);
            w_tile[2u * i] = w[0];
            w_tile[2u * i + 1u] = w[1];
        }
        for (var i = lid; i < TT * KC; i += WG) {
            let tok = i / KC;
            let pc = i % KC;
            let v = tile_x(t0 + tok, c + pc);
            x_tile[2u * i] = v[0];
            x_tile[2u * i + 1u] = v[1];
        }
        workgroupBarrier();
        let pieces = min(KC, params.k8 - c);
        for (var pc = 0u; pc < pieces; pc++) {
            // c is a multiple of S, so piece c + pc adds to partial pc mod S.
            let s = pc % S;
            for (var r = 0u; r < RB; r++) {
                let wi = ((tr * RB + r) * KC + pc) * 2u;
                let w = mat2x4<f32>(w_tile[wi], w_tile[wi + 1u]);
                for (var t = 0u; t < TK; t++) {
                    let xi = ((tt * TK + t) * KC + pc) * 2u;
                    acc[(r * TK + t) * S + s] += piece_dot(w, x_tile[xi], x_tile[xi + 1u]);
                }
            }
        }
        workgroupBarrier();
    }
    for (var t = 0u; t < TK; t++) {
        let tok = t0 + tt * TK + t;
        if tok >= step.n_tokens {
            break;
        }
        for (var r = 0u; r < RB; r++) {
            let row = r0 + tr * RB + r;
            if row < params.rows {
                var v: array<f32, S>;
                for (var s = 0u; s < S; s++) {
                    v[s] = acc[(r * TK + t) * S + s];
                }
                store_out(tok, params.row0 + row, tree(v));
            }
        }
    }
}
