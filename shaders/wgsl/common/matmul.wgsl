// Bindings 0, 1, 3 and 10 to 12 of the matrix kernels (mm_rows, mm_tile, mm_dot), whose
// params are one Rust struct (`ops::matmul::Params`); x, at 2, comes from an x prelude
// (`x_storage.wgsl` or `x_uniform.wgsl`), and the weight-format prelude binds 4.. .
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
    // Rows of the whole matrix.
    n: u32,
    // First row of this part.
    row0: u32,
    // 1: add to the output instead of overwriting it.
    accumulate: u32,
    // Workgroups along x; the group's index is y * groups_x + x, for grids past 65535.
    groups_x: u32,
    // Where the second, third and fourth outputs' rows begin: the matrix is several with
    // the same input, end to end (e.g. q, k and v), each writing its own buffer, rows of its
    // own width. Rows from split1 on go to out1, and so on; n for outputs there are not.
    split1: u32,
    split2: u32,
    split3: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(1) var<uniform> params: Params;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
// The other outputs of a fused matrix; where there are none, `out` again (never written
// through these then).
@group(0) @binding(10) var<storage, read_write> out1: array<f32>;
@group(0) @binding(11) var<storage, read_write> out2: array<f32>;
@group(0) @binding(12) var<storage, read_write> out3: array<f32>;

// Writes `v`, the value of matrix row `row` for token `t`, to its output, or adds it there
// (params.accumulate).
fn store_out(t: u32, row: u32, v: f32) {
    var o = v;
    if row < params.split1 {
        let i = t * params.split1 + row;
        if params.accumulate != 0u {
            o += out[i];
        }
        out[i] = o;
    } else if row < params.split2 {
        let i = t * (params.split2 - params.split1) + row - params.split1;
        if params.accumulate != 0u {
            o += out1[i];
        }
        out1[i] = o;
    } else if row < params.split3 {
        let i = t * (params.split3 - params.split2) + row - params.split2;
        if params.accumulate != 0u {
            o += out2[i];
        }
        out2[i] = o;
    } else {
        let i = t * (params.n - params.split3) + row - params.split3;
        if params.accumulate != 0u {
            o += out3[i];
        }
        out3[i] = o;
    }
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
