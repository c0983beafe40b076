//! GPT-2's byte <-> character map.
//!
//! Byte-level BPE vocabularies never store raw bytes: every byte is written as one
//! printable character, so that a token is a plain string. Printable Latin-1 bytes stand
//! for themselves; the other 68 bytes (controls, space, DEL, NBSP, soft hyphen) are
//! shifted, in order, to U+0100..U+0143 (space becomes `Ġ`, newline `Ċ`).

/// Bytes that GPT-2 keeps as their own Latin-1 character.
const fn is_printable(b: u8) -> bool {
    matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// First code point used for the shifted bytes.
const SHIFT_BASE: u32 = 0x100;
/// How many bytes are shifted.
const N_SHIFTED: usize = 68;

const BYTE_TO_CHAR: [char; 256] = {
    let mut table = ['\0'; 256];
    let mut shifted = 0;
    let mut b = 0;
    while b < 256 {
        let cp = if is_printable(b as u8) {
            b as u32
        } else {
            shifted += 1;
            SHIFT_BASE + shifted - 1
        };
        table[b] = match char::from_u32(cp) {
            Some(c) => c,
            None => panic!("GPT-2 byte map produced an invalid code point"),
        };
        b += 1;
    }
    table
};

/// The shifted bytes in order: `SHIFTED_BYTES[i]` is written as U+0100 + i.
const SHIFTED_BYTES: [u8; N_SHIFTED] = {
    let mut table = [0u8; N_SHIFTED];
    let mut n = 0;
    let mut b = 0;
    while b < 256 {
        if !is_printable(b as u8) {
            table[n] = b as u8;
            n += 1;
        }
        b += 1;
    }
    table
};

/// The character that stands for `byte` in a vocabulary.
pub(crate) fn byte_to_char(byte: u8) -> char {
    BYTE_TO_CHAR[byte as usize]
}

/// The byte a vocabulary character stands for; `None` for characters outside the map.
pub(crate) fn char_to_byte(c: char) -> Option<u8> {
    let cp = c as u32;
    if cp < 0x100 && is_printable(cp as u8) {
        return Some(cp as u8);
    }
    let i = cp.checked_sub(SHIFT_BASE)? as usize;
    SHIFTED_BYTES.get(i).copied()
}

/// A raw string written the way the vocabulary writes it (`" hi"` becomes `"Ġhi"`).
pub(crate) fn encode(raw: &[u8]) -> String {
    raw.iter().map(|&b| byte_to_char(b)).collect()
}
