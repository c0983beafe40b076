//! Grammar-constrained sampling: a JSON schema or a Lark grammar, compiled by llguidance
//! (the engine llama.cpp uses) over this model's vocabulary, becomes at each step the set
//! of tokens that keep the output inside the grammar. The set is a bitmask over the
//! vocabulary (bit `v % 32` of word `v / 32`), the shape a sampler applies to a logit row.
//!
//! The vocabulary is given to llguidance as each token's bytes; control tokens
//! (`<|im_end|>`...) are marked special, so no grammar writes them as text, and the token
//! that ends the answer (end of turn, else end of sequence) is allowed once the grammar
//! may end.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{InferenceCapabilities, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};

use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// A model's vocabulary as grammars see it; built once per model, shared by every request.
pub struct GrammarVocab {
    factory: ParserFactory,
    vocab_size: usize,
    end: u32,
}

impl std::fmt::Debug for GrammarVocab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarVocab").field("vocab_size", &self.vocab_size).field("end", &self.end).finish()
    }
}

/// llguidance's view of the tokenizer: the token trie, and tokenizing through our own BPE.
struct VocabEnv {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for VocabEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        // Grammar literals are text; bytes that are not UTF-8 cannot come from a grammar.
        self.tokenizer.encode(&String::from_utf8_lossy(s), false).unwrap_or_default()
    }
}

impl GrammarVocab {
    /// The vocabulary of `tokenizer`; a model without an end-of-turn or end-of-sequence
    /// token cannot end a constrained answer and is refused.
    pub fn new(tokenizer: Arc<Tokenizer>) -> Result<GrammarVocab> {
        let end = tokenizer
            .eot_id()
            .or(tokenizer.eos_id())
            .ok_or_else(|| Error::Grammar("the model has no end-of-turn or end-of-sequence token".into()))?;
        let vocab_size = tokenizer.vocab_size();
        let words: Vec<Vec<u8>> = (0..vocab_size as u32)
            .map(|id| {
                let bytes = tokenizer.token_bytes(id);
                if tokenizer.is_control(id) {
                    let mut marked = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    marked.extend_from_slice(bytes);
                    marked
                } else {
                    bytes.to_vec()
                }
            })
            .collect();
        let trie = TokTrie::from(&TokRxInfo::new(vocab_size as u32, end), &words);
        let env: TokEnv = Arc::new(VocabEnv { trie, tokenizer });
        let factory = ParserFactory::new(
            &env,
            InferenceCapabilities::default(),
            &llguidance::earley::SlicedBiasComputer::general_slices(),
        )
        .map_err(|e| Error::Grammar(format!("building the vocabulary's token trie: {e}")))?;
        tracing::debug!(vocab_size, end, "grammar vocabulary built");
        Ok(GrammarVocab { factory, vocab_size, end })
    }

    /// The token that ends a constrained answer.
    pub fn end_token(&self) -> u32 {
        self.end
    }

    /// Bitmask words per step: one bit per token.
    pub fn mask_words(&self) -> usize {
        self.vocab_size.div_ceil(32)
    }

    /// Output that is one JSON value valid against `schema` (`{"type": "object"}` for any
    /// object), written with [`with_separators`]; a schema llguidance cannot compile is an
    /// error naming why.
    pub fn json_schema(&self, schema: &serde_json::Value) -> Result<Constraint> {
        self.constraint(TopLevelGrammar::from_json_schema(with_separators(schema)))
    }

    /// Output that `lark` (llguidance's Lark dialect, which embeds schemas as
    /// `%json { ... }`) accepts.
    pub fn lark(&self, lark: &str) -> Result<Constraint> {
        self.constraint(TopLevelGrammar::from_lark(lark.to_owned()))
    }

    fn constraint(&self, grammar: TopLevelGrammar) -> Result<Constraint> {
        let parser = self.factory.create_parser(grammar).map_err(|e| Error::Grammar(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(Error::Grammar(e));
        }
        Ok(Constraint { matcher, words: self.mask_words(), end: self.end })
    }
}

/// One sequence's grammar state: what it allows next, advanced token by token.
pub struct Constraint {
    matcher: Matcher,
    words: usize,
    end: u32,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").field("finished", &self.matcher.is_stopped()).finish()
    }
}

impl Clone for Constraint {
    /// An independent copy, at the same point of the grammar.
    fn clone(&self) -> Constraint {
        Constraint { matcher: self.matcher.deep_clone(), words: self.words, end: self.end }
    }
}

impl Constraint {
    /// The tokens allowed next, as bitmask words over the vocabulary. Once the grammar is
    /// complete only the end token is allowed.
    pub fn allowed(&mut self) -> Result<Vec<u32>> {
        let mask = self.matcher.compute_mask_or_eos().map_err(|e| Error::Grammar(e.to_string()))?;
        let mut words = mask.as_slice().to_vec();
        words.resize(self.words, 0);
        Ok(words)
    }

    /// Takes the sampled `token`; a token the mask did not allow is an error.
    pub fn advance(&mut self, token: u32) -> Result<()> {
        if token == self.end && self.is_complete() {
            return Ok(());
        }
        self.matcher.consume_token(token).map_err(|e| Error::Grammar(format!("token {token}: {e}")))
    }

    /// Whether the output is a whole sentence of the grammar (the end token may follow).
    pub fn is_complete(&mut self) -> bool {
        self.matcher.is_stopped() || self.matcher.is_accepting().unwrap_or(false)
    }

    /// The token that ends the answer.
    pub fn end_token(&self) -> u32 {
        self.end
    }
}

/// `schema` with fixed separators (`", "` and `": "`, as `json.dumps` writes and models
/// have seen most) and no other whitespace, unless it sets its own llguidance options
/// (`x-guidance`): free whitespace would let a small model wander in blank lines until
/// its token limit. `true` and `false` become the schemas they stand for.
pub fn with_separators(schema: &serde_json::Value) -> serde_json::Value {
    use serde_json::{Value, json};
    let mut schema = match schema {
        Value::Bool(true) => json!({}),
        Value::Bool(false) => json!({ "not": {} }),
        other => other.clone(),
    };
    if let Some(object) = schema.as_object_mut()
        && !object.contains_key("x-guidance")
    {
        object.insert(
            "x-guidance".into(),
            json!({ "whitespace_flexible": false, "item_separator": ", ", "key_separator": ": " }),
        );
    }
    schema
}

/// Whether bit `token` is set in `mask`.
pub fn allows(mask: &[u32], token: u32) -> bool {
    mask.get(token as usize / 32).is_some_and(|w| w >> (token % 32) & 1 == 1)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::gguf::Gguf;

    const SMOLLM2: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/SmolLM2-135M-Instruct.Q4_1.gguf");

    fn vocab() -> (Arc<Tokenizer>, GrammarVocab) {
        assert!(std::path::Path::new(SMOLLM2).exists(), "{SMOLLM2} is missing: the set-up script fetches it");
        let gguf = Gguf::open(SMOLLM2).unwrap();
        let tokenizer = Arc::new(Tokenizer::from_gguf(&gguf).unwrap());
        let vocab = GrammarVocab::new(tokenizer.clone()).unwrap();
        (tokenizer, vocab)
    }

    /// The lowest allowed token whose bytes continue `target` from `at`: a sampler that
    /// wants `target` and obeys the mask.
    fn steer(tok: &Tokenizer, mask: &[u32], target: &[u8], at: usize) -> Option<u32> {
        (0..tok.vocab_size() as u32)
            .filter(|&t| allows(mask, t))
            .filter(|&t| {
                let b = tok.token_bytes(t);
                !b.is_empty() && target[at..].starts_with(b)
            })
            .max_by_key(|&t| tok.token_bytes(t).len())
    }

    #[test]
    fn a_schema_s_mask_admits_valid_json_and_refuses_the_rest() {
        let (tok, vocab) = vocab();
        let schema = json!({ "type": "object", "properties": {
            "city": { "type": "string" }, "days": { "type": "integer" } },
            "required": ["city", "days"], "additionalProperties": false });
        let mut c = vocab.json_schema(&schema).unwrap();
        let first = c.allowed().unwrap();
        assert_eq!(first.len(), vocab.mask_words());
        // The object and its first key are forced (the schema orders its required keys):
        // their text's first token is allowed, a letter or the end token is not.
        let brace = tok.encode(r#"{"city": ""#, false).unwrap()[0];
        let letter = tok.encode("x", false).unwrap()[0];
        assert!(allows(&first, brace) && !allows(&first, letter) && !allows(&first, vocab.end_token()));
        // Steering token by token through a valid object, every step allows the next piece.
        let target = br#"{"city": "Oslo", "days": 3}"#;
        let mut at = 0;
        while at < target.len() {
            let mask = c.allowed().unwrap();
            let t = steer(&tok, &mask, target, at)
                .unwrap_or_else(|| panic!("nothing allowed continues {:?}", String::from_utf8_lossy(&target[at..])));
            c.advance(t).unwrap();
            at += tok.token_bytes(t).len();
        }
        assert!(c.is_complete());
        assert!(allows(&c.allowed().unwrap(), vocab.end_token()), "the end token may follow a whole object");

        // A string where an integer goes is refused.
        let mut c = vocab.json_schema(&schema).unwrap();
        for t in tok.encode(r#"{"city": "Oslo", "days": "#, false).unwrap() {
            assert!(allows(&c.allowed().unwrap(), t), "{:?} refused", tok.token_bytes(t));
            c.advance(t).unwrap();
        }
        let quote = tok.encode("\"", false).unwrap()[0];
        assert!(!allows(&c.allowed().unwrap(), quote), "a string where the schema wants an integer");
        assert!(c.advance(quote).is_err());
    }

    #[test]
    fn lark_grammars_and_bad_grammars() {
        let (tok, vocab) = vocab();
        let mut c = vocab.lark(r#"start: "yes" | "no""#).unwrap();
        let y = tok.encode("yes", false).unwrap();
        assert!(y.iter().all(|&t| {
            let ok = allows(&c.allowed().unwrap(), t);
            c.advance(t).unwrap();
            ok
        }));
        assert!(c.is_complete());
        let e = vocab.lark("start: (").unwrap_err();
        assert!(matches!(e, Error::Grammar(_)), "{e}");
        let e = vocab.json_schema(&json!({ "type": "no-such-type" })).unwrap_err();
        assert!(matches!(e, Error::Grammar(_)), "{e}");
    }
}
