//! `strata bench --concurrency N`: N sequences at once, each with its own prompt, through
//! the same scheduler as `serve` (continuous batching), and what that did.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use strata_model::gguf::Gguf;
use strata_model::sampling::SamplingParams;
use strata_model::tokenizer::Tokenizer;

use crate::cli::BenchArgs;
use crate::engine::{self, EngineUse};
use crate::scheduler::{Event, GenRequest, Scheduler, SchedulerConfig, Snapshot};

/// What `bench --concurrency` measured.
#[derive(Serialize)]
pub struct ConcurrentReport {
    model: String,
    adapter: String,
    concurrency: u32,
    /// Tokens of each prompt, and tokens each sequence decodes.
    prompt_tokens: u32,
    decode_tokens: u32,
    /// Rows a step may carry (`--batch-tokens`).
    batch_tokens: u32,
    /// Tokens generated per second while every sequence decodes (from the last first
    /// token to the first finish): what the batch produces once it is full.
    aggregate_decode_tokens_per_s: f64,
    /// Each sequence's decode tokens/s (after its first token), mean, slowest and fastest.
    per_sequence_decode_tokens_per_s: f64,
    per_sequence_min: f64,
    per_sequence_max: f64,
    /// From submitting all the requests to each one's first token.
    ttft_p50_ms: f64,
    ttft_p99_ms: f64,
    /// Every prompt's tokens over the time until the last first token.
    prefill_tokens_per_s: f64,
    /// Every generated token over the whole run.
    output_tokens_per_s: f64,
    wall_seconds: f64,
    /// Rows per step, steps taken.
    rows_per_step: f64,
    steps: u64,
    /// Steps kept in flight (`--micro-batches`, by default one per distinct device).
    micro_batches: usize,
    /// Per stage, time computing over wall time while every sequence decoded.
    stages: Vec<StageBusy>,
    /// 1 - the stages' mean busy fraction: how much of the pipeline idles.
    bubble: f64,
    /// With `--speculative`: the drafts, and tokens per decode trip.
    #[serde(skip_serializing_if = "Option::is_none")]
    speculation: Option<crate::generate::SpeculationReport>,
}

#[derive(Serialize)]
struct StageBusy {
    node: String,
    layers: String,
    busy_fraction: f64,
}

/// One sequence's timing.
struct Timing {
    first_token: Duration,
    done: Duration,
    tokens: usize,
}

/// Runs the benchmark and prints its report (a table, or JSON with `--json`).
pub fn run(args: BenchArgs, concurrency: u32) -> anyhow::Result<()> {
    let report = bench(&args, concurrency)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print(&report);
    }
    Ok(())
}

pub fn bench(args: &BenchArgs, concurrency: u32) -> anyhow::Result<ConcurrentReport> {
    let gguf = Gguf::open(&args.engine.model).with_context(|| format!("reading {}", args.engine.model.display()))?;
    let tokenizer = Arc::new(Tokenizer::from_gguf(&gguf)?);
    let config = strata_model::config::ModelConfig::from_gguf(&gguf)?;
    let vocab = config.n_vocab as u32;
    let engine =
        engine::load(&gguf, &args.engine, EngineUse { max_seqs: concurrency, serving: false, checkpoints: false })?;
    let from_file = match &args.prompt_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            let mut ids: Vec<u32> = tokenizer.bos_to_add().into_iter().collect();
            ids.extend(tokenizer.encode(&text, true)?);
            if ids.is_empty() {
                bail!("--prompt-file {}: the prompt has no tokens", path.display());
            }
            Some(ids)
        }
        None => None,
    };
    let prompt_tokens = from_file.as_ref().map_or(args.prompt_tokens, |ids| ids.len() as u32);
    let need = prompt_tokens + args.decode_tokens;
    if need > engine.ctx() {
        bail!(
            "the prompt's {prompt_tokens} tokens + --decode-tokens = {need} is more than the context length {} (raise --ctx)",
            engine.ctx()
        );
    }
    let adapter = engine.placement().iter().map(|p| p.adapter.clone()).collect::<Vec<_>>().join(" | ");
    let batch_tokens = engine.max_batch();
    let micro_batches = engine.micro_batches().max(1);
    let placement = engine.placement();
    let scheduler = Scheduler::spawn(
        engine,
        tokenizer,
        SchedulerConfig {
            max_seqs: concurrency as usize,
            max_waiting: None,
            prefix_reuse: Default::default(),
            speculation: crate::speculative::Speculation::new(&args.engine, &config),
        },
    )?;
    // One short request first, so that first-use costs stay out of the figures.
    drain(scheduler.submit(request(vec![300 % vocab], 2))?.1)?;

    let t0 = Instant::now();
    let receivers: Vec<_> = (0..concurrency)
        .map(|i| {
            let prompt = match &from_file {
                Some(ids) => ids.clone(),
                None => crate::generate::bench_prompt_from(args.prompt_tokens, vocab, 1 + i * 7),
            };
            scheduler.submit(request(prompt, args.decode_tokens)).map(|(_, rx)| rx)
        })
        .collect::<Result<_, _>>()?;
    let steps_before = scheduler.snapshot();
    // Collect on threads, so that each first token and finish is timed when it happens.
    let handles: Vec<_> = receivers.into_iter().map(|rx| std::thread::spawn(move || timing(rx, t0))).collect();
    // Busy fractions over the window where every sequence decodes.
    let sampler = BusySampler::start(&scheduler, concurrency as usize);
    let timings =
        handles.into_iter().map(|h| h.join().expect("a collector thread")).collect::<anyhow::Result<Vec<_>>>()?;
    let wall = t0.elapsed().as_secs_f64();
    let (busy_from, busy_to) = sampler.finish();
    let snap = scheduler.snapshot();

    let mut ttft: Vec<f64> = timings.iter().map(|t| t.first_token.as_secs_f64()).collect();
    ttft.sort_by(f64::total_cmp);
    let rates: Vec<f64> = timings
        .iter()
        .map(|t| {
            let secs = (t.done - t.first_token).as_secs_f64();
            if secs > 0.0 { (t.tokens.saturating_sub(1)) as f64 / secs } else { 0.0 }
        })
        .collect();
    let stages: Vec<StageBusy> = placement
        .iter()
        .enumerate()
        .map(|(i, p)| StageBusy {
            node: p.node.clone(),
            layers: format!("{}..{}", p.layers.start, p.layers.end),
            busy_fraction: busy_fraction(&busy_from, &busy_to, i),
        })
        .collect();
    let mean_busy = stages.iter().map(|s| s.busy_fraction).sum::<f64>() / stages.len().max(1) as f64;
    let steps = snap.steps_total - steps_before.steps_total;
    let rows = snap.rows_total - steps_before.rows_total;
    let generated: usize = timings.iter().map(|t| t.tokens).sum();
    Ok(ConcurrentReport {
        model: args.engine.model.display().to_string(),
        adapter,
        concurrency,
        prompt_tokens,
        decode_tokens: args.decode_tokens,
        batch_tokens,
        aggregate_decode_tokens_per_s: window_rate(&busy_from, &busy_to).unwrap_or_else(|| rates.iter().sum()),
        per_sequence_decode_tokens_per_s: rates.iter().sum::<f64>() / rates.len() as f64,
        per_sequence_min: rates.iter().copied().fold(f64::INFINITY, f64::min),
        per_sequence_max: rates.iter().copied().fold(0.0, f64::max),
        ttft_p50_ms: percentile(&ttft, 0.50) * 1e3,
        ttft_p99_ms: percentile(&ttft, 0.99) * 1e3,
        prefill_tokens_per_s: f64::from(prompt_tokens * concurrency) / ttft.last().copied().unwrap_or(f64::NAN),
        output_tokens_per_s: generated as f64 / wall,
        wall_seconds: wall,
        rows_per_step: if steps > 0 { rows as f64 / steps as f64 } else { 0.0 },
        steps,
        micro_batches,
        stages,
        bubble: 1.0 - mean_busy,
        speculation: (args.engine.speculative != crate::cli::SpeculativeMode::Off)
            .then(|| crate::generate::SpeculationReport::between(&steps_before, &snap)),
    })
}

fn request(prompt: Vec<u32>, max_tokens: u32) -> GenRequest {
    GenRequest {
        prompt,
        sampling: SamplingParams::greedy(),
        max_tokens,
        stop: Vec::new(),
        logprobs: None,
        ignore_eos: true,
        constraint: None,
        draft_max: None,
    }
}

/// Waits for a request to end.
fn drain(rx: tokio::sync::mpsc::UnboundedReceiver<Event>) -> anyhow::Result<()> {
    timing(rx, Instant::now()).map(|_| ())
}

/// Follows one request's events: when its first token came, when it ended, its tokens.
fn timing(mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>, t0: Instant) -> anyhow::Result<Timing> {
    let mut first = None;
    while let Some(e) = rx.blocking_recv() {
        match e {
            Event::Text(_) | Event::Logprob(_) => {
                first.get_or_insert_with(|| t0.elapsed());
            }
            Event::Done(f) => {
                let done = t0.elapsed();
                return Ok(Timing { first_token: first.unwrap_or(done), done, tokens: f.completion_tokens });
            }
            Event::Failed(e) => bail!("a benchmark request failed: {e}"),
        }
    }
    bail!("the scheduler stopped")
}

/// Watches the scheduler until every sequence decodes (all have their first token: the
/// queue and the prefill are done) and reads the stages' busy seconds then and when the
/// first sequence finishes.
struct BusySampler {
    handle: std::thread::JoinHandle<(Sample, Sample)>,
}

/// When, each stage's busy seconds then, and the tokens generated so far.
type Sample = (Instant, Vec<f64>, u64);

impl BusySampler {
    fn start(scheduler: &Scheduler, concurrency: usize) -> BusySampler {
        let scheduler = scheduler.clone();
        let read = |s: &Snapshot| {
            let busy = s.engine.stages.iter().map(|st| st.busy_seconds).collect::<Vec<_>>();
            (Instant::now(), busy, s.generated_tokens_total)
        };
        let handle = std::thread::spawn(move || {
            let (mut from, mut started) = (None, false);
            loop {
                std::thread::sleep(Duration::from_millis(5));
                let s = scheduler.snapshot();
                // The benchmark's requests are in (the snapshot is published after each step).
                started |= s.active + s.queued > 0;
                // Every sequence has its first token and none has finished: the decode window.
                if from.is_none() && s.decoding == concurrency {
                    from = Some(read(&s));
                }
                if let Some(from) = &from
                    && s.active < concurrency
                {
                    return (from.clone(), read(&s));
                }
                if started && s.active == 0 && s.queued == 0 {
                    let r = read(&s);
                    return (r.clone(), r);
                }
            }
        });
        BusySampler { handle }
    }

    fn finish(self) -> (Sample, Sample) {
        self.handle.join().expect("the busy sampler")
    }
}

/// Tokens per second between two samples; `None` for an empty window.
fn window_rate(from: &Sample, to: &Sample) -> Option<f64> {
    let secs = to.0.duration_since(from.0).as_secs_f64();
    (secs > 0.0 && to.2 > from.2).then(|| (to.2 - from.2) as f64 / secs)
}

fn busy_fraction(from: &Sample, to: &Sample, stage: usize) -> f64 {
    let wall = to.0.duration_since(from.0).as_secs_f64();
    let (a, b) = (from.1.get(stage).copied().unwrap_or(0.0), to.1.get(stage).copied().unwrap_or(0.0));
    if wall > 0.0 { ((b - a) / wall).clamp(0.0, 1.0) } else { 0.0 }
}

/// The `p`-quantile of sorted values (nearest rank).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn print(r: &ConcurrentReport) {
    println!("model            {}", r.model);
    println!("adapter          {}", r.adapter);
    println!(
        "sequences        {} at once, {} prompt + {} decode tokens each, steps of up to {} rows",
        r.concurrency, r.prompt_tokens, r.decode_tokens, r.batch_tokens
    );
    println!(
        "decode           {:.2} tok/s all sequences together; {:.2} tok/s each (slowest {:.2}, fastest {:.2})",
        r.aggregate_decode_tokens_per_s, r.per_sequence_decode_tokens_per_s, r.per_sequence_min, r.per_sequence_max
    );
    println!("first token      p50 {:.0} ms, p99 {:.0} ms", r.ttft_p50_ms, r.ttft_p99_ms);
    println!("prefill          {:.1} tok/s (every prompt until the last first token)", r.prefill_tokens_per_s);
    println!(
        "output           {:.2} tok/s over {:.1} s, {} steps of {:.1} rows on average",
        r.output_tokens_per_s, r.wall_seconds, r.steps, r.rows_per_step
    );
    println!("in flight        up to {} step(s) at once (micro-batches)", r.micro_batches);
    for s in &r.stages {
        println!(
            "stage {:<10} layers {:<8} busy {:.0}% while every sequence decodes",
            s.node,
            s.layers,
            s.busy_fraction * 100.0
        );
    }
    println!("bubble           {:.0}% (1 - the stages' mean busy fraction)", r.bubble * 100.0);
    if let Some(s) = &r.speculation {
        println!(
            "speculation      {} of {} draft tokens accepted ({:.0}%), {:.2} tokens per decode trip",
            s.accepted_draft_tokens,
            s.draft_tokens,
            s.acceptance * 100.0,
            s.tokens_per_trip
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v = [1.0, 2.0, 3.0, 4.0, 10.0];
        assert_eq!((percentile(&v, 0.5), percentile(&v, 0.99), percentile(&v, 0.0)), (3.0, 10.0, 1.0));
        assert!(percentile(&[], 0.5).is_nan());
    }
}
