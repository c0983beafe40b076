//! GGUF blocks to the aligned GPU layouts that the `q_*.wgsl` formats read.
//!
//! Every layout keeps the values of a matrix in GGUF's order (rows laid end to end) and
//! splits each block into arrays of aligned words, so a kernel reads the 8 values of a
//! piece with one or two aligned loads. The layouts hold no more bytes than GGUF does
//! (plus padding of each array to a whole word).

use strata_model::quant::GgmlType;
use strata_shaders::Kernel;

/// The WGSL prelude that reads `ty`'s layout, or `None` for a type with no GPU layout.
pub(crate) fn format_kernel(ty: GgmlType) -> Option<Kernel> {
    Some(match ty {
        GgmlType::F32 => Kernel::Q_F32,
        GgmlType::F16 => Kernel::Q_F16,
        GgmlType::BF16 => Kernel::Q_BF16,
        GgmlType::Q8_0 => Kernel::Q_Q8_0,
        GgmlType::Q4_0 => Kernel::Q_Q4_0,
        GgmlType::Q4_1 => Kernel::Q_Q4_1,
        GgmlType::Q4_K => Kernel::Q_Q4_K,
        GgmlType::Q6_K => Kernel::Q_Q6_K,
        GgmlType::Other { .. } => return None,
    })
}

/// Byte sizes of the arrays (bindings 4.., in order) holding `blocks` blocks of `ty`.
pub(crate) fn array_sizes(ty: GgmlType, blocks: u64) -> Vec<u64> {
    // Two f16 per u32, rounded up to a whole word.
    let halves = |n: u64| n.div_ceil(2) * 4;
    match ty {
        GgmlType::F32 => vec![blocks * 4],
        GgmlType::F16 | GgmlType::BF16 => vec![halves(blocks)],
        GgmlType::Q8_0 => vec![blocks * 32, halves(blocks)],
        GgmlType::Q4_0 => vec![blocks * 16, halves(blocks)],
        GgmlType::Q4_1 => vec![blocks * 16, blocks * 4],
        GgmlType::Q4_K => vec![blocks * 128, blocks * 16],
        GgmlType::Q6_K => vec![blocks * 192, blocks * 16, halves(blocks)],
        GgmlType::Other { .. } => Vec::new(),
    }
}

/// Repacks `src` (whole GGUF blocks of `ty`) into `dst`, arrays sized by [`array_sizes`].
pub(crate) fn repack(ty: GgmlType, src: &[u8], dst: &mut [Vec<u8>]) {
    let bb = ty.block_bytes() as usize;
    let blocks = src.chunks_exact(bb);
    match (ty, dst) {
        (GgmlType::F32 | GgmlType::F16 | GgmlType::BF16, [w]) => w[..src.len()].copy_from_slice(src),
        (GgmlType::Q8_0, [q, d]) => {
            for (i, b) in blocks.enumerate() {
                d[2 * i..2 * i + 2].copy_from_slice(&b[0..2]);
                q[32 * i..32 * i + 32].copy_from_slice(&b[2..34]);
            }
        }
        (GgmlType::Q4_0, [q, d]) => {
            for (i, b) in blocks.enumerate() {
                d[2 * i..2 * i + 2].copy_from_slice(&b[0..2]);
                nibbles_in_order(&b[2..18], &mut q[16 * i..16 * i + 16]);
            }
        }
        (GgmlType::Q4_1, [q, dm]) => {
            for (i, b) in blocks.enumerate() {
                dm[4 * i..4 * i + 4].copy_from_slice(&b[0..4]);
                nibbles_in_order(&b[4..20], &mut q[16 * i..16 * i + 16]);
            }
        }
        (GgmlType::Q4_K, [q, head]) => {
            for (i, b) in blocks.enumerate() {
                head[16 * i..16 * i + 16].copy_from_slice(&b[0..16]);
                let q = &mut q[128 * i..128 * i + 128];
                // Sub-blocks 2j and 2j+1 are the low and high nibbles of bytes 32j..32j+32.
                for j in 0..4 {
                    nibbles_in_order(&b[16 + 32 * j..48 + 32 * j], &mut q[32 * j..32 * j + 32]);
                }
            }
        }
        (GgmlType::Q6_K, [q, scales, d]) => {
            for (i, b) in blocks.enumerate() {
                d[2 * i..2 * i + 2].copy_from_slice(&b[208..210]);
                scales[16 * i..16 * i + 16].copy_from_slice(&b[192..208]);
                q6_k_in_order(b, &mut q[192 * i..192 * i + 192]);
            }
        }
        (ty, dst) => unreachable!("{ty} has no layout of {} arrays", dst.len()),
    }
}

/// GGUF's 4-bit order (value j in the low nibble, value j + len in the high nibble of
/// byte j, for `len` bytes) to value order (value v in nibble v % 8 of word v / 8).
fn nibbles_in_order(src: &[u8], dst: &mut [u8]) {
    let len = src.len();
    let nibble = |v: usize| if v < len { src[v] & 0xF } else { src[v - len] >> 4 };
    for (o, byte) in dst.iter_mut().enumerate() {
        *byte = nibble(2 * o) | (nibble(2 * o + 1) << 4);
    }
}

/// A Q6_K block's 6-bit quants in value order: low 4 bits as [`nibbles_in_order`], then
/// the high 2 bits, value v in bits 2(v % 16) of word v / 16.
fn q6_k_in_order(b: &[u8], dst: &mut [u8]) {
    let (ql, qh) = (&b[0..128], &b[128..192]);
    let quant = |v: usize| -> (u8, u8) {
        // Half h of 128 values; within it quarter s of 32 values reads ql and qh at l.
        let (h, s, l) = (v / 128, (v % 128) / 32, v % 32);
        let low = ql[64 * h + l + 32 * (s & 1)];
        let low = if s < 2 { low & 0xF } else { low >> 4 };
        (low, (qh[32 * h + l] >> (2 * s)) & 3)
    };
    let (lo, hi) = dst.split_at_mut(128);
    for (o, byte) in lo.iter_mut().enumerate() {
        *byte = quant(2 * o).0 | (quant(2 * o + 1).0 << 4);
    }
    for (o, byte) in hi.iter_mut().enumerate() {
        *byte = (0..4).fold(0, |acc, e| acc | (quant(4 * o + e).1 << (2 * e)));
    }
}

/// A CPU reading of a repacked layout, value by value, for tests of the repacking alone.
#[cfg(test)]
pub(crate) fn unpack(ty: GgmlType, arrays: &[Vec<u8>], values: usize) -> Vec<f32> {
    use half::f16;
    let h = |a: &[u8], i: usize| f16::from_le_bytes([a[2 * i], a[2 * i + 1]]).to_f32();
    let nib = |a: &[u8], v: usize| (a[v / 2] >> (4 * (v % 2))) & 0xF;
    (0..values)
        .map(|v| match (ty, arrays) {
            (GgmlType::F32, [w]) => f32::from_le_bytes(w[4 * v..4 * v + 4].try_into().unwrap()),
            (GgmlType::F16, [w]) => h(w, v),
            (GgmlType::BF16, [w]) => half::bf16::from_le_bytes([w[2 * v], w[2 * v + 1]]).to_f32(),
            (GgmlType::Q8_0, [q, d]) => h(d, v / 32) * f32::from(q[v] as i8),
            (GgmlType::Q4_0, [q, d]) => h(d, v / 32) * (f32::from(nib(q, v)) - 8.0),
            (GgmlType::Q4_1, [q, dm]) => h(dm, 2 * (v / 32)) * f32::from(nib(q, v)) + h(dm, 2 * (v / 32) + 1),
            (GgmlType::Q4_K, [q, head]) => {
                let (b, j) = (v / 256, (v % 256) / 32);
                let s = &head[16 * b + 4..16 * b + 16];
                let (sc, m) = if j < 4 {
                    (s[j] & 63, s[j + 4] & 63)
                } else {
                    ((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
                };
                h(head, 8 * b) * f32::from(sc) * f32::from(nib(q, v)) - h(head, 8 * b + 1) * f32::from(m)
            }
            (GgmlType::Q6_K, [q, scales, d]) => {
                let (b, i) = (v / 256, v % 256);
                let block = &q[192 * b..];
                let quant = nib(block, i) | (((block[128 + i / 4] >> (2 * (i % 4))) & 3) << 4);
                h(d, b) * f32::from(scales[16 * b + i / 16] as i8) * (f32::from(quant) - 32.0)
            }
            _ => unreachable!(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rng;
    use crate::weights::tests::random_weights;

    #[test]
    fn repacked_layouts_hold_the_gguf_values() {
        let mut rng = Rng::new(7);
        for ty in crate::weights::tests::TYPES {
            let values = 1024;
            let src = random_weights(&mut rng, ty, values, 1);
            let blocks = values as u64 / ty.block_len();
            let mut arrays: Vec<Vec<u8>> = array_sizes(ty, blocks).into_iter().map(|s| vec![0; s as usize]).collect();
            repack(ty, &src, &mut arrays);
            let want = strata_model::quant::dequantize(ty, &src).unwrap();
            let got = unpack(ty, &arrays, values);
            crate::testing::assert_close(&got, &want, 0.0, 1e-6, ty.name());
        }
    }
}
