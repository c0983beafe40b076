//! A stage: a contiguous range of a model's layers on one GPU, with the embedding if it
//! is first and the output head (and sampling) if it is last.
//!
//! Loading uploads the range's weights and records each sequence's dispatch lists once
//! (decode and prefill); a step then writes the step uniform and its inputs, encodes the
//! recorded lists and submits once. Only token ids (or hidden states, between stages)
//! are read back.

use std::collections::HashMap;
use std::ops::Range;
use std::time::Instant;

use strata_model::config::{LayerKind, ModelConfig};
use strata_model::gguf::Gguf;
use strata_model::sampling::{Candidate, MAX_CANDIDATES, Sampler, SamplingParams};

use crate::arch::{self, Layer, LayerState};
use crate::gpu::{Dispatch, Gpu, KernelCache, Step, encode_pass};
use crate::kv_cache::KvCache;
use crate::layers::LoadCtx;
use crate::ops::elementwise::Row;
use crate::ops::norm::RmsNorm;
use crate::ops::sample::{Penalize, Penalties, TopK, top_k_words};
use crate::ops::{Act, Recorder};
use crate::scratch::Scratch;
use crate::weights::QuantMatrix;
use crate::{Error, Result};

/// Identifies a sequence (a conversation's token stream) across steps and stages.
pub type SeqId = u64;

/// What a stage is asked to hold.
#[derive(Debug, Clone)]
pub struct StageSpec {
    /// Layers `[start, end)` of the main forward pass.
    pub layers: Range<usize>,
    /// Positions of KV cache per sequence.
    pub ctx: u32,
    /// The most tokens one step may carry (a prefill chunk).
    pub max_batch: u32,
}

/// A step's input: token ids for the first stage, hidden states for the others.
pub enum Input<'a> {
    Tokens(&'a [u32]),
    /// f32 `[n_tokens, n_embd]`.
    Hidden(&'a [f32]),
}

/// A step's output: hidden states to hand on, or (last stage) the sampled token.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Hidden(Vec<f32>),
    Token(u32),
}

/// Log-probabilities at a sampled position (natural log, over the whole vocabulary).
#[derive(Debug, Clone, PartialEq)]
pub struct Logprobs {
    /// The sampled token's.
    pub token: f32,
    /// The most likely tokens, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// What `forward_inner` produced.
enum Produced {
    Hidden(Vec<f32>),
    Token(u32, Option<Logprobs>),
}

/// The output norm and head, with the buffers of the last row only.
struct Head {
    output: QuantMatrix,
    logits: wgpu::Buffer,
    /// u32 words: the argmax, or the top candidates (see `sample::top_k_words`).
    result: wgpu::Buffer,
    /// Recent token ids for the penalties.
    recent: wgpu::Buffer,
    /// The step's last row of the residual into `x_last`, at the step's token count.
    last_row: Vec<Dispatch>,
    /// Output norm and head on `x_last`: one row.
    logits_dispatches: Vec<Dispatch>,
    sample_argmax: Vec<Dispatch>,
    penalize: Penalize,
    /// The penalties (a no-op until set), then the top candidates.
    sample_top_k: Vec<Dispatch>,
}

/// Recent tokens the repetition penalties look at, at most.
const MAX_RECENT: usize = 256;

struct Sequence {
    states: Vec<LayerState>,
    decode: Vec<Dispatch>,
    prefill: Vec<Dispatch>,
    sampler: Option<Sampler>,
    history: Vec<u32>,
    last_used: Instant,
    /// The position the next step must start at, for layers whose state cannot rewind.
    next_pos: u32,
}

impl Sequence {
    /// Moves the sequence to a step at `positions`. A KV cache may be overwritten at any
    /// position, but DeltaNet's recurrent state only moves forward: restarting at 0 resets
    /// it; anything else out of order is refused.
    fn move_to(&mut self, gpu: &Gpu, seq: SeqId, positions: &[u32]) -> Result<()> {
        let recurrent = self.states.iter().any(|st| matches!(st, LayerState::DeltaNet(_)));
        if recurrent && positions[0] != self.next_pos {
            if positions[0] != 0 {
                let message =
                    format!("step at position {} but its recurrent state is at {}", positions[0], self.next_pos);
                return Err(Error::Sequence { seq, message });
            }
            for st in &self.states {
                if let LayerState::DeltaNet(d) = st {
                    d.reset(gpu);
                }
            }
        }
        if recurrent && positions.windows(2).any(|w| w[1] != w[0] + 1) {
            return Err(Error::Sequence { seq, message: "a step's positions must be consecutive".into() });
        }
        self.next_pos = positions[positions.len() - 1] + 1;
        Ok(())
    }

    /// The token sampled from the top candidates the head read back (`words`, see
    /// [`TopK::from_words`]), and its log-probabilities when asked for.
    fn pick(
        &mut self,
        words: &[u32],
        sampling: &SamplingParams,
        logprobs: Option<usize>,
    ) -> Result<(u32, Option<Logprobs>)> {
        let top = TopK::from_words(words, MAX_CANDIDATES as u32);
        let candidates: Vec<Candidate> =
            top.entries.iter().map(|&(id, logit)| Candidate { id, logit }).filter(|c| c.logit.is_finite()).collect();
        // Greedy with logprobs: the top candidate (ties to the lower id, as argmax).
        let token = if sampling.is_greedy() && !sampling.has_penalties() {
            candidates.first().map(|c| c.id).ok_or_else(|| Error::Step("no finite logit in the row".into()))?
        } else {
            if self.sampler.as_ref().is_none_or(|smp| smp.params() != sampling) {
                self.sampler = Some(Sampler::new(sampling.clone())?);
            }
            self.sampler.as_mut().expect("set above").sample(&candidates)?
        };
        let lp = logprobs.map(|k| {
            let logprob = |logit: f32| logit - top.log_sum_exp;
            Logprobs {
                token: top.entries.iter().find(|e| e.0 == token).map_or(f32::NEG_INFINITY, |e| logprob(e.1)),
                top: top.entries.iter().take(k).map(|&(id, logit)| (id, logprob(logit))).collect(),
            }
        });
        Ok((token, lp))
    }
}

pub struct Stage {
    gpu: std::sync::Arc<Gpu>,
    kernels: KernelCache,
    config: ModelConfig,
    spec: StageSpec,
    embed: Option<QuantMatrix>,
    layers: Vec<Box<dyn Layer>>,
    head: Option<Head>,
    scratch: Scratch,
    staging: wgpu::Buffer,
    seqs: HashMap<SeqId, Sequence>,
    /// A recorded, unused sequence state, so that a new sequence costs no recording.
    spare: Option<Sequence>,
}

impl Stage {
    pub fn load(gpu: std::sync::Arc<Gpu>, gguf: &Gguf, spec: StageSpec) -> Result<Stage> {
        let config = ModelConfig::from_gguf(gguf)?;
        Stage::check_spec(&config, &spec, gpu.max_binding())?;
        // Whatever the device refuses while loading (a buffer it cannot allocate) is this
        // load's error, not a panic of wgpu's default handler.
        let scope = gpu.clone();
        scope.scoped("loading a stage", || Stage::build(gpu, gguf, spec, config))
    }

    fn build(gpu: std::sync::Arc<Gpu>, gguf: &Gguf, spec: StageSpec, config: ModelConfig) -> Result<Stage> {
        let n_layer = config.n_layer();
        let kernels = KernelCache::new();
        let ctx = LoadCtx { gguf, gpu: &gpu, kernels: &kernels };
        let t0 = Instant::now();
        let e = config.n_embd;
        let first = spec.layers.start == 0;
        let last = spec.layers.end == n_layer;
        let globals = config.global_tensors();
        let embed = if first { Some(ctx.matrix(&globals.token_embd)?) } else { None };
        let layers = spec.layers.clone().map(|i| arch::load_layer(&ctx, &config, i)).collect::<Result<Vec<_>>>()?;
        let has_deltanet = spec.layers.clone().any(|i| config.layers[i] == LayerKind::DeltaNet);
        let scratch = Scratch::new(&gpu, &config, spec.max_batch, has_deltanet)?;
        let head = if last { Some(Head::load(&ctx, &config, &scratch)?) } else { None };
        let staging = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("staging"),
            size: (u64::from(spec.max_batch) * e as u64 * 4).max(MAX_CANDIDATES as u64 * 8 + 16),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut stage = Stage {
            gpu,
            kernels,
            config,
            spec,
            embed,
            layers,
            head,
            scratch,
            staging,
            seqs: HashMap::new(),
            spare: None,
        };
        // Compile every pipeline and build every bind group now, not on the first request:
        // one sequence's state is recorded ahead and handed to the first sequence to come.
        stage.spare = Some(stage.new_sequence()?);
        tracing::info!(layers = ?stage.spec.layers, weights_mb = stage.weight_bytes() as f64 / 1e6, secs = t0.elapsed().as_secs_f64(), "stage loaded");
        Ok(stage)
    }

    /// Refuses a spec whose buffers the adapter cannot hold, before anything is dropped or
    /// allocated (wgpu answers an oversized buffer with a panic, not an error). Mirrors what
    /// a stage allocates by `max_batch` (activations of the widest per-token row) and by
    /// `ctx` (each attention layer's K and V), against `max_binding`, the adapter's largest
    /// storage binding (`max_storage_buffer_binding_size`, at most `max_buffer_size`).
    pub fn check_spec(config: &ModelConfig, spec: &StageSpec, max_binding: u64) -> Result<()> {
        let n_layer = config.n_layer();
        if spec.layers.start >= spec.layers.end || spec.layers.end > n_layer {
            return Err(Error::Spec(format!(
                "layer range {:?} is not within the model's {n_layer} layers",
                spec.layers
            )));
        }
        if spec.max_batch == 0 || spec.ctx == 0 {
            return Err(Error::Spec("max_batch and ctx must be at least 1".into()));
        }
        let limit = u128::from(max_binding);
        let over = |what: String| {
            Error::Spec(format!(
                "{what}, over this adapter's largest storage buffer of {max_binding} bytes (max_storage_buffer_binding_size)"
            ))
        };
        let a = &config.attention;
        let q_width = a.n_head * a.head_dim;
        let mut widths = vec![
            ("embedding", config.n_embd),
            ("feed-forward", config.n_ff),
            ("query", if a.output_gate { 2 * q_width } else { q_width }),
            ("key", a.n_head_kv * a.head_dim),
        ];
        if let Some(dn) = &config.deltanet {
            widths.extend([("DeltaNet conv", dn.conv_channels()), ("DeltaNet value", dn.value_dim())]);
        }
        let (what, width) = widths.into_iter().max_by_key(|w| w.1).expect("widths is not empty");
        let activations = u128::from(spec.max_batch) * width as u128 * 4;
        if activations > limit {
            return Err(over(format!(
                "max_batch {} needs activation buffers of {activations} bytes ({} tokens x {width} {what} values x 4 bytes)",
                spec.max_batch, spec.max_batch
            )));
        }
        if config.layers[spec.layers.clone()].contains(&LayerKind::Attention) {
            let per_position = KvCache::bytes_per_position(a.n_head_kv as u32, a.head_dim as u32) / 2;
            let kv = u128::from(spec.ctx) * u128::from(per_position);
            if kv > limit {
                return Err(over(format!("ctx {} needs a KV cache of {kv} bytes each for K and V", spec.ctx)));
            }
        }
        Ok(())
    }

    /// Opens the GPU (`adapter`: a substring of its name, else the best one) and loads
    /// `spec`'s layers of `gguf` on it.
    pub fn open(gguf: &Gguf, spec: StageSpec, adapter: Option<String>) -> Result<Stage> {
        let gpu = std::sync::Arc::new(Gpu::new(&crate::gpu::GpuConfig { adapter })?);
        Stage::load(gpu, gguf, spec)
    }

    /// The device this stage runs on.
    pub fn device(&self) -> crate::gpu::DeviceInfo {
        self.gpu.describe()
    }

    /// The device's streaming-read bandwidth in GB/s, measured now (see [`crate::bench`]).
    pub fn read_bandwidth(&self) -> Result<f64> {
        crate::bench::read_bandwidth(&self.gpu)
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn spec(&self) -> &StageSpec {
        &self.spec
    }

    pub fn is_first(&self) -> bool {
        self.embed.is_some()
    }

    pub fn is_last(&self) -> bool {
        self.head.is_some()
    }

    /// Bytes of weights held on the GPU.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes_per_token() + self.embed.as_ref().map_or(0, |e| e.bytes())
    }

    /// Weight bytes one decode step reads (every matrix once; one embedding row).
    pub fn weight_bytes_per_token(&self) -> u64 {
        let layers: u64 = self.layers.iter().map(|l| l.weight_bytes()).sum();
        let embed_row = self.embed.as_ref().map_or(0, |e| e.bytes() / e.n() as u64);
        layers + self.head.as_ref().map_or(0, |h| h.output.bytes()) + embed_row
    }

    /// Sequences holding caches here.
    pub fn sequences(&self) -> usize {
        self.seqs.len()
    }

    /// Bytes of KV caches and recurrent states held for all sequences.
    pub fn cache_bytes(&self) -> u64 {
        self.seqs.values().flat_map(|s| &s.states).map(LayerState::bytes).sum()
    }

    /// Whether `seq` holds caches here.
    pub fn has_sequence(&self, seq: SeqId) -> bool {
        self.seqs.contains_key(&seq)
    }

    /// Frees a sequence's caches.
    pub fn release(&mut self, seq: SeqId) -> bool {
        self.seqs.remove(&seq).is_some()
    }

    /// Frees sequences unused for `idle`.
    pub fn release_idle(&mut self, idle: std::time::Duration) -> usize {
        let before = self.seqs.len();
        self.seqs.retain(|_, s| s.last_used.elapsed() < idle);
        before - self.seqs.len()
    }

    fn sequence(&mut self, seq: SeqId) -> Result<&mut Sequence> {
        if !self.seqs.contains_key(&seq) {
            let s = match self.spare.take() {
                Some(s) => s,
                None => self.gpu.scoped("a new sequence's caches", || self.new_sequence())?,
            };
            self.seqs.insert(seq, s);
        }
        Ok(self.seqs.get_mut(&seq).expect("inserted above"))
    }

    /// Allocates a sequence's caches and records its dispatch lists.
    fn new_sequence(&self) -> Result<Sequence> {
        let states = self
            .layers
            .iter()
            .map(|l| l.new_state(&self.gpu, &self.config, self.spec.ctx))
            .collect::<Result<Vec<_>>>()?;
        let decode = self.record(&states, 1)?;
        let prefill = if self.spec.max_batch > 1 { self.record(&states, self.spec.max_batch)? } else { Vec::new() };
        tracing::debug!(dispatches = decode.len(), "recorded sequence");
        Ok(Sequence {
            next_pos: 0,
            states,
            decode,
            prefill,
            sampler: None,
            history: Vec::new(),
            last_used: Instant::now(),
        })
    }

    /// The dispatches of a step of up to `max_tokens` over the sequence with `states`:
    /// the embedding (first stage), then every layer in order.
    fn record(&self, states: &[LayerState], max_tokens: u32) -> Result<Vec<Dispatch>> {
        let s = &self.scratch;
        let mut rec = Recorder::new(&self.gpu, &self.kernels, &s.step, max_tokens)?;
        if let Some(table) = &self.embed {
            rec.embed(table, s.ids(), s.x())?;
        }
        for (layer, state) in self.layers.iter().zip(states) {
            layer.record(&mut rec, &self.config, s, state)?;
        }
        Ok(rec.finish())
    }

    /// Validates a step and writes its inputs; afterwards [`Stage::layer_pass`] encodes it.
    fn prepare(&mut self, seq: SeqId, input: Input<'_>, positions: &[u32]) -> Result<()> {
        let n = positions.len();
        if n == 0 || n > self.spec.max_batch as usize {
            return Err(Error::Step(format!("a step carries 1..={} tokens, got {n}", self.spec.max_batch)));
        }
        if let Some(&p) = positions.iter().find(|&&p| p >= self.spec.ctx) {
            return Err(Error::Step(format!("position {p} is past the context length {}", self.spec.ctx)));
        }
        self.write_input(input, n)?;
        let step = Step { n_tokens: n as u32, _pad: [0; 3] };
        self.gpu.queue.write_buffer(&self.scratch.step, 0, bytemuck::bytes_of(&step));
        self.gpu.queue.write_buffer(&self.scratch.positions, 0, bytemuck::cast_slice(positions));
        self.sequence(seq)?;
        let s = self.seqs.get_mut(&seq).expect("created above");
        s.last_used = Instant::now();
        s.move_to(&self.gpu, seq, positions)
    }

    /// Checks a step's ids or hidden states (`n` tokens of them) and writes them.
    fn write_input(&self, input: Input<'_>, n: usize) -> Result<()> {
        let e = self.config.n_embd;
        match input {
            Input::Tokens(ids) => {
                if !self.is_first() {
                    return Err(Error::Step("token ids sent to a stage that is not first".into()));
                }
                if ids.len() != n {
                    return Err(Error::Step(format!("{} token ids for {n} positions", ids.len())));
                }
                if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.config.n_vocab) {
                    let vocab = self.config.n_vocab;
                    return Err(Error::Step(format!("token id {bad} is outside the vocabulary of {vocab}")));
                }
                self.gpu.queue.write_buffer(&self.scratch.ids, 0, bytemuck::cast_slice(ids));
            }
            Input::Hidden(h) => {
                if self.is_first() {
                    return Err(Error::Step("hidden states sent to the first stage".into()));
                }
                if h.len() != n * e {
                    return Err(Error::Step(format!("{} hidden values for {n} tokens of width {e}", h.len())));
                }
                self.gpu.queue.write_buffer(&self.scratch.x, 0, bytemuck::cast_slice(h));
            }
        }
        Ok(())
    }

    /// The recorded layer dispatches of a step of `n` tokens of `seq`, with that count.
    fn layer_pass(&self, seq: SeqId, n: usize) -> (&[Dispatch], u32) {
        let s = &self.seqs[&seq];
        (if n == 1 { &s.decode } else { &s.prefill }, n as u32)
    }

    fn encoder(&self) -> wgpu::CommandEncoder {
        self.gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("step") })
    }

    /// Runs a prepared step's layers and reads its hidden states back (a stage without
    /// the head): one pass, one submission.
    fn run_hidden(&self, seq: SeqId, n: usize) -> Result<Vec<f32>> {
        let bytes = (n * self.config.n_embd * 4) as u64;
        let mut enc = self.encoder();
        encode_pass(&mut enc, &[self.layer_pass(seq, n)]);
        enc.copy_buffer_to_buffer(&self.scratch.x, 0, &self.staging, 0, bytes);
        self.gpu.queue.submit([enc.finish()]);
        let hidden = bytemuck::pod_collect_to_vec(&self.gpu.map_and_read(&self.staging, bytes)?);
        self.gpu.check("a step")?;
        Ok(hidden)
    }

    /// Runs a step whose token nobody needs (a prefill chunk before the last one): the
    /// last stage fills its caches and stops before the head, so no sampler state moves;
    /// any other stage returns its hidden states as [`Stage::forward`] does.
    pub fn advance(&mut self, seq: SeqId, input: Input<'_>, positions: &[u32]) -> Result<Option<Vec<f32>>> {
        self.prepare(seq, input, positions)?;
        let n = positions.len();
        if self.head.is_none() {
            return self.run_hidden(seq, n).map(Some);
        }
        let mut enc = self.encoder();
        encode_pass(&mut enc, &[self.layer_pass(seq, n)]);
        self.gpu.queue.submit([enc.finish()]);
        Ok(None)
    }

    /// Runs one step of `seq`: tokens (or hidden states) at `positions` through the
    /// stage's layers. The last stage samples the next token with `sampling`.
    pub fn forward(
        &mut self,
        seq: SeqId,
        input: Input<'_>,
        positions: &[u32],
        sampling: &SamplingParams,
    ) -> Result<Output> {
        Ok(match self.forward_inner(seq, input, positions, sampling, None)? {
            Produced::Hidden(h) => Output::Hidden(h),
            Produced::Token(t, _) => Output::Token(t),
        })
    }

    /// Like [`Stage::forward`] on the last stage, also answering the sampled token's
    /// log-probability and the `top` most likely tokens' (at most 64), over the row after
    /// repetition penalties and before temperature.
    pub fn forward_logprobs(
        &mut self,
        seq: SeqId,
        input: Input<'_>,
        positions: &[u32],
        sampling: &SamplingParams,
        top: usize,
    ) -> Result<(u32, Logprobs)> {
        match self.forward_inner(seq, input, positions, sampling, Some(top.min(MAX_CANDIDATES)))? {
            Produced::Token(t, Some(lp)) => Ok((t, lp)),
            _ => Err(Error::NotOnStage("logprobs asked of a stage without the output head".into())),
        }
    }

    fn forward_inner(
        &mut self,
        seq: SeqId,
        input: Input<'_>,
        positions: &[u32],
        sampling: &SamplingParams,
        logprobs: Option<usize>,
    ) -> Result<Produced> {
        self.prepare(seq, input, positions)?;
        let n = positions.len();
        let Some(head) = &self.head else {
            return self.run_hidden(seq, n).map(Produced::Hidden);
        };
        let (gpu, staging) = (&*self.gpu, &self.staging);
        let s = &self.seqs[&seq];
        // Log-probabilities need the row's top candidates and log-sum-exp: the top-k path.
        let greedy = sampling.is_greedy() && !sampling.has_penalties() && logprobs.is_none();
        let (sample, words): (&[Dispatch], _) = if greedy {
            (&head.sample_argmax, top_k_words(1))
        } else {
            let recent = &s.history[s.history.len().saturating_sub(sampling.repeat_last_n.min(MAX_RECENT))..];
            gpu.queue.write_buffer(&head.recent, 0, bytemuck::cast_slice(recent));
            let penalties = Penalties {
                repeat: sampling.repeat_penalty,
                frequency: sampling.frequency_penalty,
                presence: sampling.presence_penalty,
            };
            head.penalize.set(&gpu.queue, recent.len() as u32, penalties)?;
            (&head.sample_top_k, top_k_words(MAX_CANDIDATES as u32))
        };
        // The whole step in one pass: the layers, the last row, the head on it, sampling.
        let mut enc = self.encoder();
        encode_pass(
            &mut enc,
            &[self.layer_pass(seq, n), (&head.last_row, n as u32), (&head.logits_dispatches, 1), (sample, 1)],
        );
        let bytes = u64::from(words) * 4;
        enc.copy_buffer_to_buffer(&head.result, 0, staging, 0, bytes);
        gpu.queue.submit([enc.finish()]);
        let out: Vec<u32> = bytemuck::pod_collect_to_vec(&gpu.map_and_read(staging, bytes)?);
        gpu.check("a step")?;
        let s = self.seqs.get_mut(&seq).expect("prepared above");
        let (token, lp) = if greedy { (out[0], None) } else { s.pick(&out, sampling, logprobs)? };
        s.history.push(token);
        Ok(Produced::Token(token, lp))
    }

    /// Runs a step like [`Stage::forward`] but returns the last token's whole logit row
    /// instead of sampling: for tests and diagnostics only (it reads `n_vocab` floats back).
    pub fn logits(&mut self, seq: SeqId, input: Input<'_>, positions: &[u32]) -> Result<Vec<f32>> {
        if self.head.is_none() {
            return Err(Error::NotOnStage("logits asked of a stage without the output head".into()));
        }
        self.prepare(seq, input, positions)?;
        let n = positions.len();
        let head = self.head.as_ref().expect("checked above");
        let mut enc = self.encoder();
        encode_pass(&mut enc, &[self.layer_pass(seq, n), (&head.last_row, n as u32), (&head.logits_dispatches, 1)]);
        self.gpu.queue.submit([enc.finish()]);
        self.gpu.read_f32(&head.logits, self.config.n_vocab)
    }

    /// Tells the stage which prompt tokens a sequence has seen, for repetition penalties.
    pub fn note_prompt(&mut self, seq: SeqId, ids: &[u32]) -> Result<()> {
        self.sequence(seq)?.history.extend_from_slice(ids);
        Ok(())
    }
}

impl Head {
    fn load(ctx: &LoadCtx, cfg: &ModelConfig, s: &Scratch) -> Result<Head> {
        let (gpu, e, vocab) = (ctx.gpu, cfg.n_embd as u32, cfg.n_vocab as u32);
        let globals = cfg.global_tensors();
        let norm_w = ctx.vector(&globals.output_norm)?;
        let output = ctx.matrix(&globals.output)?;
        let x_last = gpu.storage("x_last", u64::from(e) * 4);
        let n_last = gpu.storage("n_last", u64::from(e) * 4);
        let logits = gpu.storage("logits", u64::from(vocab) * 4);
        let result = gpu.storage("result", u64::from(top_k_words(MAX_CANDIDATES as u32)) * 4);
        let recent = gpu.storage("recent", MAX_RECENT as u64 * 4);
        let (x_act, n_act, logits_act) =
            (Act::new(&x_last, 1, e), Act::new(&n_last, 1, e), Act::new(&logits, 1, vocab));
        let mut rec = Recorder::new(gpu, ctx.kernels, &s.step, s.max_tokens)?;
        rec.copy_row(s.x(), x_act, Row::Last)?;
        let last_row = rec.finish();
        // The head runs on the last row alone: one token, whatever the step's size.
        let mut rec = Recorder::new(gpu, ctx.kernels, &s.step_one, 1)?;
        rec.rms_norm(x_act, &norm_w, n_act, RmsNorm::new(e, 1, cfg.eps))?;
        rec.matmul(&output, n_act, logits_act, false)?;
        let logits_dispatches = rec.take();
        let row = Row::Index(0);
        rec.argmax(logits_act, row, &result)?;
        let sample_argmax = rec.take();
        let penalize = rec.penalize(logits_act, row, &recent, MAX_RECENT as u32)?;
        rec.top_k(logits_act, row, MAX_CANDIDATES as u32, &result)?;
        let mut sample_top_k = vec![penalize.dispatch.clone()];
        sample_top_k.extend(rec.finish());
        Ok(Head { output, logits, result, recent, last_row, logits_dispatches, sample_argmax, penalize, sample_top_k })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    fn tiny() -> ModelConfig {
        let gguf = Gguf::open(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny-qwen3.gguf")).unwrap();
        ModelConfig::from_gguf(&gguf).unwrap()
    }

    #[test]
    fn specs_beyond_the_adapters_buffers_are_refused() {
        let config = tiny();
        let n = config.n_layer();
        let spec = |ctx, max_batch| StageSpec { layers: 0..n, ctx, max_batch };
        let limit = 128 << 20;
        assert!(Stage::check_spec(&config, &spec(4096, 512), limit).is_ok());
        let e = Stage::check_spec(&config, &spec(64, 4_000_000_000), limit).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        let e = e.to_string();
        assert!(e.contains("max_batch 4000000000") && e.contains("max_storage_buffer_binding_size"), "{e}");
        let e = Stage::check_spec(&config, &spec(u32::MAX, 8), limit).unwrap_err().to_string();
        assert!(e.contains("ctx 4294967295") && e.contains(&limit.to_string()), "{e}");
        let e =
            Stage::check_spec(&config, &StageSpec { layers: 0..n + 1, ..spec(64, 8) }, limit).unwrap_err().to_string();
        assert!(e.contains("layer range"), "{e}");
        assert!(Stage::check_spec(&config, &spec(0, 8), limit).is_err());
    }
}
