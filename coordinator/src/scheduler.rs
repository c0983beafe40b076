//! One thread owns the engine and serves many sequences at once, by continuous batching.
//!
//! Every step is built from the active sequences that can move: all decode rows first
//! (each sequence's newest token), then prefill chunks up to the engine's row budget
//! (`--batch-tokens`), so that a long prompt never stalls the others' streams. Requests
//! join and leave between steps. Over a pipeline of N devices up to N steps (micro-batches,
//! each with its own sequences) are in flight, so that while stage k runs one, stage k+1
//! runs another: that is why [`Engine`] splits a step into `submit` and `next_result`.
//!
//! The KV pool the stages share is counted here as they fill it (a sequence holds the
//! blocks of the positions it has sent): a request waits in the queue until its prompt
//! fits; one that never could fails at once, naming the numbers. A running sequence that
//! needs a block when none is free takes it from the youngest idle sequence, which is
//! released and later recomputed from its tokens (exactly: sampling draws by position), so
//! its client sees only a pause.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strata_model::config::{LayerKind, ModelConfig};
use strata_model::grammar::Constraint;
use strata_model::sampling::SamplingParams;
use strata_model::tokenizer::{TextStream, Tokenizer};
use strata_node::stage::SeqId;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::blocks::BlockLedger;
use crate::engine::{Engine, EngineStats, ErrorCode, KvCapacity, Sampled, SeqStep, StepError};
use crate::speculative::{self, Drafting, Speculation};

/// What a request asks to generate. The prompt is already tokenised and fits the context.
#[derive(Debug, Clone)]
pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    /// At most this many tokens (fewer if the context ends first).
    pub max_tokens: u32,
    /// Generation ends before any of these strings; none of one is ever emitted.
    pub stop: Vec<String>,
    /// Report each generated token's log-probability and this many top alternatives'.
    pub logprobs: Option<u32>,
    /// Keep going past end-of-generation tokens (benchmarks).
    pub ignore_eos: bool,
    /// A grammar the answer must follow (structured output, forced tool calls): each token
    /// is sampled from what it allows, on the last stage, for this sequence alone.
    pub constraint: Option<Constraint>,
    /// At most this many draft tokens per step for this request (llama-server's
    /// `speculative.n_max`; 0: none), within the server's `--draft-max`; `None`: that.
    pub draft_max: Option<u32>,
}

/// One generated token's log-probability (natural log), for the API's `logprobs`.
#[derive(Debug, Clone)]
pub struct TokenLogprob {
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
    /// The most likely tokens at that position, most likely first.
    pub top: Vec<(String, Vec<u8>, f32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` or the end of the context.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Finished {
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// The generated token ids (end-of-generation tokens excluded).
    pub generated_ids: Vec<u32>,
    /// The stop string the answer ended on, if it ended on one.
    pub stop_string: Option<String>,
    /// Prompt tokens whose caches came from an earlier sequence (not computed again).
    pub cached_tokens: usize,
    /// From submission to the first generated token.
    pub time_to_first_token: Duration,
    pub elapsed: Duration,
}

/// What a request's receiver gets: text deltas, then exactly one `Done` or `Failed`.
#[derive(Debug, Clone)]
pub enum Event {
    Text(String),
    /// A generated token's log-probabilities (sent before its text, when asked for).
    Logprob(TokenLogprob),
    Done(Finished),
    Failed(StepError),
}

/// Counters and gauges the scheduler publishes after every iteration.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub active: usize,
    /// Active sequences past their first token.
    pub decoding: usize,
    pub queued: usize,
    pub engine: EngineStats,
    pub prompt_tokens_total: u64,
    pub generated_tokens_total: u64,
    /// The KV pool, as the scheduler counts it: blocks held by sequences, and all of them.
    pub kv: Option<(KvCapacity, u32)>,
    /// Each stage's busy fraction (time computing / wall time) over the last few seconds.
    pub busy: Vec<f64>,
    /// Sequences preempted (their KV blocks taken for others, recomputed later) so far.
    pub preemptions: u64,
    /// Requests that waited in the queue for KV pool room beside running sequences.
    pub pool_waits: u64,
    /// Requests that reused cached positions (resuming a finished sequence, or forking a
    /// running one), and the prompt tokens that were therefore not computed again.
    pub prefix_hits: u64,
    pub prefix_cached_tokens: u64,
    /// Of those requests, the ones that forked a running sequence.
    pub prefix_forks: u64,
    /// Finished sequences kept for reuse now, and the KV blocks they hold.
    pub retained: usize,
    pub retained_blocks: u32,
    /// Grammar masks computed so far (one per constrained token), and the seconds they
    /// took on the scheduler's thread.
    pub grammar_masks: u64,
    pub grammar_seconds: f64,
    /// Steps submitted so far, and their rows.
    pub steps_total: u64,
    pub rows_total: u64,
    /// Steps the scheduler keeps in flight (the engine's micro-batches).
    pub micro_batches: usize,
    /// Why the engine can no longer run steps (a pipeline that lost a node and whose
    /// survivors cannot hold the model): every request fails at once with it until the
    /// server is restarted.
    pub broken: Option<String>,
    /// Why the engine is being re-planned now (requests wait meanwhile).
    pub recovering: Option<String>,
    /// Re-plans done so far, and the last one.
    pub recoveries: u64,
    pub last_recovery: Option<RecoveryReport>,
    /// Speculative decoding: what drafts (`mtp` or `lookup`; none when off), and the
    /// draft tokens proposed and accepted so far.
    pub drafter: Option<&'static str>,
    pub draft_tokens: u64,
    pub accepted_draft_tokens: u64,
    /// Decode trips (one sequence's decode part of a step) and the tokens they yielded:
    /// their ratio is the tokens per trip through the pipeline.
    pub decode_trips: u64,
    pub decode_tokens: u64,
}

/// One re-plan after a node was lost or left.
#[derive(Debug, Clone)]
pub struct RecoveryReport {
    /// What set it off.
    pub cause: String,
    /// Nodes left out, and the new plan's nodes.
    pub left_out: Vec<String>,
    pub nodes: Vec<String>,
    /// The re-plan itself (probing, planning, loading the shards).
    pub replan_seconds: f64,
    /// Sequences recomputed from their tokens on the new plan.
    pub sequences: usize,
    /// Seconds since the Unix epoch, when it finished.
    pub at_unix: f64,
}

#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Sequences generating at once; more requests wait in a queue.
    pub max_seqs: usize,
    /// Requests that may wait beyond the `max_seqs` running ones; `None`: no bound (the
    /// CLI's own runs, which submit a known number).
    pub max_waiting: Option<usize>,
    /// Whether finished sequences' caches are kept for prompts that begin with their tokens.
    pub prefix_reuse: PrefixReuse,
    /// Speculative decoding, for the requests that allow it (no penalties, logprobs or
    /// grammar); `None`: off.
    pub speculation: Option<Speculation>,
}

/// Whether, and how far, a finished sequence's caches serve a later prompt that begins
/// with its tokens (an agent's next turn, a chat's history sent again).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PrefixReuse {
    /// Every sequence is released when it finishes.
    #[default]
    Off,
    /// Every layer is attention: any common prefix is reused, the stages dropping the
    /// positions after it when the new prompt's first step arrives.
    AnyPrefix,
    /// Some layers carry a recurrent state, which cannot be cut back: a prompt resumes a
    /// sequence when it begins with all of its tokens or, on an engine that keeps
    /// checkpoints ([`Engine::checkpoints`]), with the tokens up to its checkpoint.
    WholeSequence,
}

/// Where a request asks the recurrent stages for a checkpoint of its state: this many
/// positions before its prompt's end. A chat's next turn sends the same history again
/// but rewrites the template's generation prompt (`<|im_start|>assistant\n<think>\n`, a
/// few tokens) as the finished assistant message, so the common prefix ends just short
/// of the earlier prompt's end; the tokens after the checkpoint are computed again.
const CHECKPOINT_BEFORE_END: usize = 8;

impl PrefixReuse {
    /// The prompt tokens a sequence whose stages hold `held` (and its recurrent state's
    /// checkpoint at `checkpoint`) can give `prompt`: their common prefix, or with
    /// recurrent layers all of `held` (when `live`, the sequence's state being still
    /// there, not moving on) or the prefix up to its checkpoint. At least one prompt token
    /// is left to compute, since the last one's row samples.
    fn covered(self, held: &[u32], checkpoint: Option<usize>, live: bool, prompt: &[u32]) -> usize {
        let common = held.iter().zip(prompt).take_while(|(a, b)| a == b).count();
        let n = common.min(prompt.len().saturating_sub(1));
        match self {
            PrefixReuse::Off => 0,
            PrefixReuse::AnyPrefix => n,
            PrefixReuse::WholeSequence if live && n == held.len() => n,
            PrefixReuse::WholeSequence => checkpoint.filter(|&c| c <= n).unwrap_or(0),
        }
    }

    /// What `config`'s layers allow.
    pub fn for_model(config: &ModelConfig) -> PrefixReuse {
        if config.layers.contains(&LayerKind::DeltaNet) { PrefixReuse::WholeSequence } else { PrefixReuse::AnyPrefix }
    }
}

/// How long a finished sequence's caches are kept for reuse: well under a node's default
/// idle timeout (600 s), after which the node would free them itself.
const RETAIN_FOR: Duration = Duration::from_secs(300);

/// A finished sequence the stages still hold, for a later prompt that begins with its
/// tokens.
struct Retained {
    seq: SeqId,
    /// The tokens at the positions the stages hold.
    tokens: Vec<u32>,
    /// The position of its recurrent state's checkpoint on the stages, if any.
    checkpoint: Option<usize>,
    since: Instant,
}

/// Why [`Scheduler::submit`] would not take a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// As many requests as it runs and queues are already held.
    QueueFull { held: usize, limit: usize },
    /// The scheduler thread has ended.
    Stopped,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::QueueFull { held, limit } => write!(
                f,
                "the server is at capacity: {held} requests are running or queued (limit {limit}: --max-seqs plus --max-queue); retry shortly"
            ),
            Refused::Stopped => f.write_str("the scheduler has stopped"),
        }
    }
}

impl std::error::Error for Refused {}

struct Job {
    id: u64,
    request: GenRequest,
    events: UnboundedSender<Event>,
    submitted: Instant,
    /// It has waited at the head of the queue for KV pool room (counted once).
    waited_for_pool: bool,
    _held: Held,
}

/// One request counted against the bound on requests held; dropping its job (finished,
/// failed or cancelled, wherever it was) uncounts it.
struct Held(Arc<AtomicUsize>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Shared {
    snapshot: Mutex<Snapshot>,
    /// Tokens generated per iteration, for tokens/s over the last few seconds.
    recent: Mutex<VecDeque<(Instant, u32)>>,
}

/// How often an idle scheduler refreshes its snapshot.
const IDLE_REFRESH: Duration = Duration::from_millis(500);

/// How far back tokens/s looks.
const RATE_WINDOW: Duration = Duration::from_secs(5);

/// A handle on the scheduler thread; cheap to clone. The thread ends when every handle
/// is dropped and its last request is done.
#[derive(Clone)]
pub struct Scheduler {
    jobs: std::sync::mpsc::Sender<Job>,
    shared: Arc<Shared>,
    next_id: Arc<AtomicU64>,
    ctx: u32,
    /// Requests submitted and not yet dropped, and how many may be.
    held: Arc<AtomicUsize>,
    max_held: Option<usize>,
}

impl Scheduler {
    pub fn spawn(
        engine: Box<dyn Engine>,
        tokenizer: Arc<Tokenizer>,
        config: SchedulerConfig,
    ) -> anyhow::Result<Scheduler> {
        let (jobs, rx) = std::sync::mpsc::channel();
        let snapshot = Snapshot {
            engine: engine.stats(),
            kv: engine.kv_capacity().map(|kv| (kv, 0)),
            micro_batches: engine.micro_batches().max(1),
            ..Snapshot::default()
        };
        let shared = Arc::new(Shared { snapshot: Mutex::new(snapshot), recent: Mutex::new(VecDeque::new()) });
        let ctx = engine.ctx();
        let s = shared.clone();
        std::thread::Builder::new().name("scheduler".into()).spawn(move || {
            let mut engine = engine;
            let kv = engine.kv_capacity();
            let checkpoints = config.prefix_reuse == PrefixReuse::WholeSequence && engine.checkpoints();
            let max_seqs = config.max_seqs.clamp(1, engine.max_seqs().max(1) as usize);
            // No more drafts than the stages were loaded to verify.
            let speculation = config
                .speculation
                .map(|s| Speculation {
                    draft_max: s.draft_max.min(engine.draft_max()),
                    mtp: s.mtp && engine.mtp(),
                    ..s
                })
                .filter(|s| s.draft_max > 0);
            Loop {
                engine: &mut *engine,
                tok: &tokenizer,
                jobs: rx,
                shared: s,
                max_seqs,
                kv,
                totals: (0, 0),
                waiting: VecDeque::new(),
                resumed: VecDeque::new(),
                active: Vec::new(),
                in_flight: VecDeque::new(),
                next_seq: 1,
                admissions: 0,
                preemptions: 0,
                pool_waits: 0,
                reuse: config.prefix_reuse,
                checkpoints,
                ledger: BlockLedger::new(kv.map_or(16, |kv| kv.block_size)),
                retained: VecDeque::new(),
                prefix: (0, 0),
                forks: 0,
                grammar: (0, 0.0),
                steps: (0, 0),
                busy_samples: VecDeque::new(),
                broken: None,
                recoveries: 0,
                last_recovery: None,
                speculation,
                spec: SpecTally::default(),
            }
            .run()
        })?;
        Ok(Scheduler {
            jobs,
            shared,
            next_id: Arc::new(AtomicU64::new(1)),
            ctx,
            held: Arc::new(AtomicUsize::new(0)),
            max_held: config.max_waiting.map(|w| w + config.max_seqs),
        })
    }

    pub fn ctx(&self) -> u32 {
        self.ctx
    }

    /// Queues a request; its events arrive on the returned receiver. Dropping the
    /// receiver cancels the request and frees its sequence.
    /// Refused when as many requests as `max_seqs + max_waiting` are held already.
    pub fn submit(&self, request: GenRequest) -> Result<(u64, UnboundedReceiver<Event>), Refused> {
        let before = self.held.fetch_add(1, Ordering::AcqRel);
        let held = Held(self.held.clone());
        if let Some(limit) = self.max_held
            && before >= limit
        {
            return Err(Refused::QueueFull { held: before, limit });
        }
        let (events, rx) = unbounded_channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.jobs
            .send(Job { id, request, events, submitted: Instant::now(), waited_for_pool: false, _held: held })
            .map_err(|_| Refused::Stopped)?;
        Ok((id, rx))
    }

    /// Requests submitted and not yet finished or dropped: running and queued.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    pub fn snapshot(&self) -> Snapshot {
        self.shared.snapshot.lock().expect("snapshot lock").clone()
    }

    /// Generated tokens per second over the last few seconds, all sequences together.
    pub fn tokens_per_second(&self) -> f64 {
        let mut recent = self.shared.recent.lock().expect("rate lock");
        let now = Instant::now();
        while recent.front().is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW) {
            recent.pop_front();
        }
        let n: u32 = recent.iter().map(|(_, n)| n).sum();
        n as f64 / RATE_WINDOW.as_secs_f64()
    }
}

/// One admitted request: its sequence and where it stands.
struct Active<'t> {
    job: Job,
    seq: SeqId,
    span: tracing::Span,
    /// When it was admitted (first or again): the youngest is preempted first.
    admitted: u64,
    /// The prompt, then each generated token (end-of-generation tokens excluded).
    tokens: Vec<u32>,
    /// Positions sent to the engine: the stages hold (or will hold) `0..sent`.
    sent: usize,
    /// Prompt tokens taken from a finished sequence's caches.
    cached: usize,
    /// Positions the stages hold beyond `sent` until its next step drops them (a reused
    /// sequence whose tokens part from the prompt): counted against the pool till then.
    stale: usize,
    /// The position the recurrent stages hold a checkpoint of its state at (valid for
    /// `tokens[..c]`), and the one its prompt asks for (see [`CHECKPOINT_BEFORE_END`]).
    checkpoint: Option<usize>,
    checkpoint_at: Option<usize>,
    /// Its first step starts it as a fork of this sequence (sharing the blocks of their
    /// common prefix): taken when that step is submitted.
    fork_from: Option<SeqId>,
    /// Tokens the last stage counts for penalties, in the sequence's current life there.
    noted: usize,
    /// Its steps in flight, and whether one of them is to sample its next token.
    in_flight: u32,
    awaiting: bool,
    stream: TextStream<'t>,
    stop: StopMatcher,
    generated: usize,
    first_token: Option<Instant>,
    /// When it last had a step submitted (decode rows go oldest first).
    last_sent: Instant,
    finish: Option<FinishReason>,
    failed: Option<StepError>,
    /// Its speculation, when the scheduler speculates and the request allows it.
    drafting: Option<Drafting>,
    /// Its recurrent state went back to the rollback state at `sent` after rejected
    /// drafts: its next decode step feeds the tokens from there again.
    replay: bool,
}

impl Active<'_> {
    fn done(&self) -> bool {
        self.finish.is_some() || self.failed.is_some() || self.job.events.is_closed()
    }

    /// Its newest token waits to be fed, and nothing of it is in flight: a decode row.
    fn decode_ready(&self) -> bool {
        !self.done() && self.in_flight == 0 && (self.sent + 1 == self.tokens.len() || self.replay)
    }

    /// Everything the stages were to do again from `sent` is done afresh (a preemption, a
    /// re-plan): no drafts in flight, nothing to replay.
    /// The drafts its step in flight (or being built) carries.
    fn drafts(&self) -> &[u32] {
        self.drafting.as_ref().and_then(|d| d.pending.as_ref()).map_or(&[], |(d, _)| &d[..])
    }

    fn forget_drafts(&mut self) {
        self.replay = false;
        if let Some(d) = self.drafting.as_mut() {
            d.pending = None;
            d.mtp.clear();
        }
    }

    /// More than one token waits to be fed: prefill chunks (the prompt, or all its tokens
    /// again after a preemption); earlier chunks may still be in flight.
    fn prefill_ready(&self) -> bool {
        !self.done() && !self.awaiting && !self.replay && self.sent + 1 < self.tokens.len()
    }
}

struct Loop<'a> {
    engine: &'a mut dyn Engine,
    tok: &'a Tokenizer,
    jobs: std::sync::mpsc::Receiver<Job>,
    shared: Arc<Shared>,
    max_seqs: usize,
    /// The KV pool the stages share, if any.
    kv: Option<KvCapacity>,
    /// Prompt and generated tokens, all requests.
    totals: (u64, u64),
    waiting: VecDeque<Job>,
    /// Preempted sequences, to be admitted again before new requests.
    resumed: VecDeque<Active<'a>>,
    active: Vec<Active<'a>>,
    /// Steps in flight, oldest first, with their sequences.
    in_flight: VecDeque<(u64, Vec<SeqId>)>,
    next_seq: SeqId,
    admissions: u64,
    preemptions: u64,
    /// Requests held in the queue for KV pool room (see [`Snapshot::pool_waits`]).
    pool_waits: u64,
    reuse: PrefixReuse,
    /// The recurrent stages keep a checkpoint per sequence (and reuse wants them).
    checkpoints: bool,
    /// The stages' blocks, as they hand them out (see [`BlockLedger`]).
    ledger: BlockLedger,
    /// Finished sequences kept for reuse, oldest first.
    retained: VecDeque<Retained>,
    /// Requests that reused a prefix, and the prompt tokens they did not compute.
    prefix: (u64, u64),
    /// Requests that forked a running sequence.
    forks: u64,
    /// Grammar masks computed, and the seconds they took.
    grammar: (u64, f64),
    steps: (u64, u64),
    /// (when, each stage's busy seconds): for busy fractions over the last few seconds.
    busy_samples: VecDeque<(Instant, Vec<f64>)>,
    /// Set when the engine failed as a whole (see `Snapshot::broken`).
    broken: Option<StepError>,
    recoveries: u64,
    last_recovery: Option<RecoveryReport>,
    speculation: Option<Speculation>,
    spec: SpecTally,
}

/// Speculative decoding's counters (see [`Snapshot::draft_tokens`]).
#[derive(Debug, Default)]
struct SpecTally {
    drafted: u64,
    accepted: u64,
    trips: u64,
    tokens: u64,
}

/// How far back busy fractions look.
const BUSY_WINDOW: Duration = Duration::from_secs(5);

impl<'a> Loop<'a> {
    fn run(mut self) {
        loop {
            if !self.intake() {
                return;
            }
            if let Some(replan) = self.engine.replan_wanted() {
                let idle = self.active.is_empty() && self.resumed.is_empty() && self.in_flight.is_empty();
                match (replan.when_idle, self.broken.is_some(), self.in_flight.is_empty()) {
                    // A node back: worth moving everything only when nothing runs (a
                    // broken engine runs nothing, and may run again with it).
                    (true, _, _) if idle => self.recover(replan.why),
                    (true, _, _) | (false, true, _) => {}
                    (false, false, true) => self.recover(replan.why),
                    (false, false, false) => {
                        // A node is leaving (or lost): no new steps; what is in flight
                        // comes back (or fails) first.
                        self.collect();
                        self.finish_done();
                        self.publish();
                        continue;
                    }
                }
            }
            self.admit_waiting();
            self.release_cancelled();
            let target = self.engine.micro_batches().max(1);
            while self.in_flight.len() < target {
                if !self.submit_step(target - self.in_flight.len()) {
                    break;
                }
            }
            if !self.in_flight.is_empty() {
                self.collect();
            }
            self.finish_done();
            self.publish();
        }
    }

    /// Takes new jobs, waiting for one when there is nothing to do; false once every
    /// handle is gone and nothing is left.
    fn intake(&mut self) -> bool {
        if self.active.is_empty() && self.waiting.is_empty() && self.resumed.is_empty() {
            // Idle: wake now and then to refresh the snapshot (a pipeline's nodes free
            // sequences on their own, and their counters move).
            match self.jobs.recv_timeout(IDLE_REFRESH) {
                Ok(job) => self.waiting.push_back(job),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return false,
            }
        }
        while let Ok(job) = self.jobs.try_recv() {
            self.waiting.push_back(job);
        }
        // A request that can never run fails now, not after waiting its turn; so does
        // every request once the engine is broken.
        let (ctx, kv, broken) = (self.engine.ctx(), self.kv, self.broken.clone());
        self.waiting.retain(|j| match broken.clone().map_or_else(|| check(&j.request, ctx, kv), Err) {
            Ok(()) => !j.events.is_closed(),
            Err(e) => {
                let _ = j.events.send(Event::Failed(e));
                false
            }
        });
        self.resumed.retain(|a| !a.job.events.is_closed());
        true
    }

    /// Blocks the sequences hold now.
    fn held_blocks(&self) -> u32 {
        if self.kv.is_none() { 0 } else { self.ledger.used() }
    }

    /// Blocks the retained sequences alone hold (those they share with running ones are
    /// the running ones').
    fn retained_blocks(&self) -> u32 {
        // Published every step: the walk over the blocks only when both kinds are held.
        if self.kv.is_none() || self.retained.is_empty() {
            return 0;
        }
        if self.active.is_empty() {
            return self.ledger.used();
        }
        self.ledger.held_only_by(|seq| self.retained.iter().any(|r| r.seq == seq))
    }

    /// Frees `seq`'s caches on every stage.
    fn release(&mut self, seq: SeqId) {
        self.unfork(seq);
        self.ledger.release(seq);
        if let Err(e) = self.engine.release(seq) {
            tracing::warn!("releasing sequence {seq}: {e:#}");
        }
    }

    /// Requests about to fork `seq` (their first step not yet sent) compute their prompt
    /// from the start instead: `seq` is going away, or starting over.
    fn unfork(&mut self, seq: SeqId) {
        for a in self.active.iter_mut().filter(|a| a.fork_from == Some(seq)) {
            self.prefix.1 = self.prefix.1.saturating_sub(a.cached as u64);
            (a.sent, a.noted, a.cached, a.fork_from) = (0, 0, 0, None);
        }
    }

    /// Whether a request waits to fork `seq`: then `seq`'s positions must stay as they are.
    fn fork_source(&self, seq: SeqId) -> bool {
        self.active.iter().any(|a| a.fork_from == Some(seq))
    }

    /// Releases the oldest retained sequence (other than `keep`, and than one a request
    /// waits to fork); false when there is none.
    fn evict_retained(&mut self, keep: Option<SeqId>) -> bool {
        let Some(i) = self.retained.iter().position(|r| Some(r.seq) != keep && !self.fork_source(r.seq)) else {
            return false;
        };
        let r = self.retained.remove(i).expect("found above");
        tracing::debug!(seq = r.seq, tokens = r.tokens.len(), "prefix cache: evicted");
        self.release(r.seq);
        true
    }

    /// Releases retained sequences older than [`RETAIN_FOR`].
    fn evict_stale(&mut self) {
        while self.retained.front().is_some_and(|r| r.since.elapsed() > RETAIN_FOR) {
            self.evict_retained(None);
        }
    }

    /// The retained sequence `request` can resume, and the prompt tokens it covers: the
    /// longest common prefix (when its state cannot be cut back: all of its tokens, or
    /// those up to its checkpoint), leaving at least one prompt token to compute, since
    /// the last one's row samples.
    /// Requests with repetition penalties start afresh: the last stage counts their
    /// penalties from the sequence's own history.
    fn reusable(&self, request: &GenRequest) -> Option<(SeqId, usize)> {
        if self.reuse == PrefixReuse::Off || request.sampling.has_penalties() {
            return None;
        }
        let prompt = &request.prompt;
        self.retained
            .iter()
            // A sequence a request waits to fork keeps its positions till then.
            .filter(|r| !self.fork_source(r.seq))
            .filter_map(|r| {
                let n = self.reuse.covered(&r.tokens, r.checkpoint, true, prompt);
                (n > 0).then_some((r.seq, n))
            })
            .max_by_key(|&(_, n)| n)
    }

    /// A running sequence `request` can start as a fork of (sharing the blocks of their
    /// common prefix, copying the one it writes), and the prompt tokens they share: any
    /// prefix of the tokens sent on attention-only models, the prefix up to its checkpoint
    /// with recurrent layers (its live state moves on). Worth it from a block's length.
    fn forkable(&self, request: &GenRequest) -> Option<(SeqId, usize)> {
        if self.reuse == PrefixReuse::Off || request.sampling.has_penalties() {
            return None;
        }
        let least = self.kv.map_or(16, |kv| kv.block_size as usize);
        let prompt = &request.prompt;
        self.active
            .iter()
            .filter(|a| a.failed.is_none() && a.fork_from.is_none())
            .filter_map(|a| {
                let n = self.reuse.covered(&a.tokens[..a.sent], a.checkpoint, false, prompt);
                (n >= least).then_some((a.seq, n))
            })
            .max_by_key(|&(_, n)| n)
    }

    fn free_blocks(&self) -> u32 {
        self.kv.map_or(u32::MAX, |kv| kv.blocks.saturating_sub(self.held_blocks()))
    }

    /// The most positions a sequence may reach: the context, or the pool if smaller.
    fn limit(&self) -> usize {
        let ctx = self.engine.ctx() as usize;
        self.kv.map_or(ctx, |kv| ctx.min(kv.positions() as usize))
    }

    /// Admits preempted sequences, then queued requests, while there are slots and their
    /// tokens fit the pool (keeping a block free per running sequence, for its growth).
    fn admit_waiting(&mut self) {
        self.evict_stale();
        while self.active.len() < self.max_seqs {
            // A finished sequence to take over, or a running one to fork (the longer
            // prefix; taking over when they tie, which copies nothing).
            let (need, reuse, fork) = match (self.resumed.front(), self.waiting.front()) {
                (Some(a), _) => (a.tokens.len() + 1, None, None),
                (None, Some(j)) => {
                    let reuse = self.reusable(&j.request);
                    let fork = self.forkable(&j.request).filter(|f| reuse.is_none_or(|r| f.1 > r.1));
                    (j.request.prompt.len() + 1, reuse.filter(|_| fork.is_none()), fork)
                }
                (None, None) => return,
            };
            let keep = reuse.map(|r| r.0);
            // The stages' slots hold running and retained sequences alike.
            let slots = self.engine.max_seqs().max(1) as usize;
            while reuse.is_none() && self.active.len() + self.retained.len() >= slots && self.evict_retained(keep) {}
            if let Some(kv) = self.kv {
                let reserve = self.active.len() as u32;
                let need = match (reuse, fork) {
                    (Some((seq, n)), _) => self.ledger.need(seq, n, need),
                    (_, Some((_, n))) => self.ledger.fork_need(n, need),
                    _ => kv.blocks_for(need as u32),
                } + reserve;
                while need > self.free_blocks() && self.evict_retained(keep) {}
                if need > self.free_blocks() && !self.active.is_empty() {
                    // A new request held back by the pool (not by the slots): counted once.
                    if self.resumed.is_empty()
                        && let Some(j) = self.waiting.front_mut()
                        && !j.waited_for_pool
                    {
                        j.waited_for_pool = true;
                        self.pool_waits += 1;
                    }
                    return;
                }
            }
            if let Some(mut a) = self.resumed.pop_front() {
                a.admitted = self.admissions;
                self.admissions += 1;
                a.span.in_scope(|| tracing::info!(tokens = a.tokens.len(), "resumed after a preemption"));
                self.active.push(a);
                continue;
            }
            let job = self.waiting.pop_front().expect("checked above");
            let a = match reuse {
                None if fork.is_some() => {
                    let (src, n) = fork.expect("checked above");
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    let mut a = self.admit(job, seq);
                    (a.sent, a.noted, a.cached, a.fork_from) = (n, n, n, Some(src));
                    a.checkpoint_at = a.checkpoint_at.filter(|&c| c > n);
                    self.prefix.0 += 1;
                    self.prefix.1 += n as u64;
                    self.forks += 1;
                    a.span
                        .in_scope(|| tracing::info!(cached_tokens = n, "prefix cache: forked running sequence {src}"));
                    a
                }
                Some((seq, n)) => {
                    let i = self.retained.iter().position(|r| r.seq == seq).expect("retained");
                    let r = self.retained.remove(i).expect("found above");
                    let mut a = self.admit(job, seq);
                    (a.sent, a.noted, a.cached, a.stale) = (n, n, n, r.tokens.len());
                    // A checkpoint at or before where it resumes still holds its tokens.
                    a.checkpoint = r.checkpoint.filter(|&c| c <= n);
                    a.checkpoint_at = a.checkpoint_at.filter(|&c| c > n);
                    self.prefix.0 += 1;
                    self.prefix.1 += n as u64;
                    a.span.in_scope(|| tracing::info!(cached_tokens = n, "prefix cache: resumed sequence {seq}"));
                    a
                }
                None => {
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    self.admit(job, seq)
                }
            };
            self.active.push(a);
        }
    }

    /// Starts a request (checked on arrival) as sequence `seq`.
    fn admit(&mut self, job: Job, seq: SeqId) -> Active<'a> {
        let span = tracing::info_span!("request", id = job.id, seq);
        span.in_scope(|| {
            tracing::debug!(prompt_tokens = job.request.prompt.len(), max_tokens = job.request.max_tokens, "admitted")
        });
        self.totals.0 += job.request.prompt.len() as u64;
        let stop = StopMatcher::new(job.request.stop.clone());
        let admitted = self.admissions;
        self.admissions += 1;
        // A prefix shorter than that is not worth a checkpoint.
        let checkpoint_at =
            job.request.prompt.len().checked_sub(CHECKPOINT_BEFORE_END).filter(|&c| c >= CHECKPOINT_BEFORE_END);
        // The last stage verifies drafts only where each row's sample is all there is to
        // it: no penalties (they would count the drafts), logprobs or grammar.
        let r = &job.request;
        let drafting = self
            .speculation
            .filter(|_| !r.sampling.has_penalties() && r.logprobs.is_none() && r.constraint.is_none())
            .map(|s| r.draft_max.map_or(s.draft_max, |n| n.min(s.draft_max)))
            .filter(|&n| n > 0)
            .map(Drafting::new);
        Active {
            drafting,
            replay: false,
            fork_from: None,
            checkpoint: None,
            checkpoint_at: checkpoint_at.filter(|_| self.checkpoints),
            tokens: job.request.prompt.clone(),
            job,
            seq,
            span,
            admitted,
            sent: 0,
            cached: 0,
            stale: 0,
            noted: 0,
            in_flight: 0,
            awaiting: false,
            stream: self.tok.stream(),
            stop,
            generated: 0,
            first_token: None,
            last_sent: Instant::now(),
            finish: None,
            failed: None,
        }
    }

    /// Frees the sequences of requests whose receiver is gone (a client that disconnected,
    /// a Ctrl-C), once none of their steps is in flight.
    fn release_cancelled(&mut self) {
        let (gone, keep): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.active).into_iter().partition(|a| a.job.events.is_closed() && a.in_flight == 0);
        self.active = keep;
        for a in gone {
            a.span.in_scope(|| tracing::info!(completion_tokens = a.generated, "request cancelled"));
            self.release(a.seq);
        }
    }

    /// Makes room for sequence `i` to reach `end` positions: true if the pool has (or now
    /// has, after preempting younger idle sequences) the blocks. Preempts `i` itself when
    /// it is the youngest idle one (it resumes once others finish).
    fn make_room(&mut self, i: usize, end: usize) -> bool {
        if self.kv.is_none() {
            return true;
        }
        loop {
            let a = &self.active[i];
            let need = if a.fork_from.is_some() {
                self.ledger.fork_need(a.sent, end)
            } else {
                self.ledger.need(a.seq, a.sent, end)
            };
            if need <= self.free_blocks() {
                return true;
            }
            // Finished sequences kept for reuse go before running ones.
            if self.evict_retained(None) {
                continue;
            }
            let victim = self
                .active
                .iter()
                .enumerate()
                .filter(|(_, a)| a.in_flight == 0 && a.sent > 0 && !a.done())
                .max_by_key(|(_, a)| a.admitted)
                .map(|(j, _)| j);
            match victim {
                Some(j) if j != i || self.active.len() > 1 => {
                    self.preempt(j);
                    if j == i {
                        return false;
                    }
                }
                _ => return false,
            }
        }
    }

    /// Frees sequence `j`'s caches on every stage and queues it to be computed again from
    /// its tokens.
    fn preempt(&mut self, j: usize) {
        let mut a = self.active.remove(j);
        a.span.in_scope(|| tracing::info!(tokens = a.tokens.len(), "preempted: its KV blocks are needed"));
        self.release(a.seq);
        a.fork_from = None;
        a.sent = 0;
        a.noted = 0;
        a.stale = 0;
        a.checkpoint = None;
        a.forget_drafts();
        self.preemptions += 1;
        self.resumed.push_back(a);
    }

    /// Builds one step from the sequences that can move (decode rows first, a fair share
    /// of them when `slots` steps are yet to be filled, then prefill chunks up to the row
    /// budget) and submits it; false when nothing can move.
    fn submit_step(&mut self, slots: usize) -> bool {
        let budget = self.engine.max_batch().max(1) as usize;
        let max_seqs = self.engine.max_seqs().max(1) as usize;
        // (index into active, rows) of the step.
        let mut picks: Vec<(usize, usize)> = Vec::new();
        let mut rows = 0;
        let mut decode: Vec<usize> = (0..self.active.len()).filter(|&i| self.active[i].decode_ready()).collect();
        decode.sort_by_key(|&i| self.active[i].last_sent);
        let share = decode.len().div_ceil(slots.max(1));
        for i in decode.into_iter().take(share) {
            if rows >= budget || picks.len() >= max_seqs {
                break;
            }
            // Its newest token, or after rejected drafts on recurrent stages, the tokens
            // from its rollback state on.
            let n = (self.active[i].tokens.len() - self.active[i].sent).min(budget - rows);
            let Some(i) = self.room_for(i, n) else { continue };
            let drafts = self.drafts_for(i, n, rows, budget);
            rows += n + drafts.len();
            let at = self.active[i].tokens.len();
            if let Some(d) = self.active[i].drafting.as_mut() {
                d.pending = (!drafts.is_empty()).then_some((drafts, at));
                d.mtp.clear();
            }
            picks.push((i, n));
        }
        let mut prefill: Vec<usize> = (0..self.active.len()).filter(|&i| self.active[i].prefill_ready()).collect();
        prefill.sort_by_key(|&i| self.active[i].admitted);
        for i in prefill {
            if rows >= budget || picks.len() >= max_seqs {
                break;
            }
            if picks.iter().any(|p| p.0 == i) {
                continue;
            }
            let a = &self.active[i];
            let mut n = (a.tokens.len() - a.sent).min(budget - rows);
            // A chunk ends where the checkpoint is to be taken.
            if let Some(c) = a.checkpoint_at.filter(|&c| c > a.sent && c < a.sent + n) {
                n = c - a.sent;
            }
            let Some(i) = self.room_for(i, n) else { continue };
            picks.push((i, n));
            rows += n;
        }
        // Preemptions may have moved sequences: pick by sequence id from here on.
        let picks: Vec<(SeqId, usize)> = picks.into_iter().map(|(i, n)| (self.active[i].seq, n)).collect();
        if picks.is_empty() {
            return false;
        }
        self.submit(&picks);
        true
    }

    /// Prompt lookup's drafts for decode-ready sequence `i`, whose step carries `n` rows
    /// after `rows` of others: as many as it tries now, within the row budget, its
    /// context, what it may still generate and the free KV blocks (drafts never preempt
    /// anyone); none once the step is large enough to keep the stages busy.
    fn drafts_for(&self, i: usize, n: usize, rows: usize, budget: usize) -> Vec<u32> {
        let a = &self.active[i];
        let Some(d) = &a.drafting else { return Vec::new() };
        if rows + n >= speculative::BACK_OFF_ROWS || a.sent + n != a.tokens.len() {
            return Vec::new();
        }
        let left = (a.job.request.max_tokens as usize).saturating_sub(a.generated + 1);
        let room = self.limit().saturating_sub(a.tokens.len() + 1);
        let k = (d.len as usize).min(budget - rows - n).min(left).min(room);
        let mut drafts = if self.speculation.is_some_and(|s| s.mtp) {
            d.mtp.iter().copied().take(k).collect()
        } else {
            speculative::lookup(&a.tokens, k)
        };
        if self.kv.is_some() {
            while !drafts.is_empty()
                && self.ledger.need(a.seq, a.sent, a.tokens.len() + drafts.len()) > self.free_blocks()
            {
                drafts.pop();
            }
        }
        drafts
    }

    /// The MTP drafts sequence `seq`, whose step carries `n` rows of its tokens and `rows`
    /// in all (its drafts after them), asks the last stage for: its draft length when the
    /// step samples and it speculates with the MTP head, within the context and the free
    /// KV blocks (the draft rows take positions after the step's).
    fn mtp_drafts_for(&self, seq: SeqId, n: usize, rows: usize) -> usize {
        if !self.speculation.is_some_and(|s| s.mtp) {
            return 0;
        }
        let Some(a) = self.active.iter().find(|a| a.seq == seq) else { return 0 };
        let Some(d) = a.drafting.as_ref().filter(|_| a.sent + n == a.tokens.len()) else { return 0 };
        let end = a.sent + rows;
        let mut k = (d.len as usize).min(self.engine.ctx() as usize - end.min(self.engine.ctx() as usize));
        if self.kv.is_some() {
            while k > 0 && self.ledger.need(seq, a.sent, end + k) > self.free_blocks() {
                k -= 1;
            }
        }
        k
    }

    /// Room for `n` more rows of active sequence `i`: its index after any preemption, or
    /// `None` when it must wait (or was preempted itself).
    fn room_for(&mut self, i: usize, n: usize) -> Option<usize> {
        let seq = self.active[i].seq;
        let end = self.active[i].sent + n;
        if !self.make_room(i, end) {
            return None;
        }
        self.active.iter().position(|a| a.seq == seq)
    }

    /// Submits a step of `picks` (sequence, rows) and moves each sequence past its rows.
    fn submit(&mut self, picks: &[(SeqId, usize)]) {
        // The grammar masks of the rows that sample, first: computing one moves nothing,
        // and a grammar that fails ends its request instead of running it unconstrained.
        let mut masks: Vec<Vec<u32>> = Vec::with_capacity(picks.len());
        let mut kept: Vec<(SeqId, usize)> = Vec::with_capacity(picks.len());
        for &(seq, n) in picks {
            let a = self.active.iter_mut().find(|a| a.seq == seq).expect("picked from active");
            let samples = a.sent + n == a.tokens.len();
            let mask = match a.job.request.constraint.as_mut() {
                Some(c) if samples => match timed(&mut self.grammar, || c.allowed()) {
                    Ok(mask) => mask,
                    Err(e) => {
                        let e = StepError::new(ErrorCode::Internal, format!("the request's grammar failed: {e}"));
                        a.failed.get_or_insert(e);
                        continue;
                    }
                },
                _ => Vec::new(),
            };
            masks.push(mask);
            kept.push((seq, n));
        }
        let picks = &kept[..];
        if picks.is_empty() {
            return;
        }
        // Each part's ids: its tokens, then any drafts.
        let ids: Vec<Vec<u32>> = picks
            .iter()
            .map(|&(seq, n)| {
                let a = self.active.iter().find(|a| a.seq == seq).expect("picked from active");
                let mut ids = a.tokens[a.sent..a.sent + n].to_vec();
                ids.extend(a.drafts());
                ids
            })
            .collect();
        // MTP drafts each sampling part asks the last stage for, for its next step.
        let mtp_drafts: Vec<usize> =
            picks.iter().zip(&ids).map(|(&(seq, n), ids)| self.mtp_drafts_for(seq, n, ids.len())).collect();
        let mut parts = Vec::new();
        for (((&(seq, n), mask), ids), &draft) in picks.iter().zip(&masks).zip(&ids).zip(&mtp_drafts) {
            let a = self.active.iter().find(|a| a.seq == seq).expect("picked from active");
            let end = a.sent + n;
            let verify = a.drafts().len() as u32;
            let sampling = &a.job.request.sampling;
            let history = if sampling.has_penalties() { &a.tokens[a.sent.max(a.noted).min(end)..end] } else { &[] };
            parts.push(SeqStep {
                seq,
                ids,
                pos: a.sent as u32,
                sampling,
                history,
                want_token: end == a.tokens.len(),
                logprobs: a.job.request.logprobs,
                allowed: mask,
                checkpoint: a.checkpoint_at == Some(end),
                fork_from: a.fork_from,
                verify,
                // On recurrent stages, the state after the sure rows, for a rejection.
                keep: if verify > 0 { n as u32 } else { 0 },
                draft: draft as u32,
            });
        }
        let result = self.engine.submit(&parts);
        let n_rows: usize = ids.iter().map(Vec::len).sum();
        drop(parts);
        match result {
            Ok(step) => {
                self.steps.0 += 1;
                self.steps.1 += n_rows as u64;
                let now = Instant::now();
                for (&(seq, n), &mtp) in picks.iter().zip(&mtp_drafts) {
                    let a = self.active.iter_mut().find(|a| a.seq == seq).expect("picked from active");
                    // The stages take the step's blocks as the ledger does (the last
                    // stage's MTP draft rows too).
                    if let Some(src) = a.fork_from.take() {
                        self.ledger.fork(src, seq, a.sent);
                    }
                    let drafts = a.drafts().len();
                    self.ledger.step(seq, a.sent, a.sent + n + drafts + mtp);
                    a.replay = false;
                    a.sent += n;
                    a.stale = 0;
                    if a.checkpoint_at == Some(a.sent) {
                        a.checkpoint = a.checkpoint_at;
                    }
                    a.noted = a.noted.max(a.sent);
                    a.in_flight += 1;
                    a.awaiting |= a.sent == a.tokens.len();
                    a.last_sent = now;
                }
                self.in_flight.push_back((step, picks.iter().map(|p| p.0).collect()));
            }
            Err(e) => {
                let e = StepError::new(ErrorCode::Internal, format!("{e:#}"));
                for &(seq, _) in picks {
                    if let Some(a) = self.active.iter_mut().find(|a| a.seq == seq) {
                        a.failed.get_or_insert_with(|| e.clone());
                        a.forget_drafts();
                    }
                }
            }
        }
    }

    /// Waits for the oldest step in flight and takes each sequence's outcome.
    fn collect(&mut self) {
        let done = match self.engine.next_result() {
            Ok(done) => done,
            Err(e) => {
                // The result stream is gone: every step in flight is lost. Re-plan on
                // what is left and recompute every sequence from its tokens.
                tracing::error!("engine failed: {e:#}");
                self.recover(format!("{e:#}"));
                return;
            }
        };
        self.in_flight.retain(|(step, _)| *step != done.step);
        let mut generated = 0u32;
        for (seq, outcome) in done.outcomes {
            let Some(i) = self.active.iter().position(|a| a.seq == seq) else {
                tracing::warn!("a result for sequence {seq}, which is not active");
                continue;
            };
            let a = &mut self.active[i];
            a.in_flight = a.in_flight.saturating_sub(1);
            match outcome {
                Ok(Some(sampled)) => {
                    a.awaiting = false;
                    let before = a.generated;
                    self.accept_verified(i, sampled);
                    let a = &self.active[i];
                    // An end-of-generation token counts as generated, though not kept.
                    generated += (a.generated - before).max(1) as u32;
                }
                Ok(None) => {}
                Err(e) if e.code == ErrorCode::OutOfOrder && a.cached > 0 && a.first_token.is_none() => {
                    // The stages no longer hold the reused sequence (a node freed it when
                    // idle): compute the prompt from the start instead.
                    a.span.in_scope(|| tracing::warn!("prefix cache: the stages lost the sequence ({e}); recomputing"));
                    a.awaiting = false;
                    self.prefix.1 = self.prefix.1.saturating_sub(a.cached as u64);
                    (a.sent, a.noted, a.cached, a.stale) = (0, 0, 0, 0);
                    a.checkpoint = None;
                    a.fork_from = None;
                    a.forget_drafts();
                    // Started afresh: whatever the stages held of it is rewritten, and
                    // no request forks what it held.
                    self.ledger.release(seq);
                    self.unfork(seq);
                }
                Err(e) => {
                    a.awaiting = false;
                    a.forget_drafts();
                    a.failed.get_or_insert(e);
                }
            }
        }
        if generated > 0 {
            self.totals.1 += u64::from(generated);
            self.shared.recent.lock().expect("rate lock").push_back((Instant::now(), generated));
        }
    }

    /// Re-plans the engine after `cause` (a lost or leaving node). On success every live
    /// sequence is computed again from its tokens (as after a preemption: the sampler
    /// draws by position, so the tokens it yields are the ones it would have), and no
    /// client sees more than a pause. When the engine cannot go on, every request fails
    /// with a clear error and the engine is marked broken.
    fn recover(&mut self, cause: String) {
        tracing::warn!("re-planning: {cause}");
        self.shared.snapshot.lock().expect("snapshot lock").recovering = Some(cause.clone());
        let recovered = self.engine.recover();
        self.in_flight.clear();
        // The stages' sequences are gone with the old plan.
        self.retained.clear();
        self.ledger.clear();
        for a in self.active.iter_mut() {
            a.in_flight = 0;
            a.awaiting = false;
            a.sent = 0;
            a.noted = 0;
            a.stale = 0;
            a.checkpoint = None;
            a.fork_from = None;
            a.forget_drafts();
        }
        match recovered {
            Ok(r) => {
                if self.broken.take().is_some() {
                    tracing::warn!("the engine runs again: requests are served");
                }
                self.kv = self.engine.kv_capacity();
                self.busy_samples.clear();
                self.recoveries += 1;
                let sequences = self.active.iter().filter(|a| !a.done()).count() + self.resumed.len();
                tracing::warn!(
                    secs = r.seconds,
                    sequences,
                    "re-planned on {} (left out: {}); recomputing the live sequences",
                    r.nodes.join(", "),
                    if r.why.is_empty() { "none".to_owned() } else { r.why.join("; ") }
                );
                let at_unix =
                    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
                self.last_recovery = Some(RecoveryReport {
                    cause,
                    left_out: r.left_out,
                    nodes: r.nodes,
                    replan_seconds: r.seconds,
                    sequences,
                    at_unix,
                });
            }
            Err(e) => {
                tracing::error!("cannot go on after `{cause}`: {e:#}");
                let e = StepError::new(
                    ErrorCode::Unavailable,
                    format!(
                        "the pipeline lost a node ({cause}) and cannot go on: {e:#}; \
                         restart `strata serve` once there is room for the model"
                    ),
                );
                // Published before any client hears of it, so that `/health` already says
                // `degraded` to a client that checks after its stream failed.
                self.shared.snapshot.lock().expect("snapshot lock").broken = Some(e.message.clone());
                for a in &mut self.active {
                    a.failed.get_or_insert_with(|| e.clone());
                }
                // Preempted sequences would only wait for an engine that runs no more.
                for a in self.resumed.drain(..) {
                    let _ = a.job.events.send(Event::Failed(e.clone()));
                }
                self.broken = Some(e);
            }
        }
        self.shared.snapshot.lock().expect("snapshot lock").recovering = None;
    }

    /// Takes what a step sampled for active sequence `i`: its token, or with drafts in
    /// flight, the samples up to and including the first that differs from its draft
    /// (each draft so far kept), then sets where the stages' valid positions end.
    fn accept_verified(&mut self, i: usize, sampled: Sampled) {
        let decoding = self.active[i].first_token.is_some();
        let before = self.active[i].tokens.len();
        let pending = self.active[i].drafting.as_mut().and_then(|d| d.pending.take());
        let mtp = sampled.drafts.clone();
        let Some((drafts, at)) = pending else {
            self.accept(i, Sampled { after: Vec::new(), drafts: Vec::new(), ..sampled });
            if let Some(d) = self.active[i].drafting.as_mut() {
                d.mtp = mtp;
            }
            return self.tally_trip(decoding, 1);
        };
        let samples: Vec<u32> = std::iter::once(sampled.token).chain(sampled.after).collect();
        let kept = speculative::accepted(&drafts, &samples);
        for &token in samples.iter().take(kept + 1) {
            self.accept(i, Sampled::token(token));
            if self.active[i].done() {
                break;
            }
        }
        let recurrent = self.speculation.is_some_and(|s| s.recurrent);
        let a = &mut self.active[i];
        // Draft rows the stages computed with the tokens that stand (a finished request
        // may have stopped before taking them all).
        let valid = kept.min(a.tokens.len() - before);
        a.sent = if valid == drafts.len() || !recurrent {
            at + valid
        } else {
            // The recurrent state goes back to the rollback state after the sure rows:
            // the next step feeds the kept drafts again.
            a.replay = a.tokens.len() > at + 1;
            at
        };
        a.noted = a.noted.max(a.sent);
        if let Some(d) = a.drafting.as_mut() {
            let max = d.max;
            d.adapt(drafts.len(), kept, max);
            // The MTP drafts follow the last sample: of use only when it was kept.
            d.mtp = if kept == drafts.len() { mtp } else { Vec::new() };
        }
        self.spec.drafted += drafts.len() as u64;
        self.spec.accepted += kept as u64;
        let produced = (self.active[i].tokens.len() - before).max(1);
        self.tally_trip(decoding, produced);
    }

    /// Counts a decode trip and the tokens it yielded (an end-of-generation token counts
    /// as one); a prompt's first token is not a decode trip's.
    fn tally_trip(&mut self, decoding: bool, tokens: usize) {
        if decoding {
            self.spec.trips += 1;
            self.spec.tokens += tokens as u64;
        }
    }

    /// Takes one sampled token of active sequence `i`: stream its text (holding back what
    /// may start a stop string) and decide whether the request is done.
    fn accept(&mut self, i: usize, sampled: Sampled) {
        let limit = self.limit();
        let a = &mut self.active[i];
        let token = sampled.token;
        a.first_token.get_or_insert_with(Instant::now);
        if let Some(c) = a.job.request.constraint.as_mut()
            && let Err(e) = c.advance(token)
        {
            let e = StepError::new(ErrorCode::Internal, format!("token {token} left the request's grammar: {e}"));
            a.failed.get_or_insert(e);
            return;
        }
        if self.tok.is_end_of_generation(token) && !a.job.request.ignore_eos {
            a.finish = Some(FinishReason::Stop);
            return;
        }
        a.generated += 1;
        a.tokens.push(token);
        // The last stage counted the token it sampled.
        a.noted = a.tokens.len();
        if let Some(lp) = sampled.logprobs {
            let entry = |id: u32| {
                let bytes = self.tok.token_bytes(id).to_vec();
                (String::from_utf8_lossy(&bytes).into_owned(), bytes)
            };
            let (text, bytes) = entry(token);
            let top = lp
                .top
                .iter()
                .map(|&(id, l)| {
                    let (t, b) = entry(id);
                    (t, b, l)
                })
                .collect();
            let _ = a.job.events.send(Event::Logprob(TokenLogprob { token: text, bytes, logprob: lp.token, top }));
        }
        let piece = a.stream.push(token);
        let (text, stopped) = a.stop.push(&piece);
        if !text.is_empty() {
            let _ = a.job.events.send(Event::Text(text));
        }
        if stopped {
            a.finish = Some(FinishReason::Stop);
        } else if a.generated >= a.job.request.max_tokens as usize || a.tokens.len() >= limit {
            a.finish = Some(FinishReason::Length);
        }
    }

    /// Releases and finishes the requests that are done and have nothing in flight.
    fn finish_done(&mut self) {
        let (done, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.active)
            .into_iter()
            .partition(|a| (a.finish.is_some() || a.failed.is_some()) && a.in_flight == 0);
        self.active = keep;
        if done.is_empty() {
            return;
        }
        let mut answers = Vec::with_capacity(done.len());
        for a in done {
            if self.reuse != PrefixReuse::Off && a.failed.is_none() && a.sent > 0 {
                // Kept for a later prompt that begins with its tokens, till its room or
                // slot is wanted.
                self.retained.push_back(Retained {
                    seq: a.seq,
                    tokens: a.tokens[..a.sent].to_vec(),
                    checkpoint: a.checkpoint,
                    since: Instant::now(),
                });
            } else {
                self.release(a.seq);
            }
            answers.push(a);
        }
        // Published before the answers go out, so that `/metrics` read after a response
        // already counts what that response freed or left cached.
        self.publish();
        answers.into_iter().for_each(finish);
    }

    fn publish(&mut self) {
        let engine = self.engine.stats();
        let now = Instant::now();
        let busy_now: Vec<f64> = engine.stages.iter().map(|s| s.busy_seconds).collect();
        self.busy_samples.push_back((now, busy_now.clone()));
        while self.busy_samples.len() > 2 && now.duration_since(self.busy_samples[0].0) > BUSY_WINDOW {
            self.busy_samples.pop_front();
        }
        let (t0, b0) = &self.busy_samples[0];
        let wall = now.duration_since(*t0).as_secs_f64();
        let busy = busy_now
            .iter()
            .zip(b0.iter().chain(std::iter::repeat(&0.0)))
            .map(|(b, a)| if wall > 0.0 { ((b - a) / wall).clamp(0.0, 1.0) } else { 0.0 })
            .collect();
        let kv = self.kv.map(|kv| (kv, self.held_blocks()));
        let mut s = self.shared.snapshot.lock().expect("snapshot lock");
        *s = Snapshot {
            active: self.active.len(),
            decoding: self.active.iter().filter(|a| a.first_token.is_some()).count(),
            queued: self.waiting.len() + self.resumed.len(),
            engine,
            prompt_tokens_total: self.totals.0,
            generated_tokens_total: self.totals.1,
            kv,
            busy,
            preemptions: self.preemptions,
            pool_waits: self.pool_waits,
            prefix_hits: self.prefix.0,
            prefix_forks: self.forks,
            prefix_cached_tokens: self.prefix.1,
            retained: self.retained.len(),
            retained_blocks: self.retained_blocks(),
            grammar_masks: self.grammar.0,
            grammar_seconds: self.grammar.1,
            steps_total: self.steps.0,
            rows_total: self.steps.1,
            micro_batches: self.engine.micro_batches().max(1),
            broken: self.broken.as_ref().map(|e| e.message.clone()),
            recovering: None,
            recoveries: self.recoveries,
            last_recovery: self.last_recovery.clone(),
            drafter: self.speculation.map(|s| s.drafter()),
            draft_tokens: self.spec.drafted,
            accepted_draft_tokens: self.spec.accepted,
            decode_trips: self.spec.trips,
            decode_tokens: self.spec.tokens,
        };
    }
}

/// Runs `f`, counting it and its seconds into `tally`.
fn timed<T>(tally: &mut (u64, f64), f: impl FnOnce() -> T) -> T {
    let t0 = Instant::now();
    let out = f();
    tally.0 += 1;
    tally.1 += t0.elapsed().as_secs_f64();
    out
}

/// The request fits: a non-empty prompt with room for at least one generated token, in
/// the context and in the KV pool.
fn check(r: &GenRequest, ctx: u32, kv: Option<KvCapacity>) -> Result<(), StepError> {
    let invalid = |m: String| Err(StepError::new(ErrorCode::InvalidArgument, m));
    if r.prompt.is_empty() {
        return invalid("the prompt is empty: it has no tokens".into());
    }
    if r.prompt.len() >= ctx as usize {
        return invalid(format!("the prompt has {} tokens, but the context length is {ctx}", r.prompt.len()));
    }
    if r.max_tokens == 0 {
        return invalid("max_tokens must be at least 1".into());
    }
    if let Some(kv) = kv
        && r.prompt.len() as u64 + 1 > kv.positions()
    {
        return invalid(format!(
            "the prompt has {} tokens, but the KV pool holds only {} positions ({} blocks of {}), all sequences together; \
             raise --kv-pool or give the nodes more memory",
            r.prompt.len(),
            kv.positions(),
            kv.blocks,
            kv.block_size
        ));
    }
    Ok(())
}

/// Sends a finished request's last text and its `Done` (or `Failed`), and logs it.
fn finish(a: Active<'_>) {
    let now = Instant::now();
    if let Some(e) = a.failed {
        a.span.in_scope(|| tracing::warn!("request failed: {e}"));
        let _ = a.job.events.send(Event::Failed(e));
        return;
    }
    let reason = a.finish.expect("finished requests have a reason");
    let mut stop = a.stop;
    // A stop string that never completed was not a stop string: its text is output.
    let rest = stop.push(&a.stream.finish()).0;
    let tail = if stop.stopped { rest } else { rest + &stop.flush() };
    if !tail.is_empty() {
        let _ = a.job.events.send(Event::Text(tail));
    }
    let ttft = a.first_token.unwrap_or(now).duration_since(a.job.submitted);
    let elapsed = now.duration_since(a.job.submitted);
    let decode = elapsed.saturating_sub(ttft).as_secs_f64();
    a.span.in_scope(|| {
        tracing::info!(
            prompt_tokens = a.job.request.prompt.len(),
            completion_tokens = a.generated,
            finish_reason = reason.as_str(),
            ttft_ms = ttft.as_millis() as u64,
            total_ms = elapsed.as_millis() as u64,
            decode_tokens_per_s = if decode > 0.0 { (a.generated.saturating_sub(1)) as f64 / decode } else { 0.0 },
            "request finished"
        )
    });
    let _ = a.job.events.send(Event::Done(Finished {
        reason,
        prompt_tokens: a.job.request.prompt.len(),
        completion_tokens: a.generated,
        generated_ids: a.tokens[a.job.request.prompt.len()..].to_vec(),
        stop_string: stop.matched.take(),
        cached_tokens: a.cached,
        time_to_first_token: ttft,
        elapsed,
    }));
}

/// Finds stop strings in streamed text. Text that could be the start of a stop string
/// is held back until it is resolved, so no part of a stop string is ever emitted.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
    stopped: bool,
    /// The stop string that was reached.
    matched: Option<String>,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
            stopped: false,
            matched: None,
        }
    }

    /// Adds text; returns what may be emitted now and whether a stop string was reached
    /// (everything from it on is dropped).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        self.pending.push_str(text);
        let first =
            self.stops.iter().filter_map(|s| Some((self.pending.find(s.as_str())?, s))).min_by_key(|(at, _)| *at);
        if let Some((at, matched)) = first {
            self.stopped = true;
            self.matched = Some(matched.clone());
            let out = self.pending[..at].to_owned();
            self.pending.clear();
            return (out, true);
        }
        // The earliest suffix of `pending` that is a prefix of some stop string.
        let hold = self
            .pending
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| self.stops.iter().any(|s| s.starts_with(&self.pending[i..])))
            .unwrap_or(self.pending.len());
        let out = self.pending[..hold].to_owned();
        self.pending.drain(..hold);
        (out, false)
    }

    /// Whatever is held back (at the end of generation).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::{Logged, Scripted};

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool, String) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        let mut stopped = false;
        for p in pieces {
            let (t, s) = m.push(p);
            out.push(t);
            stopped |= s;
        }
        (out, stopped, m.flush())
    }

    /// Stops, pieces, emitted per push, stopped, left over.
    type StopCase = (&'static [&'static str], &'static [&'static str], &'static [&'static str], bool, &'static str);

    #[test]
    fn stop_strings_are_never_emitted_even_in_part() {
        let cases: &[StopCase] = &[
            (&[], &["a", "b"], &["a", "b"], false, ""),
            (&["END"], &["hello E", "N", "D more"], &["hello ", "", ""], true, ""),
            (&["END"], &["hello E", "N", "x"], &["hello ", "", "ENx"], false, ""),
            (&["END"], &["abc EN"], &["abc "], false, "EN"),
            (&["abab"], &["xaba", "b"], &["x", ""], true, ""),
            (&["\n\n", "Q:"], &["one\n", "two", "\n", "\nQ"], &["one", "\ntwo", "", ""], true, ""),
            (&["é!"], &["caféé", "!"], &["café", ""], true, ""),
            (&["stop"], &["nonstop"], &["non"], true, ""),
        ];
        for (stops, pieces, want, want_stopped, rest) in cases {
            let (got, stopped, left) = run(stops, pieces);
            assert_eq!(got, *want, "stops {stops:?}, pieces {pieces:?}");
            assert_eq!(stopped, *want_stopped, "stops {stops:?}, pieces {pieces:?}");
            assert_eq!(left, *rest, "stops {stops:?}, pieces {pieces:?}");
        }
    }

    /// The stop string reported is the one whose match begins first.
    #[test]
    fn the_stop_string_reached_first_is_named() {
        let mut m = StopMatcher::new(vec!["b".into(), "abc".into()]);
        assert_eq!(m.push("xabc"), ("x".to_owned(), true));
        assert_eq!(m.matched.as_deref(), Some("abc"));
        let mut m = StopMatcher::new(vec!["b".into(), "abc".into()]);
        assert_eq!(m.push("no stop"), ("no stop".to_owned(), false));
        assert_eq!(m.matched, None);
    }

    /// An engine answering an ordinary token that depends on the position it is sampled
    /// at (so a recomputed sequence answers as before), slowly enough that a request
    /// submitted right after another joins it mid-way.
    fn slow_engine() -> Scripted {
        Scripted::new(|step| {
            std::thread::sleep(Duration::from_millis(5));
            Ok(step.want_token.then_some(Sampled::token(300 + step.pos + step.ids.len() as u32)))
        })
    }

    /// The log as lines: `step:seq:len@pos` per part of a step, `release seq`.
    fn lines(log: &Mutex<Vec<Logged>>) -> Vec<String> {
        let log = log.lock().unwrap();
        log.iter()
            .map(|l| {
                if l.release {
                    format!("release {}", l.seq)
                } else {
                    format!("{}:{}:{}@{}", l.step, l.seq, l.len, l.pos)
                }
            })
            .collect()
    }

    /// The parts of `seq`'s steps as `len@pos`.
    fn parts_of(log: &Mutex<Vec<Logged>>, seq: SeqId) -> Vec<String> {
        let log = log.lock().unwrap();
        log.iter().filter(|l| l.seq == seq && !l.release).map(|l| format!("{}@{}", l.len, l.pos)).collect()
    }

    fn collect(rx: &mut UnboundedReceiver<Event>) -> (String, Option<Finished>) {
        let mut text = String::new();
        while let Some(e) = rx.blocking_recv() {
            match e {
                Event::Text(t) => text.push_str(&t),
                Event::Logprob(_) => {}
                Event::Done(f) => return (text, Some(f)),
                Event::Failed(e) => panic!("failed: {e}"),
            }
        }
        (text, None)
    }

    /// The error a request ends with (panics if it succeeds).
    fn failure(rx: &mut UnboundedReceiver<Event>) -> StepError {
        while let Some(e) = rx.blocking_recv() {
            match e {
                Event::Failed(e) => return e,
                Event::Done(f) => panic!("expected a failure, got {f:?}"),
                _ => {}
            }
        }
        panic!("the request ended without an event")
    }

    /// The text of `request` run alone on [`slow_engine`].
    fn alone(request: GenRequest) -> String {
        let sched = Scheduler::spawn(
            Box::new(slow_engine()),
            tokenizer(),
            SchedulerConfig { max_seqs: 4, max_waiting: None, prefix_reuse: PrefixReuse::Off, speculation: None },
        )
        .unwrap();
        let (_, mut rx) = sched.submit(request).unwrap();
        collect(&mut rx).0
    }

    /// Runs two equal requests at once on `engine`, checks each answers as alone, and
    /// returns the scheduler.
    fn two_like_alone(engine: Scripted) -> Scheduler {
        let solo = alone(req(5, 12));
        let sched = Scheduler::spawn(
            Box::new(engine),
            tokenizer(),
            SchedulerConfig { max_seqs: 4, max_waiting: None, prefix_reuse: PrefixReuse::Off, speculation: None },
        )
        .unwrap();
        let (_, mut a) = sched.submit(req(5, 12)).unwrap();
        let (_, mut b) = sched.submit(req(5, 12)).unwrap();
        let (ta, tb) = (collect(&mut a), collect(&mut b));
        assert_eq!((ta.0.as_str(), tb.0.as_str()), (solo.as_str(), solo.as_str()));
        sched
    }

    fn tokenizer() -> Arc<Tokenizer> {
        let gguf =
            strata_model::gguf::Gguf::open(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny-qwen3.gguf"))
                .unwrap();
        Arc::new(Tokenizer::from_gguf(&gguf).unwrap())
    }

    fn req(n: usize, max_tokens: u32) -> GenRequest {
        GenRequest {
            prompt: (0..n as u32).map(|i| 100 + i).collect(),
            sampling: SamplingParams::greedy(),
            max_tokens,
            stop: Vec::new(),
            logprobs: None,
            ignore_eos: false,
            constraint: None,
            draft_max: None,
        }
    }

    /// A prompt that begins with a finished sequence's tokens resumes that sequence where
    /// they part (all of them, with recurrent layers); penalties, or nothing in common,
    /// start afresh; a retained sequence gives up its slot when a new one needs it.
    #[test]
    fn a_prompt_that_extends_a_finished_sequence_resumes_its_caches() {
        for reuse in [PrefixReuse::AnyPrefix, PrefixReuse::WholeSequence] {
            let engine = slow_engine();
            let log = engine.log.clone();
            let config = SchedulerConfig { max_seqs: 4, max_waiting: None, prefix_reuse: reuse, speculation: None };
            let sched = Scheduler::spawn(Box::new(engine), tokenizer(), config).unwrap();
            let run = |r: GenRequest| {
                let (_, mut rx) = sched.submit(r).unwrap();
                collect(&mut rx)
            };
            // The first turn: 6 prompt tokens and 4 generated; the stages hold 9 positions.
            let (_, first) = run(req(6, 4));
            let first = first.unwrap();
            assert_eq!(first.cached_tokens, 0);
            let mut held: Vec<u32> = (100..106).collect();
            held.extend(&first.generated_ids[..3]);
            // The next turn sends all of it again, and more: only the rest is computed.
            let mut next = req(0, 2);
            next.prompt = held.iter().copied().chain([7, 8, 9]).collect();
            let (text, done) = run(next.clone());
            let done = done.unwrap();
            assert_eq!(done.cached_tokens, 9, "{reuse:?}");
            let parts = parts_of(&log, 1);
            assert!(parts.contains(&"3@9".to_owned()), "{reuse:?}: {:?}", lines(&log));
            assert_eq!(parts.iter().filter(|p| p.ends_with("@0")).count(), 1, "{reuse:?}: {:?}", lines(&log));
            // As computed afresh.
            assert_eq!(text, alone(next.clone()));
            // A prompt that parts from the held tokens early: resumed where they part only
            // without recurrent layers.
            let mut early = req(0, 2);
            early.prompt = held[..4].iter().copied().chain([1, 2, 3]).collect();
            let (_, done) = run(early);
            let expected = if reuse == PrefixReuse::AnyPrefix { 4 } else { 0 };
            assert_eq!(done.unwrap().cached_tokens, expected, "{reuse:?}: {:?}", lines(&log));
            // Penalties are counted from the sequence's own history: no reuse.
            let mut penalised = next.clone();
            penalised.sampling.repeat_penalty = 1.1;
            assert_eq!(run(penalised).1.unwrap().cached_tokens, 0);
            // Every sequence finished is retained, and stays below the stages' slots.
            let snap = sched.snapshot();
            assert!(snap.retained >= 1 && snap.retained <= 8, "{snap:?}");
            assert!(snap.prefix_hits >= 1 && snap.prefix_cached_tokens >= 9, "{snap:?}");
        }
        // Off: nothing is kept.
        let engine = slow_engine();
        let log = engine.log.clone();
        let config =
            SchedulerConfig { max_seqs: 4, max_waiting: None, prefix_reuse: PrefixReuse::Off, speculation: None };
        let sched = Scheduler::spawn(Box::new(engine), tokenizer(), config).unwrap();
        let (_, mut rx) = sched.submit(req(6, 4)).unwrap();
        collect(&mut rx);
        assert!(lines(&log).contains(&"release 1".to_owned()));
        assert_eq!(sched.snapshot().retained, 0);
    }

    /// On an engine that keeps checkpoints of recurrent state, a prompt's prefill has a
    /// chunk end 8 tokens before the prompt's end, with the checkpoint asked there; a later
    /// prompt that parts from the sequence after that point resumes from it (answering as
    /// computed afresh), and asks for its own checkpoint further on.
    #[test]
    fn a_recurrent_sequence_resumes_from_the_checkpoint_its_prompt_asked_for() {
        let mut engine = slow_engine();
        engine.checkpoints = true;
        let log = engine.log.clone();
        let config = SchedulerConfig {
            max_seqs: 4,
            max_waiting: None,
            prefix_reuse: PrefixReuse::WholeSequence,
            speculation: None,
        };
        let sched = Scheduler::spawn(Box::new(engine), tokenizer(), config).unwrap();
        let run = |r: GenRequest| {
            let (_, mut rx) = sched.submit(r).unwrap();
            let (text, done) = collect(&mut rx);
            (text, done.unwrap())
        };
        let checkpoints = |seq: SeqId| -> Vec<String> {
            let log = log.lock().unwrap();
            log.iter().filter(|l| l.seq == seq && l.checkpoint).map(|l| format!("{}@{}", l.len, l.pos)).collect()
        };
        // 18 prompt tokens in chunks of 4: one ends at 10, where the checkpoint is taken.
        assert_eq!(run(req(18, 3)).1.cached_tokens, 0);
        assert_eq!(checkpoints(1), ["2@8"], "{:?}", lines(&log));
        assert!(parts_of(&log, 1).starts_with(&["4@0", "4@4", "2@8", "4@10"].map(String::from)), "{:?}", lines(&log));
        // The next prompt parts from the sequence at 16: resumed from the checkpoint at 10.
        let mut next = req(0, 2);
        next.prompt = (100..116).chain([1, 2, 3, 4, 5, 6, 7, 8]).collect();
        let (text, done) = run(next.clone());
        assert_eq!(done.cached_tokens, 10, "{:?}", lines(&log));
        assert_eq!(text, alone(next));
        // Its own checkpoint: 8 before its 24 tokens, where a chunk from 14 ends.
        assert_eq!(checkpoints(1), ["2@8", "2@14"], "{:?}", lines(&log));
        // Without checkpoints on the engine, none is asked for, and only the whole
        // sequence is resumed.
        let engine = slow_engine();
        let log = engine.log.clone();
        let config = SchedulerConfig {
            max_seqs: 4,
            max_waiting: None,
            prefix_reuse: PrefixReuse::WholeSequence,
            speculation: None,
        };
        let sched = Scheduler::spawn(Box::new(engine), tokenizer(), config).unwrap();
        let (_, mut rx) = sched.submit(req(18, 3)).unwrap();
        collect(&mut rx);
        let mut next = req(0, 2);
        next.prompt = (100..116).chain([1, 2, 3]).collect();
        let (_, mut rx) = sched.submit(next).unwrap();
        assert_eq!(collect(&mut rx).1.unwrap().cached_tokens, 0);
        assert!(log.lock().unwrap().iter().all(|l| !l.checkpoint));
    }

    /// A request whose prompt begins with a running sequence's tokens starts as a fork of
    /// it: its first step is at the shared length, it answers as computed afresh, and the
    /// shared blocks are counted once.
    #[test]
    fn a_request_sharing_a_running_sequence_s_prefix_forks_it() {
        let mut engine = slow_engine();
        engine.kv = Some(KvCapacity { block_size: 4, blocks: 64 });
        let log = engine.log.clone();
        let config =
            SchedulerConfig { max_seqs: 4, max_waiting: None, prefix_reuse: PrefixReuse::AnyPrefix, speculation: None };
        let sched = Scheduler::spawn(Box::new(engine), tokenizer(), config).unwrap();
        let (_, mut a) = sched.submit(req(20, 30)).unwrap();
        let t0 = Instant::now();
        while sched.snapshot().decoding == 0 {
            assert!(t0.elapsed() < Duration::from_secs(10), "the first request never decoded");
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut shared = req(0, 3);
        shared.prompt = (100..118).chain([1, 2, 3]).collect();
        let (_, mut b) = sched.submit(shared.clone()).unwrap();
        let (text, done) = collect(&mut b);
        assert_eq!(done.unwrap().cached_tokens, 18, "{:?}", lines(&log));
        assert_eq!(parts_of(&log, 2)[0], "3@18", "{:?}", lines(&log));
        assert_eq!(text, alone(shared));
        assert_eq!(collect(&mut a).0, alone(req(20, 30)));
        // Both retained: 13 blocks for the first's 49 positions, and of the fork's 6 only
        // the 2 it wrote (block 4, copied, and block 5); blocks 0-3 are shared.
        let t0 = Instant::now();
        while sched.snapshot().retained < 2 {
            assert!(t0.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(1));
        }
        let snap = sched.snapshot();
        assert_eq!((snap.kv.map(|k| k.1), snap.retained_blocks), (Some(15), 15), "{snap:?}");
    }

    #[test]
    fn sequences_share_steps_decode_rows_first_then_prefill_chunks() {
        let engine = slow_engine();
        let log = engine.log.clone();
        let sched = Scheduler::spawn(
            Box::new(engine),
            tokenizer(),
            SchedulerConfig { max_seqs: 4, max_waiting: None, prefix_reuse: PrefixReuse::Off, speculation: None },
        )
        .unwrap();
        let (_, mut a) = sched.submit(req(6, 4)).unwrap();
        let (_, mut b) = sched.submit(req(3, 4)).unwrap();
        let (fa, fb) = (collect(&mut a).1.unwrap(), collect(&mut b).1.unwrap());
        assert_eq!((fa.completion_tokens, fa.reason, fb.completion_tokens), (4, FinishReason::Length, 4));
        let all = lines(&log);
        // Every sequence's rows are consecutive positions from 0, a prompt in chunks within
        // the budget of 4 rows, then one decode row per token.
        for (seq, prompt) in [(1, 6), (2, 3)] {
            let parts = parts_of(&log, seq);
            let mut pos = 0;
            for p in &parts {
                let (len, at) = p.split_once('@').unwrap();
                assert_eq!(at.parse::<usize>().unwrap(), pos, "seq {seq}: {parts:?}");
                pos += len.parse::<usize>().unwrap();
            }
            assert_eq!(pos, prompt + 3, "seq {seq}: {parts:?}");
        }
        // Steps carry both sequences, never more than 4 rows, and decode rows come first.
        let log = log.lock().unwrap();
        let steps: std::collections::BTreeSet<u64> = log.iter().filter(|l| !l.release).map(|l| l.step).collect();
        let mut shared = 0;
        for step in steps {
            let parts: Vec<&Logged> = log.iter().filter(|l| l.step == step && !l.release).collect();
            assert!(parts.iter().map(|l| l.len).sum::<usize>() <= 4, "{all:?}");
            shared += usize::from(parts.len() > 1);
            let first_prefill = parts.iter().position(|l| l.len > 1).unwrap_or(parts.len());
            assert!(parts[first_prefill..].iter().all(|l| l.len > 1 || l.want_token), "{all:?}");
        }
        assert!(shared >= 3, "the two sequences should share steps: {all:?}");
        let at = |l: &str| all.iter().position(|x| x == l).unwrap();
        assert!(at("release 1") > 0 && at("release 2") > 0, "{all:?}");
    }

    #[test]
    fn a_dropped_receiver_releases_the_sequence() {
        let engine = slow_engine();
        let log = engine.log.clone();
        let sched = Scheduler::spawn(
            Box::new(engine),
            tokenizer(),
            SchedulerConfig { max_seqs: 8, max_waiting: None, prefix_reuse: PrefixReuse::Off, speculation: None },
        )
        .unwrap();
        let (_, mut rx) = sched.submit(req(3, 1000)).unwrap();
        assert!(matches!(rx.blocking_recv(), Some(Event::Text(_))));
        drop(rx);
        let t0 = Instant::now();
        while !lines(&log).iter().any(|l| l == "release 1") {
            assert!(t0.elapsed() < Duration::from_secs(10), "not released");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Context 64: the prompt of 3 leaves room for far fewer than 1000 tokens anyway.
        assert!(log.lock().unwrap().len() < 64);
    }

    /// A pool of 6 blocks of 4 positions: a request whose prompt does not fit next to a
    /// running one waits, then runs once that one is released; the running one is not
    /// touched; one that could never fit fails at once, naming the numbers.
    #[test]
    fn a_request_waits_for_the_kv_pool_and_one_too_large_fails() {
        let mut engine = slow_engine();
        engine.kv = Some(KvCapacity { block_size: 4, blocks: 6 });
        let log = engine.log.clone();
        let sched = Scheduler::spawn(
            Box::new(engine),
            tokenizer(),
            SchedulerConfig { max_seqs: 4, max_waiting: None, prefix_reuse: PrefixReuse::Off, speculation: None },
        )
        .unwrap();
        let (_, mut a) = sched.submit(req(10, 8)).unwrap();
        // Let the first one start.
        let first = a.blocking_recv();
        assert!(matches!(first, Some(Event::Text(_))), "{first:?}");
        let (_, mut b) = sched.submit(req(9, 2)).unwrap();
        let (_, mut huge) = sched.submit(req(30, 2)).unwrap();
        match huge.blocking_recv() {
            Some(Event::Failed(e)) => {
                assert_eq!(e.code, ErrorCode::InvalidArgument);
                assert!(e.message.contains("30 tokens") && e.message.contains("24 positions (6 blocks of 4)"), "{e}");
            }
            other => panic!("expected a failure, got {other:?}"),
        }
        let (fa, fb) = (collect(&mut a).1.unwrap(), collect(&mut b).1.unwrap());
        assert_eq!((fa.completion_tokens, fb.completion_tokens), (8, 2));
        let all = lines(&log);
        let at = |l: &str| all.iter().position(|x| x == l).unwrap_or_else(|| panic!("{l} not in {all:?}"));
        // Sequence 3 (b) starts only after sequence 1 (a) is released.
        let b_first = all.iter().position(|l| l.contains(":2:")).unwrap();
        assert!(at("release 1") < b_first, "{all:?}");
        // a ran straight through: positions 0..17 in order, never again from 0.
        assert_eq!(parts_of(&log, 1).iter().filter(|p| p.ends_with("@0")).count(), 1, "{all:?}");
        // b's wait is counted once, however many iterations it waited.
        assert_eq!(sched.snapshot().pool_waits, 1);
    }

    /// An engine whose results stop (a pipeline that lost a node): the running request
    /// fails with 503's code, the snapshot says why, and later requests fail at once.
    #[test]
    fn a_broken_engine_fails_requests_at_once_and_says_why() {
        let mut engine = slow_engine();
        engine.fail_after = Some(3);
        let sched = Scheduler::spawn(
            Box::new(engine),
            tokenizer(),
            SchedulerConfig { max_seqs: 4, max_waiting: None, prefix_reuse: PrefixReuse::Off, speculation: None },
        )
        .unwrap();
        let (_, mut a) = sched.submit(req(5, 50)).unwrap();
        let err = failure(&mut a);
        assert_eq!(err.code, ErrorCode::Unavailable, "{err}");
        assert!(err.message.contains("restart `strata serve`"), "{err}");
        let t0 = Instant::now();
        while sched.snapshot().broken.is_none() {
            assert!(t0.elapsed() < Duration::from_secs(10), "no broken state published");
            std::thread::sleep(Duration::from_millis(5));
        }
        let (_, mut b) = sched.submit(req(5, 2)).unwrap();
        assert_eq!(failure(&mut b).code, ErrorCode::Unavailable);
    }

    /// An engine that fails as a whole and is re-planned: every live sequence is computed
    /// again from position 0 with all its tokens, and each request's text is exactly
    /// what it is without the failure, with no error.
    #[test]
    fn a_lost_node_is_recovered_and_every_request_answers_the_same() {
        let mut engine = slow_engine();
        engine.fail_after = Some(6);
        engine.recoverable = true;
        let log = engine.log.clone();
        let sched = two_like_alone(engine);
        // Both sequences started again from position 0 after the re-plan (the log's
        // `release 0`), carrying every token they had.
        let all = lines(&log);
        let at = all.iter().position(|l| l == "release 0").expect("a re-plan");
        for seq in [1, 2] {
            let again = all[at..].iter().find(|l| l.split(':').nth(1) == Some(&seq.to_string())).expect("recomputed");
            assert!(again.ends_with("@0"), "{seq}: {again} in {all:?}");
        }
        let snap = sched.snapshot();
        assert_eq!(snap.recoveries, 1);
        assert!(snap.broken.is_none());
        assert_eq!(snap.last_recovery.unwrap().left_out, ["b"]);
    }

    /// With one running and one waiting allowed, a third request is refused at once; a
    /// finished or cancelled request frees its place.
    #[test]
    fn a_full_queue_refuses_and_finished_requests_free_their_place() {
        let sched = Scheduler::spawn(
            Box::new(slow_engine()),
            tokenizer(),
            SchedulerConfig { max_seqs: 1, max_waiting: Some(1), prefix_reuse: PrefixReuse::Off, speculation: None },
        )
        .unwrap();
        let (_, mut a) = sched.submit(req(5, 6)).unwrap();
        let (_, b) = sched.submit(req(5, 6)).unwrap();
        assert_eq!(sched.submit(req(5, 6)).unwrap_err(), Refused::QueueFull { held: 2, limit: 2 });
        assert_eq!(sched.held(), 2);
        // b gives up while waiting; a finishes.
        drop(b);
        assert_eq!(collect(&mut a).1.unwrap().completion_tokens, 6);
        let t0 = Instant::now();
        while sched.held() > 0 {
            assert!(t0.elapsed() < Duration::from_secs(10), "{} requests still held", sched.held());
            std::thread::sleep(Duration::from_millis(5));
        }
        let (_, mut c) = sched.submit(req(5, 2)).unwrap();
        let (_, mut d) = sched.submit(req(5, 2)).unwrap();
        assert_eq!(collect(&mut c).1.unwrap().completion_tokens, 2);
        assert_eq!(collect(&mut d).1.unwrap().completion_tokens, 2);
    }

    /// Two sequences grow past the pool: the younger is preempted (released), then
    /// recomputed from all its tokens once the older is done, and answers what it would
    /// have answered alone.
    #[test]
    fn a_preempted_sequence_is_recomputed_and_answers_the_same() {
        let mut engine = slow_engine();
        engine.kv = Some(KvCapacity { block_size: 4, blocks: 7 });
        let log = engine.log.clone();
        two_like_alone(engine);
        let all = lines(&log);
        // 16 positions each, 28 in the pool: one of them was released and started again
        // from position 0 with every token it had.
        let restarts: Vec<SeqId> = [1, 2]
            .into_iter()
            .filter(|&s| parts_of(&log, s).iter().filter(|p| p.ends_with("@0")).count() > 1)
            .collect();
        assert_eq!(restarts, [2], "{all:?}");
        assert!(all.iter().filter(|l| *l == "release 2").count() >= 2, "{all:?}");
    }

    /// A model over tokens 100..107 that mostly cycles (each token followed by the next,
    /// 106 by 100) but jumps ahead by three at every prime position (so no period), on an engine whose
    /// stages hold what was fed to each sequence and, when `recurrent`, accept a step only
    /// where its state is (the end, its rollback state or 0), as DeltaNet stages do; else
    /// anywhere up to the end, as attention does. Logs each step's `rows@pos+verify`.
    /// With `mtp`, a step that asks for drafts gets them as an MTP head would make them:
    /// the tokens after its last sample, predicted by the cycle without the jumps (right
    /// until the next prime position).
    fn cycling_engine(recurrent: bool, draft_max: u32, mtp: bool, log: Arc<Mutex<Vec<String>>>) -> Scripted {
        use std::collections::HashMap;
        let next = |fed: &[u32]| {
            let last = fed.last().map_or(0, |t| t.saturating_sub(100));
            let n = fed.len();
            let prime = n > 1 && (2..n).take_while(|d| d * d <= n).all(|d| !n.is_multiple_of(d));
            let jump = if prime { 3 } else { 1 };
            100 + (last + jump) % 7
        };
        let mut fed: HashMap<SeqId, (Vec<u32>, Option<usize>)> = HashMap::new();
        let mut engine = Scripted::new(move |step| {
            log.lock().unwrap().push(format!("{}@{}+{}", step.ids.len(), step.pos, step.verify));
            let (held, rollback) = fed.entry(step.seq).or_default();
            let pos = step.pos as usize;
            let allowed = pos == held.len() || pos == 0 || *rollback == Some(pos) || (!recurrent && pos < held.len());
            if !allowed {
                let at = held.len();
                return Err(StepError::new(ErrorCode::OutOfOrder, format!("step at {pos}, state at {at}")));
            }
            held.truncate(pos);
            held.extend_from_slice(step.ids);
            *rollback = (step.keep > 0).then_some(pos + step.keep as usize);
            if !step.want_token {
                return Ok(None);
            }
            let end = held.len();
            let samples: Vec<u32> = (end - step.verify as usize..=end).map(|row_end| next(&held[..row_end])).collect();
            assert!(mtp || step.draft == 0, "MTP drafts asked of an engine without the head");
            let mut last = *samples.last().expect("one sample at least");
            let drafts = (0..step.draft)
                .map(|_| {
                    last = 100 + (last - 99) % 7;
                    last
                })
                .collect();
            Ok(Sampled::verified(samples).map(|s| Sampled { drafts, ..s }))
        });
        engine.max_batch = 8;
        engine.draft_max = draft_max;
        engine.mtp = mtp;
        engine
    }

    /// Speculation gives exactly the tokens of the plain run, on a recurrent engine (where
    /// rejected drafts go back to the rollback state and the kept ones are fed again) and
    /// on an attention one (where the next step simply starts after the kept ones); the
    /// drafts are proposed, partly accepted, and counted.
    #[test]
    fn speculative_steps_answer_as_plain_ones_and_roll_back_rejected_drafts() {
        let prompt: Vec<u32> = (0..20).map(|i| 100 + i % 7).collect();
        let run = |recurrent: bool, speculate: bool, mtp: bool| {
            let log = Arc::new(Mutex::new(Vec::new()));
            let engine = cycling_engine(recurrent, 4, mtp, log.clone());
            let speculation = speculate.then_some(Speculation { draft_max: 4, recurrent, mtp });
            let config =
                SchedulerConfig { max_seqs: 4, max_waiting: None, prefix_reuse: PrefixReuse::Off, speculation };
            let sched = Scheduler::spawn(Box::new(engine), tokenizer(), config).unwrap();
            let request = GenRequest { prompt: prompt.clone(), ignore_eos: true, ..req(0, 40) };
            let (_, mut a) = sched.submit(request.clone()).unwrap();
            // A second sequence beside it, with its own prompt and drafts.
            let (_, mut b) = sched.submit(GenRequest { prompt: prompt[3..].to_vec(), ..request }).unwrap();
            let (a, b) = (collect(&mut a).1.unwrap(), collect(&mut b).1.unwrap());
            let steps = log.lock().unwrap().clone();
            ((a.generated_ids, b.generated_ids), sched.snapshot(), steps)
        };
        for (recurrent, mtp) in [(true, false), (false, false), (true, true), (false, true)] {
            let (plain, _, _) = run(recurrent, false, false);
            let (spec, snap, steps) = run(recurrent, true, mtp);
            assert_eq!(spec, plain, "recurrent {recurrent}, mtp {mtp}: {steps:?}");
            assert_eq!(snap.drafter, Some(if mtp { "mtp" } else { "lookup" }));
            eprintln!(
                "recurrent {recurrent}, mtp {mtp}: {} of {} drafts kept, {} tokens in {} decode trips",
                snap.accepted_draft_tokens, snap.draft_tokens, snap.decode_tokens, snap.decode_trips
            );
            assert_eq!(plain.0.len(), 40);
            assert!(snap.draft_tokens > 0 && snap.accepted_draft_tokens > 0, "{snap:?}");
            assert!(snap.accepted_draft_tokens < snap.draft_tokens, "some drafts are rejected: {snap:?}");
            assert!(snap.decode_tokens > snap.decode_trips, "more than a token per trip: {snap:?}");
            assert_eq!(snap.generated_tokens_total, 80);
            // On the recurrent engine, kept drafts after a rejection are fed again: a
            // decode step (past both prompts) with more than one row before its drafts.
            let replayed = steps
                .iter()
                .filter(|s| {
                    let (n, rest) = s.split_once('@').unwrap();
                    let (pos, verify) = rest.split_once('+').unwrap();
                    let [n, pos, verify] = [n, pos, verify].map(|v| v.parse::<usize>().unwrap());
                    pos >= 20 && n - verify > 1
                })
                .count();
            assert_eq!(recurrent, replayed > 0, "{steps:?}");
        }
    }

    /// The chi-square statistic of two samples' counts over the same categories (cells
    /// with fewer than 5 observations in all are pooled), and its degrees of freedom.
    fn chi_square(a: &[u64], b: &[u64]) -> (f64, usize) {
        let (na, nb) = (a.iter().sum::<u64>() as f64, b.iter().sum::<u64>() as f64);
        let (mut cells, mut pooled) = (Vec::new(), (0, 0));
        for (&x, &y) in a.iter().zip(b) {
            if x + y >= 5 { cells.push((x, y)) } else { pooled = (pooled.0 + x, pooled.1 + y) }
        }
        if pooled.0 + pooled.1 > 0 {
            cells.push(pooled);
        }
        let stat = cells
            .iter()
            .map(|&(x, y)| {
                let total = (x + y) as f64;
                let (ea, eb) = (total * na / (na + nb), total * nb / (na + nb));
                (x as f64 - ea).powi(2) / ea + (y as f64 - eb).powi(2) / eb
            })
            .sum();
        (stat, cells.len() - 1)
    }

    /// The chi-square distribution's upper 0.1% point (Wilson-Hilferty).
    fn chi_square_critical(df: usize) -> f64 {
        let (k, z) = (df as f64, 3.0902);
        k * (1.0 - 2.0 / (9.0 * k) + z * (2.0 / (9.0 * k)).sqrt()).powi(3)
    }

    /// Sampled speculation draws from the model's own distribution: over 20,000 seeds
    /// each (different ones), the third token of a sampled answer whose drafts are often
    /// rejected is distributed alike with and without speculation (chi-square at the
    /// 0.1% level), and the test is large enough to see a 2% shift of that distribution.
    #[test]
    fn sampled_speculation_keeps_the_model_s_distribution() {
        const N: u64 = 20_000;
        // The model: after token t, 100 + (t + 1) % 5 is likeliest, then 100 + (t + 2) % 5.
        let engine = || {
            let mut engine = Scripted::new(|step| {
                if !step.want_token {
                    return Ok(None);
                }
                let sampler = strata_model::sampling::Sampler::new(step.sampling.clone()).unwrap();
                let rows = step.ids.len();
                let samples = (rows - 1 - step.verify as usize..rows)
                    .map(|r| {
                        let last = (step.ids[r] - 100) as usize;
                        let mut logits = vec![-1e4f32; 105];
                        logits[100..].fill(0.0);
                        logits[100 + (last + 1) % 5] = 2.0;
                        logits[100 + (last + 2) % 5] = 1.0;
                        sampler.sample_logits(&logits, &[], u64::from(step.pos) + r as u64 + 1).unwrap()
                    })
                    .collect();
                Ok(Sampled::verified(samples))
            });
            engine.draft_max = 3;
            engine.max_batch = 64;
            engine
        };
        // "100 101 102" recurs: lookup drafts 103 100 101 after it.
        let prompt = vec![100, 101, 102, 103, 100, 101, 102];
        let third_tokens = |speculate: bool, seeds: std::ops::Range<u64>| {
            let speculation = speculate.then_some(Speculation { draft_max: 3, recurrent: false, mtp: false });
            let config =
                SchedulerConfig { max_seqs: 8, max_waiting: None, prefix_reuse: PrefixReuse::Off, speculation };
            let sched = Scheduler::spawn(Box::new(engine()), tokenizer(), config).unwrap();
            let mut counts = vec![0u64; 5];
            let receivers: Vec<_> = seeds
                .map(|seed| {
                    let sampling = SamplingParams { temperature: 1.0, top_k: 0, seed, ..SamplingParams::greedy() };
                    let r = GenRequest { prompt: prompt.clone(), sampling, ignore_eos: true, ..req(0, 3) };
                    sched.submit(r).unwrap().1
                })
                .collect();
            for mut rx in receivers {
                let done = collect(&mut rx).1.unwrap();
                counts[(done.generated_ids[2] - 100) as usize] += 1;
            }
            (counts, sched.snapshot())
        };
        let (plain, _) = third_tokens(false, 0..N);
        let (spec, snap) = third_tokens(true, N..2 * N);
        assert!(snap.draft_tokens > N / 4 && snap.accepted_draft_tokens < snap.draft_tokens, "{snap:?}");
        let (stat, df) = chi_square(&plain, &spec);
        let critical = chi_square_critical(df);
        eprintln!(
            "third token: {plain:?} plain, {spec:?} speculative: chi-square {stat:.2} on {df} df (0.1%: {critical:.2})"
        );
        eprintln!("drafts: {} of {} kept", snap.accepted_draft_tokens, snap.draft_tokens);
        assert!(stat < critical, "the distributions differ: {plain:?} against {spec:?}");
        // Moving 2% of the answers from the likeliest third token to the next one is seen.
        let mut shifted = plain.clone();
        let top = (0..5).max_by_key(|&i| plain[i]).unwrap();
        let moved = N / 50;
        shifted[top] -= moved;
        shifted[(top + 1) % 5] += moved;
        assert!(chi_square(&plain, &shifted).0 > critical, "a 2% shift would go unseen: {shifted:?}");
    }
}
