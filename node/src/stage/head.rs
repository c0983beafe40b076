//! The output head of the last stage: the rows to sample (each sequence's last row of the
//! step that wants a token) are gathered, normed, multiplied by the head matrix, penalised
//! and reduced to each row's argmax or top candidates, all inside the step's one pass.
//! Only those candidates are read back.

use strata_model::config::ModelConfig;
use strata_model::sampling::MAX_CANDIDATES;

use crate::Result;
use crate::gpu::{Dispatch, Step};
use crate::layers::LoadCtx;
use crate::ops::matmul::StepRows;
use crate::ops::norm::RmsNorm;
use crate::ops::sample::{mask_words, top_k_words};
use crate::ops::{Act, Recorder};
use crate::scratch::Scratch;
use crate::weights::QuantMatrix;

use super::sequences::MAX_RECENT;

/// Candidates each sampled row can return: what host-side sampling and logprobs use.
pub(super) const K_MAX: u32 = MAX_CANDIDATES as u32;

pub(super) struct Head {
    pub output: QuantMatrix,
    /// The head's [`Step`] uniform: its rows are the step's rows to sample.
    pub step: wgpu::Buffer,
    /// u32 `[max_samples]`: the step's rows to sample.
    pub sample_rows: wgpu::Buffer,
    /// `[max_samples]` [`crate::ops::sample::RowSampling`].
    pub sampling: wgpu::Buffer,
    /// u32 `[max_samples, MAX_RECENT]`: each sampled row's recent tokens (penalties).
    pub recent: wgpu::Buffer,
    /// u32 `[max_samples, mask_words(n_vocab)]`: the grammar masks of masked rows.
    pub mask: wgpu::Buffer,
    /// f32 `[max_samples, n_vocab]`.
    pub logits: wgpu::Buffer,
    /// u32 `[max_samples, top_k_words(K_MAX)]`: each row's candidates.
    pub result: wgpu::Buffer,
    pub max_samples: u32,
    mask_words: u32,
    /// The head's dispatches for each class of sample count.
    lists: Vec<(StepRows, Vec<Dispatch>)>,
}

impl Head {
    pub fn load(ctx: &LoadCtx, cfg: &ModelConfig, s: &Scratch, max_samples: u32) -> Result<Head> {
        let (gpu, e, vocab) = (ctx.gpu, cfg.n_embd as u32, cfg.n_vocab as u32);
        let globals = cfg.global_tensors();
        let norm_w = ctx.vector(&globals.output_norm)?;
        let output = ctx.matrix(&globals.output)?;
        let m = u64::from(max_samples);
        let x_last = gpu.storage("x_last", m * u64::from(e) * 4);
        let n_last = gpu.storage("n_last", m * u64::from(e) * 4);
        let head = Head {
            step: gpu.uniform("head step", &Step::default()),
            sample_rows: gpu.storage("sample rows", m * 4),
            sampling: gpu.storage("row sampling", m * size_of::<crate::ops::sample::RowSampling>() as u64),
            recent: gpu.storage("recent", m * MAX_RECENT as u64 * 4),
            mask: gpu.storage("grammar masks", m * u64::from(mask_words(vocab)) * 4),
            logits: gpu.storage("logits", m * u64::from(vocab) * 4),
            result: gpu.storage("result", m * u64::from(top_k_words(K_MAX)) * 4),
            max_samples,
            mask_words: mask_words(vocab),
            lists: Vec::new(),
            output,
        };
        let mut lists = Vec::new();
        for rows in StepRows::up_to(max_samples) {
            let mut rec = Recorder::new(gpu, ctx.kernels, &head.step, max_samples)?
                .for_rows(rows)
                .with_int8_scratch(s.int8.as_ref());
            let (x_act, n_act) = (Act::new(&x_last, max_samples, e), Act::new(&n_last, max_samples, e));
            let logits = Act::new(&head.logits, max_samples, vocab);
            rec.gather_rows(s.x(), Act::new(&head.sample_rows, max_samples, 1), x_act)?;
            rec.rms_norm(x_act, &norm_w, n_act, RmsNorm::new(e, 1, cfg.eps))?;
            rec.matmul(&head.output, n_act, logits, false)?;
            rec.penalize(logits, &head.sampling, &head.recent, MAX_RECENT as u32)?;
            rec.top_k(logits, &head.sampling, &head.mask, K_MAX, &head.result)?;
            lists.push((rows, rec.finish()));
        }
        Ok(Head { lists, ..head })
    }

    /// The dispatches for a step sampling `n` rows.
    pub fn list(&self, n: u32) -> &[Dispatch] {
        let class = StepRows::of(n);
        self.lists.iter().find(|(c, _)| *c == class).map_or(&[], |(_, l)| &l[..])
    }

    /// Words of one row of a grammar mask.
    pub fn mask_words(&self) -> usize {
        self.mask_words as usize
    }

    /// Words of one row's candidates.
    pub fn words(&self) -> u32 {
        top_k_words(K_MAX)
    }
}
