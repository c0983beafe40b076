//! The MTP head of the last stage: a qwen35 model's multi-token-prediction block
//! (`docs/qwen35.md`, "The MTP block") drafting tokens for speculative steps, inside the
//! step's one submission.
//!
//! Its row at position q pairs token `x_q` with the main model's `output_norm`ed hidden
//! state at `q - 1` and predicts the token at `q + 1`; its attention layer keeps K and V
//! in the stage's KV blocks, like one more layer of the pool. Each step runs two kinds of
//! rows, all in one pass over the block:
//!
//! - *catch-up* rows, one per row of the step (`x_q` is the step's own token there), so
//!   that its cache holds every position of the sequence; the first pairs with a hidden
//!   state the previous step kept (`kept`);
//! - for a sequence that wants drafts, one more row after its last: the token the head
//!   just chose there (its best candidate, read on the GPU) with that row's hidden state.
//!   Its best candidate is the first draft; further passes of one row per sequence feed
//!   each draft back with the block's own normed output and yield the next.
//!
//! Drafts are proposals: verification keeps only tokens the model itself samples, so a
//! draft conditioned on a token that was not kept (a rejected draft, or a sample other
//! than the best candidate) only costs acceptance, never correctness. The draft rows'
//! cache entries past the step are rewritten by the next step's catch-up rows.

use strata_model::config::ModelConfig;

use crate::arch::{Layer, LayerState, StateSize, qwen35::Qwen35Layer};
use crate::batch::{BatchLayout, Run};
use crate::gpu::{Dispatch, Step};
use crate::layers::LoadCtx;
use crate::ops::matmul::StepRows;
use crate::ops::mtp::{ELSEWHERE, MtpSources, NO_HIDDEN};
use crate::ops::norm::RmsNorm;
use crate::ops::sample::{RowSampling, mask_words};
use crate::ops::{Act, Recorder};
use crate::scratch::Scratch;
use crate::weights::QuantMatrix;
use crate::{Error, Result};

use super::head::Head;

/// Words of a draft row's top-1 output.
const WORDS: u32 = 4;

pub(super) struct MtpHead {
    layer: Box<dyn Layer>,
    /// Its K and V, in the stage's blocks.
    pub state: LayerState,
    eh_embd: QuantMatrix,
    eh_hidden: QuantMatrix,
    /// `token_embd`, when the stage holds it for nothing else.
    embed: Option<QuantMatrix>,
    small: u64,
    /// f32 `[max_batch, n_embd]`: the step's rows, `output_norm`ed.
    hidden: wgpu::Buffer,
    /// f32 `[max_seqs · per_slot, n_embd]`: each slot's last rows of its last step.
    kept: wgpu::Buffer,
    per_slot: u32,
    /// The `hidden` dispatches, per class of the main step's rows.
    hidden_lists: Vec<(StepRows, Vec<Dispatch>)>,
    passes: Vec<Pass>,
    /// f32 `[max_seqs, n_vocab]`, shared by the passes (each reads its own before the next).
    logits: wgpu::Buffer,
    staging: wgpu::Buffer,
    max_seqs: u32,
    n_embd: u64,
    n_vocab: u64,
}

/// One pass over the block: its rows' activations and tables, and its draft head.
struct Pass {
    scratch: Scratch,
    /// u32 `[rows, 2]`: each row's hidden and token source (`mtp_select`).
    select: wgpu::Buffer,
    /// f32 `[rows, n_embd]`: each row's hidden state, then its `hnorm`.
    h: wgpu::Buffer,
    /// The draft head's step: its rows are the rows that draft.
    head_step: wgpu::Buffer,
    sample_rows: wgpu::Buffer,
    /// f32 `[max_seqs, n_embd]`: the drafting rows' `shared_head_norm`ed output, the
    /// hidden state the next pass pairs each draft with.
    n_out: wgpu::Buffer,
    /// u32 `[max_seqs, WORDS]`: each drafting row's best token.
    result: wgpu::Buffer,
    lists: Vec<(StepRows, Vec<Dispatch>)>,
    head_lists: Vec<(StepRows, Vec<Dispatch>)>,
}

/// What the MTP head needs of one sequence's part of a step.
pub(super) struct MtpPart<'a> {
    pub slot: u32,
    pub pos: u32,
    /// Its rows' tokens.
    pub tokens: &'a [u32],
    /// Its first row in the step.
    pub first: u32,
    /// The position of the first hidden row its last step kept.
    pub kept: Option<u32>,
    /// Its sampled rows before the last (verified drafts).
    pub verify: u32,
    /// Drafts to make after its last row (0: its cache only catches up).
    pub drafts: u32,
    /// Its last row's index among the head's sampled rows, when it drafts.
    pub last_sample: u32,
}

/// A step's MTP work, planned on the host: per pass, its rows and the rows that draft.
pub(super) struct MtpStep {
    passes: Vec<PassPlan>,
    /// Each part's drafts' (pass, sample) in order.
    drafts: Vec<Vec<(usize, usize)>>,
    /// Read the logits of pass 0's first sampled row (see [`MtpHead::plan`]).
    probe: bool,
}

struct PassPlan {
    layout: BatchLayout,
    select: Vec<[u32; 2]>,
    samples: Vec<u32>,
}

impl MtpHead {
    /// The model's first MTP block for a stage whose main activations are `main`, with its
    /// output head `head`; `embed` is the stage's embedding table if it has one.
    pub fn load(
        ctx: &LoadCtx,
        cfg: &ModelConfig,
        main: &Scratch,
        head: &Head,
        embed: Option<&QuantMatrix>,
        draft_max: u32,
    ) -> Result<MtpHead> {
        let Some(t) = cfg.mtp_tensors().into_iter().next() else {
            return Err(Error::Spec(
                "the model has no MTP block (its nextn_predict_layers is 0): speculate with prompt lookup".into(),
            ));
        };
        let (gpu, kernels) = (ctx.gpu, ctx.kernels);
        let (e, vocab, eps) = (cfg.n_embd as u32, cfg.n_vocab as u32, cfg.eps);
        let (max_batch, max_seqs) = (main.max_tokens, main.max_seqs);
        let table = main.table()?;
        let layer: Box<dyn Layer> = Box::new(Qwen35Layer::load(ctx, cfg, &t.layer)?);
        let size = StateSize { slots: max_seqs, kv: Some(*table.layout()), checkpoints: false, rollback: false };
        let state = layer.new_state(gpu, cfg, &size)?;
        let (eh_embd, eh_hidden) = ctx.matrix_halves(&t.eh_proj)?;
        let globals = cfg.global_tensors();
        let own_embed = match embed {
            Some(_) => None,
            None if cfg.tied_output => None,
            None => Some(ctx.matrix(&globals.token_embd)?),
        };
        let table_for_embed: &QuantMatrix = embed.or(own_embed.as_ref()).unwrap_or(&head.output);
        let (enorm, hnorm) = (ctx.vector(&t.enorm)?, ctx.vector(&t.hnorm)?);
        let shared_head_norm = ctx.vector(&t.shared_head_norm)?;
        let output_norm = ctx.vector(&globals.output_norm)?;
        let per_slot = draft_max + 1;
        let row = u64::from(e) * 4;
        let hidden = gpu.storage("mtp hidden", u64::from(max_batch) * row);
        let kept = gpu.storage("mtp kept", u64::from(max_seqs * per_slot) * row);
        let logits = gpu.storage("mtp logits", u64::from(max_seqs) * u64::from(vocab) * 4);
        let sampling = vec![RowSampling::greedy(); max_seqs as usize];
        let sampling = gpu.storage_init("mtp sampling", bytemuck::cast_slice(&sampling));
        let mask = gpu.storage("mtp mask", u64::from(max_seqs * mask_words(vocab)) * 4);
        let small = [&enorm, &hnorm, &shared_head_norm, &output_norm].iter().map(|b| b.size()).sum();

        let norm = RmsNorm::new(e, 1, eps);
        let mut hidden_lists = Vec::new();
        for class in StepRows::up_to(max_batch) {
            let mut rec = Recorder::new(gpu, kernels, &main.step, max_batch)?.for_rows(class);
            rec.rms_norm(main.x(), &output_norm, Act::new(&hidden, max_batch, e), norm)?;
            hidden_lists.push((class, rec.finish()));
        }
        let mut passes: Vec<Pass> = Vec::new();
        for j in 0..draft_max {
            // The first pass carries every row of the step and a draft row per sequence.
            let rows = if j == 0 { max_batch + max_seqs } else { max_seqs };
            let scratch = Scratch::new(gpu, cfg, rows, max_seqs, false, None)?.with_table(table.reader());
            let mut pass = Pass {
                select: gpu.storage("mtp select", u64::from(rows) * 8),
                h: gpu.storage("mtp h", u64::from(rows) * row),
                head_step: gpu.uniform("mtp head step", &Step::default()),
                sample_rows: gpu.storage("mtp sample rows", u64::from(max_seqs) * 4),
                n_out: gpu.storage("mtp n_out", u64::from(max_seqs) * row),
                result: gpu.storage("mtp result", u64::from(max_seqs * WORDS) * 4),
                scratch,
                lists: Vec::new(),
                head_lists: Vec::new(),
            };
            let (from_hidden, picks, words) = match passes.last() {
                None => (Act::new(&hidden, max_batch, e), &head.result, head.words()),
                Some(p) => (Act::new(&p.n_out, max_seqs, e), &p.result, WORDS),
            };
            let s = &pass.scratch;
            let h = Act::new(&pass.h, rows, e);
            for class in StepRows::up_to(rows) {
                let mut rec =
                    Recorder::new(gpu, kernels, &s.step, rows)?.for_rows(class).with_int8_scratch(main.int8.as_ref());
                let from = MtpSources {
                    src: Act::new(&pass.select, rows, 2),
                    hidden: from_hidden,
                    kept: Act::new(&kept, max_seqs * per_slot, e),
                    picks,
                    words,
                };
                rec.mtp_select(from, s.ids(), h)?;
                rec.embed(table_for_embed, s.ids(), s.x())?;
                rec.rms_norm(s.x(), &enorm, s.n(), norm)?;
                rec.rms_norm(h, &hnorm, h, norm)?;
                rec.matmul(&eh_embd, s.n(), s.x(), false)?;
                rec.matmul(&eh_hidden, h, s.x(), true)?;
                layer.record(&mut rec, cfg, s, &state)?;
                pass.lists.push((class, rec.finish()));
            }
            let n_out = Act::new(&pass.n_out, max_seqs, e);
            for class in StepRows::up_to(max_seqs) {
                let mut rec = Recorder::new(gpu, kernels, &pass.head_step, max_seqs)?
                    .for_rows(class)
                    .with_int8_scratch(main.int8.as_ref());
                rec.gather_rows(s.x(), Act::new(&pass.sample_rows, max_seqs, 1), n_out)?;
                rec.rms_norm(n_out, &shared_head_norm, n_out, norm)?;
                rec.matmul(&head.output, n_out, Act::new(&logits, max_seqs, vocab), false)?;
                rec.top_k(Act::new(&logits, max_seqs, vocab), &sampling, &mask, 1, &pass.result)?;
                pass.head_lists.push((class, rec.finish()));
            }
            passes.push(pass);
        }
        let staging = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("mtp staging"),
            size: u64::from(draft_max * max_seqs * WORDS) * 4,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        tracing::info!(block = t.block, draft_max, "MTP head loaded");
        Ok(MtpHead {
            layer,
            state,
            eh_embd,
            eh_hidden,
            embed: own_embed,
            small,
            hidden,
            kept,
            per_slot,
            hidden_lists,
            passes,
            logits,
            staging,
            max_seqs,
            n_embd: u64::from(e),
            n_vocab: u64::from(vocab),
        })
    }

    /// Bytes of weights it holds (the shared output head not counted).
    pub fn weight_bytes(&self) -> u64 {
        self.layer.weight_bytes()
            + self.eh_embd.bytes()
            + self.eh_hidden.bytes()
            + self.embed.as_ref().map_or(0, QuantMatrix::bytes)
            + self.small
    }

    /// The most drafts one step makes per sequence.
    pub fn draft_max(&self) -> u32 {
        self.passes.len() as u32
    }

    /// Plans a step's MTP work for `parts` (each with `n` rows, in the step's order). With
    /// `probe`, the first part drafts nothing and pass 0 samples its last catch-up row
    /// instead, whose logits [`MtpHead::probe_logits`] reads (tests, diagnostics).
    pub fn plan(&self, parts: &[(MtpPart<'_>, u32)], probe: bool) -> MtpStep {
        let mut passes: Vec<PassPlan> = Vec::new();
        let mut drafts = vec![Vec::new(); parts.len()];
        // Each part's sampled row of the pass before (its index among that pass's samples).
        let mut before: Vec<Option<u32>> = vec![None; parts.len()];
        for j in 0..self.draft_max() as usize {
            let mut runs = Vec::new();
            let mut plan = PassPlan { layout: BatchLayout::default(), select: Vec::new(), samples: Vec::new() };
            for (i, (part, n)) in parts.iter().enumerate() {
                let n = *n;
                let drafting = !probe && part.drafts > j as u32;
                if j == 0 {
                    let from_kept = |q: u32| match part.kept {
                        Some(b) if q >= b && q - b < self.per_slot => ELSEWHERE | (part.slot * self.per_slot + q - b),
                        _ => NO_HIDDEN,
                    };
                    for (r, &token) in part.tokens.iter().enumerate() {
                        let r = r as u32;
                        let hidden = if r > 0 {
                            part.first + r - 1
                        } else if part.pos == 0 {
                            NO_HIDDEN
                        } else {
                            from_kept(part.pos - 1)
                        };
                        plan.select.push([hidden, token]);
                    }
                    if drafting {
                        plan.select.push([part.first + n - 1, ELSEWHERE | part.last_sample]);
                    }
                    runs.push(Run { slot: part.slot, pos: part.pos, n: n + u32::from(drafting), keep: 0 });
                    if drafting || (probe && i == 0) {
                        let row = plan.select.len() as u32 - 1;
                        before[i] = Some(plan.samples.len() as u32);
                        drafts[i].push((j, plan.samples.len()));
                        plan.samples.push(row);
                    }
                } else if drafting && let Some(k) = before[i] {
                    runs.push(Run { slot: part.slot, pos: part.pos + n + j as u32, n: 1, keep: 0 });
                    before[i] = Some(plan.samples.len() as u32);
                    drafts[i].push((j, plan.samples.len()));
                    plan.samples.push(plan.select.len() as u32);
                    plan.select.push([k, ELSEWHERE | k]);
                }
            }
            if runs.is_empty() {
                break;
            }
            plan.layout = BatchLayout::new(&runs);
            passes.push(plan);
        }
        if probe {
            drafts.iter_mut().for_each(Vec::clear);
        }
        MtpStep { passes, drafts, probe }
    }

    /// Writes a planned step's tables (before the submission).
    pub fn write(&self, queue: &wgpu::Queue, step: &MtpStep) {
        for (pass, plan) in self.passes.iter().zip(&step.passes) {
            let s = &pass.scratch;
            let l = &plan.layout;
            queue.write_buffer(&s.step, 0, bytemuck::bytes_of(&Step::new(l.n_rows(), l.n_seqs())));
            queue.write_buffer(&s.positions, 0, bytemuck::cast_slice(&l.positions));
            queue.write_buffer(&s.rows, 0, bytemuck::cast_slice(&l.rows));
            queue.write_buffer(&s.seqs, 0, bytemuck::cast_slice(&l.seqs));
            queue.write_buffer(&pass.select, 0, bytemuck::cast_slice(&plan.select));
            if !plan.samples.is_empty() {
                queue.write_buffer(&pass.sample_rows, 0, bytemuck::cast_slice(&plan.samples));
            }
            let head_step = Step::new(plan.samples.len() as u32, 1);
            queue.write_buffer(&pass.head_step, 0, bytemuck::bytes_of(&head_step));
        }
    }

    /// The step's dispatch lists, after the main layers and head (`main`: the main step).
    pub fn lists(&self, main: Step, step: &MtpStep) -> Vec<(&[Dispatch], Step)> {
        let mut lists = vec![(pick(&self.hidden_lists, main.n_tokens), main)];
        for (pass, plan) in self.passes.iter().zip(&step.passes) {
            let l = &plan.layout;
            lists.push((pick(&pass.lists, l.n_rows()), Step::new(l.n_rows(), l.n_seqs())));
            if !plan.samples.is_empty() {
                let n = plan.samples.len() as u32;
                lists.push((pick(&pass.head_lists, n), Step::new(n, 1)));
            }
        }
        lists
    }

    /// After the pass: keeps each part's last rows' hidden states for its next step, and
    /// copies the drafts out. Returns the position each part's kept rows start at.
    pub fn after_pass(
        &self,
        enc: &mut wgpu::CommandEncoder,
        parts: &[(MtpPart<'_>, u32)],
        step: &MtpStep,
    ) -> Vec<Option<u32>> {
        let row = self.n_embd * 4;
        let kept = parts
            .iter()
            .map(|(part, n)| {
                let rows = (part.verify + 1).min(*n).min(self.per_slot);
                let from = u64::from(part.first + n - rows) * row;
                let to = u64::from(part.slot * self.per_slot) * row;
                enc.copy_buffer_to_buffer(&self.hidden, from, &self.kept, to, u64::from(rows) * row);
                Some(part.pos + n - rows)
            })
            .collect();
        for (j, (pass, plan)) in self.passes.iter().zip(&step.passes).enumerate() {
            let bytes = plan.samples.len() as u64 * u64::from(WORDS) * 4;
            if bytes > 0 && !step.probe {
                let at = j as u64 * u64::from(self.max_seqs * WORDS) * 4;
                enc.copy_buffer_to_buffer(&pass.result, 0, &self.staging, at, bytes);
            }
        }
        kept
    }

    /// The copy of the probed row's logits (see [`MtpHead::plan`]), to read after the
    /// submission.
    pub fn probe_logits(&self, gpu: &crate::gpu::Gpu, enc: &mut wgpu::CommandEncoder) -> wgpu::Buffer {
        let size = self.n_vocab * 4;
        let buf = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("mtp logits readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        enc.copy_buffer_to_buffer(&self.logits, 0, &buf, 0, size);
        buf
    }

    /// Each part's drafts, read back after the submission.
    pub fn read_drafts(&self, gpu: &crate::gpu::Gpu, step: &MtpStep) -> Result<Vec<Vec<u32>>> {
        if step.probe || step.drafts.iter().all(Vec::is_empty) {
            return Ok(vec![Vec::new(); step.drafts.len()]);
        }
        let words: Vec<u32> = bytemuck::pod_collect_to_vec(&gpu.map_and_read(&self.staging, self.staging.size())?);
        let at = |j: usize, k: usize| words[(j * self.max_seqs as usize + k) * WORDS as usize];
        Ok(step.drafts.iter().map(|d| d.iter().map(|&(j, k)| at(j, k)).collect()).collect())
    }
}

fn pick(lists: &[(StepRows, Vec<Dispatch>)], n: u32) -> &[Dispatch] {
    let class = StepRows::of(n);
    lists.iter().find(|(c, _)| *c == class).map_or(&[], |(_, l)| &l[..])
}
