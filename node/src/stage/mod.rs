//! A stage: a contiguous range of a model's layers on one GPU, with the embedding if it
//! is first and the output head (and sampling) if it is last.
//!
//! A step carries the rows of several sequences: each its own run of consecutive positions
//! (a decode token, a prefill chunk), its own sampling. Loading uploads the range's
//! weights, sizes the shared state (a paged KV pool, DeltaNet state per sequence slot) and
//! records the dispatch lists once per class of step size; a step then writes the step's
//! tables and inputs, encodes one list and the head's into one compute pass and submits
//! once. Every weight matrix is read once per step for all its rows. Only token
//! candidates (or hidden states, between stages) are read back.

mod head;
mod mtp;
mod sequences;

use std::ops::Range;
use std::time::Instant;

use strata_model::config::{LayerKind, ModelConfig};
use strata_model::gguf::Gguf;
use strata_model::sampling::{Candidate, SamplingParams};

use crate::arch::{self, Layer, LayerState, StateSize};
use crate::batch::{BatchLayout, Run};
use crate::deltanet_state::DeltaNetState;
use crate::gpu::{Dispatch, Gpu, KernelCache, Step, encode_pass};
use crate::kv_pool::{KvLayout, LayerKv};
use crate::layers::LoadCtx;
use crate::ops::Recorder;
use crate::ops::matmul::{QuantizedX, StepRows};
use crate::ops::sample::{Penalties, RowSampling, TopK};
use crate::scratch::Scratch;
use crate::weights::QuantMatrix;
use crate::{Error, Result};
use head::{Head, K_MAX};
use sequences::{MAX_RECENT, Sequences};

/// Identifies a sequence (a conversation's token stream) across steps and stages.
pub type SeqId = u64;

/// What a stage is asked to hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageSpec {
    /// Layers `[start, end)` of the main forward pass.
    pub layers: Range<usize>,
    /// Positions per sequence, at most.
    pub ctx: u32,
    /// The most rows one step may carry, all its sequences together.
    pub max_batch: u32,
    /// Sequences held at once: the stage's slots (and the most one step may carry).
    pub max_seqs: u32,
    /// Blocks in the KV pool; 0: enough for `max_seqs` sequences of `ctx` positions.
    pub kv_blocks: u32,
    /// Positions per KV block, a power of two.
    pub kv_block_size: u32,
    /// Recurrent layers keep a checkpoint of each slot's state at the position a step asks
    /// for ([`SeqStep::checkpoint`]), which a later step of that sequence may resume from:
    /// prefix reuse on models whose state cannot be cut back. As much memory again as the
    /// recurrent state.
    pub checkpoints: bool,
    /// Draft rows one sequence's step may ask the last stage to verify
    /// ([`SeqStep::verify`]); with recurrent layers, each slot also keeps a rollback state
    /// (as much memory again as the recurrent state). 0: no speculation.
    pub draft_max: u32,
    /// The last stage loads the model's MTP block and drafts up to `draft_max` tokens per
    /// sequence with it ([`SeqStep::draft`]).
    pub mtp: bool,
}

impl StageSpec {
    /// `layers` for one sequence at a time of up to `ctx` positions, in steps of up to
    /// `max_batch` rows, with a pool for it.
    pub fn new(layers: Range<usize>, ctx: u32, max_batch: u32) -> StageSpec {
        StageSpec {
            layers,
            ctx,
            max_batch,
            max_seqs: 1,
            kv_blocks: 0,
            kv_block_size: KvLayout::DEFAULT_BLOCK_SIZE,
            checkpoints: false,
            draft_max: 0,
            mtp: false,
        }
    }

    /// The most rows one step samples: each sequence's last, and with speculation its
    /// drafts' rows too, within the step's rows.
    pub fn max_samples(&self) -> u32 {
        self.max_seqs.saturating_mul(self.draft_max.saturating_add(1)).min(self.max_batch)
    }

    /// The same for `max_seqs` sequences at once.
    pub fn with_seqs(self, max_seqs: u32) -> StageSpec {
        StageSpec { max_seqs, ..self }
    }

    /// The pool's layout: `kv_blocks`, or enough for every slot's whole context.
    pub fn kv_layout(&self) -> Result<KvLayout> {
        let per_seq = self.ctx.div_ceil(self.kv_block_size.max(1));
        let blocks = if self.kv_blocks > 0 { self.kv_blocks } else { per_seq.saturating_mul(self.max_seqs) };
        KvLayout::new(self.kv_block_size, blocks, self.max_seqs, self.ctx)
    }
}

/// A step's input for one sequence (see [`Stage::forward`]): token ids for the first
/// stage, hidden states for the others.
pub enum Input<'a> {
    Tokens(&'a [u32]),
    /// f32 `[n_tokens, n_embd]`.
    Hidden(&'a [f32]),
}

/// A one-sequence step's output: hidden states to hand on, or (last stage) the token.
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

/// What a sequence wants from the last stage after its rows of a step.
#[derive(Debug, Clone, PartialEq)]
pub enum Want {
    /// Nothing: a prefill chunk before the last. Its caches fill; no sampler state moves.
    Nothing,
    /// The next token, sampled with `sampling`; with `logprobs`, its log-probability and
    /// that many top alternatives' (at most 64), over the row after repetition penalties
    /// and before temperature.
    Token { sampling: SamplingParams, logprobs: Option<usize> },
    /// The last row's whole logit row instead of a token (tests, diagnostics).
    Logits,
}

/// One sequence's part of a step.
#[derive(Debug, Clone)]
pub struct SeqStep<'a> {
    pub seq: SeqId,
    /// The position of its first row; its rows are at `pos..pos + rows`.
    pub pos: u32,
    pub rows: u32,
    /// Its token ids, on the first stage (`rows` of them); empty elsewhere.
    pub tokens: &'a [u32],
    pub want: Want,
    /// Prompt ids its penalties should count from now on (the last stage keeps them).
    pub history: &'a [u32],
    /// With [`Want::Token`]: the tokens a grammar allows this time, as bitmask words over
    /// the vocabulary (bit `v % 32` of word `v / 32`; words past the end allow nothing);
    /// empty when any token may come. Only the last stage reads it.
    pub allowed: &'a [u32],
    /// Keep a checkpoint of its recurrent state after these rows (replacing its last): a
    /// later step of the sequence may start there again (needs [`StageSpec::checkpoints`]).
    pub checkpoint: bool,
    /// A sequence this stage does not hold yet, starting at `pos > 0`: a fork of this
    /// sequence, sharing its KV blocks of positions `0..pos` (copied when either writes
    /// one) and starting from its recurrent state at `pos` (its checkpoint, or its live
    /// state when that is at `pos`).
    pub fork_from: Option<SeqId>,
    /// Speculative decoding: its last `verify` rows are draft tokens, and the last stage
    /// samples each of its last `verify + 1` rows (each from its own row, with the draw of
    /// its own position), answering [`Produced::Tokens`]. Needs [`Want::Token`] without
    /// logprobs, penalties or a grammar mask, and `verify <= StageSpec::draft_max`.
    pub verify: u32,
    /// Keep the recurrent state after its first `keep` rows (the rows sure to stay: the
    /// ones before the drafts) as its rollback state; a later step starting at that
    /// position resumes from it, dropping what the rejected drafts did.
    pub keep: u32,
    /// On a last stage with the MTP head ([`StageSpec::mtp`]): drafts to make after its
    /// last row, answered in [`StepOutput::drafts`]. The MTP head follows every sequence
    /// whose steps bring their token ids to the last stage.
    pub draft: u32,
}

impl<'a> SeqStep<'a> {
    /// `rows` rows of `seq` from `pos` (`tokens` on the first stage, else empty), with
    /// none of the optional parts: no penalties' history, no grammar mask, no checkpoint,
    /// fork, drafts or verification. Callers set those with struct-update syntax.
    pub fn new(seq: SeqId, pos: u32, rows: u32, tokens: &'a [u32], want: Want) -> SeqStep<'a> {
        SeqStep {
            seq,
            pos,
            rows,
            tokens,
            want,
            history: &[],
            allowed: &[],
            checkpoint: false,
            fork_from: None,
            verify: 0,
            keep: 0,
            draft: 0,
        }
    }
}

/// What one sequence's part of a step produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Produced {
    /// Its rows ran (and, on a stage without the head, are in [`StepOutput::hidden`]).
    Ran,
    Token(u32, Option<Logprobs>),
    /// A speculative step's samples ([`SeqStep::verify`]): one per row from its last
    /// `verify + 1`, in order; the sample of a draft's row is the model's token after it.
    Tokens(Vec<u32>),
    Logits(Vec<f32>),
}

/// A step's outcome, per sequence in the step's order.
#[derive(Debug)]
pub struct StepOutput {
    /// On a stage without the head: the hidden rows of the sequences that ran, in order.
    pub hidden: Vec<f32>,
    /// Each sequence's result: what it produced, or why it did not run (the others ran).
    pub seqs: Vec<(SeqId, Result<Produced>)>,
    /// The MTP head's drafts for each sequence's next step, in the order of `seqs` (empty
    /// where it made none, or where the token kept after the step is not the one they
    /// followed).
    pub drafts: Vec<Vec<u32>>,
}

/// A sequence of the step that passed its checks.
struct Admitted<'s> {
    index: usize,
    step: &'s SeqStep<'s>,
    slot: u32,
    /// Before the pass, its recurrent state starts over or comes back from its checkpoint;
    /// after it, a checkpoint is taken.
    reset: bool,
    restore: bool,
    save: bool,
    /// Its recurrent state comes back from its rollback state (before the pass); the
    /// kernels keep a new one mid-step (`SeqStep::keep`).
    roll_back: bool,
    keep: bool,
    /// Shared KV blocks it writes, copied first; a fork's recurrent state, copied first.
    copies: Vec<crate::kv_pool::BlockCopy>,
    fork: Option<(u32, bool)>,
    /// Its first row in the step's input (for hidden states).
    input_row: usize,
}

/// One of the step's sampled rows.
struct Sample {
    /// Index into the step's sequences.
    index: usize,
    k: u32,
    /// The row within its sequence's rows (the last, but for speculative steps).
    row: u32,
}

pub struct Stage {
    gpu: std::sync::Arc<Gpu>,
    kernels: KernelCache,
    config: ModelConfig,
    spec: StageSpec,
    embed: Option<QuantMatrix>,
    layers: Vec<Box<dyn Layer>>,
    states: Vec<LayerState>,
    head: Option<Head>,
    mtp: Option<mtp::MtpHead>,
    /// Set by [`Stage::mtp_logits`]: the MTP row's logits to read back, once read.
    probe: Option<Vec<f32>>,
    scratch: Scratch,
    staging: wgpu::Buffer,
    /// The layers' dispatches, for each class of step size.
    lists: Vec<(StepRows, Vec<Dispatch>)>,
    seqs: Sequences,
    /// One KV block's bytes, through which a shared block is copied (wgpu copies nothing
    /// within one buffer); none without attention layers.
    bounce: Option<wgpu::Buffer>,
}

impl Stage {
    pub fn load(gpu: std::sync::Arc<Gpu>, gguf: &Gguf, spec: StageSpec) -> Result<Stage> {
        let config = ModelConfig::from_gguf(gguf)?;
        let spec = Stage::fit_default_pool(&config, spec, gpu.max_binding());
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
        let kinds = &config.layers[spec.layers.clone()];
        let mtp = spec.mtp && last;
        // The MTP block's attention keeps its K and V in the stage's pool.
        let kv = if kinds.contains(&LayerKind::Attention) || mtp { Some(spec.kv_layout()?) } else { None };
        let recurrent = kinds.contains(&LayerKind::DeltaNet);
        let size = StateSize {
            slots: spec.max_seqs,
            kv,
            checkpoints: spec.checkpoints && recurrent,
            rollback: spec.draft_max > 0 && recurrent,
        };
        let states = layers.iter().map(|l| l.new_state(&gpu, &config, &size)).collect::<Result<Vec<_>>>()?;
        let bounce = kv.map(|layout| {
            let a = &config.attention;
            let bytes =
                u64::from(layout.block_size) * LayerKv::bytes_per_position(a.n_head_kv as u32, a.head_dim as u32);
            gpu.storage("kv block bounce", bytes / 2)
        });
        // One integer-dot scratch for every recording, as tall as the largest (the MTP
        // block's first pass carries a draft row per sequence besides the step's rows) and
        // as wide as the stage's widest Q8_0 matrix: what the planner counts.
        let int8 = if gpu.int8_dot {
            let width = strata_model::plan::stage_int8_width(gguf, &config, spec.layers.clone(), mtp)?;
            let rows = spec.max_batch + if mtp { spec.max_seqs } else { 0 };
            (width > 0).then(|| QuantizedX::new(&gpu, rows, width as u32))
        } else {
            None
        };
        let scratch = Scratch::new(&gpu, &config, spec.max_batch, spec.max_seqs, recurrent, kv)?.with_int8(int8);
        let max_samples = spec.max_samples();
        let head = if last { Some(Head::load(&ctx, &config, &scratch, max_samples)?) } else { None };
        let mtp = match &head {
            Some(h) if mtp => Some(mtp::MtpHead::load(&ctx, &config, &scratch, h, embed.as_ref(), spec.draft_max)?),
            _ => None,
        };
        let words = head.as_ref().map_or(0, |h| u64::from(h.words() * h.max_samples) * 4);
        let staging = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("staging"),
            size: (u64::from(spec.max_batch) * e as u64 * 4).max(words),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut stage = Stage {
            gpu,
            kernels,
            config,
            seqs: Sequences::new(spec.max_seqs, recurrent, spec.checkpoints, spec.draft_max > 0),
            spec,
            embed,
            layers,
            states,
            head,
            mtp,
            probe: None,
            scratch,
            staging,
            lists: Vec::new(),
            bounce,
        };
        // Every pipeline compiled and bind group built now, not on the first request.
        stage.lists = StepRows::up_to(stage.spec.max_batch)
            .into_iter()
            .map(|rows| Ok((rows, stage.record(rows)?)))
            .collect::<Result<Vec<_>>>()?;
        tracing::info!(layers = ?stage.spec.layers, weights_mb = stage.weight_bytes() as f64 / 1e6,
            pool = ?kv, slots = stage.spec.max_seqs, secs = t0.elapsed().as_secs_f64(), "stage loaded");
        Ok(stage)
    }

    /// A spec that leaves the pool to the stage (`kv_blocks` 0: every slot's whole
    /// context) gets what one binding of each attention layer can hold, if that is less.
    fn fit_default_pool(config: &ModelConfig, spec: StageSpec, max_binding: u64) -> StageSpec {
        let a = &config.attention;
        let per_position = LayerKv::bytes_per_position(a.n_head_kv as u32, a.head_dim as u32) / 2;
        let fits = max_binding / per_position.max(1) / u64::from(spec.kv_block_size.max(1));
        match spec.kv_layout() {
            Ok(layout) if spec.kv_blocks == 0 && u64::from(layout.blocks) > fits && fits > 0 => {
                tracing::info!(
                    blocks = fits,
                    wanted = layout.blocks,
                    "KV pool capped by the adapter's largest binding"
                );
                StageSpec { kv_blocks: fits as u32, ..spec }
            }
            _ => spec,
        }
    }

    /// Refuses a spec whose buffers the adapter cannot hold, before anything is dropped or
    /// allocated (wgpu answers an oversized buffer with a panic, not an error). Mirrors what
    /// a stage allocates by `max_batch` (activations of the widest per-row width), by its
    /// KV pool (each attention layer's K and V), by `max_seqs` (DeltaNet state, sampled
    /// logit rows), against `max_binding`, the adapter's largest storage binding
    /// (`max_storage_buffer_binding_size`, at most `max_buffer_size`).
    pub fn check_spec(config: &ModelConfig, spec: &StageSpec, max_binding: u64) -> Result<()> {
        let n_layer = config.n_layer();
        if spec.layers.start >= spec.layers.end || spec.layers.end > n_layer {
            return Err(Error::Spec(format!(
                "layer range {:?} is not within the model's {n_layer} layers",
                spec.layers
            )));
        }
        if spec.max_batch == 0 || spec.ctx == 0 || spec.max_seqs == 0 {
            return Err(Error::Spec("max_batch, max_seqs and ctx must be at least 1".into()));
        }
        if spec.mtp && spec.draft_max == 0 {
            return Err(Error::Spec("MTP drafts need a draft length of at least 1 (--draft-max)".into()));
        }
        if spec.mtp && spec.layers.end == n_layer && config.n_mtp == 0 {
            return Err(Error::Spec(
                "the model has no MTP block (its nextn_predict_layers is 0): speculate with prompt lookup".into(),
            ));
        }
        let layout = spec.kv_layout()?;
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
        if let Some(m) = &config.moe {
            let k = m.n_expert_used;
            widths.extend([("chosen experts' FFN", k * m.expert_ff), ("chosen experts' output", k * config.n_embd)]);
        }
        let (what, width) = widths.into_iter().max_by_key(|w| w.1).expect("widths is not empty");
        let activations = u128::from(spec.max_batch) * width as u128 * 4;
        if activations > limit {
            return Err(over(format!(
                "max_batch {} needs activation buffers of {activations} bytes ({} rows x {width} {what} values x 4 bytes)",
                spec.max_batch, spec.max_batch
            )));
        }
        let kinds = &config.layers[spec.layers.clone()];
        if kinds.contains(&LayerKind::Attention) {
            let kv = u128::from(LayerKv::bytes_each(&layout, a.n_head_kv as u32, a.head_dim as u32));
            if kv > limit {
                return Err(over(format!(
                    "a KV pool of {} blocks of {} positions ({} positions, context {}) needs {kv} bytes each for K and V per layer",
                    layout.blocks,
                    layout.block_size,
                    layout.positions(),
                    spec.ctx
                )));
            }
        }
        if let Some(dn) = &config.deltanet
            && kinds.contains(&LayerKind::DeltaNet)
        {
            let state = u128::from(DeltaNetState::bytes_for(dn)) * u128::from(spec.max_seqs);
            if state > limit {
                return Err(over(format!(
                    "{} sequences (max_seqs) need {state} bytes of DeltaNet state per layer",
                    spec.max_seqs
                )));
            }
        }
        if spec.layers.end == n_layer {
            let logits = u128::from(spec.max_samples()) * config.n_vocab as u128 * 4;
            if logits > limit {
                return Err(over(format!(
                    "{} sampled rows (max_seqs, times --draft-max + 1 with speculation) need {logits} bytes of logits",
                    spec.max_samples()
                )));
            }
        }
        Ok(())
    }

    /// Opens the GPU (`adapter`: a substring of its name, else the best one) and loads
    /// `spec`'s layers of `gguf` on it.
    pub fn open(gguf: &Gguf, spec: StageSpec, adapter: Option<String>) -> Result<Stage> {
        let gpu = std::sync::Arc::new(Gpu::new(&crate::gpu::GpuConfig { adapter, ..Default::default() })?);
        Stage::load(gpu, gguf, spec)
    }

    /// The device this stage runs on.
    pub fn device(&self) -> crate::gpu::DeviceInfo {
        self.gpu.describe()
    }

    /// Where a step of `rows` rows at positions `pos..` goes, op by op (see
    /// [`crate::bench::profile`]), each row sampled greedily, the rows split evenly over
    /// `seqs` sequences: with one sequence, a decode step with 1 row and a speculative step
    /// verifying `rows - 1` drafts with more; with `seqs = rows`, a batched decode step of
    /// that many sequences. The sequences all read the first slot's cache and state (so
    /// the profile leaves out the cache misses of several caches). Run after measuring: it
    /// leaves the sequences' state spoiled.
    pub fn profile_step(&self, rows: u32, seqs: u32, pos: u32, reps: u32) -> Result<Vec<crate::bench::OpTime>> {
        let rows = rows.clamp(1, self.spec.max_batch);
        if seqs == 0 || !rows.is_multiple_of(seqs) || seqs > self.spec.max_seqs {
            let max = self.spec.max_seqs;
            return Err(Error::Step(format!("{rows} rows over {seqs} sequences (at most {max}, evenly)")));
        }
        let per_seq = rows / seqs;
        let pos = pos.min(self.spec.ctx.saturating_sub(per_seq));
        let (q, s) = (&self.gpu.queue, &self.scratch);
        let runs: Vec<Run> = (0..seqs).map(|_| Run { slot: 0, pos, n: per_seq, keep: 0 }).collect();
        let layout = BatchLayout::new(&runs);
        let step = Step::new(rows, seqs);
        q.write_buffer(&s.step, 0, bytemuck::bytes_of(&step));
        q.write_buffer(&s.positions, 0, bytemuck::cast_slice(&layout.positions));
        q.write_buffer(&s.rows, 0, bytemuck::cast_slice(&layout.rows));
        q.write_buffer(&s.seqs, 0, bytemuck::cast_slice(&layout.seqs));
        let mut lists: Vec<(&[Dispatch], Step)> = vec![(self.list(rows), step)];
        if let Some(head) = &self.head {
            let n = rows.min(head.max_samples);
            let sampled: Vec<u32> = (rows - n..rows).collect();
            q.write_buffer(&head.sample_rows, 0, bytemuck::cast_slice(&sampled));
            q.write_buffer(&head.sampling, 0, bytemuck::cast_slice(&vec![RowSampling::greedy(); n as usize]));
            q.write_buffer(&head.step, 0, bytemuck::bytes_of(&Step::new(n, 1)));
            lists.push((head.list(n), Step::new(n, 1)));
        }
        crate::bench::profile(&self.gpu, &lists, reps)
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

    /// Bytes of the integer-dot path's scratch (0 without `--int8-dot`): one for every
    /// recording of the stage, as the planner counts it.
    pub fn int8_scratch_bytes(&self) -> u64 {
        self.scratch.int8.as_ref().map_or(0, |x| x.bytes())
    }

    /// Bytes of weights held on the GPU.
    pub fn weight_bytes(&self) -> u64 {
        let layers: u64 = self.layers.iter().map(|l| l.weight_bytes()).sum();
        layers
            + self.head.as_ref().map_or(0, |h| h.output.bytes())
            + self.embed.as_ref().map_or(0, |e| e.bytes())
            + self.mtp.as_ref().map_or(0, mtp::MtpHead::weight_bytes)
    }

    /// Weight bytes one decoded token reads (every matrix once, of a mixture of experts
    /// only the chosen experts; one embedding row).
    pub fn weight_bytes_per_token(&self) -> u64 {
        let layers: u64 = self.layers.iter().map(|l| l.bytes_read_per_token()).sum();
        let embed_row = self.embed.as_ref().map_or(0, |e| e.bytes() / e.n() as u64);
        layers + self.head.as_ref().map_or(0, |h| h.output.bytes()) + embed_row
    }

    /// Sequences holding state here.
    pub fn sequences(&self) -> usize {
        self.seqs.len()
    }

    /// The KV pool and the sequence slots: what is held and what is free.
    pub fn pool(&self) -> PoolStats {
        let table = self.scratch.table.as_ref();
        let a = &self.config.attention;
        let kv_layers = self.kv_states().count() as u64;
        let block_bytes = table.map_or(0, |t| {
            u64::from(t.layout().block_size) * LayerKv::bytes_per_position(a.n_head_kv as u32, a.head_dim as u32)
        }) * kv_layers;
        let slot_bytes: u64 = self
            .states
            .iter()
            .map(|s| match s {
                LayerState::DeltaNet(d) => d.bytes() / u64::from(d.slots()),
                LayerState::Kv(_) => 0,
            })
            .sum();
        PoolStats {
            block_size: table.map_or(0, |t| t.layout().block_size),
            blocks: table.map_or(0, |t| t.layout().blocks),
            used_blocks: table.map_or(0, |t| t.used_blocks()),
            block_bytes,
            slots: self.spec.max_seqs,
            used_slots: self.spec.max_seqs - self.seqs.free_slots(),
            slot_bytes,
        }
    }

    /// Bytes of KV blocks and recurrent states held for sequences now.
    pub fn cache_bytes(&self) -> u64 {
        let p = self.pool();
        u64::from(p.used_blocks) * p.block_bytes + u64::from(p.used_slots) * p.slot_bytes
    }

    /// Every attention layer's part of the pool, the MTP block's included.
    fn kv_states(&self) -> impl Iterator<Item = &LayerKv> {
        let mtp = self.mtp.as_ref().map(|m| &m.state);
        self.states.iter().chain(mtp).filter_map(|s| if let LayerState::Kv(kv) = s { Some(kv) } else { None })
    }

    /// Whether `seq` holds state here.
    pub fn has_sequence(&self, seq: SeqId) -> bool {
        self.seqs.contains(seq)
    }

    /// Frees a sequence's slot and KV blocks.
    pub fn release(&mut self, seq: SeqId) -> bool {
        self.seqs.release(self.scratch.table.as_mut(), seq)
    }

    /// Frees sequences unused for `idle`.
    pub fn release_idle(&mut self, idle: std::time::Duration) -> usize {
        self.seqs.release_idle(self.scratch.table.as_mut(), idle)
    }

    /// The dispatches of a step of `rows`' class: the embedding (first stage), then every
    /// layer in order, over any sequences' rows.
    fn record(&self, rows: StepRows) -> Result<Vec<Dispatch>> {
        let s = &self.scratch;
        let mut rec = Recorder::new(&self.gpu, &self.kernels, &s.step, self.spec.max_batch)?
            .for_rows(rows)
            .with_int8_scratch(s.int8.as_ref());
        if let Some(table) = &self.embed {
            rec.embed(table, s.ids(), s.x())?;
        }
        for (layer, state) in self.layers.iter().zip(&self.states) {
            layer.record(&mut rec, &self.config, s, state)?;
        }
        Ok(rec.finish())
    }

    fn list(&self, n_rows: u32) -> &[Dispatch] {
        let class = StepRows::of(n_rows);
        self.lists.iter().find(|(c, _)| *c == class).map_or(&[], |(_, l)| &l[..])
    }

    /// Runs one step: each sequence's rows (`steps`, in order; token ids in each on the
    /// first stage, else `hidden`, every row's f32 `n_embd` values in that order) through
    /// the stage's layers in one submission. The last stage then samples each sequence
    /// that wants a token, from its last row, with its own parameters.
    ///
    /// A sequence whose part cannot run (out of order, no room, a bad id) gets its error
    /// in the output and the others run; an error of the whole step (its size, its hidden
    /// states, the device) is the outer error.
    pub fn step(&mut self, steps: &[SeqStep<'_>], hidden: Option<&[f32]>) -> Result<StepOutput> {
        let total: u64 = steps.iter().map(|s| u64::from(s.rows)).sum();
        if steps.is_empty() || total > u64::from(self.spec.max_batch) {
            return Err(Error::Step(format!("a step carries 1..={} rows, got {total}", self.spec.max_batch)));
        }
        if steps.len() > self.spec.max_seqs as usize {
            let n = steps.len();
            return Err(Error::Step(format!("a step carries 1..={} sequences, got {n}", self.spec.max_seqs)));
        }
        let e = self.config.n_embd;
        match (self.is_first(), hidden) {
            (true, Some(_)) => return Err(Error::Step("hidden states sent to the first stage".into())),
            (false, None) => return Err(Error::Step("no hidden states for a stage that is not first".into())),
            (false, Some(h)) if h.len() as u64 != total * e as u64 => {
                return Err(Error::Step(format!("{} hidden values for {total} rows of width {e}", h.len())));
            }
            _ => {}
        }
        let mut out: Vec<(SeqId, Result<Produced>)> = Vec::with_capacity(steps.len());
        let mut ran = Vec::new();
        let mut input_row = 0;
        for (index, st) in steps.iter().enumerate() {
            let admitted = self.admit(steps, index).map(|a| Admitted {
                index,
                step: st,
                slot: a.slot,
                reset: a.reset,
                restore: a.restore,
                save: a.save,
                roll_back: a.roll_back,
                keep: a.keep,
                copies: a.copies,
                fork: a.fork,
                input_row,
            });
            input_row += st.rows as usize;
            match admitted {
                Ok(a) => {
                    out.push((st.seq, Ok(Produced::Ran)));
                    ran.push(a);
                }
                Err(e) => out.push((st.seq, Err(e))),
            }
        }
        if ran.is_empty() {
            return Ok(StepOutput { hidden: Vec::new(), drafts: vec![Vec::new(); out.len()], seqs: out });
        }
        let mut drafts = vec![Vec::new(); out.len()];
        match self.run(&ran, hidden, &mut out, &mut drafts) {
            Ok(hidden) => Ok(StepOutput { hidden, seqs: out, drafts }),
            Err(e) => {
                // The device failed mid-step: the sequences' state is unknown. Free them, so
                // that their next step is refused rather than run on a broken state.
                for a in &ran {
                    self.release(a.step.seq);
                }
                Err(e)
            }
        }
    }

    /// Checks one sequence's part of a step and readies its state (slot, blocks, order).
    fn admit(&mut self, steps: &[SeqStep<'_>], index: usize) -> Result<sequences::Admitted> {
        let st = &steps[index];
        if steps[..index].iter().any(|o| o.seq == st.seq) {
            return Err(Error::Step(format!("sequence {} appears twice in one step", st.seq)));
        }
        if st.rows == 0 {
            return Err(Error::Step("a sequence's part of a step has no rows".into()));
        }
        let end = u64::from(st.pos) + u64::from(st.rows);
        if end > u64::from(self.spec.ctx) {
            return Err(Error::Step(format!(
                "positions up to {} are past the context length {}",
                end - 1,
                self.spec.ctx
            )));
        }
        // Token ids come to the first stage; with the MTP head they travel on to the last,
        // which follows the sequence with them.
        if self.is_first() || !st.tokens.is_empty() {
            if st.tokens.len() != st.rows as usize {
                return Err(Error::Step(format!("{} token ids for {} rows", st.tokens.len(), st.rows)));
            }
            if let Some(&bad) = st.tokens.iter().find(|&&id| id as usize >= self.config.n_vocab) {
                let vocab = self.config.n_vocab;
                return Err(Error::Step(format!("token id {bad} is outside the vocabulary of {vocab}")));
            }
        }
        if st.verify > 0 || st.keep > 0 || st.draft > 0 {
            self.check_speculative(st)?;
        }
        if let Want::Token { sampling, .. } = &st.want
            && self.is_last()
        {
            sampling.validate()?;
            let words = self.head.as_ref().map_or(0, |h| h.mask_words());
            if st.allowed.len() > words {
                return Err(Error::Sequence {
                    seq: st.seq,
                    message: format!(
                        "a grammar mask of {} words for a vocabulary of {} tokens ({words} words)",
                        st.allowed.len(),
                        self.config.n_vocab
                    ),
                });
            }
            if !st.allowed.is_empty() && st.allowed.iter().all(|&w| w == 0) {
                return Err(Error::Sequence { seq: st.seq, message: "its grammar mask allows no token".into() });
            }
        }
        let ahead = self.mtp_drafts(st);
        let admitted = self.seqs.admit(
            &self.gpu.queue,
            self.scratch.table.as_mut(),
            st.seq,
            st.pos,
            st.rows,
            ahead,
            st.checkpoint,
            st.fork_from,
            st.keep,
        )?;
        if self.is_last() && !st.history.is_empty() {
            self.seqs.get_mut(st.seq).expect("admitted").note(st.history);
        }
        Ok(admitted)
    }

    /// Refuses a speculative part of a step that the last stage could not verify exactly.
    fn check_speculative(&self, st: &SeqStep<'_>) -> Result<()> {
        let refuse = |message: String| Err(Error::Sequence { seq: st.seq, message });
        if self.spec.draft_max == 0 {
            return refuse("a speculative step on a stage loaded without speculation (--draft-max 0)".into());
        }
        if st.verify > self.spec.draft_max {
            return refuse(format!(
                "verifies {} draft rows, more than the {} this stage was loaded for (--draft-max)",
                st.verify, self.spec.draft_max
            ));
        }
        if st.verify >= st.rows || st.keep > st.rows {
            return refuse(format!("{} draft rows and {} kept of a step of {} rows", st.verify, st.keep, st.rows));
        }
        if st.draft > 0 && self.is_last() {
            match &self.mtp {
                None => return refuse("asks for MTP drafts of a stage loaded without the MTP head".into()),
                Some(m) if st.draft > m.draft_max() => {
                    return refuse(format!(
                        "asks for {} MTP drafts, more than the {} this stage was loaded for (--draft-max)",
                        st.draft,
                        m.draft_max()
                    ));
                }
                Some(_) if st.tokens.is_empty() => {
                    return refuse("asks for MTP drafts without its token ids".into());
                }
                Some(_) => {}
            }
        }
        if st.verify > 0 || (st.draft > 0 && self.is_last()) {
            match &st.want {
                Want::Token { sampling, logprobs: None } if !sampling.has_penalties() && st.allowed.is_empty() => {}
                _ => {
                    return refuse(
                        "verifies or drafts tokens but asks for logprobs, penalties, a grammar or no token".into(),
                    );
                }
            }
        }
        Ok(())
    }

    /// The MTP drafts `st` gets after its rows: what it asks for, within the context.
    fn mtp_drafts(&self, st: &SeqStep<'_>) -> u32 {
        if self.mtp.is_none() || st.tokens.is_empty() {
            return 0;
        }
        st.draft.min(self.spec.ctx.saturating_sub(st.pos + st.rows))
    }

    /// Writes the admitted sequences' inputs and tables, runs the step in one submission
    /// and reads back its hidden rows or its samples (into `out`).
    fn run(
        &mut self,
        ran: &[Admitted<'_>],
        hidden: Option<&[f32]>,
        out: &mut [(SeqId, Result<Produced>)],
        drafts: &mut [Vec<u32>],
    ) -> Result<Vec<f32>> {
        let e = self.config.n_embd;
        let runs: Vec<Run> = ran
            .iter()
            .map(|a| Run { slot: a.slot, pos: a.step.pos, n: a.step.rows, keep: if a.keep { a.step.keep } else { 0 } })
            .collect();
        let layout = BatchLayout::new(&runs);
        let (gpu, s) = (&*self.gpu, &self.scratch);
        match hidden {
            None => {
                let ids: Vec<u32> = ran.iter().flat_map(|a| a.step.tokens.iter().copied()).collect();
                gpu.queue.write_buffer(&s.ids, 0, bytemuck::cast_slice(&ids));
            }
            Some(h) => {
                // Only the rows of the sequences that run, contiguous.
                let rows: Vec<f32> = ran
                    .iter()
                    .flat_map(|a| &h[a.input_row * e..(a.input_row + a.step.rows as usize) * e])
                    .copied()
                    .collect();
                gpu.queue.write_buffer(&s.x, 0, bytemuck::cast_slice(&rows));
            }
        }
        let step = Step::new(layout.n_rows(), layout.n_seqs());
        gpu.queue.write_buffer(&s.step, 0, bytemuck::bytes_of(&step));
        gpu.queue.write_buffer(&s.positions, 0, bytemuck::cast_slice(&layout.positions));
        gpu.queue.write_buffer(&s.rows, 0, bytemuck::cast_slice(&layout.rows));
        gpu.queue.write_buffer(&s.seqs, 0, bytemuck::cast_slice(&layout.seqs));
        let samples = self.write_samples(ran, &layout)?;
        // The MTP head follows every sequence whose token ids came this far.
        let mut mtp_owners = Vec::new();
        let mut mtp_parts = Vec::new();
        if self.mtp.is_some() {
            for (i, a) in ran.iter().enumerate().filter(|(_, a)| a.step.tokens.len() == a.step.rows as usize) {
                let seq = &layout.seqs[i];
                let last = samples.iter().position(|smp| smp.index == i && smp.row == seq.n - 1);
                let part = mtp::MtpPart {
                    slot: a.slot,
                    pos: a.step.pos,
                    tokens: a.step.tokens,
                    first: seq.first,
                    kept: self.seqs.get(a.step.seq).and_then(|s| s.mtp_kept),
                    verify: a.step.verify,
                    drafts: if last.is_some() { self.mtp_drafts(a.step) } else { 0 },
                    last_sample: last.unwrap_or(0) as u32,
                };
                mtp_owners.push((i, last));
                mtp_parts.push((part, seq.n));
            }
        }
        let mtp_step = match &self.mtp {
            Some(m) if !mtp_parts.is_empty() => {
                let planned = m.plan(&mtp_parts, self.probe.is_some());
                m.write(&gpu.queue, &planned);
                Some(planned)
            }
            _ => None,
        };

        let mut enc = gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("step") });
        let deltanet =
            || self.states.iter().filter_map(|s| if let LayerState::DeltaNet(d) = s { Some(d) } else { None });
        // Copies first, in admission order: a fork's blocks and state as they were before
        // this step writes anything.
        for a in ran {
            for &c in &a.copies {
                for kv in self.kv_states() {
                    if let Some(bounce) = &self.bounce {
                        kv.copy_block(&mut enc, c, bounce);
                    }
                }
            }
            if let Some((from, from_checkpoint)) = a.fork {
                for d in deltanet() {
                    d.fork(&mut enc, from, from_checkpoint, a.slot)?;
                }
            }
        }
        for a in ran.iter().filter(|a| a.reset || a.restore || a.roll_back) {
            for d in deltanet() {
                if a.reset {
                    d.reset(&mut enc, a.slot);
                } else if a.roll_back {
                    d.roll_back(&mut enc, a.slot);
                } else {
                    d.restore(&mut enc, a.slot);
                }
            }
        }
        let n_samples = samples.len() as u32;
        let mut lists: Vec<(&[Dispatch], Step)> = vec![(self.list(step.n_tokens), step)];
        if let Some(head) = &self.head
            && n_samples > 0
        {
            lists.push((head.list(n_samples), Step::new(n_samples, 1)));
        }
        if let (Some(m), Some(planned)) = (&self.mtp, &mtp_step) {
            lists.extend(m.lists(step, planned));
        }
        // The whole step in one pass: the layers, then the head on the rows to sample,
        // then the MTP head's rows and drafts.
        encode_pass(&mut enc, &lists);
        let (mut kept, mut probed) = (Vec::new(), None);
        if let (Some(m), Some(planned)) = (&self.mtp, &mtp_step) {
            kept = m.after_pass(&mut enc, &mtp_parts, planned);
            if self.probe.is_some() {
                probed = Some(m.probe_logits(gpu, &mut enc));
            }
        }
        for a in ran.iter().filter(|a| a.save) {
            for d in deltanet() {
                d.save(&mut enc, a.slot);
            }
        }
        let bytes = match &self.head {
            Some(head) => u64::from(n_samples * head.words()) * 4,
            None => u64::from(step.n_tokens) * e as u64 * 4,
        };
        let logits_rows: Vec<usize> = samples
            .iter()
            .enumerate()
            .filter(|(_, smp)| ran[smp.index].step.want == Want::Logits)
            .map(|(i, _)| i)
            .collect();
        let logits_staging = self.copy_logits(&mut enc, &logits_rows);
        if bytes > 0 {
            let src = match &self.head {
                Some(head) => &head.result,
                None => &s.x,
            };
            enc.copy_buffer_to_buffer(src, 0, &self.staging, 0, bytes);
        }
        gpu.queue.submit([enc.finish()]);
        let read = if bytes > 0 { gpu.map_and_read(&self.staging, bytes)? } else { Vec::new() };
        let logits = match &logits_staging {
            Some((buf, size)) => bytemuck::pod_collect_to_vec::<u8, f32>(&gpu.map_and_read(buf, *size)?),
            None => Vec::new(),
        };
        let mtp_drafts = match (&self.mtp, &mtp_step) {
            (Some(m), Some(planned)) => m.read_drafts(gpu, planned)?,
            _ => Vec::new(),
        };
        if let Some(buf) = probed {
            self.probe = Some(bytemuck::pod_collect_to_vec(&gpu.map_and_read(&buf, buf.size())?));
        }
        gpu.check("a step")?;
        for ((i, _), from) in mtp_owners.iter().zip(kept) {
            if let Some(s) = self.seqs.get_mut(ran[*i].step.seq) {
                s.mtp_kept = from;
            }
        }
        if self.head.is_none() {
            return Ok(bytemuck::pod_collect_to_vec(&read));
        }
        let words: Vec<u32> = bytemuck::pod_collect_to_vec(&read);
        self.take_samples(ran, &samples, &words, &logits, &logits_rows, out)?;
        // Drafts follow the head's best candidate at the last row: they are worth
        // verifying only when that is the token kept there.
        let w = self.head.as_ref().map_or(0, |h| h.words()) as usize;
        for ((i, last), made) in mtp_owners.into_iter().zip(mtp_drafts) {
            let kept_token = match &out[ran[i].index].1 {
                Ok(Produced::Token(t, _)) => Some(*t),
                Ok(Produced::Tokens(t)) => t.last().copied(),
                _ => None,
            };
            if let Some(last) = last
                && !made.is_empty()
                && kept_token == Some(words[last * w])
            {
                drafts[ran[i].index] = made;
            }
        }
        Ok(Vec::new())
    }

    /// On the last stage: the rows to sample (each sequence that wants something, its last
    /// row), with each row's sampling parameters and recent tokens, written for the head.
    fn write_samples(&self, ran: &[Admitted<'_>], layout: &BatchLayout) -> Result<Vec<Sample>> {
        let Some(head) = &self.head else { return Ok(Vec::new()) };
        let mut samples = Vec::new();
        let (mut rows, mut params) = (Vec::new(), Vec::new());
        let mut recent = vec![0u32; head.max_samples as usize * MAX_RECENT];
        let words = head.mask_words();
        // Grammar masks, written only up to the last masked row.
        let mut masks: Vec<u32> = Vec::new();
        for (i, a) in ran.iter().enumerate() {
            let k = match &a.step.want {
                Want::Nothing => continue,
                Want::Logits => 0,
                Want::Token { sampling, logprobs } => {
                    let greedy = sampling.is_greedy() && !sampling.has_penalties() && logprobs.is_none();
                    if greedy { 1 } else { K_MAX }
                }
            };
            let seq = &layout.seqs[i];
            // A speculative step's draft rows are sampled too, each alike (no penalties,
            // logprobs or mask: `check_speculative`).
            let verify = if self.is_last() { a.step.verify } else { 0 };
            for r in seq.n - 1 - verify..seq.n - 1 {
                rows.push(seq.first + r);
                params.push(RowSampling::new(k, 0, Penalties::NONE));
                samples.push(Sample { index: i, k, row: r });
            }
            rows.push(seq.first + seq.n - 1);
            let row = match &a.step.want {
                Want::Token { sampling, .. } if sampling.has_penalties() => {
                    let history = self.seqs.history(a.step.seq);
                    let n = sampling.repeat_last_n.min(MAX_RECENT).min(history.len());
                    let at = samples.len() * MAX_RECENT;
                    recent[at..at + n].copy_from_slice(&history[history.len() - n..]);
                    let penalties = Penalties {
                        repeat: sampling.repeat_penalty,
                        frequency: sampling.frequency_penalty,
                        presence: sampling.presence_penalty,
                    };
                    RowSampling::new(k, n as u32, penalties)
                }
                _ => RowSampling::new(k, 0, Penalties::NONE),
            };
            let row = if a.step.allowed.is_empty() {
                row
            } else {
                let at = samples.len() * words;
                masks.resize(at + words, 0);
                masks[at..at + a.step.allowed.len()].copy_from_slice(a.step.allowed);
                row.masked()
            };
            params.push(row);
            samples.push(Sample { index: i, k, row: seq.n - 1 });
        }
        if !samples.is_empty() {
            let q = &self.gpu.queue;
            q.write_buffer(&head.sample_rows, 0, bytemuck::cast_slice(&rows));
            q.write_buffer(&head.sampling, 0, bytemuck::cast_slice(&params));
            q.write_buffer(&head.recent, 0, bytemuck::cast_slice(&recent[..samples.len() * MAX_RECENT]));
            if !masks.is_empty() {
                q.write_buffer(&head.mask, 0, bytemuck::cast_slice(&masks));
            }
            q.write_buffer(&head.step, 0, bytemuck::bytes_of(&Step::new(samples.len() as u32, 1)));
        }
        Ok(samples)
    }

    /// Copies the logit rows `rows` of the head to a buffer to read after the submission.
    fn copy_logits(&self, enc: &mut wgpu::CommandEncoder, rows: &[usize]) -> Option<(wgpu::Buffer, u64)> {
        let head = self.head.as_ref()?;
        if rows.is_empty() {
            return None;
        }
        let row = self.config.n_vocab as u64 * 4;
        let size = rows.len() as u64 * row;
        let buf = self.gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("logits readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        for (i, &r) in rows.iter().enumerate() {
            enc.copy_buffer_to_buffer(&head.logits, r as u64 * row, &buf, i as u64 * row, row);
        }
        Some((buf, size))
    }

    /// Each sampled row's token (or logits) from what the head read back.
    fn take_samples(
        &mut self,
        ran: &[Admitted<'_>],
        samples: &[Sample],
        words: &[u32],
        logits: &[f32],
        logits_rows: &[usize],
        out: &mut [(SeqId, Result<Produced>)],
    ) -> Result<()> {
        let w = self.head.as_ref().map_or(0, |h| h.words()) as usize;
        let vocab = self.config.n_vocab;
        // A speculative step's samples so far (its rows come in order, the last row last).
        let mut drafted: Vec<u32> = Vec::new();
        for (i, smp) in samples.iter().enumerate() {
            let a = &ran[smp.index];
            if let Want::Token { sampling, .. } = &a.step.want
                && a.step.verify > 0
            {
                let top = TopK::from_words(&words[i * w..(i + 1) * w], K_MAX, smp.k);
                let draw = u64::from(a.step.pos + smp.row + 1);
                let seq = self.seqs.get_mut(a.step.seq).expect("admitted this step");
                match pick(seq, &top, sampling, None, draw, &[]) {
                    Ok((token, _)) => drafted.push(token),
                    Err(e) => {
                        out[a.index].1 = Err(e);
                        drafted.clear();
                        continue;
                    }
                }
                if smp.row + 1 == a.step.rows {
                    if out[a.index].1.is_ok() {
                        out[a.index].1 = Ok(Produced::Tokens(std::mem::take(&mut drafted)));
                    }
                    drafted.clear();
                }
                continue;
            }
            let result = match &a.step.want {
                Want::Logits => {
                    let j = logits_rows.iter().position(|&r| r == i).expect("copied above");
                    Ok(Produced::Logits(logits[j * vocab..(j + 1) * vocab].to_vec()))
                }
                Want::Token { sampling, logprobs } => {
                    let top = TopK::from_words(&words[i * w..(i + 1) * w], K_MAX, smp.k);
                    let draw = u64::from(a.step.pos + smp.row + 1);
                    let seq = self.seqs.get_mut(a.step.seq).expect("admitted this step");
                    pick(seq, &top, sampling, *logprobs, draw, a.step.allowed).map(|(token, lp)| {
                        seq.note(&[token]);
                        Produced::Token(token, lp)
                    })
                }
                Want::Nothing => continue,
            };
            out[a.index].1 = result;
        }
        Ok(())
    }

    /// Runs one sequence's step (see [`Stage::step`]): tokens (or hidden states) at
    /// consecutive `positions`; what it produced, and its hidden rows on a stage without
    /// the head.
    fn single(&mut self, seq: SeqId, input: Input<'_>, positions: &[u32], want: Want) -> Result<(Produced, Vec<f32>)> {
        let Some(&pos) = positions.first() else {
            return Err(Error::Step(format!("a step carries 1..={} rows, got 0", self.spec.max_batch)));
        };
        if positions.windows(2).any(|w| w[1] != w[0] + 1) {
            return Err(Error::Sequence { seq, message: "a step's positions must be consecutive".into() });
        }
        let rows = positions.len() as u32;
        let (tokens, hidden) = match input {
            Input::Tokens(ids) => {
                if !self.is_first() {
                    return Err(Error::Step("token ids sent to a stage that is not first".into()));
                }
                if ids.len() != positions.len() {
                    return Err(Error::Step(format!("{} token ids for {rows} positions", ids.len())));
                }
                (ids, None)
            }
            Input::Hidden(h) => (&[][..], Some(h)),
        };
        let step = SeqStep::new(seq, pos, rows, tokens, want);
        let mut output = self.step(std::slice::from_ref(&step), hidden)?;
        let (_, produced) = output.seqs.pop().expect("one sequence in, one out");
        Ok((produced?, output.hidden))
    }

    /// Runs a step whose token nobody needs (a prefill chunk before the last one): the
    /// last stage fills its caches and stops before the head, so no sampler state moves;
    /// any other stage returns its hidden states as [`Stage::forward`] does.
    pub fn advance(&mut self, seq: SeqId, input: Input<'_>, positions: &[u32]) -> Result<Option<Vec<f32>>> {
        let (_, hidden) = self.single(seq, input, positions, Want::Nothing)?;
        Ok((!self.is_last()).then_some(hidden))
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
        let want = Want::Token { sampling: sampling.clone(), logprobs: None };
        Ok(match self.single(seq, input, positions, want)? {
            (Produced::Token(t, _), _) => Output::Token(t),
            (_, hidden) => Output::Hidden(hidden),
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
        if !self.is_last() {
            return Err(Error::NotOnStage("logprobs asked of a stage without the output head".into()));
        }
        let want = Want::Token { sampling: sampling.clone(), logprobs: Some(top.min(K_MAX as usize)) };
        match self.single(seq, input, positions, want)?.0 {
            Produced::Token(t, Some(lp)) => Ok((t, lp)),
            other => Err(Error::Step(format!("a logprobs step produced {other:?}"))),
        }
    }

    /// Runs `tokens` at `positions` for `seq` on a stage that is first and last, and
    /// returns the MTP head's logits at its last row: the row that pairs the last token
    /// with the main model's hidden state at the position before (zeros at position 0).
    /// For tests and diagnostics: the head drafts nothing in this step.
    pub fn mtp_logits(&mut self, seq: SeqId, tokens: &[u32], positions: &[u32]) -> Result<Vec<f32>> {
        if self.mtp.is_none() || !self.is_first() {
            return Err(Error::NotOnStage("MTP logits asked of a stage without the MTP head and the embedding".into()));
        }
        self.probe = Some(Vec::new());
        let ran = self.single(seq, Input::Tokens(tokens), positions, Want::Nothing);
        let logits = self.probe.take().unwrap_or_default();
        ran?;
        if logits.len() != self.config.n_vocab {
            return Err(Error::Step(format!("the MTP head gave {} logits", logits.len())));
        }
        Ok(logits)
    }

    /// Runs a step like [`Stage::forward`] but returns the last row's whole logit row
    /// instead of sampling: for tests and diagnostics only (it reads `n_vocab` floats back).
    pub fn logits(&mut self, seq: SeqId, input: Input<'_>, positions: &[u32]) -> Result<Vec<f32>> {
        if !self.is_last() {
            return Err(Error::NotOnStage("logits asked of a stage without the output head".into()));
        }
        match self.single(seq, input, positions, Want::Logits)?.0 {
            Produced::Logits(l) => Ok(l),
            other => Err(Error::Step(format!("a logits step produced {other:?}"))),
        }
    }
}

/// The token sampled from a row's candidates `top` (ties to the lower id when greedy),
/// and its log-probabilities when asked for.
fn pick(
    seq: &mut sequences::Sequence,
    top: &TopK,
    sampling: &SamplingParams,
    logprobs: Option<usize>,
    draw: u64,
    allowed: &[u32],
) -> Result<(u32, Option<Logprobs>)> {
    let candidates: Vec<Candidate> =
        top.entries.iter().map(|&(id, logit)| Candidate { id, logit }).filter(|c| c.logit.is_finite()).collect();
    if candidates.is_empty() {
        let why = if allowed.is_empty() { "" } else { " the grammar allows" };
        return Err(Error::Step(format!("no finite logit among the tokens{why} in the row")));
    }
    let token = if sampling.is_greedy() && !sampling.has_penalties() {
        candidates[0].id
    } else {
        seq.sampler(sampling)?.sample(&candidates, draw)?
    };
    // The kernel masked the row; a token outside the mask would break the grammar's
    // promise, so it is refused rather than returned.
    if !allowed.is_empty() && !strata_model::grammar::allows(allowed, token) {
        return Err(Error::Step(format!("sampled token {token}, which the grammar mask does not allow")));
    }
    let lp = logprobs.map(|k| {
        let logprob = |logit: f32| logit - top.log_sum_exp;
        Logprobs {
            token: top.entries.iter().find(|e| e.0 == token).map_or(f32::NEG_INFINITY, |e| logprob(e.1)),
            // Under a grammar, fewer than k tokens may be possible at all.
            top: top
                .entries
                .iter()
                .filter(|e| e.1.is_finite())
                .take(k)
                .map(|&(id, logit)| (id, logprob(logit)))
                .collect(),
        }
    });
    Ok((token, lp))
}

/// A stage's KV pool and sequence slots, held and free.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Positions per block; 0 for a stage without attention layers (no pool).
    pub block_size: u32,
    pub blocks: u32,
    pub used_blocks: u32,
    /// Bytes of one block in all the stage's attention layers.
    pub block_bytes: u64,
    pub slots: u32,
    pub used_slots: u32,
    /// Bytes of one slot's recurrent state in all the stage's DeltaNet layers.
    pub slot_bytes: u64,
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
        let spec = |ctx, max_batch| StageSpec::new(0..n, ctx, max_batch);
        let limit = 128 << 20;
        assert!(Stage::check_spec(&config, &spec(4096, 512), limit).is_ok());
        let e = Stage::check_spec(&config, &spec(64, 4_000_000_000), limit).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        let e = e.to_string();
        assert!(e.contains("max_batch 4000000000") && e.contains("max_storage_buffer_binding_size"), "{e}");
        let e = Stage::check_spec(&config, &spec(1 << 30, 8), limit).unwrap_err().to_string();
        assert!(e.contains("context 1073741824") && e.contains(&limit.to_string()), "{e}");
        let e = Stage::check_spec(&config, &StageSpec { kv_blocks: u32::MAX / 16, ..spec(64, 8) }, limit)
            .unwrap_err()
            .to_string();
        assert!(e.contains("KV pool"), "{e}");
        let e =
            Stage::check_spec(&config, &StageSpec { layers: 0..n + 1, ..spec(64, 8) }, limit).unwrap_err().to_string();
        assert!(e.contains("layer range"), "{e}");
        assert!(Stage::check_spec(&config, &spec(0, 8), limit).is_err());
        assert!(Stage::check_spec(&config, &spec(64, 8).with_seqs(0), limit).is_err());
        assert!(Stage::check_spec(&config, &StageSpec { kv_block_size: 24, ..spec(64, 8) }, limit).is_err());
    }
}
