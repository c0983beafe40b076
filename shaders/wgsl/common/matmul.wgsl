// Bindings 0..3 of the matrix kernels (mm_vec, mm_vec_sg, mm_mat), whose params are one
// Rust struct (`ops::matmul::Params`); the weight-format prelude binds 4.. .

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
    // Workgroups along x; the group's index (of its block of rows) is y * groups_x + x,
    // for grids past 65535 groups.
    groups_x: u32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(1) var<uniform> params: Params;
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

// Writes `v` to out[i], or adds it there (params.accumulate).
fn store_out(i: u32, v: f32) {
    var o = v;
    if params.accumulate != 0u {
        o += out[i];
    }
    out[i] = o;
}
