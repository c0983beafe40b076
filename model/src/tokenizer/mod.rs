//! Text to token ids and back: byte-level BPE (`tokenizer.ggml.model = gpt2`) read
//! from GGUF metadata, reproducing llama.cpp's tokenization exactly.
//!
//! Encoding goes: special tokens are cut out of the text (`partition`), the rest is
//! split into words by the pre-tokenizer regexes (`pretokenize`), and each word is
//! merged by BPE rank (`bpe`). Decoding maps each token back to its bytes through
//! GPT-2's byte map (`bytes`); [`TextStream`] does it incrementally.

mod bpe;
mod bytes;
mod partition;
mod pretokenize;
mod special;
mod stream;
mod vocab;

#[cfg(test)]
mod tests;

pub use stream::TextStream;

use bpe::{Bpe, Scratch};
use partition::Fragment;
use pretokenize::PreTokenizer;
use special::SpecialTokens;
use vocab::{TokenKind, Vocab};

use crate::gguf::Gguf;
use crate::{Error, Result};

const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_MERGES: &str = "tokenizer.ggml.merges";

/// A GGUF model's tokenizer.
pub struct Tokenizer {
    vocab: Vocab,
    pre: PreTokenizer,
    bpe: Bpe,
    special: SpecialTokens,
    /// Special tokens in the order they are cut out of text.
    special_order: Vec<u32>,
    /// Each token's bytes, rendered once.
    pieces: Vec<Box<[u8]>>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab.len())
            .field("special", &self.special)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Reads the tokenizer from `tokenizer.ggml.*` metadata. Only byte-level BPE
    /// (`gpt2`) vocabularies are supported.
    pub fn from_gguf(gguf: &Gguf) -> Result<Tokenizer> {
        let model = gguf.require_str(KEY_MODEL)?;
        if model != "gpt2" {
            return Err(Error::Tokenizer(format!("unsupported tokenizer model `{model}` (supported: gpt2)")));
        }
        let pre_name = gguf.get_str(KEY_PRE)?;
        let pre = PreTokenizer::new(pre_name)?;
        let mut vocab = Vocab::from_gguf(gguf)?;
        let merges = vocab::strings(gguf, KEY_MERGES)?;
        let bpe = Bpe::new(&merges, &vocab, pre.ignore_merges);
        // Resolving special ids can change token kinds, which the rest depends on.
        let special = SpecialTokens::resolve(gguf, &mut vocab, pre.add_bos)?;
        let special_order = partition::match_order(&vocab);
        let pieces = (0..vocab.len() as u32).map(|id| vocab.piece(id).into_boxed_slice()).collect();
        tracing::debug!(
            vocab = vocab.len(),
            merges = merges.len(),
            pre = pre_name.unwrap_or("default"),
            specials = special_order.len(),
            eog = ?special.eog,
            "tokenizer loaded"
        );
        Ok(Tokenizer { vocab, pre, bpe, special, special_order, pieces })
    }

    /// Token ids of `text`; no BOS is added here. With `parse_special`, control tokens
    /// written in the text (e.g. `<|im_start|>`) become their ids; without it they are
    /// tokenized as plain text. User-defined tokens are recognised either way.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 1);
        let mut scratch = Scratch::default();
        for fragment in partition::partition(text, &self.special_order, &self.vocab, parse_special) {
            match fragment {
                Fragment::Token(id) => ids.push(id),
                Fragment::Text(t) => {
                    for word in self.pre.split(t)? {
                        self.bpe.encode_word(word, &self.vocab, &mut scratch, &mut ids);
                    }
                }
            }
        }
        Ok(ids)
    }

    /// The BOS id if prompts should start with one (`tokenizer.ggml.add_bos_token`, or
    /// llama.cpp's default for the pre-tokenizer), else `None`.
    pub fn bos_to_add(&self) -> Option<u32> {
        self.special.bos.filter(|_| self.special.add_bos)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.special.bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.special.eos
    }

    /// The end-of-turn id (`<|im_end|>`, `<|eot_id|>`...), from the file or found by text.
    pub fn eot_id(&self) -> Option<u32> {
        self.special.eot
    }

    /// True for tokens that end generation: EOS, EOT, EOM and the tokens llama.cpp
    /// recognises by text (`<|im_end|>`, `<|endoftext|>`, FIM pad/repo/separator...).
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.special.eog.contains(&id)
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// The bytes of one token: special tokens as written (like llama.cpp's
    /// `token_to_piece` with `special = true`), others byte-decoded. Empty for ids out
    /// of range.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.pieces.get(id as usize).map_or(&[], |p| p)
    }

    /// True for control tokens (`<|im_end|>`, BOS, EOS...), which text never spells: a
    /// grammar cannot produce them by writing their text.
    pub fn is_control(&self, id: u32) -> bool {
        id < self.vocab.len() as u32 && matches!(self.vocab.kind(id), TokenKind::Control | TokenKind::Unknown)
    }

    /// The whole text of `ids` (invalid UTF-8 becomes U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids.iter().flat_map(|&id| self.token_bytes(id)).copied().collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// A decoder that takes ids one at a time and returns only complete characters.
    pub fn stream(&self) -> TextStream<'_> {
        TextStream::new(self)
    }
}
