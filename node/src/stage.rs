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

use crate::gpu::{Dispatch, Gpu, KernelCache, Step, encode_dispatches};
use crate::kv_cache::KvCache;
use crate::layers::attention::Attention;
use crate::deltanet_state::DeltaNetState;
use crate::layers::deltanet::{DeltaNet, DeltaNetScratch};
use crate::layers::ffn::Ffn;
use crate::layers::LoadCtx;
use crate::ops::elementwise::Row;
use crate::ops::norm::{self, RmsNorm};
use crate::ops::sample::{self, Penalize, Penalties, TopK, top_k_words};
use crate::ops::{embed::embed, matmul::matmul};
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

enum Mixer {
    Attention(Attention),
    DeltaNet(DeltaNet),
}

/// A sequence's state in one layer: a KV cache, or DeltaNet's fixed recurrent state.
enum LayerState {
    Kv(KvCache),
    DeltaNet(DeltaNetState),
}

impl LayerState {
    fn bytes(&self) -> u64 {
        match self {
            LayerState::Kv(c) => c.bytes(),
            LayerState::DeltaNet(d) => d.bytes(),
        }
    }
}

struct Block {
    mixer: Mixer,
    ffn: Ffn,
}

/// The output norm and head, with the buffers of the last row only.
struct Head {
    output: QuantMatrix,
    /// The last token's residual, f32 `[n_embd]`, copied out of the batch.
    x_last: wgpu::Buffer,
    logits: wgpu::Buffer,
    /// u32 words: the argmax, or the top candidates (see `sample::top_k_words`).
    result: wgpu::Buffer,
    /// Recent token ids for the penalties.
    recent: wgpu::Buffer,
    /// Output norm and head: x_last -> logits.
    logits_dispatches: Vec<Dispatch>,
    argmax: Vec<Dispatch>,
    penalize: Penalize,
    top_k: Vec<Dispatch>,
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

pub struct Stage {
    gpu: std::sync::Arc<Gpu>,
    kernels: KernelCache,
    config: ModelConfig,
    spec: StageSpec,
    embed: Option<QuantMatrix>,
    blocks: Vec<Block>,
    head: Option<Head>,
    scratch: Scratch,
    staging: wgpu::Buffer,
    /// DeltaNet activations, when the stage has DeltaNet layers.
    dn_scratch: Option<DeltaNetScratch>,
    seqs: HashMap<SeqId, Sequence>,
    /// A recorded, unused sequence state, so that a new sequence costs no recording.
    spare: Option<Sequence>,
}

impl Stage {
    pub fn load(gpu: std::sync::Arc<Gpu>, gguf: &Gguf, spec: StageSpec) -> Result<Stage> {
        let config = ModelConfig::from_gguf(gguf)?;
        let n_layer = config.n_layer();
        if spec.layers.start >= spec.layers.end || spec.layers.end > n_layer {
            return Err(Error::Spec(format!("layer range {:?} is not within the model's {n_layer} layers", spec.layers)));
        }
        if spec.max_batch == 0 || spec.ctx == 0 {
            return Err(Error::Spec("max_batch and ctx must be at least 1".into()));
        }
        let kernels = KernelCache::new();
        let ctx = LoadCtx { gguf, gpu: &gpu, kernels: &kernels };
        let t0 = Instant::now();
        let e = config.n_embd;
        let first = spec.layers.start == 0;
        let last = spec.layers.end == n_layer;
        let embed = if first { Some(ctx.matrix("token_embd.weight", e, config.n_vocab)?) } else { None };
        let mut blocks = Vec::with_capacity(spec.layers.len());
        for i in spec.layers.clone() {
            let mixer = match config.layers[i] {
                LayerKind::Attention => Mixer::Attention(Attention::load(&ctx, &config, i)?),
                LayerKind::DeltaNet => Mixer::DeltaNet(DeltaNet::load(&ctx, &config, i)?),
            };
            blocks.push(Block { mixer, ffn: Ffn::load(&ctx, &config, i)? });
        }
        let scratch = Scratch::new(&gpu, &config, spec.max_batch);
        let has_deltanet = blocks.iter().any(|b| matches!(b.mixer, Mixer::DeltaNet(_)));
        let dn_scratch = if has_deltanet { Some(DeltaNetScratch::new(&gpu, &config, spec.max_batch)?) } else { None };
        let head = if last { Some(Head::load(&ctx, &config, &scratch)?) } else { None };
        let staging = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("staging"),
            size: (u64::from(spec.max_batch) * e as u64 * 4).max(MAX_CANDIDATES as u64 * 8 + 16),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut stage = Stage { gpu, kernels, config, spec, embed, blocks, head, scratch, staging, dn_scratch, seqs: HashMap::new(), spare: None };
        // Compile every pipeline and build every bind group now, not on the first request:
        // one sequence's state is recorded ahead and handed to the first sequence to come.
        stage.spare = Some(stage.new_sequence()?);
        tracing::info!(layers = ?stage.spec.layers, weights_mb = stage.weight_bytes() as f64 / 1e6, secs = t0.elapsed().as_secs_f64(), "stage loaded");
        Ok(stage)
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

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
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
        let blocks: u64 = self
            .blocks
            .iter()
            .map(|b| {
                let m = match &b.mixer {
                    Mixer::Attention(a) => a.bytes(),
                    Mixer::DeltaNet(d) => d.bytes(),
                };
                m + b.ffn.bytes()
            })
            .sum();
        let embed_row = self.embed.as_ref().map_or(0, |e| e.bytes() / e.n() as u64);
        blocks + self.head.as_ref().map_or(0, |h| h.output.bytes()) + embed_row
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
                None => self.new_sequence()?,
            };
            self.seqs.insert(seq, s);
        }
        Ok(self.seqs.get_mut(&seq).expect("inserted above"))
    }

    /// Allocates a sequence's caches and records its dispatch lists.
    fn new_sequence(&self) -> Result<Sequence> {
        let a = &self.config.attention;
        let states = self
            .blocks
            .iter()
            .map(|b| match b.mixer {
                Mixer::Attention(_) => KvCache::new(&self.gpu, self.spec.ctx, a.n_head_kv as u32, a.head_dim as u32).map(LayerState::Kv),
                Mixer::DeltaNet(_) => {
                    let dn = self.config.deltanet.as_ref().ok_or_else(|| Error::Spec("DeltaNet layer without its config".into()))?;
                    DeltaNetState::new(&self.gpu, dn).map(LayerState::DeltaNet)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let record = |max_tokens: u32| -> Result<Vec<Dispatch>> {
            let (gpu, kc, s, cfg) = (&*self.gpu, &self.kernels, &self.scratch, &self.config);
            let mut out = Vec::new();
            if let Some(table) = &self.embed {
                out.extend(embed(gpu, kc, &s.step, table, &s.ids, &s.x, max_tokens)?);
            }
            for (b, state) in self.blocks.iter().zip(&states) {
                match (&b.mixer, state) {
                    (Mixer::Attention(att), LayerState::Kv(cache)) => att.record(gpu, kc, cfg, s, cache, max_tokens, &mut out)?,
                    (Mixer::DeltaNet(dn), LayerState::DeltaNet(st)) => {
                        let dn_scratch = self.dn_scratch.as_ref().expect("allocated for stages with DeltaNet layers");
                        dn.record(gpu, kc, cfg, s, dn_scratch, st, max_tokens, &mut out)?
                    }
                    _ => unreachable!("states are made from the same blocks"),
                }
                b.ffn.record(gpu, kc, cfg, s, max_tokens, &mut out)?;
            }
            Ok(out)
        };
        let decode = record(1)?;
        let prefill = if self.spec.max_batch > 1 { record(self.spec.max_batch)? } else { Vec::new() };
        tracing::debug!(dispatches = decode.len(), "recorded sequence");
        Ok(Sequence { next_pos: 0, states, decode, prefill, sampler: None, history: Vec::new(), last_used: Instant::now() })
    }

    /// Validates a step, writes its inputs and encodes the sequence's layer dispatches.
    fn encode_layers(&mut self, seq: SeqId, input: Input<'_>, positions: &[u32]) -> Result<wgpu::CommandEncoder> {
        let n = positions.len();
        let e = self.config.n_embd;
        if n == 0 || n > self.spec.max_batch as usize {
            return Err(Error::Step(format!("a step carries 1..={} tokens, got {n}", self.spec.max_batch)));
        }
        if let Some(&p) = positions.iter().find(|&&p| p >= self.spec.ctx) {
            return Err(Error::Step(format!("position {p} is past the context length {}", self.spec.ctx)));
        }
        match input {
            Input::Tokens(ids) => {
                if !self.is_first() {
                    return Err(Error::Step("token ids sent to a stage that is not first".into()));
                }
                if ids.len() != n {
                    return Err(Error::Step(format!("{} token ids for {n} positions", ids.len())));
                }
                if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.config.n_vocab) {
                    return Err(Error::Step(format!("token id {bad} is outside the vocabulary of {}", self.config.n_vocab)));
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
        self.gpu.queue.write_buffer(&self.scratch.step, 0, bytemuck::bytes_of(&Step { n_tokens: n as u32, _pad: [0; 3] }));
        self.gpu.queue.write_buffer(&self.scratch.positions, 0, bytemuck::cast_slice(positions));
        self.sequence(seq)?;
        let gpu = &self.gpu;
        let s = self.seqs.get_mut(&seq).expect("created above");
        s.last_used = Instant::now();
        // A KV cache may be overwritten at any position, but DeltaNet's recurrent state
        // only moves forward: restarting at 0 resets it; anything else out of order is refused.
        let recurrent = s.states.iter().any(|st| matches!(st, LayerState::DeltaNet(_)));
        if recurrent && positions[0] != s.next_pos {
            if positions[0] != 0 {
                return Err(Error::Sequence {
                    seq,
                    message: format!("step at position {} but its recurrent state is at {}", positions[0], s.next_pos),
                });
            }
            for st in &s.states {
                if let LayerState::DeltaNet(d) = st {
                    d.reset(gpu);
                }
            }
        }
        if positions.windows(2).any(|w| w[1] != w[0] + 1) && recurrent {
            return Err(Error::Sequence { seq, message: "a step's positions must be consecutive".into() });
        }
        s.next_pos = positions[n - 1] + 1;
        let mut enc = self.gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("step") });
        encode_dispatches(&mut enc, if n == 1 { &s.decode } else { &s.prefill }, n as u32);
        Ok(enc)
    }

    /// Submits `enc` and reads the step's hidden states back (a stage without the head).
    fn finish_hidden(&self, mut enc: wgpu::CommandEncoder, n: usize) -> Result<Vec<f32>> {
        let bytes = (n * self.config.n_embd * 4) as u64;
        enc.copy_buffer_to_buffer(&self.scratch.x, 0, &self.staging, 0, bytes);
        self.gpu.queue.submit([enc.finish()]);
        Ok(bytemuck::pod_collect_to_vec(&self.gpu.map_and_read(&self.staging, bytes)?))
    }

    /// Runs a step whose token nobody needs (a prefill chunk before the last one): the
    /// last stage fills its caches and stops before the head, so no sampler state moves;
    /// any other stage returns its hidden states as [`Stage::forward`] does.
    pub fn advance(&mut self, seq: SeqId, input: Input<'_>, positions: &[u32]) -> Result<Option<Vec<f32>>> {
        let enc = self.encode_layers(seq, input, positions)?;
        if self.head.is_none() {
            return self.finish_hidden(enc, positions.len()).map(Some);
        }
        self.gpu.queue.submit([enc.finish()]);
        Ok(None)
    }

    /// Runs one step of `seq`: tokens (or hidden states) at `positions` through the
    /// stage's layers. The last stage samples the next token with `sampling`.
    pub fn forward(&mut self, seq: SeqId, input: Input<'_>, positions: &[u32], sampling: &SamplingParams) -> Result<Output> {
        Ok(match self.forward_inner(seq, input, positions, sampling, None)? {
            Produced::Hidden(h) => Output::Hidden(h),
            Produced::Token(t, _) => Output::Token(t),
        })
    }

    /// Like [`Stage::forward`] on the last stage, also answering the sampled token's
    /// log-probability and the `top` most likely tokens' (at most 64), over the row after
    /// repetition penalties and before temperature.
    pub fn forward_logprobs(&mut self, seq: SeqId, input: Input<'_>, positions: &[u32], sampling: &SamplingParams, top: usize) -> Result<(u32, Logprobs)> {
        match self.forward_inner(seq, input, positions, sampling, Some(top.min(MAX_CANDIDATES)))? {
            Produced::Token(t, Some(lp)) => Ok((t, lp)),
            _ => Err(Error::NotOnStage("logprobs asked of a stage without the output head".into())),
        }
    }

    fn forward_inner(&mut self, seq: SeqId, input: Input<'_>, positions: &[u32], sampling: &SamplingParams, logprobs: Option<usize>) -> Result<Produced> {
        let n = positions.len();
        let e = self.config.n_embd;
        let mut enc = self.encode_layers(seq, input, positions)?;
        let Some(head) = &self.head else {
            return self.finish_hidden(enc, n).map(Produced::Hidden);
        };
        let (gpu, scratch, staging) = (&*self.gpu, &self.scratch, &self.staging);
        let s = self.seqs.get_mut(&seq).expect("created by encode_layers");
        enc.copy_buffer_to_buffer(&scratch.x, ((n - 1) * e * 4) as u64, &head.x_last, 0, (e * 4) as u64);
        encode_dispatches(&mut enc, &head.logits_dispatches, 1);
        if s.sampler.as_ref().is_none_or(|smp| smp.params() != sampling) {
            s.sampler = Some(Sampler::new(sampling.clone())?);
        }
        // Log-probabilities need the row's top candidates and log-sum-exp: the top-k path.
        let greedy = sampling.is_greedy() && !sampling.has_penalties() && logprobs.is_none();
        let words = if greedy {
            encode_dispatches(&mut enc, &head.argmax, 1);
            top_k_words(1)
        } else {
            let recent = &s.history[s.history.len().saturating_sub(sampling.repeat_last_n.min(MAX_RECENT))..];
            gpu.queue.write_buffer(&head.recent, 0, bytemuck::cast_slice(recent));
            let penalties = Penalties { repeat: sampling.repeat_penalty, frequency: sampling.frequency_penalty, presence: sampling.presence_penalty };
            head.penalize.set(&gpu.queue, recent.len() as u32, penalties)?;
            encode_dispatches(&mut enc, std::slice::from_ref(&head.penalize.dispatch), 1);
            encode_dispatches(&mut enc, &head.top_k, 1);
            top_k_words(MAX_CANDIDATES as u32)
        };
        let bytes = u64::from(words) * 4;
        enc.copy_buffer_to_buffer(&head.result, 0, staging, 0, bytes);
        gpu.queue.submit([enc.finish()]);
        let out: Vec<u32> = bytemuck::pod_collect_to_vec(&gpu.map_and_read(staging, bytes)?);
        let (token, lp) = if greedy {
            (out[0], None)
        } else {
            let top = TopK::from_words(&out, MAX_CANDIDATES as u32);
            let candidates: Vec<Candidate> = top.entries.iter().map(|&(id, logit)| Candidate { id, logit }).filter(|c| c.logit.is_finite()).collect();
            // Greedy with logprobs: the top candidate (ties to the lower id, as argmax).
            let token = if sampling.is_greedy() && !sampling.has_penalties() {
                candidates.first().map(|c| c.id).ok_or_else(|| Error::Step("no finite logit in the row".into()))?
            } else {
                s.sampler.as_mut().expect("set above").sample(&candidates)?
            };
            let lp = logprobs.map(|k| {
                let logprob = |logit: f32| logit - top.log_sum_exp;
                Logprobs {
                    token: top.entries.iter().find(|e| e.0 == token).map_or(f32::NEG_INFINITY, |e| logprob(e.1)),
                    top: top.entries.iter().take(k).map(|&(id, logit)| (id, logprob(logit))).collect(),
                }
            });
            (token, lp)
        };
        s.history.push(token);
        Ok(Produced::Token(token, lp))
    }

    /// Runs a step like [`Stage::forward`] but returns the last token's whole logit row
    /// instead of sampling: for tests and diagnostics only (it reads `n_vocab` floats back).
    pub fn logits(&mut self, seq: SeqId, input: Input<'_>, positions: &[u32]) -> Result<Vec<f32>> {
        let n = positions.len();
        let e = self.config.n_embd;
        let mut enc = self.encode_layers(seq, input, positions)?;
        let head = self.head.as_ref().ok_or_else(|| Error::NotOnStage("logits asked of a stage without the output head".into()))?;
        enc.copy_buffer_to_buffer(&self.scratch.x, ((n - 1) * e * 4) as u64, &head.x_last, 0, (e * 4) as u64);
        encode_dispatches(&mut enc, &head.logits_dispatches, 1);
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
        let (gpu, kc) = (ctx.gpu, ctx.kernels);
        let (e, vocab) = (cfg.n_embd, cfg.n_vocab as u32);
        let norm_w = ctx.vector("output_norm.weight", e)?;
        let output = ctx.matrix(cfg.output_name(), e, cfg.n_vocab)?;
        let x_last = gpu.storage("x_last", e as u64 * 4);
        let n_last = gpu.storage("n_last", e as u64 * 4);
        let logits = gpu.storage("logits", u64::from(vocab) * 4);
        let result = gpu.storage("result", u64::from(top_k_words(MAX_CANDIDATES as u32)) * 4);
        let recent = gpu.storage("recent", MAX_RECENT as u64 * 4);
        let one = &s.step_one;
        let mut logits_dispatches = vec![norm::rms_norm(gpu, kc, one, &x_last, &norm_w, &n_last, RmsNorm::new(e as u32, 1, cfg.eps), 1)?];
        logits_dispatches.extend(matmul(gpu, kc, one, &output, &n_last, &logits, 1, false)?);
        let row = Row::Index(0);
        Ok(Head {
            argmax: sample::argmax(gpu, kc, one, &logits, vocab, row, &result, 1)?,
            penalize: sample::penalize(gpu, kc, one, &logits, vocab, row, &recent, MAX_RECENT as u32, 1)?,
            top_k: sample::top_k(gpu, kc, one, &logits, vocab, row, MAX_CANDIDATES as u32, &result, 1)?,
            output,
            x_last,
            logits,
            result,
            recent,
            logits_dispatches,
        })
    }
}
