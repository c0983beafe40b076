//! `strata serve`: a real server process on 127.0.0.1 (ephemeral port), driven by the
//! official OpenAI Python client, raw HTTP, and headless Chromium.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{Cluster, fixture, model_dir, path_str, smol_q8_0, strata, strata_json, strip_ansi};

/// A running `strata serve`; killed on drop, on every exit path of a test.
pub(crate) struct Server {
    child: Child,
    pub(crate) addr: SocketAddr,
    log: std::path::PathBuf,
}

impl Server {
    pub(crate) fn start(model: &Path, extra: &[&str]) -> Server {
        let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let log =
            dir.join(format!("serve-{}-{}.log", std::process::id(), model.file_stem().unwrap().to_string_lossy()));
        let mut child = strata()
            .args(["serve", "--model", path_str(model), "--listen", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn strata serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let addr =
                    line.strip_prefix("listening on http://").or_else(|| line.strip_prefix("listening on https://"));
                if let Some(addr) = addr {
                    let _ = tx.send(addr.parse::<SocketAddr>().expect("address"));
                }
            }
        });
        let server = |addr| Server { child, addr, log: log.clone() };
        match rx.recv_timeout(Duration::from_secs(300)) {
            Ok(addr) => server(addr),
            Err(_) => {
                let mut s = server("0.0.0.0:0".parse().unwrap());
                let _ = s.child.kill();
                panic!("strata serve did not start:\n{}", std::fs::read_to_string(&s.log).unwrap_or_default());
            }
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(crate) fn get(&self, path: &str) -> Reply {
        http(self.addr, "GET", path, "")
    }

    pub(crate) fn post(&self, path: &str, body: &str) -> Reply {
        http(self.addr, "POST", path, body)
    }

    /// A gauge or counter of `/metrics`.
    pub(crate) fn metric(&self, name: &str) -> u64 {
        let m = self.get("/metrics").body;
        m.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{m}"))
    }

    /// Waits (at most 30 s) until no sequence is active or held (beyond those the prefix
    /// cache keeps).
    fn wait_idle(&self) {
        let t0 = Instant::now();
        loop {
            let active = self.active();
            if active == (0, 0) {
                return;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "sequences still active or held after 30 s: {active:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Active sequences by `/metrics`, and the most any node holds by `/v1/cluster`.
    fn active(&self) -> (u64, u64) {
        let metric = self.metric("strata_active_sequences");
        let held = self.held().into_iter().max().unwrap_or(0);
        (metric, held)
    }

    /// Sequences each node holds caches for, in pipeline order (`/v1/cluster`), beyond the
    /// finished ones the prefix cache keeps (every stage holds those).
    fn held(&self) -> Vec<u64> {
        let cached = self.metric("strata_prefix_cache_sequences");
        let c = self.get("/v1/cluster").json();
        c["nodes"].as_array().unwrap().iter().map(|n| n["sequences"].as_u64().unwrap().saturating_sub(cached)).collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- strata serve log ---\n{}", std::fs::read_to_string(&self.log).unwrap_or_default());
        }
    }
}

pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) body: String,
}

impl Reply {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// A minimal HTTP/1.1 client: one request per connection.
fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> Reply {
    let mut s = TcpStream::connect(addr).expect("connect");
    send(&mut s, method, path, body);
    read_reply(s, Vec::new())
}

/// Writes one request on `s` (the server closes the connection after its reply).
fn send(s: &mut TcpStream, method: &str, path: &str, body: &str) {
    let addr = s.peer_addr().unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
}

/// Reads a streamed reply on `s` until `events` server-sent events (or its end, `[DONE]`)
/// have arrived; returns what it read, for [`read_reply`] to go on from.
fn read_events(s: &mut TcpStream, events: usize) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let (mut raw, mut buf) = (Vec::new(), [0u8; 4096]);
    loop {
        let seen = String::from_utf8_lossy(&raw);
        if seen.matches("data: ").count() >= events || seen.contains("[DONE]") {
            return raw;
        }
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended early: {seen}");
        raw.extend_from_slice(&buf[..n]);
    }
}

/// Reads the reply on `s` to its end; `raw` holds what was already read of it.
fn read_reply(mut s: TcpStream, mut raw: Vec<u8>) -> Reply {
    s.set_read_timeout(Some(Duration::from_secs(600))).unwrap();
    s.read_to_end(&mut raw).expect("read reply");
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = raw.split_once("\r\n\r\n").expect("HTTP head");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(rest) } else { rest.to_owned() };
    Reply { status, body }
}

pub(crate) fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

pub(crate) fn python(script: &str, args: &[&str]) -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/py/");
    let o = Command::new("python3").arg(format!("{path}{script}")).args(args).output().expect("run python3");
    assert!(
        o.status.success(),
        "{script} failed (needs `bash scripts/setup.sh --test` for the openai package):\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

const MAX_TOKENS: u32 = 24;

/// SmolLM2 Q8_0 (a real instruction-tuned model, so stop strings and chat make sense)
/// served by three `strata node` processes, with the official OpenAI client:
/// non-streaming and streaming chat, /v1/models, stop strings, seeds, greedy output
/// equal to `strata run`'s on one machine, and 1/4/8 concurrent streams each equal to
/// the same request alone.
#[test]
fn openai_client_against_smollm2_on_three_nodes() {
    let model = smol_q8_0();
    let prompt = "What is the capital of France? Answer in one sentence.";
    let n = MAX_TOKENS.to_string();
    let run = strata_json(&[
        "run",
        "--model",
        path_str(&model),
        "--chat",
        "--prompt",
        prompt,
        "--max-tokens",
        &n,
        "--ctx",
        "1024",
        "--json",
    ]);
    let greedy_text = run["text"].as_str().unwrap();
    let cluster = Cluster::start(3, &model_dir(std::slice::from_ref(&model)));
    let mut args = vec!["--ctx", "1024", "--max-seqs", "8"];
    let flags = cluster.flags();
    args.extend(flags.iter().map(String::as_str));
    let server = Server::start(&model, &args);
    let c = server.get("/v1/cluster").json();
    let layers: Vec<(u64, u64)> = c["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["layers"][0].as_u64().unwrap(), n["layers"][1].as_u64().unwrap()))
        .collect();
    assert_eq!(layers.len(), 3, "{c:#}");
    assert!(
        layers[0].0 == 0 && layers[2].1 == 30 && layers.windows(2).all(|w| w[0].1 == w[1].0 && w[0].0 < w[0].1),
        "{c:#}"
    );
    for node in c["nodes"].as_array().unwrap() {
        assert!(
            node["weight_bytes"].as_u64().unwrap() > 0 && node["memory_bytes"].as_u64() == Some(4 << 30),
            "{node:#}"
        );
    }
    let prompts = [
        "Name three colours.",
        "What is 2 + 2?",
        "Tell me a fact about cats.",
        "Write a short greeting.",
        "What is the largest planet?",
        "Describe rain in a few words.",
        "Give me a name for a dog.",
        "What language is spoken in Spain?",
    ];
    let checks = json!({ "greedy_prompt": prompt, "greedy_text": greedy_text, "max_tokens": MAX_TOKENS, "concurrent_prompts": prompts });
    let out = python(
        "openai_client.py",
        &[&format!("{}/v1", server.url()), "SmolLM2-135M-Instruct.Q8_0.by-strata", &checks.to_string()],
    );
    let report: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    eprintln!("openai client report: {report}");
    let t = &report["throughput"];
    let (one, eight) = (t["1"]["tokens_per_s"].as_f64().unwrap(), t["8"]["tokens_per_s"].as_f64().unwrap());
    eprintln!(
        "8 concurrent streams on 3 nodes: {eight:.2} tok/s all together, {one:.2} tok/s for one stream alone: {:.2}x",
        eight / one
    );
    // The eight streams shared steps (the figure above is a measurement, not a bar).
    let c = server.get("/v1/cluster").json();
    assert!(c["rows_per_step"].as_f64().unwrap() > 1.5, "{c:#}");
    server.wait_idle();
    let metrics = server.get("/metrics").body;
    assert!(metrics.contains("strata_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"}"), "{metrics}");
    for (i, name) in ["node0", "node1", "node2"].iter().enumerate() {
        let steps = format!("strata_stage_steps_total{{stage=\"{i}\",node=\"{name}\"}} ");
        let v: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&steps))
            .unwrap_or_else(|| panic!("{steps}missing:\n{metrics}"))
            .parse()
            .unwrap();
        assert!(v > 0, "{metrics}");
    }
    assert!(metrics.contains("strata_step_seconds_count "), "{metrics}");
}

/// Error cases answer in OpenAI's shape with the right status, and the server keeps going.
#[test]
fn bad_requests_are_refused_in_openai_shape() {
    let server = Server::start(&fixture("tiny-qwen3.gguf"), &["--ctx", "64"]);
    let long = "word ".repeat(200);
    let cases: &[(&str, &str, u16, &str, Option<&str>)] = &[
        ("/v1/chat/completions", "{not json", 400, "malformed JSON", None),
        (
            "/v1/chat/completions",
            r#"{"model":"gpt-4","messages":[{"role":"user","content":"hi"}]}"#,
            404,
            "gpt-4",
            Some("model"),
        ),
        ("/v1/completions", &format!(r#"{{"prompt":"{long}"}}"#), 400, "but the context length is 64", Some("prompt")),
        (
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user","content":"hi"}],"temperature":-1}"#,
            400,
            "temperature",
            Some("temperature"),
        ),
        (
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user","content":"hi"}],"top_p":1.5}"#,
            400,
            "top_p",
            Some("top_p"),
        ),
        (
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user","content":"hi"}],"presence_penalty":3}"#,
            400,
            "presence_penalty",
            Some("presence_penalty"),
        ),
        (
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user","content":"hi"}],"temperature":"hot"}"#,
            400,
            "temperature",
            Some("temperature"),
        ),
        ("/v1/chat/completions", r#"{"messages":[{"role":"user","content":"hi"}],"n":2}"#, 400, "n = 2", Some("n")),
        (
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":0}"#,
            400,
            "max_tokens",
            Some("max_tokens"),
        ),
        (
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user","content":"hi"}],"top_logprobs":3}"#,
            400,
            "top_logprobs requires logprobs",
            Some("top_logprobs"),
        ),
        (
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user","content":"hi"}],"logprobs":"yes"}"#,
            400,
            "logprobs must be",
            Some("logprobs"),
        ),
        ("/v1/completions", r#"{"prompt":"hi","logprobs":50}"#, 400, "logprobs 50 is outside", Some("logprobs")),
        (
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user","content":"hi"}],"logprobs":true,"top_logprobs":21}"#,
            400,
            "top_logprobs",
            Some("top_logprobs"),
        ),
        ("/v1/chat/completions", r#"{"messages":[]}"#, 400, "at least one message", Some("messages")),
        // (`tool` turns are served now: an unknown role is refused.)
        (
            "/v1/chat/completions",
            r#"{"messages":[{"role":"robot","content":"x"}]}"#,
            400,
            "role `robot`",
            Some("messages"),
        ),
        ("/v1/nothing", "{}", 404, "no such endpoint", None),
    ];
    for (path, body, status, needle, param) in cases {
        let r = server.post(path, body);
        assert_eq!(r.status, *status, "{path} {body}: {}", r.body);
        let e = &r.json()["error"];
        let message = e["message"].as_str().unwrap_or_else(|| panic!("no error.message: {}", r.body));
        assert!(message.contains(needle), "{path} {body}: message {message:?} lacks {needle:?}");
        assert!(e["type"].is_string() && e.get("code").is_some(), "{}", r.body);
        assert_eq!(e["param"].as_str(), *param, "{path} {body}: param");
        // Still serving.
        assert_eq!(server.get("/health").status, 200);
    }
    let r = server.post("/v1/chat/completions", r#"{"model":"gpt-4","messages":[{"role":"user","content":"hi"}]}"#);
    assert_eq!(r.json()["error"]["code"], "model_not_found");
    let r = server.post("/v1/completions", &format!(r#"{{"prompt":"{long}"}}"#));
    let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(msg.contains("64") && msg.contains("tokens"), "{msg}");
    // A good request works after all of that.
    let r = server.post(
        "/v1/chat/completions",
        r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":4,"temperature":0}"#,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.json()["usage"]["completion_tokens"].as_u64().unwrap() <= 4);
    let metrics = server.get("/metrics").body;
    assert!(metrics.contains("strata_requests_total{endpoint=\"/v1/chat/completions\",status=\"400\"}"), "{metrics}");
    // Legacy completions logprobs: the top alternatives per token, keyed by token text.
    let r = server
        .post("/v1/completions", r#"{"prompt":"Once upon a time","max_tokens":5,"temperature":0,"logprobs":2}"#)
        .json();
    let lp = &r["choices"][0]["logprobs"];
    let tokens = lp["tokens"].as_array().unwrap();
    assert_eq!(tokens.len() as u64, r["usage"]["completion_tokens"].as_u64().unwrap(), "{r:#}");
    for (i, top) in lp["top_logprobs"].as_array().unwrap().iter().enumerate() {
        let top = top.as_object().unwrap();
        let chosen = lp["token_logprobs"][i].as_f64().unwrap();
        let best = top.values().map(|v| v.as_f64().unwrap()).fold(f64::MIN, f64::max);
        // Tokens that print alike (partial UTF-8) share a key, so compare, not look up.
        assert!(
            top.len() <= 2 && !top.is_empty() && chosen <= 0.0 && best <= chosen + 1e-6,
            "greedy takes the most likely: {r:#}"
        );
    }
    assert_eq!(lp["text_offset"][0], 0, "{r:#}");
}

/// A client that disconnects mid-stream cancels its generation: the sequence is freed
/// on every node of a three-node pipeline.
#[test]
fn disconnect_mid_stream_frees_the_sequence_on_every_node() {
    let model = fixture("tiny-qwen3.gguf");
    let cluster = Cluster::start(3, &model_dir(std::slice::from_ref(&model)));
    let mut args = vec!["--ctx", "4096"];
    let flags = cluster.flags();
    args.extend(flags.iter().map(String::as_str));
    let server = Server::start(&model, &args);
    // A sampled answer may end by itself (an end-of-generation token) before the client
    // leaves; try a few seeds until one is cut off by the disconnect.
    for (attempt, seed) in [7, 11, 13, 17, 19].into_iter().enumerate() {
        let mut s = TcpStream::connect(server.addr).unwrap();
        let body = format!(
            r#"{{"prompt":"Once upon a time","max_tokens":4000,"temperature":1.0,"stream":true,"seed":{seed}}}"#
        );
        send(&mut s, "POST", "/v1/completions", &body);
        // Read until a few chunks of text have arrived: the sequence is generating.
        read_events(&mut s, 3);
        let generating = server.active().0 == 1 && wait_for(|| server.held() == [1, 1, 1]);
        drop(s);
        server.wait_idle();
        assert_eq!(server.held(), [0, 0, 0], "every node freed the sequence");
        let log = strip_ansi(&std::fs::read_to_string(&server.log).unwrap());
        let cancelled =
            log.lines().any(|l| l.contains(&format!("id={}", attempt + 1)) && l.contains("request cancelled"));
        if generating && cancelled {
            return assert_eq!(server.get("/health").status, 200);
        }
    }
    panic!("no request was cancelled by its client leaving:\n{}", std::fs::read_to_string(&server.log).unwrap());
}

/// Polls `ok` for up to 5 s (the cluster view refreshes the nodes' figures every 250 ms).
fn wait_for(ok: impl Fn() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(5) {
        if ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The web page in headless Chromium, on a server with an API key: the page asks for the
/// key (a wrong one is refused), then a chat answer streams in, and the cluster view draws
/// the node with its layers and memory.
#[test]
fn web_page_streams_a_chat_and_shows_the_cluster() {
    let key = "page-key-42";
    let server = Server::start(&smol_q8_0(), &["--ctx", "1024", "--api-key", key]);
    assert_eq!(server.get("/v1/cluster").status, 401);
    let page = server.get("/");
    assert_eq!(page.status, 200);
    assert!(
        page.body.contains("<script src=\"/app.js\">") && !page.body.contains("https://"),
        "the page must be self-contained"
    );
    let shot = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("strata-web.png");
    let out = python("../web/drive.py", &[&format!("{}/", server.url()), path_str(&shot), key]);
    let r: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    eprintln!("web page: {r}\nscreenshot: {}", shot.display());
    assert!(r["final"].as_str().unwrap().trim().len() > 5, "{r}");
    assert!(r["cluster"].as_str().unwrap().contains("layers 0–29"), "{r}");
}

/// A KV pool of 4 blocks of 16 positions: a request that does not fit beside a running one
/// waits in the queue, then runs; the running stream is not touched (both answers are
/// their answers alone); a prompt larger than the whole pool is refused, naming the
/// numbers. `/v1/cluster` and `/metrics` show the pool.
#[test]
fn a_full_kv_pool_makes_a_request_wait_and_one_too_large_is_refused() {
    let model = fixture("tiny-qwen3.gguf");
    let server = Server::start(&model, &["--ctx", "256", "--kv-pool", "64", "--max-seqs", "4"]);
    let c = server.get("/v1/cluster").json();
    assert_eq!((c["kv_pool"]["blocks"].as_u64(), c["kv_pool"]["positions"].as_u64()), (Some(4), Some(64)), "{c:#}");
    let long = "one two three four five six seven eight nine ten ".repeat(2);
    let completion = |prompt: &str, max_tokens: u32| {
        json!({ "prompt": prompt, "max_tokens": max_tokens, "temperature": 0 }).to_string()
    };
    let (a_body, b_body) = (completion(&long, 20), completion("one two", 8));
    let alone = |body: &str| {
        let r = server.post("/v1/completions", body);
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
    };
    let (a_alone, b_alone) = (alone(&a_body), alone(&b_body));
    let a_prompt = a_alone["usage"]["prompt_tokens"].as_u64().unwrap();
    // A holds at least 3 of the 4 blocks from its first token on: B (1 block, plus one kept
    // free for A's growth) cannot start beside it.
    assert!((33..=44).contains(&a_prompt), "A's prompt is {a_prompt} tokens: {a_alone}");
    let addr = server.addr;
    let text_of = |streamed: &str| -> String {
        streamed
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str::<Value>(d).unwrap()["choices"][0]["text"].as_str().unwrap_or("").to_owned())
            .collect()
    };
    // B is sent the moment A's first token arrives (A then holds its blocks), on a
    // connection opened beforehand. A's 20 tokens take tens of milliseconds, and on a
    // loaded box they can still be over before B reaches the scheduler: then B fits and
    // nothing waits. So the pair runs again, at most 5 times, until B was held back once;
    // every time, both answers are their answers alone.
    let mut waits = 0;
    for attempt in 1..=5 {
        let (mut a, mut b) = (TcpStream::connect(addr).unwrap(), TcpStream::connect(addr).unwrap());
        let streamed = json!({ "prompt": long, "max_tokens": 20, "temperature": 0, "stream": true }).to_string();
        send(&mut a, "POST", "/v1/completions", &streamed);
        let raw = read_events(&mut a, 1);
        send(&mut b, "POST", "/v1/completions", &b_body);
        let (a, b) = (read_reply(a, raw), read_reply(b, Vec::new()));
        assert_eq!(text_of(&a.body), a_alone["choices"][0]["text"].as_str().unwrap(), "A's stream changed");
        assert_eq!(b.status, 200, "{}", b.body);
        assert_eq!(b.json()["choices"][0]["text"], b_alone["choices"][0]["text"], "B's answer changed");
        server.wait_idle();
        // The scheduler counts a request held back for pool room (A's 20 tokens can be
        // over before a poll of `/v1/cluster` would see B queued).
        waits = server.get("/v1/cluster").json()["kv_pool_waits"].as_u64().unwrap();
        if waits > 0 {
            eprintln!("B was held back beside A on try {attempt}");
            break;
        }
    }
    let c = server.get("/v1/cluster").json();
    assert_eq!(waits, 1, "B never waited in the queue beside A in 5 tries (or waited more than once): {c:#}");
    // Larger than the whole pool: refused at once, naming the numbers.
    let huge = completion(&"one two three four five six seven eight nine ten ".repeat(6), 4);
    let r = server.post("/v1/completions", &huge);
    assert_eq!(r.status, 400, "{}", r.body);
    let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(message.contains("KV pool holds only 64 positions (4 blocks of 16)"), "{message}");
    let metrics = server.get("/metrics").body;
    for want in ["strata_kv_block_size 16", "strata_kv_pool_waits_total 1", "strata_stage_busy_fraction{stage=\"0\""] {
        assert!(metrics.contains(want), "{want} missing:\n{metrics}");
    }
    // Every block is free but those the prefix cache keeps.
    let free = server.metric("strata_kv_blocks{state=\"free\"}");
    assert_eq!(free + server.metric("strata_prefix_cache_blocks"), 4, "{metrics}");
}

/// HTTPS with a certificate and key from PEM files, an API key, a body limit and a bounded
/// queue, driven by the official OpenAI client: the right key is answered, a wrong or
/// missing one gets 401 (the page and `/health` stay open), absurd parameters get 400s
/// naming them, a large body 413, and a request past the queue 503 with `Retry-After`.
#[test]
fn https_api_key_limits_and_a_full_queue() {
    let dir = tempdir("https");
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    let (cert_pem, key_pem) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_pem, cert.cert.pem()).unwrap();
    std::fs::write(&key_pem, cert.signing_key.serialize_pem()).unwrap();
    let key = "sk-strata-test-key";
    let server = Server::start(
        &fixture("tiny-qwen3.gguf"),
        &[
            "--ctx",
            "2048",
            "--api-key",
            key,
            "--tls-cert",
            path_str(&cert_pem),
            "--tls-key",
            path_str(&key_pem),
            "--max-seqs",
            "1",
            "--max-queue",
            "0",
            "--max-body",
            "4KiB",
        ],
    );
    // Plain HTTP to the HTTPS port gets no answer in HTTP.
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    assert!(!String::from_utf8_lossy(&raw).starts_with("HTTP/1.1 200"), "plain HTTP was served");
    let base = format!("https://{}/v1", server.addr);
    let out = python("secure_client.py", &[&base, "tiny-qwen3", path_str(&cert_pem), key]);
    eprintln!("secure client report: {}", out.lines().last().unwrap_or(""));
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(log.contains("refused a request: the API key is wrong"), "{log}");
}

/// Settings that could never work are refused before the model loads, naming the flag
/// or the file.
#[test]
fn bad_serve_security_settings_are_named() {
    let dir = tempdir("bad-tls");
    let m = fixture("tiny-qwen3.gguf");
    let fails = |extra: &[&str]| {
        let o =
            strata().args(["serve", "--model", path_str(&m), "--listen", "127.0.0.1:0"]).args(extra).output().unwrap();
        assert!(!o.status.success(), "{extra:?} started");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    assert!(fails(&["--api-key", ""]).contains("the API key is empty"));
    assert!(fails(&["--max-body", "10"]).contains("outside 1KiB..=1GiB"));
    assert!(fails(&["--tls-cert", "/nonexistent.pem"]).contains("--tls-key"));
    let missing = fails(&["--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"]);
    assert!(missing.contains("/nonexistent.pem"), "{missing}");
    let junk = dir.join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    let err = fails(&["--tls-cert", path_str(&junk), "--tls-key", path_str(&junk)]);
    assert!(err.contains("no CERTIFICATE block"), "{err}");
    // A certificate with someone else's key.
    let (a, b) = (
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap(),
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap(),
    );
    let (cert, key) = (dir.join("a.pem"), dir.join("b.key"));
    std::fs::write(&cert, a.cert.pem()).unwrap();
    std::fs::write(&key, b.signing_key.serialize_pem()).unwrap();
    let err = fails(&["--tls-cert", path_str(&cert), "--tls-key", path_str(&key)]);
    assert!(err.contains("does not fit its key"), "{err}");
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Resident memory of process `pid`, in bytes (`VmRSS`).
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// A bounded load test: 64 clients streaming for `STRATA_LOAD_SECS` (default 60) against a
/// server on two local nodes, a third of the requests disconnecting mid-stream at a random
/// point. Every request that stays gets a whole answer without error; afterwards no
/// sequence, KV block or slot is held anywhere, and the memory of the server and the nodes
/// does not grow between the first third of the run and its end.
#[test]
fn sixty_four_clients_with_random_disconnects_leak_nothing() {
    let model = fixture("tiny-qwen3.gguf");
    let cluster = Cluster::start(2, &model_dir(std::slice::from_ref(&model)));
    let mut args = vec!["--ctx", "512", "--max-seqs", "8", "--max-queue", "64"];
    let flags = cluster.flags();
    args.extend(flags.iter().map(String::as_str));
    let server = Server::start(&model, &args);
    let secs = std::env::var("STRATA_LOAD_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(60u64);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let pids: Vec<u32> = std::iter::once(server.child.id()).chain(cluster.pids()).collect();
    let addr = server.addr;
    let clients: Vec<_> = (0..64u64)
        .map(|c| {
            std::thread::spawn(move || {
                let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (c + 1).wrapping_mul(0x1000_0000_01b3);
                let mut next = move || {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng
                };
                let (mut done, mut left, mut tokens) = (0u64, 0u64, 0u64);
                while Instant::now() < deadline {
                    let leave = next() % 3 == 0;
                    let body = format!(
                        r#"{{"prompt":"Client {c} asks question {}","max_tokens":{},"temperature":0.8,"seed":{},"stream":true}}"#,
                        next() % 1000,
                        8 + next() % 56,
                        next() % 10_000
                    );
                    let mut s = TcpStream::connect(addr).expect("connect");
                    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
                    write!(s, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
                    let cut = 1 + (next() % 600) as usize;
                    let mut got = Vec::new();
                    let mut buf = [0u8; 2048];
                    loop {
                        let n = s.read(&mut buf).expect("read the stream");
                        if n == 0 {
                            break;
                        }
                        got.extend_from_slice(&buf[..n]);
                        if leave && got.len() >= cut {
                            break;
                        }
                    }
                    let text = String::from_utf8_lossy(&got);
                    if leave && !text.contains("[DONE]") {
                        left += 1;
                        continue;
                    }
                    assert!(text.starts_with("HTTP/1.1 200"), "client {c}: {text}");
                    assert!(text.contains("data: [DONE]") && !text.contains("\"error\""), "client {c}: {text}");
                    done += 1;
                    tokens += text.matches("\"text\":").count() as u64;
                }
                (done, left, tokens)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(secs / 3));
    let early: Vec<u64> = pids.iter().map(|&p| rss(p)).collect();
    let (mut done, mut left, mut tokens) = (0, 0, 0);
    for c in clients {
        let (d, l, t) = c.join().expect("a client failed");
        (done, left, tokens) = (done + d, left + l, tokens + t);
    }
    server.wait_idle();
    // Nothing is held but what the prefix cache keeps (finished sequences, for a prompt
    // that begins with their tokens), counted alike by the scheduler and every node. The
    // nodes' figures are polled (every 250 ms at most), so they may trail the scheduler's
    // by a moment: they must agree within a few seconds, and a leak never would.
    let settle = Instant::now();
    loop {
        let (cached, cached_blocks) =
            (server.metric("strata_prefix_cache_sequences"), server.metric("strata_prefix_cache_blocks"));
        let c = server.get("/v1/cluster").json();
        let agree = c["kv_pool"]["used_blocks"].as_u64() == Some(cached_blocks)
            && c["nodes"].as_array().unwrap().iter().all(|n| {
                (n["sequences"].as_u64(), n["slots"]["used"].as_u64(), n["kv_pool"]["used_blocks"].as_u64())
                    == (Some(cached), Some(cached), Some(cached_blocks))
            });
        if agree {
            break;
        }
        assert!(
            settle.elapsed() < Duration::from_secs(10),
            "the nodes do not hold what the prefix cache keeps ({cached} sequences, {cached_blocks} blocks): {c:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let metrics = server.get("/metrics").body;
    assert!(metrics.lines().any(|l| l == "strata_requests_held 0"), "{metrics}");
    let late: Vec<u64> = pids.iter().map(|&p| rss(p)).collect();
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!(
        "load: {secs} s, 64 clients: {done} answers whole, {left} left mid-stream, {tokens} chunks streamed; RSS MiB (server, nodes) after {} s {:?}, at the end {:?}",
        secs / 3,
        early.iter().map(|&b| mib(b).round()).collect::<Vec<_>>(),
        late.iter().map(|&b| mib(b).round()).collect::<Vec<_>>()
    );
    assert!(done > 0 && left > 0, "the load ran both kinds of client: {done} whole, {left} left");
    for (e, l) in early.iter().zip(&late) {
        assert!(*l < e + (64 << 20), "memory grew from {} to {} MiB", mib(*e), mib(*l));
    }
    assert_eq!(server.get("/health").status, 200);
}

/// With no `--ctx`, a server takes the model's own context or, when its nodes cannot hold
/// that, the most they hold for one sequence: two nodes of 2 MiB cannot hold tiny-qwen3's
/// 4096 positions, so the plan finds the largest context they do (the same `strata plan`
/// prints for those nodes), says so, and `/v1/models` reports it.
#[test]
fn without_ctx_the_context_is_the_most_the_nodes_hold() {
    let model = fixture("tiny-qwen3.gguf");
    let cluster = Cluster::start_with(2, &model_dir(std::slice::from_ref(&model)), "2MiB");
    let flags = cluster.flags();
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = Server::start(&model, &args);
    let ctx = server.get("/v1/models").json()["data"][0]["context_length"].as_u64().unwrap();
    assert!(ctx > 16 && ctx < 4096 && ctx.is_multiple_of(16), "context {ctx}");
    let o = strata()
        .args(["plan", "--model", path_str(&model), "--node", "node0=2MiB", "--node", "node1=2MiB", "--seqs", "8"])
        .output()
        .unwrap();
    let plan = String::from_utf8_lossy(&o.stdout);
    assert!(plan.contains(&format!("context {ctx} (the model's own is 4096")), "serve chose {ctx}; plan says:\n{plan}");
    eprintln!("two nodes of 2 MiB: context {ctx} of the model's 4096");

    let r = server.post("/v1/completions", r#"{"prompt": "Hello", "max_tokens": 4, "temperature": 0}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    let too_many = format!(r#"{{"prompt": "Hello", "max_tokens": {}}}"#, ctx + 1);
    let r = server.post("/v1/completions", &too_many);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains(&format!("context length {ctx}")), "{}", r.body);
}
