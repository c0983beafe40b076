//! Speculative decoding: the last stage verifies draft rows, rejected drafts leave no
//! trace (attention rewrites their positions; DeltaNet goes back to its rollback state),
//! and `--speculative lookup` gives exactly the plain run's tokens, greedy and sampled,
//! alone and batched, on one stage and on three nodes.

use std::path::Path;
use std::sync::Arc;

use strata_model::gguf::Gguf;
use strata_model::sampling::SamplingParams;
use strata_node::gpu::{Gpu, GpuConfig};
use strata_node::stage::{Produced, SeqStep, Stage, StageSpec, Want};

use crate::golden;
use crate::support::{Cluster, fixture, golden as load_golden, model_dir, path_str, smol_q8_0, strata_json};

/// A stage of every layer of fixture `name` for 4 sequences that verifies up to
/// `draft_max` drafts per step.
fn stage(name: &str, draft_max: u32) -> Stage {
    let gguf = Gguf::open(fixture(name)).unwrap();
    let n_layer = strata_model::config::ModelConfig::from_gguf(&gguf).unwrap().n_layer();
    let gpu = Arc::new(Gpu::new(&GpuConfig::default()).unwrap());
    Stage::load(gpu, &gguf, StageSpec { draft_max, ..StageSpec::new(0..n_layer, 64, 16).with_seqs(4) }).unwrap()
}

/// One sequence's step of `tokens` at `pos`, the last `verify` of them drafts, keeping the
/// recurrent state after `keep` rows; `want`: what the last row (and the drafts') gives.
fn step_of(
    st: &mut Stage,
    seq: u64,
    pos: u32,
    tokens: &[u32],
    verify: u32,
    keep: u32,
    want: Want,
) -> Result<Produced, String> {
    let step = SeqStep { verify, keep, ..SeqStep::new(seq, pos, tokens.len() as u32, tokens, want) };
    let out = st.step(&[step], None).map_err(|e| e.to_string())?;
    out.seqs.into_iter().next().unwrap().1.map_err(|e| e.to_string())
}

/// The greedy samples of a step (its last row's, or with drafts each verified row's).
fn greedy(st: &mut Stage, seq: u64, pos: u32, tokens: &[u32], verify: u32, keep: u32) -> Result<Vec<u32>, String> {
    let want = Want::Token { sampling: SamplingParams::greedy(), logprobs: None };
    match step_of(st, seq, pos, tokens, verify, keep, want)? {
        Produced::Token(t, _) => Ok(vec![t]),
        Produced::Tokens(t) => Ok(t),
        other => panic!("a token step produced {other:?}"),
    }
}

fn logits(st: &mut Stage, seq: u64, pos: u32, tokens: &[u32]) -> Vec<f32> {
    match step_of(st, seq, pos, tokens, 0, 0, Want::Logits).unwrap() {
        Produced::Logits(l) => l,
        other => panic!("a logits step produced {other:?}"),
    }
}

/// A token other than `t` (a draft that must be rejected).
fn not(t: u32) -> u32 {
    (t + 1) % 200
}

/// Drafts wrong after their first token, and wrong from the first: the samples of the
/// rows up to the first wrong draft are the plain run's, the next steps go on as the
/// plain run does (on a recurrent stage from the rollback state, feeding the kept drafts
/// again), and the state afterwards is that of a run that never saw the rejected tokens:
/// its next logits are bit for bit a fresh sequence's.
fn rejected_drafts_leave_no_trace(name: &str, recurrent: bool) {
    let mut st = stage(name, 3);
    let prompt: Vec<u32> = (0..10).map(|i| (i * 37 + 5) % 200).collect();
    // The plain run: t[0] after the prompt, then one token per step.
    let mut t = greedy(&mut st, 1, 0, &prompt, 0, 0).unwrap();
    for i in 0..8 {
        let next = greedy(&mut st, 1, 10 + i, &t[i as usize..i as usize + 1], 0, 0).unwrap();
        t.extend(next);
    }
    // Sequence 2: drafts t[1] (right), then two wrong ones, after t[0] at 10.
    assert_eq!(greedy(&mut st, 2, 0, &prompt, 0, 0).unwrap(), [t[0]]);
    let s = greedy(&mut st, 2, 10, &[t[0], t[1], not(t[2]), not(t[3])], 3, 1).unwrap();
    assert_eq!(s.len(), 4, "one sample per verified row");
    assert_eq!(s[..2], t[1..3], "the samples after t0 and the kept draft are the plain run's");
    // Kept: t[1], then t[2] in place of the rejected draft. Draft t[3] right, then one wrong.
    let (pos, rows) =
        if recurrent { (11, vec![t[1], t[2], t[3], not(t[4])]) } else { (12, vec![t[2], t[3], not(t[4])]) };
    let sure = rows.len() as u32 - 2;
    let s = greedy(&mut st, 2, pos, &rows, 2, sure).unwrap();
    assert_eq!(s[..2], t[3..5], "after a rejection the sequence goes on as the plain run");
    // Kept: t[3], t[4]. On a recurrent stage a step anywhere else is refused, naming
    // where the state is.
    if recurrent {
        let e = greedy(&mut st, 2, 14, &[t[4]], 0, 0).unwrap_err();
        assert!(e.contains("its recurrent state is at 15") && e.contains("rollback state at 13"), "{e}");
    }
    let (pos, rows) = if recurrent { (13, vec![t[3], t[4]]) } else { (14, vec![t[4]]) };
    assert_eq!(greedy(&mut st, 2, pos, &rows, 0, 0).unwrap(), [t[5]]);
    // Sequence 3: every draft wrong, from the first.
    greedy(&mut st, 3, 0, &prompt, 0, 0).unwrap();
    let s = greedy(&mut st, 3, 10, &[t[0], not(t[1]), not(t[2]), not(t[3])], 3, 1).unwrap();
    assert_eq!(s[0], t[1]);
    assert_eq!(greedy(&mut st, 3, 11, &[t[1]], 0, 0).unwrap(), [t[2]]);
    // What sequences 2 and 3 hold equals what a fresh sequence computes from the kept tokens.
    let next = logits(&mut st, 2, 15, &[t[5]]);
    let mut fresh: Vec<u32> = prompt.clone();
    fresh.extend(&t[..5]);
    logits(&mut st, 4, 0, &fresh);
    assert_eq!(logits(&mut st, 4, 15, &[t[5]]), next, "{name}: the state after rollbacks is a fresh run's");
    st.release(4);
    let next = logits(&mut st, 3, 12, &[t[2]]);
    logits(&mut st, 4, 0, &fresh[..12]);
    assert_eq!(logits(&mut st, 4, 12, &[t[2]]), next, "{name}: the state after rejecting every draft");
}

#[test]
fn a_recurrent_stage_rolls_back_rejected_drafts_exactly() {
    rejected_drafts_leave_no_trace("tiny-qwen35.gguf", true);
}

#[test]
fn an_attention_stage_rewrites_rejected_drafts() {
    rejected_drafts_leave_no_trace("tiny-qwen3.gguf", false);
}

/// A stage refuses a speculative step it cannot verify exactly, saying why.
#[test]
fn speculative_steps_a_stage_cannot_verify_are_refused() {
    let mut plain = stage("tiny-qwen35.gguf", 0);
    let e = greedy(&mut plain, 1, 0, &[1, 2, 3], 2, 1).unwrap_err();
    assert!(e.contains("loaded without speculation (--draft-max 0)"), "{e}");
    let mut st = stage("tiny-qwen35.gguf", 2);
    let e = greedy(&mut st, 1, 0, &[1, 2, 3, 4], 3, 1).unwrap_err();
    assert!(e.contains("verifies 3 draft rows, more than the 2"), "{e}");
    let e = greedy(&mut st, 1, 0, &[1, 2], 2, 0).unwrap_err();
    assert!(e.contains("2 draft rows and 0 kept of a step of 2 rows"), "{e}");
    let penalties = SamplingParams { repeat_penalty: 1.2, ..SamplingParams::greedy() };
    let want = Want::Token { sampling: penalties, logprobs: None };
    let e = step_of(&mut st, 1, 0, &[1, 2, 3], 2, 1, want).unwrap_err();
    assert!(e.contains("penalties"), "{e}");
    // The stage is fine afterwards.
    assert_eq!(greedy(&mut st, 1, 0, &[1, 2, 3], 2, 1).unwrap().len(), 3);
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v["generated_ids"].as_array().expect("generated_ids").iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// `strata run` of one prompt: its JSON report.
fn run(model: &Path, prompt: &str, flags: &[&str]) -> serde_json::Value {
    let mut args = vec!["run", "--json", "--model", path_str(model), "--prompt", prompt];
    args.extend_from_slice(flags);
    strata_json(&args)
}

/// `strata run` of every prompt at once: each one's ids.
fn batched(model: &Path, prompts: &[String], flags: &[&str]) -> Vec<Vec<u32>> {
    let mut args = vec!["run", "--json", "--model", path_str(model)];
    for p in prompts {
        args.extend(["--prompt", p.as_str()]);
    }
    args.extend_from_slice(flags);
    let out = strata_json(&args);
    out.as_array().unwrap_or_else(|| panic!("a JSON array: {out}")).iter().map(ids).collect()
}

/// The golden prompts and a copy-heavy one (`copy`, from the first golden prompt when
/// `None`: the prompt, its plain continuation, and the prompt again, so that lookup
/// drafts the continuation) answer with exactly the plain run's tokens under
/// `--speculative {drafter}`: alone, batched together on one stage, and batched on three
/// nodes. With `accepts`, the copy-heavy prompt gets drafts and keeps some (so rejections
/// and, on recurrent models, rollbacks happen on the way).
fn speculation_changes_no_token(
    model: &Path,
    golden_name: &str,
    copy: Option<&str>,
    flags: &[&str],
    drafter: &str,
    accepts: bool,
) {
    let g = load_golden(golden_name);
    let mut prompts: Vec<String> = golden::sequences(&g).iter().map(|s| s.prompt.clone()).collect();
    let mut common = vec!["--max-tokens", "32", "--ignore-eos", "--batch-tokens", "16"];
    common.extend_from_slice(flags);
    let copy = match copy {
        Some(c) => c.to_owned(),
        None => {
            let first = &prompts[0];
            // Greedy unless the flags sample.
            let mut cont_flags = vec!["--max-tokens", "24", "--ignore-eos"];
            cont_flags.extend_from_slice(if flags.is_empty() { &["--temperature", "0"] } else { flags });
            let cont = run(model, first, &cont_flags);
            format!("{first}{}{first}", cont["text"].as_str().unwrap())
        }
    };
    prompts.push(copy);
    let plain = batched(model, &prompts, &common);
    let mut spec_flags = common.clone();
    spec_flags.extend(["--speculative", drafter, "--draft-max", "4"]);
    for (i, p) in prompts.iter().enumerate() {
        let out = run(model, p, &spec_flags);
        assert_eq!(ids(&out), plain[i], "{golden_name} {flags:?}: prompt {i} alone with {drafter} drafts");
        let s = &out["speculation"];
        assert_eq!(s["drafter"], drafter, "{s}");
        // The MTP block drafts for every prompt; lookup where something recurs.
        let drafted = s["draft_tokens"].as_u64().unwrap() > 0;
        assert!(drafted || drafter == "lookup", "{golden_name}: prompt {i} got no {drafter} drafts: {s}");
        if i + 1 == prompts.len() {
            eprintln!("{golden_name} {flags:?}: copy-heavy prompt alone, {drafter} drafts: {s}");
            if accepts {
                assert!(s["accepted_draft_tokens"].as_u64().unwrap() > 0, "{s}");
            }
        }
    }
    let one = batched(model, &prompts, &spec_flags);
    let cluster = Cluster::start(3, &model_dir(&[model.to_owned()]));
    let mut piped = spec_flags.clone();
    let cluster_flags = cluster.flags();
    piped.extend(cluster_flags.iter().map(String::as_str));
    let three = batched(model, &prompts, &piped);
    for (i, p) in prompts.iter().enumerate() {
        assert_eq!(one[i], plain[i], "{golden_name} {flags:?}: prompt {i} {p:?} batched with {drafter} drafts");
        assert_eq!(
            three[i], plain[i],
            "{golden_name} {flags:?}: prompt {i} {p:?} on three nodes with {drafter} drafts"
        );
    }
}

/// SmolLM2's copy-heavy prompt: code to repeat.
const COPY_CODE: &str = "<|im_start|>user\nRepeat this code exactly:\n\
def area(width, height):\n    return width * height\n\n\
def perimeter(width, height):\n    return 2 * (width + height)\n<|im_end|>\n<|im_start|>assistant\n";

#[test]
fn speculation_changes_no_token_smollm2_q8_0() {
    speculation_changes_no_token(&smol_q8_0(), "smollm2-135m-q8_0.golden.json", Some(COPY_CODE), &[], "lookup", true);
}

#[test]
fn speculation_changes_no_token_tiny_qwen3() {
    speculation_changes_no_token(&fixture("tiny-qwen3.gguf"), "tiny-qwen3.golden.json", None, &[], "lookup", true);
}

#[test]
fn speculation_changes_no_token_tiny_qwen35() {
    speculation_changes_no_token(&fixture("tiny-qwen35.gguf"), "tiny-qwen35.golden.json", None, &[], "lookup", true);
}

/// The MTP fixture with each draft kind that applies: its MTP block (drafting on the
/// last stage, which on three nodes gets the token ids carried down the pipeline), and
/// prompt lookup; `auto` picks the MTP block.
#[test]
fn speculation_changes_no_token_tiny_qwen35_mtp() {
    let model = fixture("tiny-qwen35-mtp.gguf");
    // The fixture's weights are random: its MTP block's drafts are checked, and rejected
    // (the first draft of every step), and its continuations do not recur for lookup to
    // find. What they draft must still change no token.
    speculation_changes_no_token(&model, "tiny-qwen35-mtp.golden.json", None, &[], "mtp", false);
    speculation_changes_no_token(&model, "tiny-qwen35-mtp.golden.json", None, &[], "lookup", false);
    let out = run(&model, "Hello", &["--max-tokens", "8", "--speculative", "auto"]);
    assert_eq!(out["speculation"]["drafter"], "mtp", "{out}");
    // A model without the block says so.
    let e = crate::support::strata_fails(&[
        "run",
        "--model",
        path_str(&fixture("tiny-qwen35.gguf")),
        "--prompt",
        "Hello",
        "--speculative",
        "mtp",
    ]);
    assert!(e.contains("no MTP block"), "{e}");
}

/// Seeded sampling draws by position: the same text with speculation as without.
#[test]
fn speculation_changes_no_sampled_token() {
    let flags = ["--temperature", "0.5", "--top-k", "40", "--seed", "4242"];
    speculation_changes_no_token(
        &smol_q8_0(),
        "smollm2-135m-q8_0.golden.json",
        Some(COPY_CODE),
        &flags,
        "lookup",
        true,
    );
}

/// `strata serve --speculative lookup`: a chat request and a streamed one answer exactly as
/// a server without speculation does, on one stage and on three nodes; `/metrics` and
/// `/v1/cluster` count the drafts, and the trips yield more than a token each.
#[test]
fn a_speculating_server_answers_as_a_plain_one_and_counts_its_drafts() {
    use serde_json::json;

    use crate::serve::Server;
    use crate::support::{SMOL_Q4_1, model};

    let m = model(SMOL_Q4_1);
    let code = "def area(width, height):\n    return width * height\n\ndef perimeter(width, height):\n    return 2 * (width + height)\n";
    let body = |stream: bool| {
        json!({
            "messages": [{ "role": "user", "content": format!("Repeat this code exactly:\n{code}") }],
            "max_tokens": 40,
            "temperature": 0,
            "stream": stream,
        })
        .to_string()
    };
    let answer = |server: &Server| {
        let r = server.post("/v1/chat/completions", &body(false));
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["choices"][0]["message"]["content"].as_str().unwrap().to_owned()
    };
    let streamed = |server: &Server| {
        let r = server.post("/v1/chat/completions", &body(true));
        assert_eq!(r.status, 200, "{}", r.body);
        r.body
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
            .filter_map(|v| v["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
            .collect::<String>()
    };
    let plain = Server::start(&m, &[]);
    let want = answer(&plain);
    drop(plain);
    let cluster = Cluster::start(3, &model_dir(std::slice::from_ref(&m)));
    let mut three: Vec<&str> = vec!["--speculative", "lookup"];
    let cluster_flags = cluster.flags();
    three.extend(cluster_flags.iter().map(String::as_str));
    for flags in [&["--speculative", "lookup"][..], &three] {
        let server = Server::start(&m, flags);
        assert_eq!(answer(&server), want, "{flags:?}");
        assert_eq!(streamed(&server), want, "{flags:?}: streamed");
        let drafted = server.metric("strata_speculative_draft_tokens_total");
        let accepted = server.metric("strata_speculative_accepted_tokens_total");
        let (trips, tokens) =
            (server.metric("strata_decode_trips_total"), server.metric("strata_decode_trip_tokens_total"));
        eprintln!("{flags:?}: {accepted} of {drafted} drafts accepted, {tokens} tokens in {trips} decode trips");
        assert!(accepted > 0 && accepted <= drafted, "{accepted} of {drafted}");
        assert!(tokens > trips, "{tokens} tokens in {trips} trips");
        let c = server.get("/v1/cluster").json();
        assert_eq!(c["speculation"]["draft_tokens"].as_u64(), Some(drafted), "{c}");
        assert_eq!(c["speculation"]["drafter"], "lookup", "{c}");
        // Per request, as llama-server takes it: `speculative.n_max` 0 drafts nothing (and
        // answers alike), more than --draft-max allows is a 400 naming the field.
        let mut none: serde_json::Value = serde_json::from_str(&body(false)).unwrap();
        none["speculative.n_max"] = json!(0);
        let r = server.post("/v1/chat/completions", &none.to_string());
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["choices"][0]["message"]["content"].as_str(), Some(want.as_str()));
        assert_eq!(server.metric("strata_speculative_draft_tokens_total"), drafted, "speculative.n_max 0 drafted");
        none["speculative.n_max"] = json!(17);
        let r = server.post("/v1/chat/completions", &none.to_string());
        assert_eq!(r.status, 400, "{}", r.body);
        assert_eq!(r.json()["error"]["param"], "speculative.n_max", "{}", r.body);
    }
}
