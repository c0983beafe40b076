//! Structured output: what a request's `response_format` and forced `tool_choice` ask of
//! the answer, written as one grammar for llguidance (`strata_model::grammar`). The
//! grammar becomes a token mask at every step, applied on the last stage for that
//! sequence alone, so the answer parses by construction rather than by luck.
//!
//! A JSON schema is embedded as it came, with fixed separators
//! ([`strata_model::grammar::with_separators`]). Tool calls are written in the markup the
//! template taught ([`ToolFormat`]), each call's arguments held to its tool's schema.

use serde_json::{Value, json};
use strata_model::chat::ToolFormat;
use strata_model::grammar::{Constraint, with_separators};

use super::AppState;
use super::errors::ApiError;
use super::openai::ToolChoice;
use super::tool_calls::{CLOSE, OPEN, Tool};

/// What a request's answer must be, before it is compiled.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Shape {
    /// One JSON value valid against this schema (`response_format`).
    Json(Value),
    /// Tool calls, in `format`'s markup, continuing the opening the prompt ends with.
    Calls(Calls),
}

/// The calls a forced `tool_choice` (or `auto` beside a `response_format`) allows.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Calls {
    pub format: ToolFormat,
    pub tools: Vec<(String, Value)>,
    /// `Some(name)`: that function's call, already opened in the prompt up to its
    /// arguments; `None`: any declared function, the prompt having opened a call block.
    pub named: Option<String>,
    /// At most one call.
    pub one_call: bool,
    /// With `tool_choice: auto`: the answer is content or calls (nothing is opened in
    /// the prompt then).
    pub or_content: Option<Alternative>,
}

/// What an answer may be instead of calls, with `tool_choice: auto`.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Alternative {
    /// One JSON value of this schema (`response_format`).
    Schema(Value),
    /// Any text without the call opening; or such text, then calls (strict tools): the
    /// model chooses whether to call, and a call it makes follows its tool's schema.
    Text,
}

impl Calls {
    pub(super) fn new(format: ToolFormat, tools: &[Tool], choice: &ToolChoice, one_call: bool) -> Calls {
        let named = match choice {
            ToolChoice::Named(name) => Some(name.clone()),
            _ => None,
        };
        Calls {
            format,
            tools: tools.iter().map(|t| (t.name.clone(), t.parameters.clone())).collect(),
            named,
            one_call,
            or_content: None,
        }
    }
}

/// The schema `response_format` asks for: `None` for `text` (or no `response_format`).
/// `json_object` is any object; `json_schema` takes `json_schema.schema` (OpenAI's shape),
/// and llama-server's `{"type": "json_object", "schema": ...}` is taken too.
pub(super) fn response_schema(format: Option<&Value>) -> Result<Option<Value>, ApiError> {
    let bad = |m: String| ApiError::invalid(Some("response_format"), m);
    let Some(format) = format.filter(|f| !f.is_null()) else { return Ok(None) };
    let kind = format.get("type").and_then(Value::as_str).ok_or_else(|| {
        bad("response_format must be an object with a `type`: text, json_object or json_schema".into())
    })?;
    let schema = match kind {
        "text" => return Ok(None),
        "json_object" => format.get("schema").cloned().unwrap_or_else(|| json!({ "type": "object" })),
        "json_schema" => {
            let spec = format
                .get("json_schema")
                .filter(|s| s.is_object())
                .ok_or_else(|| bad("response_format.json_schema must be an object holding `schema`".into()))?;
            spec.get("schema").cloned().ok_or_else(|| bad("response_format.json_schema.schema is required".into()))?
        }
        other => {
            return Err(bad(format!("response_format type `{other}` is not one of text, json_object, json_schema")));
        }
    };
    if !schema.is_object() && !schema.is_boolean() {
        return Err(bad("the response_format schema must be a JSON schema object".into()));
    }
    Ok(Some(schema))
}

/// A Lark string literal of `text` (llguidance reads them as JSON strings).
fn literal(text: &str) -> String {
    Value::from(text).to_string()
}

/// `text` as a Lark regex matching it literally.
fn regex_text(text: &str) -> String {
    text.chars().map(|c| if "\\.+*?()|[]{}^$/&~-".contains(c) { format!("\\{c}") } else { c.to_string() }).collect()
}

/// An embedded JSON value of `schema`.
fn json_value(schema: &Value) -> String {
    format!("%json {}", with_separators(schema))
}

/// The Lark grammar of `shape`.
pub(super) fn lark(shape: &Shape) -> String {
    match shape {
        Shape::Json(schema) => format!("start: {}\n", json_value(schema)),
        Shape::Calls(calls) => calls_lark(calls),
    }
}

fn calls_lark(c: &Calls) -> String {
    let mut g = String::new();
    let close = literal(&format!("\n{CLOSE}"));
    // A string value of an XML parameter with the line that ends it: any text up to the
    // first `\n</parameter>`. One lexeme, since the lexer does not backtrack: a value
    // lexeme of its own would swallow the end line's first characters.
    if c.format == ToolFormat::Xml {
        g.push_str(
            "PARAM_TEXT: /(.|\\n)*\\n<\\/parameter>\\n/ & ~/(.|\\n)*\\n<\\/parameter>(.|\\n)*\\n<\\/parameter>(.|\\n)*/\n",
        );
    }
    for (i, (name, schema)) in c.tools.iter().enumerate() {
        match c.format {
            ToolFormat::Hermes | ToolFormat::Generic => {
                let head = literal(&format!("{{\"name\": {}, \"arguments\": ", Value::from(name.as_str())));
                g.push_str(&format!("args_{i}: {} \"}}\"\n", json_value(schema)));
                g.push_str(&format!("call_{i}: {head} args_{i}\n"));
            }
            ToolFormat::Xml => {
                g.push_str(&format!("args_{i}: {}\n", xml_parameters(schema, i)));
                g.push_str(&format!(
                    "call_{i}: {} args_{i} \"</function>\"\n",
                    literal(&format!("<function={name}>\n"))
                ));
            }
        }
    }
    // XML parameters are declared after use: Lark rules may come in any order.
    if c.format == ToolFormat::Xml {
        for (i, (_, schema)) in c.tools.iter().enumerate() {
            g.push_str(&xml_parameter_rules(schema, i));
        }
    }
    let calls: Vec<String> = (0..c.tools.len()).map(|i| format!("call_{i}")).collect();
    g.push_str(&format!("body: ({}) {close}\n", calls.join(" | ")));
    let more = if c.one_call { String::new() } else { format!(" ({} body)*", literal(&format!("\n{OPEN}\n"))) };
    match (&c.named, &c.or_content) {
        (Some(name), _) => {
            let i = c.tools.iter().position(|(n, _)| n == name).unwrap_or(0);
            let rest = match c.format {
                ToolFormat::Xml => format!("args_{i} \"</function>\""),
                _ => format!("args_{i}"),
            };
            g.push_str(&format!("start: {rest} {close}\n"));
        }
        (None, None) => g.push_str(&format!("start: body{more}\n")),
        (None, Some(Alternative::Schema(content))) => {
            let open = literal(&format!("{OPEN}\n"));
            g.push_str(&format!("start: {} | {open} body{more}\n", json_value(content)));
        }
        (None, Some(Alternative::Text)) => {
            // Text without the opening, or text up to and including the first opening
            // and its line end, each one lexeme (the lexer does not backtrack: a text
            // lexeme of its own would swallow the opening's first characters).
            let open = regex_text(OPEN);
            let any = "(.|\\n)*";
            g.push_str(&format!("FREE: /{any}/ & ~/{any}{open}{any}/\n"));
            g.push_str(&format!("LEAD: /{any}{open}\\n/ & ~/{any}{open}{any}{open}{any}/\n"));
            g.push_str(&format!("start: FREE | LEAD body{more}\n"));
        }
    }
    g
}

/// The parameters of tool `i` in Qwen's XML form, in the schema's order: the required
/// ones in place, the others optional. A schema without properties takes any parameter.
fn xml_parameters(schema: &Value, i: usize) -> String {
    let properties = schema.get("properties").and_then(Value::as_object);
    match properties {
        Some(props) if !props.is_empty() => {
            let required: Vec<&str> = schema
                .get("required")
                .and_then(Value::as_array)
                .map_or_else(Vec::new, |r| r.iter().filter_map(Value::as_str).collect());
            let parts: Vec<String> = props
                .keys()
                .enumerate()
                .map(|(j, key)| {
                    if required.contains(&key.as_str()) { format!("param_{i}_{j}") } else { format!("[param_{i}_{j}]") }
                })
                .collect();
            parts.join(" ")
        }
        _ => format!("param_{i}_any*"),
    }
}

/// The rule of each parameter of tool `i`.
fn xml_parameter_rules(schema: &Value, i: usize) -> String {
    let mut g = String::new();
    let end = literal("\n</parameter>\n");
    match schema.get("properties").and_then(Value::as_object) {
        Some(props) if !props.is_empty() => {
            for (j, (key, sub)) in props.iter().enumerate() {
                let value = if sub.get("type").and_then(Value::as_str) == Some("string") {
                    "PARAM_TEXT".to_owned()
                } else {
                    format!("{} {end}", json_value(sub))
                };
                g.push_str(&format!("param_{i}_{j}: {} {value}\n", literal(&format!("<parameter={key}>\n"))));
            }
        }
        _ => g.push_str(&format!("param_{i}_any: \"<parameter=\" /[A-Za-z0-9_.-]+/ \">\\n\" PARAM_TEXT\n")),
    }
    g
}

/// Compiles `shape` over the served model's vocabulary; a grammar llguidance refuses (an
/// unsupported schema feature, say) is a 400 naming `param`.
pub(super) fn constraint(state: &AppState, shape: &Shape, param: &'static str) -> Result<Constraint, ApiError> {
    let vocab = state.grammar.as_ref().map_err(|why| ApiError::invalid(Some(param), why.clone()))?;
    let grammar = lark(shape);
    tracing::debug!(%grammar, "compiling a grammar");
    vocab.lark(&grammar).map_err(|e| ApiError::invalid(Some(param), format!("the {param} cannot be enforced: {e}")))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use strata_model::gguf::Gguf;
    use strata_model::grammar::GrammarVocab;
    use strata_model::tokenizer::Tokenizer;

    use super::*;

    const SMOLLM2: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/SmolLM2-135M-Instruct.Q4_1.gguf");

    fn vocab() -> (Arc<Tokenizer>, GrammarVocab) {
        assert!(std::path::Path::new(SMOLLM2).exists(), "{SMOLLM2} is missing: the set-up script fetches it");
        let tokenizer = Arc::new(Tokenizer::from_gguf(&Gguf::open(SMOLLM2).unwrap()).unwrap());
        let vocab = GrammarVocab::new(tokenizer.clone()).unwrap();
        (tokenizer, vocab)
    }

    /// Feeds `text`'s tokens through `shape`'s grammar: `Ok(complete)` when every token
    /// was allowed (and whether the answer may end there), `Err(at)` at the first refused.
    fn feed(tok: &Tokenizer, vocab: &GrammarVocab, shape: &Shape, text: &str) -> Result<bool, String> {
        let mut c = vocab.lark(&lark(shape)).unwrap_or_else(|e| panic!("{e}\n{}", lark(shape)));
        let mut at = String::new();
        for t in tok.encode(text, false).unwrap() {
            let allowed = c.allowed().unwrap();
            if !strata_model::grammar::allows(&allowed, t) || c.advance(t).is_err() {
                return Err(format!("{at}|{}", String::from_utf8_lossy(tok.token_bytes(t))));
            }
            at.push_str(&String::from_utf8_lossy(tok.token_bytes(t)));
        }
        Ok(c.is_complete() && strata_model::grammar::allows(&c.allowed().unwrap(), vocab.end_token()))
    }

    fn tools() -> Vec<Tool> {
        let weather = json!({ "type": "object", "properties": {
            "city": { "type": "string" }, "days": { "type": "integer" } },
            "required": ["city"], "additionalProperties": false });
        vec![
            Tool { name: "get_weather".into(), parameters: weather, strict: true },
            Tool { name: "ping".into(), parameters: json!({ "type": "object" }), strict: false },
        ]
    }

    #[test]
    fn response_formats_are_read_and_bad_ones_named() {
        assert_eq!(response_schema(None).unwrap(), None);
        assert_eq!(response_schema(Some(&json!({ "type": "text" }))).unwrap(), None);
        assert_eq!(
            response_schema(Some(&json!({ "type": "json_object" }))).unwrap(),
            Some(json!({ "type": "object" }))
        );
        let schema = json!({ "type": "object", "properties": { "a": { "type": "integer" } } });
        let openai = json!({ "type": "json_schema", "json_schema": { "name": "x", "strict": true, "schema": schema } });
        assert_eq!(response_schema(Some(&openai)).unwrap(), Some(schema.clone()));
        let llama = json!({ "type": "json_object", "schema": schema });
        assert_eq!(response_schema(Some(&llama)).unwrap(), Some(schema));
        for (bad, says) in [
            (json!({ "type": "yaml" }), "`yaml`"),
            (json!("json"), "`type`"),
            (json!({ "type": "json_schema" }), "json_schema must be an object"),
            (json!({ "type": "json_schema", "json_schema": { "name": "x" } }), "schema is required"),
            (json!({ "type": "json_schema", "json_schema": { "schema": 3 } }), "JSON schema object"),
        ] {
            let e = response_schema(Some(&bad)).unwrap_err();
            assert_eq!(e.param, Some("response_format"));
            assert!(e.message.contains(says), "{bad}: {}", e.message);
        }
    }

    #[test]
    fn a_schema_holds_the_answer_to_valid_json_with_fixed_separators() {
        let (tok, vocab) = vocab();
        let shape = Shape::Json(tools()[0].parameters.clone());
        assert_eq!(feed(&tok, &vocab, &shape, r#"{"city": "Oslo", "days": 3}"#), Ok(true));
        assert_eq!(feed(&tok, &vocab, &shape, r#"{"city": "Oslo""#), Ok(false), "an object cut short");
        for bad in [r#"{"town": "Oslo"}"#, r#"{"city": 3}"#, r#"{"city":"Oslo"}"#, "{\n  \"city\""] {
            assert!(feed(&tok, &vocab, &shape, bad).is_err(), "{bad} was allowed");
        }
    }

    #[test]
    fn hermes_calls_follow_their_tools_schemas() {
        let (tok, vocab) = vocab();
        let tools = tools();
        let any = Shape::Calls(Calls::new(ToolFormat::Hermes, &tools, &ToolChoice::Required, false));
        let one = r#"{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}"#.to_owned() + "\n</tool_call>";
        assert_eq!(feed(&tok, &vocab, &any, &one), Ok(true));
        let two = format!("{one}\n<tool_call>\n{{\"name\": \"ping\", \"arguments\": {{}}}}\n</tool_call>");
        assert_eq!(feed(&tok, &vocab, &any, &two), Ok(true), "parallel calls");
        let single = Shape::Calls(Calls::new(ToolFormat::Hermes, &tools, &ToolChoice::Required, true));
        assert!(feed(&tok, &vocab, &single, &two).is_err(), "a second call where one is allowed");
        for bad in [
            r#"{"name": "get_time", "arguments": {}}"#,
            r#"{"name": "get_weather", "arguments": {"city": "Paris", "country": "FR"}}"#,
            r#"{"name": "get_weather", "arguments": {"days": 2}}"#.trim_end(),
        ] {
            let text = format!("{bad}\n</tool_call>");
            assert!(feed(&tok, &vocab, &any, &text).is_err(), "{bad} was allowed");
        }
        // A named call continues the opening the prompt ends with: its arguments.
        let named =
            Shape::Calls(Calls::new(ToolFormat::Hermes, &tools, &ToolChoice::Named("get_weather".into()), true));
        assert_eq!(feed(&tok, &vocab, &named, "{\"city\": \"Rome\"}}\n</tool_call>"), Ok(true));
        assert!(feed(&tok, &vocab, &named, "{\"days\": 1}}\n</tool_call>").is_err());
    }

    #[test]
    fn xml_calls_take_any_text_in_a_string_parameter() {
        let (tok, vocab) = vocab();
        let tools = tools();
        let any = Shape::Calls(Calls::new(ToolFormat::Xml, &tools, &ToolChoice::Required, false));
        let call = "<function=get_weather>\n<parameter=city>\nif a < b { x = \"</p>\" }\n</parameter>\n\
                    <parameter=days>\n3\n</parameter>\n</function>\n</tool_call>";
        assert_eq!(feed(&tok, &vocab, &any, call), Ok(true));
        let no_days = "<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n</function>\n</tool_call>";
        assert_eq!(feed(&tok, &vocab, &any, no_days), Ok(true), "an optional parameter left out");
        let free = "<function=ping>\n<parameter=host>\nexample.org\n</parameter>\n</function>\n</tool_call>";
        assert_eq!(feed(&tok, &vocab, &any, free), Ok(true), "a tool without properties takes any");
        for bad in [
            "<function=get_weather>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>",
            "<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n<parameter=days>\nthree\n</parameter>",
            "<function=nope>\n",
        ] {
            assert!(feed(&tok, &vocab, &any, bad).is_err(), "{bad:?} was allowed");
        }
        let named = Shape::Calls(Calls::new(ToolFormat::Xml, &tools, &ToolChoice::Named("get_weather".into()), true));
        let rest = "<parameter=city>\nOslo\n</parameter>\n</function>\n</tool_call>";
        assert_eq!(feed(&tok, &vocab, &named, rest), Ok(true));
    }

    #[test]
    fn beside_tools_a_schema_allows_content_or_calls() {
        let (tok, vocab) = vocab();
        let tools = tools();
        let calls = Calls {
            or_content: Some(Alternative::Schema(
                json!({ "type": "object", "properties": { "answer": { "type": "string" } },
                "required": ["answer"] }),
            )),
            ..Calls::new(ToolFormat::Hermes, &tools, &ToolChoice::Auto, false)
        };
        let shape = Shape::Calls(calls);
        assert_eq!(feed(&tok, &vocab, &shape, r#"{"answer": "42"}"#), Ok(true));
        let call = "<tool_call>\n{\"name\": \"ping\", \"arguments\": {}}\n</tool_call>";
        assert_eq!(feed(&tok, &vocab, &shape, call), Ok(true));
        assert!(feed(&tok, &vocab, &shape, "The answer is 42").is_err());
    }

    /// Strict tools under `tool_choice: auto`: any text, or text then calls whose
    /// arguments follow the schemas, in either markup.
    #[test]
    fn strict_tools_allow_text_and_hold_the_calls_the_model_opens() {
        let (tok, vocab) = vocab();
        let tools = tools();
        let shape = |format| {
            Shape::Calls(Calls {
                or_content: Some(Alternative::Text),
                ..Calls::new(format, &tools, &ToolChoice::Auto, false)
            })
        };
        let hermes = shape(ToolFormat::Hermes);
        let call = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>";
        for ok in [
            "It is sunny in Oslo, <b>usually</b>.\n\nNo call needed.",
            "",
            call,
            &format!("<think>\nThe user wants the weather.\n</think>\n\nLet me look.\n{call}"),
            &format!("{call}\n{call}"),
        ] {
            assert_eq!(feed(&tok, &vocab, &hermes, ok), Ok(true), "{ok:?} was refused");
        }
        for bad in [
            "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"days\": 3}}",
            "<tool_call>\n{\"name\": \"nope\"",
            "<tool_call> {",
            &format!("{call}\nThat was the call."),
        ] {
            assert!(feed(&tok, &vocab, &hermes, bad).is_err(), "{bad:?} was allowed");
        }
        let xml = shape(ToolFormat::Xml);
        let call = "Checking.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n</function>\n</tool_call>";
        assert_eq!(feed(&tok, &vocab, &xml, call), Ok(true));
        let wrong = "<tool_call>\n<function=get_weather>\n<parameter=days>\nthree\n</parameter>";
        assert!(feed(&tok, &vocab, &xml, wrong).is_err());
    }
}
