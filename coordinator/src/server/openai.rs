//! The OpenAI-compatible endpoints: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use strata_model::chat::{ChatMessage, ToolCall};
use strata_model::grammar::Constraint;
use strata_model::sampling::SamplingParams;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::AppState;
use super::errors::ApiError;
use super::reasoning::{Channel, ReasoningFormat, Splitter};
use super::structured::{self, Alternative, Calls, Shape};
use super::tool_calls::{Call, CallParser, Piece, Tool};
use crate::scheduler::{Event, FinishReason, Finished, GenRequest, TokenLogprob};

/// The most stop strings a request may give.
const MAX_STOPS: usize = 16;

/// The longest stop string, in bytes: each is matched against the text at every token.
const MAX_STOP_BYTES: usize = 1024;

/// Parameters both completion endpoints take (the Messages API fills them from its own).
#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct Params {
    pub(super) model: Option<String>,
    pub(super) stream: bool,
    pub(super) stream_options: Option<StreamOptions>,
    pub(super) max_tokens: Option<u32>,
    pub(super) max_completion_tokens: Option<u32>,
    pub(super) temperature: Option<f32>,
    pub(super) top_p: Option<f32>,
    pub(super) top_k: Option<u32>,
    pub(super) min_p: Option<f32>,
    pub(super) repeat_penalty: Option<f32>,
    pub(super) presence_penalty: Option<f32>,
    pub(super) frequency_penalty: Option<f32>,
    pub(super) seed: Option<i64>,
    pub(super) stop: Option<Stop>,
    pub(super) n: Option<u32>,
    pub(super) logprobs: Option<Value>,
    pub(super) top_logprobs: Option<u32>,
    /// Extra variables for the chat template (e.g. `{"enable_thinking": false}`).
    pub(super) chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    /// `deepseek` (or `auto`) or `none`: overrides `--reasoning-format` for this request.
    pub(super) reasoning_format: Option<String>,
    /// `text`, `json_object` or `json_schema`: enforced by a grammar while sampling.
    pub(super) response_format: Option<Value>,
    /// llama-server's per-request cap on draft tokens per step (0: no speculation), within
    /// the server's `--draft-max`.
    #[serde(rename = "speculative.n_max")]
    pub(super) speculative_n_max: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct StreamOptions {
    include_usage: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<Message>,
    /// OpenAI's `{type: "function", function: {name, description, parameters}}` objects,
    /// checked by [`declared_tools`] and passed to the template as they came.
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    parallel_tool_calls: Option<bool>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
    #[serde(default)]
    tool_calls: Option<Vec<MessageCall>>,
    #[serde(default)]
    tool_call_id: Option<String>,
}

/// A call in an assistant turn of the history.
#[derive(Deserialize)]
struct MessageCall {
    #[serde(default)]
    id: Option<String>,
    function: MessageFunction,
}

#[derive(Deserialize)]
struct MessageFunction {
    name: String,
    /// JSON text, as OpenAI sends it (an object is taken too).
    arguments: Value,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: Prompt,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    One(String),
    Many(Vec<String>),
}

/// Parses a JSON body into the endpoint's own fields and the common [`Params`] (two
/// passes over one value: `#[serde(flatten)]` would lose the field paths in errors).
/// Malformed JSON and wrongly typed fields are 400s naming the field.
fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<(T, Params), ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(None, format!("malformed JSON in the request body: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::invalid(None, "the request body must be a JSON object"));
    }
    let params = typed(value.clone())?;
    Ok((typed(value)?, params))
}

pub(super) fn typed<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let param = known_param(&path).or_else(|| known_param(path.split(['.', '[']).next().unwrap_or("")));
        ApiError::invalid(param, if path == "." { e.inner().to_string() } else { format!("{path}: {}", e.inner()) })
    })
}

const PARAMS: &[&str] = &[
    "model",
    "messages",
    "prompt",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repeat_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "n",
    "logprobs",
    "top_logprobs",
    "chat_template_kwargs",
    "reasoning_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "speculative.n_max",
];

fn known_param(name: &str) -> Option<&'static str> {
    PARAMS.iter().find(|p| **p == name).copied()
}

/// What a validated request becomes, before its prompt is known.
pub(super) struct Prepared {
    pub(super) sampling: SamplingParams,
    pub(super) max_tokens: Option<u32>,
    pub(super) stop: Vec<String>,
    pub(super) stream: bool,
    pub(super) include_usage: bool,
    /// Top alternatives to report with each token's logprob; `None`: no logprobs.
    pub(super) logprobs: Option<u32>,
    /// The request's own reasoning format, if it names one.
    pub(super) reasoning_format: Option<ReasoningFormat>,
    pub(super) chat_template_kwargs: serde_json::Map<String, Value>,
    /// The JSON schema `response_format` asks the answer to follow.
    pub(super) schema: Option<Value>,
    /// The grammar the answer is sampled under (from `schema`, or a forced tool call).
    pub(super) constraint: Option<Constraint>,
    /// Draft tokens per step at most (`speculative.n_max`).
    pub(super) draft_max: Option<u32>,
}

/// The most draft tokens per step `speculative.n_max` may ask for (as `--draft-max`).
const MAX_DRAFT: u32 = 16;

/// The most alternatives `top_logprobs` (or the legacy integer `logprobs`) may ask for.
const MAX_TOP_LOGPROBS: u32 = 20;

impl Params {
    /// Checks every parameter against the served model's id and context length.
    pub(super) fn prepare(self, model_id: &str, ctx: u32) -> Result<Prepared, ApiError> {
        if let Some(model) = &self.model
            && model != model_id
        {
            return Err(ApiError::model_not_found(model));
        }
        if let Some(n) = self.n
            && n != 1
        {
            return Err(ApiError::invalid(
                Some("n"),
                format!("n = {n}: only one choice per request is supported (n = 1)"),
            ));
        }
        if let Some(k) = self.top_logprobs
            && k > MAX_TOP_LOGPROBS
        {
            return Err(ApiError::invalid(
                Some("top_logprobs"),
                format!("top_logprobs {k} is outside 0..={MAX_TOP_LOGPROBS}"),
            ));
        }
        let logprobs = logprobs_asked(self.logprobs.as_ref(), self.top_logprobs)?;
        if logprobs.is_none() && self.top_logprobs.is_some_and(|k| k > 0) {
            return Err(ApiError::invalid(Some("top_logprobs"), "top_logprobs requires logprobs: true"));
        }
        let max_tokens = self.max_completion_tokens.or(self.max_tokens);
        let param = if self.max_completion_tokens.is_some() { "max_completion_tokens" } else { "max_tokens" };
        if max_tokens == Some(0) {
            return Err(ApiError::invalid(Some(param), format!("{param} must be at least 1")));
        }
        // More than the whole context can never be honoured; up to it, an answer stops at
        // the context's end (finish_reason `length`).
        if let Some(m) = max_tokens
            && m > ctx
        {
            return Err(ApiError::invalid(
                Some(param),
                format!("{param} = {m} is more than the context length {ctx} (prompt and answer together)"),
            ));
        }
        let stop = stop_strings(self.stop)?;
        if let Some(n) = self.speculative_n_max
            && n > MAX_DRAFT
        {
            return Err(ApiError::invalid(
                Some("speculative.n_max"),
                format!("speculative.n_max {n} is outside 0..={MAX_DRAFT}"),
            ));
        }
        let reasoning_format = match self.reasoning_format.as_deref() {
            None => None,
            Some(name) => Some(ReasoningFormat::parse(name).ok_or_else(|| {
                ApiError::invalid(
                    Some("reasoning_format"),
                    format!("reasoning_format `{name}` is not one of deepseek, auto, none"),
                )
            })?),
        };
        let d = SamplingParams::default();
        let sampling = SamplingParams {
            temperature: self.temperature.unwrap_or(d.temperature),
            top_k: self.top_k.map_or(d.top_k, |k| k as usize),
            top_p: self.top_p.unwrap_or(d.top_p),
            min_p: self.min_p.unwrap_or(d.min_p),
            repeat_penalty: self.repeat_penalty.unwrap_or(d.repeat_penalty),
            presence_penalty: self.presence_penalty.unwrap_or(d.presence_penalty),
            frequency_penalty: self.frequency_penalty.unwrap_or(d.frequency_penalty),
            // No seed: a fresh one per request, as OpenAI's API behaves.
            seed: self.seed.map_or_else(random_seed, |s| s as u64),
            ..d
        };
        check_sampling(&sampling)?;
        let schema = structured::response_schema(self.response_format.as_ref())?;
        Ok(Prepared {
            sampling,
            max_tokens,
            stop,
            stream: self.stream,
            include_usage: self.stream_options.is_some_and(|o| o.include_usage),
            logprobs,
            reasoning_format,
            chat_template_kwargs: self.chat_template_kwargs.unwrap_or_default(),
            schema,
            constraint: None,
            draft_max: self.speculative_n_max,
        })
    }
}

/// How many top alternatives a request wants with each token's log-probability: chat
/// says `logprobs: true` with `top_logprobs: k`, legacy completions `logprobs: k`.
fn logprobs_asked(logprobs: Option<&Value>, top_logprobs: Option<u32>) -> Result<Option<u32>, ApiError> {
    match logprobs {
        None | Some(Value::Null) | Some(Value::Bool(false)) => Ok(None),
        Some(Value::Bool(true)) => Ok(Some(top_logprobs.unwrap_or(0))),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(k) if k <= u64::from(MAX_TOP_LOGPROBS) => Ok(Some(k as u32)),
            _ => Err(ApiError::invalid(Some("logprobs"), format!("logprobs {n} is outside 0..={MAX_TOP_LOGPROBS}"))),
        },
        Some(other) => Err(ApiError::invalid(
            Some("logprobs"),
            format!("logprobs must be a boolean (or, for completions, an integer), not {other}"),
        )),
    }
}

/// The request's stop strings (one string or a list), at most [`MAX_STOPS`].
fn stop_strings(stop: Option<Stop>) -> Result<Vec<String>, ApiError> {
    let stop = match stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > MAX_STOPS {
        return Err(ApiError::invalid(
            Some("stop"),
            format!("{} stop strings: at most {MAX_STOPS} are allowed", stop.len()),
        ));
    }
    if let Some(long) = stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::invalid(
            Some("stop"),
            format!("a stop string of {} bytes: at most {MAX_STOP_BYTES} are allowed", long.len()),
        ));
    }
    // An empty stop string would end every answer before it starts: it stops nothing.
    Ok(stop.into_iter().filter(|s| !s.is_empty()).collect())
}

/// The sampling parameters, checked by the model crate; an error names its parameter by
/// the error's field.
fn check_sampling(s: &SamplingParams) -> Result<(), ApiError> {
    s.validate().map_err(|e| match e {
        strata_model::Error::Sampling { param, message } => ApiError::invalid(Some(param), message),
        other => ApiError::invalid(None, other.to_string()),
    })
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish()
}

/// Token ids of a prompt text: BOS where the model wants one, special tokens recognised
/// (as `strata run` does). Checks that it leaves room in the context.
pub(super) fn tokenize(state: &AppState, text: &str, param: &'static str) -> Result<Vec<u32>, ApiError> {
    let mut ids: Vec<u32> = state.tokenizer.bos_to_add().into_iter().collect();
    ids.extend(
        state
            .tokenizer
            .encode(text, true)
            .map_err(|e| ApiError::invalid(Some(param), format!("tokenizing the prompt: {e}")))?,
    );
    if ids.is_empty() {
        return Err(ApiError::invalid(Some(param), "the prompt is empty: it has no tokens"));
    }
    let ctx = state.scheduler.ctx() as usize;
    if ids.len() >= ctx {
        return Err(ApiError::invalid(
            Some(param),
            format!("the prompt has {} tokens, but the context length is {ctx} (at most {} prompt tokens leave room for an answer)", ids.len(), ctx - 1),
        )
        .with_code("context_length_exceeded"));
    }
    Ok(ids)
}

pub(super) fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn usage(f: &Finished) -> Value {
    json!({ "prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
        "total_tokens": f.prompt_tokens + f.completion_tokens,
        "prompt_tokens_details": { "cached_tokens": f.cached_tokens } })
}

fn sse(data: &Value) -> String {
    format!("data: {data}\n\n")
}

/// Which endpoint's response shapes to use.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

/// The body, or a 413 naming the limit (`--max-body`) when it is larger.
pub(super) fn body_bytes(state: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                message: format!(
                    "the request body is larger than the server's limit of {} bytes (--max-body)",
                    state.max_body
                ),
                kind: "invalid_request_error",
                param: None,
                code: Some("request_too_large"),
                retry_after: None,
            }
        } else {
            ApiError::invalid(None, format!("reading the request body: {}", e.body_text()))
        }
    })
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(&state, body)?;
    let (req, params): (ChatRequest, _) = parse(&body)?;
    let mut prepared = params.prepare(&state.model_id, state.scheduler.ctx())?;
    let tools = declared_tools(req.tools.as_deref().unwrap_or_default())?;
    let choice = ToolChoice::parse(req.tool_choice.as_ref(), &tools)?;
    let chat = Chat {
        messages: history(req.messages)?,
        tools,
        offered: req.tools.unwrap_or_default(),
        choice,
        one_call: req.parallel_tool_calls == Some(false),
    };
    let (prompt, answer) = chat_prompt(&state, chat, &mut prepared)?;
    generate(state, prompt, prepared, Kind::Chat, Some(answer)).await
}

/// A chat request in the server's terms, from either API.
pub(super) struct Chat {
    pub messages: Vec<ChatMessage>,
    /// The tools declared, checked.
    pub tools: Vec<Tool>,
    /// The same tools as OpenAI's objects, which the template gets.
    pub offered: Vec<Value>,
    pub choice: ToolChoice,
    /// At most one call (a named `tool_choice` implies it).
    pub one_call: bool,
}

/// The prompt of a chat and how its answer is taken apart (reasoning, then calls);
/// `prepared` gains the stop string that ends an answer of one call.
pub(super) fn chat_prompt(
    state: &AppState,
    chat: Chat,
    prepared: &mut Prepared,
) -> Result<(Vec<u32>, Answer), ApiError> {
    let template = state
        .template
        .as_ref()
        .ok_or_else(|| ApiError::invalid(Some("messages"), "the model has no chat template: use /v1/completions"))?;
    let offered: &[Value] = if chat.choice == ToolChoice::None { &[] } else { &chat.offered };
    let mut text = template
        .render_with(&chat.messages, true, &prepared.chat_template_kwargs, offered)
        .map_err(|e| ApiError::invalid(Some("messages"), format!("rendering the chat template: {e}")))?;
    let format = template.tool_format();
    let opening = match &chat.choice {
        ToolChoice::Required => Some(format.call_opening(None)),
        ToolChoice::Named(name) => Some(format.call_opening(Some(name))),
        ToolChoice::None | ToolChoice::Auto => None,
    };
    let one_call = chat.one_call || matches!(chat.choice, ToolChoice::Named(_));
    // The grammar of the answer: a forced call's, or the schema's (which, beside tools the
    // model may call, allows either).
    let shape = match (&chat.choice, prepared.schema.take()) {
        (ToolChoice::Required | ToolChoice::Named(_), _) => {
            Some(Shape::Calls(Calls::new(format, &chat.tools, &chat.choice, one_call)))
        }
        (ToolChoice::Auto, Some(schema)) if !offered.is_empty() => {
            let content = Some(Alternative::Schema(schema));
            Some(Shape::Calls(Calls { or_content: content, ..Calls::new(format, &chat.tools, &chat.choice, one_call) }))
        }
        // Strict tools the model may call: free text, but a call it opens follows the
        // schemas.
        (ToolChoice::Auto, None) if !offered.is_empty() && chat.tools.iter().any(|t| t.strict) => {
            let content = Some(Alternative::Text);
            Some(Shape::Calls(Calls { or_content: content, ..Calls::new(format, &chat.tools, &chat.choice, one_call) }))
        }
        (_, schema) => schema.map(Shape::Json),
    };
    if let Some(shape) = &shape {
        let param = if matches!(shape, Shape::Calls(_)) { "tools" } else { "response_format" };
        prepared.constraint = Some(structured::constraint(state, shape, param)?);
    }
    // A forced call begins in the prompt: the model continues it. Under a grammar, a
    // reasoning the template opened is closed first (empty), as its own
    // `enable_thinking: false` would: the grammar describes the answer, not the thinking.
    // Strict tools beside free text leave it open: the free text holds the reasoning.
    let free = matches!(&shape, Some(Shape::Calls(Calls { or_content: Some(Alternative::Text), .. })));
    if (opening.is_some() || shape.is_some()) && !free && Splitter::prompt_opens(&text) {
        text.push_str("\n</think>\n\n");
    }
    if let Some(opening) = &opening {
        text.push_str(opening);
    }
    if one_call && !offered.is_empty() {
        // One call at most: the answer ends where the first call closes.
        prepared.stop.push(super::tool_calls::CLOSE.to_owned());
    }
    let prompt = tokenize(state, &text, "messages")?;
    let reasoning = prepared.reasoning_format.unwrap_or(state.reasoning);
    let splitter = Splitter::new(reasoning, Splitter::prompt_opens(&text));
    let calls = (!offered.is_empty())
        .then(|| CallParser::new(format, Arc::from(chat.tools), opening.as_deref().unwrap_or_default()));
    Ok((prompt, Answer { splitter, calls }))
}

/// The conversation as the template takes it; roles and calls checked.
fn history(messages: Vec<Message>) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(Some("messages"), "messages must hold at least one message"));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            "tool" => "tool",
            other => {
                return Err(ApiError::invalid(
                    Some("messages"),
                    format!("messages[{i}].role `{other}` is not supported (system, user, assistant, tool)"),
                ));
            }
        };
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    if p.kind != "text" {
                        return Err(ApiError::invalid(
                            Some("messages"),
                            format!("messages[{i}]: content parts of type `{}` are not supported (text only)", p.kind),
                        ));
                    }
                    text.push_str(p.text.as_deref().unwrap_or(""));
                }
                text
            }
        };
        let mut tool_calls = Vec::new();
        for (j, call) in m.tool_calls.unwrap_or_default().into_iter().enumerate() {
            let arguments = match call.function.arguments {
                Value::String(text) => serde_json::from_str(&text).ok().filter(Value::is_object),
                object @ Value::Object(_) => Some(object),
                _ => None,
            }
            .ok_or_else(|| {
                ApiError::invalid(
                    Some("messages"),
                    format!("messages[{i}].tool_calls[{j}].function.arguments is not a JSON object"),
                )
            })?;
            let id = call.id.unwrap_or_else(|| format!("call_{i}_{j}"));
            tool_calls.push(ToolCall { id, name: call.function.name, arguments });
        }
        out.push(ChatMessage { role: role.to_owned(), content, tool_calls, tool_call_id: m.tool_call_id });
    }
    Ok(out)
}

/// The tools a request declares, each checked: a `function` with a name and, if any,
/// an object schema for its parameters.
pub(super) fn declared_tools(tools: &[Value]) -> Result<Vec<Tool>, ApiError> {
    let mut out: Vec<Tool> = Vec::with_capacity(tools.len());
    for (i, tool) in tools.iter().enumerate() {
        let bad = |why: &str| ApiError::invalid(Some("tools"), format!("tools[{i}]: {why}"));
        if tool.get("type").and_then(Value::as_str) != Some("function") {
            return Err(bad("`type` must be \"function\""));
        }
        let function =
            tool.get("function").filter(|f| f.is_object()).ok_or_else(|| bad("`function` must be an object"))?;
        let name = function.get("name").and_then(Value::as_str).filter(|n| !n.is_empty());
        let name = name.ok_or_else(|| bad("`function.name` must be a non-empty string"))?;
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.') {
            return Err(bad(&format!("the function name `{name}` may hold only letters, digits, `_`, `-` and `.`")));
        }
        if out.iter().any(|t| t.name == name) {
            return Err(bad(&format!("the function `{name}` is declared twice")));
        }
        let parameters = function.get("parameters").cloned().unwrap_or_else(|| json!({ "type": "object" }));
        if !parameters.is_object() {
            return Err(bad("`function.parameters` must be a JSON schema object"));
        }
        let strict = match function.get("strict") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(bad("`function.strict` must be true or false")),
        };
        out.push(Tool { name: name.to_owned(), parameters, strict });
    }
    Ok(out)
}

/// `tool_choice`: whether the model may, must, or must not call a tool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ToolChoice {
    None,
    Auto,
    Required,
    Named(String),
}

impl ToolChoice {
    fn parse(choice: Option<&Value>, tools: &[Tool]) -> Result<ToolChoice, ApiError> {
        let bad = |why: String| ApiError::invalid(Some("tool_choice"), why);
        let choice = match choice {
            None | Some(Value::Null) => return Ok(if tools.is_empty() { ToolChoice::None } else { ToolChoice::Auto }),
            Some(Value::String(s)) => match s.as_str() {
                "none" => ToolChoice::None,
                "auto" => ToolChoice::Auto,
                "required" => ToolChoice::Required,
                other => {
                    return Err(bad(format!(
                        "tool_choice `{other}` is not one of none, auto, required, or a named function"
                    )));
                }
            },
            Some(v) => match v.get("function").and_then(|f| f.get("name")).and_then(Value::as_str) {
                Some(name) if v.get("type").and_then(Value::as_str) == Some("function") => {
                    if !tools.iter().any(|t| t.name == name) {
                        return Err(bad(format!(
                            "tool_choice names the function `{name}`, which `tools` does not declare"
                        )));
                    }
                    ToolChoice::Named(name.to_owned())
                }
                _ => {
                    return Err(bad(format!(
                        "tool_choice {v} is not one of none, auto, required, or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"
                    )));
                }
            },
        };
        match choice {
            ToolChoice::Required if tools.is_empty() => {
                Err(bad("tool_choice `required` needs `tools`, and the request declares none".to_owned()))
            }
            ToolChoice::Auto if tools.is_empty() => Ok(ToolChoice::None),
            choice => Ok(choice),
        }
    }
}

/// How a chat answer is taken apart: its reasoning, then (with tools) its calls.
pub(super) struct Answer {
    pub splitter: Splitter,
    pub calls: Option<CallParser>,
}

impl Answer {
    /// A whole answer taken apart: its reasoning, its content (`None` when only
    /// whitespace is left beside calls) and its calls. `stopped`: it ended on an end token
    /// or stop string, so an open call block is whole.
    pub fn take_apart(self, text: &str, stopped: bool) -> (String, Option<String>, Vec<Call>) {
        let (thought, content) = self.splitter.split_whole(text);
        match self.calls {
            Some(parser) => {
                let (content, calls) = parser.parse_whole(&content, stopped);
                (thought, content, calls)
            }
            None => (thought, Some(content), Vec::new()),
        }
    }
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(&state, body)?;
    let (req, params): (CompletionRequest, _) = parse(&body)?;
    let prepared = params.prepare(&state.model_id, state.scheduler.ctx())?;
    let text = match req.prompt {
        Prompt::One(s) => s,
        Prompt::Many(mut v) if v.len() == 1 => v.remove(0),
        Prompt::Many(v) => {
            return Err(ApiError::invalid(
                Some("prompt"),
                format!("{} prompts: only one per request is supported", v.len()),
            ));
        }
    };
    let mut prepared = prepared;
    if let Some(schema) = &prepared.schema {
        prepared.constraint = Some(structured::constraint(&state, &Shape::Json(schema.clone()), "response_format")?);
    }
    let prompt = tokenize(&state, &text, "prompt")?;
    generate(state, prompt, prepared, Kind::Completion, None).await
}

/// Runs `prompt`; a chat answer is taken apart by `answer` (reasoning, calls).
async fn generate(
    state: Arc<AppState>,
    prompt: Vec<u32>,
    p: Prepared,
    kind: Kind,
    answer: Option<Answer>,
) -> Result<Response, ApiError> {
    let room = state.scheduler.ctx() - prompt.len() as u32;
    let max_tokens = p.max_tokens.map_or(room, |m| m.min(room));
    let request = GenRequest {
        max_tokens,
        prompt,
        sampling: p.sampling,
        stop: p.stop,
        logprobs: p.logprobs,
        ignore_eos: false,
        constraint: p.constraint,
        draft_max: p.draft_max,
    };
    let (id, rx) = state.scheduler.submit(request).map_err(ApiError::refused)?;
    let id = match kind {
        Kind::Chat => format!("chatcmpl-{id}"),
        Kind::Completion => format!("cmpl-{id}"),
    };
    let reply = Reply { kind, id, created: now_secs(), model: state.model_id.clone() };
    if p.stream {
        Ok(reply.stream(rx, p.include_usage, answer))
    } else {
        reply.whole(rx, p.logprobs.is_some(), answer).await
    }
}

/// What every response to one request names: its endpoint's shapes, id, time and model.
struct Reply {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
}

impl Reply {
    /// Waits for the whole answer and returns it as one JSON body.
    async fn whole(
        self,
        mut rx: UnboundedReceiver<Event>,
        logprobs: bool,
        answer: Option<Answer>,
    ) -> Result<Response, ApiError> {
        let mut text = String::new();
        let mut entries = Vec::new();
        let done = loop {
            match rx.recv().await {
                Some(Event::Text(t)) => text.push_str(&t),
                Some(Event::Logprob(lp)) => entries.push(lp),
                Some(Event::Done(f)) => break f,
                Some(Event::Failed(e)) => return Err(ApiError::generation_failed(e)),
                None => return Err(ApiError::internal("the scheduler stopped")),
            }
        };
        let lp = if logprobs { logprobs_json(self.kind, &entries, 0) } else { Value::Null };
        let mut finish = done.reason.as_str();
        let (choice, object) = match self.kind {
            Kind::Chat => {
                let (thought, content, calls) = match answer {
                    Some(answer) => answer.take_apart(&text, done.reason == FinishReason::Stop),
                    None => (String::new(), Some(text), Vec::new()),
                };
                let mut message = json!({ "role": "assistant", "content": content });
                if !thought.is_empty() {
                    message["reasoning_content"] = json!(thought);
                }
                if !calls.is_empty() {
                    let calls: Vec<Value> = calls
                        .iter()
                        .enumerate()
                        .map(|(i, c)| {
                            json!({ "id": self.call_id(i), "type": "function",
                                "function": { "name": c.name, "arguments": c.arguments_json() } })
                        })
                        .collect();
                    message["tool_calls"] = json!(calls);
                    if done.reason == FinishReason::Stop {
                        finish = "tool_calls";
                    }
                }
                (json!({ "index": 0, "message": message, "logprobs": lp, "finish_reason": finish }), "chat.completion")
            }
            Kind::Completion => {
                (json!({ "index": 0, "text": text, "logprobs": lp, "finish_reason": finish }), "text_completion")
            }
        };
        let timings = json!({
            "time_to_first_token_ms": done.time_to_first_token.as_millis() as u64,
            "total_ms": done.elapsed.as_millis() as u64,
        });
        let body = json!({ "id": self.id, "object": object, "created": self.created, "model": self.model,
            "choices": [choice], "usage": usage(&done), "timings": timings });
        Ok(axum::Json(body).into_response())
    }

    /// The id of the answer's `index`th tool call.
    fn call_id(&self, index: usize) -> String {
        format!("call_{}_{index}", self.id.trim_start_matches("chatcmpl-"))
    }

    /// Streams the answer as server-sent events, one chunk per event.
    fn stream(self, rx: UnboundedReceiver<Event>, include_usage: bool, answer: Option<Answer>) -> Response {
        let first = match self.kind {
            Kind::Chat => {
                sse(&self.chunk(json!({ "role": "assistant", "content": "" }), None, Value::Null, include_usage))
            }
            Kind::Completion => String::new(),
        };
        let mut chunks = Chunks { reply: self, include_usage, offset: 0, answer, calls: 0 };
        let events =
            UnboundedReceiverStream::new(rx).map(move |event| Ok::<_, Infallible>(Bytes::from(chunks.render(event))));
        let body = tokio_stream::once(Ok::<_, Infallible>(Bytes::from(first))).chain(events);
        let headers = [(header::CONTENT_TYPE, "text/event-stream"), (header::CACHE_CONTROL, "no-cache")];
        (headers, Body::from_stream(body)).into_response()
    }

    /// One streamed chunk holding one choice.
    fn chunk(&self, delta: Value, finish: Option<&str>, logprobs: Value, include_usage: bool) -> Value {
        let (choice, object) = match self.kind {
            Kind::Chat => (
                json!({ "index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish }),
                "chat.completion.chunk",
            ),
            Kind::Completion => {
                (json!({ "index": 0, "text": delta, "logprobs": logprobs, "finish_reason": finish }), "text_completion")
            }
        };
        let mut c = json!({ "id": self.id, "object": object, "created": self.created, "model": self.model, "choices": [choice] });
        if include_usage {
            c["usage"] = Value::Null;
        }
        c
    }

    /// The deltas of one piece of a chat answer: content, or a call as its name (with
    /// `id`, empty arguments) and then its arguments in increments.
    fn piece_deltas(&self, piece: Piece, calls: &mut usize) -> Vec<Value> {
        match piece {
            Piece::Content(text) => vec![json!({ "content": text })],
            Piece::Call(call) => {
                let index = *calls;
                *calls += 1;
                let mut deltas =
                    vec![json!({ "tool_calls": [{ "index": index, "id": self.call_id(index), "type": "function",
                    "function": { "name": call.name, "arguments": "" } }] })];
                deltas.extend(
                    call.argument_pieces()
                        .into_iter()
                        .map(|a| json!({ "tool_calls": [{ "index": index, "function": { "arguments": a } }] })),
                );
                deltas
            }
        }
    }

    /// A delta that adds no text, in the endpoint's shape (`{}` ends a chat stream).
    fn empty_delta(&self, closing: bool) -> Value {
        match (self.kind, closing) {
            (Kind::Chat, false) => json!({ "content": "" }),
            (Kind::Chat, true) => json!({}),
            (Kind::Completion, _) => json!(""),
        }
    }
}

/// The server-sent events of one streamed answer.
struct Chunks {
    reply: Reply,
    include_usage: bool,
    /// Legacy completions count `text_offset` in characters of the text so far.
    offset: usize,
    /// How a chat answer is taken apart.
    answer: Option<Answer>,
    /// Tool calls sent so far.
    calls: usize,
}

impl Chunks {
    /// The chat deltas of `pieces`, one chunk each (a call several); at the end of the
    /// answer (`end`: whether it stopped rather than ran out), what the parsers held too.
    fn pieces(&mut self, mut pieces: Vec<(Channel, String)>, end: Option<bool>) -> String {
        let Some(answer) = self.answer.as_mut() else {
            return String::new();
        };
        if end.is_some() {
            pieces.extend(answer.splitter.finish());
        }
        let mut deltas = Vec::new();
        for (channel, text) in pieces {
            match (channel, answer.calls.as_mut()) {
                (Channel::Reasoning, _) => deltas.push(json!({ "reasoning_content": text })),
                (Channel::Content, None) => deltas.push(json!({ "content": text })),
                (Channel::Content, Some(parser)) => {
                    for piece in parser.push(&text) {
                        deltas.extend(self.reply.piece_deltas(piece, &mut self.calls));
                    }
                }
            }
        }
        if let (Some(stopped), Some(parser)) = (end, answer.calls.as_mut()) {
            for piece in parser.finish(stopped) {
                deltas.extend(self.reply.piece_deltas(piece, &mut self.calls));
            }
        }
        deltas.into_iter().map(|d| sse(&self.reply.chunk(d, None, Value::Null, self.include_usage))).collect()
    }

    fn render(&mut self, event: Event) -> String {
        let (r, usage_too) = (&self.reply, self.include_usage);
        match event {
            Event::Text(t) => {
                self.offset += t.chars().count();
                match (r.kind, self.answer.as_mut()) {
                    (Kind::Chat, Some(answer)) => {
                        let pieces = answer.splitter.push(&t);
                        self.pieces(pieces, None)
                    }
                    (Kind::Chat, None) => sse(&r.chunk(json!({ "content": t }), None, Value::Null, usage_too)),
                    (Kind::Completion, _) => sse(&r.chunk(json!(t), None, Value::Null, usage_too)),
                }
            }
            // Its own chunk: the token's text may be held back (a possible stop string).
            Event::Logprob(lp) => {
                let logprobs = logprobs_json(r.kind, std::slice::from_ref(&lp), self.offset);
                sse(&r.chunk(r.empty_delta(false), None, logprobs, usage_too))
            }
            Event::Done(f) => {
                let mut out = self.pieces(Vec::new(), Some(f.reason == FinishReason::Stop));
                let r = &self.reply;
                let finish =
                    if self.calls > 0 && f.reason == FinishReason::Stop { "tool_calls" } else { f.reason.as_str() };
                out.push_str(&sse(&r.chunk(r.empty_delta(true), Some(finish), Value::Null, usage_too)));
                if usage_too {
                    let mut u = r.chunk(Value::Null, None, Value::Null, true);
                    u["choices"] = json!([]);
                    u["usage"] = usage(&f);
                    out.push_str(&sse(&u));
                }
                out + "data: [DONE]\n\n"
            }
            Event::Failed(e) => sse(&ApiError::generation_failed(e).body()) + "data: [DONE]\n\n",
        }
    }
}

/// `logprobs` of a choice: chat's `{content: [...]}`, or the legacy completions shape
/// (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset` from `offset` on).
fn logprobs_json(kind: Kind, entries: &[TokenLogprob], mut offset: usize) -> Value {
    match kind {
        Kind::Chat => json!({ "content": entries.iter().map(|e| json!({
            "token": e.token,
            "logprob": e.logprob,
            "bytes": e.bytes,
            "top_logprobs": e.top.iter().map(|(t, b, l)| json!({ "token": t, "logprob": l, "bytes": b })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>() }),
        Kind::Completion => {
            let mut text_offset = Vec::with_capacity(entries.len());
            for e in entries {
                text_offset.push(offset);
                offset += e.token.chars().count();
            }
            json!({
                "tokens": entries.iter().map(|e| &e.token).collect::<Vec<_>>(),
                "token_logprobs": entries.iter().map(|e| e.logprob).collect::<Vec<_>>(),
                "top_logprobs": entries.iter().map(|e| e.top.iter().map(|(t, _, l)| (t.clone(), json!(l))).collect::<serde_json::Map<_, _>>()).collect::<Vec<_>>(),
                "text_offset": text_offset,
            })
        }
    }
}

pub async fn models(State(state): State<Arc<AppState>>) -> axum::Json<Value> {
    axum::Json(json!({
        "object": "list",
        "data": [{ "id": state.model_id, "object": "model", "created": state.created, "owned_by": "strata", "context_length": state.scheduler.ctx() }],
    }))
}

#[cfg(test)]
mod fuzz {
    //! Property-based fuzzing of request parsing: arbitrary bytes, and arbitrary JSON
    //! objects with the endpoints' own keys holding values of every type. Parsing and
    //! checking return a 400 or a request; nothing panics.

    use proptest::prelude::*;
    use serde_json::{Map, Value};

    use super::*;

    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            ".{0,12}".prop_map(Value::String),
            prop::sample::select(vec!["system", "user", "assistant", "text", "tool"]).prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((key(), inner), 0..6).prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    fn key() -> impl Strategy<Value = String> {
        let mut known: Vec<&'static str> = PARAMS.to_vec();
        known.extend([
            "role",
            "content",
            "type",
            "text",
            "include_usage",
            "tool_calls",
            "tool_call_id",
            "function",
            "name",
            "arguments",
            "parameters",
        ]);
        prop_oneof![prop::sample::select(known).prop_map(str::to_owned), "[a-z_]{1,8}"]
    }

    fn request() -> impl Strategy<Value = Value> {
        prop::collection::vec((key(), json()), 0..10)
            .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>()))
    }

    fn check(body: &[u8]) {
        let body = Bytes::copy_from_slice(body);
        if let Ok((req, params)) = parse::<ChatRequest>(&body) {
            if let Ok(p) = params.prepare("model", 4096) {
                assert!(p.sampling.validate().is_ok());
                assert!(p.stop.len() <= MAX_STOPS && p.max_tokens.is_none_or(|m| (1..=4096).contains(&m)));
            }
            if let Ok(history) = history(req.messages) {
                assert!(
                    !history.is_empty() && history.iter().all(|m| m.tool_calls.iter().all(|c| c.arguments.is_object()))
                );
            }
            if let Ok(tools) = declared_tools(req.tools.as_deref().unwrap_or_default())
                && let Ok(ToolChoice::Named(name)) = ToolChoice::parse(req.tool_choice.as_ref(), &tools)
            {
                assert!(tools.iter().any(|t| t.name == name));
            }
        }
        if let Ok((_, params)) = parse::<CompletionRequest>(&body) {
            let _ = params.prepare("model", 4096);
        }
    }

    proptest! {
            #[test]
        fn any_bytes_are_parsed_or_refused(body in prop::collection::vec(any::<u8>(), 0..256)) {
            check(&body);
        }

        #[test]
        fn any_json_request_is_parsed_or_refused(req in request()) {
            check(serde_json::to_string(&req).unwrap().as_bytes());
        }
    }
}
