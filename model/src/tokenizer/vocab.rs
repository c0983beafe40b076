//! The token list and per-token kinds, as stored in `tokenizer.ggml.*`.

use std::collections::HashMap;

use super::bytes;
use crate::gguf::{Gguf, Value};
use crate::{Error, Result};

const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";

/// `tokenizer.ggml.token_type`, i.e. llama.cpp's `LLAMA_TOKEN_TYPE_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenKind {
    Undefined,
    Normal,
    Unknown,
    /// Markup such as `<|im_start|>`: only recognised in text when asked to.
    Control,
    /// Added tokens that are always recognised in text, even as plain text.
    UserDefined,
    Unused,
    /// `<0xXX>` byte fallback tokens.
    Byte,
}

impl TokenKind {
    fn from_type_id(t: i64) -> Self {
        match t {
            1 => TokenKind::Normal,
            2 => TokenKind::Unknown,
            3 => TokenKind::Control,
            4 => TokenKind::UserDefined,
            5 => TokenKind::Unused,
            6 => TokenKind::Byte,
            _ => TokenKind::Undefined,
        }
    }

    /// Tokens matched verbatim in text before pre-tokenization.
    pub(crate) fn is_special(self) -> bool {
        matches!(self, TokenKind::Control | TokenKind::UserDefined | TokenKind::Unknown)
    }
}

pub(crate) struct Vocab {
    texts: Vec<String>,
    kinds: Vec<TokenKind>,
    ids: HashMap<String, u32>,
}

impl Vocab {
    pub(crate) fn from_gguf(gguf: &Gguf) -> Result<Self> {
        let tokens = strings(gguf, KEY_TOKENS)?;
        if u32::try_from(tokens.len()).is_err() {
            return Err(Error::Tokenizer(format!("{} tokens do not fit 32-bit ids", tokens.len())));
        }
        let mut texts = Vec::with_capacity(tokens.len());
        let mut ids = HashMap::with_capacity(tokens.len());
        for (i, text) in tokens.into_iter().enumerate() {
            // llama.cpp renames empty tokens so that every text maps back to one id.
            let text = if text.is_empty() { format!("[EMPTY_{i}]") } else { text.to_owned() };
            if let Some(first) = ids.insert(text.clone(), i as u32) {
                return Err(Error::Tokenizer(format!("duplicate token {text:?} has ids {first} and {i}")));
            }
            texts.push(text);
        }

        let kinds = match gguf.get(KEY_TOKEN_TYPE) {
            None => vec![TokenKind::Normal; texts.len()],
            Some(v) => {
                let types = v.as_array().ok_or_else(|| key_type(KEY_TOKEN_TYPE, "array of i32", v))?;
                if types.len() < texts.len() {
                    return Err(Error::Tokenizer(format!(
                        "{KEY_TOKEN_TYPE} has {} entries for {} tokens",
                        types.len(),
                        texts.len()
                    )));
                }
                types
                    .iter()
                    .take(texts.len())
                    .map(|t| {
                        t.as_i64()
                            .map(TokenKind::from_type_id)
                            .ok_or_else(|| key_type(KEY_TOKEN_TYPE, "array of i32", t))
                    })
                    .collect::<Result<_>>()?
            }
        };
        Ok(Vocab { texts, kinds, ids })
    }

    pub(crate) fn len(&self) -> usize {
        self.texts.len()
    }

    pub(crate) fn text(&self, id: u32) -> &str {
        &self.texts[id as usize]
    }

    pub(crate) fn kind(&self, id: u32) -> TokenKind {
        self.kinds[id as usize]
    }

    pub(crate) fn set_kind(&mut self, id: u32, kind: TokenKind) {
        self.kinds[id as usize] = kind;
    }

    pub(crate) fn id(&self, text: &str) -> Option<u32> {
        self.ids.get(text).copied()
    }

    /// Ids with their texts, in id order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u32, &str)> {
        self.texts.iter().enumerate().map(|(i, t)| (i as u32, t.as_str()))
    }

    /// The bytes a token stands for, as llama.cpp's `token_to_piece` with `special = true`:
    /// special tokens as written, normal ones through the byte map, unused ones as nothing.
    pub(crate) fn piece(&self, id: u32) -> Vec<u8> {
        let text = self.text(id);
        match self.kind(id) {
            TokenKind::Control | TokenKind::UserDefined | TokenKind::Unknown => text.as_bytes().to_vec(),
            TokenKind::Normal => {
                let mut out = Vec::with_capacity(text.len());
                for c in text.chars() {
                    match bytes::char_to_byte(c) {
                        Some(b) => out.push(b),
                        // Not in GPT-2's map (a hand-added token): keep the character itself.
                        None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                    }
                }
                out
            }
            TokenKind::Byte => parse_byte_token(text).map(|b| vec![b]).unwrap_or_default(),
            TokenKind::Unused | TokenKind::Undefined => Vec::new(),
        }
    }
}

/// `<0x0A>` -> 0x0A.
fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    u8::from_str_radix(hex, 16).ok()
}

/// The required string-array metadata `key`.
pub(super) fn strings<'g>(gguf: &'g Gguf, key: &str) -> Result<Vec<&'g str>> {
    let v = gguf.require(key)?;
    let items = v.as_array().ok_or_else(|| key_type(key, "array of strings", v))?;
    items.iter().map(|item| item.as_str().ok_or_else(|| key_type(key, "array of strings", item))).collect()
}

fn key_type(key: &str, expected: &'static str, found: &Value) -> Error {
    Error::KeyType { key: key.to_owned(), expected, found: found.type_name() }
}
