//! `strata run` and `strata bench`.

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use serde::Serialize;
use strata_model::chat::{ChatMessage, ChatTemplate};
use strata_model::gguf::Gguf;
use strata_model::grammar::{Constraint, GrammarVocab};
use strata_model::sampling::SamplingParams;
use strata_model::tokenizer::Tokenizer;

use crate::cli::{BenchArgs, RunArgs};
use crate::engine::{self, Engine, EngineUse, NodeCounters, Placement};

#[derive(Serialize)]
struct RunReport {
    prompt_ids: Vec<u32>,
    generated_ids: Vec<u32>,
    text: String,
    prompt_tokens: usize,
    generated_tokens: usize,
    prefill_seconds: f64,
    decode_seconds: f64,
    prefill_tokens_per_s: f64,
    decode_tokens_per_s: f64,
    stop_reason: &'static str,
    /// Where the layers ran, in pipeline order.
    stages: Vec<RunStage>,
    /// With `--speculative`: how the drafts fared.
    #[serde(skip_serializing_if = "Option::is_none")]
    speculation: Option<SpeculationReport>,
}

/// Speculative decoding's figures over a run.
#[derive(Serialize, Debug, Clone, Copy)]
pub struct SpeculationReport {
    /// `mtp` (the model's MTP block) or `lookup` (prompt lookup).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drafter: Option<&'static str>,
    pub draft_tokens: u64,
    pub accepted_draft_tokens: u64,
    /// Accepted over proposed (0 when nothing was proposed).
    pub acceptance: f64,
    /// Decode trips (one sequence's decode part of a step) and the tokens per trip.
    pub decode_trips: u64,
    pub tokens_per_trip: f64,
}

impl SpeculationReport {
    pub fn from_snapshot(s: &crate::scheduler::Snapshot) -> SpeculationReport {
        Self::between(&crate::scheduler::Snapshot::default(), s)
    }

    /// What happened between two snapshots of one scheduler.
    pub fn between(from: &crate::scheduler::Snapshot, to: &crate::scheduler::Snapshot) -> SpeculationReport {
        let ratio = |a: u64, b: u64| if b > 0 { a as f64 / b as f64 } else { 0.0 };
        let drafted = to.draft_tokens - from.draft_tokens;
        let accepted = to.accepted_draft_tokens - from.accepted_draft_tokens;
        let trips = to.decode_trips - from.decode_trips;
        SpeculationReport {
            drafter: to.drafter,
            draft_tokens: drafted,
            accepted_draft_tokens: accepted,
            acceptance: ratio(accepted, drafted),
            decode_trips: trips,
            tokens_per_trip: ratio(to.decode_tokens - from.decode_tokens, trips),
        }
    }
}

#[derive(Serialize)]
struct RunStage {
    node: String,
    /// The node's stage service (empty for the in-process engine).
    address: String,
    layers: [usize; 2],
}

/// The prompt's token ids: optionally chat-templated, special tokens recognised, BOS
/// only where the model asks for it (as llama.cpp does).
fn prompt_ids(gguf: &Gguf, tok: &Tokenizer, prompt: &str, chat: bool) -> anyhow::Result<Vec<u32>> {
    let text = if chat {
        let template = ChatTemplate::from_gguf(gguf)?
            .context("--chat: the model has no chat template (tokenizer.chat_template)")?;
        template.render(&[ChatMessage::new("user", prompt)], true)?
    } else {
        prompt.to_owned()
    };
    let mut ids: Vec<u32> = tok.bos_to_add().into_iter().collect();
    ids.extend(tok.encode(&text, true)?);
    Ok(ids)
}

fn run_sampling(args: &RunArgs) -> anyhow::Result<SamplingParams> {
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repeat_penalty: args.repeat_penalty,
        seed: args.seed,
        ..SamplingParams::default()
    };
    sampling.validate()?;
    Ok(sampling)
}

/// Refuses a prompt that is empty or leaves no room for `--max-tokens` in `ctx`.
fn check_room(ids: &[u32], max_tokens: u32, ctx: u32) -> anyhow::Result<()> {
    if ids.is_empty() {
        bail!("the prompt is empty: it has no tokens");
    }
    let need = ids.len() + max_tokens as usize;
    if need > ctx as usize {
        bail!(
            "the prompt ({} tokens) plus --max-tokens ({max_tokens}) needs {need} positions, more than the context length {ctx} (raise --ctx)",
            ids.len(),
        );
    }
    Ok(())
}

/// The grammar `--json-schema` or `--grammar` names, compiled over `tok`'s vocabulary.
fn run_constraint(args: &RunArgs, tok: &Arc<Tokenizer>) -> anyhow::Result<Option<Constraint>> {
    let (path, schema) = match (&args.json_schema, &args.grammar) {
        (Some(p), _) => (p, true),
        (None, Some(p)) => (p, false),
        (None, None) => return Ok(None),
    };
    let flag = if schema { "--json-schema" } else { "--grammar" };
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {flag} {}", path.display()))?;
    let vocab = GrammarVocab::new(tok.clone())?;
    let constraint = if schema {
        let schema: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{flag} {}: not JSON", path.display()))?;
        vocab.json_schema(&schema)
    } else {
        vocab.lark(&text)
    };
    Ok(Some(constraint.with_context(|| format!("{flag} {}", path.display()))?))
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let gguf = Gguf::open(&args.engine.model).with_context(|| format!("reading {}", args.engine.model.display()))?;
    let tok = Arc::new(Tokenizer::from_gguf(&gguf)?);
    let sampling = run_sampling(&args)?;
    let constraint = run_constraint(&args, &tok)?;
    if args.prompt.len() > 1 {
        return run_batch(&gguf, tok, &args, &sampling, constraint);
    }
    let ids = prompt_ids(&gguf, &tok, &args.prompt[0], args.chat)?;
    if ids.is_empty() {
        bail!("the prompt is empty: it has no tokens");
    }
    if args.engine.speculative != crate::cli::SpeculativeMode::Off {
        return run_speculative(&gguf, tok, &args, &sampling, constraint, ids);
    }
    let mut engine = engine::load(&gguf, &args.engine, EngineUse { max_seqs: 1, serving: false, checkpoints: false })?;
    check_room(&ids, args.max_tokens, engine.ctx())?;
    let mut out = std::io::stdout().lock();
    let g = generate(&mut *engine, &tok, &ids, &args, &sampling, constraint, &mut out)?;
    let decoded = g.ids.len().saturating_sub(1);
    let report = RunReport {
        prompt_tokens: ids.len(),
        generated_tokens: g.ids.len(),
        prefill_tokens_per_s: rate(ids.len(), g.prefill_seconds),
        decode_tokens_per_s: rate(decoded, g.decode_seconds),
        prompt_ids: ids,
        generated_ids: g.ids,
        text: g.text,
        prefill_seconds: g.prefill_seconds,
        decode_seconds: g.decode_seconds,
        stop_reason: g.stop_reason,
        stages: run_stages(&*engine),
        speculation: None,
    };
    print_run(&report, &g.rest, args.json)
}

/// Where an engine's layers run, for a run's report.
fn run_stages(engine: &dyn Engine) -> Vec<RunStage> {
    engine
        .placement()
        .into_iter()
        .map(|p| RunStage { node: p.node, address: p.address, layers: [p.layers.start, p.layers.end] })
        .collect()
}

/// A `run` prompt as the scheduler takes it.
fn run_request(
    ids: &[u32],
    args: &RunArgs,
    sampling: &SamplingParams,
    constraint: Option<Constraint>,
) -> crate::scheduler::GenRequest {
    crate::scheduler::GenRequest {
        prompt: ids.to_vec(),
        sampling: sampling.clone(),
        max_tokens: args.max_tokens,
        stop: Vec::new(),
        logprobs: None,
        ignore_eos: args.ignore_eos,
        constraint,
        draft_max: None,
    }
}

/// Prints a run's answer (`--json`: the whole report; else the text not yet streamed)
/// and its figures.
fn print_run(report: &RunReport, rest: &str, json: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, report)?;
        writeln!(out)?;
    } else {
        writeln!(out, "{rest}")?;
        eprintln!(
            "\n[{} prompt tokens at {:.1} tok/s, {} generated at {:.1} tok/s]",
            report.prompt_tokens, report.prefill_tokens_per_s, report.generated_tokens, report.decode_tokens_per_s
        );
        if let Some(s) = &report.speculation {
            eprintln!(
                "[speculation: {} of {} draft tokens accepted ({:.0}%), {:.2} tokens per trip]",
                s.accepted_draft_tokens,
                s.draft_tokens,
                s.acceptance * 100.0,
                s.tokens_per_trip
            );
        }
    }
    Ok(())
}

/// `run` with `--speculative`: the prompt goes through the scheduler, which drafts and
/// verifies (as `serve` does), its text streamed as it comes.
fn run_speculative(
    gguf: &Gguf,
    tok: Arc<Tokenizer>,
    args: &RunArgs,
    sampling: &SamplingParams,
    constraint: Option<Constraint>,
    ids: Vec<u32>,
) -> anyhow::Result<()> {
    use crate::scheduler::{Event, Scheduler, SchedulerConfig};
    let engine = engine::load(gguf, &args.engine, EngineUse { max_seqs: 1, serving: false, checkpoints: false })?;
    check_room(&ids, args.max_tokens, engine.ctx())?;
    let stages = run_stages(&*engine);
    let config = strata_model::config::ModelConfig::from_gguf(gguf)?;
    let speculation = crate::speculative::Speculation::new(&args.engine, &config);
    let scheduler = Scheduler::spawn(
        engine,
        tok,
        SchedulerConfig { max_seqs: 1, max_waiting: None, prefix_reuse: Default::default(), speculation },
    )?;
    let request = run_request(&ids, args, sampling, constraint);
    let t0 = Instant::now();
    let (_, mut rx) = scheduler.submit(request)?;
    let mut out = std::io::stdout().lock();
    let mut text = String::new();
    let finished = loop {
        match rx.blocking_recv() {
            Some(Event::Text(t)) => {
                if !args.json {
                    out.write_all(t.as_bytes())?;
                    out.flush()?;
                }
                text.push_str(&t);
            }
            Some(Event::Logprob(_)) => {}
            Some(Event::Done(f)) => break f,
            Some(Event::Failed(e)) => bail!("{e}"),
            None => bail!("the scheduler stopped"),
        }
    };
    drop(out);
    let seconds = t0.elapsed().as_secs_f64();
    let prefill_seconds = finished.time_to_first_token.as_secs_f64().min(seconds);
    let decode_seconds = seconds - prefill_seconds;
    let generated = finished.generated_ids.len();
    let report = RunReport {
        prompt_tokens: ids.len(),
        generated_tokens: generated,
        prefill_tokens_per_s: rate(ids.len(), prefill_seconds),
        decode_tokens_per_s: rate(generated.saturating_sub(1), decode_seconds),
        prompt_ids: ids,
        generated_ids: finished.generated_ids,
        text,
        prefill_seconds,
        decode_seconds,
        stop_reason: finished.reason.as_str(),
        stages,
        speculation: Some(SpeculationReport::from_snapshot(&scheduler.snapshot())),
    };
    print_run(&report, "", args.json)
}

/// One answer of a batched `run`.
#[derive(Serialize)]
struct BatchAnswer {
    prompt_ids: Vec<u32>,
    generated_ids: Vec<u32>,
    text: String,
    prompt_tokens: usize,
    generated_tokens: usize,
    stop_reason: &'static str,
    /// From the start of the batch to this answer's first token, and to its end.
    first_token_seconds: f64,
    seconds: f64,
}

/// `run` with several prompts: every prompt at once through the scheduler (continuous
/// batching, as `serve` does), each answer printed when all are done.
fn run_batch(
    gguf: &Gguf,
    tok: Arc<Tokenizer>,
    args: &RunArgs,
    sampling: &SamplingParams,
    constraint: Option<Constraint>,
) -> anyhow::Result<()> {
    use crate::scheduler::{Event, Scheduler, SchedulerConfig};
    let prompts: Vec<Vec<u32>> =
        args.prompt.iter().map(|p| prompt_ids(gguf, &tok, p, args.chat)).collect::<anyhow::Result<_>>()?;
    if args.max_tokens == 0 {
        bail!("--max-tokens must be at least 1 with several prompts");
    }
    let n = prompts.len().min(256) as u32;
    let engine = engine::load(gguf, &args.engine, EngineUse { max_seqs: n, serving: false, checkpoints: false })?;
    for ids in &prompts {
        check_room(ids, args.max_tokens, engine.ctx())?;
    }
    let scheduler = Scheduler::spawn(
        engine,
        tok,
        SchedulerConfig {
            max_seqs: n as usize,
            max_waiting: None,
            prefix_reuse: Default::default(),
            speculation: crate::speculative::Speculation::new(
                &args.engine,
                &strata_model::config::ModelConfig::from_gguf(gguf)?,
            ),
        },
    )?;
    let t0 = Instant::now();
    let receivers = prompts
        .iter()
        .map(|ids| {
            let request = run_request(ids, args, sampling, constraint.clone());
            scheduler.submit(request).map(|(_, rx)| rx)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut answers = Vec::new();
    for (ids, mut rx) in prompts.into_iter().zip(receivers) {
        let (mut text, mut first) = (String::new(), None);
        let finished = loop {
            match rx.blocking_recv() {
                Some(Event::Text(t)) => {
                    first.get_or_insert_with(|| t0.elapsed());
                    text.push_str(&t);
                }
                Some(Event::Logprob(_)) => {}
                Some(Event::Done(f)) => break f,
                Some(Event::Failed(e)) => bail!("{e}"),
                None => bail!("the scheduler stopped"),
            }
        };
        let seconds = t0.elapsed().as_secs_f64();
        answers.push(BatchAnswer {
            prompt_tokens: ids.len(),
            prompt_ids: ids,
            generated_tokens: finished.generated_ids.len(),
            generated_ids: finished.generated_ids,
            text,
            stop_reason: finished.reason.as_str(),
            first_token_seconds: first.map_or(seconds, |d| d.as_secs_f64()),
            seconds,
        });
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &answers)?;
        writeln!(out)?;
    } else {
        for (i, a) in answers.iter().enumerate() {
            writeln!(out, "--- {} ---\n{}", i + 1, a.text)?;
        }
        let tokens: usize = answers.iter().map(|a| a.generated_tokens).sum();
        let secs = t0.elapsed().as_secs_f64();
        eprintln!(
            "\n[{} prompts, {tokens} tokens generated in {secs:.1} s: {:.1} tok/s]",
            answers.len(),
            rate(tokens, secs)
        );
    }
    Ok(())
}

/// What `run` generated, and how long it took.
struct Generated {
    ids: Vec<u32>,
    /// All of the text, `rest` included.
    text: String,
    /// The text the detokenizer held back until the end (not yet streamed).
    rest: String,
    prefill_seconds: f64,
    decode_seconds: f64,
    stop_reason: &'static str,
}

/// Prefills `prompt` and decodes one sequence until an end-of-generation token (unless
/// `--ignore-eos`) or `--max-tokens`, streaming the text to `out` unless `--json`.
fn generate(
    engine: &mut dyn Engine,
    tok: &Tokenizer,
    prompt: &[u32],
    args: &RunArgs,
    sampling: &SamplingParams,
    mut constraint: Option<Constraint>,
    out: &mut impl Write,
) -> anyhow::Result<Generated> {
    let seq = 0;
    let mut stream = tok.stream();
    let mut ids = Vec::new();
    let mut text = String::new();
    let t0 = Instant::now();
    let mut prefill_seconds = 0.0;
    let mut stop_reason = "length";
    // The tokens the grammar allows next (nothing to mask without one).
    let allowed = |c: &mut Option<Constraint>| c.as_mut().map_or(Ok(Vec::new()), Constraint::allowed);
    if args.max_tokens > 0 {
        let mut token = engine.prefill(seq, prompt, 0, sampling, &allowed(&mut constraint)?)?;
        prefill_seconds = t0.elapsed().as_secs_f64();
        loop {
            if let Some(c) = constraint.as_mut() {
                c.advance(token)?;
            }
            if tok.is_end_of_generation(token) && !args.ignore_eos {
                stop_reason = "stop";
                break;
            }
            ids.push(token);
            let piece = stream.push(token);
            if !args.json {
                out.write_all(piece.as_bytes())?;
                out.flush()?;
            }
            text.push_str(&piece);
            if ids.len() >= args.max_tokens as usize {
                break;
            }
            let pos = (prompt.len() + ids.len() - 1) as u32;
            token = engine.step(seq, token, pos, sampling, &allowed(&mut constraint)?)?;
        }
    }
    let rest = stream.finish();
    text.push_str(&rest);
    let decode_seconds = t0.elapsed().as_secs_f64() - prefill_seconds;
    Ok(Generated { ids, text, rest, prefill_seconds, decode_seconds, stop_reason })
}

fn rate(n: usize, secs: f64) -> f64 {
    if secs > 0.0 { n as f64 / secs } else { 0.0 }
}

#[derive(Serialize)]
struct BenchReport {
    model: String,
    adapter: String,
    backend: String,
    prompt_tokens: u32,
    decode_tokens: u32,
    prefill_tokens_per_s: f64,
    decode_tokens_per_s: f64,
    weight_bytes_per_token: u64,
    decode_weight_gb_per_s: f64,
    /// The local GPU's streaming-read bandwidth; null for a pipeline.
    read_bandwidth_gb_per_s: Option<f64>,
    bandwidth_fraction: Option<f64>,
    /// Pipelines only: per stage, its decode compute per token.
    #[serde(skip_serializing_if = "Option::is_none")]
    stages: Option<Vec<StageReport>>,
    /// Pipelines only: per hop, the decode round trip's transfer time (both directions,
    /// serialisation included): what the upstream side waited minus what happened
    /// downstream of the hop, averaged over the decode steps.
    #[serde(skip_serializing_if = "Option::is_none")]
    hops: Option<Vec<HopReport>>,
    /// `--profile`: a step of `--profile-rows` rows (default one) op by op; the first entry is
    /// the whole step.
    #[serde(skip_serializing_if = "Option::is_none")]
    profile: Option<Vec<OpReport>>,
    /// The profiled step's rows.
    #[serde(skip_serializing_if = "Option::is_none")]
    profile_rows: Option<u32>,
    /// The sequences the profiled step's rows belong to.
    #[serde(skip_serializing_if = "Option::is_none")]
    profile_seqs: Option<u32>,
}

#[derive(Serialize)]
struct OpReport {
    op: String,
    dispatches: usize,
    ms_per_step: f64,
    /// Of the whole step.
    share: f64,
}

#[derive(Serialize)]
struct StageReport {
    name: String,
    addr: String,
    adapter: String,
    layers: String,
    compute_ms_per_token: f64,
}

#[derive(Serialize)]
struct HopReport {
    from: String,
    to: String,
    round_trip_ms: f64,
}

pub fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let gguf = Gguf::open(&args.engine.model).with_context(|| format!("reading {}", args.engine.model.display()))?;
    // The profiled step's sequences need their slots.
    let max_seqs = if args.profile { args.profile_seqs } else { 1 };
    let mut engine = engine::load(&gguf, &args.engine, EngineUse { max_seqs, serving: false, checkpoints: false })?;
    let need = args.prompt_tokens + args.decode_tokens;
    if need > engine.ctx() {
        bail!(
            "--prompt-tokens + --decode-tokens = {need} is more than the context length {} (raise --ctx)",
            engine.ctx()
        );
    }
    let vocab = strata_model::config::ModelConfig::from_gguf(&gguf)?.n_vocab as u32;
    let ids = bench_prompt(args.prompt_tokens, vocab);
    let m = measure(&mut *engine, &ids, args.decode_tokens)?;
    let mut report = bench_report(&args, &*engine, &m)?;
    if args.profile {
        if !args.profile_rows.is_multiple_of(args.profile_seqs) {
            bail!("--profile-rows {} do not split evenly over --profile-seqs {}", args.profile_rows, args.profile_seqs);
        }
        let per_seq = args.profile_rows / args.profile_seqs;
        let pos = (args.prompt_tokens + args.decode_tokens).saturating_sub(per_seq);
        let Some(ops) = engine.profile_step(args.profile_rows, args.profile_seqs, pos)? else {
            bail!("--profile times the ops of this machine's own stage: run it without --peer or --discover");
        };
        let whole = ops.first().map_or(f64::NAN, |o| o.seconds);
        report.profile_rows = Some(args.profile_rows);
        report.profile_seqs = Some(args.profile_seqs);
        report.profile = Some(
            ops.iter()
                .map(|o| OpReport {
                    op: o.label.to_owned(),
                    dispatches: o.dispatches,
                    ms_per_step: o.seconds * 1e3,
                    share: o.seconds / whole,
                })
                .collect(),
        );
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_bench(&report);
    }
    Ok(())
}

/// A deterministic prompt of `n` ordinary tokens: ids past the control tokens at the
/// start of the vocabulary (the first 300), or any ids in a vocabulary smaller than that.
fn bench_prompt(n: u32, vocab: u32) -> Vec<u32> {
    bench_prompt_from(n, vocab, 0)
}

/// Like [`bench_prompt`], a different one for each `seed`.
pub fn bench_prompt_from(n: u32, vocab: u32, seed: u32) -> Vec<u32> {
    let first = if vocab > 300 { 300 } else { 0 };
    let span = (vocab - first).max(1);
    (0..n).map(|i| first + (i.wrapping_add(seed.wrapping_mul(104729)).wrapping_mul(7919)) % span).collect()
}

/// What `bench` timed.
struct Measured {
    prefill_seconds: f64,
    decode_seconds: f64,
    /// Each node's counters over the decode steps (a pipeline's; empty for the local engine).
    decode_counters: Vec<NodeCounters>,
}

/// Prefills `ids` and decodes `decode_tokens` greedily on one sequence, timing both.
fn measure(engine: &mut dyn Engine, ids: &[u32], decode_tokens: u32) -> anyhow::Result<Measured> {
    let greedy = SamplingParams::greedy();
    // One warm-up step so that first-use costs (sequence set-up) stay out of the figures.
    engine.prefill(1, &ids[..1], 0, &greedy, &[])?;
    engine.release(1)?;
    let t0 = Instant::now();
    let mut token = engine.prefill(0, ids, 0, &greedy, &[])?;
    let prefill_seconds = t0.elapsed().as_secs_f64();
    let before = engine.node_counters()?;
    let t1 = Instant::now();
    for i in 0..decode_tokens {
        token = engine.step(0, token, ids.len() as u32 + i, &greedy, &[])?;
    }
    let decode_seconds = t1.elapsed().as_secs_f64();
    let after = engine.node_counters()?;
    let decode_counters = after.iter().zip(&before).map(|(a, b)| a.since(b)).collect();
    Ok(Measured { prefill_seconds, decode_seconds, decode_counters })
}

fn bench_report(args: &BenchArgs, engine: &dyn Engine, m: &Measured) -> anyhow::Result<BenchReport> {
    let decode_tps = f64::from(args.decode_tokens) / m.decode_seconds;
    let placement = engine.placement();
    let joined = |f: fn(&Placement) -> &str| placement.iter().map(f).collect::<Vec<_>>().join(" | ");
    let bytes = engine.weight_bytes_per_token();
    let achieved = bytes as f64 * decode_tps / 1e9;
    let bandwidth = engine.read_bandwidth()?;
    let pipelined = bandwidth.is_none();
    Ok(BenchReport {
        model: args.engine.model.display().to_string(),
        adapter: joined(|p| &p.adapter),
        backend: joined(|p| &p.backend),
        prompt_tokens: args.prompt_tokens,
        decode_tokens: args.decode_tokens,
        prefill_tokens_per_s: f64::from(args.prompt_tokens) / m.prefill_seconds,
        decode_tokens_per_s: decode_tps,
        weight_bytes_per_token: bytes,
        decode_weight_gb_per_s: achieved,
        read_bandwidth_gb_per_s: bandwidth,
        bandwidth_fraction: bandwidth.map(|bw| achieved / bw),
        stages: pipelined.then(|| stage_reports(&placement, m, args.decode_tokens)),
        hops: pipelined.then(|| hop_reports(&placement, m, args.decode_tokens)),
        profile: None,
        profile_rows: None,
        profile_seqs: None,
    })
}

/// Per stage, its decode compute per token.
fn stage_reports(placement: &[Placement], m: &Measured, decode_tokens: u32) -> Vec<StageReport> {
    let per = |secs: f64| secs / f64::from(decode_tokens) * 1e3;
    let report = |(p, c): (&Placement, &NodeCounters)| StageReport {
        name: p.node.clone(),
        addr: p.address.clone(),
        adapter: p.adapter.clone(),
        layers: format!("{}..{}", p.layers.start, p.layers.end),
        compute_ms_per_token: per(c.compute_seconds),
    };
    placement.iter().zip(&m.decode_counters).map(report).collect()
}

/// Per hop, what its upstream side waited beyond the stage after it: the round trip.
fn hop_reports(placement: &[Placement], m: &Measured, decode_tokens: u32) -> Vec<HopReport> {
    let per = |secs: f64| secs / f64::from(decode_tokens) * 1e3;
    let d = &m.decode_counters;
    let below = |k: usize| d.get(k).map_or(0.0, |c| c.compute_seconds + c.downstream_wait_seconds);
    let first = HopReport {
        from: "coordinator".into(),
        to: placement[0].node.clone(),
        round_trip_ms: per(m.decode_seconds - below(0)),
    };
    let rest = (0..placement.len().saturating_sub(1)).map(|k| HopReport {
        from: placement[k].node.clone(),
        to: placement[k + 1].node.clone(),
        round_trip_ms: per(d[k].downstream_wait_seconds - below(k + 1)),
    });
    std::iter::once(first).chain(rest).collect()
}

fn print_bench(report: &BenchReport) {
    println!("model            {}", report.model);
    println!("adapter          {} ({})", report.adapter, report.backend);
    println!("prefill          {:.1} tok/s ({} tokens)", report.prefill_tokens_per_s, report.prompt_tokens);
    println!("decode           {:.2} tok/s ({} tokens)", report.decode_tokens_per_s, report.decode_tokens);
    // Of a mixture of experts, only the experts a token chooses.
    println!("weights/token    {:.1} MB read", report.weight_bytes_per_token as f64 / 1e6);
    println!("weight reads     {:.2} GB/s", report.decode_weight_gb_per_s);
    if let (Some(bw), Some(f)) = (report.read_bandwidth_gb_per_s, report.bandwidth_fraction) {
        println!("read bandwidth   {bw:.2} GB/s (plain streaming read, measured now)");
        println!("fraction         {:.0}%", f * 100.0);
    }
    for s in report.stages.iter().flatten() {
        println!(
            "stage {:<10} layers {:<8} {:.2} ms/token compute ({})",
            s.name, s.layers, s.compute_ms_per_token, s.addr
        );
    }
    for h in report.hops.iter().flatten() {
        println!("hop {} -> {}: {:.3} ms round trip per token", h.from, h.to, h.round_trip_ms);
    }
    if let Some(ops) = &report.profile {
        let rows = report.profile_rows.unwrap_or(1);
        let seqs = match report.profile_seqs.unwrap_or(1) {
            1 => "one sequence".to_owned(),
            n => format!("{n} sequences"),
        };
        println!("\n{rows}-row step of {seqs}, op by op (each kind alone; the ops overlap less than this adds up to):");
        println!("{:<20} {:>10} {:>12} {:>7}", "op", "dispatches", "ms/step", "share");
        for o in ops {
            println!("{:<20} {:>10} {:>12.3} {:>6.1}%", o.op, o.dispatches, o.ms_per_step, o.share * 100.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_prompts_stay_inside_any_vocabulary() {
        for vocab in [1, 2, 100, 299, 300, 301, 49152, 151936] {
            let ids = bench_prompt(1000, vocab);
            assert!(ids.iter().all(|&t| t < vocab), "vocab {vocab}: {:?}", ids.iter().max());
            if vocab > 300 {
                assert!(ids.iter().all(|&t| t >= 300), "vocab {vocab}: control tokens in the prompt");
            }
        }
    }
}
