//! The memory planner: which contiguous range of layers each node holds.
//!
//! **Architecture invariant:** planning is pure arithmetic over a GGUF's tensor index, the
//! [`ModelConfig`] and the nodes' memory budgets: no I/O, no GPU, no network. Deciding the
//! split is the coordinator's job, but because it needs nothing the coordinator has, it
//! lives in the model crate, next to the tensor index it reads, where every case is tested
//! on plain data.
//!
//! **API boundary:** [`ModelCost::new`] prices the model once (per-layer weights and cache,
//! the embedding and head, activation scratch); [`Plan::auto`] and [`Plan::manual`] turn
//! that and a list of [`NodeBudget`]s into a [`Plan`]; [`Plan::table`] prints it. Every
//! failure is a [`PlanError`] whose message carries the numbers a user needs to act.
//!
//! # What a stage costs
//!
//! - **Weights:** the exact bytes of every tensor `blk.{i}.*` of its layers, as stored in
//!   the file (the GPU layouts hold no more, bar a few bytes of padding per tensor). The
//!   first stage also holds `token_embd.weight`; the last holds `output_norm.weight` and
//!   `output.weight`, or, when the head is tied, the embedding table again (one copy when
//!   one stage is both).
//! - **Cache**: the attention layers share a paged KV pool of `kv_positions` positions (all
//!   sequences' together, in blocks of `kv_block_size`), `2 · n_head_kv · head_dim ·
//!   kv_elem_bytes` per position and layer; a DeltaNet layer keeps a fixed f32 state per
//!   sequence slot, `DeltaNetConfig::state_values() · 4`, whatever the context, times `seqs`
//!   (once more with `checkpoints`: each slot's checkpoint for prefix reuse; and once
//!   more with `draft_max`: each slot's rollback state for speculative steps).
//!   By default the pool holds every sequence's whole context; when that does not fit,
//!   [`Plan::fitted`] plans for one sequence's context and gives the pool what memory is left.
//! - **Scratch:** activation buffers sized for a prefill chunk of `T = max_batch` tokens,
//!   all f32 and shared by the stage's layers (see [`ScratchCost`]).
//!
//! MTP blocks (the last `nextn_predict_layers` blocks) are not part of the main pass. With
//! [`PlanConfig::mtp`] the last stage loads the first of them to draft tokens (see
//! [`MtpCost`]: its weights, the embedding when the stage does not hold it already, its
//! attention layer's share of the pool, its activations); every other MTP block is
//! reported as `unplanned_bytes`.

use std::cmp::Ordering;
use std::fmt::Write as _;
use std::ops::Range;

use crate::config::{LayerKind, ModelConfig};
use crate::gguf::{Gguf, TensorInfo};
use crate::{Error, Result};

const GIB: f64 = (1u64 << 30) as f64;

/// What is planned for: context, cache precision, sequences, step size and KV pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanConfig {
    /// Positions per sequence, at most.
    pub ctx: usize,
    /// Bytes of one cached K or V value (f16: 2).
    pub kv_elem_bytes: u64,
    /// Sequences held at once: DeltaNet state slots, and (by default) the pool's size.
    pub seqs: usize,
    /// Each DeltaNet state slot has a checkpoint beside it (prefix reuse): twice the state.
    pub checkpoints: bool,
    /// Draft rows a sequence's step may verify (speculative decoding; 0: none): each
    /// DeltaNet slot keeps a rollback state too, and the head samples up to
    /// `draft_max + 1` rows per sequence.
    pub draft_max: usize,
    /// The last stage loads the model's MTP block and drafts up to `draft_max` tokens per
    /// sequence with it.
    pub mtp: bool,
    /// The most rows one step carries; sizes the scratch.
    pub max_batch: usize,
    /// Positions per KV block.
    pub kv_block_size: usize,
    /// Positions of the KV pool, all sequences together; `None`: every sequence's whole
    /// context.
    pub kv_positions: Option<u64>,
}

impl PlanConfig {
    /// `ctx` positions of f16 KV cache, one sequence, steps of 64 rows (the CLI's default
    /// `--batch-tokens`), blocks of 16 positions.
    pub fn new(ctx: usize) -> Self {
        PlanConfig {
            ctx,
            kv_elem_bytes: 2,
            seqs: 1,
            checkpoints: false,
            draft_max: 0,
            mtp: false,
            max_batch: 64,
            kv_block_size: 16,
            kv_positions: None,
        }
    }

    /// The pool's positions as asked, in whole blocks.
    fn pool_positions(&self) -> u64 {
        let bs = self.kv_block_size.max(1) as u64;
        let asked = self.kv_positions.unwrap_or((self.seqs as u64) * (self.ctx as u64).div_ceil(bs) * bs);
        asked.div_ceil(bs) * bs
    }
}

/// A node and the bytes of its memory that Strata may use (after the driver and any
/// other tenant took theirs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeBudget {
    pub name: String,
    pub usable_bytes: u64,
    /// The node's Q8_0 products go through integer dot products (`--int8-dot`), which
    /// quantise x into a scratch of their own ([`Int8Cost`]).
    pub int8_dot: bool,
}

impl NodeBudget {
    pub fn new(name: impl Into<String>, usable_bytes: u64) -> Self {
        NodeBudget { name: name.into(), usable_bytes, int8_dot: false }
    }

    /// The same node, with `--int8-dot` on or off.
    pub fn with_int8_dot(self, int8_dot: bool) -> Self {
        NodeBudget { int8_dot, ..self }
    }
}

/// Bytes of the integer-dot path's scratch: `rows` rows of up to `k` values of x, two
/// signed bytes a value and an f32 scale per block of 32. A stage holds one, shared by
/// all its recordings (it runs one step at a time, and its products one after another).
pub fn int8_scratch_bytes(rows: u64, k: u64) -> u64 {
    rows * k * 2 + rows * k.div_ceil(32) * 4
}

/// The most chunks the GPU attention kernel splits a row's keys into, and the fewest keys
/// a chunk holds (whole tiles of 64): a decode row's work spread over this many workgroups
/// per query head instead of one for its whole context (`node`'s `attention.wgsl`).
pub const ATTENTION_SPLITS: u64 = 16;
pub const ATTENTION_CHUNK_MIN: u64 = 256;
/// Steps of at most this many rows run attention split into chunks (the node's decode
/// and speculative steps); larger ones run each row's chunks in one workgroup.
pub const ATTENTION_SPLIT_ROWS: u64 = 8;

/// Bytes of the split attention's partial states on a stage with attention layers and
/// steps of up to `max_batch` rows: for each row of a split step, query head and chunk,
/// a softmax max and sum and the head's `head_dim` value sums, f32. Shared by the
/// stage's attention layers, which run one after another.
pub fn attention_parts_bytes(max_batch: u64, n_head: u64, head_dim: u64) -> u64 {
    max_batch.min(ATTENTION_SPLIT_ROWS) * n_head * ATTENTION_SPLITS * (head_dim + 2) * 4
}

/// Values per row of `t` if it is a matrix the integer-dot path multiplies by (a 2-D
/// Q8_0 tensor), else 0. The experts' stacked matrices (3-D) go through `mm_id`, not
/// that path.
pub fn int8_width(t: &TensorInfo) -> u64 {
    if t.ty == crate::quant::GgmlType::Q8_0 && t.dims.len() == 2 { t.dims[0] } else { 0 }
}

/// The widest row of x the integer-dot path quantises on a stage holding `layers` (and
/// the MTP block with `mtp`): the widest of its matrices' [`int8_width`]s. The token
/// embedding is read by lookup, so it counts only as the last stage's tied head.
pub fn stage_int8_width(gguf: &Gguf, cfg: &ModelConfig, layers: Range<usize>, mtp: bool) -> Result<u64> {
    let last = layers.end == cfg.n_layer();
    let embedding = &cfg.global_tensors().token_embd.name;
    Ok(shard_tensors(gguf, cfg, layers, mtp)?
        .into_iter()
        .filter(|t| &t.name != embedding || (last && cfg.tied_output))
        .map(int8_width)
        .max()
        .unwrap_or(0))
}

/// What one layer of the main pass costs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerCost {
    pub kind: LayerKind,
    /// Bytes of its tensors `blk.{i}.*`.
    pub weight_bytes: u64,
    /// Its part of the KV pool (attention) or its recurrent state (DeltaNet), for all
    /// sequences.
    pub cache_bytes: u64,
    /// K and V bytes per pool position (attention layers; 0 for DeltaNet).
    pub kv_bytes_per_position: u64,
    /// Bytes of its weights one token reads: all of them, but of a mixture of experts only
    /// the routed experts it chooses (k of n_exp of each `*_exps` tensor).
    pub read_bytes: u64,
}

/// Activation scratch of a stage, in bytes, for a chunk of `T = max_batch` tokens. f32
/// buffers, as `node::scratch` allocates them; E = n_embd, F = n_ff, H/HKV/D the attention
/// heads and head dim, C = DeltaNet conv channels, Vd = its value dim, nv its value heads:
///
/// - `common` (every stage): `T · (3E + 2F) · 4 + T · 8`: residual, normed input, the
///   hidden state handed on, FFN gate and up; token ids and positions (u32).
/// - `attention` (a stage with an attention layer): `T · (H·D · (2 + 2·gate) + 2 · HKV·D) · 4`:
///   q, the attention output, k and v, and with an output gate (qwen35) `attn_q`'s raw
///   `[q | gate]` rows. The attention kernel uses an online softmax, so no `T x ctx` score
///   matrix exists; decode steps split each row's keys into chunks whose states wait in
///   [`attention_parts_bytes`]: `min(T, 8) · H · 16 · (D + 2) · 4`.
/// - `deltanet` (a stage with a DeltaNet layer): `T · (2C + 2Vd + 2nv) · 4`: qkv before and
///   after the conv, z, the output, beta and alpha.
/// - `head` (the last stage): `(2E + n_vocab) · 4` per sampled row (one per sequence of a
///   step, and with speculation one per draft too: `min(seqs · (draft_max + 1), T)`): the
///   row, normed, and its logits.
/// - `moe` (every stage of a MoE model; F is then the shared expert's width):
///   `T · (n_exp + 2k + 2k·f + k·E + E + 1) · 4`: router logits, chosen ids and weights,
///   the chosen experts' gate and up, their outputs, the shared expert's output and gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScratchCost {
    pub common: u64,
    pub attention: u64,
    pub deltanet: u64,
    pub head: u64,
    pub moe: u64,
}

/// What the last stage's MTP block costs ([`PlanConfig::mtp`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MtpCost {
    /// Its block's tensors.
    pub weight_bytes: u64,
    /// Its attention layer's K and V in the pool, like one more attention layer.
    pub kv_bytes_per_position: u64,
    pub cache_bytes: u64,
    /// Its passes' activations: one over every row of a step plus a draft row per
    /// sequence, one of a row per sequence per further draft; the step's normed hidden
    /// rows, each slot's kept rows and the drafts' logits.
    pub scratch_bytes: u64,
}

/// The memory a model needs, independent of how it is split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelCost {
    /// The main pass's layers, in order.
    pub layers: Vec<LayerCost>,
    /// `token_embd.weight`, held by the first stage.
    pub embedding_bytes: u64,
    /// `output_norm.weight` plus the head matrix, held by the last stage.
    pub head_bytes: u64,
    /// The head matrix is the embedding table: a single stage holds it once.
    pub tied_head: bool,
    pub scratch: ScratchCost,
    /// Tensors no stage loads: MTP blocks (but the one [`PlanConfig::mtp`] loads) and any
    /// tensor the forward pass does not read.
    pub unplanned_bytes: u64,
    /// What a node with `--int8-dot` holds besides.
    pub int8: Int8Cost,
    /// The MTP block the last stage loads, with [`PlanConfig::mtp`].
    pub mtp: Option<MtpCost>,
    /// The KV pool the attention layers' `cache_bytes` are priced for, and its blocks.
    pub kv_positions: u64,
    pub kv_block_size: u64,
    /// One sequence's whole context in the pool's blocks: the smallest pool worth planning.
    pub kv_least_positions: u64,
    /// The pool was asked for (`--kv-pool`): the planner keeps it as it is.
    pub kv_fixed: bool,
}

/// The integer-dot path's scratch ([`int8_scratch_bytes`]) of a stage on a node with
/// `--int8-dot`: as many rows as its largest recording quantises, as wide as its widest
/// Q8_0 matrix's rows ([`int8_width`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Int8Cost {
    /// Each main-pass layer's widest, in order.
    pub layer_widths: Vec<u64>,
    /// The head's (the last stage).
    pub head_width: u64,
    /// The MTP block's, with [`PlanConfig::mtp`] (the last stage).
    pub mtp_width: u64,
    /// Rows of a step.
    pub rows: u64,
    /// Rows of the last stage's largest recording: the MTP block's first pass carries a
    /// step's rows and a draft row per sequence.
    pub last_rows: u64,
}

/// The three parts of a stage's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StageCost {
    pub weight_bytes: u64,
    pub cache_bytes: u64,
    pub scratch_bytes: u64,
}

impl StageCost {
    pub fn total(&self) -> u64 {
        self.weight_bytes + self.cache_bytes + self.scratch_bytes
    }
}

impl ModelCost {
    /// Prices `cfg`'s layers from `gguf`'s tensor index.
    pub fn new(gguf: &Gguf, cfg: &ModelConfig, pc: &PlanConfig) -> Result<ModelCost> {
        if pc.ctx == 0 || pc.seqs == 0 || pc.max_batch == 0 || pc.kv_elem_bytes == 0 || pc.kv_block_size == 0 {
            return Err(PlanError::Invalid(format!(
                "ctx, seqs, max_batch, kv_block_size and kv_elem_bytes must be at least 1: {pc:?}"
            ))
            .into());
        }
        if pc.kv_positions == Some(0) {
            return Err(PlanError::Invalid("a KV pool of 0 positions".into()).into());
        }
        let n_layer = cfg.n_layer();
        let mut weights = vec![0u64; n_layer];
        // What a token does not read: the routed experts it does not choose.
        let mut unread = vec![0u64; n_layer];
        let (mut embedding, mut output_norm, mut output, mut unplanned) = (None, 0, 0, 0);
        let mut mtp_weights = 0;
        let mut widths = vec![0u64; n_layer];
        let (mut head_width, mut mtp_width) = (0, 0);
        let globals = cfg.global_tensors();
        if pc.mtp && cfg.n_mtp == 0 {
            return Err(PlanError::Invalid("MTP drafts for a model without an MTP block".into()).into());
        }
        for t in &gguf.tensors {
            match block_index(&t.name) {
                Some(i) if i < n_layer => {
                    weights[i] += t.size;
                    widths[i] = widths[i].max(int8_width(t));
                    if let Some(moe) = &cfg.moe
                        && t.name.ends_with("_exps.weight")
                    {
                        let (used, all) = moe.read_fraction();
                        unread[i] += t.size - t.size / all * used;
                    }
                }
                // MTP blocks follow the main pass's blocks; the first drafts with `mtp`.
                Some(i) if pc.mtp && i == n_layer => {
                    mtp_weights += t.size;
                    mtp_width = mtp_width.max(int8_width(t));
                }
                Some(_) => unplanned += t.size,
                // A tied head is the embedding, matched first.
                None if t.name == globals.token_embd.name => {
                    embedding = Some(t.size);
                    if cfg.tied_output {
                        head_width = int8_width(t);
                    }
                }
                None if t.name == globals.output_norm.name => output_norm = t.size,
                None if t.name == globals.output.name => {
                    output = t.size;
                    head_width = int8_width(t);
                }
                None => unplanned += t.size,
            }
        }
        let embedding = embedding.ok_or_else(|| Error::MissingTensor(globals.token_embd.name.clone()))?;
        if let Some(i) = weights.iter().position(|&w| w == 0) {
            return Err(Error::Config(format!("layer {i} has no tensors `blk.{i}.*` in the file")));
        }

        let (seqs, t) = (pc.seqs as u64, pc.max_batch as u64);
        let a = &cfg.attention;
        let positions = pc.pool_positions();
        let per_position = 2 * (a.n_head_kv * a.head_dim) as u64 * pc.kv_elem_bytes;
        let layers = cfg
            .layers
            .iter()
            .zip(weights)
            .zip(unread)
            .map(|((&kind, weight_bytes), unread)| {
                let read_bytes = weight_bytes - unread;
                Ok(match kind {
                    LayerKind::Attention => LayerCost {
                        kind,
                        weight_bytes,
                        cache_bytes: per_position * positions,
                        kv_bytes_per_position: per_position,
                        read_bytes,
                    },
                    LayerKind::DeltaNet => {
                        let dn = cfg
                            .deltanet
                            .as_ref()
                            .ok_or_else(|| Error::Config("a DeltaNet layer without a DeltaNet config".into()))?;
                        let copies = 1 + u64::from(pc.checkpoints) + u64::from(pc.draft_max > 0);
                        let cache_bytes = dn.state_values() as u64 * 4 * seqs * copies;
                        LayerCost { kind, weight_bytes, cache_bytes, kv_bytes_per_position: 0, read_bytes }
                    }
                })
            })
            .collect::<Result<Vec<_>>>()?;

        let (e, f) = (cfg.n_embd as u64, cfg.n_ff as u64);
        let q = (a.n_head * a.head_dim) as u64;
        let gate = u64::from(a.output_gate);
        let deltanet = cfg.deltanet.as_ref().map_or(0, |dn| {
            let (c, vd, nv) = (dn.conv_channels() as u64, dn.value_dim() as u64, dn.n_value_heads as u64);
            t * (2 * c + 2 * vd + 2 * nv) * 4
        });
        let scratch = ScratchCost {
            common: t * (3 * e + 2 * f) * 4 + t * 8,
            attention: t * (q * (2 + 2 * gate) + 2 * (a.n_head_kv * a.head_dim) as u64) * 4
                + attention_parts_bytes(t, a.n_head as u64, a.head_dim as u64),
            deltanet,
            head: (2 * e + cfg.n_vocab as u64) * 4 * (seqs * (pc.draft_max as u64 + 1)).min(t),
            moe: cfg.moe.as_ref().map_or(0, |m| {
                let (n, k, f) = (m.n_expert as u64, m.n_expert_used as u64, m.expert_ff as u64);
                t * (n + 2 * k + 2 * k * f + k * e + e + 1) * 4
            }),
        };
        let mtp = pc.mtp.then(|| {
            let draft = pc.draft_max.max(1) as u64;
            let per_row = 3 * e + 2 * f + 2 * e + 2 + q * (2 + 2 * gate) + 2 * (a.n_head_kv * a.head_dim) as u64;
            let moe_row = cfg.moe.as_ref().map_or(0, |m| {
                let (n, k, f) = (m.n_expert as u64, m.n_expert_used as u64, m.expert_ff as u64);
                n + 2 * k + 2 * k * f + k * e + e + 1
            });
            let rows = (t + seqs) + (draft - 1) * seqs;
            let fixed = t * e + seqs * (draft + 1) * e + seqs * cfg.n_vocab as u64 + draft * seqs * (e + 5);
            MtpCost {
                weight_bytes: mtp_weights,
                kv_bytes_per_position: per_position,
                cache_bytes: per_position * positions,
                scratch_bytes: (rows * (per_row + moe_row) + fixed) * 4,
            }
        });
        Ok(ModelCost {
            layers,
            embedding_bytes: embedding,
            head_bytes: output_norm + if cfg.tied_output { embedding } else { output },
            tied_head: cfg.tied_output,
            scratch,
            unplanned_bytes: unplanned,
            int8: Int8Cost {
                layer_widths: widths,
                head_width,
                mtp_width,
                rows: t,
                last_rows: t + if pc.mtp { seqs } else { 0 },
            },
            mtp,
            kv_positions: positions,
            kv_block_size: pc.kv_block_size as u64,
            kv_least_positions: (pc.ctx as u64).div_ceil(pc.kv_block_size as u64) * pc.kv_block_size as u64,
            kv_fixed: pc.kv_positions.is_some(),
        })
    }

    pub fn n_layer(&self) -> usize {
        self.layers.len()
    }

    /// Weight bytes one decoded token reads on a stage holding `layers` (the embedding row
    /// on the first, the head on the last).
    pub fn stage_read_bytes(&self, layers: Range<usize>, n_vocab: usize) -> u64 {
        let (first, last) = (layers.start == 0, layers.end == self.n_layer());
        let held: u64 = self.layers[layers].iter().map(|l| l.read_bytes).sum();
        held + if first { self.embedding_bytes / n_vocab.max(1) as u64 } else { 0 }
            + if last { self.head_bytes } else { 0 }
    }

    /// Weight bytes one decoded token reads through the whole model: every layer's
    /// [`LayerCost::read_bytes`] (its active parameters), the head, one embedding row.
    pub fn read_bytes_per_token(&self, n_vocab: usize) -> u64 {
        let layers: u64 = self.layers.iter().map(|l| l.read_bytes).sum();
        layers + self.head_bytes + self.embedding_bytes / n_vocab.max(1) as u64
    }

    /// The same model priced for a pool of `positions` (whole blocks).
    pub fn with_pool(&self, positions: u64) -> ModelCost {
        let mut c = self.clone();
        c.kv_positions = positions / self.kv_block_size.max(1) * self.kv_block_size.max(1);
        for l in &mut c.layers {
            if l.kind == LayerKind::Attention {
                l.cache_bytes = l.kv_bytes_per_position * c.kv_positions;
            }
        }
        if let Some(m) = &mut c.mtp {
            m.cache_bytes = m.kv_bytes_per_position * c.kv_positions;
        }
        c
    }

    /// What a stage holding `layers` costs; a range from 0 is the first stage, one to
    /// `n_layer` the last.
    pub fn stage(&self, layers: Range<usize>) -> StageCost {
        let (first, last) = (layers.start == 0, layers.end == self.n_layer());
        let held = &self.layers[layers];
        let mut weight_bytes: u64 = held.iter().map(|l| l.weight_bytes).sum();
        if first {
            weight_bytes += self.embedding_bytes;
        }
        if last {
            weight_bytes += self.head_bytes;
            if first && self.tied_head {
                weight_bytes -= self.embedding_bytes;
            }
        }
        let has = |kind| held.iter().any(|l| l.kind == kind);
        let s = &self.scratch;
        let mut scratch_bytes = s.common
            + s.moe
            + if has(LayerKind::Attention) { s.attention } else { 0 }
            + if has(LayerKind::DeltaNet) { s.deltanet } else { 0 }
            + if last { s.head } else { 0 };
        let mut cache_bytes = held.iter().map(|l| l.cache_bytes).sum();
        if let Some(m) = self.mtp.as_ref().filter(|_| last) {
            // The MTP block embeds its tokens: the last stage holds the table unless it
            // already does (first, or a tied head).
            let embedding = if first || self.tied_head { 0 } else { self.embedding_bytes };
            weight_bytes += m.weight_bytes + embedding;
            cache_bytes += m.cache_bytes;
            scratch_bytes += m.scratch_bytes;
        }
        StageCost { weight_bytes, cache_bytes, scratch_bytes }
    }

    /// What a stage holding `layers` costs on `node`: [`ModelCost::stage`], and the
    /// integer-dot path's scratch where the node takes that path.
    pub fn stage_on(&self, layers: Range<usize>, node: &NodeBudget) -> StageCost {
        let mut c = self.stage(layers.clone());
        c.scratch_bytes += if node.int8_dot { self.int8_bytes(layers) } else { 0 };
        c
    }

    /// The integer-dot path's scratch on a stage holding `layers` ([`Int8Cost`]).
    pub fn int8_bytes(&self, layers: Range<usize>) -> u64 {
        let last = layers.end == self.n_layer();
        let i = &self.int8;
        let mut width = i.layer_widths[layers].iter().copied().max().unwrap_or(0);
        if last {
            width = width.max(i.head_width).max(if self.mtp.is_some() { i.mtp_width } else { 0 });
        }
        int8_scratch_bytes(if last { i.last_rows } else { i.rows }, width)
    }
}

/// The tensors a stage holding `layers` reads: every `blk.{i}.*` of its layers, the
/// embedding on the first stage, and the output norm and head (maybe the embedding again,
/// listed once) on the last, with `mtp` also the first MTP block's tensors and the
/// embedding. A node without the file is streamed exactly these.
pub fn shard_tensors<'a>(
    gguf: &'a Gguf,
    cfg: &ModelConfig,
    layers: Range<usize>,
    mtp: bool,
) -> Result<Vec<&'a TensorInfo>> {
    let n = cfg.n_layer();
    if layers.start >= layers.end || layers.end > n {
        return Err(Error::Config(format!("layer range {layers:?} is not within the model's {n} layers")));
    }
    let globals = cfg.global_tensors();
    let mut names: Vec<&str> = Vec::new();
    if layers.start == 0 {
        names.push(&globals.token_embd.name);
    }
    if layers.end == n {
        names.push(&globals.output_norm.name);
        names.push(&globals.output.name);
    }
    let mtp = if mtp && layers.end == n { cfg.mtp_tensors().into_iter().next() } else { None };
    if mtp.is_some() {
        names.push(&globals.token_embd.name);
    }
    let mtp_names: Vec<&str> = mtp.iter().flat_map(|m| m.tensors()).map(|t| t.name.as_str()).collect();
    names.extend(mtp_names);
    let mut out: Vec<&TensorInfo> =
        gguf.tensors.iter().filter(|t| block_index(&t.name).is_some_and(|i| layers.contains(&i))).collect();
    for name in names {
        let t = gguf.require_tensor(name)?;
        if !out.iter().any(|o| o.name == t.name) {
            out.push(t);
        }
    }
    Ok(out)
}

/// `blk.12.attn_q.weight` -> 12.
fn block_index(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split_once('.')?.0.parse().ok()
}

/// What went wrong when planning; every message carries the numbers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("invalid plan settings: {0}")]
    Invalid(String),
    #[error("no nodes to plan for")]
    NoNodes,
    #[error("{nodes} nodes but the model has only {layers} layers: every node needs at least one layer")]
    MoreNodesThanLayers { nodes: usize, layers: usize },
    #[error(
        "node `{node}` is too small for even one layer: the smallest stage it could hold needs {}, it has {}",
        gib(*needed), gib(*available)
    )]
    NodeTooSmall { node: String, needed: u64, available: u64 },
    #[error("{}", does_not_fit(stages, *needed, *available))]
    DoesNotFit { stages: Vec<StageNeed>, needed: u64, available: u64 },
    #[error("bad --split `{0}`: expected layer counts separated by commas, such as 10,12,8")]
    SplitSyntax(String),
    #[error("--split has {given} entries for {nodes} nodes")]
    SplitCount { given: usize, nodes: usize },
    #[error("--split adds up to {sum} layers, the model has {layers}")]
    SplitSum { sum: usize, layers: usize },
    #[error("--split gives node `{node}` no layers: every node needs at least one")]
    SplitEmpty { node: String },
    #[error(
        "node `{node}` cannot hold layers {}..{}: they need {}, it has {}",
        layers.start, layers.end, gib(*needed), gib(*available)
    )]
    StageTooBig { node: String, layers: Range<usize>, needed: u64, available: u64 },
}

/// One node's share of a split that does not fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageNeed {
    pub node: String,
    pub layers: Range<usize>,
    pub needed: u64,
    pub available: u64,
}

fn does_not_fit(stages: &[StageNeed], needed: u64, available: u64) -> String {
    let mut s = format!(
        "the model does not fit: it needs {} in all, the nodes have {}; the most even split would need:",
        gib(needed),
        gib(available)
    );
    for st in stages {
        let verdict = if st.needed > st.available { "  <- over" } else { "" };
        let _ = write!(
            s,
            "\n  node `{}`: layers {}..{} need {} of {} available{verdict}",
            st.node,
            st.layers.start,
            st.layers.end,
            gib(st.needed),
            gib(st.available)
        );
    }
    s
}

/// `bytes` in GiB with two decimals, as every planner error reports sizes; below 50 MiB
/// (small models, where GiB would read 0.00) in the largest unit that keeps it at least 1.
fn gib(bytes: u64) -> String {
    if bytes < 50 << 20 { human(bytes) } else { format!("{:.2} GiB", bytes as f64 / GIB) }
}

/// `bytes` in the largest binary unit that keeps it at least 1, two decimals.
fn human(bytes: u64) -> String {
    const UNITS: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    match UNITS.iter().find(|(_, size)| bytes >= *size) {
        Some((unit, size)) => format!("{:.2} {unit}", bytes as f64 / *size as f64),
        None => format!("{bytes} B"),
    }
}

/// Parses `--split 10,12,8`: layers per node, in node order.
pub fn parse_split(s: &str) -> Result<Vec<usize>> {
    s.split(',')
        .map(|part| part.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| PlanError::SplitSyntax(s.to_owned()).into())
}

/// One node's part of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagePlan {
    /// Index into the node list.
    pub node: usize,
    pub name: String,
    pub layers: Range<usize>,
    pub weight_bytes: u64,
    pub cache_bytes: u64,
    pub scratch_bytes: u64,
    pub total_bytes: u64,
    pub usable_bytes: u64,
    pub free_bytes: u64,
    /// K and V bytes per pool position over the stage's attention layers (0: none, and
    /// no pool on this stage).
    pub kv_bytes_per_position: u64,
}

/// Contiguous layer ranges covering the main pass in order, one per node, each within
/// its node's memory, and the KV pool every stage with attention layers holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub stages: Vec<StagePlan>,
    /// Bytes in the file that no stage loads (MTP blocks).
    pub unplanned_bytes: u64,
    /// The pool: positions (all sequences together) and positions per block.
    pub kv_positions: u64,
    pub kv_block_size: u64,
}

impl StagePlan {
    /// Whether the stage holds a KV pool (it has attention layers).
    pub fn has_pool(&self) -> bool {
        self.kv_bytes_per_position > 0
    }
}

impl Plan {
    /// The plan of `cost` over `nodes` (`split` as `--split` gives it, else the most even
    /// one), with the largest KV pool worth having: every sequence's whole context as
    /// priced, or, when that does not fit and the pool was not fixed, one sequence's
    /// context plus whatever the smallest remainder of the stages with attention layers
    /// holds (in whole blocks).
    pub fn fitted(cost: &ModelCost, nodes: &[NodeBudget], split: Option<&[usize]>) -> Result<Plan> {
        let plan_at = |c: &ModelCost| match split {
            Some(s) => Plan::manual(c, nodes, s),
            None => Plan::auto(c, nodes),
        };
        let full = plan_at(cost);
        if cost.kv_fixed || full.is_ok() || cost.kv_least_positions >= cost.kv_positions {
            return full;
        }
        let least = plan_at(&cost.with_pool(cost.kv_least_positions))?;
        let room = least
            .stages
            .iter()
            .filter(|s| s.has_pool())
            .map(|s| s.free_bytes / s.kv_bytes_per_position)
            .min()
            .unwrap_or(0);
        let positions = (cost.kv_least_positions + room).min(cost.kv_positions);
        plan_at(&cost.with_pool(positions))
    }

    /// The largest context, up to `pc.ctx` and in whole KV blocks, for which the model
    /// fits `nodes` (one sequence's whole context at least; more sequences share what is
    /// left), with its cost and plan: how `serve` chooses a context when none is asked
    /// for. With a fixed pool (`pc.kv_positions`) no context beyond it is worth having.
    /// When not even one block fits, the error is the plan's at the smallest context.
    pub fn largest_context(
        gguf: &Gguf,
        cfg: &ModelConfig,
        pc: &PlanConfig,
        nodes: &[NodeBudget],
        split: Option<&[usize]>,
    ) -> Result<(usize, ModelCost, Plan)> {
        let block = pc.kv_block_size.max(1);
        let most = pc.kv_positions.map_or(pc.ctx, |p| pc.ctx.min(p as usize));
        let at = |ctx: usize| -> Result<(usize, ModelCost, Plan)> {
            let cost = ModelCost::new(gguf, cfg, &PlanConfig { ctx, ..pc.clone() })?;
            let plan = Plan::fitted(&cost, nodes, split)?;
            Ok((ctx, cost, plan))
        };
        if let Ok(fits) = at(most.max(1)) {
            return Ok(fits);
        }
        // Fitting only grows easier as the context shrinks: bisect over whole blocks.
        let (mut lo, mut hi) = (1usize, most.div_ceil(block));
        let mut best = at(block.min(most.max(1)))?;
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            match at(mid * block) {
                Ok(fits) => {
                    lo = mid;
                    best = fits;
                }
                Err(_) => hi = mid,
            }
        }
        tracing::info!(ctx = best.0, asked = pc.ctx, "the largest context the nodes hold");
        Ok(best)
    }

    /// Blocks of the KV pool.
    pub fn kv_blocks(&self) -> u64 {
        self.kv_positions / self.kv_block_size.max(1)
    }

    /// The split that uses memory most evenly: among all contiguous splits giving every
    /// node at least one layer, the one whose largest fraction of a node's memory used is
    /// smallest, then the second largest, and so on (leximax). With equal layers and no
    /// fixed costs that is a split proportional to memory; the embedding, head and scratch
    /// are accounted where they fall. Exact, by dynamic programming over (node, layer)
    /// boundaries: O(nodes · layers² · (nodes + layers)), milliseconds for real models.
    pub fn auto(cost: &ModelCost, nodes: &[NodeBudget]) -> Result<Plan> {
        check_counts(cost, nodes)?;
        let (k_n, l_n) = (nodes.len(), cost.n_layer());
        for (k, node) in nodes.iter().enumerate() {
            // The first node's range starts at 0, the last's ends at n_layer, and every
            // node before and after needs a layer of its own.
            let positions = match k {
                0 => 0..1,
                k if k == k_n - 1 => l_n - 1..l_n,
                k => k..l_n - (k_n - k) + 1,
            };
            let needed = positions.map(|i| cost.stage_on(i..i + 1, node).total()).min().expect("a position exists");
            if needed > node.usable_bytes {
                return Err(
                    PlanError::NodeTooSmall { node: node.name.clone(), needed, available: node.usable_bytes }.into()
                );
            }
        }

        // best[k][i]: the best way to put layers 0..i on nodes 0..k.
        let mut best: Vec<Vec<Option<Partial>>> = vec![vec![None; l_n + 1]];
        best[0][0] = Some(Partial { fractions: Vec::new(), start: 0 });
        for k in 1..=k_n {
            let mut row = vec![None; l_n + 1];
            for (i, slot) in row.iter_mut().enumerate().take(l_n - (k_n - k) + 1).skip(k) {
                // Node k-1 takes layers j..i.
                for (j, before) in best[k - 1].iter().enumerate().take(i).skip(k - 1) {
                    let Some(before) = before else { continue };
                    let f =
                        Fraction { used: cost.stage_on(j..i, &nodes[k - 1]).total(), of: nodes[k - 1].usable_bytes };
                    let mut fractions = before.fractions.clone();
                    let at = fractions.partition_point(|x| *x >= f);
                    fractions.insert(at, f);
                    if slot.as_ref().is_none_or(|s: &Partial| fractions < s.fractions) {
                        *slot = Some(Partial { fractions, start: j });
                    }
                }
            }
            best.push(row);
        }
        let mut ranges = Vec::with_capacity(k_n);
        let mut end = l_n;
        for k in (1..=k_n).rev() {
            let start = best[k][end].as_ref().expect("every node can get a layer").start;
            ranges.push(start..end);
            end = start;
        }
        ranges.reverse();

        let stages = Self::price(cost, nodes, &ranges);
        if stages.iter().any(|s| s.total_bytes > s.usable_bytes) {
            return Err(PlanError::DoesNotFit {
                needed: stages.iter().map(|s| s.total_bytes).sum(),
                available: nodes.iter().map(|n| n.usable_bytes).sum(),
                stages: stages
                    .into_iter()
                    .map(|s| StageNeed {
                        node: s.name,
                        layers: s.layers,
                        needed: s.total_bytes,
                        available: s.usable_bytes,
                    })
                    .collect(),
            }
            .into());
        }
        Ok(Plan::of(cost, stages))
    }

    fn of(cost: &ModelCost, stages: Vec<StagePlan>) -> Plan {
        Plan {
            stages,
            unplanned_bytes: cost.unplanned_bytes,
            kv_positions: cost.kv_positions,
            kv_block_size: cost.kv_block_size,
        }
    }

    /// The split given by `--split`: `split[k]` layers for node k, in order.
    pub fn manual(cost: &ModelCost, nodes: &[NodeBudget], split: &[usize]) -> Result<Plan> {
        check_counts(cost, nodes)?;
        if split.len() != nodes.len() {
            return Err(PlanError::SplitCount { given: split.len(), nodes: nodes.len() }.into());
        }
        if let Some(k) = split.iter().position(|&n| n == 0) {
            return Err(PlanError::SplitEmpty { node: nodes[k].name.clone() }.into());
        }
        let sum: usize = split.iter().sum();
        if sum != cost.n_layer() {
            return Err(PlanError::SplitSum { sum, layers: cost.n_layer() }.into());
        }
        let ranges: Vec<Range<usize>> = split
            .iter()
            .scan(0, |start, &n| {
                *start += n;
                Some(*start - n..*start)
            })
            .collect();
        let stages = Self::price(cost, nodes, &ranges);
        if let Some(s) = stages.iter().find(|s| s.total_bytes > s.usable_bytes) {
            return Err(PlanError::StageTooBig {
                node: s.name.clone(),
                layers: s.layers.clone(),
                needed: s.total_bytes,
                available: s.usable_bytes,
            }
            .into());
        }
        Ok(Plan::of(cost, stages))
    }

    /// Prices each range on its node; `free_bytes` is 0 where a stage is over.
    fn price(cost: &ModelCost, nodes: &[NodeBudget], ranges: &[Range<usize>]) -> Vec<StagePlan> {
        nodes
            .iter()
            .zip(ranges)
            .enumerate()
            .map(|(k, (node, layers))| {
                let c = cost.stage_on(layers.clone(), node);
                let total_bytes = c.total();
                StagePlan {
                    node: k,
                    name: node.name.clone(),
                    layers: layers.clone(),
                    weight_bytes: c.weight_bytes,
                    cache_bytes: c.cache_bytes,
                    scratch_bytes: c.scratch_bytes,
                    total_bytes,
                    usable_bytes: node.usable_bytes,
                    free_bytes: node.usable_bytes.saturating_sub(total_bytes),
                    kv_bytes_per_position: cost.layers[layers.clone()].iter().map(|l| l.kv_bytes_per_position).sum(),
                }
            })
            .collect()
    }

    /// Bytes all stages hold together.
    pub fn total_bytes(&self) -> u64 {
        self.stages.iter().map(|s| s.total_bytes).sum()
    }

    /// The plan as a table: one row per node, then the totals, then the KV pool.
    pub fn table(&self) -> String {
        let header = ["node", "layers", "weights", "kv pool", "cache", "scratch", "total", "usable", "free"];
        let pool = format!("{} x {}", self.kv_blocks(), self.kv_block_size);
        let row = |name: String, layers: String, pool: String, w: u64, c: u64, s: u64, t: u64, u: u64, f: u64| {
            [name, layers, human(w), pool, human(c), human(s), human(t), human(u), human(f)]
        };
        let mut rows: Vec<[String; 9]> = vec![header.map(String::from)];
        for s in &self.stages {
            let layers = format!("{}..{} ({})", s.layers.start, s.layers.end, s.layers.len());
            rows.push(row(
                s.name.clone(),
                layers,
                if s.has_pool() { pool.clone() } else { "-".into() },
                s.weight_bytes,
                s.cache_bytes,
                s.scratch_bytes,
                s.total_bytes,
                s.usable_bytes,
                s.free_bytes,
            ));
        }
        let sum = |f: fn(&StagePlan) -> u64| self.stages.iter().map(f).sum::<u64>();
        let n_layer = self.stages.last().map_or(0, |s| s.layers.end);
        rows.push(row(
            "total".into(),
            format!("{n_layer} layers"),
            String::new(),
            sum(|s| s.weight_bytes),
            sum(|s| s.cache_bytes),
            sum(|s| s.scratch_bytes),
            sum(|s| s.total_bytes),
            sum(|s| s.usable_bytes),
            sum(|s| s.free_bytes),
        ));
        let widths: Vec<usize> = (0..9).map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0)).collect();
        let mut out = String::new();
        for r in &rows {
            let line: Vec<String> = r
                .iter()
                .zip(&widths)
                .enumerate()
                // Names and ranges read left to right, sizes line up on the right.
                .map(|(c, (cell, &w))| if c < 2 { format!("{cell:<w$}") } else { format!("{cell:>w$}") })
                .collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
        }
        if self.stages.iter().any(StagePlan::has_pool) {
            let _ = writeln!(
                out,
                "kv pool: {} blocks of {} positions = {} positions, shared by all sequences, on every stage with attention layers",
                self.kv_blocks(),
                self.kv_block_size,
                self.kv_positions
            );
        }
        if self.unplanned_bytes > 0 {
            let _ = writeln!(
                out,
                "not loaded: {} (MTP blocks, tensors the forward pass does not read)",
                human(self.unplanned_bytes)
            );
        }
        out
    }
}

fn check_counts(cost: &ModelCost, nodes: &[NodeBudget]) -> Result<()> {
    if nodes.is_empty() {
        return Err(PlanError::NoNodes.into());
    }
    if nodes.len() > cost.n_layer() {
        return Err(PlanError::MoreNodesThanLayers { nodes: nodes.len(), layers: cost.n_layer() }.into());
    }
    Ok(())
}

/// Layers 0..i placed on nodes 0..k: the fractions of memory they use, largest first
/// (compared lexicographically, that is the leximax order), and where node k-1 starts.
#[derive(Debug, Clone)]
struct Partial {
    fractions: Vec<Fraction>,
    start: usize,
}

/// `used / of`, compared exactly; anything over nothing is infinitely much.
#[derive(Debug, Clone, Copy)]
struct Fraction {
    used: u64,
    of: u64,
}

impl Fraction {
    fn is_infinite(&self) -> bool {
        self.of == 0 && self.used > 0
    }
}

impl Ord for Fraction {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self.is_infinite(), other.is_infinite()) {
            (true, true) => Ordering::Equal,
            (true, false) => Ordering::Greater,
            (false, true) => Ordering::Less,
            // 0 / 0 is read as 0 / 1.
            (false, false) => (u128::from(self.used) * u128::from(other.of.max(1)))
                .cmp(&(u128::from(other.used) * u128::from(self.of.max(1)))),
        }
    }
}

impl PartialOrd for Fraction {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Fraction {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Fraction {}

#[cfg(test)]
mod tests;
