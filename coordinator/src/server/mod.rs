//! `strata serve`: the OpenAI-compatible HTTP API, `/metrics`, `/v1/cluster` and the web
//! page, in front of the [`Scheduler`].

mod anthropic;
mod auth;
mod errors;
mod metrics;
mod openai;
pub mod reasoning;
mod structured;
mod tls;
mod tool_calls;
mod web;

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, Uri, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use serde_json::json;
use strata_model::chat::ChatTemplate;
use strata_model::gguf::Gguf;
use strata_model::grammar::GrammarVocab;
use strata_model::tokenizer::Tokenizer;

use crate::cli::ServeArgs;
use crate::scheduler::{PrefixReuse, Scheduler, SchedulerConfig};
use auth::ApiKey;
use errors::ApiError;
use metrics::Metrics;

pub struct AppState {
    pub scheduler: Scheduler,
    pub tokenizer: Arc<Tokenizer>,
    pub template: Option<ChatTemplate>,
    /// The name clients use in `model`: the GGUF's file name without `.gguf`.
    pub model_id: String,
    /// Unix seconds when the model was loaded.
    pub created: u64,
    pub max_seqs: usize,
    pub metrics: Arc<Metrics>,
    /// The largest request body (`--max-body`), for the 413's message.
    pub max_body: usize,
    /// How chat answers return `<think>` reasoning (`--reasoning-format`).
    pub reasoning: reasoning::ReasoningFormat,
    /// The vocabulary as grammars see it (structured output), or why there is none.
    pub grammar: Result<Arc<GrammarVocab>, String>,
}

/// The model id for a GGUF path: its file name without the extension.
pub fn model_id(path: &std::path::Path) -> String {
    path.file_stem().map_or_else(|| path.display().to_string(), |s| s.to_string_lossy().into_owned())
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    // Settings are checked before minutes go into loading the model.
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(tls::acceptor(cert, key)?),
        _ => None,
    };
    let key = args.api_key.as_deref().map(|k| Arc::new(ApiKey::new(k)));
    if key.is_none() && !args.listen.ip().is_loopback() {
        eprintln!("warning: serving on {} without --api-key: anyone who can reach it can use the model", args.listen);
    }
    let path = &args.engine.model;
    let gguf = Gguf::open(path).with_context(|| format!("reading {}", path.display()))?;
    let tokenizer = Arc::new(Tokenizer::from_gguf(&gguf)?);
    let template = match &args.chat_template_file {
        Some(file) => {
            let source = std::fs::read_to_string(file)
                .with_context(|| format!("reading --chat-template-file {}", file.display()))?;
            Some(
                ChatTemplate::for_gguf(&gguf, &source)
                    .with_context(|| format!("--chat-template-file {}", file.display()))?,
            )
        }
        None => ChatTemplate::from_gguf(&gguf)?,
    };
    if template.is_none() {
        eprintln!("note: {} has no chat template: /v1/chat/completions will refuse requests", path.display());
    }
    eprintln!("loading {} ...", path.display());
    let t0 = Instant::now();
    let engine = crate::engine::load(
        &gguf,
        &args.engine,
        crate::engine::EngineUse { max_seqs: args.max_seqs, serving: true, checkpoints: !args.no_prefix_cache },
    )?;
    let stats = engine.stats();
    let where_ = stats
        .stages
        .iter()
        .map(|s| format!("{} ({}: layers {}..{})", s.node, s.device, s.layers.start, s.layers.end))
        .collect::<Vec<_>>()
        .join(", ");
    eprintln!(
        "loaded {} layers on {where_} in {:.1} s (context {}, up to {} sequences at once)",
        stats.n_layer,
        t0.elapsed().as_secs_f64(),
        engine.ctx(),
        args.max_seqs
    );
    let config = strata_model::config::ModelConfig::from_gguf(&gguf)?;
    let prefix_reuse = PrefixReuse::for_model(&config);
    drop(gguf);
    let grammar = GrammarVocab::new(tokenizer.clone()).map(Arc::new).map_err(|e| {
        eprintln!("note: structured output is not available: {e}");
        format!("structured output is not available for this model: {e}")
    });
    let scheduler = Scheduler::spawn(
        engine,
        tokenizer.clone(),
        SchedulerConfig {
            max_seqs: args.max_seqs as usize,
            max_waiting: Some(args.max_queue as usize),
            prefix_reuse: if args.no_prefix_cache { PrefixReuse::Off } else { prefix_reuse },
            speculation: crate::speculative::Speculation::new(&args.engine, &config),
        },
    )?;
    let state = Arc::new(AppState {
        scheduler,
        tokenizer,
        template,
        model_id: model_id(path),
        created: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        max_seqs: args.max_seqs as usize,
        metrics: Arc::new(Metrics::for_model(&config, !args.no_prefix_cache)),
        max_body: args.max_body,
        reasoning: args.reasoning_format,
        grammar,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let addr = listener.local_addr()?;
        // Tests and scripts read this line to learn the port (`--listen 127.0.0.1:0`).
        println!("listening on {}://{addr}", if tls.is_some() { "https" } else { "http" });
        use std::io::Write;
        std::io::stdout().flush()?;
        let app = router(state, key);
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        match tls {
            Some(acceptor) => tls::serve(listener, acceptor, app, shutdown).await?,
            None => axum::serve(listener, app).with_graceful_shutdown(shutdown).await?,
        }
        anyhow::Ok(())
    })
}

/// The routes. With a key, everything but `/health` and the web page's own files needs
/// it (the page must load to ask for the key).
pub fn router(state: Arc<AppState>, key: Option<Arc<ApiKey>>) -> Router {
    let metrics = state.metrics.clone();
    let max_body = state.max_body;
    let mut protected = Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .route("/v1/models", get(openai::models))
        .route("/v1/cluster", get(cluster))
        .route("/metrics", get(render_metrics));
    if let Some(key) = key {
        protected = protected.route_layer(axum::middleware::from_fn_with_state(key, auth::require_key));
    }
    Router::new()
        .merge(protected)
        .route("/health", get(health))
        .route("/", get(web::index))
        .route("/app.js", get(web::app))
        .route("/style.css", get(web::style))
        .route_layer(axum::middleware::from_fn_with_state(metrics, metrics::count_requests))
        .layer(DefaultBodyLimit::max(max_body))
        .fallback(not_found)
        .with_state(state)
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(uri.path())
}

/// `ok`; `recovering` (still 200: requests are taken and wait) while a lost or leaving
/// node's layers move to the others; 503 `degraded` with the reason once the engine can
/// run no more steps (the nodes left cannot hold the model): the server keeps
/// answering, requests fail at once.
async fn health(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let snap = state.scheduler.snapshot();
    match (snap.broken, snap.recovering) {
        (Some(error), _) => {
            (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({ "status": "degraded", "error": error })))
        }
        (None, Some(cause)) => (StatusCode::OK, axum::Json(json!({ "status": "recovering", "cause": cause }))),
        (None, None) => (StatusCode::OK, axum::Json(json!({ "status": "ok" }))),
    }
}

async fn render_metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render(&state.scheduler))
}

/// `/v1/cluster`: the nodes, their layer ranges and memory, their KV pools and how busy
/// each is; sequences held and queued, tokens/s.
async fn cluster(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let snap = state.scheduler.snapshot();
    let nodes: Vec<_> = snap
        .engine
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let p = &s.pool;
            json!({
                "stage": i,
                "name": s.node,
                "device": s.device,
                "layers": [s.layers.start, s.layers.end],
                "weight_bytes": s.weight_bytes,
                "cache_bytes": s.cache_bytes,
                "memory_bytes": s.memory_bytes,
                "sequences": s.sequences,
                "steps": s.steps,
                "rows": s.rows,
                "busy_seconds": s.busy_seconds,
                "busy_fraction": snap.busy.get(i).copied().unwrap_or(0.0),
                "mean_step_ms": s.mean_step_seconds() * 1e3,
                "kv_pool": (p.blocks > 0).then(|| json!({
                    "block_size": p.block_size,
                    "blocks": p.blocks,
                    "used_blocks": p.used_blocks,
                    "free_blocks": p.blocks.saturating_sub(p.used_blocks),
                })),
                "slots": { "total": p.slots, "used": p.used_slots },
            })
        })
        .collect();
    let kv = snap.kv.map(|(kv, used)| {
        json!({
            "block_size": kv.block_size,
            "blocks": kv.blocks,
            "used_blocks": used,
            "free_blocks": kv.blocks.saturating_sub(used),
            "positions": kv.positions(),
        })
    });
    axum::Json(json!({
        "model": state.model_id,
        "prefix_cache": {
            "sequences": snap.retained,
            "blocks": snap.retained_blocks,
            "hits": snap.prefix_hits,
            "forks": snap.prefix_forks,
            "cached_tokens": snap.prefix_cached_tokens,
        },
        "speculation": {
            "drafter": snap.drafter,
            "draft_tokens": snap.draft_tokens,
            "accepted_draft_tokens": snap.accepted_draft_tokens,
            "decode_trips": snap.decode_trips,
            "decode_tokens": snap.decode_tokens,
        },
        "state": match (&snap.broken, &snap.recovering) {
            (Some(_), _) => "degraded",
            (None, Some(_)) => "recovering",
            (None, None) => "ok",
        },
        "error": snap.broken,
        "recovering": snap.recovering,
        "recoveries": snap.recoveries,
        "last_recovery": snap.last_recovery.as_ref().map(|r| json!({
            "cause": r.cause,
            "left_out": r.left_out,
            "nodes": r.nodes,
            "replan_seconds": r.replan_seconds,
            "sequences": r.sequences,
            "at_unix": r.at_unix,
        })),
        "n_layer": snap.engine.n_layer,
        "ctx": state.scheduler.ctx(),
        "max_seqs": state.max_seqs,
        "nodes": nodes,
        "kv_pool": kv,
        "active_sequences": snap.active,
        "queued": snap.queued,
        "preemptions": snap.preemptions,
        "kv_pool_waits": snap.pool_waits,
        "steps_total": snap.steps_total,
        "micro_batches": snap.micro_batches,
        "rows_per_step": if snap.steps_total > 0 { snap.rows_total as f64 / snap.steps_total as f64 } else { 0.0 },
        "tokens_per_s": state.scheduler.tokens_per_second(),
        "prompt_tokens_total": snap.prompt_tokens_total,
        "generated_tokens_total": snap.generated_tokens_total,
    }))
}
