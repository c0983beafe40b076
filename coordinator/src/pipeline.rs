//! The pipeline driver: plans a model over nodes, loads a shard on each, and drives
//! steps through them.
//!
//! Every stage is reached the same way, over the transport: this machine's own share
//! (unless `--no-local`) runs as an in-process stage service on an ephemeral loopback
//! port. Activations go to stage 0 on one long-lived `Forward` stream; each stage hands
//! its hidden state straight to the next; the last stage's token comes back up the
//! chain. Prefill sends every chunk without waiting (a token is asked for on the last
//! only), so consecutive stages work on consecutive chunks at once.
//!
//! This module is the coordinator's boundary with the wire: proto messages are built
//! and read here and nowhere else in the coordinator.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use strata_model::config::ModelConfig;
use strata_model::gguf::Gguf;
use strata_model::plan::{ModelCost, NodeBudget, Plan, PlanConfig, parse_split};
use strata_model::sampling::SamplingParams;
use strata_node::gpu::{Gpu, GpuConfig};
use strata_node::service::{self, NodeConfig, NodeIdentity, StageService};
use strata_node::stage::{Logprobs, SeqId};
use strata_proto::tokio_stream::wrappers::ReceiverStream;
use strata_proto::tonic::Streaming;
use strata_proto::tonic::transport::Channel;
use strata_proto::v1::{self as pb, stage_client::StageClient};
use tokio::sync::{mpsc, oneshot};

use crate::cli::{EngineArgs, Wire};
use crate::engine::context_length;
use crate::scheduler::{EngineStats, LatencyHistogram, Sampled, StageStats, Step, StepEngine};

/// One stage as the coordinator sees it.
pub struct StageHandle {
    pub name: String,
    pub addr: String,
    pub adapter: String,
    pub backend: String,
    /// The node's usable memory, as it reported it.
    pub memory: u64,
    pub layers: std::ops::Range<usize>,
    client: StageClient<Channel>,
}

/// A node's counters (from `Health`), for benchmarks.
#[derive(Debug, Clone, Copy, Default)]
pub struct StageCounters {
    pub steps: u64,
    pub compute_seconds: f64,
    pub waited_steps: u64,
    pub downstream_wait_seconds: f64,
}

impl StageCounters {
    pub fn since(&self, before: &StageCounters) -> StageCounters {
        StageCounters {
            steps: self.steps - before.steps,
            compute_seconds: self.compute_seconds - before.compute_seconds,
            waited_steps: self.waited_steps - before.waited_steps,
            downstream_wait_seconds: self.downstream_wait_seconds - before.downstream_wait_seconds,
        }
    }
}

/// This machine's in-process stage service; stops when dropped.
struct LocalNode {
    _shutdown: oneshot::Sender<()>,
}

pub struct Pipeline {
    rt: tokio::runtime::Runtime,
    pub stages: Vec<StageHandle>,
    pub ctx: u32,
    pub batch: u32,
    wire: pb::HiddenFormat,
    tx: mpsc::Sender<pb::Activation>,
    results: Streaming<pb::StepResult>,
    next_step: u64,
    /// Prompt ids to hand the last stage with a sequence's next activation (penalties).
    history: Vec<(SeqId, Vec<u32>)>,
    /// Submitted steps that want a token: step number -> (sequence, when sent, logprobs asked).
    in_flight: HashMap<u64, (SeqId, Instant, bool)>,
    /// Results owed at once: steps that asked for no token have nothing to wait for.
    ready: VecDeque<(SeqId, anyhow::Result<Option<Sampled>>)>,
    /// Errors of steps that asked for no token, reported with the sequence's next result.
    failed: HashMap<SeqId, String>,
    latency: LatencyHistogram,
    /// The nodes' counters, refreshed at most every [`STATS_EVERY`].
    node_stats: Mutex<(Option<Instant>, Vec<StageStats>)>,
    _local: Option<LocalNode>,
}

/// How often `stats` asks the nodes for their counters (the scheduler asks every step).
const STATS_EVERY: Duration = Duration::from_millis(250);

fn wire_format(w: Wire) -> pb::HiddenFormat {
    match w {
        Wire::F32 => pb::HiddenFormat::F32,
        Wire::F16 => pb::HiddenFormat::F16,
    }
}

/// Starts this machine's stage service on a free loopback port; returns its address.
async fn start_local(gguf_path: &std::path::Path, adapter: Option<String>) -> anyhow::Result<(String, LocalNode)> {
    let gpu = Arc::new(Gpu::new(&GpuConfig { adapter })?);
    let identity = NodeIdentity {
        node_id: format!("local-{}", std::process::id()),
        name: "local".into(),
        usable_memory: strata_node::memory::probe(&gpu).bytes,
        adapter: gpu.info.name.clone(),
        backend: format!("{:?}", gpu.info.backend),
    };
    // The coordinator's own node has the file: it never needs a shard cache.
    let config = NodeConfig {
        identity,
        model_dir: None,
        model_files: vec![gguf_path.to_owned()],
        cache_dir: None,
        idle_timeout: Duration::from_secs(600),
    };
    let listener = strata_proto::transport::bind(([127, 0, 0, 1], 0).into()).await.context("binding the local stage's port")?;
    let addr = listener.local_addr()?.to_string();
    let (tx, rx) = oneshot::channel::<()>();
    let svc = StageService::new(config, gpu)?;
    tokio::spawn(async move {
        if let Err(e) = service::serve(listener, svc, async move { let _ = rx.await; }).await {
            tracing::error!(error = %e, "local stage service failed");
        }
    });
    Ok((addr, LocalNode { _shutdown: tx }))
}

impl Pipeline {
    pub fn load(gguf: &Gguf, args: &EngineArgs) -> anyhow::Result<Pipeline> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let config = ModelConfig::from_gguf(gguf)?;
        let ctx = context_length(gguf, args)?;
        let batch = args.batch.min(ctx);
        let discovered = if args.discover {
            let timeout = Duration::from_secs_f64(args.discover_timeout);
            let found = crate::discovery::discover_nodes(args.expect_nodes.map(|n| n as usize), timeout)?;
            eprintln!("discovered {} node(s) over mDNS: {}", found.len(), found.join(", "));
            found
        } else {
            Vec::new()
        };
        let (stages, _plan, tx, results, local) = rt.block_on(Self::connect_and_load(gguf, &config, args, &discovered, ctx, batch))?;
        Ok(Pipeline {
            rt,
            stages,
            ctx,
            batch,
            wire: wire_format(args.wire),
            tx,
            results,
            next_step: 0,
            history: Vec::new(),
            in_flight: HashMap::new(),
            ready: VecDeque::new(),
            failed: HashMap::new(),
            latency: LatencyHistogram::default(),
            node_stats: Mutex::new((None, Vec::new())),
            _local: local,
        })
    }

    #[allow(clippy::type_complexity)]
    async fn connect_and_load(
        gguf: &Gguf,
        config: &ModelConfig,
        args: &EngineArgs,
        discovered: &[String],
        ctx: u32,
        batch: u32,
    ) -> anyhow::Result<(Vec<StageHandle>, Plan, mpsc::Sender<pb::Activation>, Streaming<pb::StepResult>, Option<LocalNode>)> {
        let mut addrs = Vec::new();
        let local = if args.no_local {
            None
        } else {
            let (addr, node) = start_local(&args.model, args.adapter.clone()).await?;
            addrs.push(addr);
            Some(node)
        };
        addrs.extend(args.peers.iter().cloned());
        addrs.extend(discovered.iter().cloned());
        if addrs.is_empty() {
            bail!("no node to run the model on: --no-local without any --peer, and --discover found none");
        }
        let mut stages = Vec::new();
        let mut budgets = Vec::new();
        for addr in &addrs {
            let mut client = strata_proto::transport::connect(addr).await?;
            let info = client.info(pb::InfoRequest {}).await.with_context(|| format!("asking {addr} for its info"))?.into_inner();
            if info.protocol_version != strata_proto::PROTOCOL_VERSION {
                bail!("node {addr} speaks protocol {}, this coordinator {}", info.protocol_version, strata_proto::PROTOCOL_VERSION);
            }
            let name = if stages.iter().any(|s: &StageHandle| s.name == info.name) { format!("{}@{addr}", info.name) } else { info.name.clone() };
            budgets.push(NodeBudget::new(name.clone(), info.usable_memory));
            stages.push(StageHandle {
                name,
                addr: addr.clone(),
                adapter: info.adapter,
                backend: info.backend,
                memory: info.usable_memory,
                layers: 0..0,
                client,
            });
        }
        let pc = PlanConfig { max_batch: batch as usize, ..PlanConfig::new(ctx as usize) };
        let cost = ModelCost::new(gguf, config, &pc)?;
        let plan = match &args.split {
            Some(s) => Plan::manual(&cost, &budgets, &parse_split(s)?)?,
            None => Plan::auto(&cost, &budgets)?,
        };
        eprintln!("plan:\n{}", plan.table());
        let model_id = gguf.identity().to_vec();
        // The bytes nodes without the file are streamed: the same file, mapped again so
        // that each node's load task can own a handle.
        let source = Arc::new(Gguf::open(&args.model).with_context(|| format!("opening {}", args.model.display()))?);
        if source.identity() != gguf.identity() {
            bail!("{} changed while loading", args.model.display());
        }
        let mut loads = Vec::new();
        for (k, sp) in plan.stages.iter().enumerate() {
            let stage = &mut stages[sp.node];
            stage.layers = sp.layers.clone();
            let req = pb::LoadShardRequest {
                model_id: model_id.clone(),
                layer_start: sp.layers.start as u32,
                layer_end: sp.layers.end as u32,
                ctx,
                max_batch: batch,
                next_stage: addrs.get(k + 1).cloned().unwrap_or_default(),
            };
            let mut client = stage.client.clone();
            let what = format!("loading layers {}..{} on {} ({})", sp.layers.start, sp.layers.end, stage.name, stage.addr);
            let (name, source) = (stage.name.clone(), source.clone());
            loads.push(tokio::spawn(async move {
                let shipped = crate::shipping::load_shard(&mut client, req, source, &name).await.with_context(|| what.clone())?;
                anyhow::Ok((what, name, shipped))
            }));
        }
        for l in loads {
            let (what, name, s) = l.await??;
            tracing::info!(node = %name, weight_bytes = s.weight_bytes, secs = s.total_secs, "{what}: done");
            // A stable line (tests and benchmarks read it): bytes streamed and the load time.
            let rate = if s.stream_secs > 0.0 { s.streamed_bytes as f64 / 1e6 / s.stream_secs } else { 0.0 };
            eprintln!("streamed {} bytes to {name} in {:.2} s ({rate:.1} MB/s); shard loaded in {:.2} s", s.streamed_bytes, s.stream_secs, s.total_secs);
        }
        let (tx, rx) = mpsc::channel(1024);
        let results = stages[0].client.forward(ReceiverStream::new(rx)).await.context("opening the forward stream to stage 0")?.into_inner();
        Ok((stages, plan, tx, results, local))
    }

    pub fn note_prompt(&mut self, seq: SeqId, ids: &[u32]) {
        self.history.push((seq, ids.to_vec()));
    }

    fn activation(&mut self, seq: SeqId, ids: &[u32], positions: &[u32], sampling: &SamplingParams, want_token: bool) -> pb::Activation {
        let step = self.next_step;
        self.next_step += 1;
        let history = match self.history.iter().position(|(s, _)| *s == seq) {
            Some(i) => self.history.swap_remove(i).1,
            None => Vec::new(),
        };
        pb::Activation {
            seq_id: seq,
            step,
            positions: positions.to_vec(),
            token_ids: ids.to_vec(),
            hidden: Vec::new(),
            format: self.wire as i32,
            sampling: Some(service::sampling_to_wire(sampling)),
            want_token,
            history,
            want_logits: false,
            want_logprobs: false,
            top_logprobs: 0,
        }
    }

    async fn send(tx: &mpsc::Sender<pb::Activation>, act: pb::Activation) -> anyhow::Result<()> {
        tx.send(act).await.map_err(|_| anyhow::anyhow!("the pipeline's forward stream closed"))
    }

    /// Sends every chunk of `ids` at once and waits only for the last one's token.
    pub fn prefill(&mut self, seq: SeqId, ids: &[u32], pos: u32, sampling: &SamplingParams) -> anyhow::Result<u32> {
        let chunks: Vec<&[u32]> = ids.chunks(self.batch as usize).collect();
        if chunks.is_empty() {
            bail!("nothing to prefill");
        }
        let mut p = pos;
        for (i, chunk) in chunks.iter().enumerate() {
            let positions: Vec<u32> = (p..p + chunk.len() as u32).collect();
            let want_token = i + 1 == chunks.len();
            self.submit(Step { seq, ids: chunk, positions: &positions, sampling, prompt: false, want_token, logprobs: None })?;
            p += chunk.len() as u32;
        }
        self.token_of()
    }

    pub fn step(&mut self, seq: SeqId, ids: &[u32], positions: &[u32], sampling: &SamplingParams) -> anyhow::Result<u32> {
        self.submit(Step { seq, ids, positions, sampling, prompt: false, want_token: true, logprobs: None })?;
        self.token_of()
    }

    /// The token of the one step in flight that wants one (`run` and `bench` drive a
    /// single sequence); results of the steps before it are passed over, their errors not.
    fn token_of(&mut self) -> anyhow::Result<u32> {
        loop {
            if let Some(sampled) = self.next_result()?.1? {
                return Ok(sampled.token);
            }
        }
    }

    /// Sends a step without waiting for it; its outcome comes from [`Pipeline::next_result`].
    pub fn submit(&mut self, step: Step<'_>) -> anyhow::Result<()> {
        if step.prompt && step.sampling.has_penalties() {
            self.note_prompt(step.seq, step.ids);
        }
        let mut act = self.activation(step.seq, step.ids, step.positions, step.sampling, step.want_token);
        if let Some(top) = step.logprobs {
            act.want_logprobs = true;
            act.top_logprobs = top;
        }
        let n = act.step;
        self.rt.block_on(Self::send(&self.tx, act))?;
        if step.want_token {
            self.in_flight.insert(n, (step.seq, Instant::now(), step.logprobs.is_some()));
        } else {
            self.ready.push_back((step.seq, Ok(None)));
        }
        Ok(())
    }

    /// The next finished step (see [`StepEngine::next_result`]).
    pub fn next_result(&mut self) -> anyhow::Result<(SeqId, anyhow::Result<Option<Sampled>>)> {
        if let Some(r) = self.ready.pop_front() {
            return Ok(r);
        }
        if self.in_flight.is_empty() {
            bail!("next_result without a submitted step");
        }
        loop {
            let r = self.rt.block_on(self.results.message()).map_err(|s| anyhow::anyhow!("pipeline failed: {}", s.message()))?;
            let r = r.context("the pipeline closed its result stream")?;
            match self.in_flight.remove(&r.step) {
                Some((seq, sent, logprobs)) => {
                    self.latency.observe(sent.elapsed());
                    let result = match self.failed.remove(&seq) {
                        Some(e) => Err(anyhow::anyhow!(e)),
                        None if !r.error.is_empty() => Err(anyhow::anyhow!(r.error)),
                        None => Ok(Some(Sampled {
                            token: r.token_id,
                            logprobs: logprobs.then(|| Logprobs { token: r.logprob, top: r.top_ids.iter().copied().zip(r.top_logprobs.iter().copied()).collect() }),
                        })),
                    };
                    return Ok((seq, result));
                }
                // A step nobody waits for failed (a prefill chunk): its sequence's next
                // result carries the error.
                None if !r.error.is_empty() => {
                    tracing::warn!(seq = r.seq_id, step = r.step, error = %r.error, "step failed");
                    self.failed.entry(r.seq_id).or_insert(r.error);
                }
                None => tracing::debug!(seq = r.seq_id, step = r.step, "result of a step nobody waits for"),
            }
        }
    }

    /// Frees a sequence on every stage (each stage passes it on to the next).
    pub fn release(&mut self, seq: SeqId) -> anyhow::Result<()> {
        self.failed.remove(&seq);
        let mut client = self.stages[0].client.clone();
        self.rt.block_on(client.release(pb::ReleaseRequest { seq_id: seq })).context("releasing a sequence")?;
        Ok(())
    }

    /// Every stage's counters, in pipeline order.
    pub fn counters(&self) -> anyhow::Result<Vec<StageCounters>> {
        self.rt.block_on(async {
            let mut out = Vec::new();
            for s in &self.stages {
                let h = s.client.clone().health(pb::HealthRequest {}).await.with_context(|| format!("health of {}", s.addr))?.into_inner();
                out.push(StageCounters {
                    steps: h.steps,
                    compute_seconds: h.compute_seconds,
                    waited_steps: h.waited_steps,
                    downstream_wait_seconds: h.downstream_wait_seconds,
                });
            }
            Ok(out)
        })
    }
}

impl StepEngine for Pipeline {
    fn submit(&mut self, step: Step<'_>) -> anyhow::Result<()> {
        Pipeline::submit(self, step)
    }

    fn next_result(&mut self) -> anyhow::Result<(SeqId, anyhow::Result<Option<Sampled>>)> {
        Pipeline::next_result(self)
    }

    fn release(&mut self, seq: SeqId) -> anyhow::Result<()> {
        Pipeline::release(self, seq)
    }

    fn ctx(&self) -> u32 {
        self.ctx
    }

    fn max_batch(&self) -> u32 {
        self.batch
    }

    /// The plan, and each node's own counters (asked at most every [`STATS_EVERY`]; a
    /// node that does not answer keeps its last figures).
    fn stats(&self) -> EngineStats {
        let mut cache = self.node_stats.lock().unwrap_or_else(|e| e.into_inner());
        if cache.0.is_none_or(|t| t.elapsed() >= STATS_EVERY) {
            let fresh: Vec<StageStats> = self.rt.block_on(async {
                let mut out = Vec::new();
                for (i, s) in self.stages.iter().enumerate() {
                    let h = s.client.clone().health(pb::HealthRequest {}).await.map(|r| r.into_inner());
                    let mut st = cache.1.get(i).cloned().unwrap_or_else(|| StageStats {
                        node: s.name.clone(),
                        device: s.adapter.clone(),
                        layers: s.layers.clone(),
                        weight_bytes: 0,
                        cache_bytes: 0,
                        memory_bytes: Some(s.memory),
                        sequences: 0,
                        steps: 0,
                        busy_seconds: 0.0,
                    });
                    match h {
                        Ok(h) => {
                            st.weight_bytes = h.weight_bytes;
                            st.cache_bytes = h.cache_bytes;
                            st.sequences = h.sequences as usize;
                            st.steps = h.steps;
                            st.busy_seconds = h.compute_seconds;
                        }
                        Err(e) => tracing::debug!(node = %s.name, error = %e.message(), "no health answer"),
                    }
                    out.push(st);
                }
                out
            });
            *cache = (Some(Instant::now()), fresh);
        }
        EngineStats { n_layer: self.stages.last().map_or(0, |s| s.layers.end), stages: cache.1.clone(), step_latency: self.latency.clone() }
    }
}
