//! Chat templates: the Jinja template a GGUF carries in `tokenizer.chat_template`,
//! rendered with minijinja the way Hugging Face's `apply_chat_template` renders it.
//!
//! HF renders with `trim_blocks` and `lstrip_blocks`, templates call Python string
//! methods (`.strip()`, `.startswith()`...), `raise_exception(...)` and `tojson`; all
//! of that is provided here so that real templates render unchanged.
//!
//! Tools reach a template as HF passes them (the `tools` variable, assistant turns with
//! `tool_calls`, `tool` turns); a template that knows nothing of tools gets them described
//! in its system turn instead ([`tools`]).

mod tools;

pub use tools::{ToolCall, ToolFormat};

use minijinja::value::Kwargs;
use minijinja::{Environment, ErrorKind, Value, context};
use serde::Serialize;

use crate::gguf::Gguf;
use crate::{Error, Result};

const KEY_TEMPLATE: &str = "tokenizer.chat_template";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_BOS: &str = "tokenizer.ggml.bos_token_id";
const KEY_EOS: &str = "tokenizer.ggml.eos_token_id";
/// The one template an environment holds.
const NAME: &str = "chat_template";

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    pub content: String,
    /// The calls an assistant turn made.
    pub tool_calls: Vec<ToolCall>,
    /// Which call a `tool` turn answers.
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into(), ..ChatMessage::default() }
    }

    /// The message as a template sees it: HF's dict shape, `tool_calls` as OpenAI's
    /// `{id, type, function: {name, arguments}}` with the arguments as an object (Qwen's
    /// templates iterate over them).
    fn to_template(&self) -> serde_json::Value {
        let mut m = serde_json::json!({ "role": self.role, "content": self.content });
        if !self.tool_calls.is_empty() {
            m["tool_calls"] = self
                .tool_calls
                .iter()
                .map(|c| {
                    serde_json::json!({ "id": c.id, "type": "function",
                        "function": { "name": c.name, "arguments": c.arguments } })
                })
                .collect();
        }
        if let Some(id) = &self.tool_call_id {
            m["tool_call_id"] = serde_json::json!(id);
        }
        m
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    tool_format: ToolFormat,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("bos_token", &self.bos_token).field("eos_token", &self.eos_token).finish()
    }
}

impl ChatTemplate {
    /// The template of `tokenizer.chat_template`; `None` when the GGUF has none.
    /// `bos_token`/`eos_token` are the texts of the file's BOS and EOS ids (empty if unset).
    pub fn from_gguf(gguf: &Gguf) -> Result<Option<ChatTemplate>> {
        let Some(source) = gguf.get_str(KEY_TEMPLATE)? else {
            return Ok(None);
        };
        Self::for_gguf(gguf, source).map(Some)
    }

    /// `source` (e.g. a `--chat-template-file`) with the BOS and EOS texts of `gguf`.
    pub fn for_gguf(gguf: &Gguf, source: &str) -> Result<ChatTemplate> {
        let bos = token_text(gguf, KEY_BOS)?;
        let eos = token_text(gguf, KEY_EOS)?;
        Self::new(source, bos, eos)
    }

    /// Compiles `source`; a syntax error is an [`Error::Template`] with minijinja's message.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.to_owned()).map_err(template_error)?;
        let tool_format = ToolFormat::of_template(source);
        tracing::debug!(len = source.len(), ?tool_format, "chat template compiled");
        Ok(ChatTemplate { env, bos_token: bos_token.to_owned(), eos_token: eos_token.to_owned(), tool_format })
    }

    /// The tool-call markup this template teaches its model.
    pub fn tool_format(&self) -> ToolFormat {
        self.tool_format
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends where the
    /// assistant's reply begins.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_with(messages, add_generation_prompt, &serde_json::Map::new(), &[])
    }

    /// [`ChatTemplate::render`] with extra variables (an API's `chat_template_kwargs`, e.g.
    /// `enable_thinking`), as Hugging Face's `apply_chat_template` passes its keyword
    /// arguments (the standard ones, `messages`..., cannot be replaced by them), and the
    /// tools the model may call (OpenAI's `{type: "function", function: {...}}` objects).
    pub fn render_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        kwargs: &serde_json::Map<String, serde_json::Value>,
        tools: &[serde_json::Value],
    ) -> Result<String> {
        let template = self.env.get_template(NAME).map_err(template_error)?;
        let generic;
        let (messages, tools) = match self.tool_format {
            ToolFormat::Generic => {
                generic = tools::describe_in_system(messages, tools);
                (&generic[..], None)
            }
            ToolFormat::Hermes | ToolFormat::Xml => (messages, (!tools.is_empty()).then_some(tools)),
        };
        let messages: Vec<Value> = messages.iter().map(|m| Value::from_serialize(m.to_template())).collect();
        template
            .render(context! {
                messages,
                tools,
                add_generation_prompt,
                bos_token => self.bos_token.as_str(),
                eos_token => self.eos_token.as_str(),
                ..Value::from_serialize(kwargs)
            })
            .map_err(template_error)
    }
}

/// The text of the token whose id `key` holds; empty when the key is absent.
fn token_text<'g>(gguf: &'g Gguf, key: &str) -> Result<&'g str> {
    let Some(id) = gguf.get_u64(key)? else {
        return Ok("");
    };
    let tokens = gguf.require(KEY_TOKENS)?.as_array().unwrap_or_default();
    let token = usize::try_from(id).ok().and_then(|i| tokens.get(i));
    Ok(token.and_then(|t| t.as_str()).unwrap_or(""))
}

fn template_error(e: minijinja::Error) -> Error {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        message.push_str(&format!(": {s}"));
        source = s.source();
    }
    Error::Template(message)
}

/// `raise_exception(message)`: how HF templates reject a conversation.
fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// HF's `tojson`: Python's `json.dumps(value, ensure_ascii=False, indent=indent)`, which
/// separates with `", "` and `": "` and does not HTML-escape (unlike minijinja's own).
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let result = match indent {
        Some(n) => {
            let spaces = vec![b' '; n];
            let formatter = serde_json::ser::PrettyFormatter::with_indent(&spaces);
            value.serialize(&mut serde_json::Serializer::with_formatter(&mut out, formatter))
        }
        None => value.serialize(&mut serde_json::Serializer::with_formatter(&mut out, PythonFormatter)),
    };
    result.map_err(|e| minijinja::Error::new(ErrorKind::BadSerialization, "tojson failed").with_source(e))?;
    let json = String::from_utf8(out).expect("serde_json writes UTF-8");
    Ok(Value::from_safe_string(json))
}

/// Python's default JSON separators: `", "` between items, `": "` after keys.
struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");
    const SMOLLM2: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/SmolLM2-135M-Instruct.Q4_1.gguf");

    fn haiku() -> Vec<ChatMessage> {
        vec![ChatMessage::new("user", "Write a haiku about GPUs.")]
    }

    fn template_of(path: &str) -> ChatTemplate {
        assert!(std::path::Path::new(path).exists(), "{path} is missing: the set-up script fetches it");
        let gguf = Gguf::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        ChatTemplate::from_gguf(&gguf).unwrap().unwrap_or_else(|| panic!("{path} has no chat template"))
    }

    /// `sequences[0].prompt` of a golden file: the chat-formatted haiku request.
    fn golden_prompt(name: &str) -> String {
        let text = std::fs::read_to_string(format!("{FIXTURES}/{name}")).unwrap();
        let golden: serde_json::Value = serde_json::from_str(&text).unwrap();
        golden["sequences"][0]["prompt"].as_str().unwrap().to_owned()
    }

    #[test]
    fn template_kwargs_reach_the_template_but_do_not_replace_its_variables() {
        let source = "{% for m in messages %}{{ m.content }}{% endfor %}|{% if enable_thinking is defined and enable_thinking is false %}off{% else %}on{% endif %}";
        let t = ChatTemplate::new(source, "", "").unwrap();
        let kwargs = |v: serde_json::Value| v.as_object().unwrap().clone();
        assert_eq!(t.render(&haiku(), true).unwrap(), "Write a haiku about GPUs.|on");
        let off = kwargs(serde_json::json!({ "enable_thinking": false, "messages": "not these" }));
        assert_eq!(t.render_with(&haiku(), true, &off, &[]).unwrap(), "Write a haiku about GPUs.|off");
    }

    /// A Qwen3-style template receives the tools and renders a call and its result the
    /// way it teaches them; SmolLM2's, which knows nothing of tools, gets them described.
    #[test]
    fn tools_and_tool_turns_reach_the_template() {
        let source = std::fs::read_to_string(format!("{FIXTURES}/qwen3-tools.jinja")).unwrap();
        let template = ChatTemplate::new(&source, "", "").unwrap();
        assert_eq!(template.tool_format(), ToolFormat::Hermes);
        let tool = serde_json::json!({ "type": "function", "function": { "name": "add", "parameters": {
            "type": "object", "properties": { "a": { "type": "integer" } } } } });
        let call = ToolCall { id: "call_0".into(), name: "add".into(), arguments: serde_json::json!({ "a": 2 }) };
        let history = [
            ChatMessage::new("user", "2 + 2?"),
            ChatMessage { role: "assistant".into(), tool_calls: vec![call], ..ChatMessage::default() },
            ChatMessage {
                role: "tool".into(),
                content: "4".into(),
                tool_call_id: Some("call_0".into()),
                ..Default::default()
            },
        ];
        let kwargs = serde_json::Map::new();
        let text = template.render_with(&history, true, &kwargs, std::slice::from_ref(&tool)).unwrap();
        let want = format!(
            "<|im_start|>system\n# Tools\n\nYou may call one or more of these functions:\n<tools>\n{}\n</tools>\n\n\
             Write each call as:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call><|im_end|>\n\
             <|im_start|>user\n2 + 2?<|im_end|>\n\
             <|im_start|>assistant\n<tool_call>\n{{\"name\": \"add\", \"arguments\": {{\"a\": 2}}}}\n</tool_call>\n<|im_end|>\n\
             <|im_start|>user\n<tool_response>\n4\n</tool_response><|im_end|>\n<|im_start|>assistant\n",
            python_json(&tool)
        );
        assert_eq!(text, want);
        // Without tools the template's plain branch runs.
        let plain = template.render_with(&history[..1], true, &kwargs, &[]).unwrap();
        assert_eq!(plain, "<|im_start|>user\n2 + 2?<|im_end|>\n<|im_start|>assistant\n");

        let smol = template_of(SMOLLM2);
        assert_eq!(smol.tool_format(), ToolFormat::Generic);
        let text = smol.render_with(&history, true, &kwargs, &[tool]).unwrap();
        assert!(text.starts_with("<|im_start|>system\nYou can call functions"), "{text}");
        assert!(text.contains("<|im_start|>user\n<tool_response>\n4\n</tool_response><|im_end|>"), "{text}");
    }

    /// `value` as Python's `json.dumps` writes it (what `tojson` gives).
    fn python_json(value: &serde_json::Value) -> String {
        let v = Value::from_serialize(value);
        tojson(&v, Kwargs::from_iter(std::iter::empty::<(&str, Value)>())).unwrap().to_string()
    }

    #[test]
    fn tiny_qwen_templates_render_the_golden_prompt() {
        for (model, golden) in [("tiny-qwen35", "tiny-qwen35.golden.json"), ("tiny-qwen3", "tiny-qwen3.golden.json")] {
            let template = template_of(&format!("{FIXTURES}/{model}.gguf"));
            assert_eq!(template.render(&haiku(), true).unwrap(), golden_prompt(golden), "{model}");
        }
    }

    /// SmolLM2's template opens with a default system turn when the conversation has
    /// none (`loop.first and messages[0]['role'] != 'system'`); the goldens' prompt was
    /// written without it, so it is the golden prompt behind that system turn.
    #[test]
    fn smollm2_template_adds_its_default_system_prompt() {
        let template = template_of(SMOLLM2);
        let system =
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n";
        let rendered = template.render(&haiku(), true).unwrap();
        assert_eq!(rendered, format!("{system}{}", golden_prompt("smollm2-135m-q4_1.golden.json")));

        // With a system turn of its own, nothing is added; without the generation
        // prompt, the text stops after the last turn.
        let messages = [ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "Hi")];
        let rendered = template.render(&messages, false).unwrap();
        assert_eq!(rendered, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n");
    }

    #[test]
    fn malformed_template_is_an_error() {
        let err = ChatTemplate::new("{% for m in messages %}{{ m.content }", "", "").unwrap_err();
        assert!(matches!(&err, Error::Template(m) if m.contains("syntax error")), "{err}");
        // Filters are looked up when rendering: an unknown one fails there, also cleanly.
        let template = ChatTemplate::new("{{ messages | no_such_filter }}", "", "").unwrap();
        let err = template.render(&[], true).unwrap_err();
        assert!(matches!(&err, Error::Template(m) if m.contains("no_such_filter")), "{err}");
    }

    #[test]
    fn hf_template_features_work() {
        let source = concat!(
            "{{ bos_token }}",
            "{% for m in messages %}",
            "{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}",
            "[{{ m.content.strip() }}|{% if m.content.startswith('  x') %}yes{% endif %}|{{ m.content.split(',') | tojson }}]\n",
            "{% endfor %}",
            "{{ {'a': 1, 'b': '<é>'} | tojson }}{{ eos_token }}",
        );
        let template = ChatTemplate::new(source, "<s>", "</s>").unwrap();
        let rendered = template.render(&[ChatMessage::new("user", "  x,y ")], false).unwrap();
        assert_eq!(rendered, "<s>[x,y|yes|[\"  x\", \"y \"]]\n{\"a\": 1, \"b\": \"<é>\"}</s>");

        // (A `tool` turn would reach this template, which knows nothing of tools, as a user turn.)
        let err = template.render(&[ChatMessage::new("ipython", "x")], false).unwrap_err();
        assert!(matches!(&err, Error::Template(m) if m.contains("bad role ipython")), "{err}");
    }
}
