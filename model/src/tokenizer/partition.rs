//! Cutting special tokens such as `<|im_start|>` out of text before pre-tokenization.

use super::vocab::{TokenKind, Vocab};

/// A stretch of input: text still to be tokenized, or an already recognised token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fragment<'t> {
    Text(&'t str),
    Token(u32),
}

/// The special tokens of `vocab` in the order llama.cpp tries them: longest text first
/// (ties by id, so the order is reproducible).
pub(crate) fn match_order(vocab: &Vocab) -> Vec<u32> {
    let mut ids: Vec<u32> = vocab.iter().filter(|&(id, _)| vocab.kind(id).is_special()).map(|(id, _)| id).collect();
    ids.sort_by_key(|&id| std::cmp::Reverse(vocab.text(id).len()));
    ids
}

/// Splits `text` on special tokens as llama.cpp's `tokenizer_st_partition` does: each
/// token in `order` in turn cuts every occurrence out of the text that is left, so a
/// longer token wins over a shorter one wherever they overlap. With `parse_special`
/// false, control and unknown tokens stay text; user-defined tokens are still cut.
pub(crate) fn partition<'t>(text: &'t str, order: &[u32], vocab: &Vocab, parse_special: bool) -> Vec<Fragment<'t>> {
    let mut fragments = Vec::new();
    if text.is_empty() {
        return fragments;
    }
    fragments.push(Fragment::Text(text));
    let mut next = Vec::new();
    for &id in order {
        if !parse_special && matches!(vocab.kind(id), TokenKind::Control | TokenKind::Unknown) {
            continue;
        }
        let needle = vocab.text(id);
        let found = fragments.iter().any(|f| matches!(f, Fragment::Text(t) if t.contains(needle)));
        if !found {
            continue;
        }
        next.clear();
        for &fragment in &fragments {
            let Fragment::Text(t) = fragment else {
                next.push(fragment);
                continue;
            };
            let mut rest = 0;
            for (at, _) in t.match_indices(needle) {
                if at > rest {
                    next.push(Fragment::Text(&t[rest..at]));
                }
                next.push(Fragment::Token(id));
                rest = at + needle.len();
            }
            if rest < t.len() {
                next.push(Fragment::Text(&t[rest..]));
            }
        }
        std::mem::swap(&mut fragments, &mut next);
    }
    fragments
}
