//! CPU dequantisation against blocks built by hand, and Q8_0 quantisation test vectors.
//!
//! The block encoders below pack quants exactly as llama.cpp's reference quantisers
//! (`quantize_row_*_ref` in ggml-quants.c) do, written independently of `dequant.rs`,
//! so a layout mistake on either side shows up as a mismatch.

use half::{bf16, f16};

use super::dequant::q4_k_scale_min;
use super::{GgmlType, dequantize, dequantize_into, quantize_q8_0};
use crate::Error;

/// SplitMix64: a tiny seeded generator, so every failure reproduces from its seed.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (the modulo bias is irrelevant for tests).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub(crate) fn f32_in(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    fn array<T, const N: usize>(&mut self, mut f: impl FnMut(&mut Self) -> T) -> [T; N] {
        std::array::from_fn(|_| f(self))
    }
}

fn f16_le(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

/// A random scale that f16 holds exactly, so expected values use what the block stores.
fn f16_scale(rng: &mut Rng) -> f32 {
    f16::from_f32(rng.f32_in(-3.0, 3.0)).to_f32()
}

// Encoders: quants in natural order in, ggml block bytes out.

fn q8_0_block(d: f32, q: &[i8; 32]) -> Vec<u8> {
    let mut b = f16_le(d).to_vec();
    b.extend(q.iter().map(|&v| v as u8));
    b
}

/// `q` in 0..16; value j is in the low nibble of byte j, value j+16 in its high nibble.
fn q4_0_block(d: f32, q: &[u8; 32]) -> Vec<u8> {
    let mut b = f16_le(d).to_vec();
    b.extend((0..16).map(|j| q[j] | q[j + 16] << 4));
    b
}

fn q4_1_block(d: f32, m: f32, q: &[u8; 32]) -> Vec<u8> {
    let mut b = [f16_le(d), f16_le(m)].concat();
    b.extend((0..16).map(|j| q[j] | q[j + 16] << 4));
    b
}

/// The 12 scale bytes of a Q4_K block: eight 6-bit scales and mins, packed as
/// `quantize_row_q4_K_ref` packs them (sub-blocks 4..8 keep their top bits in bytes 0..8).
fn q4_k_scales(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            s[j] = sc[j];
            s[j + 4] = m[j];
        } else {
            s[j + 4] = (sc[j] & 0xF) | (m[j] & 0xF) << 4;
            s[j - 4] |= (sc[j] >> 4) << 6;
            s[j] |= (m[j] >> 4) << 6;
        }
    }
    s
}

/// `q` in 0..16. Each 64 values share 32 bytes: the first 32 in the low nibbles.
fn q4_k_block(d: f32, dmin: f32, sc: &[u8; 8], m: &[u8; 8], q: &[u8; 256]) -> Vec<u8> {
    let mut b = [f16_le(d), f16_le(dmin)].concat();
    b.extend(q4_k_scales(sc, m));
    for j in (0..256).step_by(64) {
        b.extend((0..32).map(|l| q[j + l] | q[j + l + 32] << 4));
    }
    b
}

/// `q` in -32..32. Per 128 values: 64 bytes of low nibbles, 32 bytes of high bit pairs.
fn q6_k_block(d: f32, sc: &[i8; 16], q: &[i8; 256]) -> Vec<u8> {
    let l: Vec<u8> = q.iter().map(|&v| (v + 32) as u8).collect();
    let (mut ql, mut qh) = (Vec::new(), Vec::new());
    for j in (0..256).step_by(128) {
        ql.extend((0..32).map(|i| (l[j + i] & 0xF) | (l[j + i + 64] & 0xF) << 4));
        ql.extend((0..32).map(|i| (l[j + i + 32] & 0xF) | (l[j + i + 96] & 0xF) << 4));
        qh.extend((0..32).map(|i| {
            l[j + i] >> 4 | (l[j + i + 32] >> 4) << 2 | (l[j + i + 64] >> 4) << 4 | (l[j + i + 96] >> 4) << 6
        }));
    }
    let sc: Vec<u8> = sc.iter().map(|&s| s as u8).collect();
    [ql, qh, sc, f16_le(d).to_vec()].concat()
}

#[track_caller]
fn assert_dequant(ty: GgmlType, bytes: &[u8], expected: &[f32]) {
    let got = dequantize(ty, bytes).unwrap();
    assert_eq!(got.len(), expected.len(), "{ty}: value count");
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        assert!(g.to_bits() == e.to_bits(), "{ty}: value {i} is {g}, expected {e}");
    }
}

#[test]
fn float_types_decode_exactly() {
    let f32s = [1.5f32, -0.0, f32::MAX, f32::MIN_POSITIVE, 1e-45];
    let bytes: Vec<u8> = f32s.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_dequant(GgmlType::F32, &bytes, &f32s);

    // 1, -2, the largest f16, the smallest subnormal, infinity.
    let f16s: [u16; 5] = [0x3C00, 0xC000, 0x7BFF, 0x0001, 0x7C00];
    let bytes: Vec<u8> = f16s.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_dequant(GgmlType::F16, &bytes, &[1.0, -2.0, 65504.0, 2f32.powi(-24), f32::INFINITY]);

    // bf16 is the top half of an f32.
    let bf16s: [u16; 4] = [0x3F80, 0x4049, 0xC2F7, 0x0080];
    let bytes: Vec<u8> = bf16s.iter().flat_map(|v| v.to_le_bytes()).collect();
    let expected: Vec<f32> = bf16s.iter().map(|&b| f32::from_bits(u32::from(b) << 16)).collect();
    assert_eq!(expected[..2], [1.0, 3.140625]);
    assert_dequant(GgmlType::BF16, &bytes, &expected);
    assert_eq!(bf16::from_bits(0x4049).to_f32(), 3.140625);
}

#[test]
fn q8_0_dequant_is_d_times_q() {
    let mut q = [0i8; 32];
    q[..4].copy_from_slice(&[-128, 127, -1, 3]);
    assert_dequant(GgmlType::Q8_0, &q8_0_block(0.5, &q), &[[-64.0, 63.5, -0.5, 1.5].as_slice(), &[0.0; 28]].concat());

    let mut rng = Rng::new(8);
    for _ in 0..50 {
        let d = f16_scale(&mut rng);
        let q: [i8; 32] = rng.array(|r| r.next_u64() as i8);
        let expected: Vec<f32> = q.iter().map(|&v| f32::from(v) * d).collect();
        assert_dequant(GgmlType::Q8_0, &q8_0_block(d, &q), &expected);
    }
}

#[test]
fn q4_0_dequant_centres_quants_on_8() {
    // Byte 0 = 0x1F: value 0 is 15 - 8, value 16 is 1 - 8.
    let mut bytes = vec![0u8; 18];
    bytes[..2].copy_from_slice(&f16_le(0.25));
    bytes[2] = 0x1F;
    let mut expected = vec![-2.0f32; 32];
    expected[0] = 7.0 * 0.25;
    expected[16] = -7.0 * 0.25;
    assert_dequant(GgmlType::Q4_0, &bytes, &expected);

    let mut rng = Rng::new(40);
    for _ in 0..50 {
        let d = f16_scale(&mut rng);
        let q: [u8; 32] = rng.array(|r| r.below(16) as u8);
        let expected: Vec<f32> = q.iter().map(|&v| (f32::from(v) - 8.0) * d).collect();
        assert_dequant(GgmlType::Q4_0, &q4_0_block(d, &q), &expected);
    }
}

#[test]
fn q4_1_dequant_adds_the_min() {
    let mut rng = Rng::new(41);
    for _ in 0..50 {
        let (d, m) = (f16_scale(&mut rng), f16_scale(&mut rng));
        let q: [u8; 32] = rng.array(|r| r.below(16) as u8);
        let expected: Vec<f32> = q.iter().map(|&v| f32::from(v) * d + m).collect();
        assert_dequant(GgmlType::Q4_1, &q4_1_block(d, m, &q), &expected);
    }
}

#[test]
fn q4_k_scales_unpack_from_hand_packed_bytes() {
    // Scales and mins chosen to use every bit, including the two top bits of 4..8.
    let sc = [1, 2, 3, 4, 17, 33, 50, 63];
    let m = [5, 6, 7, 8, 20, 40, 60, 63];
    // Packed by hand: e.g. byte 0 = scale 0 (1) | top bits of scale 4 (17 >> 4 = 1) << 6;
    // byte 8 = low nibbles of scale 4 (1) and min 4 (20 & 15 = 4).
    let packed = [0x41, 0x82, 0xC3, 0xC4, 0x45, 0x86, 0xC7, 0xC8, 0x41, 0x81, 0xC2, 0xFF];
    assert_eq!(q4_k_scales(&sc, &m), packed);
    for j in 0..8 {
        assert_eq!(q4_k_scale_min(j, &packed), (sc[j], m[j]), "sub-block {j}");
    }
}

#[test]
fn q4_k_dequant_matches_llama_cpp() {
    let mut rng = Rng::new(12);
    for _ in 0..30 {
        let (d, dmin) = (f16_scale(&mut rng), f16_scale(&mut rng));
        let sc: [u8; 8] = rng.array(|r| r.below(64) as u8);
        let m: [u8; 8] = rng.array(|r| r.below(64) as u8);
        let q: [u8; 256] = rng.array(|r| r.below(16) as u8);
        // dequantize_row_q4_K: d1 = d * sc; m1 = min * m; y = d1 * q - m1.
        let expected: Vec<f32> =
            (0..256).map(|i| d * f32::from(sc[i / 32]) * f32::from(q[i]) - dmin * f32::from(m[i / 32])).collect();
        assert_dequant(GgmlType::Q4_K, &q4_k_block(d, dmin, &sc, &m, &q), &expected);
    }
}

#[test]
fn q6_k_dequant_matches_llama_cpp() {
    let mut rng = Rng::new(14);
    for _ in 0..30 {
        let d = f16_scale(&mut rng);
        let sc: [i8; 16] = rng.array(|r| r.next_u64() as i8);
        let q: [i8; 256] = rng.array(|r| r.below(64) as i8 - 32);
        // dequantize_row_q6_K: y = d * sc[is] * q, one 8-bit scale per 16 values.
        let expected: Vec<f32> = (0..256).map(|i| d * f32::from(sc[i / 16]) * f32::from(q[i])).collect();
        assert_dequant(GgmlType::Q6_K, &q6_k_block(d, &sc, &q), &expected);
    }
}

/// For every position, a block whose only non-zero quant is there must dequantise to
/// a single 1.0 at that position: the most direct check of where each quant lives.
#[test]
fn one_hot_quants_land_where_they_belong() {
    let one_hot = |i: usize, n: usize| -> Vec<f32> { (0..n).map(|j| if j == i { 1.0 } else { 0.0 }).collect() };
    for i in 0..32 {
        let q: [u8; 32] = std::array::from_fn(|j| if j == i { 9 } else { 8 });
        assert_dequant(GgmlType::Q4_0, &q4_0_block(1.0, &q), &one_hot(i, 32));
        let q: [u8; 32] = std::array::from_fn(|j| u8::from(j == i));
        assert_dequant(GgmlType::Q4_1, &q4_1_block(1.0, 0.0, &q), &one_hot(i, 32));
        let q: [i8; 32] = std::array::from_fn(|j| i8::from(j == i));
        assert_dequant(GgmlType::Q8_0, &q8_0_block(1.0, &q), &one_hot(i, 32));
    }
    for i in 0..256 {
        let q: [u8; 256] = std::array::from_fn(|j| u8::from(j == i));
        assert_dequant(GgmlType::Q4_K, &q4_k_block(1.0, 0.0, &[1; 8], &[0; 8], &q), &one_hot(i, 256));
        let q: [i8; 256] = std::array::from_fn(|j| i8::from(j == i));
        assert_dequant(GgmlType::Q6_K, &q6_k_block(1.0, &[1; 16], &q), &one_hot(i, 256));
    }
}

#[test]
fn dequantize_checks_lengths_and_types() {
    let block = q8_0_block(1.0, &[1; 32]);
    let two = [block.clone(), q8_0_block(2.0, &[1; 32])].concat();
    assert_dequant(GgmlType::Q8_0, &two, &[[1.0; 32], [2.0; 32]].concat());

    let mut out = vec![0.0; 31];
    let e = dequantize_into(GgmlType::Q8_0, &block, &mut out).unwrap_err();
    assert!(e.to_string().contains("34 bytes do not hold 31 values"), "{e}");
    let e = dequantize_into(GgmlType::Q8_0, &block[..33], &mut [0.0; 32]).unwrap_err();
    assert!(e.to_string().contains("33 bytes"), "{e}");

    let q5_0 = GgmlType::from_id(6).unwrap();
    assert!(matches!(dequantize(q5_0, &[0; 22]), Err(Error::UnsupportedType(name)) if name == "Q5_0"));
}

#[test]
fn type_geometry_round_trips_through_ids_and_names() {
    for ty in GgmlType::SUPPORTED {
        assert_eq!(GgmlType::from_id(ty.id()).unwrap(), ty);
        assert_eq!(GgmlType::parse(&ty.name().to_lowercase()).unwrap(), ty);
        assert!(ty.is_supported());
    }
    // Bytes per block, from the block structs in ggml-common.h.
    let sizes =
        [(0, 1, 4), (1, 1, 2), (30, 1, 2), (8, 32, 34), (2, 32, 18), (3, 32, 20), (12, 256, 144), (14, 256, 210)];
    for (id, block, bytes) in sizes {
        let ty = GgmlType::from_id(id).unwrap();
        assert_eq!((ty.block_len(), ty.block_bytes()), (block, bytes), "{ty}");
    }
    assert_eq!(GgmlType::Q4_K.bytes_for(512), Some(288));
    assert_eq!(GgmlType::Q4_K.bytes_for(100), None);
    assert!(GgmlType::from_id(4).is_err(), "4 was Q4_2, removed from ggml");
}

// Q8_0 quantisation.

/// The rule, spelled out: per 32 values amax = max |x|, d = amax / 127 (f32),
/// id = 1/d (0 when d is 0), stored d = f16(d) rounded to nearest even,
/// q = round-half-away-from-zero(x * id).
fn q8_0_by_the_rule(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for block in x.chunks(32) {
        let mut amax = 0f32;
        for v in block {
            if v.abs() > amax {
                amax = v.abs();
            }
        }
        let d = amax / 127.0;
        let id = if d == 0.0 { 0.0 } else { 1.0 / d };
        out.extend(f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|v| (v * id).round() as i8 as u8));
    }
    out
}

/// 32 values: `head`, then zeros.
fn block_of(head: &[f32]) -> Vec<f32> {
    let mut x = head.to_vec();
    x.resize(32, 0.0);
    x
}

/// The expected Q8_0 block: f16 bits of d, then `head` quants, then zeros.
fn q8_0_expected(d_bits: u16, head: &[i8]) -> Vec<u8> {
    let mut q = [0i8; 32];
    q[..head.len()].copy_from_slice(head);
    let mut b = d_bits.to_le_bytes().to_vec();
    b.extend(q.iter().map(|&v| v as u8));
    b
}

#[test]
fn q8_0_quantises_hand_computed_vectors() {
    let cases: &[(&str, &[f32], u16, &[i8])] = &[
        // d = 1 exactly: halves round away from zero (63.5 -> 64, 2.5 -> 3, not 2).
        (
            "amax 127",
            &[127.0, 63.5, -63.5, 0.5, -0.5, 1.5, 2.5, -2.5, 0.49],
            0x3C00,
            &[127, 64, -64, 1, -1, 2, 3, -3, 0],
        ),
        // d = 2: x = 0.5 * d ties (1, 3, -5) round away from zero; 0.5 is a quarter.
        ("amax 254", &[254.0, 1.0, 3.0, -5.0, 0.5, -254.0], 0x4000, &[127, 1, 2, -3, 0, -127]),
        // amax taken from a negative value: d = 0.5.
        ("negative amax", &[-63.5, 31.75, -0.25], 0x3800, &[-127, 64, -1]),
        ("all zero", &[], 0x0000, &[]),
        // d = 1/127 is stored as f16 0x2008 (0.0078735...), but q uses the f32 d:
        // 0.7913 * 127 = 100.495 -> 100, where 0.7913 / f16(d) = 100.501 would give 101.
        ("f16 d differs from f32 d", &[1.0, 0.7913, -1.0], 0x2008, &[127, 100, -127]),
        // d = 1 + 2^-11, halfway between two f16s: to even (1.0), not up.
        ("d ties to even, down", &[127.0 * (1.0 + 1.0 / 2048.0)], 0x3C00, &[127]),
        // d = 1 + 3 * 2^-11, halfway again: to even is up this time.
        ("d ties to even, up", &[127.0 * (1.0 + 3.0 / 2048.0)], 0x3C02, &[127]),
    ];
    for &(name, head, d_bits, q) in cases {
        let x = block_of(head);
        let expected = q8_0_expected(d_bits, q);
        assert_eq!(q8_0_by_the_rule(&x), expected, "{name}: the rule itself");
        assert_eq!(quantize_q8_0(&x), expected, "{name}");
    }
}

#[test]
fn q8_0_quantises_f16_inputs() {
    // 254, 1, 3, -5, 0.5 as f16 bits, widened to f32 as a model's F16 weights would be.
    let bits: [u16; 5] = [0x5BF0, 0x3C00, 0x4200, 0xC500, 0x3800];
    let head: Vec<f32> = bits.iter().map(|&b| f16::from_bits(b).to_f32()).collect();
    assert_eq!(quantize_q8_0(&block_of(&head)), q8_0_expected(0x4000, &[127, 1, 2, -3, 0]));
}

#[test]
fn q8_0_quantises_each_block_on_its_own() {
    let x = [block_of(&[127.0, 0.5]), block_of(&[-254.0, 3.0])].concat();
    let expected = [q8_0_expected(0x3C00, &[127, 1]), q8_0_expected(0x4000, &[-127, 2])].concat();
    assert_eq!(quantize_q8_0(&x), expected);
}

#[test]
fn q8_0_matches_the_rule_on_random_blocks() {
    let mut rng = Rng::new(80);
    for _ in 0..500 {
        // Magnitudes from tiny to large, and some exact halves of the step.
        let scale = 2f32.powi(rng.below(40) as i32 - 20);
        let x: Vec<f32> = (0..64)
            .map(|_| match rng.below(4) {
                0 => (rng.below(255) as f32 - 127.0) * 0.5 * scale,
                _ => rng.f32_in(-1.0, 1.0) * scale,
            })
            .collect();
        assert_eq!(quantize_q8_0(&x), q8_0_by_the_rule(&x), "scale {scale}, x {x:?}");
    }
}

/// A block that `quantize_q8_0` produced dequantises to values that quantise back to it:
/// its amax is d * 127 exactly, so d and every q are recovered.
#[test]
fn q8_0_requantising_its_own_output_is_stable() {
    let mut rng = Rng::new(81);
    for _ in 0..500 {
        let scale = 2f32.powi(rng.below(30) as i32 - 15);
        let x: Vec<f32> = (0..32 * 4).map(|_| rng.f32_in(-1.0, 1.0) * scale).collect();
        let q = quantize_q8_0(&x);
        let y = dequantize(GgmlType::Q8_0, &q).unwrap();
        assert_eq!(quantize_q8_0(&y), q, "scale {scale}");
    }
}

#[test]
#[should_panic(expected = "multiple of 32")]
fn q8_0_refuses_a_partial_block() {
    quantize_q8_0(&[0.0; 31]);
}
