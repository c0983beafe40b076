// Weight format Q4_K, repacked: each 144-byte super-block of 256 values becomes a 16-byte
// header (f16 d, f16 dmin, the 12 bytes of 6-bit sub-block scales and mins as GGUF packs
// them) and 32 u32 of quants, one per piece of 8 values, value i in nibble i.
// Value v of sub-block j = v / 32 is d * scale[j] * q - dmin * min[j].

//#include "common/nibbles.wgsl"

@group(0) @binding(4) var<storage, read> w_q4_k: array<u32>;
@group(0) @binding(5) var<storage, read> w_q4_k_head: array<vec4<u32>>;

// The 8 weights of piece `p`: values 8p..8p+8 of the part, rows laid end to end.
fn load8(p: u32) -> mat2x4<f32> {
    let q = nibbles(w_q4_k[p]);
    let h = w_q4_k_head[p >> 5u];
    let dm = unpack2x16float(h.x);
    // Sub-block j: scale and min are bytes j and j+4 (low 6 bits) for j < 4; for j >= 4
    // their low 4 bits are the nibbles of byte j+4 and their top 2 bits the top bits of
    // bytes j-4 and j.
    let j = (p >> 2u) & 7u;
    let s = 8u * (j & 3u);
    var sc: u32;
    var mn: u32;
    if j < 4u {
        sc = extractBits(h.y, s, 6u);
        mn = extractBits(h.z, s, 6u);
    } else {
        sc = extractBits(h.w, s, 4u) | (extractBits(h.y, s + 6u, 2u) << 4u);
        mn = extractBits(h.w, s + 4u, 4u) | (extractBits(h.z, s + 6u, 2u) << 4u);
    }
    let d = dm.x * f32(sc);
    let m = dm.y * f32(mn);
    return mat2x4<f32>(d * q[0] - m, d * q[1] - m);
}
