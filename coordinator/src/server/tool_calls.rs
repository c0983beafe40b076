//! Finding the tool calls in an answer, in the markup its template taught the model
//! ([`ToolFormat`]): a `<tool_call>` block holding Hermes JSON or Qwen's XML form. The
//! answer's other text stays content. In Qwen3.5/3.6's vocabulary the tags are single
//! special tokens, which the detokeniser writes out as these texts, so one parser over the
//! streamed text serves a tag that arrives as one token or as several.
//!
//! A call is handed on when its closing tag arrives (or the answer ends), never before:
//! only a whole block can be told apart from a malformed one, which is returned as the
//! content it was. Streamed and whole answers go through the same parser, so their
//! results are the same by construction.

use std::sync::Arc;

use serde_json::{Map, Value};
use strata_model::chat::ToolFormat;

use super::reasoning::partial_tag;

pub(super) const OPEN: &str = "<tool_call>";
pub(super) const CLOSE: &str = "</tool_call>";
const FUNCTION: &str = "<function=";
const FUNCTION_END: &str = "</function>";
const PARAMETER: &str = "<parameter=";
const PARAMETER_END: &str = "</parameter>";

/// A tool a request declares: its name and the JSON schema of its parameters.
#[derive(Debug, Clone)]
pub struct Tool {
    pub name: String,
    pub parameters: Value,
    /// `function.strict`: its calls must follow the schema, even when the model chooses
    /// whether to call (see [`super::structured::Alternative::Text`]).
    pub strict: bool,
}

/// One call found in the answer, its arguments typed by the tool's schema.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub name: String,
    pub arguments: Map<String, Value>,
}

impl Call {
    /// The arguments as compact JSON text, cut where a stream sends them: the first member
    /// with `{`, each further member, the last with `}`. Joined, they are the arguments.
    pub fn argument_pieces(&self) -> Vec<String> {
        let n = self.arguments.len();
        if n == 0 {
            return vec!["{}".to_owned()];
        }
        self.arguments
            .iter()
            .enumerate()
            .map(|(i, (key, value))| {
                let open = if i == 0 { "{" } else { "" };
                let close = if i + 1 == n { "}" } else { "," };
                format!("{open}{}:{value}{close}", Value::from(key.as_str()))
            })
            .collect()
    }

    pub fn arguments_json(&self) -> String {
        self.argument_pieces().concat()
    }
}

/// A part of the answer, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Content(String),
    Call(Call),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Content, which a `<tool_call>` may interrupt.
    Text,
    /// Inside a `<tool_call>` block.
    Call,
}

/// Splits a streamed answer into content and calls, holding back only what may begin a
/// call: a partial tag and the whitespace before it.
#[derive(Debug)]
pub struct CallParser {
    format: ToolFormat,
    tools: Arc<[Tool]>,
    state: State,
    held: String,
    /// Just after a call: whitespace up to the next text is dropped.
    after_call: bool,
    /// The whitespace before the open block, dropped if it is a call, kept if it is not.
    gap: String,
}

impl CallParser {
    /// `opening`: what the prompt already wrote of the answer (the beginning of a call
    /// that `tool_choice` forces), which the parser reads as if the model had written it.
    pub fn new(format: ToolFormat, tools: Arc<[Tool]>, opening: &str) -> CallParser {
        let mut parser = CallParser {
            format,
            tools,
            state: State::Text,
            held: String::new(),
            after_call: false,
            gap: String::new(),
        };
        let pieces = parser.push(opening);
        debug_assert!(pieces.is_empty(), "an opening is the beginning of a call");
        parser
    }

    /// The pieces `text` completes, in order, none empty.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.held.push_str(text);
        let mut out = Vec::new();
        loop {
            match self.state {
                State::Text => {
                    if self.after_call {
                        let rest = self.held.trim_start();
                        if rest.is_empty() {
                            self.held.clear();
                            return out;
                        }
                        self.held = rest.to_owned();
                        self.after_call = false;
                    }
                    match self.held.find(OPEN) {
                        Some(at) => {
                            let rest = self.held[at + OPEN.len()..].to_owned();
                            self.held.truncate(at);
                            let content = std::mem::replace(&mut self.held, rest);
                            let text = content.trim_end();
                            content_piece(&mut out, text);
                            self.gap = content[text.len()..].to_owned();
                            self.state = State::Call;
                        }
                        None => {
                            let tag = partial_tag(&self.held, OPEN);
                            let body = &self.held[..self.held.len() - tag];
                            let keep = self.held.len() - body.trim_end().len();
                            let rest = self.held.split_off(self.held.len() - keep);
                            let content = std::mem::replace(&mut self.held, rest);
                            content_piece(&mut out, &content);
                            return out;
                        }
                    }
                }
                State::Call => match self.held.find(CLOSE) {
                    Some(at) => {
                        let rest = self.held[at + CLOSE.len()..].to_owned();
                        self.held.truncate(at);
                        let block = std::mem::replace(&mut self.held, rest);
                        self.close(&mut out, &block);
                        self.state = State::Text;
                    }
                    None => return out,
                },
            }
        }
    }

    /// What is still held when the answer ends. `closed`: it ended on a `</tool_call>`
    /// stop string (one call at most was asked for), so an open block is whole; otherwise
    /// an open block was cut off and is returned as content.
    pub fn finish(&mut self, closed: bool) -> Vec<Piece> {
        let held = std::mem::take(&mut self.held);
        let mut out = Vec::new();
        match self.state {
            State::Text if self.after_call => content_piece(&mut out, held.trim_start()),
            State::Text => content_piece(&mut out, &held),
            State::Call if closed => self.close(&mut out, &held),
            State::Call => content_piece(&mut out, &format!("{}{OPEN}{held}", std::mem::take(&mut self.gap))),
        }
        self.state = State::Text;
        out
    }

    /// A whole answer at once: its content (`None` when only whitespace is left beside
    /// calls) and its calls.
    pub fn parse_whole(mut self, text: &str, closed: bool) -> (Option<String>, Vec<Call>) {
        let pieces = self.push(text).into_iter().chain(self.finish(closed));
        gather(pieces)
    }

    /// A block between the tags: a call, or (malformed) content as written.
    fn close(&mut self, out: &mut Vec<Piece>, block: &str) {
        match self.parse_block(block) {
            Some(call) => {
                tracing::debug!(name = %call.name, "tool call");
                out.push(Piece::Call(call));
                self.after_call = true;
                self.gap.clear();
            }
            None => {
                tracing::debug!(block, "a malformed tool call is returned as content");
                content_piece(out, &format!("{}{OPEN}{block}{CLOSE}", std::mem::take(&mut self.gap)));
            }
        }
    }

    fn parse_block(&self, block: &str) -> Option<Call> {
        let (name, raw) = match self.format {
            ToolFormat::Xml if block.trim_start().starts_with(FUNCTION) => xml_call(block)?,
            // A model taught one form may write the other: both are read.
            _ => hermes_call(block).or_else(|| xml_call(block))?,
        };
        let tool = self.tools.iter().find(|t| t.name == name)?;
        let properties = tool.parameters.get("properties");
        let arguments = raw
            .into_iter()
            .map(|(key, value)| {
                let schema = properties.and_then(|p| p.get(&key));
                (key, typed(value, schema))
            })
            .collect();
        Some(Call { name, arguments })
    }
}

/// Pieces joined: the content (`None` when only whitespace is left beside calls), the calls.
fn gather(pieces: impl IntoIterator<Item = Piece>) -> (Option<String>, Vec<Call>) {
    let (mut content, mut calls) = (String::new(), Vec::new());
    for piece in pieces {
        match piece {
            Piece::Content(t) => content.push_str(&t),
            Piece::Call(c) => calls.push(c),
        }
    }
    let content = if !calls.is_empty() && content.trim().is_empty() { None } else { Some(content) };
    (content, calls)
}

fn content_piece(out: &mut Vec<Piece>, text: &str) {
    if text.is_empty() {
        return;
    }
    // Content next to content (a malformed block, then text) is one piece.
    if let Some(Piece::Content(last)) = out.last_mut() {
        last.push_str(text);
    } else {
        out.push(Piece::Content(text.to_owned()));
    }
}

/// `{"name": ..., "arguments": {...}}`; the arguments may also come as a string holding
/// the object, or under `parameters`.
fn hermes_call(block: &str) -> Option<(String, Map<String, Value>)> {
    let Value::Object(mut call) = serde_json::from_str(block.trim()).ok()? else {
        return None;
    };
    let Value::String(name) = call.remove("name")? else {
        return None;
    };
    let arguments = match call.remove("arguments").or_else(|| call.remove("parameters")) {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(Value::String(s)) => serde_json::from_str(&s).ok()?,
        Some(_) => return None,
    };
    Some((name, arguments))
}

/// `<function=NAME><parameter=P>value</parameter>...</function>`; each value is text.
fn xml_call(block: &str) -> Option<(String, Map<String, Value>)> {
    let rest = block.trim().strip_prefix(FUNCTION)?;
    let (name, rest) = rest.split_once('>')?;
    let mut body = rest.strip_suffix(FUNCTION_END)?.trim_start();
    let mut arguments = Map::new();
    while !body.is_empty() {
        let rest = body.strip_prefix(PARAMETER)?;
        let (key, rest) = rest.split_once('>')?;
        let end = value_end(rest)?;
        let value = &rest[..end];
        // The template writes each value on lines of its own.
        let value = value.strip_prefix('\n').unwrap_or(value);
        let value = value.strip_suffix('\n').unwrap_or(value);
        arguments.insert(key.trim().to_owned(), Value::String(value.to_owned()));
        body = rest[end + PARAMETER_END.len()..].trim_start();
    }
    let name = name.trim();
    (!name.is_empty()).then(|| (name.to_owned(), arguments))
}

/// Where a parameter's value ends: at the first `</parameter>` followed by another
/// parameter or by the end, so that a value may hold `</` (code) of its own.
fn value_end(rest: &str) -> Option<usize> {
    rest.match_indices(PARAMETER_END).map(|(at, _)| at).find(|&at| {
        let after = rest[at + PARAMETER_END.len()..].trim_start();
        after.is_empty() || after.starts_with(PARAMETER)
    })
}

/// `value` as the schema types it: text where a number, boolean, object or array is
/// expected is read as JSON when it is one of those; anything else stays as it is.
fn typed(value: Value, schema: Option<&Value>) -> Value {
    let Value::String(text) = &value else {
        return value;
    };
    let types: Vec<&str> = match schema.and_then(|s| s.get("type")) {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => return value,
    };
    if types.contains(&"string") {
        return value;
    }
    let Ok(parsed) = serde_json::from_str::<Value>(text.trim()) else {
        return value;
    };
    let fits = types.iter().any(|t| match *t {
        "integer" => parsed.is_i64() || parsed.is_u64(),
        "number" => parsed.is_number(),
        "boolean" => parsed.is_boolean(),
        "object" => parsed.is_object(),
        "array" => parsed.is_array(),
        "null" => parsed.is_null(),
        _ => false,
    });
    if fits { parsed } else { value }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn tools() -> Arc<[Tool]> {
        let weather = json!({ "type": "object", "properties": {
            "city": { "type": "string" }, "days": { "type": "integer" }, "metric": { "type": "boolean" } } });
        let write = json!({ "type": "object", "properties": {
            "path": { "type": "string" }, "content": { "type": "string" }, "options": { "type": "object" } } });
        Arc::from(vec![
            Tool { name: "get_weather".into(), parameters: weather, strict: false },
            Tool { name: "write_file".into(), parameters: write, strict: false },
        ])
    }

    fn call(name: &str, arguments: Value) -> Call {
        Call { name: name.into(), arguments: arguments.as_object().unwrap().clone() }
    }

    fn parse(format: ToolFormat, text: &str) -> (Option<String>, Vec<Call>) {
        CallParser::new(format, tools(), "").parse_whole(text, false)
    }

    /// Pieces of `chunks` streamed, joined back: content and calls.
    fn streamed(format: ToolFormat, chunks: &[&str]) -> (Option<String>, Vec<Call>) {
        let mut p = CallParser::new(format, tools(), "");
        let mut pieces: Vec<Piece> = chunks.iter().flat_map(|c| p.push(c)).collect();
        pieces.extend(p.finish(false));
        gather(pieces)
    }

    /// Every way of cutting `text` in two, and char by char, streams to the whole result.
    fn every_cut(format: ToolFormat, text: &str) -> (Option<String>, Vec<Call>) {
        let whole = parse(format, text);
        for (at, _) in text.char_indices().skip(1) {
            assert_eq!(streamed(format, &[&text[..at], &text[at..]]), whole, "{text:?} cut at {at}");
        }
        let chars: Vec<String> = text.chars().map(String::from).collect();
        let refs: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(streamed(format, &refs), whole, "{text:?} char by char");
        whole
    }

    // Outputs as Qwen2.5/Qwen3 write them (Hermes).
    const HERMES_ONE: &str =
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\", \"days\": 3}}\n</tool_call>";
    const HERMES_PARALLEL: &str = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Bergen\", \"metric\": true}}\n</tool_call>";
    const HERMES_NESTED: &str = "Let me write it.\n\n<tool_call>\n{\"name\": \"write_file\", \"arguments\": {\"path\": \"a.json\", \"content\": \"{}\", \"options\": {\"mode\": [1, {\"x\": null}], \"s\": \"</b>\"}}}\n</tool_call>";

    // Outputs as Qwen3-Coder and Qwen3.5/3.6 write them (XML).
    const XML_ONE: &str = "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>";
    const XML_CODE: &str = "I will add the page.\n<tool_call>\n<function=write_file>\n<parameter=path>\nsrc/a.html\n</parameter>\n<parameter=content>\n<p>1 < 2 and </p> ends it</parameter>\n</parameter>\n<parameter=options>\n{\"mode\": \"w\"}\n</parameter>\n</function>\n</tool_call>";

    #[test]
    fn hermes_calls_are_found_and_typed() {
        let h = ToolFormat::Hermes;
        assert_eq!(every_cut(h, HERMES_ONE), (None, vec![call("get_weather", json!({ "city": "Oslo", "days": 3 }))]));
        let both = every_cut(h, HERMES_PARALLEL);
        assert_eq!(
            both.1,
            vec![
                call("get_weather", json!({ "city": "Oslo" })),
                call("get_weather", json!({ "city": "Bergen", "metric": true }))
            ]
        );
        assert_eq!(both.0, None);
        let nested = every_cut(h, HERMES_NESTED);
        assert_eq!(nested.0.as_deref(), Some("Let me write it."));
        assert_eq!(
            nested.1,
            vec![call(
                "write_file",
                json!({ "path": "a.json", "content": "{}", "options": { "mode": [1, { "x": null }], "s": "</b>" } })
            )]
        );
        // Arguments as a string, and numbers as strings, are typed by the schema.
        let loose = "<tool_call>{\"name\": \"get_weather\", \"arguments\": \"{\\\"city\\\": \\\"Oslo\\\", \\\"days\\\": \\\"2\\\", \\\"metric\\\": \\\"yes\\\"}\"}</tool_call>";
        assert_eq!(
            every_cut(h, loose).1,
            vec![call("get_weather", json!({ "city": "Oslo", "days": 2, "metric": "yes" }))]
        );
    }

    #[test]
    fn xml_calls_are_found_and_typed() {
        let x = ToolFormat::Xml;
        assert_eq!(every_cut(x, XML_ONE), (None, vec![call("get_weather", json!({ "city": "Oslo", "days": 3 }))]));
        // Code with `<` and `</` inside a parameter, even `</parameter>` itself.
        let code = every_cut(x, XML_CODE);
        assert_eq!(code.0.as_deref(), Some("I will add the page."));
        assert_eq!(
            code.1,
            vec![call(
                "write_file",
                json!({ "path": "src/a.html", "content": "<p>1 < 2 and </p> ends it</parameter>", "options": { "mode": "w" } })
            )]
        );
        // A template that teaches XML may still get Hermes, and the reverse.
        assert_eq!(parse(x, HERMES_ONE).1.len(), 1);
        assert_eq!(parse(ToolFormat::Hermes, XML_ONE).1.len(), 1);
    }

    #[test]
    fn text_around_calls_truncated_and_malformed_calls_are_content() {
        let h = ToolFormat::Hermes;
        // Plain text, and a `<` that begins no tag.
        assert_eq!(every_cut(h, "No tools needed: 1 < 2.\n"), (Some("No tools needed: 1 < 2.\n".into()), vec![]));
        // Cut off at max_tokens inside a call: returned as the content it was.
        let cut = "Checking.\n<tool_call>\n{\"name\": \"get_weather\", \"argu";
        assert_eq!(every_cut(h, cut), (Some(cut.into()), vec![]));
        // Malformed JSON, and a tool that was not declared: content, not dropped.
        let bad = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": }\n</tool_call>";
        assert_eq!(every_cut(h, bad), (Some(bad.into()), vec![]));
        let unknown = "<tool_call>{\"name\": \"rm_rf\", \"arguments\": {}}</tool_call>";
        assert_eq!(every_cut(h, unknown), (Some(unknown.into()), vec![]));
        let bad_xml = "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</function>\n</tool_call>";
        assert_eq!(every_cut(ToolFormat::Xml, bad_xml), (Some(bad_xml.into()), vec![]));
        // Text after a call stays content.
        let after = format!("{HERMES_ONE}\n\nDone.");
        assert_eq!(every_cut(h, &after).0.as_deref(), Some("Done."));
    }

    #[test]
    fn a_forced_opening_and_a_stop_at_the_closing_tag_make_a_whole_call() {
        let opening = ToolFormat::Hermes.call_opening(Some("get_weather"));
        let p = CallParser::new(ToolFormat::Hermes, tools(), &opening);
        let (content, calls) = p.parse_whole("{\"city\": \"Oslo\"}}\n", true);
        assert_eq!((content, calls), (None, vec![call("get_weather", json!({ "city": "Oslo" }))]));
        // Not closed: the call was cut off, and its whole text is the content.
        let p = CallParser::new(ToolFormat::Hermes, tools(), &opening);
        let (content, calls) = p.parse_whole("{\"city\": \"Os", false);
        assert_eq!(content.as_deref(), Some(format!("{opening}{{\"city\": \"Os").as_str()));
        assert!(calls.is_empty());
        let opening = ToolFormat::Xml.call_opening(Some("get_weather"));
        let p = CallParser::new(ToolFormat::Xml, tools(), &opening);
        let (_, calls) = p.parse_whole("<parameter=city>\nOslo\n</parameter>\n</function>\n</tool_call>", false);
        assert_eq!(calls, vec![call("get_weather", json!({ "city": "Oslo" }))]);
    }

    proptest::proptest! {
        /// Any text made of call markup, cut anywhere, streams to what it gives whole.
        #[test]
        fn any_markup_streams_to_the_whole_result(
            parts in proptest::collection::vec(proptest::sample::select(vec![
                "<tool_call>", "</tool_call>", "<tool_", "\n", " ", "text", "<", "</", "{",
                "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"x\", \"days\": \"2\"}}",
                "<function=get_weather>", "<parameter=city>", "<parameter=days>", "</parameter>", "</function>", "7",
            ]), 0..24),
            cuts in proptest::collection::vec(0usize..400, 0..6),
            xml in proptest::bool::ANY,
        ) {
            let text: String = parts.concat();
            let format = if xml { ToolFormat::Xml } else { ToolFormat::Hermes };
            let mut at: Vec<usize> = cuts.into_iter().map(|c| c % (text.len() + 1)).collect();
            at.sort_unstable();
            let mut chunks = Vec::new();
            let mut from = 0;
            for a in at.into_iter().chain([text.len()]) {
                chunks.push(&text[from..a]);
                from = a;
            }
            proptest::prop_assert_eq!(streamed(format, &chunks), parse(format, &text));
        }
    }

    #[test]
    fn arguments_stream_in_pieces_that_join_to_the_whole() {
        let c = call("write_file", json!({ "path": "a", "content": "x\"y", "options": { "k": [1] } }));
        let pieces = c.argument_pieces();
        assert_eq!(pieces.len(), 3);
        assert_eq!(pieces.concat(), serde_json::to_string(&c.arguments).unwrap());
        assert_eq!(call("get_weather", json!({})).arguments_json(), "{}");
    }
}
