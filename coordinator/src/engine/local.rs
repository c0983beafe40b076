//! The in-process engine: one stage holding every layer, on this machine's GPU.

use std::collections::VecDeque;
use std::time::Instant;

use anyhow::Context;
use strata_model::config::ModelConfig;
use strata_model::gguf::Gguf;
use strata_node::error::ErrorKind;
use strata_node::stage::{Input, Output, SeqId, Stage, StageSpec};

use super::{
    Engine, EngineStats, ErrorCode, LatencyHistogram, Placement, Sampled, StageStats, Step, StepError, StepOutcome,
    context_length,
};
use crate::cli::EngineArgs;

/// One stage driven step by step: `submit` runs the step at once and queues its result
/// (there is no second stage to overlap with).
pub struct LocalEngine {
    stage: Stage,
    ctx: u32,
    batch: u32,
    adapter: String,
    backend: String,
    results: VecDeque<(SeqId, StepOutcome)>,
    latency: LatencyHistogram,
    steps: u64,
    busy_seconds: f64,
}

impl LocalEngine {
    pub fn load(gguf: &Gguf, args: &EngineArgs) -> anyhow::Result<LocalEngine> {
        let config = ModelConfig::from_gguf(gguf)?;
        let ctx = context_length(gguf, args)?;
        let batch = args.batch.min(ctx);
        let spec = StageSpec { layers: 0..config.n_layer(), ctx, max_batch: batch };
        let stage = Stage::open(gguf, spec, args.adapter.clone())
            .with_context(|| format!("loading {}", args.model.display()))?;
        let device = stage.device();
        Ok(LocalEngine {
            stage,
            ctx,
            batch,
            adapter: device.name,
            backend: device.backend,
            results: VecDeque::new(),
            latency: LatencyHistogram::default(),
            steps: 0,
            busy_seconds: 0.0,
        })
    }

    fn run(&mut self, step: &Step<'_>) -> strata_node::Result<Option<Sampled>> {
        let stage = &mut self.stage;
        let input = Input::Tokens(step.ids);
        if step.prompt && step.sampling.has_penalties() {
            stage.note_prompt(step.seq, step.ids)?;
        }
        if !step.want_token {
            stage.advance(step.seq, input, step.positions)?;
            return Ok(None);
        }
        if let Some(top) = step.logprobs {
            let (token, lp) = stage.forward_logprobs(step.seq, input, step.positions, step.sampling, top as usize)?;
            return Ok(Some(Sampled { token, logprobs: Some(lp) }));
        }
        match stage.forward(step.seq, input, step.positions, step.sampling)? {
            Output::Token(token) => Ok(Some(Sampled { token, logprobs: None })),
            Output::Hidden(_) => {
                Err(strata_node::Error::NotOnStage("the local stage does not hold the output head".into()))
            }
        }
    }
}

/// A node error as the engine reports it: its class and its text.
fn step_error(e: strata_node::Error) -> StepError {
    let code = match e.kind() {
        ErrorKind::InvalidArgument => ErrorCode::InvalidArgument,
        ErrorKind::OutOfOrder => ErrorCode::OutOfOrder,
        ErrorKind::NotOnStage => ErrorCode::NotOnStage,
        ErrorKind::DataLoss => ErrorCode::DataLoss,
        ErrorKind::Internal => ErrorCode::Internal,
    };
    StepError::new(code, e.to_string())
}

impl Engine for LocalEngine {
    fn submit(&mut self, step: Step<'_>) -> anyhow::Result<()> {
        let t0 = Instant::now();
        let result = self.run(&step).map_err(step_error);
        let took = t0.elapsed();
        if step.want_token {
            self.latency.observe(took);
        }
        self.steps += 1;
        self.busy_seconds += took.as_secs_f64();
        self.results.push_back((step.seq, result));
        Ok(())
    }

    fn next_result(&mut self) -> anyhow::Result<(SeqId, StepOutcome)> {
        self.results.pop_front().context("next_result without a submitted step")
    }

    fn release(&mut self, seq: SeqId) -> anyhow::Result<()> {
        self.stage.release(seq);
        Ok(())
    }

    fn ctx(&self) -> u32 {
        self.ctx
    }

    fn max_batch(&self) -> u32 {
        self.batch
    }

    fn stats(&self) -> EngineStats {
        let stage = &self.stage;
        EngineStats {
            n_layer: stage.config().n_layer(),
            stages: vec![StageStats {
                node: "local".into(),
                device: self.adapter.clone(),
                layers: stage.spec().layers.clone(),
                weight_bytes: stage.weight_bytes(),
                cache_bytes: stage.cache_bytes(),
                memory_bytes: None,
                sequences: stage.sequences(),
                steps: self.steps,
                busy_seconds: self.busy_seconds,
            }],
            step_latency: self.latency.clone(),
        }
    }

    fn placement(&self) -> Vec<Placement> {
        vec![Placement {
            node: "local".into(),
            address: String::new(),
            adapter: self.adapter.clone(),
            backend: self.backend.clone(),
            layers: self.stage.spec().layers.clone(),
        }]
    }

    fn weight_bytes_per_token(&self) -> u64 {
        self.stage.weight_bytes_per_token()
    }

    fn read_bandwidth(&self) -> anyhow::Result<Option<f64>> {
        Ok(Some(self.stage.read_bandwidth()?))
    }
}
