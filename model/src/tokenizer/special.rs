//! Special token ids (BOS, EOS, end of turn...) and the end-of-generation set.
//!
//! GGUF files name only some of these ids; llama.cpp fills the gaps by recognising
//! well-known token texts and forces those tokens to be control tokens. Both the
//! partitioning of text and which tokens stop generation depend on the result, so the
//! rules below follow llama.cpp's `llama_vocab::impl::load` closely.

use std::collections::BTreeSet;

use super::vocab::{TokenKind, Vocab};
use crate::gguf::Gguf;
use crate::{Error, Result};

/// llama.cpp's default BOS and EOS for `gpt2` vocabularies that name none.
const BPE_DEFAULT_BOS_EOS: u32 = 11;

const KEY_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";

/// End-of-turn texts, tried when `tokenizer.ggml.eot_token_id` is absent.
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];
const EOM_TEXTS: &[&str] = &["<|eom_id|>"];
const FIM_PRE_TEXTS: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
];
const FIM_SUF_TEXTS: &[&str] = &[
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
];
const FIM_MID_TEXTS: &[&str] = &[
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
    "<|middle|>",
];
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_TEXTS: &[&str] = &["<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];

/// Texts of tokens that end generation whatever the metadata says.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];

/// gpt-oss markup that llama.cpp always renders, whatever the file says.
const ALWAYS_USER_DEFINED: &[&str] = &["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"];

/// The resolved special ids of a vocabulary.
#[derive(Debug, Clone)]
pub(crate) struct SpecialTokens {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub eot: Option<u32>,
    /// Whether a BOS is put in front of a prompt.
    pub add_bos: bool,
    /// Tokens that end generation.
    pub eog: BTreeSet<u32>,
}

/// One id slot: its metadata key and, for some, texts that identify it when the key is absent.
struct Slot {
    key: &'static str,
    texts: &'static [&'static str],
}

const BOS: Slot = Slot { key: "tokenizer.ggml.bos_token_id", texts: &[] };
const EOS: Slot = Slot { key: "tokenizer.ggml.eos_token_id", texts: &[] };
const EOT: Slot = Slot { key: "tokenizer.ggml.eot_token_id", texts: EOT_TEXTS };
const EOM: Slot = Slot { key: "tokenizer.ggml.eom_token_id", texts: EOM_TEXTS };
const FIM_PRE: Slot = Slot { key: "tokenizer.ggml.fim_pre_token_id", texts: FIM_PRE_TEXTS };
const FIM_SUF: Slot = Slot { key: "tokenizer.ggml.fim_suf_token_id", texts: FIM_SUF_TEXTS };
const FIM_MID: Slot = Slot { key: "tokenizer.ggml.fim_mid_token_id", texts: FIM_MID_TEXTS };
const FIM_PAD: Slot = Slot { key: "tokenizer.ggml.fim_pad_token_id", texts: FIM_PAD_TEXTS };
const FIM_REP: Slot = Slot { key: "tokenizer.ggml.fim_rep_token_id", texts: FIM_REP_TEXTS };
const FIM_SEP: Slot = Slot { key: "tokenizer.ggml.fim_sep_token_id", texts: FIM_SEP_TEXTS };

impl SpecialTokens {
    /// Resolves the ids and adjusts token kinds in `vocab` the way llama.cpp does.
    /// `add_bos_default` is the pre-tokenizer's default, overridden by the file.
    pub(crate) fn resolve(gguf: &Gguf, vocab: &mut Vocab, add_bos_default: bool) -> Result<Self> {
        let n = vocab.len();
        let default = (BPE_DEFAULT_BOS_EOS as usize) < n;
        let bos = metadata_id(gguf, &BOS, n, default.then_some(BPE_DEFAULT_BOS_EOS))?;
        let eos = metadata_id(gguf, &EOS, n, default.then_some(BPE_DEFAULT_BOS_EOS))?;

        let add_bos = gguf.get_bool(KEY_ADD_BOS)?.unwrap_or(add_bos_default);
        if add_bos && bos.is_none() {
            return Err(Error::Tokenizer(format!("{KEY_ADD_BOS} is true, but {} is not set", BOS.key)));
        }

        let mut find = |slot: &Slot| -> Result<Option<u32>> {
            match metadata_id(gguf, slot, n, None)? {
                Some(id) => Ok(Some(id)),
                None => Ok(find_by_text(vocab, slot.texts)),
            }
        };
        let eot = find(&EOT)?;
        let eom = find(&EOM)?;
        // Fill-in-the-middle markers are looked up only so that they become control tokens.
        for slot in [&FIM_PRE, &FIM_SUF, &FIM_MID] {
            find(slot)?;
        }
        let fim_pad = find(&FIM_PAD)?;
        let fim_rep = find(&FIM_REP)?;
        let fim_sep = find(&FIM_SEP)?;

        let mut eog: BTreeSet<u32> = [fim_pad, fim_rep, fim_sep].into_iter().flatten().collect();
        let by_text: Vec<u32> = vocab.iter().filter(|(_, text)| EOG_TEXTS.contains(text)).map(|(id, _)| id).collect();
        for id in by_text {
            make_control(vocab, id);
            eog.insert(id);
        }
        for &text in ALWAYS_USER_DEFINED {
            if let Some(id) = vocab.id(text) {
                vocab.set_kind(id, TokenKind::UserDefined);
            }
        }
        eog.extend([eos, eot, eom].into_iter().flatten());
        drop_harmony_end(vocab, &mut eog);
        drop_gemma_s(vocab, &mut eog);

        Ok(SpecialTokens { bos, eos, eot, add_bos, eog })
    }
}

/// The id a metadata key names; out-of-range ids keep the default, as in llama.cpp.
fn metadata_id(gguf: &Gguf, slot: &Slot, n_vocab: usize, default: Option<u32>) -> Result<Option<u32>> {
    let Some(id) = gguf.get_u64(slot.key)? else {
        return Ok(default);
    };
    if id >= n_vocab as u64 {
        tracing::warn!(key = slot.key, id, n_vocab, "special token id out of range, ignored");
        return Ok(default);
    }
    Ok(Some(id as u32))
}

/// The lowest id whose text is one of `texts`; it becomes a control token.
fn find_by_text(vocab: &mut Vocab, texts: &[&str]) -> Option<u32> {
    let id = vocab.iter().find(|(_, text)| texts.contains(text)).map(|(id, _)| id)?;
    make_control(vocab, id);
    Some(id)
}

fn make_control(vocab: &mut Vocab, id: u32) {
    if vocab.kind(id) != TokenKind::Control {
        tracing::debug!(id, text = vocab.text(id), "control-looking token made a control token");
        vocab.set_kind(id, TokenKind::Control);
    }
}

/// In o200k_harmony (gpt-oss) and solar-open vocabularies `<|end|>` ends a message, not
/// the generation: llama.cpp drops it when the vocabulary also has `<|return|>`/`<|call|>`
/// or `<|calls|>`/`<|flush|>`.
fn drop_harmony_end(vocab: &mut Vocab, eog: &mut BTreeSet<u32>) {
    let has = |eog: &BTreeSet<u32>, texts: &[&str]| eog.iter().any(|&id| texts.contains(&vocab.text(id)));
    let end = eog.iter().copied().find(|&id| vocab.text(id) == "<|end|>");
    let has_return = has(eog, &["<|return|>"]);
    let has_call = has(eog, &["<|call|>", "<|calls|>"]);
    let has_flush = has(eog, &["<|flush|>"]);
    if let Some(end) = end
        && has_call
        && (has_return || has_flush)
    {
        eog.remove(&end);
        vocab.set_kind(end, TokenKind::UserDefined);
    }
}

/// Gemma 4 and PaddleOCR use `</s>` inside turns; llama.cpp keeps generating past it
/// when the vocabulary has `<|tool_response>`.
fn drop_gemma_s(vocab: &mut Vocab, eog: &mut BTreeSet<u32>) {
    let s = eog.iter().copied().find(|&id| vocab.text(id) == "</s>");
    let has_tool_response = eog.iter().any(|&id| vocab.text(id) == "<|tool_response>");
    if let Some(s) = s
        && has_tool_response
    {
        eog.remove(&s);
        vocab.set_kind(s, TokenKind::Normal);
    }
}
