// What mm_vec and mm_vec_sg share; they differ only in how a workgroup sums its threads'
// partial dot products.
//
// Each workgroup computes ROWS consecutive rows; its threads stride over k in pieces of 8
// values, reading x once per piece for all ROWS rows.

//#include "common/matmul.wgsl"

const WG: u32 = 64u;
const ROWS: u32 = 4u;

// Partial sums of each row: per thread (mm_vec) or per subgroup (mm_vec_sg, which then
// assumes no subgroup size).
var<workgroup> partial: array<f32, WG * ROWS>;

// The first of the ROWS rows of workgroup `wid`.
fn first_row(wid: vec3<u32>) -> u32 {
    return (wid.y * params.groups_x + wid.x) * ROWS;
}

// Thread `lid`'s partial dot products of rows r0..r0 + ROWS, over pieces lid, lid + WG, ...
fn row_dots(r0: u32, lid: u32) -> array<f32, ROWS> {
    // The last group may have fewer than ROWS rows: it recomputes the last one.
    var base: array<u32, ROWS>;
    for (var r = 0u; r < ROWS; r++) {
        base[r] = min(r0 + r, params.rows - 1u) * params.k8;
    }
    var acc: array<f32, ROWS>;
    for (var p = lid; p < params.k8; p += WG) {
        let xa = x[2u * p];
        let xb = x[2u * p + 1u];
        for (var r = 0u; r < ROWS; r++) {
            let w = load8(base[r] + p);
            acc[r] += dot(w[0], xa) + dot(w[1], xb);
        }
    }
    return acc;
}
