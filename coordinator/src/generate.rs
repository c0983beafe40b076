//! `strata run` and `strata bench`.

use std::io::Write;
use std::time::Instant;

use anyhow::{Context, bail};
use serde::Serialize;
use strata_model::chat::{ChatMessage, ChatTemplate};
use strata_model::gguf::Gguf;
use strata_model::plan::{ModelCost, PlanConfig};
use strata_model::sampling::SamplingParams;
use strata_model::tokenizer::Tokenizer;

use crate::cli::{BenchArgs, RunArgs};
use crate::engine::Engine;

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
    stages: Vec<Placement>,
}

#[derive(Serialize)]
struct Placement {
    node: String,
    /// The node's stage service (empty for the in-process engine).
    address: String,
    layers: [usize; 2],
}

/// The prompt's token ids: optionally chat-templated, special tokens recognised, BOS
/// only where the model asks for it (as llama.cpp does).
fn prompt_ids(gguf: &Gguf, tok: &Tokenizer, prompt: &str, chat: bool) -> anyhow::Result<Vec<u32>> {
    let text = if chat {
        let template = ChatTemplate::from_gguf(gguf)?.context("--chat: the model has no chat template (tokenizer.chat_template)")?;
        template.render(&[ChatMessage { role: "user".into(), content: prompt.into() }], true)?
    } else {
        prompt.to_owned()
    };
    let mut ids: Vec<u32> = tok.bos_to_add().into_iter().collect();
    ids.extend(tok.encode(&text, true)?);
    Ok(ids)
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let gguf = Gguf::open(&args.engine.model).with_context(|| format!("reading {}", args.engine.model.display()))?;
    let tok = Tokenizer::from_gguf(&gguf)?;
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
    let ids = prompt_ids(&gguf, &tok, &args.prompt, args.chat)?;
    if ids.is_empty() {
        bail!("the prompt is empty: it has no tokens");
    }
    let mut engine = Engine::load(&gguf, &args.engine)?;
    let need = ids.len() + args.max_tokens as usize;
    if need > engine.ctx() as usize {
        bail!(
            "the prompt ({} tokens) plus --max-tokens ({}) needs {need} positions, more than the context length {} (raise --ctx)",
            ids.len(),
            args.max_tokens,
            engine.ctx()
        );
    }
    let seq = 0;
    if sampling.has_penalties() {
        engine.note_prompt(seq, &ids)?;
    }
    let mut out = std::io::stdout().lock();
    let mut stream = tok.stream();
    let mut generated = Vec::new();
    let mut text = String::new();
    let t0 = Instant::now();
    let mut prefill_seconds = 0.0;
    let mut stop_reason = "length";
    if args.max_tokens > 0 {
        let mut token = engine.prefill(seq, &ids, 0, &sampling)?;
        prefill_seconds = t0.elapsed().as_secs_f64();
        loop {
            if tok.is_end_of_generation(token) && !args.ignore_eos {
                stop_reason = "stop";
                break;
            }
            generated.push(token);
            let piece = stream.push(token);
            if !args.json {
                out.write_all(piece.as_bytes())?;
                out.flush()?;
            }
            text.push_str(&piece);
            if generated.len() >= args.max_tokens as usize {
                break;
            }
            let pos = (ids.len() + generated.len() - 1) as u32;
            token = engine.step(seq, &[token], &[pos], &sampling)?;
        }
    }
    let rest = stream.finish();
    text.push_str(&rest);
    let decode_seconds = t0.elapsed().as_secs_f64() - prefill_seconds;
    let decoded = generated.len().saturating_sub(1);
    let report = RunReport {
        prompt_tokens: ids.len(),
        generated_tokens: generated.len(),
        prefill_tokens_per_s: rate(ids.len(), prefill_seconds),
        decode_tokens_per_s: rate(decoded, decode_seconds),
        prompt_ids: ids,
        generated_ids: generated,
        text,
        prefill_seconds,
        decode_seconds,
        stop_reason,
        stages: engine.placement().into_iter().map(|(node, address, l)| Placement { node, address, layers: [l.start, l.end] }).collect(),
    };
    if args.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        writeln!(out, "{rest}")?;
        eprintln!(
            "\n[{} prompt tokens at {:.1} tok/s, {} generated at {:.1} tok/s]",
            report.prompt_tokens, report.prefill_tokens_per_s, report.generated_tokens, report.decode_tokens_per_s
        );
    }
    Ok(())
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
    let mut engine = Engine::load(&gguf, &args.engine)?;
    let need = args.prompt_tokens + args.decode_tokens;
    if need > engine.ctx() {
        bail!("--prompt-tokens + --decode-tokens = {need} is more than the context length {} (raise --ctx)", engine.ctx());
    }
    let config = strata_model::config::ModelConfig::from_gguf(&gguf)?;
    let vocab = config.n_vocab as u32;
    // A deterministic prompt of ordinary tokens (ids past the control tokens at the start).
    let ids: Vec<u32> = (0..args.prompt_tokens).map(|i| 300 + (i * 7919) % (vocab - 300).max(1)).collect();
    let greedy = SamplingParams::greedy();
    // One warm-up step so that first-use costs (sequence set-up) stay out of the figures.
    engine.prefill(1, &ids[..1], 0, &greedy)?;
    engine.release(1)?;

    let t0 = Instant::now();
    let mut token = engine.prefill(0, &ids, 0, &greedy)?;
    let prefill = t0.elapsed().as_secs_f64();
    let before = match &engine {
        Engine::Pipeline(p) => Some(p.counters()?),
        Engine::Local(_) => None,
    };
    let t1 = Instant::now();
    for i in 0..args.decode_tokens {
        token = engine.step(0, &[token], &[args.prompt_tokens + i], &greedy)?;
    }
    let decode = t1.elapsed().as_secs_f64();
    let decode_tps = f64::from(args.decode_tokens) / decode;
    let mut report = BenchReport {
        model: args.engine.model.display().to_string(),
        adapter: String::new(),
        backend: String::new(),
        prompt_tokens: args.prompt_tokens,
        decode_tokens: args.decode_tokens,
        prefill_tokens_per_s: f64::from(args.prompt_tokens) / prefill,
        decode_tokens_per_s: decode_tps,
        weight_bytes_per_token: 0,
        decode_weight_gb_per_s: 0.0,
        read_bandwidth_gb_per_s: None,
        bandwidth_fraction: None,
        stages: None,
        hops: None,
    };
    match &engine {
        Engine::Local(e) => {
            let bytes = e.stage.weight_bytes_per_token();
            let achieved = bytes as f64 * decode_tps / 1e9;
            let bandwidth = strata_node::bench::read_bandwidth(e.stage.gpu())?;
            let info = &e.stage.gpu().info;
            report.adapter = info.name.clone();
            report.backend = format!("{:?}", info.backend);
            report.weight_bytes_per_token = bytes;
            report.decode_weight_gb_per_s = achieved;
            report.read_bandwidth_gb_per_s = Some(bandwidth);
            report.bandwidth_fraction = Some(achieved / bandwidth);
        }
        Engine::Pipeline(p) => {
            let after = p.counters()?;
            let d: Vec<_> = after.iter().zip(before.as_deref().unwrap_or_default()).map(|(a, b)| a.since(b)).collect();
            let cost = ModelCost::new(&gguf, &config, &PlanConfig::new(engine.ctx() as usize))?;
            let bytes = cost.layers.iter().map(|l| l.weight_bytes).sum::<u64>() + cost.head_bytes;
            report.adapter = p.stages.iter().map(|s| s.adapter.as_str()).collect::<Vec<_>>().join(" | ");
            report.backend = p.stages.iter().map(|s| s.backend.as_str()).collect::<Vec<_>>().join(" | ");
            report.weight_bytes_per_token = bytes;
            report.decode_weight_gb_per_s = bytes as f64 * decode_tps / 1e9;
            let n = f64::from(args.decode_tokens);
            let per = |secs: f64| secs / n * 1e3;
            report.stages = Some(
                p.stages
                    .iter()
                    .zip(&d)
                    .map(|(s, c)| StageReport {
                        name: s.name.clone(),
                        addr: s.addr.clone(),
                        adapter: s.adapter.clone(),
                        layers: format!("{}..{}", s.layers.start, s.layers.end),
                        compute_ms_per_token: per(c.compute_seconds),
                    })
                    .collect(),
            );
            // What each side waited for beyond the stage after it: the hop's round trip.
            let below = |k: usize| d.get(k).map_or(0.0, |c| c.compute_seconds + c.downstream_wait_seconds);
            let mut hops = vec![HopReport { from: "coordinator".into(), to: p.stages[0].name.clone(), round_trip_ms: per(decode - below(0)) }];
            for k in 0..p.stages.len().saturating_sub(1) {
                hops.push(HopReport {
                    from: p.stages[k].name.clone(),
                    to: p.stages[k + 1].name.clone(),
                    round_trip_ms: per(d[k].downstream_wait_seconds - below(k + 1)),
                });
            }
            report.hops = Some(hops);
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("model            {}", report.model);
        println!("adapter          {} ({})", report.adapter, report.backend);
        println!("prefill          {:.1} tok/s ({} tokens)", report.prefill_tokens_per_s, report.prompt_tokens);
        println!("decode           {:.2} tok/s ({} tokens)", report.decode_tokens_per_s, report.decode_tokens);
        println!("weights/token    {:.1} MB", report.weight_bytes_per_token as f64 / 1e6);
        println!("weight reads     {:.2} GB/s", report.decode_weight_gb_per_s);
        if let (Some(bw), Some(f)) = (report.read_bandwidth_gb_per_s, report.bandwidth_fraction) {
            println!("read bandwidth   {bw:.2} GB/s (plain streaming read, measured now)");
            println!("fraction         {:.0}%", f * 100.0);
        }
        for s in report.stages.iter().flatten() {
            println!("stage {:<10} layers {:<8} {:.2} ms/token compute ({})", s.name, s.layers, s.compute_ms_per_token, s.addr);
        }
        for h in report.hops.iter().flatten() {
            println!("hop {} -> {}: {:.3} ms round trip per token", h.from, h.to, h.round_trip_ms);
        }
    }
    Ok(())
}
