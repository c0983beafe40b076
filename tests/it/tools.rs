//! Tool calls and the Anthropic Messages API through `strata serve`: SmolLM2 (a real
//! instruction-tuned model) under a Qwen3-style template written for the tests
//! (`tests/fixtures/qwen3-tools.jinja`, Hermes calls), driven by the official OpenAI and
//! Anthropic clients and by raw HTTP.

use serde_json::{Value, json};

use crate::serve::{Server, python};
use crate::support::{SMOL_Q4_1, fixture, model, path_str};

const WEATHER: &str = r#"[{"type": "function", "function": {"name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
    "additionalProperties": false}}}]"#;

fn request(extra: Value) -> String {
    let mut body = json!({
        "messages": [{ "role": "user", "content": "What is the weather in Paris?" }],
        "tools": serde_json::from_str::<Value>(WEATHER).unwrap(),
        "max_tokens": 40,
        "temperature": 0,
    });
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    body.to_string()
}

/// The `content` of every streamed delta, joined, and whether any delta held a call.
fn streamed_content(body: &str) -> (String, bool) {
    let mut text = String::new();
    let mut calls = false;
    for data in body.lines().filter_map(|l| l.strip_prefix("data: ")).filter(|d| *d != "[DONE]") {
        let chunk: Value = serde_json::from_str(data).unwrap();
        let delta = &chunk["choices"][0]["delta"];
        text.push_str(delta["content"].as_str().unwrap_or(""));
        calls |= delta.get("tool_calls").is_some();
    }
    (text, calls)
}

#[test]
fn tool_calls_round_trip_through_the_openai_and_anthropic_clients_and_bad_tool_requests_are_refused() {
    let template = fixture("qwen3-tools.jinja");
    let server = Server::start(&model(SMOL_Q4_1), &["--chat-template-file", path_str(&template)]);

    // The full loop with the official client: a forced call, whole and streamed, the
    // tool's result, a final answer.
    let out = python("tool_loop.py", &[&format!("http://{}/v1", server.addr), "SmolLM2-135M-Instruct.Q4_1"]);
    eprintln!("tool loop transcript: {}", out.lines().last().unwrap());

    // The Messages API with Anthropic's client: the same greedy text as the OpenAI
    // endpoint, streaming, stop sequences, token counting, a tool-use round trip.
    let prompt = "What is the capital of France? Answer in one sentence.";
    let body = json!({ "messages": [{ "role": "user", "content": prompt }], "max_tokens": 24, "temperature": 0 });
    let greedy = server.post("/v1/chat/completions", &body.to_string()).json();
    let greedy = greedy["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
    let out =
        python("anthropic_client.py", &[&format!("http://{}", server.addr), "SmolLM2-135M-Instruct.Q4_1", &greedy]);
    eprintln!("anthropic client transcript: {}", out.lines().last().unwrap());
    // Its errors are in Anthropic's shape.
    let r = server.post("/v1/messages", &json!({ "model": "SmolLM2-135M-Instruct.Q4_1", "messages": [] }).to_string());
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["type"], "error", "{}", r.body);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error", "{}", r.body);
    let r = server.post(
        "/v1/messages",
        &json!({ "model": "other", "max_tokens": 4,
        "messages": [{ "role": "user", "content": "hi" }] })
        .to_string(),
    );
    assert_eq!((r.status, r.json()["error"]["type"].as_str()), (404, Some("not_found_error")), "{}", r.body);

    // `required` opens a call and a grammar holds the model to the declared tools and
    // their schemas: what this small model wrote in such a block before (no declared
    // tool) cannot happen. Whole and streamed agree.
    let one_call = json!({ "tool_choice": "required", "parallel_tool_calls": false });
    let whole = server.post("/v1/chat/completions", &request(one_call.clone()));
    assert_eq!(whole.status, 200, "{}", whole.body);
    let whole = whole.json();
    let choice = &whole["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{whole:#}");
    let call = &choice["message"]["tool_calls"][0]["function"];
    assert_eq!(call["name"], "get_weather", "{whole:#}");
    let args: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
    assert!(args["city"].is_string() && args.as_object().unwrap().len() == 1, "{args}");
    let mut streamed = one_call;
    streamed["stream"] = json!(true);
    let stream = server.post("/v1/chat/completions", &request(streamed));
    assert_eq!(streamed_content(&stream.body), (String::new(), true), "{}", stream.body);
    // `none`: the tools are not offered, and the answer is plain content.
    let none = server.post("/v1/chat/completions", &request(json!({ "tool_choice": "none" }))).json();
    let auto = server.post("/v1/chat/completions", &request(json!({}))).json();
    assert!(
        none["usage"]["prompt_tokens"].as_u64() < auto["usage"]["prompt_tokens"].as_u64(),
        "the tools are described in the prompt only when offered: {none} {auto}"
    );

    // Bad tool requests are 400s naming the parameter, and the server keeps serving.
    let cases: &[(Value, &str, &str)] = &[
        (json!({ "tools": [{ "type": "function" }] }), "tools", "`function` must be an object"),
        (json!({ "tools": [{ "type": "retrieval", "function": {} }] }), "tools", "`type` must be \"function\""),
        (json!({ "tools": [{ "type": "function", "function": { "name": "a b" } }] }), "tools", "may hold only"),
        (
            json!({ "tool_choice": { "type": "function", "function": { "name": "nope" } } }),
            "tool_choice",
            "does not declare",
        ),
        (json!({ "tool_choice": "sometimes" }), "tool_choice", "is not one of"),
        (json!({ "tools": [], "tool_choice": "required" }), "tool_choice", "needs `tools`"),
        (
            json!({ "messages": [{ "role": "assistant", "tool_calls": [{ "id": "c", "type": "function",
                "function": { "name": "get_weather", "arguments": "{not json" } }] }] }),
            "messages",
            "is not a JSON object",
        ),
    ];
    for (extra, param, needle) in cases {
        let r = server.post("/v1/chat/completions", &request(extra.clone()));
        assert_eq!(r.status, 400, "{extra}: {}", r.body);
        let error = &r.json()["error"];
        assert_eq!(error["param"], *param, "{extra}: {}", r.body);
        assert!(error["message"].as_str().unwrap().contains(needle), "{extra}: {}", r.body);
    }
    assert_eq!(server.get("/health").status, 200);
}
