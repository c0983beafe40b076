//! CPU dequantisation of every supported type, block by block as ggml lays them out.

use half::{bf16, f16};

use super::GgmlType;
use crate::{Error, Result};

/// Dequantises `bytes` (a whole number of blocks of `ty`) into a new vector.
pub fn dequantize(ty: GgmlType, bytes: &[u8]) -> Result<Vec<f32>> {
    let blocks = bytes.len() as u64 / ty.block_bytes();
    let mut out = vec![0f32; (blocks * ty.block_len()) as usize];
    dequantize_into(ty, bytes, &mut out)?;
    Ok(out)
}

/// Dequantises `bytes` into `out`, whose length must be the number of values they hold.
pub fn dequantize_into(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    let bb = ty.block_bytes() as usize;
    let bl = ty.block_len() as usize;
    if !bytes.len().is_multiple_of(bb) || bytes.len() / bb * bl != out.len() {
        return Err(Error::Config(format!("dequantize {ty}: {} bytes do not hold {} values", bytes.len(), out.len())));
    }
    let blocks = bytes.chunks_exact(bb).zip(out.chunks_exact_mut(bl));
    match ty {
        GgmlType::F32 => blocks.for_each(|(b, o)| o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        GgmlType::F16 => blocks.for_each(|(b, o)| o[0] = f16::from_le_bytes([b[0], b[1]]).to_f32()),
        GgmlType::BF16 => blocks.for_each(|(b, o)| o[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        GgmlType::Q8_0 => blocks.for_each(|(b, o)| q8_0(b, o)),
        GgmlType::Q4_0 => blocks.for_each(|(b, o)| q4_0(b, o)),
        GgmlType::Q4_1 => blocks.for_each(|(b, o)| q4_1(b, o)),
        GgmlType::Q4_K => blocks.for_each(|(b, o)| q4_k(b, o)),
        GgmlType::Q6_K => blocks.for_each(|(b, o)| q6_k(b, o)),
        GgmlType::Other { .. } => return Err(Error::UnsupportedType(ty.name().to_owned())),
    }
    Ok(())
}

fn half_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

fn q8_0(b: &[u8], o: &mut [f32]) {
    let d = half_at(b, 0);
    for (o, &q) in o.iter_mut().zip(&b[2..34]) {
        *o = d * f32::from(q as i8);
    }
}

fn q4_0(b: &[u8], o: &mut [f32]) {
    let d = half_at(b, 0);
    for j in 0..16 {
        let q = b[2 + j];
        o[j] = d * (f32::from(q & 0xF) - 8.0);
        o[j + 16] = d * (f32::from(q >> 4) - 8.0);
    }
}

fn q4_1(b: &[u8], o: &mut [f32]) {
    let d = half_at(b, 0);
    let m = half_at(b, 2);
    for j in 0..16 {
        let q = b[4 + j];
        o[j] = d * f32::from(q & 0xF) + m;
        o[j + 16] = d * f32::from(q >> 4) + m;
    }
}

/// Six-bit scale and min of sub-block `j` (0..8) of a Q4_K super-block.
pub(crate) fn q4_k_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

fn q4_k(b: &[u8], o: &mut [f32]) {
    let d = half_at(b, 0);
    let dmin = half_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for j in 0..4 {
        let (sc1, m1) = q4_k_scale_min(2 * j, scales);
        let (sc2, m2) = q4_k_scale_min(2 * j + 1, scales);
        let (d1, m1) = (d * f32::from(sc1), dmin * f32::from(m1));
        let (d2, m2) = (d * f32::from(sc2), dmin * f32::from(m2));
        for l in 0..32 {
            let q = qs[32 * j + l];
            o[64 * j + l] = d1 * f32::from(q & 0xF) - m1;
            o[64 * j + 32 + l] = d2 * f32::from(q >> 4) - m2;
        }
    }
}

fn q6_k(b: &[u8], o: &mut [f32]) {
    let d = half_at(b, 208);
    for n in 0..2 {
        let ql = &b[64 * n..];
        let qh = &b[128 + 32 * n..];
        let sc = &b[192 + 8 * n..];
        let y = &mut o[128 * n..];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let s = |k: usize| d * f32::from(sc[k] as i8);
            y[l] = s(is) * q1 as f32;
            y[l + 32] = s(is + 2) * q2 as f32;
            y[l + 64] = s(is + 4) * q3 as f32;
            y[l + 96] = s(is + 6) * q4 as f32;
        }
    }
}
