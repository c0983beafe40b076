//! Q8_0 quantisation, bit for bit as llama.cpp's reference quantiser does it.

use half::f16;

/// Quantises `x` (a multiple of 32 values) to Q8_0 blocks: per 32 values, `d = amax / 127`
/// stored as f16, `q = round(x * (1/d))` rounding half away from zero.
pub fn quantize_q8_0(x: &[f32]) -> Vec<u8> {
    assert!(x.len().is_multiple_of(32), "Q8_0 needs a multiple of 32 values");
    let mut out = Vec::with_capacity(x.len() / 32 * 34);
    for block in x.chunks_exact(32) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        // The multiplier is computed from the f32 d, before d is rounded to f16.
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|&v| (v * id).round() as i8 as u8));
    }
    out
}
