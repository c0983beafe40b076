//! The pipeline engine: plans a model over nodes, loads a shard on each, and drives
//! steps through them.
//!
//! Every stage is reached the same way, over the transport: this machine's own share
//! (unless `--no-local`) runs as an in-process stage service on an ephemeral loopback
//! port. Activations go to stage 0 on one long-lived `Forward` stream; each stage hands
//! its hidden state straight to the next; the last stage's token comes back up the
//! chain. A step carries the rows of several sequences; steps go out without waiting for
//! the ones before, so consecutive stages work on consecutive steps at once.
//!
//! With `shipping`, this is the coordinator's boundary with the wire: the proto
//! messages of steps, node info, counters and shard loading are built and read here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use strata_model::config::ModelConfig;
use strata_model::gguf::Gguf;
use strata_model::plan::{ModelCost, NodeBudget, Plan, PlanConfig, parse_split};
use strata_node::gpu::GpuConfig;
use strata_node::memory::MemoryLimit;
use strata_node::service::{self, NodeOptions, StageService};
use strata_node::stage::{Logprobs, SeqId};
use strata_proto::tokio_stream::wrappers::ReceiverStream;
use strata_proto::tonic::Streaming;
use strata_proto::tonic::transport::Channel;
use strata_proto::transport::Security;
use strata_proto::v1::{self as pb, stage_client::StageClient};
use tokio::sync::{mpsc, oneshot, watch};

use super::{
    Engine, EngineStats, EngineUse, ErrorCode, KvCapacity, LatencyHistogram, NodeCounters, Placement, PoolCounters,
    Recovered, Replan, Sampled, SeqStep, StageStats, StepDone, StepError, StepOutcome, context_length, plan_config,
};
use crate::cli::{EngineArgs, Wire};

/// One stage as the coordinator sees it.
#[derive(Clone)]
struct StageHandle {
    name: String,
    addr: String,
    adapter: String,
    backend: String,
    /// The node's usable memory, as it reported it.
    memory: u64,
    /// Its adapter's largest storage buffer.
    max_binding: u64,
    /// Its Q8_0 products go through integer dot products (`--int8-dot`).
    int8_dot: bool,
    /// Which physical device computes; stages with equal keys share it.
    device_key: String,
    layers: std::ops::Range<usize>,
    /// Whether the plan gave it a KV pool (it holds attention layers).
    pool: bool,
    client: StageClient<Channel>,
}

/// This machine's in-process stage service; stops when dropped.
struct LocalNode {
    _shutdown: oneshot::Sender<()>,
}

/// A step sent down the pipeline, until its result comes back.
struct InFlight {
    /// Its sequences in order, and whether each asked for logprobs.
    seqs: Vec<(SeqId, bool)>,
    sent: Instant,
}

pub struct Pipeline {
    rt: tokio::runtime::Runtime,
    stages: Vec<StageHandle>,
    /// What a re-plan needs: the command's settings, the model's identity, the key, and
    /// every node address this pipeline was built from (tried again at each re-plan).
    args: EngineArgs,
    usage: EngineUse,
    model_id: Vec<u8>,
    security: Security,
    candidates: Vec<String>,
    /// The plan's KV pool, in positions: kept across a re-plan where the survivors hold it.
    kv_positions: u64,
    heartbeat: Option<Heartbeat>,
    /// With `--discover` in a server: the nodes of the cluster mDNS knows now.
    watch: Option<crate::discovery::NodeWatch>,
    /// Nodes that answered but could not join a plan (too small, or failing to load): not
    /// asked again until a node is lost.
    refused: Vec<String>,
    ctx: u32,
    batch: u32,
    max_seqs: u32,
    /// The last stage drafts with the model's MTP head: every step part sends its token ids on
    /// to it.
    mtp: bool,
    kv: Option<KvCapacity>,
    micro_batches: usize,
    /// Weight bytes one step reads over all stages (from the model's tensor index).
    weight_bytes_per_token: u64,
    wire: pb::HiddenFormat,
    tx: mpsc::Sender<pb::Activation>,
    results: Streaming<pb::StepResult>,
    next_step: u64,
    in_flight: HashMap<u64, InFlight>,
    latency: LatencyHistogram,
    /// The nodes' counters, refreshed at most every [`STATS_EVERY`].
    node_stats: Mutex<(Option<Instant>, Vec<StageStats>)>,
    _local: Option<LocalNode>,
}

/// How often `stats` asks the nodes for their counters (the scheduler asks every step).
const STATS_EVERY: Duration = Duration::from_millis(250);

/// How often every node is asked `Info` (answered without touching the stage, so a long
/// step does not delay it), and how long an answer may take: a node that is killed, hangs
/// or is cut off is noticed within the sum, 3 s.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(1500);

/// How long a node may take to answer when a re-plan asks who is still there.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a node's `Health` may take for statistics (it waits for the step running).
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// What the heartbeat saw.
#[derive(Debug, Clone)]
enum Alarm {
    /// A node (at `addr`) did not answer: the pipeline is broken until a re-plan, which
    /// does not wait for it again.
    Lost { addr: String, why: String },
    /// A node asked to leave: re-plan once the steps in flight are back.
    Leaving(String),
    /// A node of the cluster that the plan lacks answers (one lost earlier, back): worth
    /// a re-plan when nothing runs.
    Rejoin(String),
}

/// Every how many heartbeats the nodes a plan lacks are asked whether they are back.
const REJOIN_EVERY: u32 = 5;

/// The nodes outside a plan that the heartbeat asks, now and then, whether they can join.
struct Outside {
    /// Addresses of the pipeline's own nodes that did not answer.
    absent: Vec<String>,
    /// What an mDNS watch finds (a server with `--discover`).
    discovered: Option<Arc<Mutex<Vec<String>>>>,
    /// Addresses not to ask (nodes that could not join).
    skip: Vec<String>,
}

/// The task that asks every stage `Info` each [`HEARTBEAT_EVERY`]; stops when dropped.
struct Heartbeat {
    task: tokio::task::JoinHandle<()>,
    alarm: watch::Receiver<Option<Alarm>>,
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Heartbeat {
    /// Watches `stages` (a silent one is lost) and, now and then, the nodes `outside`
    /// the plan (one that answers may join).
    fn start(rt: &tokio::runtime::Runtime, stages: &[StageHandle], outside: Outside, security: &Security) -> Heartbeat {
        let targets: Vec<(String, String, StageClient<Channel>)> =
            stages.iter().map(|s| (s.name.clone(), s.addr.clone(), s.client.clone())).collect();
        let (tx, alarm) = watch::channel(None);
        let security = security.clone();
        let task = rt.spawn(async move {
            let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for beat in 1u32.. {
                tick.tick().await;
                if beat % REJOIN_EVERY == 0 && tx.borrow().is_none() {
                    let mut ask = outside.absent.clone();
                    if let Some(d) = &outside.discovered {
                        let found = d.lock().unwrap_or_else(|e| e.into_inner()).clone();
                        let known = |a: &String| ask.contains(a) || targets.iter().any(|t| &t.1 == a);
                        let new: Vec<String> = found.into_iter().filter(|a| !known(a)).collect();
                        ask.extend(new);
                    }
                    ask.retain(|a| !outside.skip.contains(a));
                    for addr in &ask {
                        let probe = tokio::time::timeout(PROBE_TIMEOUT, probe_node(addr, &security)).await;
                        if let Ok(Ok((h, false))) = probe {
                            tracing::info!(node = %h.name, %addr, "a node the plan lacks answers");
                            tx.send_replace(Some(Alarm::Rejoin(format!("node {} ({addr}) can join", h.name))));
                            break;
                        }
                    }
                }
                let mut checks = tokio::task::JoinSet::new();
                for (name, addr, client) in &targets {
                    let (name, addr, mut client) = (name.clone(), addr.clone(), client.clone());
                    checks.spawn(async move {
                        let answer = tokio::time::timeout(HEARTBEAT_TIMEOUT, client.info(pb::InfoRequest {})).await;
                        (name, addr, answer)
                    });
                }
                while let Some(Ok((name, addr, answer))) = checks.join_next().await {
                    let lost = match answer {
                        Ok(Ok(info)) if info.get_ref().leaving => {
                            if tx.borrow().is_none() {
                                tracing::warn!(node = %name, %addr, "the node is leaving: re-planning without it");
                                tx.send_replace(Some(Alarm::Leaving(format!("node {name} ({addr}) is leaving"))));
                            }
                            continue;
                        }
                        Ok(Ok(_)) => continue,
                        Ok(Err(status)) => format!("node {name} ({addr}) failed its heartbeat: {}", status.message()),
                        Err(_) => format!(
                            "node {name} ({addr}) missed its heartbeat: no answer within {:.1} s",
                            HEARTBEAT_TIMEOUT.as_secs_f64()
                        ),
                    };
                    tracing::error!("{lost}");
                    tx.send_replace(Some(Alarm::Lost { addr, why: lost }));
                    return;
                }
            }
        });
        Heartbeat { task, alarm }
    }

    /// Resolves with the cause once a node is lost.
    async fn lost(mut alarm: watch::Receiver<Option<Alarm>>) -> String {
        loop {
            if let Some(Alarm::Lost { why, .. }) = alarm.borrow_and_update().clone() {
                return why;
            }
            if alarm.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Runs `work` on `rt` for the scheduler thread, unless `heartbeat` finds a node lost
/// first (then an error saying which and why). Everything the scheduler waits for on the nodes goes through
/// here: a frozen node answers nothing, and the thread must stay free to notice the loss
/// and re-plan.
fn unless_lost<T>(
    rt: &tokio::runtime::Runtime,
    heartbeat: Option<&Heartbeat>,
    work: impl std::future::Future<Output = T>,
) -> anyhow::Result<T> {
    let alarm = heartbeat.map(|h| h.alarm.clone());
    rt.block_on(async move {
        let lost = async {
            match alarm {
                Some(a) => Heartbeat::lost(a).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            out = work => Ok(out),
            why = lost => Err(anyhow::anyhow!("{why}")),
        }
    })
}

fn wire_format(w: Wire) -> pb::HiddenFormat {
    match w {
        Wire::F32 => pb::HiddenFormat::F32,
        Wire::F16 => pb::HiddenFormat::F16,
    }
}

/// Why `r` says the pipeline is broken, if it does: a stage that could not hand a step on
/// (its next stage went away) fails the step as a whole with `Unavailable`, the only
/// use nodes make of that code. A lost node, as a broken result stream is, so that the
/// scheduler re-plans rather than failing requests a re-plan can finish.
fn lost_next_stage(r: &pb::StepResult) -> Option<&str> {
    (!r.error.is_empty() && error_code(r.error_code) == ErrorCode::Unavailable).then_some(r.error.as_str())
}

/// A step error's code as the node sent it.
fn error_code(code: i32) -> ErrorCode {
    use pb::StepErrorCode as C;
    match C::try_from(code) {
        Ok(C::InvalidArgument) => ErrorCode::InvalidArgument,
        Ok(C::OutOfOrder) => ErrorCode::OutOfOrder,
        Ok(C::NotOnStage) => ErrorCode::NotOnStage,
        Ok(C::DataLoss) => ErrorCode::DataLoss,
        Ok(C::Unavailable) => ErrorCode::Unavailable,
        Ok(C::ResourceExhausted) => ErrorCode::Exhausted,
        Ok(C::Internal | C::Unspecified) | Err(_) => ErrorCode::Internal,
    }
}

fn counters(h: pb::HealthResponse) -> NodeCounters {
    NodeCounters {
        steps: h.steps,
        rows: h.rows,
        compute_seconds: h.compute_seconds,
        waited_steps: h.waited_steps,
        downstream_wait_seconds: h.downstream_wait_seconds,
        weight_bytes: h.weight_bytes,
        cache_bytes: h.cache_bytes,
        sequences: h.sequences as usize,
        pool: PoolCounters {
            block_size: h.kv_block_size,
            blocks: h.kv_blocks,
            used_blocks: h.kv_blocks_used,
            slots: h.slots,
            used_slots: h.slots_used,
        },
    }
}

/// Steps worth keeping in flight by default: one per physical device. Stages that share a
/// device (several nodes on one machine's CPU or GPU) cannot compute at the same time, so
/// overlapping their steps only splits a batch into smaller ones that read every weight
/// more often; measured on three local nodes on one 2-core CPU, 8 streams ran at 2.1x one
/// stream's rate with three micro-batches and 3.8x with one.
fn distinct_devices(stages: &[StageHandle]) -> usize {
    let mut keys: Vec<&str> = stages.iter().map(|s| s.device_key.as_str()).collect();
    keys.sort_unstable();
    keys.dedup();
    keys.len().max(1)
}

/// Starts this machine's stage service on a free loopback port; returns its address.
async fn start_local(
    gguf_path: &std::path::Path,
    gpu: GpuConfig,
    security: &Security,
) -> anyhow::Result<(String, LocalNode)> {
    // The coordinator's own node has the file: it never needs a shard cache.
    let svc = StageService::open(NodeOptions {
        node_id: format!("local-{}", std::process::id()),
        name: "local".into(),
        gpu,
        memory: MemoryLimit::Auto,
        model_dir: None,
        model_files: vec![gguf_path.to_owned()],
        cache_dir: None,
        idle_timeout: Duration::from_secs(600),
        // Its own connection to the next stage (a node of the cluster) needs the key.
        security: security.clone(),
    })?;
    let listener =
        strata_proto::transport::bind(([127, 0, 0, 1], 0).into()).await.context("binding the local stage's port")?;
    let addr = listener.local_addr()?.to_string();
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let stop = async move {
            let _ = rx.await;
        };
        if let Err(e) = service::serve(listener, svc, stop).await {
            tracing::error!(error = %e, "local stage service failed");
        }
    });
    Ok((addr, LocalNode { _shutdown: tx }))
}

/// The stage addresses in pipeline order: this machine's own (started here, unless
/// `--no-local`), then `--peer`s, then those `--discover` found.
async fn stage_addresses(
    args: &EngineArgs,
    discovered: &[String],
    security: &Security,
) -> anyhow::Result<(Vec<String>, Option<LocalNode>)> {
    let mut addrs = Vec::new();
    let local = if args.no_local {
        None
    } else {
        let (addr, node) = start_local(&args.model, args.device.gpu_config(), security).await?;
        addrs.push(addr);
        Some(node)
    };
    addrs.extend(args.peers.iter().cloned());
    addrs.extend(discovered.iter().cloned());
    if addrs.is_empty() {
        bail!("no node to run the model on: --no-local without any --peer, and --discover found none");
    }
    Ok((addrs, local))
}

/// Connects to the node at `addr` and asks who it is (and whether it is leaving);
/// refuses one of another protocol version.
async fn probe_node(addr: &str, security: &Security) -> anyhow::Result<(StageHandle, bool)> {
    let mut client = strata_proto::transport::connect(addr, security).await?;
    let info = client.info(pb::InfoRequest {}).await.map_err(|status| refused(addr, security, &status))?.into_inner();
    if info.protocol_version != strata_proto::PROTOCOL_VERSION {
        let ours = strata_proto::PROTOCOL_VERSION;
        bail!("node {addr} speaks protocol {}, this coordinator {ours}", info.protocol_version);
    }
    let handle = StageHandle {
        name: info.name,
        addr: addr.to_owned(),
        adapter: info.adapter,
        backend: info.backend,
        memory: info.usable_memory,
        max_binding: info.max_binding,
        int8_dot: info.int8_dot,
        device_key: info.device_key,
        layers: 0..0,
        pool: false,
        client,
    };
    Ok((handle, info.leaving))
}

/// Appends `h` to `stages`; two nodes of one name (two ports of one host) are told apart
/// by address.
fn push_named(stages: &mut Vec<StageHandle>, mut h: StageHandle) {
    if stages.iter().any(|s| s.name == h.name) {
        h.name = format!("{}@{}", h.name, h.addr);
    }
    stages.push(h);
}

/// Connects to every node and asks who it is; a node that is leaving is passed over.
async fn connect(addrs: &[String], security: &Security) -> anyhow::Result<Vec<StageHandle>> {
    let mut stages: Vec<StageHandle> = Vec::new();
    for addr in addrs {
        let (handle, leaving) = probe_node(addr, security).await?;
        if leaving {
            eprintln!("passing over node {} at {addr}: it is leaving", handle.name);
            continue;
        }
        push_named(&mut stages, handle);
    }
    if stages.is_empty() {
        bail!("every node given is leaving: there is nothing to run the model on");
    }
    Ok(stages)
}

/// The nodes of `addrs` that answer now (within [`PROBE_TIMEOUT`], all asked at once)
/// and are not leaving, in order; with what happened to each of the others. `lost`: an
/// address the heartbeat already found silent, not waited for again.
async fn survivors(
    addrs: &[String],
    security: &Security,
    lost: Option<&str>,
) -> (Vec<StageHandle>, Vec<(String, String)>) {
    let probes = addrs.iter().map(|addr| {
        let (addr, security) = (addr.clone(), security.clone());
        let skip = lost == Some(addr.as_str());
        tokio::spawn(async move {
            if skip {
                return (addr, None);
            }
            let answer = tokio::time::timeout(PROBE_TIMEOUT, probe_node(&addr, &security)).await;
            (addr, Some(answer))
        })
    });
    let probes: Vec<_> = probes.collect();
    let (mut alive, mut gone): (Vec<StageHandle>, Vec<(String, String)>) = (Vec::new(), Vec::new());
    for p in probes {
        let Ok((addr, answer)) = p.await else { continue };
        match answer {
            None => gone.push((addr.clone(), format!("{addr}: missed its heartbeat"))),
            Some(Ok(Ok((h, false)))) => push_named(&mut alive, h),
            Some(Ok(Ok((h, true)))) => gone.push((addr.clone(), format!("{} ({addr}) is leaving", h.name))),
            Some(Ok(Err(e))) => gone.push((addr.clone(), format!("{addr}: {e:#}"))),
            Some(Err(_)) => {
                gone.push((addr.clone(), format!("{addr}: no answer within {} s", PROBE_TIMEOUT.as_secs())))
            }
        }
    }
    (alive, gone)
}

/// Why a node did not answer `Info`, with what to do about it: with TLS 1.3 a node that
/// refuses this coordinator's certificate says so only after the handshake, on the first
/// call.
fn refused(addr: &str, security: &Security, status: &strata_proto::tonic::Status) -> anyhow::Error {
    let cause = match std::error::Error::source(status) {
        Some(source) => strata_proto::transport::error_chain(source),
        None => status.message().to_owned(),
    };
    let hint = match security {
        Security::Cluster(key) => format!(
            "the node refused this coordinator's cluster certificate (fingerprint {}): it has another cluster key",
            key.fingerprint()
        ),
        Security::Plain => {
            "this coordinator has no cluster key: if the node runs with one, pass the same key (--cluster-key, \
             STRATA_CLUSTER_KEY or `strata init --key`)"
                .to_owned()
        }
    };
    anyhow::anyhow!("node {addr} did not answer ({cause}); {hint}")
}

/// What one node was asked to load.
struct ShardLoad {
    node: String,
    what: String,
    shipped: super::shipping::Shipped,
}

/// Loads every stage's shard of `plan` at once (each told its successor's address),
/// streaming the bytes a node lacks from the model file at `path`. `spec`: what every
/// stage is asked to hold besides its layers.
async fn load_shards(
    gguf: &Gguf,
    path: &std::path::Path,
    plan: &Plan,
    stages: &mut [StageHandle],
    spec: &strata_node::stage::StageSpec,
) -> anyhow::Result<()> {
    // The bytes nodes without the file are streamed: the same file, mapped again so
    // that each node's load task can own a handle.
    let source = Arc::new(Gguf::open(path).with_context(|| format!("opening {}", path.display()))?);
    if source.identity() != gguf.identity() {
        bail!("{} changed while loading", path.display());
    }
    let addrs: Vec<String> = plan.stages.iter().map(|sp| stages[sp.node].addr.clone()).collect();
    let mut loads = Vec::new();
    for (k, sp) in plan.stages.iter().enumerate() {
        let stage = &mut stages[sp.node];
        stage.layers = sp.layers.clone();
        stage.pool = sp.has_pool();
        let req = pb::LoadShardRequest {
            model_id: gguf.identity().to_vec(),
            layer_start: sp.layers.start as u32,
            layer_end: sp.layers.end as u32,
            ctx: spec.ctx,
            max_batch: spec.max_batch,
            next_stage: addrs.get(k + 1).cloned().unwrap_or_default(),
            max_seqs: spec.max_seqs,
            kv_blocks: spec.kv_blocks,
            kv_block_size: spec.kv_block_size,
            checkpoints: spec.checkpoints,
            draft_max: spec.draft_max,
            mtp: spec.mtp,
        };
        let mut client = stage.client.clone();
        let (l, name) = (&sp.layers, &stage.name);
        let what = format!("loading layers {}..{} on {name} ({})", l.start, l.end, stage.addr);
        let (node, source) = (stage.name.clone(), source.clone());
        loads.push(tokio::spawn(async move {
            let shipped =
                super::shipping::load_shard(&mut client, req, source, &node).await.with_context(|| what.clone())?;
            anyhow::Ok(ShardLoad { node, what, shipped })
        }));
    }
    for l in loads {
        let ShardLoad { node, what, shipped: s } = l.await??;
        tracing::info!(node = %node, weight_bytes = s.weight_bytes, secs = s.total_secs, "{what}: done");
        // A stable line (tests and benchmarks read it): bytes streamed and the load time.
        let rate = if s.stream_secs > 0.0 { s.streamed_bytes as f64 / 1e6 / s.stream_secs } else { 0.0 };
        eprintln!(
            "streamed {} bytes to {node} in {:.2} s ({rate:.1} MB/s); shard loaded in {:.2} s",
            s.streamed_bytes, s.stream_secs, s.total_secs
        );
    }
    Ok(())
}

/// A loaded pipeline's parts, before its engine state is set up.
struct Connected {
    stages: Vec<StageHandle>,
    /// The context planned for: `--ctx`, else the most the nodes hold.
    ctx: u32,
    weight_bytes_per_token: u64,
    spec: strata_node::stage::StageSpec,
    kv_positions: u64,
    tx: mpsc::Sender<pb::Activation>,
    results: Streaming<pb::StepResult>,
}

/// Plans the model over `stages` (every one gets layers, in order), loads each shard
/// and opens the forward stream to the first. `keep_pool`: a pool size (in positions)
/// to keep if the nodes hold it (a re-plan: what the scheduler admitted still fits),
/// else the pool `--kv-pool` or the planner chooses.
async fn plan_and_load(
    gguf: &Gguf,
    args: &EngineArgs,
    usage: EngineUse,
    ctx: u32,
    mut stages: Vec<StageHandle>,
    keep_pool: Option<u64>,
    split: Option<&[usize]>,
) -> anyhow::Result<Connected> {
    let config = ModelConfig::from_gguf(gguf)?;
    let budgets: Vec<NodeBudget> =
        stages.iter().map(|s| NodeBudget::new(s.name.clone(), s.memory).with_int8_dot(s.int8_dot)).collect();
    // The smallest largest-binding of the stages a plan gives part of the pool.
    let binding = |plan: &Plan| plan.stages.iter().filter(|s| s.has_pool()).map(|s| stages[s.node].max_binding).min();
    // No `--ctx`: the first plan finds the largest context the nodes hold; a re-plan keeps it.
    let (ctx, fitted) = if args.ctx.is_none() && keep_pool.is_none() {
        let (ctx, plan) = super::fit_context(gguf, args, usage, ctx, &budgets, split, binding)?;
        (ctx, Some(plan))
    } else {
        (ctx, None)
    };
    let spec = super::stage_spec(args, &config, usage, ctx, 0..0, None)?;
    let kept = match keep_pool {
        Some(positions) => {
            let pc = plan_config(&spec, args, Some(positions));
            let cost = ModelCost::new(gguf, &config, &pc)?;
            match Plan::fitted(&cost, &budgets, split) {
                Ok(plan) => Some((pc, cost, plan)),
                Err(e) => {
                    tracing::warn!(positions, "the nodes cannot keep the KV pool's size ({e}): planning a smaller one");
                    None
                }
            }
        }
        None => None,
    };
    let (pc, cost, mut plan) = match (kept, fitted) {
        (Some(kept), _) => kept,
        (None, Some(plan)) => {
            let pc = plan_config(&spec, args, Some(plan.kv_positions));
            (pc.clone(), ModelCost::new(gguf, &config, &pc)?, plan)
        }
        (None, None) => {
            let pc = plan_config(&spec, args, None);
            let cost = ModelCost::new(gguf, &config, &pc)?;
            let plan = Plan::fitted(&cost, &budgets, split)?;
            (pc, cost, plan)
        }
    };
    // Each attention layer keeps its part of the pool in one buffer: no larger than the
    // smallest adapter's largest binding allows.
    if let Some(cap) = binding(&plan).map(|b| super::pool_cap(&config, pc.kv_block_size, b))
        && plan.kv_positions > cap
    {
        tracing::info!(positions = plan.kv_positions, cap, "KV pool capped by the adapters' largest binding");
        let capped = PlanConfig { kv_positions: Some(cap), ..pc.clone() };
        plan = Plan::fitted(&ModelCost::new(gguf, &config, &capped)?, &budgets, split)?;
    }
    eprintln!("plan:\n{}", plan.table());
    let spec = super::stage_spec(args, &config, usage, ctx, 0..0, Some(plan.kv_positions))?;
    load_shards(gguf, &args.model, &plan, &mut stages, &spec).await?;
    let (tx, rx) = mpsc::channel(1024);
    let results = stages[0]
        .client
        .forward(ReceiverStream::new(rx))
        .await
        .context("opening the forward stream to stage 0")?
        .into_inner();
    let weight_bytes_per_token = cost.read_bytes_per_token(config.n_vocab);
    Ok(Connected { stages, ctx, weight_bytes_per_token, spec, kv_positions: plan.kv_positions, tx, results })
}

/// The KV pool sequences share, when a stage of `c` has one.
fn kv_of(c: &Connected) -> anyhow::Result<Option<KvCapacity>> {
    Ok(c.stages
        .iter()
        .any(|s| s.pool)
        .then_some(KvCapacity { block_size: c.spec.kv_block_size, blocks: c.spec.kv_layout()?.blocks }))
}

impl Pipeline {
    pub fn load(gguf: &Gguf, args: &EngineArgs, usage: EngineUse) -> anyhow::Result<Pipeline> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let ctx = context_length(gguf, args)?;
        let security = crate::cluster_key::resolve(&args.cluster)?;
        let discovered = if args.discover {
            let timeout = Duration::from_secs_f64(args.discover_timeout);
            let found = crate::discovery::discover_nodes(
                args.expect_nodes.map(|n| n as usize),
                timeout,
                security.fingerprint(),
            )?;
            eprintln!("discovered {} node(s) over mDNS: {}", found.len(), found.join(", "));
            found
        } else {
            Vec::new()
        };
        let (c, candidates, local) = rt.block_on(async {
            let (addrs, local) = stage_addresses(args, &discovered, &security).await?;
            let stages = connect(&addrs, &security).await?;
            let split = args.split.as_deref().map(parse_split).transpose()?;
            let c = plan_and_load(gguf, args, usage, ctx, stages, None, split.as_deref()).await?;
            anyhow::Ok((c, addrs, local))
        })?;
        let kv = kv_of(&c)?;
        let micro_batches = args.micro_batches.map_or_else(|| distinct_devices(&c.stages), |n| n as usize);
        tracing::info!(micro_batches, stages = c.stages.len(), "steps kept in flight");
        let absent = candidates.iter().filter(|a| !c.stages.iter().any(|s| &s.addr == *a)).cloned().collect();
        let watch = if args.discover && usage.serving {
            Some(crate::discovery::NodeWatch::start(security.fingerprint().map(str::to_owned))?)
        } else {
            None
        };
        let outside = Outside { absent, discovered: watch.as_ref().map(|w| w.shared()), skip: Vec::new() };
        let heartbeat = Heartbeat::start(&rt, &c.stages, outside, &security);
        Ok(Pipeline {
            heartbeat: Some(heartbeat),
            watch,
            refused: Vec::new(),
            rt,
            stages: c.stages,
            args: args.clone(),
            usage,
            model_id: gguf.identity().to_vec(),
            security,
            candidates,
            kv_positions: c.kv_positions,
            ctx: c.ctx,
            batch: c.spec.max_batch,
            max_seqs: c.spec.max_seqs,
            mtp: c.spec.mtp,
            kv,
            micro_batches,
            weight_bytes_per_token: c.weight_bytes_per_token,
            wire: wire_format(args.wire),
            tx: c.tx,
            results: c.results,
            next_step: 0,
            in_flight: HashMap::new(),
            latency: LatencyHistogram::default(),
            node_stats: Mutex::new((None, Vec::new())),
            _local: local,
        })
    }

    /// Plans again over `alive` (the nodes that answered; `gone`: why the others are
    /// left out), keeping the pool's size where they hold it.
    async fn replan(&self, gguf: &Gguf, alive: Vec<StageHandle>, gone: &[String]) -> anyhow::Result<Connected> {
        for g in gone {
            tracing::warn!("re-plan: leaving out {g}");
        }
        if alive.is_empty() {
            bail!("no node is left to run the model on ({})", gone.join("; "));
        }
        let left: Vec<String> =
            alive.iter().map(|s| format!("{} ({})", s.name, indicatif::HumanBytes(s.memory))).collect();
        // A node that answered the probe may still fail to load; the error says which.
        plan_and_load(gguf, &self.args, self.usage, self.ctx, alive, Some(self.kv_positions), None).await.map_err(|e| {
            anyhow::anyhow!("the {} node(s) left, {}, cannot hold the model: {e:#}", left.len(), left.join(", "))
        })
    }

    fn activation(&mut self, seqs: &[SeqStep<'_>]) -> pb::Activation {
        let number = self.next_step;
        self.next_step += 1;
        let rows = seqs
            .iter()
            .map(|s| pb::SeqRows {
                seq_id: s.seq,
                pos: s.pos,
                rows: s.ids.len() as u32,
                token_ids: s.ids.to_vec(),
                sampling: s.want_token.then(|| service::sampling_to_wire(s.sampling)),
                want_token: s.want_token,
                history: s.history.to_vec(),
                allowed: s.allowed.iter().flat_map(|w| w.to_le_bytes()).collect(),
                checkpoint: s.checkpoint,
                fork_from: s.fork_from.unwrap_or(0),
                verify: s.verify,
                keep: s.keep,
                mtp: self.mtp,
                draft: s.draft,
                want_logits: false,
                want_logprobs: s.logprobs.is_some(),
                top_logprobs: s.logprobs.unwrap_or(0),
            })
            .collect();
        pb::Activation { step: number, seqs: rows, hidden: Vec::new(), format: self.wire as i32, failed: Vec::new() }
    }

    /// A step's outcomes from its result: each submitted sequence's answer, in order.
    fn outcomes(flight: &InFlight, r: pb::StepResult) -> Vec<(SeqId, StepOutcome)> {
        if !r.error.is_empty() {
            let e = StepError::new(error_code(r.error_code), r.error);
            return flight.seqs.iter().map(|&(seq, _)| (seq, Err(e.clone()))).collect();
        }
        let mut answers: HashMap<u64, pb::SeqResult> = r.seqs.into_iter().map(|a| (a.seq_id, a)).collect();
        flight
            .seqs
            .iter()
            .map(|&(seq, logprobs)| {
                let outcome = match answers.remove(&seq) {
                    None => Err(StepError::new(
                        ErrorCode::Internal,
                        format!("the pipeline gave no answer for sequence {seq}"),
                    )),
                    Some(a) if !a.error.is_empty() => Err(StepError::new(error_code(a.error_code), a.error)),
                    Some(a) if a.has_token => {
                        let top = a.top_ids.iter().copied().zip(a.top_logprobs.iter().copied()).collect();
                        let logprobs = logprobs.then_some(Logprobs { token: a.logprob, top });
                        Ok(Some(Sampled { token: a.token_id, logprobs, after: Vec::new(), drafts: a.drafts }))
                    }
                    Some(a) if !a.tokens.is_empty() => {
                        Ok(Sampled::verified(a.tokens).map(|s| Sampled { drafts: a.drafts, ..s }))
                    }
                    Some(_) => Ok(None),
                };
                (seq, outcome)
            })
            .collect()
    }

    async fn send(tx: &mpsc::Sender<pb::Activation>, act: pb::Activation) -> anyhow::Result<()> {
        tx.send(act).await.map_err(|_| anyhow::anyhow!("the pipeline's forward stream closed"))
    }

    /// Every node's `Health`, in pipeline order: the one reader of the nodes' counters.
    ///
    /// The nodes are asked at once, and the asks give up as soon as the heartbeat finds a
    /// node lost: the scheduler thread reads these between steps, and a frozen node would
    /// otherwise hold it (and every stream) for [`HEALTH_TIMEOUT`] instead of letting it
    /// notice the loss and re-plan.
    fn read_counters(&self) -> Vec<anyhow::Result<NodeCounters>> {
        let asks: Vec<_> = self.stages.iter().map(|s| (s.addr.clone(), s.client.clone())).collect();
        let n = asks.len();
        let all = async move {
            let mut set = tokio::task::JoinSet::new();
            for (i, (addr, mut client)) in asks.into_iter().enumerate() {
                set.spawn(async move {
                    let h = match tokio::time::timeout(HEALTH_TIMEOUT, client.health(pb::HealthRequest {})).await {
                        Ok(h) => h.map(|r| counters(r.into_inner())).map_err(anyhow::Error::from),
                        Err(_) => Err(anyhow::anyhow!("no answer within {} s", HEALTH_TIMEOUT.as_secs())),
                    };
                    (i, h.with_context(|| format!("health of {addr}")))
                });
            }
            let mut out: Vec<Option<anyhow::Result<NodeCounters>>> = (0..n).map(|_| None).collect();
            while let Some(done) = set.join_next().await {
                match done {
                    Ok((i, h)) => out[i] = Some(h),
                    Err(e) => tracing::warn!(error = %e, "a health ask failed to run"),
                }
            }
            out.into_iter().map(|h| h.unwrap_or_else(|| Err(anyhow::anyhow!("the health ask did not run")))).collect()
        };
        unless_lost(&self.rt, self.heartbeat.as_ref(), all)
            .unwrap_or_else(|why| (0..n).map(|_| Err(anyhow::anyhow!("not asked: {why}"))).collect())
    }

    /// A stage's figures before its node has answered `Health`.
    fn initial_stats(s: &StageHandle) -> StageStats {
        StageStats {
            node: s.name.clone(),
            device: s.adapter.clone(),
            layers: s.layers.clone(),
            weight_bytes: 0,
            cache_bytes: 0,
            memory_bytes: Some(s.memory),
            sequences: 0,
            steps: 0,
            rows: 0,
            busy_seconds: 0.0,
            pool: PoolCounters::default(),
        }
    }
}

impl Engine for Pipeline {
    /// Sends a step without waiting for it; its outcome comes from `next_result`.
    fn submit(&mut self, seqs: &[SeqStep<'_>]) -> anyhow::Result<u64> {
        let act = self.activation(seqs);
        let n = act.step;
        unless_lost(&self.rt, self.heartbeat.as_ref(), Self::send(&self.tx, act))??;
        let seqs = seqs.iter().map(|s| (s.seq, s.logprobs.is_some())).collect();
        self.in_flight.insert(n, InFlight { seqs, sent: Instant::now() });
        Ok(n)
    }

    fn next_result(&mut self) -> anyhow::Result<StepDone> {
        if self.in_flight.is_empty() {
            bail!("next_result without a submitted step");
        }
        loop {
            let r = unless_lost(&self.rt, self.heartbeat.as_ref(), self.results.message())?
                .map_err(|s| anyhow::anyhow!("pipeline failed: {}", s.message()))?
                .context("the pipeline closed its result stream")?;
            if let Some(why) = lost_next_stage(&r) {
                // The result stream may break only later; the pipeline is broken now.
                bail!("{why}");
            }
            let Some(flight) = self.in_flight.remove(&r.step) else {
                tracing::warn!(step = r.step, "a result for a step not in flight");
                continue;
            };
            self.latency.observe(flight.sent.elapsed());
            let step = r.step;
            return Ok(StepDone { step, outcomes: Self::outcomes(&flight, r) });
        }
    }

    /// Frees a sequence on every stage (each stage passes it on to the next, and answers
    /// once the rest have). A lost node ends the wait: the re-plan that follows drops
    /// every sequence anyway.
    fn release(&mut self, seq: SeqId) -> anyhow::Result<()> {
        let mut client = self.stages[0].client.clone();
        unless_lost(&self.rt, self.heartbeat.as_ref(), client.release(pb::ReleaseRequest { seq_id: seq }))
            .and_then(|r| r.map_err(anyhow::Error::from))
            .context("releasing a sequence")?;
        Ok(())
    }

    fn ctx(&self) -> u32 {
        self.ctx
    }

    fn replan_wanted(&self) -> Option<Replan> {
        match &*self.heartbeat.as_ref()?.alarm.borrow() {
            Some(Alarm::Lost { why, .. } | Alarm::Leaving(why)) => Some(Replan { why: why.clone(), when_idle: false }),
            Some(Alarm::Rejoin(why)) => Some(Replan { why: why.clone(), when_idle: true }),
            None => None,
        }
    }

    /// Re-plans over the nodes that answer, loads the new shards and opens a new stream.
    /// Every step in flight is lost and every stage starts empty.
    fn recover(&mut self) -> anyhow::Result<Recovered> {
        let t0 = Instant::now();
        let before: Vec<String> = self.stages.iter().map(|s| s.name.clone()).collect();
        let lost = match self.heartbeat.as_ref().map(|h| h.alarm.borrow().clone()) {
            Some(Some(Alarm::Lost { addr, .. })) => Some(addr),
            _ => None,
        };
        // Stop watching, and close the old stream so that every stage drops its own.
        self.heartbeat = None;
        self.tx = mpsc::channel(1).0;
        self.in_flight.clear();
        let gguf = Gguf::open(&self.args.model).with_context(|| format!("opening {}", self.args.model.display()))?;
        if gguf.identity() != self.model_id.as_slice() {
            bail!("{} changed since the model was loaded", self.args.model.display());
        }
        // Nodes of the cluster that appeared since are candidates from now on.
        for addr in self.watch.as_ref().map(|w| w.found()).unwrap_or_default() {
            if !self.candidates.contains(&addr) {
                tracing::info!(%addr, "a node found over mDNS joins the candidates");
                self.candidates.push(addr);
            }
        }
        let (alive, gone) = self.rt.block_on(survivors(&self.candidates, &self.security, lost.as_deref()));
        let (absent, mut gone): (Vec<String>, Vec<String>) = gone.into_iter().unzip();
        if lost.is_some() {
            // After a loss every node is worth trying again.
            self.refused.clear();
        }
        let previous: Vec<String> = self.stages.iter().map(|s| s.addr.clone()).collect();
        let newcomer = |s: &StageHandle| !previous.contains(&s.addr);
        let mut planned = self.rt.block_on(self.replan(&gguf, alive.clone(), &gone));
        if let Err(e) = &planned
            && alive.iter().any(newcomer)
            && !alive.iter().all(newcomer)
        {
            // A node that joins must not break a pipeline that worked without it.
            let joined: Vec<String> = alive.iter().filter(|s| newcomer(s)).map(|s| s.addr.clone()).collect();
            let why = format!("{} could not join: {e:#}", joined.join(", "));
            tracing::warn!("{why}; planning without");
            let old = alive.into_iter().filter(|s| !newcomer(s)).collect();
            planned = self.rt.block_on(self.replan(&gguf, old, &gone));
            gone.push(why);
            self.refused.extend(joined);
        }
        let outside = |p: &Pipeline, absent| Outside {
            absent,
            discovered: p.watch.as_ref().map(|w| w.shared()),
            skip: p.refused.clone(),
        };
        let c = match planned {
            Ok(c) => c,
            Err(e) => {
                // Watch for the missing nodes: one that comes back is worth another try.
                self.heartbeat = Some(Heartbeat::start(&self.rt, &[], outside(self, absent), &self.security));
                return Err(e);
            }
        };
        self.kv = kv_of(&c)?;
        self.kv_positions = c.kv_positions;
        self.micro_batches = self.args.micro_batches.map_or_else(|| distinct_devices(&c.stages), |n| n as usize);
        self.heartbeat = Some(Heartbeat::start(&self.rt, &c.stages, outside(self, absent), &self.security));
        self.stages = c.stages;
        self.tx = c.tx;
        self.results = c.results;
        *self.node_stats.lock().unwrap_or_else(|e| e.into_inner()) = (None, Vec::new());
        let nodes: Vec<String> = self.stages.iter().map(|s| s.name.clone()).collect();
        let left_out = before.into_iter().filter(|n| !nodes.contains(n)).collect();
        Ok(Recovered { left_out, why: gone, nodes, seconds: t0.elapsed().as_secs_f64() })
    }

    fn max_batch(&self) -> u32 {
        self.batch
    }

    fn max_seqs(&self) -> u32 {
        self.max_seqs
    }

    fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    fn kv_capacity(&self) -> Option<KvCapacity> {
        self.kv
    }

    fn checkpoints(&self) -> bool {
        self.usage.checkpoints
    }

    fn draft_max(&self) -> u32 {
        super::draft_max(&self.args)
    }

    fn mtp(&self) -> bool {
        self.mtp
    }

    /// The plan, and each node's own counters (asked at most every [`STATS_EVERY`]; a
    /// node that does not answer keeps its last figures).
    fn stats(&self) -> EngineStats {
        let mut cache = self.node_stats.lock().unwrap_or_else(|e| e.into_inner());
        if cache.0.is_none_or(|t| t.elapsed() >= STATS_EVERY) {
            let mut fresh = Vec::new();
            for (i, (s, read)) in self.stages.iter().zip(self.read_counters()).enumerate() {
                let mut st = cache.1.get(i).cloned().unwrap_or_else(|| Self::initial_stats(s));
                match read {
                    Ok(c) => {
                        st.weight_bytes = c.weight_bytes;
                        st.cache_bytes = c.cache_bytes;
                        st.sequences = c.sequences;
                        st.steps = c.steps;
                        st.rows = c.rows;
                        st.busy_seconds = c.compute_seconds;
                        st.pool = c.pool;
                    }
                    Err(e) => tracing::debug!(node = %s.name, error = %format!("{e:#}"), "no health answer"),
                }
                fresh.push(st);
            }
            *cache = (Some(Instant::now()), fresh);
        }
        let n_layer = self.stages.last().map_or(0, |s| s.layers.end);
        EngineStats { n_layer, stages: cache.1.clone(), step_latency: self.latency.clone() }
    }

    fn placement(&self) -> Vec<Placement> {
        let place = |s: &StageHandle| Placement {
            node: s.name.clone(),
            address: s.addr.clone(),
            adapter: s.adapter.clone(),
            backend: s.backend.clone(),
            layers: s.layers.clone(),
        };
        self.stages.iter().map(place).collect()
    }

    fn weight_bytes_per_token(&self) -> u64 {
        self.weight_bytes_per_token
    }

    fn node_counters(&self) -> anyhow::Result<Vec<NodeCounters>> {
        self.read_counters().into_iter().collect()
    }
}

/// Round trips of one hidden state to a node, for `strata bench-hop`.
pub struct HopTimes {
    pub format: &'static str,
    pub payload_bytes: usize,
    /// Milliseconds per timed round trip, in the order run.
    pub round_trips_ms: Vec<f64>,
}

/// Sends `warmup + iterations` activations of `values` hidden values, one at a time, to
/// the node at `addr` and times each answer. A node holding no shard decodes the
/// activation and answers at once (with a "no shard" error), so this times the
/// transport (serialisation, HTTP/2, TCP), not any compute.
pub fn time_hops(
    addr: &str,
    security: &Security,
    wire: Wire,
    values: usize,
    warmup: usize,
    iterations: usize,
) -> anyhow::Result<HopTimes> {
    let format = wire_format(wire);
    let width = match format {
        pb::HiddenFormat::F32 => 4,
        pb::HiddenFormat::F16 => 2,
    };
    let payload = vec![0u8; values * width];
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let round_trips_ms = rt.block_on(async {
        let mut client = strata_proto::transport::connect(addr, security).await?;
        let (tx, rx) = mpsc::channel(4);
        let mut results = client.forward(ReceiverStream::new(rx)).await?.into_inner();
        let mut times = Vec::with_capacity(iterations);
        for i in 0..warmup + iterations {
            let rows = pb::SeqRows { seq_id: 1, pos: 0, rows: 1, want_token: true, ..Default::default() };
            let act = pb::Activation {
                step: i as u64,
                seqs: vec![rows],
                hidden: payload.clone(),
                format: format as i32,
                failed: Vec::new(),
            };
            let t0 = Instant::now();
            tx.send(act).await?;
            results.message().await?.context("the node closed the stream")?;
            if i >= warmup {
                times.push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        anyhow::Ok(times)
    })?;
    let format = match format {
        pb::HiddenFormat::F32 => "f32",
        pb::HiddenFormat::F16 => "f16",
    };
    Ok(HopTimes { format, payload_bytes: payload.len(), round_trips_ms })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A step failed as a whole with `Unavailable` (as a stage sends it when its next
    /// stage closed the stream) breaks the pipeline; other failures stay the step's.
    #[test]
    fn only_a_step_failed_as_unavailable_means_a_lost_node() {
        let failed = |code: pb::StepErrorCode, error: &str| pb::StepResult {
            step: 7,
            error: error.into(),
            error_code: code as i32,
            ..Default::default()
        };
        let lost = failed(pb::StepErrorCode::Unavailable, "node `a`: the next stage closed its stream");
        assert_eq!(lost_next_stage(&lost), Some("node `a`: the next stage closed its stream"));
        assert_eq!(lost_next_stage(&failed(pb::StepErrorCode::Internal, "node `a`: stage task failed")), None);
        assert_eq!(lost_next_stage(&failed(pb::StepErrorCode::ResourceExhausted, "node `a`: no free block")), None);
        assert_eq!(lost_next_stage(&pb::StepResult { step: 7, ..Default::default() }), None);
    }
}
