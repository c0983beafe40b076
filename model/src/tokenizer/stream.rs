//! Turning generated tokens into text as they arrive.

use super::Tokenizer;

/// Decodes tokens one at a time. A character whose bytes are spread over several tokens
/// (emoji, CJK in a small vocabulary) is held back until it is complete, so every chunk
/// handed out is whole UTF-8 text.
pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    /// Bytes of a character still incomplete.
    pending: Vec<u8>,
}

impl<'a> TextStream<'a> {
    pub(super) fn new(tokenizer: &'a Tokenizer) -> Self {
        TextStream { tokenizer, pending: Vec::new() }
    }
}

impl TextStream<'_> {
    /// Adds one token and returns the text it completes (possibly empty). Bytes that
    /// can never become valid UTF-8 come out as U+FFFD right away rather than stalling.
    pub fn push(&mut self, id: u32) -> String {
        self.pending.extend_from_slice(self.tokenizer.token_bytes(id));
        let mut text = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    text.push_str(s);
                    self.pending.clear();
                    return text;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    text.push_str(std::str::from_utf8(&self.pending[..valid]).expect("prefix checked valid"));
                    match e.error_len() {
                        // An incomplete character at the end: wait for the next token.
                        None => {
                            self.pending.drain(..valid);
                            return text;
                        }
                        Some(bad) => {
                            text.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// Ends the stream: whatever is still held back comes out, lossily.
    pub fn finish(self) -> String {
        String::from_utf8_lossy(&self.pending).into_owned()
    }
}
