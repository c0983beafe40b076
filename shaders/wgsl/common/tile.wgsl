// The pieces the tiled matrix kernels (`mm_tile`, `mm_coop`) copy into workgroup memory,
// zeros where a tile reaches past the part's rows, the step's tokens or k, so that the
// products over a partial tile add nothing for them.

//#include "common/matmul.wgsl"

// Weight piece p (8 values of k) of row `row` of the part.
fn tile_weights(row: u32, p: u32) -> mat2x4<f32> {
    if row < params.rows && p < params.k8 {
        return load8(row * params.k8 + p);
    }
    return mat2x4<f32>();
}

// Piece p of x's row for token `tok`.
fn tile_x(tok: u32, p: u32) -> mat2x4<f32> {
    if tok < step.n_tokens && p < params.k8 {
        let i = tok * 2u * params.k8 + 2u * p;
        return mat2x4<f32>(x[i], x[i + 1u]);
    }
    return mat2x4<f32>();
}
