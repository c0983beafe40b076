//! Property-based fuzzing of what reads untrusted input: the GGUF reader (and everything
//! that reads a model's metadata: config, tokenizer, chat template), the tokenizer on
//! arbitrary text and ids, and the chat template on arbitrary conversations. Each runs
//! proptest's `PROPTEST_CASES` cases (default 256, what CI runs); a failure prints the
//! shrunk input.
//! Nothing may panic: hostile input is an `Err`.

use proptest::prelude::*;

use crate::chat::{ChatMessage, ChatTemplate};
use crate::config::ModelConfig;
use crate::gguf::Gguf;
use crate::tokenizer::Tokenizer;

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/../tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn qwen3() -> &'static [u8] {
    static BYTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BYTES.get_or_init(|| fixture("tiny-qwen3.gguf"))
}

fn tokenizers() -> &'static [Tokenizer] {
    static TOKS: std::sync::OnceLock<Vec<Tokenizer>> = std::sync::OnceLock::new();
    TOKS.get_or_init(|| {
        ["tiny-qwen3.gguf", "tiny-qwen35.gguf"]
            .iter()
            .map(|f| Tokenizer::from_gguf(&Gguf::from_bytes(fixture(f)).unwrap()).unwrap())
            .collect()
    })
}

/// Where the header and tensor index of the fixture end: mutations aim there, where the
/// reader makes its decisions (the tensor data is only sliced).
fn header_len() -> usize {
    let g = Gguf::from_bytes(qwen3().to_vec()).unwrap();
    g.data_start as usize
}

/// Reads everything a loader would from a file that parsed: no panic, whatever it holds.
fn exercise(g: &Gguf) {
    for (key, _) in &g.metadata {
        let _ = (g.get_u64(key), g.get_str(key), g.get_f64(key), g.get_bool(key));
    }
    for t in &g.tensors {
        let data = g.tensor_data(t);
        assert_eq!(data.len() as u64, t.size);
    }
    let _ = ModelConfig::from_gguf(g);
    if let Ok(tok) = Tokenizer::from_gguf(g)
        && let Ok(ids) = tok.encode("Hello <|im_start|> world", true)
    {
        let _ = tok.decode(&ids);
    }
    if let Ok(Some(t)) = ChatTemplate::from_gguf(g) {
        let _ = t.render(&[ChatMessage::new("user", "hi")], true);
    }
}

proptest! {
    /// A real model file with bytes overwritten, a 64-bit field replaced (counts, lengths,
    /// offsets, dimensions) and cut short: read or refused, never a panic.
    #[test]
    fn gguf_reader_refuses_or_reads_mutated_files(
        edits in prop::collection::vec((0usize..1 << 20, any::<u8>()), 0..8),
        patch in prop::option::of((0usize..1 << 20, any::<u64>())),
        cut in prop::option::of(0usize..1 << 24),
    ) {
        let header = header_len();
        let mut bytes = qwen3().to_vec();
        for (at, b) in edits {
            bytes[at % header] = b;
        }
        if let Some((at, v)) = patch {
            let at = at % (header - 8);
            bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        if let Some(c) = cut {
            bytes.truncate(c % (bytes.len() + 1));
        }
        if let Ok(g) = Gguf::from_bytes(bytes) {
            exercise(&g);
        }
    }

    /// Arbitrary bytes behind a valid magic and version.
    #[test]
    fn gguf_reader_refuses_random_headers(tail in prop::collection::vec(any::<u8>(), 0..512), version in 1u32..4) {
        let mut bytes = b"GGUF".to_vec();
        bytes.extend_from_slice(&version.to_le_bytes());
        bytes.extend_from_slice(&tail);
        if let Ok(g) = Gguf::from_bytes(bytes) {
            exercise(&g);
        }
    }

    /// Any text encodes, with or without special tokens, and plain text decodes back to
    /// itself (byte-level BPE loses nothing).
    #[test]
    fn tokenizer_encodes_any_text_and_round_trips(text in any::<String>(), special in "(<\\|im_(start|end)\\|>|<\\|endoftext\\|>|<think>)?") {
        for tok in tokenizers() {
            let ids = tok.encode(&text, false).unwrap();
            prop_assert_eq!(tok.decode(&ids), text.clone());
            let mixed = format!("{special}{text}{special}");
            let ids = tok.encode(&mixed, true).unwrap();
            prop_assert!(ids.iter().all(|&id| (id as usize) < tok.vocab_size()));
        }
    }

    /// Any ids decode (out-of-range ones to nothing), all at once or streamed.
    #[test]
    fn tokenizer_decodes_any_ids(ids in prop::collection::vec(any::<u32>(), 0..64), small in prop::collection::vec(0u32..1100, 0..64)) {
        for tok in tokenizers() {
            let _ = tok.decode(&ids);
            let whole = tok.decode(&small);
            let mut stream = tok.stream();
            let mut streamed = String::new();
            for &id in &small {
                streamed.push_str(&stream.push(id));
            }
            streamed.push_str(&stream.finish());
            prop_assert_eq!(streamed, whole);
        }
    }

    /// Any conversation renders or is refused with an error (a template may raise on an
    /// unknown role); the ChatML template shows every message's text.
    #[test]
    fn chat_template_renders_any_conversation(
        messages in prop::collection::vec(("(system|user|assistant|tool|[a-z]{0,8})", any::<String>()), 0..6),
        add_generation_prompt in any::<bool>(),
    ) {
        let g = Gguf::from_bytes(qwen3().to_vec()).unwrap();
        let template = ChatTemplate::from_gguf(&g).unwrap().expect("the fixture has a template");
        let messages: Vec<ChatMessage> = messages.into_iter().map(|(r, c)| ChatMessage::new(r, c)).collect();
        if let Ok(text) = template.render(&messages, add_generation_prompt) {
            for m in &messages {
                prop_assert!(text.contains(&m.content), "{:?} not in {:?}", m.content, text);
            }
        }
    }
}
