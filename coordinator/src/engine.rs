//! The model on this machine: one stage holding every layer, driven through the node
//! crate's public API (the coordinator never touches the GPU itself).

use std::sync::Arc;

use anyhow::Context;
use strata_model::gguf::Gguf;
use strata_model::sampling::SamplingParams;
use strata_node::gpu::{Gpu, GpuConfig};
use strata_node::stage::{Input, Output, SeqId, Stage, StageSpec};

use crate::cli::EngineArgs;

/// Default context when the model's own is larger: keeps KV memory modest.
const DEFAULT_CTX: u32 = 4096;

pub struct LocalEngine {
    pub stage: Stage,
    pub ctx: u32,
    pub batch: u32,
}

impl LocalEngine {
    pub fn load(gguf: &Gguf, args: &EngineArgs) -> anyhow::Result<LocalEngine> {
        let gpu = Arc::new(Gpu::new(&GpuConfig { adapter: args.adapter.clone() })?);
        let config = strata_model::config::ModelConfig::from_gguf(gguf)?;
        let ctx = args.ctx.unwrap_or_else(|| (config.context_length as u32).min(DEFAULT_CTX));
        let spec = StageSpec { layers: 0..config.n_layer(), ctx, max_batch: args.batch.min(ctx) };
        let stage = Stage::load(gpu, gguf, spec).with_context(|| format!("loading {}", args.model.display()))?;
        Ok(LocalEngine { stage, ctx, batch: args.batch.min(ctx) })
    }

    /// Feeds `ids` starting at `pos` in chunks of the batch size and returns the token
    /// sampled after the last one.
    pub fn prefill(&mut self, seq: SeqId, ids: &[u32], pos: u32, sampling: &SamplingParams) -> anyhow::Result<u32> {
        let mut token = None;
        let mut p = pos;
        for chunk in ids.chunks(self.batch as usize) {
            let positions: Vec<u32> = (p..p + chunk.len() as u32).collect();
            token = Some(self.step(seq, chunk, &positions, sampling)?);
            p += chunk.len() as u32;
        }
        token.context("nothing to prefill")
    }

    pub fn step(&mut self, seq: SeqId, ids: &[u32], positions: &[u32], sampling: &SamplingParams) -> anyhow::Result<u32> {
        match self.stage.forward(seq, Input::Tokens(ids), positions, sampling)? {
            Output::Token(t) => Ok(t),
            Output::Hidden(_) => anyhow::bail!("the local stage does not hold the output head"),
        }
    }
}
