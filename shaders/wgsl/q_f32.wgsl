// Weight format F32: row-major, read as pairs of vec4.
// Bindings 4.. of every kernel that takes a weight-format prelude.

@group(0) @binding(4) var<storage, read> w_f32: array<vec4<f32>>;

// The 8 weights of piece `p`: values 8p..8p+8 of the part, rows laid end to end.
fn load8(p: u32) -> mat2x4<f32> {
    return mat2x4<f32>(w_f32[2u * p], w_f32[2u * p + 1u]);
}
