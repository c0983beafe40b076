// Weight format Q6_K, repacked: each 210-byte super-block of 256 values becomes 48 u32 of
// quants (32 words of low 4 bits, value i in nibble i of its piece's word; then 16 words
// of high 2 bits, 16 values per word), 16 bytes of i8 scales (one per 16 values), and the
// f16 d (two per u32). Value v = d * scale[v / 16] * (q - 32).

@group(0) @binding(4) var<storage, read> w_q6_k: array<u32>;
@group(0) @binding(5) var<storage, read> w_q6_k_scales: array<vec4<u32>>;
@group(0) @binding(6) var<storage, read> w_q6_k_d: array<u32>;

// The 8 weights of piece `p`: values 8p..8p+8 of the part, rows laid end to end.
fn load8(p: u32) -> mat2x4<f32> {
    let b = p >> 5u;
    let i = p & 31u;
    let lo = vec4<u32>(w_q6_k[48u * b + i]);
    let hi = vec4<u32>(w_q6_k[48u * b + 32u + (i >> 1u)] >> (16u * (i & 1u)));
    let s = i >> 1u;
    let sc = f32(extractBits(bitcast<i32>(w_q6_k_scales[b][s >> 2u]), 8u * (s & 3u), 8u));
    let d = unpack2x16float(w_q6_k_d[b >> 1u])[b & 1u] * sc;
    let q0 = ((lo >> vec4<u32>(0u, 4u, 8u, 12u)) & vec4<u32>(15u)) | (((hi >> vec4<u32>(0u, 2u, 4u, 6u)) & vec4<u32>(3u)) << vec4<u32>(4u));
    let q1 = ((lo >> vec4<u32>(16u, 20u, 24u, 28u)) & vec4<u32>(15u)) | (((hi >> vec4<u32>(8u, 10u, 12u, 14u)) & vec4<u32>(3u)) << vec4<u32>(4u));
    return mat2x4<f32>(d * (vec4<f32>(q0) - 32.0), d * (vec4<f32>(q1) - 32.0));
}
