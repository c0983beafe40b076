//! Byte-level BPE merging within one word.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use super::bytes;
use super::vocab::Vocab;

/// Marks a symbol whose text is not a token (a byte missing from the vocabulary).
const NO_TOKEN: u32 = u32::MAX;
/// End of the symbol list.
const NIL: usize = usize::MAX;

/// What two adjacent tokens merge into, and how early.
#[derive(Debug, Clone, Copy)]
struct Merge {
    rank: u32,
    id: u32,
}

/// The merge table (`tokenizer.ggml.merges`, rank = position) over token ids.
pub(crate) struct Bpe {
    merges: HashMap<(u32, u32), Merge>,
    /// The token of each single byte.
    byte_tokens: [u32; 256],
    /// A word that is a token already is emitted whole (Llama 3).
    ignore_merges: bool,
}

/// Per-call working memory, reused across the words of one `encode`.
#[derive(Default)]
pub(crate) struct Scratch {
    symbols: Vec<Symbol>,
    queue: BinaryHeap<Reverse<Candidate>>,
}

/// One symbol of a word being merged: a token, linked to its neighbours.
#[derive(Debug, Clone, Copy)]
struct Symbol {
    id: u32,
    prev: usize,
    next: usize,
    /// Merged into its left neighbour.
    gone: bool,
}

/// A merge that was possible when it was queued. Ordered by rank, then position, as in
/// llama.cpp; ids tell whether the pair has changed since.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Candidate {
    rank: u32,
    left: usize,
    left_id: u32,
    right_id: u32,
}

impl Bpe {
    /// `merges` are `"left right"` pairs, best first.
    pub(crate) fn new(merges: &[&str], vocab: &Vocab, ignore_merges: bool) -> Self {
        let mut table = HashMap::with_capacity(merges.len());
        let mut skipped = 0usize;
        for (rank, m) in merges.iter().enumerate() {
            // Split at the first space after the first byte, like llama.cpp.
            let Some(at) = m.bytes().skip(1).position(|b| b == b' ').map(|p| p + 1) else {
                skipped += 1;
                continue;
            };
            let (left, right) = (&m[..at], &m[at + 1..]);
            // Real vocabularies hold both halves and the result; a merge that does not
            // could only yield text with no token, so it is left out.
            let ids = (vocab.id(left), vocab.id(right), vocab.id(&[left, right].concat()));
            let (Some(l), Some(r), Some(id)) = ids else {
                skipped += 1;
                continue;
            };
            table.entry((l, r)).or_insert(Merge { rank: rank as u32, id });
        }
        if skipped > 0 {
            tracing::debug!(skipped, "BPE merges without tokens left out");
        }
        let mut byte_tokens = [NO_TOKEN; 256];
        for (b, slot) in byte_tokens.iter_mut().enumerate() {
            *slot = vocab.id(bytes::byte_to_char(b as u8).encode_utf8(&mut [0; 4])).unwrap_or(NO_TOKEN);
        }
        Bpe { merges: table, byte_tokens, ignore_merges }
    }

    /// Appends the tokens of one pre-tokenized word to `out`.
    pub(crate) fn encode_word(&self, word: &str, vocab: &Vocab, scratch: &mut Scratch, out: &mut Vec<u32>) {
        let raw = word.as_bytes();
        match raw {
            [] => return,
            [b] => return push_token(self.byte_tokens[*b as usize], out),
            _ => {}
        }
        if self.ignore_merges
            && let Some(id) = vocab.id(&bytes::encode(raw))
        {
            out.push(id);
            return;
        }

        let Scratch { symbols, queue } = scratch;
        symbols.clear();
        queue.clear();
        symbols.extend(raw.iter().enumerate().map(|(i, &b)| Symbol {
            id: self.byte_tokens[b as usize],
            prev: if i == 0 { NIL } else { i - 1 },
            next: if i + 1 == raw.len() { NIL } else { i + 1 },
            gone: false,
        }));
        for left in 0..symbols.len() - 1 {
            self.queue_pair(symbols, queue, left);
        }

        while let Some(Reverse(c)) = queue.pop() {
            let left = symbols[c.left];
            if left.gone || left.id != c.left_id || left.next == NIL {
                continue;
            }
            let right = symbols[left.next];
            if right.id != c.right_id {
                continue;
            }
            let merged = self.merges[&(c.left_id, c.right_id)].id;
            let right_index = left.next;
            symbols[right_index].gone = true;
            symbols[c.left].id = merged;
            symbols[c.left].next = right.next;
            if right.next != NIL {
                symbols[right.next].prev = c.left;
            }
            if left.prev != NIL {
                self.queue_pair(symbols, queue, left.prev);
            }
            self.queue_pair(symbols, queue, c.left);
        }

        let mut i = 0;
        while i != NIL {
            push_token(symbols[i].id, out);
            i = symbols[i].next;
        }
    }

    /// Queues the merge of symbol `left` with its right neighbour, if there is one.
    fn queue_pair(&self, symbols: &[Symbol], queue: &mut BinaryHeap<Reverse<Candidate>>, left: usize) {
        let l = symbols[left];
        if l.next == NIL {
            return;
        }
        let r = symbols[l.next];
        if let Some(m) = self.merges.get(&(l.id, r.id)) {
            queue.push(Reverse(Candidate { rank: m.rank, left, left_id: l.id, right_id: r.id }));
        }
    }
}

/// Bytes with no token are dropped, as llama.cpp drops them.
fn push_token(id: u32, out: &mut Vec<u32>) {
    if id != NO_TOKEN {
        out.push(id);
    } else {
        tracing::debug!("byte without a token dropped");
    }
}
