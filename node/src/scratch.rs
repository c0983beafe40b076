//! Activation buffers of a stage, sized once for its largest step and shared by every
//! layer and sequence (a stage runs one step at a time), with the step's tables: which
//! rows belong to which sequence, and where each sequence's KV blocks are.

use strata_model::config::ModelConfig;
use strata_model::plan::attention_parts_bytes;

use crate::gpu::{Gpu, Step};
use crate::kv_pool::{BlockTable, KvLayout};
use crate::layers::deltanet::DeltaNetScratch;
use crate::layers::moe::MoeScratch;
use crate::ops::Act;
use crate::ops::deltanet::StepBatch;
use crate::ops::matmul::QuantizedX;
use crate::{Error, Result};

pub struct Scratch {
    pub max_tokens: u32,
    /// Sequences one step may carry (the stage's sequence slots).
    pub max_seqs: u32,
    /// The [`Step`] uniform, written once per step.
    pub step: wgpu::Buffer,
    /// u32 `[max_tokens]`: each row's position in its sequence.
    pub positions: wgpu::Buffer,
    /// `[max_tokens]` [`crate::batch::RowInfo`]: each row's position, slot and run.
    pub rows: wgpu::Buffer,
    /// `[max_seqs]` [`crate::batch::SeqInfo`]: each run's slot, rows and position.
    pub seqs: wgpu::Buffer,
    /// Where each sequence's KV blocks are, when the stage has attention layers.
    pub table: Option<BlockTable>,
    /// u32 `[max_tokens]`: token ids (first stage).
    pub ids: wgpu::Buffer,
    /// The residual stream, f32 `[max_tokens, n_embd]`.
    pub x: wgpu::Buffer,
    /// Normed input of the current sub-block, f32 `[max_tokens, n_embd]`.
    pub n: wgpu::Buffer,
    pub q: wgpu::Buffer,
    /// Gated attention: `[query | gate]` per head, before the query norm.
    pub q_full: wgpu::Buffer,
    pub k: wgpu::Buffer,
    pub v: wgpu::Buffer,
    pub att: wgpu::Buffer,
    pub ffn_gate: wgpu::Buffer,
    pub ffn_up: wgpu::Buffer,
    /// DeltaNet's activations, when the stage has DeltaNet layers.
    deltanet: Option<DeltaNetScratch>,
    /// A MoE layer's activations, when the model's layers have experts.
    moe: Option<MoeScratch>,
    /// x quantised for the integer-dot path, when the stage takes it: one for all the
    /// stage's recordings ([`crate::ops::recorder::Recorder::with_int8_scratch`]).
    pub int8: Option<QuantizedX>,
    /// The split attention's partial states (`strata_model::plan::attention_parts_bytes`),
    /// when the stage has attention layers: shared by them, as they run one after another.
    attn_parts: Option<wgpu::Buffer>,
    widths: Widths,
}

/// Values per token of each activation.
struct Widths {
    embd: u32,
    q: u32,
    /// `[query | gate]` per head with gated attention; else 1 (a placeholder buffer).
    q_full: u32,
    kv: u32,
    ff: u32,
}

impl Scratch {
    /// Buffers for steps of up to `max_tokens` rows of up to `max_seqs` sequences;
    /// DeltaNet's too with `deltanet`; a block table for `kv`'s pool.
    pub fn new(
        gpu: &Gpu,
        cfg: &ModelConfig,
        max_tokens: u32,
        max_seqs: u32,
        deltanet: bool,
        kv: Option<KvLayout>,
    ) -> Result<Scratch> {
        let a = &cfg.attention;
        let t = u64::from(max_tokens);
        let f32s = |label: &str, width: usize| gpu.storage(label, t * width as u64 * 4);
        let q_width = a.n_head * a.head_dim;
        let deltanet = if deltanet { Some(DeltaNetScratch::new(gpu, cfg, max_tokens)?) } else { None };
        Ok(Scratch {
            max_tokens,
            max_seqs,
            step: gpu.uniform("step", &Step::default()),
            positions: gpu.storage("positions", t * 4),
            rows: gpu.storage("rows", t * 16),
            seqs: gpu.storage("seqs", u64::from(max_seqs) * size_of::<crate::batch::SeqInfo>() as u64),
            table: kv.map(|layout| BlockTable::new(gpu, layout)).transpose()?,
            ids: gpu.storage("ids", t * 4),
            x: f32s("x", cfg.n_embd),
            n: f32s("n", cfg.n_embd),
            q: f32s("q", q_width),
            q_full: f32s("q_full", if a.output_gate { 2 * q_width } else { 1 }),
            k: f32s("k", a.n_head_kv * a.head_dim),
            v: f32s("v", a.n_head_kv * a.head_dim),
            att: f32s("att", q_width),
            ffn_gate: f32s("ffn_gate", cfg.n_ff),
            ffn_up: f32s("ffn_up", cfg.n_ff),
            deltanet,
            moe: if cfg.moe.is_some() { Some(MoeScratch::new(gpu, cfg, max_tokens)?) } else { None },
            int8: None,
            attn_parts: kv.is_some().then(|| {
                let bytes = attention_parts_bytes(t, a.n_head as u64, a.head_dim as u64);
                gpu.storage("attention parts", bytes.max(4))
            }),
            widths: Widths {
                embd: cfg.n_embd as u32,
                q: q_width as u32,
                q_full: if a.output_gate { 2 * q_width as u32 } else { 1 },
                kv: (a.n_head_kv * a.head_dim) as u32,
                ff: cfg.n_ff as u32,
            },
        })
    }

    /// The stage's integer-dot scratch (see [`Scratch::int8`]).
    pub fn with_int8(self, int8: Option<QuantizedX>) -> Scratch {
        Scratch { int8, ..self }
    }

    /// These activations' steps use `table` (another scratch's, see [`BlockTable::reader`]).
    pub fn with_table(self, table: BlockTable) -> Scratch {
        Scratch { table: Some(table), ..self }
    }

    fn act<'a>(&self, buffer: &'a wgpu::Buffer, width: u32) -> Act<'a> {
        Act::new(buffer, self.max_tokens, width)
    }

    pub fn positions(&self) -> Act<'_> {
        self.act(&self.positions, 1)
    }

    pub fn ids(&self) -> Act<'_> {
        self.act(&self.ids, 1)
    }

    /// The step's rows and sequences, as the kernels that need them bind them.
    pub fn batch(&self) -> StepBatch<'_> {
        StepBatch { rows: self.act(&self.rows, 4), seqs: &self.seqs }
    }

    /// The block table of the stage's KV pool.
    pub fn table(&self) -> Result<&BlockTable> {
        self.table.as_ref().ok_or_else(|| Error::Spec("a KV pool asked of a stage without attention layers".into()))
    }

    pub fn x(&self) -> Act<'_> {
        self.act(&self.x, self.widths.embd)
    }

    pub fn n(&self) -> Act<'_> {
        self.act(&self.n, self.widths.embd)
    }

    pub fn q(&self) -> Act<'_> {
        self.act(&self.q, self.widths.q)
    }

    /// Only gated attention has it: elsewhere a placeholder of width 1.
    pub fn q_full(&self) -> Act<'_> {
        self.act(&self.q_full, self.widths.q_full)
    }

    /// Where split attention leaves its chunks' states (`None`: the stage's attention runs
    /// each row's chunks in one workgroup).
    pub fn attention_parts(&self) -> Option<&wgpu::Buffer> {
        self.attn_parts.as_ref()
    }

    pub fn k(&self) -> Act<'_> {
        self.act(&self.k, self.widths.kv)
    }

    pub fn v(&self) -> Act<'_> {
        self.act(&self.v, self.widths.kv)
    }

    pub fn att(&self) -> Act<'_> {
        self.act(&self.att, self.widths.q)
    }

    pub fn ffn_gate(&self) -> Act<'_> {
        self.act(&self.ffn_gate, self.widths.ff)
    }

    pub fn ffn_up(&self) -> Act<'_> {
        self.act(&self.ffn_up, self.widths.ff)
    }

    pub fn moe(&self) -> Result<&MoeScratch> {
        self.moe.as_ref().ok_or_else(|| Error::Spec("MoE activations asked of a model without experts".into()))
    }

    pub fn deltanet(&self) -> Result<&DeltaNetScratch> {
        self.deltanet
            .as_ref()
            .ok_or_else(|| Error::Spec("DeltaNet activations asked of a stage without DeltaNet layers".into()))
    }
}
