// Bindings 0, 1 and 3 of the matrix kernels (mm_rows, mm_tile), whose params are one Rust
// struct (`ops::matmul::Params`); x, at 2, comes from an x prelude (`x_storage.wgsl` or
// `x_uniform.wgsl`), and the weight-format prelude binds 4.. .
//
// Every matrix kernel sums an output the same way, so that a row's result does not depend
// on how many rows share its step or which kernel ran it: piece p (8 values of k) adds
// `piece_dot` to partial sum p mod S, pieces in increasing order, and the S partials meet
// in `tree` (pairs of neighbours, then pairs of pairs). S is one constant per adapter.

//#include "common/step.wgsl"

struct Params {
    // Pieces of 8 values per row (k / 8).
    k8: u32,
    // Rows in this part.
    rows: u32,
    // Row stride of `out`: all rows of the matrix.
    n: u32,
    // First row of this part.
    row0: u32,
    // 1: add to `out` instead of overwriting it.
    accumulate: u32,
    // Workgroups along x; the group's index is y * groups_x + x, for grids past 65535.
    groups_x: u32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(1) var<uniform> params: Params;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

// Writes `v` to out[i], or adds it there (params.accumulate).
fn store_out(i: u32, v: f32) {
    var o = v;
    if params.accumulate != 0u {
        o += out[i];
    }
    out[i] = o;
}

// What piece `w` of a weight row adds to its output for the matching piece of x.
fn piece_dot(w: mat2x4<f32>, xa: vec4<f32>, xb: vec4<f32>) -> f32 {
    return dot(w[0], xa) + dot(w[1], xb);
}

// The S partial sums of one output, combined in a fixed order (S a power of two).
fn tree(v: array<f32, S>) -> f32 {
    var a = v;
    for (var w = 1u; w < S; w *= 2u) {
        for (var j = 0u; j + w < S; j += 2u * w) {
            a[j] = a[j] + a[j + w];
        }
    }
    return a[0];
}
