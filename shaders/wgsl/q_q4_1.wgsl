// Weight format Q4_1, repacked: GGUF's 20-byte blocks (f16 d, f16 m, 16 bytes of nibbles)
// become one u32 per piece of 8 values (value i in nibble i) and one u32 (d, m) per block.
// Value = d * q + m.

//#include "common/nibbles.wgsl"

@group(0) @binding(4) var<storage, read> w_q4_1: array<u32>;
@group(0) @binding(5) var<storage, read> w_q4_1_dm: array<u32>;

// The 8 weights of piece `p`: values 8p..8p+8 of the part, rows laid end to end.
fn load8(p: u32) -> mat2x4<f32> {
    let q = nibbles(w_q4_1[p]);
    let dm = unpack2x16float(w_q4_1_dm[p >> 2u]);
    return mat2x4<f32>(dm.x * q[0] + dm.y, dm.x * q[1] + dm.y);
}
