//! Prompt-prefix reuse through `strata serve`: a conversation's next turn resumes the
//! caches its last turn left on the stages, computes only what follows, says so in
//! `usage.prompt_tokens_details.cached_tokens`, and answers exactly as a server that
//! computes everything.

use serde_json::{Value, json};

use crate::serve::Server;
use crate::support::{Cluster, SMOL_Q4_1, fixture, model, model_dir};

/// Two turns of a chat (greedy): the second sends the first, its answer and a new
/// question. Returns each turn's (content, cached tokens, prompt tokens).
fn two_turns(server: &Server) -> Vec<(String, u64, u64)> {
    let mut messages = vec![
        json!({ "role": "system", "content": "You are a helpful assistant who answers briefly." }),
        json!({ "role": "user", "content": "Name a large city in France." }),
    ];
    let mut out = Vec::new();
    for question in ["And one in Italy?", ""] {
        let body = json!({ "messages": messages, "max_tokens": 16, "temperature": 0 });
        let r = server.post("/v1/chat/completions", &body.to_string());
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        let content = v["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
        let usage = &v["usage"];
        out.push((
            content.clone(),
            usage["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap(),
            usage["prompt_tokens"].as_u64().unwrap(),
        ));
        messages.push(json!({ "role": "assistant", "content": content }));
        messages.push(json!({ "role": "user", "content": question }));
    }
    out
}

#[test]
fn a_conversation_s_next_turn_reuses_its_prefix_and_answers_the_same() {
    let m = model(SMOL_Q4_1);
    let cold = Server::start(&m, &["--no-prefix-cache"]);
    let want = two_turns(&cold);
    assert!(want.iter().all(|t| t.1 == 0), "nothing is reused without the cache: {want:?}");
    assert_eq!(cold.metric("strata_prefix_cache_hits_total"), 0);
    drop(cold);

    let warm = Server::start(&m, &[]);
    let got = two_turns(&warm);
    eprintln!("turns: {got:?}");
    for (g, w) in got.iter().zip(&want) {
        assert_eq!((&g.0, g.2), (&w.0, w.2), "the same answers with the cache");
    }
    // The second turn's prompt begins with all of the first turn (less the template's
    // end-of-turn): at least its prompt is reused.
    assert_eq!(got[0].1, 0);
    assert!(got[1].1 >= want[0].2 - 1 && got[1].1 < got[1].2, "cached {} of {}: {got:?}", got[1].1, got[1].2);
    assert_eq!(warm.metric("strata_prefix_cache_hits_total"), 1);
    assert_eq!(warm.metric("strata_prefix_cache_tokens_total"), got[1].1);
    assert!(warm.metric("strata_prefix_cache_sequences") >= 1 && warm.metric("strata_prefix_cache_bytes") > 0);
    drop(warm);

    // Over three nodes every stage resumes at the same position.
    let cluster = Cluster::start(3, &model_dir(std::slice::from_ref(&m)));
    let flags = cluster.flags();
    let piped = Server::start(&m, &flags.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(two_turns(&piped), got, "three nodes reuse as one does");
}

/// The same on qwen3 (attention only: any common prefix) and qwen35 (Gated DeltaNet: its
/// state cannot be cut back, so the stages keep a checkpoint of it a little before the
/// prompt's end, where the next turn's history, rewriting the generation prompt as the
/// answer, parts from it), on one node and on three.
#[test]
fn qwen3_and_qwen35_conversations_reuse_their_prefix_on_one_node_and_three() {
    for name in ["tiny-qwen3.gguf", "tiny-qwen35.gguf"] {
        let m = fixture(name);
        let want = two_turns(&Server::start(&m, &["--no-prefix-cache"]));
        let warm = Server::start(&m, &[]);
        let got = two_turns(&warm);
        eprintln!("{name}: {got:?}");
        for (g, w) in got.iter().zip(&want) {
            assert_eq!((&g.0, g.2), (&w.0, w.2), "{name}: the same answers with the cache");
        }
        // The synthetic models' answers do not tokenize back to themselves, so the
        // second prompt parts from the first sequence right after the first prompt.
        let first_prompt = want[0].2;
        assert_eq!(got[0].1, 0);
        assert!(got[1].1 >= first_prompt - 8 && got[1].1 < got[1].2, "{name}: cached {} of {got:?}", got[1].1);
        if name == "tiny-qwen35.gguf" {
            assert_eq!(got[1].1, first_prompt - 8, "{name}: resumed from the checkpoint 8 before the prompt's end");
        }
        assert_eq!(warm.metric("strata_prefix_cache_hits_total"), 1, "{name}");
        drop(warm);
        let cluster = Cluster::start(3, &model_dir(std::slice::from_ref(&m)));
        let flags = cluster.flags();
        let piped = Server::start(&m, &flags.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(two_turns(&piped), got, "{name}: three nodes reuse as one does");
    }
}

/// A model with recurrent layers (Gated DeltaNet) resumes a prompt that begins with all of
/// the earlier sequence's tokens (or, see above, those up to its checkpoint).
#[test]
fn a_recurrent_model_resumes_a_prompt_that_extends_the_whole_sequence() {
    let m = fixture("tiny-qwen35.gguf");
    // (text, cached tokens, prompt tokens, positions the stages hold after it)
    let run = |server: &Server, prompt: &str, max_tokens: u32| -> (String, u64, u64, u64) {
        let body = json!({ "prompt": prompt, "max_tokens": max_tokens, "temperature": 0 });
        let r = server.post("/v1/completions", &body.to_string());
        assert_eq!(r.status, 200, "{}", r.body);
        let v: Value = r.json();
        let u = &v["usage"];
        let (prompt, completion) = (u["prompt_tokens"].as_u64().unwrap(), u["completion_tokens"].as_u64().unwrap());
        // The last token sampled is fed only when another follows (or the end token did).
        let fed = if v["choices"][0]["finish_reason"] == "length" { completion - 1 } else { completion };
        (
            v["choices"][0]["text"].as_str().unwrap().to_owned(),
            u["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap(),
            prompt,
            prompt + fed,
        )
    };
    // One token: the stages hold the prompt alone, which the next prompt extends (the
    // synthetic model's answers are not text that tokenizes back to themselves).
    let first = "The quick brown fox";
    let next = format!("{first} jumps over the lazy dog");
    let cold = Server::start(&m, &["--no-prefix-cache"]);
    let a = run(&cold, first, 1);
    let want_next = run(&cold, &next, 8);
    let want_other = run(&cold, "The quick red fox", 8);
    drop(cold);

    let warm = Server::start(&m, &[]);
    assert_eq!(run(&warm, first, 1), a);
    let got_next = run(&warm, &next, 8);
    assert_eq!(got_next.0, want_next.0, "the same answer when resumed");
    // The prompt and the answer's tokens the stages were fed are all reused.
    assert_eq!(got_next.1, a.3, "{got_next:?} after {a:?}");
    // A prompt that parts from them midway starts afresh (and answers the same).
    let other = run(&warm, "The quick red fox", 8);
    assert_eq!((other.0.as_str(), other.1), (want_other.0.as_str(), 0));
    let _ = (want_next.1, want_other.2);
}

/// Requests sent while a request with the same long system prompt runs start as forks of
/// its sequence: they share its KV blocks of the common prefix (copying the block they
/// write), compute only what follows, and answer exactly as a server without the cache,
/// on one node and on three.
#[test]
fn requests_beside_a_running_one_fork_its_prefix() {
    let m = model(SMOL_Q4_1);
    let system = "You are a careful assistant for a team of engineers. Answer in plain words, briefly, \
                  and say so when you are not sure. "
        .repeat(3);
    let body = |question: &str, max_tokens: u32| {
        json!({ "messages": [{ "role": "system", "content": system }, { "role": "user", "content": question }],
            "max_tokens": max_tokens, "temperature": 0 })
        .to_string()
    };
    let questions = ["What is a compiler?", "What is a linker?", "What is a debugger?"];
    // (content, cached tokens) of a long answer and, sent while it runs, three short ones.
    let run = |server: &Server| -> Vec<(String, u64)> {
        let answer = |r: crate::serve::Reply| {
            assert_eq!(r.status, 200, "{}", r.body);
            let v = r.json();
            let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
            (v["choices"][0]["message"]["content"].as_str().unwrap().to_owned(), cached)
        };
        std::thread::scope(|s| {
            let long =
                s.spawn(|| answer(server.post("/v1/chat/completions", &body("What is an operating system?", 40))));
            let t0 = std::time::Instant::now();
            while server.metric("strata_generated_tokens_total") == 0 {
                assert!(t0.elapsed() < std::time::Duration::from_secs(120), "the first request never decoded");
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            let short: Vec<_> = questions
                .iter()
                .map(|q| s.spawn(move || answer(server.post("/v1/chat/completions", &body(q, 8)))))
                .collect();
            let mut out = vec![long.join().unwrap()];
            out.extend(short.into_iter().map(|h| h.join().unwrap()));
            out
        })
    };
    let cold = Server::start(&m, &["--no-prefix-cache"]);
    let want = run(&cold);
    drop(cold);
    let warm = Server::start(&m, &[]);
    let got = run(&warm);
    eprintln!("forks: {got:?}");
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.0, w.0, "the same answers with forks");
    }
    // Each short request shares at least the system prompt with a running sequence.
    assert!(got[1..].iter().all(|g| g.1 >= 16), "{got:?}");
    assert!(warm.metric("strata_prefix_cache_forks_total") >= 2, "{}", warm.get("/metrics").body);
    drop(warm);
    let cluster = Cluster::start(3, &model_dir(std::slice::from_ref(&m)));
    let flags = cluster.flags();
    let piped = Server::start(&m, &flags.iter().map(String::as_str).collect::<Vec<_>>());
    let three = run(&piped);
    assert_eq!(three.iter().map(|t| &t.0).collect::<Vec<_>>(), want.iter().map(|w| &w.0).collect::<Vec<_>>());
    assert!(piped.metric("strata_prefix_cache_forks_total") >= 2);
}
