//! `/metrics`: Prometheus text exposition of the server's counters and the scheduler's gauges.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;

use crate::engine::LATENCY_BOUNDS;
use crate::scheduler::Scheduler;

/// HTTP requests answered, by endpoint and status.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
}

impl Metrics {
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
        head(&mut out, "strata_queue_depth", "gauge", "Requests waiting for a free sequence slot.");
        let _ = writeln!(out, "strata_queue_depth {}", snap.queued);
        head(&mut out, "strata_tokens_per_second", "gauge", "Generated tokens per second over the last 5 s.");
        let _ = writeln!(out, "strata_tokens_per_second {:.3}", scheduler.tokens_per_second());
        head(&mut out, "strata_stage_sequences", "gauge", "Sequences holding caches on a stage.");
        for (i, s) in snap.engine.stages.iter().enumerate() {
            let _ = writeln!(out, "strata_stage_sequences{{stage=\"{i}\",node=\"{}\"}} {}", s.node, s.sequences);
        }
        head(&mut out, "strata_stage_cache_bytes", "gauge", "KV cache and recurrent state bytes held on a stage.");
        for (i, s) in snap.engine.stages.iter().enumerate() {
            let _ = writeln!(out, "strata_stage_cache_bytes{{stage=\"{i}\",node=\"{}\"}} {}", s.node, s.cache_bytes);
        }
        head(
            &mut out,
            "strata_stage_steps_total",
            "counter",
            "Steps (prefill chunks and decode tokens) a stage has run.",
        );
        for (i, s) in snap.engine.stages.iter().enumerate() {
            let _ = writeln!(out, "strata_stage_steps_total{{stage=\"{i}\",node=\"{}\"}} {}", s.node, s.steps);
        }
        head(&mut out, "strata_stage_busy_seconds_total", "counter", "Time a stage has spent running steps.");
        for (i, s) in snap.engine.stages.iter().enumerate() {
            let _ = writeln!(
                out,
                "strata_stage_busy_seconds_total{{stage=\"{i}\",node=\"{}\"}} {:.6}",
                s.node, s.busy_seconds
            );
        }
        head(
            &mut out,
            "strata_step_seconds",
            "histogram",
            "From submitting a step that wants a token to the token coming back.",
        );
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
