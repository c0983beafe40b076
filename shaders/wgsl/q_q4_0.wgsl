// Weight format Q4_0, repacked: GGUF's 18-byte blocks (f16 d + 16 bytes of nibbles, value j
// in the low and j+16 in the high nibble of byte j) become one u32 per piece of 8 values,
// value i in nibble i, and the scales (f16, two per u32). Value = d * (q - 8).

//#include "common/nibbles.wgsl"

@group(0) @binding(4) var<storage, read> w_q4_0: array<u32>;
@group(0) @binding(5) var<storage, read> w_q4_0_d: array<u32>;

// The 8 weights of piece `p`: values 8p..8p+8 of the part, rows laid end to end.
fn load8(p: u32) -> mat2x4<f32> {
    let q = nibbles(w_q4_0[p]);
    let b = p >> 2u;
    let d = unpack2x16float(w_q4_0_d[b >> 1u])[b & 1u];
    return mat2x4<f32>(d * (q[0] - 8.0), d * (q[1] - 8.0));
}
