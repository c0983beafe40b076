//! Tool calls in chat templates: which markup a template teaches its model, and how tools
//! and tool turns reach a template that knows nothing of them.

use serde_json::Value;

use super::ChatMessage;

/// One call an assistant turn made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments, a JSON object.
    pub arguments: Value,
}

/// The markup a model writes a tool call in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    /// `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Qwen2.5, Qwen3).
    Hermes,
    /// `<tool_call><function=NAME><parameter=P>value</parameter></function></tool_call>`
    /// (Qwen3-Coder, Qwen3.5/3.6).
    Xml,
    /// The template knows nothing of tools (SmolLM2's): they are described in the system
    /// turn, and the model is asked for the Hermes form.
    Generic,
}

pub(crate) const OPEN: &str = "<tool_call>";
pub(crate) const CLOSE: &str = "</tool_call>";

impl ToolFormat {
    /// The format a template's own text teaches: its examples of a call.
    pub fn of_template(source: &str) -> ToolFormat {
        if source.contains("<function=") {
            ToolFormat::Xml
        } else if source.contains(OPEN) {
            ToolFormat::Hermes
        } else {
            if source.contains("tools") {
                // Another family's tool markup (Llama 3.1's, Mistral's): its calls would not
                // be recognised, so the tools are described the generic way instead.
                tracing::warn!(
                    "the chat template mentions tools in a markup strata does not parse; tools will be described in the system turn instead"
                );
            }
            ToolFormat::Generic
        }
    }

    /// The text that begins a call, up to where the model continues: with `name`, the
    /// call of that function (a forced `tool_choice`), else any call.
    pub fn call_opening(self, name: Option<&str>) -> String {
        match (self, name) {
            (_, None) => format!("{OPEN}\n"),
            (ToolFormat::Xml, Some(n)) => format!("{OPEN}\n<function={n}>\n"),
            (ToolFormat::Hermes | ToolFormat::Generic, Some(n)) => {
                format!("{OPEN}\n{{\"name\": {}, \"arguments\": ", Value::from(n))
            }
        }
    }
}

/// A call as the Hermes form writes it.
fn hermes(call: &ToolCall) -> String {
    let body = serde_json::json!({ "name": call.name, "arguments": call.arguments });
    format!("{OPEN}\n{body}\n{CLOSE}")
}

/// `messages` for a template that knows nothing of tools: the tools described in the system
/// turn (one is added when there is none), calls written into the assistant's text, and tool
/// results as user turns, since such templates know only system, user and assistant.
pub(super) fn describe_in_system(messages: &[ChatMessage], tools: &[Value]) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
    for m in messages {
        let mut m = m.clone();
        if !m.tool_calls.is_empty() {
            let calls: Vec<String> = m.tool_calls.iter().map(hermes).collect();
            if !m.content.is_empty() {
                m.content.push('\n');
            }
            m.content.push_str(&calls.join("\n"));
            m.tool_calls.clear();
        }
        if m.role == "tool" {
            m = ChatMessage::new("user", format!("<tool_response>\n{}\n</tool_response>", m.content));
        }
        out.push(m);
    }
    if tools.is_empty() {
        return out;
    }
    let listing: Vec<String> = tools.iter().map(Value::to_string).collect();
    let description = format!(
        "You can call functions to help answer. Their signatures, one JSON object per line:\n\
         <tools>\n{}\n</tools>\n\n\
         To call one, answer with nothing but this, one block per call:\n\
         {OPEN}\n{{\"name\": \"<the function's name>\", \"arguments\": {{<its arguments as a JSON object>}}}}\n{CLOSE}\n\
         A function's result comes back in a <tool_response> block.",
        listing.join("\n")
    );
    match out.first_mut() {
        Some(first) if first.role == "system" => first.content = format!("{}\n\n{description}", first.content),
        _ => out.insert(0, ChatMessage::new("system", description)),
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_format_follows_the_template_s_own_examples() {
        assert_eq!(ToolFormat::of_template("{{ '<tool_call>\\n<function=' }}"), ToolFormat::Xml);
        assert_eq!(ToolFormat::of_template("{{- '<tool_call>\\n{\"name\": ' }}"), ToolFormat::Hermes);
        assert_eq!(ToolFormat::of_template("{% for m in messages %}{% endfor %}"), ToolFormat::Generic);
        assert_eq!(ToolFormat::Xml.call_opening(Some("f")), "<tool_call>\n<function=f>\n");
        assert_eq!(ToolFormat::Hermes.call_opening(Some("f")), "<tool_call>\n{\"name\": \"f\", \"arguments\": ");
        assert_eq!(ToolFormat::Generic.call_opening(None), "<tool_call>\n");
    }

    #[test]
    fn a_template_without_tools_gets_them_in_its_system_turn() {
        let tool =
            json!({ "type": "function", "function": { "name": "get_weather", "parameters": { "type": "object" } } });
        let call = ToolCall { id: "call_1".into(), name: "get_weather".into(), arguments: json!({ "city": "Oslo" }) };
        let history = vec![
            ChatMessage::new("user", "Weather in Oslo?"),
            ChatMessage { role: "assistant".into(), tool_calls: vec![call], ..ChatMessage::default() },
            ChatMessage {
                role: "tool".into(),
                content: "-3 C".into(),
                tool_call_id: Some("call_1".into()),
                ..Default::default()
            },
        ];
        let out = describe_in_system(&history, std::slice::from_ref(&tool));
        assert_eq!(out.len(), 4);
        assert_eq!(out[0].role, "system");
        assert!(out[0].content.contains(&tool.to_string()), "{}", out[0].content);
        let written = json!({ "name": "get_weather", "arguments": { "city": "Oslo" } });
        assert_eq!(out[2].content, format!("<tool_call>\n{written}\n</tool_call>"));
        assert_eq!(out[3], ChatMessage::new("user", "<tool_response>\n-3 C\n</tool_response>"));

        // A system turn of the caller's own keeps its text first.
        let out = describe_in_system(&[ChatMessage::new("system", "Be brief.")], &[tool]);
        assert_eq!(out.len(), 1);
        assert!(out[0].content.starts_with("Be brief.\n\nYou can call functions"), "{}", out[0].content);
    }
}
