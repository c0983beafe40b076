//! Where the model runs: [`LocalEngine`], one in-process stage holding every layer
//! (driven through the node crate's public API; the coordinator never touches the GPU
//! itself), or a [`Pipeline`] of stage services. [`Engine`] is the one interface
//! `generate` drives.

use std::sync::Arc;

use anyhow::Context;
use strata_model::gguf::Gguf;
use strata_model::sampling::SamplingParams;
use strata_node::gpu::{Gpu, GpuConfig};
use strata_node::stage::{Input, Output, SeqId, Stage, StageSpec};

use crate::cli::EngineArgs;
use crate::pipeline::Pipeline;

/// Default context when the model's own is larger: keeps KV memory modest.
const DEFAULT_CTX: u32 = 4096;

/// The context length asked for, or the model's own up to [`DEFAULT_CTX`].
pub fn context_length(gguf: &Gguf, args: &EngineArgs) -> anyhow::Result<u32> {
    let config = strata_model::config::ModelConfig::from_gguf(gguf)?;
    Ok(args.ctx.unwrap_or_else(|| (config.context_length as u32).min(DEFAULT_CTX)))
}

/// The model, on this machine or across a pipeline of nodes.
pub enum Engine {
    Local(LocalEngine),
    Pipeline(Pipeline),
}

impl Engine {
    /// A pipeline when `args` names peers, `--no-local` or `--split`; else one local stage.
    pub fn load(gguf: &Gguf, args: &EngineArgs) -> anyhow::Result<Engine> {
        Ok(if args.is_pipeline() { Engine::Pipeline(Pipeline::load(gguf, args)?) } else { Engine::Local(LocalEngine::load(gguf, args)?) })
    }

    pub fn ctx(&self) -> u32 {
        match self {
            Engine::Local(e) => e.ctx,
            Engine::Pipeline(p) => p.ctx,
        }
    }

    /// Tells the sampler which prompt tokens a sequence has seen (repetition penalties).
    pub fn note_prompt(&mut self, seq: SeqId, ids: &[u32]) -> anyhow::Result<()> {
        match self {
            Engine::Local(e) => Ok(e.stage.note_prompt(seq, ids)?),
            Engine::Pipeline(p) => {
                p.note_prompt(seq, ids);
                Ok(())
            }
        }
    }

    /// Feeds `ids` from `pos` in chunks and returns the token sampled after the last.
    pub fn prefill(&mut self, seq: SeqId, ids: &[u32], pos: u32, sampling: &SamplingParams) -> anyhow::Result<u32> {
        match self {
            Engine::Local(e) => e.prefill(seq, ids, pos, sampling),
            Engine::Pipeline(p) => p.prefill(seq, ids, pos, sampling),
        }
    }

    pub fn step(&mut self, seq: SeqId, ids: &[u32], positions: &[u32], sampling: &SamplingParams) -> anyhow::Result<u32> {
        match self {
            Engine::Local(e) => e.step(seq, ids, positions, sampling),
            Engine::Pipeline(p) => p.step(seq, ids, positions, sampling),
        }
    }

    /// (node, address, layers) of every stage, in pipeline order.
    pub fn placement(&self) -> Vec<(String, String, std::ops::Range<usize>)> {
        match self {
            Engine::Local(e) => vec![("local".into(), String::new(), e.stage.spec().layers.clone())],
            Engine::Pipeline(p) => p.stages.iter().map(|s| (s.name.clone(), s.addr.clone(), s.layers.clone())).collect(),
        }
    }

    pub fn release(&mut self, seq: SeqId) -> anyhow::Result<()> {
        match self {
            Engine::Local(e) => {
                e.stage.release(seq);
                Ok(())
            }
            Engine::Pipeline(p) => p.release(seq),
        }
    }
}

pub struct LocalEngine {
    pub stage: Stage,
    pub ctx: u32,
    pub batch: u32,
}

impl LocalEngine {
    pub fn load(gguf: &Gguf, args: &EngineArgs) -> anyhow::Result<LocalEngine> {
        let gpu = Arc::new(Gpu::new(&GpuConfig { adapter: args.adapter.clone() })?);
        let config = strata_model::config::ModelConfig::from_gguf(gguf)?;
        let ctx = context_length(gguf, args)?;
        let spec = StageSpec { layers: 0..config.n_layer(), ctx, max_batch: args.batch.min(ctx) };
        let stage = Stage::load(gpu, gguf, spec).with_context(|| format!("loading {}", args.model.display()))?;
        Ok(LocalEngine { stage, ctx, batch: args.batch.min(ctx) })
    }

    /// Feeds `ids` starting at `pos` in chunks of the batch size and returns the token
    /// sampled after the last one.
    pub fn prefill(&mut self, seq: SeqId, ids: &[u32], pos: u32, sampling: &SamplingParams) -> anyhow::Result<u32> {
        let chunks: Vec<&[u32]> = ids.chunks(self.batch as usize).collect();
        let (last, before) = chunks.split_last().context("nothing to prefill")?;
        let mut p = pos;
        // Chunks before the last only fill the caches: nothing is sampled from them.
        for chunk in before {
            let positions: Vec<u32> = (p..p + chunk.len() as u32).collect();
            self.stage.advance(seq, Input::Tokens(chunk), &positions)?;
            p += chunk.len() as u32;
        }
        let positions: Vec<u32> = (p..p + last.len() as u32).collect();
        self.step(seq, last, &positions, sampling)
    }

    pub fn step(&mut self, seq: SeqId, ids: &[u32], positions: &[u32], sampling: &SamplingParams) -> anyhow::Result<u32> {
        match self.stage.forward(seq, Input::Tokens(ids), positions, sampling)? {
            Output::Token(t) => Ok(t),
            Output::Hidden(_) => anyhow::bail!("the local stage does not hold the output head"),
        }
    }
}
