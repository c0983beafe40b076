//! Where the model runs, behind one interface: [`Engine`]. [`LocalEngine`] is one
//! in-process stage holding every layer (asked of the node crate: the coordinator never
//! touches the GPU itself); [`Pipeline`] is a chain of stage services reached over gRPC.
//! [`load`] picks one; `run`, `bench` and the scheduler (`serve`, `chat`) all drive it
//! through [`Engine::submit`] and [`Engine::next_result`].
//!
//! This module is the coordinator's one boundary with the wire: proto messages are
//! built and read in `pipeline` (steps, node info and counters, the hop benchmark) and
//! `shipping` (weight streaming), and nowhere else in the coordinator.

mod local;
mod pipeline;
mod shipping;

use std::time::Duration;

use anyhow::Context;
use strata_model::gguf::Gguf;
use strata_model::sampling::SamplingParams;
use strata_node::kv_pool::KvLayout;
use strata_node::stage::{Logprobs, SeqId, StageSpec};

use strata_model::plan::{ModelCost, NodeBudget, Plan, PlanConfig};

use crate::cli::EngineArgs;
pub use local::LocalEngine;
pub use pipeline::{Pipeline, time_hops};

/// The longest context `--ctx` takes, and the most a model's own is taken at.
const MAX_CTX: u32 = 1 << 20;

/// The context length asked for, or the model's own, which an engine then shrinks to
/// what the memory holds (see [`fit_context`]). A `--ctx` past the model's own runs (the
/// user may know the model extrapolates), with a warning: positions past its training
/// tend to give worse text.
pub fn context_length(gguf: &Gguf, args: &EngineArgs) -> anyhow::Result<u32> {
    let config = strata_model::config::ModelConfig::from_gguf(gguf)?;
    if let Some(ctx) = args.ctx
        && ctx as usize > config.context_length
    {
        eprintln!(
            "warning: --ctx {ctx} is past the {} positions the model was trained on; text past them may degrade",
            config.context_length
        );
    }
    Ok(args.ctx.unwrap_or_else(|| (config.context_length.min(MAX_CTX as usize) as u32).max(16)))
}

/// What a plan asks of the nodes, given the pool: `kv_positions` fixes it, else
/// `--kv-pool` or the planner's choice.
pub(crate) fn plan_config(spec: &StageSpec, args: &EngineArgs, kv_positions: Option<u64>) -> PlanConfig {
    PlanConfig {
        max_batch: spec.max_batch as usize,
        seqs: spec.max_seqs as usize,
        checkpoints: spec.checkpoints,
        draft_max: spec.draft_max as usize,
        mtp: spec.mtp,
        kv_block_size: spec.kv_block_size as usize,
        kv_positions: kv_positions.or(args.kv_pool.map(u64::from)),
        ..PlanConfig::new(spec.ctx as usize)
    }
}

/// The most KV positions, in whole blocks of `block_size`, an attention layer's part of
/// the pool may hold when it lives in one buffer of at most `binding` bytes.
pub(crate) fn pool_cap(config: &strata_model::config::ModelConfig, block_size: usize, binding: u64) -> u64 {
    let a = &config.attention;
    let per_position = (a.n_head_kv * a.head_dim * 2).max(1) as u64;
    let block = block_size.max(1) as u64;
    binding / per_position / block * block
}

/// With no `--ctx`: the largest context up to `ctx` (the model's own) that `nodes` hold,
/// its plan, and a line saying so when it is less than the model's own. `binding`: the
/// largest buffer the pool's stages can bind (each attention layer keeps its part of the
/// pool in one), which bounds the pool and so the context.
pub(crate) fn fit_context(
    gguf: &Gguf,
    args: &EngineArgs,
    usage: EngineUse,
    ctx: u32,
    nodes: &[NodeBudget],
    split: Option<&[usize]>,
    binding: impl Fn(&Plan) -> Option<u64>,
) -> anyhow::Result<(u32, Plan)> {
    let config = strata_model::config::ModelConfig::from_gguf(gguf)?;
    let spec = stage_spec(args, &config, usage, ctx, 0..0, None)?;
    let pc = plan_config(&spec, args, None);
    let (fitted, _, mut plan) = Plan::largest_context(gguf, &config, &pc, nodes, split)?;
    let mut fitted = fitted as u64;
    if let Some(cap) = binding(&plan).map(|b| pool_cap(&config, pc.kv_block_size, b))
        && plan.kv_positions > cap
    {
        let capped = PlanConfig { ctx: fitted.min(cap) as usize, kv_positions: Some(cap), ..pc.clone() };
        plan = Plan::fitted(&ModelCost::new(gguf, &config, &capped)?, nodes, split)?;
        fitted = fitted.min(cap);
    }
    let fitted = fitted as u32;
    if fitted < ctx {
        eprintln!(
            "context {fitted}: the model's own is {ctx}, and {fitted} is the most the memory holds for one sequence (--ctx sets it)"
        );
    }
    Ok((fitted, plan))
}

/// What a command asks of an engine beyond where it runs: how many sequences it keeps at
/// once (`run` and `chat` 1, `serve` its `--max-seqs`, `bench` its `--concurrency`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineUse {
    pub max_seqs: u32,
    /// A server (`serve`, `chat`): with `--discover`, a pipeline keeps browsing mDNS so
    /// that a node of the cluster that appears later joins at the next re-plan.
    pub serving: bool,
    /// Recurrent layers keep a checkpoint of each sequence's state, for prefix reuse
    /// (`serve` and `chat` unless `--no-prefix-cache`).
    pub checkpoints: bool,
}

/// The spec of a stage holding `layers`: `ctx` positions, `--batch-tokens` rows per step,
/// the command's sequences, and a KV pool of `kv_positions` (a plan's), else `--kv-pool`,
/// else every sequence's whole context.
pub(crate) fn stage_spec(
    args: &EngineArgs,
    config: &strata_model::config::ModelConfig,
    usage: EngineUse,
    ctx: u32,
    layers: std::ops::Range<usize>,
    kv_positions: Option<u64>,
) -> anyhow::Result<StageSpec> {
    let block = KvLayout::DEFAULT_BLOCK_SIZE;
    let positions = kv_positions.or(args.kv_pool.map(u64::from));
    let kv_blocks = match positions {
        Some(p) => u32::try_from(p.div_ceil(u64::from(block)))
            .map_err(|_| anyhow::anyhow!("a KV pool of {p} positions is too large"))?,
        None => 0,
    };
    Ok(StageSpec {
        layers,
        ctx,
        max_batch: args.batch.min(ctx.max(1)),
        max_seqs: usage.max_seqs.max(1),
        kv_blocks,
        kv_block_size: block,
        checkpoints: usage.checkpoints,
        draft_max: draft_max(args),
        mtp: mtp(args, config)?,
    })
}

/// Whether the last stage drafts with the model's MTP block: `--speculative mtp` (which a
/// model without one refuses), or `auto` on a model with one.
pub(crate) fn mtp(args: &EngineArgs, config: &strata_model::config::ModelConfig) -> anyhow::Result<bool> {
    use crate::cli::SpeculativeMode;
    match args.speculative {
        SpeculativeMode::Mtp if config.n_mtp == 0 => anyhow::bail!(
            "--speculative mtp: {} has no MTP block (its nextn_predict_layers is 0); use --speculative lookup",
            args.model.display()
        ),
        SpeculativeMode::Mtp => Ok(true),
        SpeculativeMode::Auto => Ok(config.n_mtp > 0),
        SpeculativeMode::Off | SpeculativeMode::Lookup => Ok(false),
    }
}

/// Draft rows a sequence's step may verify: `--draft-max` with `--speculative`, else 0.
pub(crate) fn draft_max(args: &EngineArgs) -> u32 {
    if args.speculative == crate::cli::SpeculativeMode::Off { 0 } else { args.draft_max }
}

/// A pipeline when `args` names peers, `--no-local`, `--split` or `--discover`; else one
/// in-process stage.
pub fn load(gguf: &Gguf, args: &EngineArgs, usage: EngineUse) -> anyhow::Result<Box<dyn Engine>> {
    Ok(if args.is_pipeline() {
        Box::new(Pipeline::load(gguf, args, usage)?)
    } else {
        Box::new(LocalEngine::load(gguf, args, usage)?)
    })
}

/// One sequence's part of a step, as a caller hands it to an engine: its `ids` at
/// positions `pos..pos + ids.len()`.
#[derive(Debug, Clone, Copy)]
pub struct SeqStep<'a> {
    pub seq: SeqId,
    pub ids: &'a [u32],
    pub pos: u32,
    pub sampling: &'a SamplingParams,
    /// Ids the last stage's repetition penalties must count from now on (prompt tokens,
    /// or tokens fed again); empty when the request has no penalties.
    pub history: &'a [u32],
    /// Whether the caller needs the sampled token (false for all but the last prefill chunk).
    pub want_token: bool,
    /// With the token, its log-probability and this many top alternatives'.
    pub logprobs: Option<u32>,
    /// With the token: the tokens a grammar allows this time, bitmask words over the
    /// vocabulary (`strata_model::grammar`); empty when any token may come.
    pub allowed: &'a [u32],
    /// Keep the sequence's recurrent state after these rows as its checkpoint (see
    /// [`Engine::checkpoints`]).
    pub checkpoint: bool,
    /// The first step of a new sequence forked from this one at `pos` (see
    /// `strata_node::stage::SeqStep::fork_from`).
    pub fork_from: Option<SeqId>,
    /// Speculative decoding: the last `verify` of `ids` are draft tokens, and the last
    /// stage samples after each of them too ([`Sampled::after`]); see
    /// `strata_node::stage::SeqStep::verify`.
    pub verify: u32,
    /// Recurrent layers keep the state after the first `keep` of `ids` as the sequence's
    /// rollback state, which a later step starting there resumes from.
    pub keep: u32,
    /// With the MTP head ([`Engine::mtp`]): drafts it makes after this step's last row,
    /// for the next step ([`Sampled::drafts`]).
    pub draft: u32,
}

impl<'a> SeqStep<'a> {
    /// `ids` of `seq` at `pos..`, sampled with `sampling`, with none of the optional
    /// parts: no penalties' history, logprobs, grammar mask, checkpoint, fork, drafts or
    /// verification. Callers set those with struct-update syntax.
    pub fn new(seq: SeqId, ids: &'a [u32], pos: u32, sampling: &'a SamplingParams, want_token: bool) -> SeqStep<'a> {
        SeqStep {
            seq,
            ids,
            pos,
            sampling,
            history: &[],
            want_token,
            logprobs: None,
            allowed: &[],
            checkpoint: false,
            fork_from: None,
            verify: 0,
            keep: 0,
            draft: 0,
        }
    }
}

/// A sampled token, and its log-probabilities when the step asked for them.
#[derive(Debug, Clone)]
pub struct Sampled {
    pub token: u32,
    pub logprobs: Option<Logprobs>,
    /// A speculative step's samples after each of its draft tokens, in order (`token`
    /// is the sample after the row before the first draft).
    pub after: Vec<u32>,
    /// The MTP head's drafts for the next step: they follow the last of the samples.
    pub drafts: Vec<u32>,
}

impl Sampled {
    pub fn token(token: u32) -> Sampled {
        Sampled { token, logprobs: None, after: Vec::new(), drafts: Vec::new() }
    }

    /// From a speculative step's samples, one per verified row (at least one).
    pub fn verified(mut tokens: Vec<u32>) -> Option<Sampled> {
        if tokens.is_empty() {
            return None;
        }
        let token = tokens.remove(0);
        Some(Sampled { token, logprobs: None, after: tokens, drafts: Vec::new() })
    }
}

/// The class of a step's error, as the stage that refused it (or the coordinator) saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The step (or request) was wrong as sent: sending it again fails again.
    InvalidArgument,
    /// Out of order for its sequence, or for a sequence the stage does not know.
    OutOfOrder,
    /// The stage does not hold what was asked of it (no shard, no output head).
    NotOnStage,
    /// Bytes failed their checksum.
    DataLoss,
    /// No room now (KV pool, sequence slots); may succeed later.
    Exhausted,
    /// A stage could not be reached.
    Unavailable,
    /// The device, a host or the engine failed.
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::OutOfOrder => "out_of_order",
            ErrorCode::NotOnStage => "not_on_stage",
            ErrorCode::DataLoss => "data_loss",
            ErrorCode::Exhausted => "resource_exhausted",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

/// Why one step failed: a code to match on and text for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepError {
    pub code: ErrorCode,
    pub message: String,
}

impl StepError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        StepError { code, message: message.into() }
    }
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for StepError {}

/// What one sequence's part of a finished step yields: its token (`None` when it asked
/// for none) or its error.
pub type StepOutcome = Result<Option<Sampled>, StepError>;

/// A finished step: its number (as [`Engine::submit`] returned it) and each sequence's
/// outcome, in the order they were submitted.
#[derive(Debug)]
pub struct StepDone {
    pub step: u64,
    pub outcomes: Vec<(SeqId, StepOutcome)>,
}

/// The KV pool every sequence's positions share: the smallest stage's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCapacity {
    /// Positions per block.
    pub block_size: u32,
    pub blocks: u32,
}

impl KvCapacity {
    pub fn positions(&self) -> u64 {
        u64::from(self.blocks) * u64::from(self.block_size)
    }

    /// Blocks that `positions` positions take.
    pub fn blocks_for(&self, positions: u32) -> u32 {
        positions.div_ceil(self.block_size)
    }
}

/// What a re-plan came to.
#[derive(Debug, Clone)]
pub struct Recovered {
    /// Nodes of the old plan that the new one leaves out.
    pub left_out: Vec<String>,
    /// Why each node that did not answer was left out.
    pub why: Vec<String>,
    /// The new plan's nodes, in pipeline order.
    pub nodes: Vec<String>,
    /// From the start of the re-plan to the new stream being open.
    pub seconds: f64,
}

/// Why an engine wants a re-plan, and how soon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replan {
    pub why: String,
    /// Only when nothing runs (a node that came back: the plan works without it);
    /// otherwise before the next step (a node lost or leaving).
    pub when_idle: bool,
}

/// Where one stage runs and what it holds, in pipeline order.
#[derive(Debug, Clone)]
pub struct Placement {
    /// The node's name (`local` for the in-process engine).
    pub node: String,
    /// The node's stage service; empty for the in-process engine.
    pub address: String,
    pub adapter: String,
    pub backend: String,
    pub layers: std::ops::Range<usize>,
}

/// The model, on this machine or across a pipeline of nodes.
///
/// A step carries the rows of several sequences. `submit` starts one and may return
/// before it finishes; `next_result` returns the next finished step (each submitted step
/// yields exactly one, in submission order), with an outcome per sequence. A pipelined
/// engine keeps several steps in flight: stage k works on one while stage k+1 works on
/// another.
pub trait Engine: Send {
    /// Starts a step of `seqs` (each sequence at most once); returns its number. An
    /// error here concerns this step only (it yields no result).
    fn submit(&mut self, seqs: &[SeqStep<'_>]) -> anyhow::Result<u64>;
    /// The next finished step. The outer error means the engine itself failed: every
    /// step in flight is lost, and the scheduler runs no further step on it.
    fn next_result(&mut self) -> anyhow::Result<StepDone>;
    /// Frees a sequence's caches on every stage. Releasing an unknown sequence is not an error.
    fn release(&mut self, seq: SeqId) -> anyhow::Result<()>;
    /// Positions per sequence, at most.
    fn ctx(&self) -> u32;
    /// Why the engine should be re-planned, if it should: before its next step for a
    /// node that is leaving (the steps in flight still come back: collect them first) or
    /// one that was lost; when idle for a node that answers again. `None` (the default)
    /// for an engine that cannot re-plan.
    fn replan_wanted(&self) -> Option<Replan> {
        None
    }
    /// Rebuilds the engine on what is left of it (a pipeline: the nodes that answer).
    /// Every step in flight is lost and no stage holds any sequence afterwards: the
    /// caller recomputes each live sequence from its tokens. An error means the engine
    /// cannot run at all (the nodes left cannot hold the model).
    fn recover(&mut self) -> anyhow::Result<Recovered> {
        anyhow::bail!("this engine cannot re-plan")
    }
    /// The most rows one step may carry, all its sequences together.
    fn max_batch(&self) -> u32;
    /// Sequences the stages hold at once (and the most one step may carry).
    fn max_seqs(&self) -> u32;
    /// Steps worth keeping in flight: one per distinct device of a pipeline unless
    /// `--micro-batches` says otherwise; 1 for the in-process engine (there is no second stage to overlap with).
    fn micro_batches(&self) -> usize {
        1
    }
    /// The KV pool sequences share, if any stage has one.
    fn kv_capacity(&self) -> Option<KvCapacity>;
    /// Whether recurrent stages keep a checkpoint per sequence ([`SeqStep::checkpoint`]).
    fn checkpoints(&self) -> bool {
        false
    }
    /// Draft rows one sequence's step may carry ([`SeqStep::verify`]); 0: no speculation.
    fn draft_max(&self) -> u32 {
        0
    }
    /// The last stage drafts with the model's MTP head ([`SeqStep::draft`]).
    fn mtp(&self) -> bool {
        false
    }
    /// Where the model runs and what each stage holds, for `/v1/cluster` and `/metrics`.
    fn stats(&self) -> EngineStats;
    /// Every stage, in pipeline order.
    fn placement(&self) -> Vec<Placement>;
    /// Weight bytes one step reads, all stages together.
    fn weight_bytes_per_token(&self) -> u64;
    /// The device's streaming-read bandwidth in GB/s, measured now; `None` (the default)
    /// for a pipeline, whose stages run on different devices.
    fn read_bandwidth(&self) -> anyhow::Result<Option<f64>> {
        Ok(None)
    }
    /// Where a step of `rows` rows at positions `pos..` (each sampled), split evenly over
    /// `seqs` sequences, spends its time, op by op, on this machine's own stage; `None`
    /// (the default) for a pipeline. Spoils the sequences' state: run it last.
    fn profile_step(
        &self,
        _rows: u32,
        _seqs: u32,
        _pos: u32,
    ) -> anyhow::Result<Option<Vec<strata_node::bench::OpTime>>> {
        Ok(None)
    }
    /// Each stage's own counters, read now, in pipeline order.
    fn node_counters(&self) -> anyhow::Result<Vec<NodeCounters>>;

    /// Runs a step of one sequence and waits for it: its outcome.
    fn run_one(&mut self, step: SeqStep<'_>) -> anyhow::Result<StepOutcome> {
        let seq = step.seq;
        self.submit(&[step])?;
        let mut done = self.next_result()?;
        anyhow::ensure!(
            done.outcomes.len() == 1 && done.outcomes[0].0 == seq,
            "a step of one sequence answered {:?}",
            done.outcomes
        );
        Ok(done.outcomes.pop().expect("one outcome").1)
    }

    /// Feeds `ids` from `pos` in chunks of [`Engine::max_batch`] and returns the token
    /// sampled after the last (from what `allowed` allows, when it is not empty: see
    /// [`SeqStep::allowed`]); only the last chunk asks for one. For a caller driving
    /// one sequence (`run`, `bench`): chunks go out back to back, so that a pipeline's
    /// stages work on consecutive chunks at once.
    fn prefill(
        &mut self,
        seq: SeqId,
        ids: &[u32],
        pos: u32,
        sampling: &SamplingParams,
        allowed: &[u32],
    ) -> anyhow::Result<u32> {
        let chunks: Vec<&[u32]> = ids.chunks(self.max_batch().max(1) as usize).collect();
        anyhow::ensure!(!chunks.is_empty(), "nothing to prefill");
        let history = if sampling.has_penalties() { ids } else { &[] };
        let (mut p, mut at) = (pos, 0);
        for (i, chunk) in chunks.iter().enumerate() {
            let want_token = i + 1 == chunks.len();
            let history = if history.is_empty() { history } else { &history[at..at + chunk.len()] };
            let allowed = if want_token { allowed } else { &[] };
            self.submit(&[SeqStep { history, allowed, ..SeqStep::new(seq, chunk, p, sampling, want_token) }])?;
            p += chunk.len() as u32;
            at += chunk.len();
        }
        let (mut token, mut failed) = (None, None);
        for _ in 0..chunks.len() {
            for (_, outcome) in self.next_result()?.outcomes {
                match outcome {
                    Ok(Some(sampled)) => token = Some(sampled.token),
                    Ok(None) => {}
                    Err(e) => {
                        failed.get_or_insert(e);
                    }
                }
            }
        }
        if let Some(e) = failed {
            return Err(e.into());
        }
        token.context("the last prefill chunk yielded no token")
    }

    /// Runs one decode step of one sequence (feeding `id` at `pos`) and returns its token,
    /// from what `allowed` allows when it is not empty.
    fn step(
        &mut self,
        seq: SeqId,
        id: u32,
        pos: u32,
        sampling: &SamplingParams,
        allowed: &[u32],
    ) -> anyhow::Result<u32> {
        let ids = [id];
        let step = SeqStep { allowed, ..SeqStep::new(seq, &ids, pos, sampling, true) };
        let sampled = self.run_one(step)??;
        sampled.map(|s| s.token).context("a decode step yielded no token")
    }
}

/// A snapshot of an engine: one entry per stage, in pipeline order.
#[derive(Debug, Clone, Default)]
pub struct EngineStats {
    pub n_layer: usize,
    pub stages: Vec<StageStats>,
    /// From submitting a step to its result coming back.
    pub step_latency: LatencyHistogram,
}

#[derive(Debug, Clone)]
pub struct StageStats {
    /// The node's name (`local` for this machine).
    pub node: String,
    /// The GPU adapter.
    pub device: String,
    /// Layers `[start, end)`.
    pub layers: std::ops::Range<usize>,
    pub weight_bytes: u64,
    /// KV cache and recurrent state held for all sequences.
    pub cache_bytes: u64,
    /// The node's usable memory, where known.
    pub memory_bytes: Option<u64>,
    /// Sequences holding caches on this stage.
    pub sequences: usize,
    /// Steps the stage has run, their rows, and its time in them.
    pub steps: u64,
    pub rows: u64,
    pub busy_seconds: f64,
    /// Its KV pool and sequence slots now.
    pub pool: PoolCounters,
}

impl StageStats {
    pub fn mean_step_seconds(&self) -> f64 {
        if self.steps == 0 { 0.0 } else { self.busy_seconds / self.steps as f64 }
    }
}

/// A stage's KV pool (no blocks: no attention layer there) and sequence slots, now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolCounters {
    pub block_size: u32,
    pub blocks: u32,
    pub used_blocks: u32,
    pub slots: u32,
    pub used_slots: u32,
}

/// What a stage reports about itself (a node's `Health`): counters since it started,
/// which benchmarks take differences of, and what it holds now.
#[derive(Debug, Clone, Copy, Default)]
pub struct NodeCounters {
    /// Steps run through the stage, their rows, and the seconds spent in them.
    pub steps: u64,
    pub rows: u64,
    pub compute_seconds: f64,
    /// Steps handed downstream, and the seconds until their results came back.
    pub waited_steps: u64,
    pub downstream_wait_seconds: f64,
    pub weight_bytes: u64,
    pub cache_bytes: u64,
    pub sequences: usize,
    pub pool: PoolCounters,
}

impl NodeCounters {
    /// The counters' growth since `before`; what is held now is this reading's.
    pub fn since(&self, before: &NodeCounters) -> NodeCounters {
        NodeCounters {
            steps: self.steps - before.steps,
            rows: self.rows - before.rows,
            compute_seconds: self.compute_seconds - before.compute_seconds,
            waited_steps: self.waited_steps - before.waited_steps,
            downstream_wait_seconds: self.downstream_wait_seconds - before.downstream_wait_seconds,
            ..*self
        }
    }
}

/// Upper bounds (seconds) of the step-latency buckets.
pub const LATENCY_BOUNDS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// Step latencies in fixed buckets (Prometheus histogram semantics, counts not cumulative).
#[derive(Debug, Clone, Default)]
pub struct LatencyHistogram {
    /// One count per bound in [`LATENCY_BOUNDS`], plus one for larger values.
    pub counts: [u64; LATENCY_BOUNDS.len() + 1],
    pub sum_seconds: f64,
    pub count: u64,
}

impl LatencyHistogram {
    pub fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        let i = LATENCY_BOUNDS.iter().position(|&b| s <= b).unwrap_or(LATENCY_BOUNDS.len());
        self.counts[i] += 1;
        self.sum_seconds += s;
        self.count += 1;
    }
}

/// An engine for tests of what drives one: it answers each step at once.
#[cfg(test)]
pub(crate) mod testing {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use anyhow::Context;

    use super::*;

    /// One sequence's part of a submitted step, or a release (`len` 0), as the engine saw it.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) struct Logged {
        /// The step's number (releases: the number the next step would get).
        pub step: u64,
        pub seq: SeqId,
        pub len: usize,
        pub pos: u32,
        pub history: usize,
        pub want_token: bool,
        pub checkpoint: bool,
        pub release: bool,
    }

    type Answer = Box<dyn FnMut(&SeqStep<'_>) -> StepOutcome + Send>;

    /// Answers each sequence of each step with `answer` (context 64, steps of at most 4
    /// rows, 8 sequences, no KV pool unless set) and logs every step and release, in order,
    /// where a test can read them from another thread.
    pub(crate) struct Scripted {
        answer: Answer,
        pub results: VecDeque<StepDone>,
        pub log: Arc<Mutex<Vec<Logged>>>,
        pub kv: Option<KvCapacity>,
        pub max_batch: u32,
        /// From this step on, `next_result` fails as a whole (a pipeline losing a node).
        pub fail_after: Option<u64>,
        /// Whether `recover` works (clearing `fail_after` and every step in flight).
        pub recoverable: bool,
        pub recoveries: u32,
        /// What [`Engine::checkpoints`] answers.
        pub checkpoints: bool,
        /// What [`Engine::draft_max`] answers.
        pub draft_max: u32,
        /// What [`Engine::mtp`] answers.
        pub mtp: bool,
        next: u64,
    }

    impl Scripted {
        pub fn new(answer: impl FnMut(&SeqStep<'_>) -> StepOutcome + Send + 'static) -> Scripted {
            Scripted {
                answer: Box::new(answer),
                results: VecDeque::new(),
                log: Arc::default(),
                kv: None,
                max_batch: 4,
                fail_after: None,
                recoverable: false,
                recoveries: 0,
                checkpoints: false,
                draft_max: 0,
                mtp: false,
                next: 0,
            }
        }

        pub fn log(&self) -> Vec<Logged> {
            self.log.lock().unwrap().clone()
        }

        fn log_release(&self, seq: SeqId) {
            let logged = Logged {
                step: self.next,
                seq,
                len: 0,
                pos: 0,
                history: 0,
                want_token: false,
                checkpoint: false,
                release: true,
            };
            self.log.lock().unwrap().push(logged);
        }
    }

    impl Engine for Scripted {
        fn submit(&mut self, seqs: &[SeqStep<'_>]) -> anyhow::Result<u64> {
            let step = self.next;
            self.next += 1;
            let mut outcomes = Vec::new();
            for s in seqs {
                let logged = Logged {
                    step,
                    seq: s.seq,
                    len: s.ids.len(),
                    pos: s.pos,
                    history: s.history.len(),
                    want_token: s.want_token,
                    checkpoint: s.checkpoint,
                    release: false,
                };
                self.log.lock().unwrap().push(logged);
                outcomes.push((s.seq, (self.answer)(s)));
            }
            self.results.push_back(StepDone { step, outcomes });
            Ok(step)
        }
        fn next_result(&mut self) -> anyhow::Result<StepDone> {
            let done = self.results.pop_front().context("nothing submitted")?;
            if self.fail_after.is_some_and(|n| done.step >= n) {
                anyhow::bail!("the result stream broke");
            }
            Ok(done)
        }
        fn release(&mut self, seq: SeqId) -> anyhow::Result<()> {
            self.log_release(seq);
            Ok(())
        }
        fn ctx(&self) -> u32 {
            64
        }
        fn recover(&mut self) -> anyhow::Result<Recovered> {
            anyhow::ensure!(self.recoverable, "no node is left");
            self.fail_after = None;
            self.results.clear();
            self.recoveries += 1;
            // Every sequence goes: logged as a release of sequence 0.
            self.log_release(0);
            Ok(Recovered { left_out: vec!["b".into()], why: Vec::new(), nodes: vec!["a".into()], seconds: 0.0 })
        }
        fn max_batch(&self) -> u32 {
            self.max_batch
        }
        fn max_seqs(&self) -> u32 {
            8
        }
        fn kv_capacity(&self) -> Option<KvCapacity> {
            self.kv
        }
        fn checkpoints(&self) -> bool {
            self.checkpoints
        }
        fn draft_max(&self) -> u32 {
            self.draft_max
        }

        fn mtp(&self) -> bool {
            self.mtp
        }
        fn stats(&self) -> EngineStats {
            EngineStats::default()
        }
        fn placement(&self) -> Vec<Placement> {
            Vec::new()
        }
        fn weight_bytes_per_token(&self) -> u64 {
            0
        }
        fn node_counters(&self) -> anyhow::Result<Vec<NodeCounters>> {
            Ok(Vec::new())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::testing::Scripted;
    use super::*;

    #[test]
    fn latency_buckets() {
        let mut h = LatencyHistogram::default();
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(30));
        h.observe(Duration::from_secs(60));
        assert_eq!(h.counts[0], 1);
        assert_eq!(h.counts[5], 1);
        assert_eq!(h.counts[LATENCY_BOUNDS.len()], 1);
        assert_eq!(h.count, 3);
    }

    #[test]
    fn prefill_sends_prompt_chunks_and_asks_only_the_last_for_a_token() {
        let fail_at = Arc::new(Mutex::new(Vec::new()));
        let failing = fail_at.clone();
        let mut e = Scripted::new(move |step| {
            if failing.lock().unwrap().contains(&step.pos) {
                Err(StepError::new(ErrorCode::OutOfOrder, format!("at {}", step.pos)))
            } else {
                Ok(step.want_token.then_some(Sampled::token(1000 + step.pos)))
            }
        });
        let greedy = SamplingParams::greedy();
        assert_eq!(e.prefill(3, &[1; 10], 2, &greedy, &[]).unwrap(), 1010);
        let steps: Vec<_> = e.log().iter().map(|s| (s.len, s.pos, s.history, s.want_token)).collect();
        assert_eq!(steps, [(4, 2, 0, false), (4, 6, 0, false), (2, 10, 0, true)]);
        assert_eq!(e.step(3, 5, 12, &greedy, &[]).unwrap(), 1012);
        assert!(e.results.is_empty());
        // With penalties, each chunk carries its ids as history.
        let penalised = SamplingParams { repeat_penalty: 1.1, ..SamplingParams::greedy() };
        e.prefill(5, &[1; 6], 0, &penalised, &[]).unwrap();
        let tail: Vec<_> = e.log().iter().rev().take(2).map(|s| (s.len, s.history)).collect();
        assert_eq!(tail, [(2, 2), (4, 4)]);
        // A failed chunk fails the prefill with its own error, and leaves no result behind.
        *fail_at.lock().unwrap() = vec![6];
        let err = e.prefill(4, &[1; 10], 2, &greedy, &[]).unwrap_err();
        assert_eq!(err.downcast_ref::<StepError>().map(|e| e.code), Some(ErrorCode::OutOfOrder), "{err:#}");
        assert!(e.results.is_empty());
    }
}
