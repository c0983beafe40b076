//! The stage service: the gRPC face of a node, around one [`Stage`].
//!
//! A stage's GPU work is blocking, so it runs under a `std::sync::Mutex` from
//! `spawn_blocking`; each `Forward` stream is read in order, one activation at a time, so
//! a sequence's steps run in the order they were sent. An activation is one step: the
//! rows of several sequences, run together. A stage that is not last opens its own
//! `Forward` stream to the next stage for every upstream stream it serves, hands the
//! hidden rows of the sequences that ran on there (node to node, never via the
//! coordinator), with the failures of those that could not, and relays the results that
//! come back up: one `StepResult` per step, with an answer per sequence. Because handing
//! on does not wait for the result, stage k+1 works on step i while stage k runs step i+1.
//!
//! Wire format: `Activation.format` names the encoding of `hidden`; into the first stage
//! it names the encoding the whole pipeline hands hidden states on in. An error of one
//! sequence (out of order, no room in the KV pool, a bad id) becomes its `SeqResult.error`
//! and the step's other sequences run; an error of the whole step (malformed payload, no
//! shard) its `StepResult.error`. Both carry a `StepErrorCode` (from
//! [`crate::Error::kind`]) a caller can match; the node keeps serving.
//!
//! `LoadShard` checks the coordinator's protocol version and that the asked context and
//! batch fit the adapter's buffers before it drops the shard it holds, so a refused
//! request leaves the node serving what it served.
//!
//! Weights: a node reads only its layers' tensors. With its own copy of the model (found
//! by identity, [`Gguf::identity`], among the candidate files) it reads them from there.
//! Otherwise `LoadShard` answers what is missing (the header, then per tensor the bytes
//! from where its verified prefix ends) instead of loading; the coordinator streams those
//! bytes with `PushTensors` in checksummed chunks into the node's [`ShardCache`] and asks
//! again. A chunk that fails its checksum ends the stream with `DATA_LOSS` and is not
//! recorded; a restart finds the cache complete and transfers nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use strata_model::config::ModelConfig;
use strata_model::gguf::Gguf;
use strata_model::plan::shard_tensors;
use strata_model::sampling::SamplingParams;
use strata_proto::tokio_stream::wrappers::ReceiverStream;
use strata_proto::tonic::transport::Channel;
use strata_proto::tonic::{self, Request, Response, Status, Streaming};
use strata_proto::transport::Security;
use strata_proto::v1::{self as pb, stage_client::StageClient};
use tokio::sync::mpsc;

use crate::advertise::NodeAdvert;
use crate::error::ErrorKind;
use crate::gpu::{Gpu, GpuConfig};
use crate::kv_pool::KvLayout;
use crate::memory::MemoryLimit;
use crate::shard_cache::{MissingRange, ShardCache, hex};
use crate::stage::{Logprobs, Produced, SeqStep, Stage, StageSpec, Want};

/// How long a release waits for the next stage to release too. A stage answers one in
/// milliseconds; a next stage that takes seconds is frozen or cut off, which the
/// coordinator's heartbeat notices and re-plans around (dropping every sequence there).
/// Waiting on would only hold this handler open, and the previous stage's, which waits on
/// this one, until HTTP/2's keep-alive gave up (40 s).
const NEXT_RELEASE_WAIT: Duration = Duration::from_secs(3);

/// Who a node is and what it offers (the domain side of `NodeInfo`).
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub node_id: String,
    pub name: String,
    /// Bytes the node may use for weights and caches.
    pub usable_memory: u64,
    pub adapter: String,
    pub backend: String,
    /// Which physical device computes ([`crate::gpu::DeviceInfo::key`]).
    pub device_key: String,
}

impl NodeIdentity {
    /// What the node announces over mDNS.
    pub fn advert(&self) -> NodeAdvert {
        NodeAdvert {
            node_id: self.node_id.clone(),
            name: self.name.clone(),
            protocol_version: strata_proto::PROTOCOL_VERSION,
            usable_memory: self.usable_memory,
            adapter: self.adapter.clone(),
            backend: self.backend.clone(),
            cluster: None,
        }
    }
}

/// What a node is asked to be; [`StageService::open`] probes the device for the rest.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub node_id: String,
    pub name: String,
    /// The adapter, and its optional kernels ([`GpuConfig`]).
    pub gpu: GpuConfig,
    /// What the node offers for weights and caches (`Auto`: probe the device).
    pub memory: MemoryLimit,
    pub model_dir: Option<PathBuf>,
    pub model_files: Vec<PathBuf>,
    pub cache_dir: Option<PathBuf>,
    pub idle_timeout: Duration,
    /// How connections to this node, and its own to the next stage, are protected.
    pub security: Security,
}

/// How a node serves.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub identity: NodeIdentity,
    /// Where the node looks for models (every `*.gguf` in it).
    pub model_dir: Option<PathBuf>,
    /// Further model files to consider (an in-process node gets the coordinator's model).
    pub model_files: Vec<PathBuf>,
    /// Where streamed shards are kept; `None`: the node only loads models it holds.
    pub cache_dir: Option<PathBuf>,
    /// Sequences unused this long are freed.
    pub idle_timeout: Duration,
    /// Plain or the cluster's TLS, both for serving and for connecting to the next stage.
    pub security: Security,
}

/// What `LoadShard` came to.
enum LoadOutcome {
    Loaded(u64),
    /// The node lacks these bytes (and, `need_header`, the header first).
    Missing {
        need_header: bool,
        ranges: Vec<MissingRange>,
    },
}

/// Serves `service` on `listener` until `shutdown`, freeing idle sequences meanwhile.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: StageService,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), strata_proto::transport::TransportError> {
    let inner = service.inner.clone();
    let idle = inner.config.idle_timeout;
    let reaper = tokio::spawn(async move {
        let mut tick = tokio::time::interval((idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(30)));
        loop {
            tick.tick().await;
            let inner = inner.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if let Some(loaded) = inner.lock().as_mut() {
                    let n = loaded.stage.release_idle(idle);
                    if n > 0 {
                        tracing::info!(freed = n, "released idle sequences");
                    }
                }
            })
            .await;
        }
    });
    let security = service.inner.config.security.clone();
    let result = strata_proto::transport::serve(listener, service, &security, shutdown).await;
    reaper.abort();
    result
}

struct Loaded {
    stage: Stage,
    n_embd: usize,
}

#[derive(Default)]
struct Stats {
    steps: u64,
    rows: u64,
    compute_seconds: f64,
    waited_steps: u64,
    downstream_wait_seconds: f64,
    /// Steps handed downstream, and when.
    pending: HashMap<u64, Instant>,
}

struct Inner {
    config: NodeConfig,
    gpu: Arc<Gpu>,
    cache: Option<ShardCache>,
    /// One transfer at a time: each continues where the held bytes end.
    push_lock: tokio::sync::Mutex<()>,
    loaded: Mutex<Option<Loaded>>,
    next: Mutex<Option<StageClient<Channel>>>,
    stats: Mutex<Stats>,
    /// Set by [`StageService::leave`]: `Info` says so, and the coordinator moves off.
    leaving: AtomicBool,
    /// `Forward` streams open now: while one is, some pipeline runs through this node.
    streams: AtomicUsize,
}

/// Counts an open `Forward` stream until dropped.
struct StreamGuard(Arc<Inner>);

impl StreamGuard {
    fn new(inner: Arc<Inner>) -> StreamGuard {
        inner.streams.fetch_add(1, Ordering::SeqCst);
        StreamGuard(inner)
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Implements the `Stage` gRPC service.
#[derive(Clone)]
pub struct StageService {
    inner: Arc<Inner>,
}

impl StageService {
    /// Opens the GPU `options` names, sizes the memory on offer (probing it for `Auto`)
    /// and makes the service; the caller never handles the device itself.
    pub fn open(options: NodeOptions) -> crate::Result<StageService> {
        let gpu = Arc::new(Gpu::new(&options.gpu)?);
        let memory = options.memory.resolve(|| crate::memory::probe(&gpu));
        tracing::info!(bytes = memory.bytes, source = memory.source, "usable memory");
        let device = gpu.describe();
        let identity = NodeIdentity {
            node_id: options.node_id,
            name: options.name,
            usable_memory: memory.bytes,
            adapter: device.name,
            backend: device.backend,
            device_key: device.key,
        };
        let config = NodeConfig {
            identity,
            model_dir: options.model_dir,
            model_files: options.model_files,
            cache_dir: options.cache_dir,
            idle_timeout: options.idle_timeout,
            security: options.security,
        };
        StageService::new(config, gpu)
    }

    /// Fails only when the shard cache directory cannot be created.
    pub fn new(config: NodeConfig, gpu: Arc<Gpu>) -> crate::Result<StageService> {
        let cache = config.cache_dir.as_ref().map(ShardCache::new).transpose()?;
        Ok(StageService {
            inner: Arc::new(Inner {
                config,
                gpu,
                cache,
                push_lock: tokio::sync::Mutex::new(()),
                loaded: Mutex::new(None),
                next: Mutex::new(None),
                stats: Mutex::new(Stats::default()),
                leaving: AtomicBool::new(false),
                streams: AtomicUsize::new(0),
            }),
        })
    }

    /// Marks the node as leaving: `Info` answers `leaving`, which a coordinator's
    /// heartbeat reads and answers by re-planning without this node. Steps keep being
    /// served meanwhile, so nothing in flight is lost.
    pub fn leave(&self) {
        self.inner.leaving.store(true, Ordering::SeqCst);
    }

    /// Whether a pipeline runs through this node now (a `Forward` stream is open).
    pub fn in_use(&self) -> bool {
        self.inner.streams.load(Ordering::SeqCst) > 0
    }

    /// Resolves once no `Forward` stream is open: every coordinator has moved off.
    pub async fn released(&self) {
        while self.in_use() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Who this node is, as it answers `Info`.
    pub fn identity(&self) -> &NodeIdentity {
        &self.inner.config.identity
    }
}

/// A poisoned lock means a step panicked; the data (a stage, counters) is still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What one activation came to.
enum Ran {
    /// The step's answer, to send back up now: from the last stage, or from a stage where
    /// the whole step failed or none of its sequences could run.
    Answer(pb::StepResult),
    /// The step for the next stage: the sequences that ran here and their hidden rows.
    HandOn(pb::Activation),
}

/// Why a step failed, as `StepResult` carries it: a code to match and text for people.
struct StepFailure {
    code: pb::StepErrorCode,
    message: String,
}

impl StepFailure {
    fn new(code: pb::StepErrorCode, message: impl Into<String>) -> Self {
        StepFailure { code, message: message.into() }
    }
}

impl From<crate::Error> for StepFailure {
    fn from(e: crate::Error) -> Self {
        StepFailure::new(wire_code(e.kind()), e.to_string())
    }
}

fn wire_code(kind: ErrorKind) -> pb::StepErrorCode {
    match kind {
        ErrorKind::InvalidArgument => pb::StepErrorCode::InvalidArgument,
        ErrorKind::OutOfOrder => pb::StepErrorCode::OutOfOrder,
        ErrorKind::NotOnStage => pb::StepErrorCode::NotOnStage,
        ErrorKind::DataLoss => pb::StepErrorCode::DataLoss,
        ErrorKind::Exhausted => pb::StepErrorCode::ResourceExhausted,
        ErrorKind::Internal => pb::StepErrorCode::Internal,
    }
}

/// The answer of a step that failed as a whole.
fn failed_step(step: u64, node: &str, f: StepFailure) -> pb::StepResult {
    let error = format!("node `{node}`: {}", f.message);
    pb::StepResult { step, seqs: Vec::new(), error, error_code: f.code as i32 }
}

/// One sequence's failure in a step.
fn failed_seq(seq_id: u64, node: &str, e: crate::Error) -> pb::SeqResult {
    let f = StepFailure::from(e);
    let error = format!("node `{node}`: {}", f.message);
    pb::SeqResult { seq_id, error, error_code: f.code as i32, ..Default::default() }
}

/// What a sequence's rows ask of the last stage.
fn want_of(s: &pb::SeqRows) -> Want {
    if s.want_logits {
        Want::Logits
    } else if s.want_token {
        let sampling = s.sampling.as_ref().map(sampling_from_wire).unwrap_or_else(SamplingParams::greedy);
        Want::Token { sampling, logprobs: s.want_logprobs.then_some(s.top_logprobs as usize) }
    } else {
        Want::Nothing
    }
}

/// A sequence's grammar mask from the wire (little-endian u32 words); a length that is
/// not whole words is the sender's error.
fn mask_of(s: &pb::SeqRows) -> Result<Vec<u32>, StepFailure> {
    if !s.allowed.len().is_multiple_of(4) {
        let message =
            format!("sequence {}: a grammar mask of {} bytes is not whole u32 words", s.seq_id, s.allowed.len());
        return Err(StepFailure::new(pb::StepErrorCode::InvalidArgument, message));
    }
    Ok(s.allowed.chunks_exact(4).map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]])).collect())
}

/// Refuses a coordinator of another protocol version (`None`: one older than version 3,
/// which sent none).
fn check_version(node: &str, version: Option<u32>) -> Result<(), Status> {
    let ours = strata_proto::PROTOCOL_VERSION;
    match version {
        Some(v) if v == ours => Ok(()),
        v => {
            let theirs = v.map_or_else(|| "an older one".to_owned(), |v| v.to_string());
            Err(Status::failed_precondition(format!(
                "node `{node}` speaks protocol {ours}, the coordinator {theirs}: run the same strata version on every machine"
            )))
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Option<Loaded>> {
        lock(&self.loaded)
    }

    fn name(&self) -> &str {
        &self.config.identity.name
    }

    /// The candidate model files: `--model-dir`'s `*.gguf` and the explicit ones.
    fn candidates(&self) -> Vec<PathBuf> {
        let mut files = self.config.model_files.clone();
        if let Some(dir) = &self.config.model_dir
            && let Ok(entries) = std::fs::read_dir(dir)
        {
            let mut found: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x.eq_ignore_ascii_case("gguf")))
                .collect();
            found.sort();
            files.extend(found);
        }
        files
    }

    fn find_model(&self, id: &[u8]) -> Option<(PathBuf, Gguf)> {
        for path in self.candidates() {
            match Gguf::open(&path) {
                Ok(g) if g.identity() == id => return Some((path, g)),
                Ok(_) => {}
                Err(e) => tracing::debug!(path = %path.display(), error = %e, "not a usable GGUF"),
            }
        }
        None
    }

    /// The model from a candidate file, else from the shard cache if it holds every
    /// tensor of `layers`; else what the cache lacks.
    fn locate(
        &self,
        id: &[u8],
        layers: std::ops::Range<usize>,
        mtp: bool,
    ) -> Result<Result<(PathBuf, Gguf), LoadOutcome>, Status> {
        if let Some(found) = self.find_model(id) {
            return Ok(Ok(found));
        }
        let Some(cache) = &self.cache else {
            let dir = self.config.model_dir.as_deref().map_or("(none)".into(), |d: &Path| d.display().to_string());
            return Err(Status::not_found(format!(
                "node `{}` does not hold model {} in --model-dir {dir} and has no shard cache to receive it",
                self.name(),
                hex(id)
            )));
        };
        let cached =
            cache.open(id).map_err(|e| Status::internal(format!("node `{}`: shard cache: {e}", self.name())))?;
        let Some(model) = cached else {
            return Ok(Err(LoadOutcome::Missing { need_header: true, ranges: Vec::new() }));
        };
        let invalid = |e: strata_model::Error| {
            Status::invalid_argument(format!("node `{}` cannot load model {}: {e}", self.name(), hex(id)))
        };
        let config = ModelConfig::from_gguf(&model.gguf).map_err(invalid)?;
        let tensors = shard_tensors(&model.gguf, &config, layers, mtp).map_err(invalid)?;
        let ranges = model.missing(&tensors);
        if !ranges.is_empty() {
            return Ok(Err(LoadOutcome::Missing { need_header: false, ranges }));
        }
        Ok(Ok((model.path, model.gguf)))
    }

    fn load(&self, req: &pb::LoadShardRequest) -> Result<LoadOutcome, Status> {
        let spec = StageSpec {
            layers: req.layer_start as usize..req.layer_end as usize,
            ctx: req.ctx,
            max_batch: req.max_batch.max(1),
            max_seqs: req.max_seqs.max(1),
            kv_blocks: req.kv_blocks,
            kv_block_size: if req.kv_block_size == 0 { KvLayout::DEFAULT_BLOCK_SIZE } else { req.kv_block_size },
            checkpoints: req.checkpoints,
            draft_max: req.draft_max,
            mtp: req.mtp,
        };
        let (path, gguf) = match self.locate(&req.model_id, spec.layers.clone(), spec.mtp)? {
            Ok(found) => found,
            Err(missing) => return Ok(missing),
        };
        let refused =
            |e: String| Status::invalid_argument(format!("node `{}` cannot load {}: {e}", self.name(), path.display()));
        let config = ModelConfig::from_gguf(&gguf).map_err(|e| refused(e.to_string()))?;
        Stage::check_spec(&config, &spec, self.gpu.max_binding()).map_err(|e| refused(e.to_string()))?;
        // Free the old shard first: both may not fit at once.
        *self.lock() = None;
        let t0 = Instant::now();
        let stage = Stage::load(self.gpu.clone(), &gguf, spec).map_err(|e| refused(e.to_string()))?;
        let weight_bytes = stage.weight_bytes();
        let n_embd = stage.config().n_embd;
        tracing::info!(model = %path.display(), layers = ?stage.spec().layers, secs = t0.elapsed().as_secs_f64(), "shard loaded");
        *self.lock() = Some(Loaded { stage, n_embd });
        Ok(LoadOutcome::Loaded(weight_bytes))
    }

    /// Runs one activation through the stage: what goes back up now, or on downstream.
    fn run(&self, act: pb::Activation) -> Ran {
        let step = act.step;
        self.run_step(act).unwrap_or_else(|f| {
            tracing::warn!(step, error = %f.message, "step failed");
            Ran::Answer(failed_step(step, self.name(), f))
        })
    }

    fn run_step(&self, act: pb::Activation) -> Result<Ran, StepFailure> {
        use pb::StepErrorCode as Code;
        let mut guard = self.lock();
        let loaded = guard
            .as_mut()
            .ok_or_else(|| StepFailure::new(Code::NotOnStage, format!("node `{}` has no shard loaded", self.name())))?;
        let stage = &mut loaded.stage;
        if act.seqs.is_empty() {
            return Err(StepFailure::new(Code::InvalidArgument, "an activation without sequences"));
        }
        let rows: u64 = act.seqs.iter().map(|s| u64::from(s.rows)).sum();
        let format = pb::HiddenFormat::try_from(act.format)
            .map_err(|_| StepFailure::new(Code::InvalidArgument, format!("unknown hidden format {}", act.format)))?;
        let hidden = if stage.is_first() {
            None
        } else {
            let h = decode_hidden(&act.hidden, format, rows, loaded.n_embd)
                .map_err(|m| StepFailure::new(Code::InvalidArgument, m))?;
            Some(h)
        };
        let masks: Vec<Vec<u32>> = act.seqs.iter().map(mask_of).collect::<Result<_, _>>()?;
        let steps: Vec<SeqStep<'_>> = act
            .seqs
            .iter()
            .zip(&masks)
            .map(|(s, allowed)| SeqStep {
                history: &s.history,
                allowed,
                checkpoint: s.checkpoint,
                fork_from: (s.fork_from != 0).then_some(s.fork_from),
                verify: s.verify,
                keep: s.keep,
                draft: s.draft,
                ..SeqStep::new(s.seq_id, s.pos, s.rows, &s.token_ids, want_of(s))
            })
            .collect();
        let t0 = Instant::now();
        let span = tracing::debug_span!("step", step = act.step, seqs = steps.len(), rows);
        let out = span.in_scope(|| stage.step(&steps, hidden.as_deref()))?;
        let last = stage.is_last();
        drop(guard);
        {
            let mut s = lock(&self.stats);
            s.steps += 1;
            s.rows += rows;
            s.compute_seconds += t0.elapsed().as_secs_f64();
        }
        let node = self.name();
        let mut failed = act.failed;
        if last {
            let answers = act.seqs.iter().zip(out.seqs).zip(out.drafts).map(|((s, (_, r)), drafts)| match r {
                Ok(Produced::Token(t, lp)) => pb::SeqResult { drafts, ..token_result(s.seq_id, t, lp) },
                Ok(Produced::Logits(l)) => pb::SeqResult {
                    seq_id: s.seq_id,
                    logits: encode_hidden(&l, pb::HiddenFormat::F32),
                    ..Default::default()
                },
                Ok(Produced::Tokens(tokens)) => {
                    pb::SeqResult { seq_id: s.seq_id, tokens, drafts, ..Default::default() }
                }
                Ok(Produced::Ran) => pb::SeqResult { seq_id: s.seq_id, ..Default::default() },
                Err(e) => failed_seq(s.seq_id, node, e),
            });
            failed.extend(answers);
            return Ok(Ran::Answer(pb::StepResult { step: act.step, seqs: failed, ..Default::default() }));
        }
        let mut next = Vec::new();
        for (s, (_, r)) in act.seqs.into_iter().zip(out.seqs) {
            match r {
                // Token ids travel on only to a last stage whose MTP head follows them.
                Ok(_) if s.mtp => next.push(s),
                Ok(_) => next.push(pb::SeqRows { token_ids: Vec::new(), ..s }),
                Err(e) => failed.push(failed_seq(s.seq_id, node, e)),
            }
        }
        if next.is_empty() {
            return Ok(Ran::Answer(pb::StepResult { step: act.step, seqs: failed, ..Default::default() }));
        }
        let hidden = encode_hidden(&out.hidden, format);
        Ok(Ran::HandOn(pb::Activation { step: act.step, seqs: next, hidden, format: format as i32, failed }))
    }

    /// Runs one activation and says what goes back up for it now: its answer, or nothing
    /// when it was handed on (its answer comes from downstream).
    async fn answer(
        self: &Arc<Self>,
        act: pb::Activation,
        down: Option<&mpsc::Sender<pb::Activation>>,
    ) -> Option<pb::StepResult> {
        let step = act.step;
        let run = self.clone();
        let ran = match tokio::task::spawn_blocking(move || run.run(act)).await {
            Ok(ran) => ran,
            Err(e) => {
                let f = StepFailure::new(pb::StepErrorCode::Internal, format!("stage task failed: {e}"));
                Ran::Answer(failed_step(step, self.name(), f))
            }
        };
        match ran {
            Ran::Answer(r) => Some(r),
            Ran::HandOn(next) => self.hand_on(next, down).await.err().map(|f| failed_step(step, self.name(), f)),
        }
    }

    /// Sends a step's hidden rows to the next stage; its result comes back on the relay.
    async fn hand_on(
        &self,
        act: pb::Activation,
        down: Option<&mpsc::Sender<pb::Activation>>,
    ) -> Result<(), StepFailure> {
        let Some(tx) = down else {
            return Err(StepFailure::new(pb::StepErrorCode::Internal, "not the last stage, but it has no next stage"));
        };
        lock(&self.stats).pending.insert(act.step, Instant::now());
        tx.send(act)
            .await
            .map_err(|_| StepFailure::new(pb::StepErrorCode::Unavailable, "the next stage closed its stream"))
    }

    /// Opens this stage's `Forward` stream to the next stage and relays what comes back
    /// up to `out`; returns where to hand hidden states on.
    async fn open_downstream(
        self: &Arc<Self>,
        mut client: StageClient<Channel>,
        out: mpsc::Sender<Result<pb::StepResult, Status>>,
    ) -> Result<mpsc::Sender<pb::Activation>, Status> {
        let (tx, rx) = mpsc::channel::<pb::Activation>(1024);
        let mut results = client
            .forward(ReceiverStream::new(rx))
            .await
            .map_err(|s| Status::unavailable(format!("node `{}`: next stage: {}", self.name(), s.message())))?
            .into_inner();
        let relay = self.clone();
        tokio::spawn(async move {
            loop {
                match results.message().await {
                    Ok(Some(r)) => {
                        relay.note_result(&r);
                        if out.send(Ok(r)).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(s) => {
                        let msg = format!("node `{}`: next stage failed: {}", relay.name(), s.message());
                        let _ = out.send(Err(Status::unavailable(msg))).await;
                        break;
                    }
                }
            }
        });
        Ok(tx)
    }

    fn note_result(&self, r: &pb::StepResult) {
        let mut s = lock(&self.stats);
        if let Some(t0) = s.pending.remove(&r.step) {
            s.waited_steps += 1;
            s.downstream_wait_seconds += t0.elapsed().as_secs_f64();
        }
    }
}

/// The answer of a sequence that sampled a token.
fn token_result(seq_id: u64, token_id: u32, lp: Option<Logprobs>) -> pb::SeqResult {
    let lp = lp.unwrap_or(Logprobs { token: 0.0, top: Vec::new() });
    pb::SeqResult {
        seq_id,
        has_token: true,
        token_id,
        logprob: lp.token,
        top_ids: lp.top.iter().map(|e| e.0).collect(),
        top_logprobs: lp.top.iter().map(|e| e.1).collect(),
        ..Default::default()
    }
}

/// Reads one upstream `Forward` stream in order, answering each activation on `out`.
async fn serve_stream(
    inner: Arc<Inner>,
    mut incoming: Streaming<pb::Activation>,
    down: Option<mpsc::Sender<pb::Activation>>,
    out: mpsc::Sender<Result<pb::StepResult, Status>>,
) {
    let _open = StreamGuard::new(inner.clone());
    loop {
        let act = match incoming.message().await {
            Ok(Some(a)) => a,
            Ok(None) => break,
            Err(s) => {
                tracing::debug!(status = %s, "upstream closed the forward stream");
                break;
            }
        };
        if let Some(r) = inner.answer(act, down.as_ref()).await
            && out.send(Ok(r)).await.is_err()
        {
            break;
        }
    }
}

/// f32 or f16 little-endian bytes -> f32 values, checking the length.
pub fn decode_hidden(bytes: &[u8], format: pb::HiddenFormat, n_tokens: u64, n_embd: usize) -> Result<Vec<f32>, String> {
    let width = match format {
        pb::HiddenFormat::F32 => 4,
        pb::HiddenFormat::F16 => 2,
    };
    let want = u128::from(n_tokens) * n_embd as u128 * width;
    if bytes.len() as u128 != want {
        return Err(format!(
            "hidden payload of {} bytes, expected {want} ({n_tokens} tokens x {n_embd} values x {width} bytes, {format:?})",
            bytes.len()
        ));
    }
    Ok(match format {
        pb::HiddenFormat::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        pb::HiddenFormat::F16 => {
            bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
        }
    })
}

/// f32 values -> f32 or f16 little-endian bytes.
pub fn encode_hidden(values: &[f32], format: pb::HiddenFormat) -> Vec<u8> {
    match format {
        pb::HiddenFormat::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        pb::HiddenFormat::F16 => values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
    }
}

pub fn sampling_to_wire(p: &SamplingParams) -> pb::Sampling {
    pb::Sampling {
        temperature: p.temperature,
        top_k: p.top_k as u32,
        top_p: p.top_p,
        min_p: p.min_p,
        repeat_penalty: p.repeat_penalty,
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        seed: p.seed,
        repeat_last_n: p.repeat_last_n as u32,
    }
}

pub fn sampling_from_wire(s: &pb::Sampling) -> SamplingParams {
    SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k as usize,
        top_p: s.top_p,
        min_p: s.min_p,
        repeat_penalty: s.repeat_penalty,
        repeat_last_n: s.repeat_last_n as usize,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        seed: s.seed,
    }
}

/// A shard cache error as a status: a failed checksum is `DATA_LOSS` (the coordinator
/// sends the chunk again), a chunk that does not fit is the sender's mistake.
fn cache_status(node: &str, e: crate::Error) -> Status {
    match e {
        crate::Error::Corrupt(m) => Status::data_loss(format!("node `{node}`: {m}")),
        crate::Error::Transfer(m) => Status::invalid_argument(format!("node `{node}`: {m}")),
        e => Status::internal(format!("node `{node}`: shard cache: {e}")),
    }
}

fn internal(e: tokio::task::JoinError) -> Status {
    Status::internal(format!("stage task failed: {e}"))
}

type ResultStream = ReceiverStream<Result<pb::StepResult, Status>>;

#[tonic::async_trait]
impl pb::stage_server::Stage for StageService {
    async fn info(&self, _: Request<pb::InfoRequest>) -> Result<Response<pb::NodeInfo>, Status> {
        let id = &self.inner.config.identity;
        Ok(Response::new(pb::NodeInfo {
            node_id: id.node_id.clone(),
            name: id.name.clone(),
            protocol_version: strata_proto::PROTOCOL_VERSION,
            usable_memory: id.usable_memory,
            adapter: id.adapter.clone(),
            backend: id.backend.clone(),
            max_binding: self.inner.gpu.max_binding(),
            device_key: id.device_key.clone(),
            leaving: self.inner.leaving.load(Ordering::SeqCst),
            int8_dot: self.inner.gpu.int8_dot,
        }))
    }

    async fn load_shard(&self, req: Request<pb::LoadShardRequest>) -> Result<Response<pb::LoadShardResponse>, Status> {
        check_version(self.inner.name(), strata_proto::request_version(&req))?;
        let req = req.into_inner();
        let next = if req.next_stage.is_empty() {
            None
        } else {
            let client = strata_proto::transport::connect(&req.next_stage, &self.inner.config.security)
                .await
                .map_err(|e| Status::unavailable(format!("node `{}`: next stage: {e}", self.inner.name())))?;
            Some(client)
        };
        let inner = self.inner.clone();
        let outcome = tokio::task::spawn_blocking(move || inner.load(&req)).await.map_err(internal)??;
        Ok(Response::new(match outcome {
            LoadOutcome::Loaded(weight_bytes) => {
                *lock(&self.inner.next) = next;
                pb::LoadShardResponse { weight_bytes, ..Default::default() }
            }
            LoadOutcome::Missing { need_header, ranges } => pb::LoadShardResponse {
                weight_bytes: 0,
                need_header,
                missing: ranges
                    .into_iter()
                    .map(|r| pb::TensorRange { tensor: r.tensor, from: r.from, to: r.to })
                    .collect(),
            },
        }))
    }

    async fn push_tensors(
        &self,
        req: Request<Streaming<pb::TensorChunk>>,
    ) -> Result<Response<pb::TransferAck>, Status> {
        let name = self.inner.name().to_owned();
        let Some(cache) = &self.inner.cache else {
            return Err(Status::failed_precondition(format!(
                "node `{name}` has no shard cache: put the model in its --model-dir"
            )));
        };
        let _one_at_a_time = self.inner.push_lock.lock().await;
        let receiver = Arc::new(Mutex::new(cache.receiver()));
        let mut chunks = req.into_inner();
        let (t0, mut received) = (Instant::now(), 0u64);
        let outcome = loop {
            let chunk = match chunks.message().await {
                Ok(Some(c)) => c,
                Ok(None) => break Ok(()),
                Err(s) => {
                    break Err(Status::cancelled(format!(
                        "node `{name}`: the transfer broke after {received} bytes: {}",
                        s.message()
                    )));
                }
            };
            let r = receiver.clone();
            let n = chunk.data.len() as u64;
            let applied = tokio::task::spawn_blocking(move || {
                lock(&r).apply(&chunk.model_id, &chunk.tensor, chunk.offset, &chunk.data, chunk.checksum)
            })
            .await
            .map_err(internal)?;
            match applied {
                Ok(()) => received += n,
                Err(e) => break Err(cache_status(&name, e)),
            }
        };
        // Whatever was verified is recorded, however the stream ended: the next transfer
        // resumes after it.
        let r = receiver.clone();
        let recorded = tokio::task::spawn_blocking(move || lock(&r).finish()).await.map_err(internal)?;
        let secs = t0.elapsed().as_secs_f64();
        tracing::info!(bytes = received, secs, ok = outcome.is_ok(), "tensor transfer ended");
        outcome?;
        recorded.map_err(|e| cache_status(&name, e))?;
        Ok(Response::new(pb::TransferAck { bytes_received: received }))
    }

    type ForwardStream = ResultStream;

    async fn forward(&self, req: Request<Streaming<pb::Activation>>) -> Result<Response<ResultStream>, Status> {
        let (out_tx, out_rx) = mpsc::channel::<Result<pb::StepResult, Status>>(1024);
        let next = lock(&self.inner.next).clone();
        let down = match next {
            Some(client) => Some(self.inner.open_downstream(client, out_tx.clone()).await?),
            None => None,
        };
        tokio::spawn(serve_stream(self.inner.clone(), req.into_inner(), down, out_tx));
        Ok(Response::new(ReceiverStream::new(out_rx)))
    }

    async fn release(&self, req: Request<pb::ReleaseRequest>) -> Result<Response<pb::ReleaseResponse>, Status> {
        let seq = req.into_inner().seq_id;
        let inner = self.inner.clone();
        let released = tokio::task::spawn_blocking(move || inner.lock().as_mut().is_some_and(|l| l.stage.release(seq)))
            .await
            .map_err(internal)?;
        let next = lock(&self.inner.next).clone();
        if let Some(mut client) = next {
            match tokio::time::timeout(NEXT_RELEASE_WAIT, client.release(pb::ReleaseRequest { seq_id: seq })).await {
                Ok(Ok(_)) => {}
                Ok(Err(s)) => tracing::warn!(seq, status = %s, "the next stage did not release"),
                Err(_) => tracing::warn!(
                    seq,
                    waited_s = NEXT_RELEASE_WAIT.as_secs_f64(),
                    "the next stage did not answer a release; answering without it"
                ),
            }
        }
        Ok(Response::new(pb::ReleaseResponse { released }))
    }

    async fn health(&self, _: Request<pb::HealthRequest>) -> Result<Response<pb::HealthResponse>, Status> {
        let inner = self.inner.clone();
        let (loaded, sequences, weight_bytes, cache_bytes, pool) =
            tokio::task::spawn_blocking(move || match inner.lock().as_ref() {
                Some(l) => {
                    let s = &l.stage;
                    (true, s.sequences() as u32, s.weight_bytes(), s.cache_bytes(), s.pool())
                }
                None => (false, 0, 0, 0, Default::default()),
            })
            .await
            .map_err(internal)?;
        let s = lock(&self.inner.stats);
        Ok(Response::new(pb::HealthResponse {
            loaded,
            sequences,
            steps: s.steps,
            compute_seconds: s.compute_seconds,
            waited_steps: s.waited_steps,
            downstream_wait_seconds: s.downstream_wait_seconds,
            weight_bytes,
            cache_bytes,
            rows: s.rows,
            kv_block_size: pool.block_size,
            kv_blocks: pool.blocks,
            kv_blocks_used: pool.used_blocks,
            slots: pool.slots,
            slots_used: pool.used_slots,
        }))
    }
}
