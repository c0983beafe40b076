//! `strata serve` returns a Qwen3-family model's `<think>` reasoning apart from its
//! answer, and passes `chat_template_kwargs` to the template: a real server with a
//! Qwen3-style template (written here) that opens `<think>` in the generation prompt
//! unless `enable_thinking` is false.

use serde_json::{Value, json};

use crate::serve::Server;
use crate::support::fixture;

const QWEN3_STYLE: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
{% if add_generation_prompt %}<|im_start|>assistant\n\
{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}{% endif %}";

fn chat(extra: Value) -> String {
    let mut body = json!({
        "messages": [{ "role": "user", "content": "Why is the sky blue?" }],
        "max_tokens": 12,
        "temperature": 0,
    });
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    body.to_string()
}

/// The text of every streamed delta's `field`, joined.
fn streamed(body: &str, field: &str) -> String {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| {
            serde_json::from_str::<Value>(d).unwrap()["choices"][0]["delta"][field].as_str().unwrap_or("").to_owned()
        })
        .collect()
}

#[test]
fn reasoning_is_returned_apart_and_template_kwargs_reach_the_template() {
    let template = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("qwen3-style-template.jinja");
    std::fs::write(&template, QWEN3_STYLE).unwrap();
    let model = fixture("tiny-qwen35.gguf");
    let server = Server::start(&model, &["--chat-template-file", template.to_str().unwrap()]);
    let post = |extra: Value| {
        let r = server.post("/v1/chat/completions", &chat(extra));
        assert_eq!(r.status, 200, "{}", r.body);
        r
    };

    // The raw text, as `none` keeps it: the template opened <think>, so the model's words
    // are its reasoning (this random model never closes it).
    let raw = post(json!({ "reasoning_format": "none" })).json();
    let raw_text = raw["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
    assert!(!raw_text.is_empty() && !raw_text.contains("</think>"), "{raw}");
    assert!(raw["choices"][0]["message"].get("reasoning_content").is_none(), "{raw}");

    let split = post(json!({})).json();
    let message = &split["choices"][0]["message"];
    assert_eq!(message["reasoning_content"].as_str(), Some(raw_text.as_str()), "{split}");
    assert_eq!(message["content"], "", "{split}");
    // (The prompt's cached tokens differ: the second request resumes the first's.)
    for n in ["prompt_tokens", "completion_tokens"] {
        assert_eq!(split["usage"][n], raw["usage"][n], "the same prompt and answer");
    }

    // Streamed: the same reasoning in `delta.reasoning_content`, no content.
    let stream = post(json!({ "stream": true }));
    assert_eq!(streamed(&stream.body, "reasoning_content"), raw_text, "{}", stream.body);
    assert_eq!(streamed(&stream.body, "content"), "", "{}", stream.body);

    // enable_thinking = false reaches the template: it closes the reasoning in the prompt
    // (more prompt tokens), so the answer is content.
    let off = post(json!({ "chat_template_kwargs": { "enable_thinking": false } })).json();
    let off_prompt = off["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(off_prompt > raw["usage"]["prompt_tokens"].as_u64().unwrap(), "{off}");
    let content = off["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!content.is_empty() && off["choices"][0]["message"].get("reasoning_content").is_none(), "{off}");

    // Bad values are 400s naming the parameter.
    let r = server.post("/v1/chat/completions", &chat(json!({ "reasoning_format": "verbose" })));
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"]["param"], "reasoning_format", "{}", r.body);
    let r = server.post("/v1/chat/completions", &chat(json!({ "chat_template_kwargs": [1, 2] })));
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"]["param"], "chat_template_kwargs", "{}", r.body);
}

/// The Messages API returns the same reasoning as a `thinking` block (streamed as
/// `thinking_delta`s) when `thinking` is enabled, and asks the template for none otherwise.
#[test]
fn the_messages_api_returns_reasoning_as_thinking_blocks() {
    let template = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("qwen3-style-template-messages.jinja");
    std::fs::write(&template, QWEN3_STYLE).unwrap();
    let model = fixture("tiny-qwen35.gguf");
    let server = Server::start(&model, &["--chat-template-file", template.to_str().unwrap()]);
    let raw = server.post("/v1/chat/completions", &chat(json!({ "reasoning_format": "none" }))).json();
    let raw_text = raw["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
    let messages = |extra: Value| {
        let mut body = json!({
            "model": "tiny-qwen35",
            "messages": [{ "role": "user", "content": "Why is the sky blue?" }],
            "max_tokens": 12,
            "temperature": 0,
        });
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let r = server.post("/v1/messages", &body.to_string());
        assert_eq!(r.status, 200, "{}", r.body);
        r
    };
    let whole = messages(json!({ "thinking": { "type": "enabled", "budget_tokens": 1024 } })).json();
    assert_eq!(whole["content"][0]["type"], "thinking", "{whole:#}");
    assert_eq!(whole["content"][0]["thinking"].as_str(), Some(raw_text.as_str()), "{whole:#}");
    // Input tokens are those computed, beside those read from the prefix cache.
    let input = |v: &Value| {
        v["usage"]["input_tokens"].as_u64().unwrap() + v["usage"]["cache_read_input_tokens"].as_u64().unwrap()
    };
    assert_eq!(Some(input(&whole)), raw["usage"]["prompt_tokens"].as_u64(), "the same prompt");

    let stream = messages(json!({ "thinking": { "type": "enabled", "budget_tokens": 1024 }, "stream": true }));
    let mut thinking = String::new();
    let mut names = Vec::new();
    for line in stream.body.lines() {
        if let Some(name) = line.strip_prefix("event: ") {
            names.push(name.to_owned());
        } else if let Some(data) = line.strip_prefix("data: ") {
            let e: Value = serde_json::from_str(data).unwrap();
            thinking.push_str(e["delta"]["thinking"].as_str().unwrap_or(""));
        }
    }
    assert_eq!(thinking, raw_text, "{}", stream.body);
    assert_eq!(names.first().map(String::as_str), Some("message_start"), "{names:?}");
    assert_eq!(names.last().map(String::as_str), Some("message_stop"), "{names:?}");

    // Without `thinking` the template is asked for none: the answer is text.
    let plain = messages(json!({})).json();
    assert_eq!(plain["content"][0]["type"], "text", "{plain:#}");
    assert!(Some(input(&plain)) > raw["usage"]["prompt_tokens"].as_u64(), "{plain:#}");
}
