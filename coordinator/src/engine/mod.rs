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
use strata_node::stage::{Logprobs, SeqId};

use crate::cli::EngineArgs;
pub use local::LocalEngine;
pub use pipeline::{Pipeline, time_hops};

/// Default context when the model's own is larger: keeps KV memory modest.
const DEFAULT_CTX: u32 = 4096;

/// The context length asked for, or the model's own up to [`DEFAULT_CTX`].
pub fn context_length(gguf: &Gguf, args: &EngineArgs) -> anyhow::Result<u32> {
    let config = strata_model::config::ModelConfig::from_gguf(gguf)?;
    Ok(args.ctx.unwrap_or_else(|| (config.context_length as u32).min(DEFAULT_CTX)))
}

/// A pipeline when `args` names peers, `--no-local`, `--split` or `--discover`; else one
/// in-process stage.
pub fn load(gguf: &Gguf, args: &EngineArgs) -> anyhow::Result<Box<dyn Engine>> {
    Ok(if args.is_pipeline() {
        Box::new(Pipeline::load(gguf, args)?)
    } else {
        Box::new(LocalEngine::load(gguf, args)?)
    })
}

/// One step of one sequence, as a caller hands it to an engine.
pub struct Step<'a> {
    pub seq: SeqId,
    pub ids: &'a [u32],
    pub positions: &'a [u32],
    pub sampling: &'a SamplingParams,
    /// The ids are prompt tokens (a prefill chunk), not yet in the sequence's history;
    /// an engine that applies repetition penalties must note them.
    pub prompt: bool,
    /// Whether the caller needs the sampled token (false for all but the last prefill chunk).
    pub want_token: bool,
    /// With the token, its log-probability and this many top alternatives'.
    pub logprobs: Option<u32>,
}

/// A sampled token, and its log-probabilities when the step asked for them.
#[derive(Debug, Clone)]
pub struct Sampled {
    pub token: u32,
    pub logprobs: Option<Logprobs>,
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

/// What a finished step yields: its token (`None` when it asked for none) or its error.
pub type StepOutcome = Result<Option<Sampled>, StepError>;

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
/// `submit` starts a step and may return before it finishes; `next_result` returns the
/// outcome of a submitted step (in any order; each submitted step yields exactly one
/// result). A pipelined engine keeps several sequences in flight: stage k works on one
/// while stage k+1 works on another.
pub trait Engine: Send {
    /// Starts a step. An error here concerns this step only (it yields no result).
    fn submit(&mut self, step: Step<'_>) -> anyhow::Result<()>;
    /// The next finished step: its sequence and outcome. The outer error means the
    /// engine itself failed: every step in flight is lost.
    fn next_result(&mut self) -> anyhow::Result<(SeqId, StepOutcome)>;
    /// Frees a sequence's caches on every stage. Releasing an unknown sequence is not an error.
    fn release(&mut self, seq: SeqId) -> anyhow::Result<()>;
    /// Positions of KV cache per sequence.
    fn ctx(&self) -> u32;
    /// The most tokens one step may carry (a prefill chunk).
    fn max_batch(&self) -> u32;
    /// Where the model runs and what each stage holds, for `/v1/cluster` and `/metrics`.
    fn stats(&self) -> EngineStats;
    /// Every stage, in pipeline order.
    fn placement(&self) -> Vec<Placement>;
    /// Weight bytes one decode step reads, all stages together.
    fn weight_bytes_per_token(&self) -> u64;
    /// The device's streaming-read bandwidth in GB/s, measured now; `None` (the default)
    /// for a pipeline, whose stages run on different devices.
    fn read_bandwidth(&self) -> anyhow::Result<Option<f64>> {
        Ok(None)
    }
    /// Each node's own counters, read now, in pipeline order; empty (the default) for the
    /// in-process engine, which has no node.
    fn node_counters(&self) -> anyhow::Result<Vec<NodeCounters>> {
        Ok(Vec::new())
    }

    /// Feeds `ids` from `pos` in chunks of [`Engine::max_batch`] and returns the token
    /// sampled after the last; only the last chunk asks for one. For a caller driving
    /// one sequence (`run`, `bench`): it collects every result it submitted.
    fn prefill(&mut self, seq: SeqId, ids: &[u32], pos: u32, sampling: &SamplingParams) -> anyhow::Result<u32> {
        let chunks: Vec<&[u32]> = ids.chunks(self.max_batch().max(1) as usize).collect();
        anyhow::ensure!(!chunks.is_empty(), "nothing to prefill");
        let mut p = pos;
        for (i, chunk) in chunks.iter().enumerate() {
            let positions: Vec<u32> = (p..p + chunk.len() as u32).collect();
            let want_token = i + 1 == chunks.len();
            self.submit(Step {
                seq,
                ids: chunk,
                positions: &positions,
                sampling,
                prompt: true,
                want_token,
                logprobs: None,
            })?;
            p += chunk.len() as u32;
        }
        let (mut token, mut failed) = (None, None);
        for _ in 0..chunks.len() {
            match self.next_result()?.1 {
                Ok(Some(sampled)) => token = Some(sampled.token),
                Ok(None) => {}
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failed {
            return Err(e.into());
        }
        token.context("the last prefill chunk yielded no token")
    }

    /// Runs one decode step (for a caller driving one sequence) and returns its token.
    fn step(&mut self, seq: SeqId, ids: &[u32], positions: &[u32], sampling: &SamplingParams) -> anyhow::Result<u32> {
        self.submit(Step { seq, ids, positions, sampling, prompt: false, want_token: true, logprobs: None })?;
        let sampled = self.next_result()?.1?;
        sampled.map(|s| s.token).context("a decode step yielded no token")
    }
}

/// A snapshot of an engine: one entry per stage, in pipeline order.
#[derive(Debug, Clone, Default)]
pub struct EngineStats {
    pub n_layer: usize,
    pub stages: Vec<StageStats>,
    /// From submitting a step that wants a token to its token coming back.
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
    /// Steps (prefill chunks and decode tokens) the stage has run, and its time in them.
    pub steps: u64,
    pub busy_seconds: f64,
}

impl StageStats {
    pub fn mean_step_seconds(&self) -> f64 {
        if self.steps == 0 { 0.0 } else { self.busy_seconds / self.steps as f64 }
    }
}

/// What a node reports about itself (its `Health`): counters since it started, which
/// benchmarks take differences of, and what it holds now.
#[derive(Debug, Clone, Copy, Default)]
pub struct NodeCounters {
    /// Activations run through the stage, and the seconds spent in them.
    pub steps: u64,
    pub compute_seconds: f64,
    /// Steps that wanted a token handed downstream, and the seconds until their results
    /// came back.
    pub waited_steps: u64,
    pub downstream_wait_seconds: f64,
    pub weight_bytes: u64,
    pub cache_bytes: u64,
    pub sequences: usize,
}

impl NodeCounters {
    /// The counters' growth since `before`; what is held now is this reading's.
    pub fn since(&self, before: &NodeCounters) -> NodeCounters {
        NodeCounters {
            steps: self.steps - before.steps,
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

    /// One submitted step, or a release (`len` 0), as the engine saw it.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) struct Logged {
        pub seq: SeqId,
        pub len: usize,
        pub pos: u32,
        pub prompt: bool,
        pub want_token: bool,
        pub release: bool,
    }

    type Answer = Box<dyn FnMut(&Step<'_>) -> StepOutcome + Send>;

    /// Answers each step with `answer` (context 64, steps of at most 4 tokens) and logs
    /// every step and release, in order, where a test can read them from another thread.
    pub(crate) struct Scripted {
        answer: Answer,
        pub results: VecDeque<(SeqId, StepOutcome)>,
        pub log: Arc<Mutex<Vec<Logged>>>,
    }

    impl Scripted {
        pub fn new(answer: impl FnMut(&Step<'_>) -> StepOutcome + Send + 'static) -> Scripted {
            Scripted { answer: Box::new(answer), results: VecDeque::new(), log: Arc::default() }
        }

        pub fn log(&self) -> Vec<Logged> {
            self.log.lock().unwrap().clone()
        }
    }

    impl Engine for Scripted {
        fn submit(&mut self, step: Step<'_>) -> anyhow::Result<()> {
            let (seq, len, pos) = (step.seq, step.ids.len(), step.positions[0]);
            let logged = Logged { seq, len, pos, prompt: step.prompt, want_token: step.want_token, release: false };
            self.log.lock().unwrap().push(logged);
            let outcome = (self.answer)(&step);
            self.results.push_back((seq, outcome));
            Ok(())
        }
        fn next_result(&mut self) -> anyhow::Result<(SeqId, StepOutcome)> {
            self.results.pop_front().context("nothing submitted")
        }
        fn release(&mut self, seq: SeqId) -> anyhow::Result<()> {
            let logged = Logged { seq, len: 0, pos: 0, prompt: false, want_token: false, release: true };
            self.log.lock().unwrap().push(logged);
            Ok(())
        }
        fn ctx(&self) -> u32 {
            64
        }
        fn max_batch(&self) -> u32 {
            4
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
            if failing.lock().unwrap().contains(&step.positions[0]) {
                Err(StepError::new(ErrorCode::OutOfOrder, format!("at {}", step.positions[0])))
            } else {
                Ok(step.want_token.then_some(Sampled { token: 1000 + step.positions[0], logprobs: None }))
            }
        });
        let greedy = SamplingParams::greedy();
        assert_eq!(e.prefill(3, &[1; 10], 2, &greedy).unwrap(), 1010);
        let steps: Vec<_> = e.log().iter().map(|s| (s.len, s.pos, s.prompt, s.want_token)).collect();
        assert_eq!(steps, [(4, 2, true, false), (4, 6, true, false), (2, 10, true, true)]);
        assert_eq!(e.step(3, &[5], &[12], &greedy).unwrap(), 1012);
        assert!(e.results.is_empty());
        // A failed chunk fails the prefill with its own error, and leaves no result behind.
        *fail_at.lock().unwrap() = vec![6];
        let err = e.prefill(4, &[1; 10], 2, &greedy).unwrap_err();
        assert_eq!(err.downcast_ref::<StepError>().map(|e| e.code), Some(ErrorCode::OutOfOrder), "{err:#}");
        assert!(e.results.is_empty());
    }
}
