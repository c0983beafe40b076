// Weight format Q8_0, repacked: GGUF's 34-byte blocks (f16 d + 32 i8) split into the
// quants (8 bytes per piece of 8 values, aligned) and the scales (f16, two per u32).
// Value v of block b is d[b] * q[v].

@group(0) @binding(4) var<storage, read> w_q8_0: array<vec2<u32>>;
@group(0) @binding(5) var<storage, read> w_q8_0_d: array<u32>;

// Four signed bytes of `w`, lowest first.
fn q8_0_i8x4(w: u32) -> vec4<f32> {
    return vec4<f32>((vec4<i32>(bitcast<i32>(w)) << vec4<u32>(24u, 16u, 8u, 0u)) >> vec4<u32>(24u));
}

// The 8 weights of piece `p`: values 8p..8p+8 of the part, rows laid end to end.
fn load8(p: u32) -> mat2x4<f32> {
    let q = w_q8_0[p];
    let b = p >> 2u;
    let d = unpack2x16float(w_q8_0_d[b >> 1u])[b & 1u];
    return mat2x4<f32>(d * q8_0_i8x4(q.x), d * q8_0_i8x4(q.y));
}
