//! One thread owns the engine and serves many sequences at once.
//!
//! Every loop iteration admits waiting requests (up to `max_seqs` active), releases the
//! sequences of requests whose receiver has gone (a client that disconnected, a Ctrl-C),
//! then advances every active sequence by one step (one prefill chunk or one decode
//! token) and collects the results. No request holds the engine while others wait, and
//! a pipelined engine can keep all of an iteration's steps in flight at once: that is why
//! [`Engine`] splits a step into `submit` and `next_result`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strata_model::sampling::SamplingParams;
use strata_model::tokenizer::{TextStream, Tokenizer};
use strata_node::stage::SeqId;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::engine::{Engine, EngineStats, ErrorCode, Sampled, Step, StepError};

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
    pub queued: usize,
    pub engine: EngineStats,
    pub prompt_tokens_total: u64,
    pub generated_tokens_total: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Sequences generating at once; more requests wait in a queue.
    pub max_seqs: usize,
}

struct Job {
    id: u64,
    request: GenRequest,
    events: UnboundedSender<Event>,
    submitted: Instant,
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
}

impl Scheduler {
    pub fn spawn(
        engine: Box<dyn Engine>,
        tokenizer: Arc<Tokenizer>,
        config: SchedulerConfig,
    ) -> anyhow::Result<Scheduler> {
        let (jobs, rx) = std::sync::mpsc::channel();
        let snapshot = Snapshot { engine: engine.stats(), ..Snapshot::default() };
        let shared = Arc::new(Shared { snapshot: Mutex::new(snapshot), recent: Mutex::new(VecDeque::new()) });
        let ctx = engine.ctx();
        let s = shared.clone();
        std::thread::Builder::new().name("scheduler".into()).spawn(move || {
            let mut engine = engine;
            Loop {
                engine: &mut *engine,
                tok: &tokenizer,
                jobs: rx,
                shared: s,
                max_seqs: config.max_seqs.max(1),
                totals: (0, 0),
            }
            .run()
        })?;
        Ok(Scheduler { jobs, shared, next_id: Arc::new(AtomicU64::new(1)), ctx })
    }

    pub fn ctx(&self) -> u32 {
        self.ctx
    }

    /// Queues a request; its events arrive on the returned receiver. Dropping the
    /// receiver cancels the request and frees its sequence.
    pub fn submit(&self, request: GenRequest) -> anyhow::Result<(u64, UnboundedReceiver<Event>)> {
        let (events, rx) = unbounded_channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.jobs
            .send(Job { id, request, events, submitted: Instant::now() })
            .map_err(|_| anyhow::anyhow!("the scheduler has stopped"))?;
        Ok((id, rx))
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

/// One admitted request.
struct Active<'t> {
    job: Job,
    seq: SeqId,
    span: tracing::Span,
    /// Prompt tokens already sent.
    prefilled: usize,
    stream: TextStream<'t>,
    stop: StopMatcher,
    generated: usize,
    /// The token to feed next (decode phase).
    last: Option<u32>,
    first_token: Option<Instant>,
    finish: Option<FinishReason>,
    failed: Option<StepError>,
}

struct Loop<'a> {
    engine: &'a mut dyn Engine,
    tok: &'a Tokenizer,
    jobs: std::sync::mpsc::Receiver<Job>,
    shared: Arc<Shared>,
    max_seqs: usize,
    /// Prompt and generated tokens, all requests.
    totals: (u64, u64),
}

impl<'a> Loop<'a> {
    fn run(mut self) {
        let mut waiting: VecDeque<Job> = VecDeque::new();
        let mut active: Vec<Active<'a>> = Vec::new();
        let mut next_seq: SeqId = 1;
        loop {
            if active.is_empty() && waiting.is_empty() {
                // Idle: wake now and then to refresh the snapshot (a pipeline's nodes free
                // sequences on their own, and their counters move).
                match self.jobs.recv_timeout(IDLE_REFRESH) {
                    Ok(job) => waiting.push_back(job),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
            while let Ok(job) = self.jobs.try_recv() {
                waiting.push_back(job);
            }
            waiting.retain(|j| !j.events.is_closed());
            while active.len() < self.max_seqs
                && let Some(job) = waiting.pop_front()
            {
                let seq = next_seq;
                next_seq += 1;
                active.extend(self.admit(job, seq));
            }
            // Receivers dropped: the client went away. Free the caches now.
            active.retain(|a| {
                if !a.job.events.is_closed() {
                    return true;
                }
                a.span.in_scope(|| tracing::info!(completion_tokens = a.generated, "request cancelled"));
                if let Err(e) = self.engine.release(a.seq) {
                    tracing::warn!("releasing sequence {}: {e:#}", a.seq);
                }
                false
            });
            if !active.is_empty() {
                self.step_all(&mut active);
            }
            let (done, keep): (Vec<_>, Vec<_>) =
                active.into_iter().partition(|a| a.finish.is_some() || a.failed.is_some());
            active = keep;
            for a in done {
                if let Err(e) = self.engine.release(a.seq) {
                    tracing::warn!("releasing sequence {}: {e:#}", a.seq);
                }
                finish(a);
            }
            let mut s = self.shared.snapshot.lock().expect("snapshot lock");
            *s = Snapshot {
                active: active.len(),
                queued: waiting.len(),
                engine: self.engine.stats(),
                prompt_tokens_total: self.totals.0,
                generated_tokens_total: self.totals.1,
            };
        }
    }

    /// Starts a request as sequence `seq`, or fails it at once when it does not fit.
    fn admit(&mut self, job: Job, seq: SeqId) -> Option<Active<'a>> {
        let span = tracing::info_span!("request", id = job.id, seq);
        span.in_scope(|| {
            tracing::debug!(prompt_tokens = job.request.prompt.len(), max_tokens = job.request.max_tokens, "admitted")
        });
        if let Err(e) = check(&job.request, self.engine.ctx()) {
            let _ = job.events.send(Event::Failed(e));
            return None;
        }
        self.totals.0 += job.request.prompt.len() as u64;
        let stop = StopMatcher::new(job.request.stop.clone());
        Some(Active {
            job,
            seq,
            span,
            prefilled: 0,
            stream: self.tok.stream(),
            stop,
            generated: 0,
            last: None,
            first_token: None,
            finish: None,
            failed: None,
        })
    }

    /// Submits one step of every active sequence, then collects every result.
    fn step_all(&mut self, active: &mut [Active<'a>]) {
        let chunk = self.engine.max_batch().max(1) as usize;
        let mut in_flight = 0;
        for a in active.iter_mut() {
            let prompt = &a.job.request.prompt;
            let (ids, start, is_prompt, want_token): (Vec<u32>, u32, bool, bool) = if a.prefilled < prompt.len() {
                let end = (a.prefilled + chunk).min(prompt.len());
                let step = (prompt[a.prefilled..end].to_vec(), a.prefilled as u32, true, end == prompt.len());
                a.prefilled = end;
                step
            } else {
                let t = a.last.expect("a decoding sequence has a last token");
                (vec![t], (prompt.len() + a.generated - 1) as u32, false, true)
            };
            let positions: Vec<u32> = (start..start + ids.len() as u32).collect();
            let step = Step {
                seq: a.seq,
                ids: &ids,
                positions: &positions,
                sampling: &a.job.request.sampling,
                prompt: is_prompt,
                want_token,
                logprobs: a.job.request.logprobs,
            };
            let _enter = a.span.enter();
            match self.engine.submit(step) {
                Ok(()) => in_flight += 1,
                Err(e) => a.failed = Some(StepError::new(ErrorCode::Internal, format!("{e:#}"))),
            }
        }
        let mut generated = 0u32;
        for _ in 0..in_flight {
            match self.engine.next_result() {
                Ok((seq, result)) => {
                    let Some(a) = active.iter_mut().find(|a| a.seq == seq) else {
                        tracing::warn!("a result for sequence {seq}, which is not active");
                        continue;
                    };
                    match result {
                        Ok(Some(sampled)) => {
                            generated += 1;
                            self.accept(a, sampled);
                        }
                        Ok(None) => {}
                        Err(e) => a.failed = Some(e),
                    }
                }
                Err(e) => {
                    tracing::error!("engine failed: {e:#}");
                    for a in active.iter_mut() {
                        a.failed.get_or_insert_with(|| {
                            StepError::new(ErrorCode::Internal, format!("engine failed: {e:#}"))
                        });
                    }
                    break;
                }
            }
        }
        if generated > 0 {
            self.totals.1 += u64::from(generated);
            self.shared.recent.lock().expect("rate lock").push_back((Instant::now(), generated));
        }
    }

    /// Takes one sampled token: stream its text (holding back what may start a stop
    /// string) and decide whether the request is done.
    fn accept(&self, a: &mut Active<'_>, sampled: Sampled) {
        let token = sampled.token;
        a.first_token.get_or_insert_with(Instant::now);
        if self.tok.is_end_of_generation(token) {
            a.finish = Some(FinishReason::Stop);
            return;
        }
        a.generated += 1;
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
        } else if a.generated >= a.job.request.max_tokens as usize
            || a.job.request.prompt.len() + a.generated >= self.engine.ctx() as usize
        {
            a.finish = Some(FinishReason::Length);
        } else {
            a.last = Some(token);
        }
    }
}

/// The request fits: a non-empty prompt with room for at least one generated token.
fn check(r: &GenRequest, ctx: u32) -> Result<(), StepError> {
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
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
            stopped: false,
        }
    }

    /// Adds text; returns what may be emitted now and whether a stop string was reached
    /// (everything from it on is dropped).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        self.pending.push_str(text);
        if let Some(at) = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            self.stopped = true;
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

    /// An engine answering a fixed ordinary token per sequence, slowly enough that a
    /// request submitted right after another joins it mid-way.
    fn slow_engine() -> Scripted {
        Scripted::new(|step| {
            std::thread::sleep(Duration::from_millis(20));
            Ok(step.want_token.then_some(Sampled { token: 300 + step.seq as u32, logprobs: None }))
        })
    }

    /// The log as lines: `seq:len@pos` per step, `release seq`.
    fn lines(log: &Mutex<Vec<Logged>>) -> Vec<String> {
        let log = log.lock().unwrap();
        log.iter()
            .map(|l| if l.release { format!("release {}", l.seq) } else { format!("{}:{}@{}", l.seq, l.len, l.pos) })
            .collect()
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

    #[test]
    fn sequences_are_interleaved_step_by_step_and_released() {
        let gguf =
            strata_model::gguf::Gguf::open(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny-qwen3.gguf"))
                .unwrap();
        let tok = Arc::new(Tokenizer::from_gguf(&gguf).unwrap());
        let engine = slow_engine();
        let log = engine.log.clone();
        let sched = Scheduler::spawn(Box::new(engine), tok.clone(), SchedulerConfig { max_seqs: 2 }).unwrap();
        let req = |n: usize, max_tokens| GenRequest {
            prompt: vec![1; n],
            sampling: SamplingParams::greedy(),
            max_tokens,
            stop: Vec::new(),
            logprobs: None,
        };
        let (_, mut a) = sched.submit(req(6, 3)).unwrap();
        let (_, mut b) = sched.submit(req(2, 3)).unwrap();
        let (fa, fb) = (collect(&mut a).1.unwrap(), collect(&mut b).1.unwrap());
        assert_eq!((fa.completion_tokens, fa.reason, fb.completion_tokens), (3, FinishReason::Length, 3));
        let log = lines(&log);
        let of = |seq: &str| log.iter().filter(|l| l.starts_with(seq)).cloned().collect::<Vec<_>>();
        // Prefill in chunks of at most 4, then one decode step per token; released at the end.
        assert_eq!(of("1:"), ["1:4@0", "1:2@4", "1:1@6", "1:1@7"]);
        assert_eq!(of("2:"), ["2:2@0", "2:1@2", "2:1@3"]);
        let at = |l: &str| log.iter().position(|x| x == l).unwrap();
        assert!(at("2:2@0") < at("1:1@6"), "the second request waited for the first: {log:?}");
        assert!(at("release 1") > at("1:1@7") && at("release 2") > at("2:1@3"), "{log:?}");
    }

    #[test]
    fn a_dropped_receiver_releases_the_sequence() {
        let gguf =
            strata_model::gguf::Gguf::open(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny-qwen3.gguf"))
                .unwrap();
        let tok = Arc::new(Tokenizer::from_gguf(&gguf).unwrap());
        let engine = slow_engine();
        let log = engine.log.clone();
        let sched = Scheduler::spawn(Box::new(engine), tok, SchedulerConfig { max_seqs: 8 }).unwrap();
        let (_, mut rx) = sched
            .submit(GenRequest {
                prompt: vec![1; 3],
                sampling: SamplingParams::greedy(),
                max_tokens: 1000,
                stop: Vec::new(),
                logprobs: None,
            })
            .unwrap();
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
}
