//! Structured output through `strata serve`: `response_format` (a strict JSON schema,
//! `json_object`) enforced by a grammar on the last stage, driven by the official OpenAI
//! client on SmolLM2, on one machine and over three nodes, which answer the same.

use serde_json::{Value, json};

use crate::serve::{Server, python};
use crate::support::{Cluster, SMOL_Q4_1, model, model_dir, path_str, strata, strata_json};

const MODEL_ID: &str = "SmolLM2-135M-Instruct.Q4_1";

/// What `structured.py` saw against `server`: its last line.
fn drive(server: &Server) -> Value {
    let out = python("structured.py", &[&format!("http://{}/v1", server.addr), MODEL_ID]);
    serde_json::from_str(out.lines().last().unwrap()).unwrap()
}

#[test]
fn response_formats_validate_for_20_seeds_and_one_node_answers_as_three() {
    let m = model(SMOL_Q4_1);
    let one = Server::start(&m, &[]);
    let alone = drive(&one);
    eprintln!("one node: {alone}");
    // Every constrained token's mask was computed, and the time it took is shown.
    let masks = one.metric("strata_grammar_masks_total");
    assert!(masks > 20 * 10, "{masks} masks for 20 answers of JSON");
    assert_eq!(alone["strict"].as_array().map(Vec::len), Some(4), "four answers beside strict tools");
    // A float: its line is there.
    let metrics = one.get("/metrics").body;
    assert!(metrics.contains("strata_grammar_mask_seconds_total "), "{metrics}");

    // Bad formats and schemas are 400s naming response_format; the server keeps serving.
    let chat = |extra: Value| {
        let mut body = json!({ "messages": [{ "role": "user", "content": "hi" }], "max_tokens": 4 });
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        one.post("/v1/chat/completions", &body.to_string())
    };
    let r = chat(json!({ "tools": [{ "type": "function", "function": { "name": "f", "strict": "yes" } }] }));
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("`function.strict` must be true or false"), "{}", r.body);
    for (format, needle) in [
        (json!({ "type": "yaml" }), "`yaml`"),
        (json!({ "type": "json_schema", "json_schema": { "name": "x" } }), "schema is required"),
        (
            json!({ "type": "json_schema", "json_schema": { "schema": { "type": "no-such-type" } } }),
            "cannot be enforced",
        ),
    ] {
        let r = chat(json!({ "response_format": format }));
        assert_eq!(r.status, 400, "{format}: {}", r.body);
        assert_eq!(r.json()["error"]["param"], "response_format", "{}", r.body);
        assert!(r.json()["error"]["message"].as_str().unwrap().contains(needle), "{format}: {}", r.body);
    }
    // Completions take a schema too.
    let r = one.post(
        "/v1/completions",
        &json!({ "prompt": "A JSON list of three primes: ", "max_tokens": 30, "temperature": 0,
            "response_format": { "type": "json_schema", "json_schema": { "schema":
                { "type": "array", "items": { "type": "integer" }, "minItems": 3, "maxItems": 3 } } } })
        .to_string(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let text = r.json()["choices"][0]["text"].as_str().unwrap().to_owned();
    let primes: Vec<i64> = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    assert_eq!(primes.len(), 3, "{text}");
    drop(one);

    // Three nodes: the last stage masks; every answer, sampled ones included, is the same.
    let cluster = Cluster::start(3, &model_dir(std::slice::from_ref(&m)));
    let flags = cluster.flags();
    let three = Server::start(&m, &flags.iter().map(String::as_str).collect::<Vec<_>>());
    let piped = drive(&three);
    assert_eq!(piped, alone, "three nodes answer as one");
}

/// `strata run --json-schema` and `--grammar`, alone and batched; a grammar that does not
/// compile is a clear error.
#[test]
fn run_holds_its_answer_to_a_json_schema_or_a_grammar() {
    let m = model(SMOL_Q4_1);
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let schema = dir.join(format!("person-{}.json", std::process::id()));
    std::fs::write(
        &schema,
        r#"{"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0}}, "required": ["name", "age"], "additionalProperties": false}"#,
    )
    .unwrap();
    let grammar = dir.join(format!("yes-no-{}.lark", std::process::id()));
    std::fs::write(&grammar, "start: \"yes\" | \"no\"\n").unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "--model", path_str(&m), "--chat", "-n", "60", "--json"];
        args.extend_from_slice(extra);
        strata_json(&args)
    };
    let person = |v: &Value| {
        assert_eq!(v["stop_reason"], "stop", "{v}");
        let text = v["text"].as_str().unwrap();
        let p: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        let keys: Vec<&String> = p.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["name", "age"], "{text}");
        assert!(p["name"].is_string() && p["age"].as_u64().is_some(), "{text}");
    };
    person(&run(&["-p", "Describe a person as JSON.", "--json-schema", path_str(&schema)]));
    let sampled = run(&["-p", "Describe a person.", "--json-schema", path_str(&schema), "-t", "0.9", "-s", "7"]);
    person(&sampled);
    let batched =
        run(&["-p", "Describe a person.", "-p", "A JSON person, please.", "--json-schema", path_str(&schema)]);
    batched.as_array().unwrap().iter().for_each(person);
    let yes_no = run(&["-p", "Is the sky green?", "--grammar", path_str(&grammar)]);
    assert!(["yes", "no"].contains(&yes_no["text"].as_str().unwrap()), "{yes_no}");

    // A schema given as a grammar does not compile: the error names the flag and the file.
    let o =
        strata().args(["run", "--model", path_str(&m), "-p", "x", "--grammar", path_str(&schema)]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--grammar") && err.contains("person-"), "{err}");
}
