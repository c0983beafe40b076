//! `/metrics`: Prometheus text exposition of the server's counters and the scheduler's gauges.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;

use strata_model::config::{LayerKind, ModelConfig};

use crate::engine::LATENCY_BOUNDS;
use crate::scheduler::Scheduler;

/// HTTP requests answered, by endpoint and status.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    /// Cache bytes of one held position (KV, every attention layer) and of one held
    /// sequence (recurrent state, every DeltaNet layer), all stages together.
    cache_cost: (u64, u64),
}

impl Metrics {
    /// The metrics of a server of the model `config` describes; with `checkpoints`, each
    /// sequence's recurrent state has a checkpoint beside it.
    pub fn for_model(config: &ModelConfig, checkpoints: bool) -> Metrics {
        let layers = |kind| config.layers.iter().filter(|&&k| k == kind).count() as u64;
        let a = &config.attention;
        // The pool holds K and V as f16.
        let per_position = layers(LayerKind::Attention) * 2 * (a.n_head_kv * a.head_dim) as u64 * 2;
        let copies = if checkpoints { 2 } else { 1 };
        let per_sequence = config.recurrent_state_bytes() * copies;
        Metrics { requests: Mutex::default(), cache_cost: (per_position, per_sequence) }
    }

    fn count(&self, endpoint: &str, status: u16) {
        *self.requests.lock().expect("metrics lock").entry((endpoint.to_owned(), status)).or_default() += 1;
    }

    pub fn render(&self, scheduler: &Scheduler) -> String {
        let snap = scheduler.snapshot();
        let mut out = String::new();
        let head = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        head(&mut out, "strata_requests_total", "counter", "HTTP requests answered, by endpoint and status.");
        for ((endpoint, status), n) in self.requests.lock().expect("metrics lock").iter() {
            let _ = writeln!(out, "strata_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}");
        }
        head(&mut out, "strata_prompt_tokens_total", "counter", "Prompt tokens of admitted requests.");
        let _ = writeln!(out, "strata_prompt_tokens_total {}", snap.prompt_tokens_total);
        head(&mut out, "strata_generated_tokens_total", "counter", "Tokens generated, all requests.");
        let _ = writeln!(out, "strata_generated_tokens_total {}", snap.generated_tokens_total);
        head(&mut out, "strata_active_sequences", "gauge", "Sequences generating now.");
        let _ = writeln!(out, "strata_active_sequences {}", snap.active);
        head(&mut out, "strata_queue_depth", "gauge", "Requests waiting for a sequence slot or KV pool room.");
        let _ = writeln!(out, "strata_queue_depth {}", snap.queued);
        head(
            &mut out,
            "strata_requests_held",
            "gauge",
            "Requests running or queued; at --max-seqs plus --max-queue new ones get 503.",
        );
        let _ = writeln!(out, "strata_requests_held {}", scheduler.held());
        if let Some((kv, used)) = snap.kv {
            head(
                &mut out,
                "strata_kv_blocks",
                "gauge",
                "KV pool blocks, held by sequences or free (every stage's pool).",
            );
            let _ = writeln!(out, "strata_kv_blocks{{state=\"used\"}} {used}");
            let _ = writeln!(out, "strata_kv_blocks{{state=\"free\"}} {}", kv.blocks.saturating_sub(used));
            head(&mut out, "strata_kv_block_size", "gauge", "Positions per KV pool block.");
            let _ = writeln!(out, "strata_kv_block_size {}", kv.block_size);
        }
        head(
            &mut out,
            "strata_preemptions_total",
            "counter",
            "Sequences preempted for KV pool room (recomputed later).",
        );
        let _ = writeln!(out, "strata_preemptions_total {}", snap.preemptions);
        head(
            &mut out,
            "strata_kv_pool_waits_total",
            "counter",
            "Requests that waited in the queue for KV pool room beside running sequences.",
        );
        let _ = writeln!(out, "strata_kv_pool_waits_total {}", snap.pool_waits);
        head(
            &mut out,
            "strata_prefix_cache_hits_total",
            "counter",
            "Requests whose prompt reused cached positions: a finished sequence's (the prefix cache) or a running one's (a fork).",
        );
        let _ = writeln!(out, "strata_prefix_cache_hits_total {}", snap.prefix_hits);
        head(
            &mut out,
            "strata_prefix_cache_forks_total",
            "counter",
            "Of those, requests that started as a fork of a running sequence, sharing its KV blocks.",
        );
        let _ = writeln!(out, "strata_prefix_cache_forks_total {}", snap.prefix_forks);
        head(
            &mut out,
            "strata_speculative_draft_tokens_total",
            "counter",
            "Draft tokens proposed by speculative decoding (--speculative) and verified by the last stage.",
        );
        let _ = writeln!(out, "strata_speculative_draft_tokens_total {}", snap.draft_tokens);
        head(
            &mut out,
            "strata_speculative_accepted_tokens_total",
            "counter",
            "Of those, the draft tokens accepted (each one the model's own next token).",
        );
        let _ = writeln!(out, "strata_speculative_accepted_tokens_total {}", snap.accepted_draft_tokens);
        head(
            &mut out,
            "strata_decode_trips_total",
            "counter",
            "Decode trips through the pipeline: one sequence's decode part of a step.",
        );
        let _ = writeln!(out, "strata_decode_trips_total {}", snap.decode_trips);
        head(
            &mut out,
            "strata_decode_trip_tokens_total",
            "counter",
            "Tokens those trips yielded: over strata_decode_trips_total, the tokens per trip.",
        );
        let _ = writeln!(out, "strata_decode_trip_tokens_total {}", snap.decode_tokens);
        head(
            &mut out,
            "strata_prefix_cache_tokens_total",
            "counter",
            "Prompt tokens taken from the prefix cache instead of being computed.",
        );
        let _ = writeln!(out, "strata_prefix_cache_tokens_total {}", snap.prefix_cached_tokens);
        head(&mut out, "strata_prefix_cache_sequences", "gauge", "Finished sequences kept for reuse.");
        let _ = writeln!(out, "strata_prefix_cache_sequences {}", snap.retained);
        head(
            &mut out,
            "strata_prefix_cache_blocks",
            "gauge",
            "KV pool blocks the finished sequences kept for reuse hold (each stage's pool; given up first when room is needed).",
        );
        let _ = writeln!(out, "strata_prefix_cache_blocks {}", snap.retained_blocks);
        head(
            &mut out,
            "strata_prefix_cache_bytes",
            "gauge",
            "Cache bytes the finished sequences kept for reuse hold (KV blocks and recurrent states), all stages together.",
        );
        let block = snap.kv.map_or(0, |(kv, _)| u64::from(kv.block_size));
        let (per_position, per_sequence) = self.cache_cost;
        let bytes = u64::from(snap.retained_blocks) * block * per_position + snap.retained as u64 * per_sequence;
        let _ = writeln!(out, "strata_prefix_cache_bytes {bytes}");
        head(
            &mut out,
            "strata_grammar_masks_total",
            "counter",
            "Grammar masks computed (one per token of a request under response_format or a forced tool call).",
        );
        let _ = writeln!(out, "strata_grammar_masks_total {}", snap.grammar_masks);
        head(
            &mut out,
            "strata_grammar_mask_seconds_total",
            "counter",
            "Seconds the scheduler spent computing grammar masks (between steps, on its own thread).",
        );
        let _ = writeln!(out, "strata_grammar_mask_seconds_total {:.6}", snap.grammar_seconds);
        head(
            &mut out,
            "strata_recoveries_total",
            "counter",
            "Re-plans after a node was lost or left (live sequences recomputed on the nodes left).",
        );
        let _ = writeln!(out, "strata_recoveries_total {}", snap.recoveries);
        if let Some(r) = &snap.last_recovery {
            head(
                &mut out,
                "strata_last_recovery_seconds",
                "gauge",
                "How long the last re-plan took (probing the nodes, planning, loading the shards).",
            );
            let _ = writeln!(out, "strata_last_recovery_seconds {}", r.replan_seconds);
        }
        head(&mut out, "strata_recovering", "gauge", "1 while the pipeline is being re-planned.");
        let _ = writeln!(out, "strata_recovering {}", u8::from(snap.recovering.is_some()));
        head(
            &mut out,
            "strata_steps_total",
            "counter",
            "Steps submitted, each carrying the rows of several sequences.",
        );
        let _ = writeln!(out, "strata_steps_total {}", snap.steps_total);
        head(&mut out, "strata_step_rows_total", "counter", "Rows (tokens) of all steps submitted.");
        let _ = writeln!(out, "strata_step_rows_total {}", snap.rows_total);
        head(&mut out, "strata_tokens_per_second", "gauge", "Generated tokens per second over the last 5 s.");
        let _ = writeln!(out, "strata_tokens_per_second {:.3}", scheduler.tokens_per_second());
        head(&mut out, "strata_stage_sequences", "gauge", "Sequences holding caches on a stage.");
        for (i, s) in snap.engine.stages.iter().enumerate() {
            let _ = writeln!(out, "strata_stage_sequences{{stage=\"{i}\",node=\"{}\"}} {}", s.node, s.sequences);
        }
        head(
            &mut out,
            "strata_stage_cache_bytes",
            "gauge",
            "KV blocks and recurrent state bytes held for sequences on a stage.",
        );
        for (i, s) in snap.engine.stages.iter().enumerate() {
            let _ = writeln!(out, "strata_stage_cache_bytes{{stage=\"{i}\",node=\"{}\"}} {}", s.node, s.cache_bytes);
        }
        head(
            &mut out,
            "strata_stage_steps_total",
            "counter",
            "Steps a stage has run (each the rows of several sequences).",
        );
        for (i, s) in snap.engine.stages.iter().enumerate() {
            let _ = writeln!(out, "strata_stage_steps_total{{stage=\"{i}\",node=\"{}\"}} {}", s.node, s.steps);
        }
        head(
            &mut out,
            "strata_stage_busy_fraction",
            "gauge",
            "Time computing over wall time, last 5 s: the bottleneck is near 1.",
        );
        for (i, s) in snap.engine.stages.iter().enumerate() {
            let b = snap.busy.get(i).copied().unwrap_or(0.0);
            let _ = writeln!(out, "strata_stage_busy_fraction{{stage=\"{i}\",node=\"{}\"}} {b:.4}", s.node);
        }
        head(&mut out, "strata_stage_kv_blocks", "gauge", "A stage's KV pool blocks, held or free.");
        for (i, s) in snap.engine.stages.iter().enumerate().filter(|(_, s)| s.pool.blocks > 0) {
            let (used, free) = (s.pool.used_blocks, s.pool.blocks.saturating_sub(s.pool.used_blocks));
            let _ = writeln!(out, "strata_stage_kv_blocks{{stage=\"{i}\",node=\"{}\",state=\"used\"}} {used}", s.node);
            let _ = writeln!(out, "strata_stage_kv_blocks{{stage=\"{i}\",node=\"{}\",state=\"free\"}} {free}", s.node);
        }
        head(&mut out, "strata_stage_rows_total", "counter", "Rows (tokens) a stage has run, all steps.");
        for (i, s) in snap.engine.stages.iter().enumerate() {
            let _ = writeln!(out, "strata_stage_rows_total{{stage=\"{i}\",node=\"{}\"}} {}", s.node, s.rows);
        }
        head(&mut out, "strata_stage_busy_seconds_total", "counter", "Time a stage has spent running steps.");
        for (i, s) in snap.engine.stages.iter().enumerate() {
            let _ = writeln!(
                out,
                "strata_stage_busy_seconds_total{{stage=\"{i}\",node=\"{}\"}} {:.6}",
                s.node, s.busy_seconds
            );
        }
        head(&mut out, "strata_step_seconds", "histogram", "From submitting a step to its result coming back.");
        let h = &snap.engine.step_latency;
        let mut cumulative = 0;
        for (b, c) in LATENCY_BOUNDS.iter().zip(&h.counts) {
            cumulative += c;
            let _ = writeln!(out, "strata_step_seconds_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let _ = writeln!(out, "strata_step_seconds_bucket{{le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(out, "strata_step_seconds_sum {:.6}", h.sum_seconds);
        let _ = writeln!(out, "strata_step_seconds_count {}", h.count);
        out
    }
}

/// Middleware: counts every response by its route and status.
pub async fn count_requests(State(metrics): State<std::sync::Arc<Metrics>>, req: Request, next: Next) -> Response {
    let endpoint = req.extensions().get::<MatchedPath>().map_or("other", |p| p.as_str()).to_owned();
    let response = next.run(req).await;
    metrics.count(&endpoint, response.status().as_u16());
    response
}
