// Weight format F16: row-major, 8 halves per vec4<u32> (GGUF's own bytes, read aligned).

@group(0) @binding(4) var<storage, read> w_f16: array<vec4<u32>>;

// The 8 weights of piece `p`: values 8p..8p+8 of the part, rows laid end to end.
fn load8(p: u32) -> mat2x4<f32> {
    let w = w_f16[p];
    return mat2x4<f32>(
        vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y)),
        vec4<f32>(unpack2x16float(w.z), unpack2x16float(w.w)),
    );
}
