//! Separating a Qwen3-family model's reasoning from its answer: the text between `<think>`
//! and `</think>` becomes `reasoning_content`, the rest `content` (llama-server's
//! `deepseek` reasoning format). In Qwen3.5/3.6's vocabulary both tags are single special
//! tokens, which the detokeniser writes out as these texts, so one splitter over the
//! streamed text serves a tag that arrives as one token or as several.

pub use crate::cli::ReasoningFormat;

impl ReasoningFormat {
    /// A request's `reasoning_format` (llama-server's names; `auto` is `deepseek`).
    pub fn parse(name: &str) -> Option<ReasoningFormat> {
        match name {
            "deepseek" | "auto" => Some(ReasoningFormat::Deepseek),
            "none" => Some(ReasoningFormat::None),
            _ => None,
        }
    }
}

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

/// Where a piece of the answer belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Reasoning,
    Content,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing but whitespace yet: a `<think>` here opens the reasoning.
    Start,
    Reasoning,
    /// Just after `</think>`: the whitespace before the answer is dropped.
    AfterReasoning,
    Content,
    /// `--reasoning-format none`: everything is content, as written.
    Raw,
}

/// Splits a streamed answer into reasoning and content, holding back only what may be
/// the beginning of a tag.
#[derive(Debug)]
pub struct Splitter {
    state: State,
    held: String,
}

impl Splitter {
    /// `opened`: the prompt already ends in `<think>` (Qwen3.5/3.6 templates open it in the
    /// generation prompt), so the answer starts inside the reasoning.
    pub fn new(format: ReasoningFormat, opened: bool) -> Splitter {
        let state = match (format, opened) {
            (ReasoningFormat::None, _) => State::Raw,
            (ReasoningFormat::Deepseek, true) => State::Reasoning,
            (ReasoningFormat::Deepseek, false) => State::Start,
        };
        Splitter { state, held: String::new() }
    }

    /// Whether a rendered prompt leaves the model inside an open `<think>`.
    pub fn prompt_opens(prompt: &str) -> bool {
        prompt.trim_end().ends_with(OPEN)
    }

    /// The pieces `text` completes, in order, none empty.
    pub fn push(&mut self, text: &str) -> Vec<(Channel, String)> {
        self.held.push_str(text);
        let mut out = Vec::new();
        loop {
            match self.state {
                State::Raw | State::Content => {
                    let all = std::mem::take(&mut self.held);
                    emit(&mut out, Channel::Content, all);
                    return out;
                }
                State::Start => {
                    let lead = self.held.trim_start();
                    if let Some(rest) = lead.strip_prefix(OPEN) {
                        self.held = rest.to_owned();
                        self.state = State::Reasoning;
                    } else if OPEN.starts_with(lead) {
                        return out; // All whitespace, or a tag still arriving.
                    } else {
                        self.state = State::Content;
                    }
                }
                State::Reasoning => match self.held.find(CLOSE) {
                    Some(at) => {
                        let rest = self.held.split_off(at);
                        let thought = std::mem::replace(&mut self.held, rest[CLOSE.len()..].to_owned());
                        emit(&mut out, Channel::Reasoning, thought);
                        self.state = State::AfterReasoning;
                    }
                    None => {
                        let keep = partial_tag(&self.held, CLOSE);
                        let rest = self.held.split_off(self.held.len() - keep);
                        let thought = std::mem::replace(&mut self.held, rest);
                        emit(&mut out, Channel::Reasoning, thought);
                        return out;
                    }
                },
                State::AfterReasoning => {
                    let answer = self.held.trim_start();
                    if answer.is_empty() {
                        self.held.clear();
                        return out;
                    }
                    self.held = answer.to_owned();
                    self.state = State::Content;
                }
            }
        }
    }

    /// What is still held at the end of the answer (a tag that never completed is text).
    pub fn finish(&mut self) -> Vec<(Channel, String)> {
        let held = std::mem::take(&mut self.held);
        let mut out = Vec::new();
        match self.state {
            State::Reasoning => emit(&mut out, Channel::Reasoning, held),
            State::AfterReasoning => {}
            State::Start | State::Content | State::Raw => emit(&mut out, Channel::Content, held),
        }
        out
    }

    /// A whole answer split at once: (reasoning, content).
    pub fn split_whole(mut self, text: &str) -> (String, String) {
        let (mut reasoning, mut content) = (String::new(), String::new());
        for (channel, piece) in self.push(text).into_iter().chain(self.finish()) {
            match channel {
                Channel::Reasoning => reasoning.push_str(&piece),
                Channel::Content => content.push_str(&piece),
            }
        }
        (reasoning, content)
    }
}

fn emit(out: &mut Vec<(Channel, String)>, channel: Channel, text: String) {
    if !text.is_empty() {
        out.push((channel, text));
    }
}

/// The length of the longest end of `text` that begins `tag` (and is not all of it).
pub(super) fn partial_tag(text: &str, tag: &str) -> usize {
    (1..tag.len()).rev().find(|&k| text.ends_with(&tag[..k])).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(format: ReasoningFormat, opened: bool, chunks: &[&str]) -> (String, String) {
        let mut s = Splitter::new(format, opened);
        let (mut r, mut c) = (String::new(), String::new());
        let mut pieces: Vec<(Channel, String)> = chunks.iter().flat_map(|t| s.push(t)).collect();
        pieces.extend(s.finish());
        for piece in pieces {
            match piece.0 {
                Channel::Reasoning => r.push_str(&piece.1),
                Channel::Content => c.push_str(&piece.1),
            }
        }
        (r, c)
    }

    /// Every way of cutting `text` into two chunks gives what the whole gives.
    fn every_cut(format: ReasoningFormat, opened: bool, text: &str, want: (&str, &str)) {
        let want = (want.0.to_owned(), want.1.to_owned());
        assert_eq!(split(format, opened, &[text]), want, "{text:?} whole");
        for (at, _) in text.char_indices().skip(1) {
            assert_eq!(split(format, opened, &[&text[..at], &text[at..]]), want, "{text:?} cut at {at}");
        }
        let chars: Vec<String> = text.chars().map(String::from).collect();
        let refs: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(split(format, opened, &refs), want, "{text:?} char by char");
    }

    #[test]
    fn reasoning_and_content_split_at_the_tags_however_the_text_arrives() {
        let d = ReasoningFormat::Deepseek;
        every_cut(
            d,
            false,
            "<think>\nlet me see: 2 < 3</think>\n\nThe answer is 4.",
            ("\nlet me see: 2 < 3", "The answer is 4."),
        );
        every_cut(d, false, "  \n<think>a</think>b", ("a", "b"));
        // The template opened the reasoning: only the end tag comes.
        every_cut(d, true, "\nhmm, é</think>\n\nyes", ("\nhmm, é", "yes"));
        // No reasoning at all; a `<` that begins no tag.
        every_cut(d, false, "Hello <thinking> world", ("", "Hello <thinking> world"));
        every_cut(d, false, "<th", ("", "<th"));
        // Cut off inside the reasoning (max_tokens): all of it is reasoning, a partial end tag too.
        every_cut(d, false, "<think>still going </thi", ("still going </thi", ""));
        every_cut(d, true, "", ("", ""));
        // A second pair of tags is content, as written.
        every_cut(d, false, "<think>x</think>y<think>z</think>", ("x", "y<think>z</think>"));
        // `none` keeps the raw text.
        every_cut(ReasoningFormat::None, true, "a</think>b", ("", "a</think>b"));
    }

    #[test]
    fn a_prompt_that_ends_inside_think_is_recognised() {
        assert!(Splitter::prompt_opens("<|im_start|>assistant\n<think>\n"));
        assert!(!Splitter::prompt_opens("<|im_start|>assistant\n<think>\n\n</think>\n\n"));
        assert!(!Splitter::prompt_opens("<|im_start|>assistant\n"));
        assert_eq!(ReasoningFormat::parse("auto"), Some(ReasoningFormat::Deepseek));
        assert_eq!(ReasoningFormat::parse("none"), Some(ReasoningFormat::None));
        assert_eq!(ReasoningFormat::parse("x"), None);
    }
}
