// The 4-bit formats (q4_0, q4_1, q4_k) keep a piece of 8 quants in one u32, quant i in
// nibble i.

// The 8 quants of word `q` as floats, in order.
fn nibbles(q: u32) -> mat2x4<f32> {
    let v = vec4<u32>(q);
    return mat2x4<f32>(
        vec4<f32>((v >> vec4<u32>(0u, 4u, 8u, 12u)) & vec4<u32>(15u)),
        vec4<f32>((v >> vec4<u32>(16u, 20u, 24u, 28u)) & vec4<u32>(15u)),
    );
}
