//! Splitting text into words before BPE, with the regexes llama.cpp picks from
//! `tokenizer.ggml.pre` (`llm_tokenizer_bpe` in `src/llama-vocab.cpp`).
//!
//! A set is applied in order: each regex splits every piece left by the one before,
//! and the text between matches stays a piece of its own. llama.cpp evaluates some of
//! these with hand-written matchers and the rest with `std::regex` over text whose
//! non-ASCII characters are collapsed to their Unicode category; both come down to
//! these regexes with Unicode classes, which is what runs here.

use fancy_regex::Regex;

use crate::{Error, Result};

/// GPT-2's own pattern (also the word pattern of StarCoder-style sets).
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";

/// Llama 3, with the case-insensitive contractions spelled out as llama.cpp does.
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen 2/3: Llama 3's pattern with single digits.
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen 3.5: Qwen 2's pattern with combining marks kept inside words.
const QWEN35: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Single digits, split off before the word pattern.
const DIGIT: &str = r"\p{N}";

/// llama.cpp's fallback set for an unknown-but-unnamed pre-tokenizer.
const DEFAULT: &[&str] = &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"];

/// The regex set and the switches that come with a `tokenizer.ggml.pre` value.
struct Style {
    regexes: &'static [&'static str],
    /// A word that is already a token is emitted whole, without merging.
    ignore_merges: bool,
    /// Whether a BOS is added when the file does not say.
    add_bos: bool,
}

const STYLE_DEFAULT: Style = Style { regexes: DEFAULT, ignore_merges: false, add_bos: false };
const STYLE_GPT2: Style = Style { regexes: &[GPT2], ignore_merges: false, add_bos: false };
const STYLE_LLAMA3: Style = Style { regexes: &[LLAMA3], ignore_merges: true, add_bos: true };
/// DBRX and Smaug use Llama 3's regex without its other switches.
const STYLE_LLAMA3_REGEX: Style = Style { regexes: &[LLAMA3], ignore_merges: false, add_bos: false };
const STYLE_QWEN2: Style = Style { regexes: &[QWEN2], ignore_merges: false, add_bos: false };
const STYLE_QWEN35: Style = Style { regexes: &[QWEN35], ignore_merges: false, add_bos: false };
const STYLE_SMOLLM: Style = Style { regexes: &[DIGIT, GPT2], ignore_merges: false, add_bos: false };

/// The `tokenizer.ggml.pre` values llama.cpp maps to each style (the ones supported here).
fn style(pre: Option<&str>) -> Result<&'static Style> {
    let Some(pre) = pre else {
        tracing::warn!("GGUF names no pre-tokenizer: using llama.cpp's default, quality will suffer");
        return Ok(&STYLE_DEFAULT);
    };
    Ok(match pre {
        "default" => &STYLE_DEFAULT,
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2"
        | "jina-v5-nano" => &STYLE_LLAMA3,
        "dbrx" | "smaug-bpe" => &STYLE_LLAMA3_REGEX,
        "gpt2" | "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de" | "a.x-4.0"
        | "mellum" | "modern-bert" | "mpt" | "olmo" | "jais" | "trillion" | "granite-docling" | "exaone4" => {
            &STYLE_GPT2
        }
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" | "stablelm2" | "hunyuan" | "solar-open" => {
            &STYLE_QWEN2
        }
        "qwen35" => &STYLE_QWEN35,
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" | "mellum2" => {
            &STYLE_SMOLLM
        }
        other => return Err(Error::Tokenizer(format!("unsupported pre-tokenizer `{other}`"))),
    })
}

/// Splits text into the words that BPE merges within.
#[derive(Debug)]
pub(crate) struct PreTokenizer {
    regexes: Vec<Regex>,
    pub ignore_merges: bool,
    pub add_bos: bool,
}

impl PreTokenizer {
    /// The pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre` = `pre`.
    pub(crate) fn new(pre: Option<&str>) -> Result<Self> {
        let style = style(pre)?;
        let regexes = style
            .regexes
            .iter()
            .map(|r| Regex::new(r).map_err(|e| Error::Tokenizer(format!("pre-tokenizer regex {r:?}: {e}"))))
            .collect::<Result<_>>()?;
        Ok(PreTokenizer { regexes, ignore_merges: style.ignore_merges, add_bos: style.add_bos })
    }

    /// The words of `text`, in order; together they cover `text` exactly.
    pub(crate) fn split<'t>(&self, text: &'t str) -> Result<Vec<&'t str>> {
        let mut pieces = vec![text];
        let mut next = Vec::new();
        for re in &self.regexes {
            next.clear();
            for &piece in &pieces {
                let mut rest = 0;
                for m in re.find_iter(piece) {
                    let m = m.map_err(|e| Error::Tokenizer(format!("pre-tokenizer: {e}")))?;
                    if m.start() > rest {
                        next.push(&piece[rest..m.start()]);
                    }
                    if m.end() > m.start() {
                        next.push(m.as_str());
                    }
                    rest = m.end();
                }
                if rest < piece.len() {
                    next.push(&piece[rest..]);
                }
            }
            std::mem::swap(&mut pieces, &mut next);
        }
        Ok(pieces)
    }
}
