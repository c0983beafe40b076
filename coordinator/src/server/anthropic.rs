//! The Anthropic Messages API: `POST /v1/messages` and `/v1/messages/count_tokens`, so
//! that agents built on Anthropic's clients work unchanged. A request becomes the same
//! [`Chat`] an OpenAI request does (system, text, `tool_use` and `tool_result` blocks,
//! tools, `tool_choice`, `thinking`), and its answer is taken apart by the same reasoning
//! splitter and call parser, then written as Anthropic's content blocks, whole or as its
//! event stream (`message_start`, `content_block_*`, `message_delta`, `message_stop`).

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use strata_model::chat::{ChatMessage, ToolCall};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::AppState;
use super::errors::ApiError;
use super::openai::{self, Answer, Chat, Params, Stop, ToolChoice};
use super::reasoning::Channel;
use super::tool_calls::{Call, Piece, Tool};
use crate::scheduler::{Event, FinishReason, Finished, GenRequest};

/// An error in Anthropic's shape: `{"type": "error", "error": {"type", "message"}}`.
pub struct MessagesError(ApiError);

impl From<ApiError> for MessagesError {
    fn from(e: ApiError) -> Self {
        MessagesError(e)
    }
}

impl MessagesError {
    fn body(&self) -> Value {
        let kind = match self.0.status {
            StatusCode::BAD_REQUEST => "invalid_request_error",
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
            StatusCode::SERVICE_UNAVAILABLE => "overloaded_error",
            _ => "api_error",
        };
        json!({ "type": "error", "error": { "type": kind, "message": self.0.message } })
    }
}

impl IntoResponse for MessagesError {
    fn into_response(self) -> Response {
        self.0.respond_with(self.body())
    }
}

#[derive(Deserialize)]
struct MessagesRequest {
    model: String,
    #[serde(default)]
    max_tokens: Option<u32>,
    messages: Vec<Turn>,
    #[serde(default)]
    system: Option<Text>,
    #[serde(default)]
    stop_sequences: Option<Vec<String>>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    top_k: Option<u32>,
    #[serde(default)]
    tools: Option<Vec<AnthropicTool>>,
    #[serde(default)]
    tool_choice: Option<AnthropicChoice>,
    #[serde(default)]
    thinking: Option<Thinking>,
}

/// A string, or a list of content blocks (checked by [`turns`]).
#[derive(Deserialize)]
#[serde(untagged)]
enum Text {
    Plain(String),
    Blocks(Vec<Value>),
}

#[derive(Deserialize)]
struct Turn {
    role: String,
    content: Text,
}

#[derive(Deserialize)]
struct AnthropicTool {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    input_schema: Option<Value>,
    /// Anthropic's own server tools (`bash_20250124`, ...) carry a type; custom ones none.
    #[serde(default, rename = "type")]
    kind: Option<String>,
    /// Its calls follow `input_schema` (see OpenAI's `function.strict`).
    #[serde(default)]
    strict: Option<bool>,
}

#[derive(Deserialize)]
struct AnthropicChoice {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    disable_parallel_tool_use: bool,
}

#[derive(Deserialize)]
struct Thinking {
    #[serde(rename = "type")]
    kind: String,
}

/// What both endpoints make of a request: the chat and the parameters.
struct Parsed {
    chat: Chat,
    params: Params,
    max_tokens: Option<u32>,
    stream: bool,
}

fn parse(state: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Parsed, ApiError> {
    let body = openai::body_bytes(state, body)?;
    let value: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(None, format!("malformed JSON in the request body: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::invalid(None, "the request body must be a JSON object"));
    }
    let req: MessagesRequest = openai::typed(value)?;
    let mut messages = Vec::new();
    if let Some(system) = req.system {
        messages.push(ChatMessage::new("system", text_of(system, "system")?));
    }
    messages.extend(turns(req.messages)?);
    let (tools, offered) = tools(req.tools.unwrap_or_default())?;
    let (choice, one_call) = match req.tool_choice {
        None => (if tools.is_empty() { ToolChoice::None } else { ToolChoice::Auto }, false),
        Some(c) => {
            let choice = match (c.kind.as_str(), c.name) {
                ("auto", _) if tools.is_empty() => ToolChoice::None,
                ("auto", _) => ToolChoice::Auto,
                ("none", _) => ToolChoice::None,
                ("any", _) => ToolChoice::Required,
                ("tool", Some(name)) => ToolChoice::Named(name),
                (kind, _) => {
                    return Err(ApiError::invalid(
                        Some("tool_choice"),
                        format!("tool_choice.type `{kind}` is not one of auto, any, tool (with a name), none"),
                    ));
                }
            };
            let bad = match &choice {
                ToolChoice::Required if tools.is_empty() => Some("tool_choice `any` needs `tools`".to_owned()),
                ToolChoice::Named(n) if !tools.iter().any(|t| &t.name == n) => {
                    Some(format!("tool_choice names the tool `{n}`, which `tools` does not declare"))
                }
                _ => None,
            };
            if let Some(why) = bad {
                return Err(ApiError::invalid(Some("tool_choice"), why));
            }
            (choice, c.disable_parallel_tool_use)
        }
    };
    // Without `thinking`, Anthropic's models answer directly: the template is asked the same.
    let thinking = match req.thinking.as_ref().map(|t| t.kind.as_str()) {
        None | Some("disabled") => false,
        Some("enabled" | "adaptive") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                Some("thinking"),
                format!("thinking.type `{other}` is not one of enabled, disabled"),
            ));
        }
    };
    let params = Params {
        model: Some(req.model),
        max_tokens: req.max_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        stop: req.stop_sequences.map(Stop::Many),
        chat_template_kwargs: Some(Map::from_iter([("enable_thinking".to_owned(), Value::Bool(thinking))])),
        ..Params::default()
    };
    let chat = Chat { messages, tools, offered, choice, one_call };
    Ok(Parsed { chat, params, max_tokens: req.max_tokens, stream: req.stream })
}

/// The text of a `system` value or of a turn's text blocks.
fn text_of(text: Text, what: &str) -> Result<String, ApiError> {
    match text {
        Text::Plain(s) => Ok(s),
        Text::Blocks(blocks) => {
            let mut out = String::new();
            for (i, b) in blocks.iter().enumerate() {
                match (b.get("type").and_then(Value::as_str), b.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => out.push_str(t),
                    (kind, _) => {
                        return Err(ApiError::invalid(
                            Some("messages"),
                            format!("{what}[{i}]: a block of type {kind:?} where a text block was expected"),
                        ));
                    }
                }
            }
            Ok(out)
        }
    }
}

/// The conversation's turns: text, `tool_use` blocks as an assistant's calls, and each
/// `tool_result` block as a `tool` turn of its own; thinking blocks of earlier answers
/// are left out, as Anthropic's own API does.
fn turns(turns: Vec<Turn>) -> Result<Vec<ChatMessage>, ApiError> {
    if turns.is_empty() {
        return Err(ApiError::invalid(Some("messages"), "messages must hold at least one message"));
    }
    let mut out = Vec::new();
    for (i, turn) in turns.into_iter().enumerate() {
        let bad = |why: String| ApiError::invalid(Some("messages"), format!("messages[{i}]: {why}"));
        if turn.role != "user" && turn.role != "assistant" {
            return Err(bad(format!("role `{}` is not one of user, assistant", turn.role)));
        }
        let blocks = match turn.content {
            Text::Plain(s) => {
                out.push(ChatMessage::new(turn.role, s));
                continue;
            }
            Text::Blocks(blocks) => blocks,
        };
        let mut message = ChatMessage::new(turn.role.clone(), "");
        for (j, block) in blocks.into_iter().enumerate() {
            let kind = block.get("type").and_then(Value::as_str).unwrap_or_default().to_owned();
            let field = |name: &str| block.get(name).cloned();
            match kind.as_str() {
                "text" => match field("text") {
                    Some(Value::String(t)) => message.content.push_str(&t),
                    _ => return Err(bad(format!("content[{j}]: a text block needs `text`"))),
                },
                "tool_use" if turn.role == "assistant" => {
                    let (Some(Value::String(id)), Some(Value::String(name)), Some(input @ Value::Object(_))) =
                        (field("id"), field("name"), field("input"))
                    else {
                        return Err(bad(format!(
                            "content[{j}]: a tool_use block needs `id`, `name` and an object `input`"
                        )));
                    };
                    message.tool_calls.push(ToolCall { id, name, arguments: input });
                }
                "tool_result" if turn.role == "user" => {
                    let Some(Value::String(id)) = field("tool_use_id") else {
                        return Err(bad(format!("content[{j}]: a tool_result block needs `tool_use_id`")));
                    };
                    let content = match field("content") {
                        None | Some(Value::Null) => String::new(),
                        Some(Value::String(s)) => s,
                        Some(Value::Array(parts)) => {
                            text_of(Text::Blocks(parts), &format!("messages[{i}].content[{j}].content"))?
                        }
                        Some(_) => return Err(bad(format!("content[{j}]: tool_result content must be text"))),
                    };
                    let is_error = field("is_error").and_then(|v| v.as_bool()).unwrap_or(false);
                    let content = if is_error { format!("Error: {content}") } else { content };
                    out.push(ChatMessage {
                        role: "tool".into(),
                        content,
                        tool_call_id: Some(id),
                        ..Default::default()
                    });
                }
                "thinking" | "redacted_thinking" if turn.role == "assistant" => {}
                other => {
                    return Err(bad(format!(
                        "content[{j}]: blocks of type `{other}` are not supported in a {} turn",
                        turn.role
                    )));
                }
            }
        }
        if !message.content.is_empty() || !message.tool_calls.is_empty() {
            out.push(message);
        }
    }
    Ok(out)
}

/// Anthropic's tools, checked as OpenAI's are, with the OpenAI objects the template gets.
fn tools(tools: Vec<AnthropicTool>) -> Result<(Vec<Tool>, Vec<Value>), ApiError> {
    let mut offered = Vec::with_capacity(tools.len());
    for (i, t) in tools.into_iter().enumerate() {
        if let Some(kind) = t.kind.filter(|k| k != "custom") {
            return Err(ApiError::invalid(
                Some("tools"),
                format!(
                    "tools[{i}]: Anthropic's server tool `{kind}` is not available here; declare a custom tool with an input_schema"
                ),
            ));
        }
        let mut function =
            json!({ "name": t.name, "parameters": t.input_schema.unwrap_or_else(|| json!({ "type": "object" })) });
        if let Some(d) = t.description {
            function["description"] = json!(d);
        }
        if let Some(strict) = t.strict {
            function["strict"] = json!(strict);
        }
        offered.push(json!({ "type": "function", "function": function }));
    }
    Ok((openai::declared_tools(&offered)?, offered))
}

pub async fn messages(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, MessagesError> {
    let Parsed { chat, params, max_tokens, stream } = parse(&state, body)?;
    if max_tokens.is_none() {
        return Err(ApiError::invalid(Some("max_tokens"), "max_tokens: field required").into());
    }
    let mut prepared = params.prepare(&state.model_id, state.scheduler.ctx())?;
    let user_stops = prepared.stop.clone();
    let (prompt, answer) = openai::chat_prompt(&state, chat, &mut prepared)?;
    let room = state.scheduler.ctx() - prompt.len() as u32;
    let prompt_tokens = prompt.len();
    let request = GenRequest {
        max_tokens: prepared.max_tokens.map_or(room, |m| m.min(room)),
        prompt,
        sampling: prepared.sampling,
        stop: prepared.stop,
        logprobs: None,
        ignore_eos: false,
        constraint: prepared.constraint,
        draft_max: prepared.draft_max,
    };
    let (id, rx) = state.scheduler.submit(request).map_err(ApiError::refused)?;
    let reply = Reply { id: format!("msg_{id}"), model: state.model_id.clone(), user_stops };
    if stream { Ok(reply.stream(rx, answer, prompt_tokens)) } else { Ok(reply.whole(rx, answer).await?) }
}

/// `/v1/messages/count_tokens`: the prompt's length, as the model would get it.
pub async fn count_tokens(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<axum::Json<Value>, MessagesError> {
    let Parsed { chat, params, .. } = parse(&state, body)?;
    let mut prepared = params.prepare(&state.model_id, state.scheduler.ctx())?;
    let (prompt, _) = openai::chat_prompt(&state, chat, &mut prepared)?;
    Ok(axum::Json(json!({ "input_tokens": prompt.len() })))
}

/// What every response to one request names.
struct Reply {
    id: String,
    model: String,
    /// The request's own stop sequences (not the one a single call adds).
    user_stops: Vec<String>,
}

impl Reply {
    fn tool_id(&self, index: usize) -> String {
        format!("toolu_{}_{index}", self.id.trim_start_matches("msg_"))
    }

    /// `stop_reason` and `stop_sequence` of a finished answer.
    fn stop(&self, done: &Finished, calls: usize) -> (&'static str, Value) {
        match (done.reason, &done.stop_string) {
            (FinishReason::Length, _) => ("max_tokens", Value::Null),
            (FinishReason::Stop, _) if calls > 0 => ("tool_use", Value::Null),
            (FinishReason::Stop, Some(s)) if self.user_stops.contains(s) => ("stop_sequence", json!(s)),
            (FinishReason::Stop, _) => ("end_turn", Value::Null),
        }
    }

    fn tool_use(&self, index: usize, call: &Call) -> Value {
        json!({ "type": "tool_use", "id": self.tool_id(index), "name": call.name, "input": call.arguments })
    }

    async fn whole(self, mut rx: UnboundedReceiver<Event>, answer: Answer) -> Result<Response, ApiError> {
        let mut text = String::new();
        let done = loop {
            match rx.recv().await {
                Some(Event::Text(t)) => text.push_str(&t),
                Some(Event::Logprob(_)) => {}
                Some(Event::Done(f)) => break f,
                Some(Event::Failed(e)) => return Err(ApiError::generation_failed(e)),
                None => return Err(ApiError::internal("the scheduler stopped")),
            }
        };
        let (thought, content, calls) = answer.take_apart(&text, done.reason == FinishReason::Stop);
        let mut blocks = Vec::new();
        if !thought.is_empty() {
            blocks.push(json!({ "type": "thinking", "thinking": thought, "signature": "" }));
        }
        if let Some(c) = content.filter(|c| !c.is_empty()) {
            blocks.push(json!({ "type": "text", "text": c }));
        }
        blocks.extend(calls.iter().enumerate().map(|(i, c)| self.tool_use(i, c)));
        let (stop_reason, stop_sequence) = self.stop(&done, calls.len());
        let body = json!({
            "id": self.id, "type": "message", "role": "assistant", "model": self.model,
            "content": blocks, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
            "usage": { "input_tokens": done.prompt_tokens - done.cached_tokens, "output_tokens": done.completion_tokens,
                "cache_read_input_tokens": done.cached_tokens, "cache_creation_input_tokens": 0 },
        });
        Ok(axum::Json(body).into_response())
    }

    fn stream(self, rx: UnboundedReceiver<Event>, answer: Answer, input_tokens: usize) -> Response {
        let start = event(
            "message_start",
            &json!({ "type": "message_start", "message": {
                "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                "stop_reason": null, "stop_sequence": null, "usage": { "input_tokens": input_tokens, "output_tokens": 0 } } }),
        );
        let mut blocks = Blocks { reply: self, answer, open: None, next: 0, calls: 0 };
        let events = UnboundedReceiverStream::new(rx).map(move |e| Ok::<_, Infallible>(Bytes::from(blocks.render(e))));
        let body = tokio_stream::once(Ok::<_, Infallible>(Bytes::from(start))).chain(events);
        let headers = [(header::CONTENT_TYPE, "text/event-stream"), (header::CACHE_CONTROL, "no-cache")];
        (headers, Body::from_stream(body)).into_response()
    }
}

fn event(name: &str, data: &Value) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

/// The kinds of block that grow by deltas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Growing {
    Thinking,
    Text,
}

/// The content blocks of one streamed answer.
struct Blocks {
    reply: Reply,
    answer: Answer,
    /// The block being written, and its index.
    open: Option<(Growing, usize)>,
    /// The next block's index.
    next: usize,
    calls: usize,
}

impl Blocks {
    fn render(&mut self, e: Event) -> String {
        let mut out = String::new();
        match e {
            Event::Text(t) => {
                let pieces = self.answer.splitter.push(&t);
                self.pieces(&mut out, pieces);
            }
            Event::Logprob(_) => {}
            Event::Done(f) => {
                let held = self.answer.splitter.finish();
                self.pieces(&mut out, held);
                if let Some(parser) = self.answer.calls.as_mut() {
                    for piece in parser.finish(f.reason == FinishReason::Stop) {
                        self.piece(&mut out, piece);
                    }
                }
                self.close(&mut out);
                let (stop_reason, stop_sequence) = self.reply.stop(&f, self.calls);
                out.push_str(&event(
                    "message_delta",
                    &json!({ "type": "message_delta", "delta": { "stop_reason": stop_reason, "stop_sequence": stop_sequence },
                        "usage": { "output_tokens": f.completion_tokens } }),
                ));
                out.push_str(&event("message_stop", &json!({ "type": "message_stop" })));
            }
            Event::Failed(e) => {
                let error = MessagesError(ApiError::generation_failed(e));
                out.push_str(&event("error", &error.body()));
            }
        }
        out
    }

    fn pieces(&mut self, out: &mut String, pieces: Vec<(Channel, String)>) {
        for (channel, text) in pieces {
            match (channel, self.answer.calls.as_mut()) {
                (Channel::Reasoning, _) => self.grow(out, Growing::Thinking, &text),
                (Channel::Content, None) => self.grow(out, Growing::Text, &text),
                (Channel::Content, Some(parser)) => {
                    for piece in parser.push(&text) {
                        self.piece(out, piece);
                    }
                }
            }
        }
    }

    fn piece(&mut self, out: &mut String, piece: Piece) {
        match piece {
            Piece::Content(text) => self.grow(out, Growing::Text, &text),
            Piece::Call(call) => {
                self.close(out);
                let index = self.next;
                self.next += 1;
                let mut block = self.reply.tool_use(self.calls, &call);
                block["input"] = json!({});
                self.calls += 1;
                out.push_str(&event(
                    "content_block_start",
                    &json!({ "type": "content_block_start", "index": index, "content_block": block }),
                ));
                for part in call.argument_pieces() {
                    out.push_str(&event(
                        "content_block_delta",
                        &json!({ "type": "content_block_delta", "index": index,
                            "delta": { "type": "input_json_delta", "partial_json": part } }),
                    ));
                }
                out.push_str(&event("content_block_stop", &json!({ "type": "content_block_stop", "index": index })));
            }
        }
    }

    /// Adds `text` to a block of `kind`, opening one (and closing another) as needed.
    fn grow(&mut self, out: &mut String, kind: Growing, text: &str) {
        if self.open.map(|(k, _)| k) != Some(kind) {
            self.close(out);
            let index = self.next;
            self.next += 1;
            let block = match kind {
                Growing::Thinking => json!({ "type": "thinking", "thinking": "", "signature": "" }),
                Growing::Text => json!({ "type": "text", "text": "" }),
            };
            out.push_str(&event(
                "content_block_start",
                &json!({ "type": "content_block_start", "index": index, "content_block": block }),
            ));
            self.open = Some((kind, index));
        }
        let index = self.open.map_or(0, |(_, i)| i);
        let delta = match kind {
            Growing::Thinking => json!({ "type": "thinking_delta", "thinking": text }),
            Growing::Text => json!({ "type": "text_delta", "text": text }),
        };
        out.push_str(&event(
            "content_block_delta",
            &json!({ "type": "content_block_delta", "index": index, "delta": delta }),
        ));
    }

    fn close(&mut self, out: &mut String) {
        if let Some((_, index)) = self.open.take() {
            out.push_str(&event("content_block_stop", &json!({ "type": "content_block_stop", "index": index })));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turns_of(v: Value) -> Result<Vec<ChatMessage>, ApiError> {
        let turns: Vec<Turn> = serde_json::from_value(v).unwrap();
        super::turns(turns)
    }

    #[test]
    fn blocks_become_the_turns_a_template_takes() {
        let out = turns_of(json!([
            { "role": "user", "content": [{ "type": "text", "text": "Weather in " }, { "type": "text", "text": "Oslo?" }] },
            { "role": "assistant", "content": [
                { "type": "thinking", "thinking": "use the tool", "signature": "" },
                { "type": "text", "text": "Checking." },
                { "type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": { "city": "Oslo" } }] },
            { "role": "user", "content": [
                { "type": "tool_result", "tool_use_id": "toolu_1", "content": [{ "type": "text", "text": "-3 C" }] },
                { "type": "tool_result", "tool_use_id": "toolu_2", "content": "no such city", "is_error": true },
                { "type": "text", "text": "Thanks." }] },
        ]))
        .unwrap();
        let call = ToolCall { id: "toolu_1".into(), name: "get_weather".into(), arguments: json!({ "city": "Oslo" }) };
        let tool = |id: &str, content: &str| ChatMessage {
            role: "tool".into(),
            content: content.into(),
            tool_call_id: Some(id.into()),
            ..Default::default()
        };
        assert_eq!(
            out,
            vec![
                ChatMessage::new("user", "Weather in Oslo?"),
                ChatMessage { tool_calls: vec![call], ..ChatMessage::new("assistant", "Checking.") },
                tool("toolu_1", "-3 C"),
                tool("toolu_2", "Error: no such city"),
                ChatMessage::new("user", "Thanks."),
            ]
        );
    }

    #[test]
    fn blocks_that_cannot_be_served_are_refused_by_name() {
        let cases = [
            (json!([]), "at least one message"),
            (json!([{ "role": "system", "content": "x" }]), "role `system`"),
            (json!([{ "role": "user", "content": [{ "type": "image", "source": {} }] }]), "`image`"),
            (
                json!([{ "role": "user", "content": [{ "type": "tool_use", "id": "a", "name": "b", "input": {} }] }]),
                "`tool_use` are not supported in a user turn",
            ),
            (
                json!([{ "role": "assistant", "content": [{ "type": "tool_use", "id": "a", "name": "b", "input": 3 }] }]),
                "an object `input`",
            ),
            (json!([{ "role": "user", "content": [{ "type": "tool_result" }] }]), "needs `tool_use_id`"),
        ];
        for (v, needle) in cases {
            let e = turns_of(v.clone()).unwrap_err();
            assert!(e.message.contains(needle), "{v}: {}", e.message);
            assert_eq!(MessagesError(e).body()["error"]["type"], "invalid_request_error");
        }
    }
}
