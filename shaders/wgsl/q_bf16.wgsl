// Weight format BF16: row-major, 8 bfloat16 per vec4<u32>. A bf16 is the top half of an f32.

@group(0) @binding(4) var<storage, read> w_bf16: array<vec4<u32>>;

// The 8 weights of piece `p`: values 8p..8p+8 of the part, rows laid end to end.
fn load8(p: u32) -> mat2x4<f32> {
    let w = w_bf16[p];
    let hi = vec4<u32>(0xffff0000u);
    return mat2x4<f32>(
        bitcast<vec4<f32>>(vec4<u32>(w.x << 16u, w.x & hi.x, w.y << 16u, w.y & hi.x)),
        bitcast<vec4<f32>>(vec4<u32>(w.z << 16u, w.z & hi.x, w.w << 16u, w.w & hi.x)),
    );
}
