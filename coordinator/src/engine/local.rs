//! The in-process engine: one stage holding every layer, on this machine's GPU.

use std::collections::VecDeque;
use std::time::Instant;

use std::sync::Arc;

use anyhow::Context;
use strata_model::config::ModelConfig;
use strata_model::gguf::Gguf;
use strata_model::plan::NodeBudget;
use strata_node::error::ErrorKind;
use strata_node::gpu::Gpu;
use strata_node::stage::{Produced, SeqId, SeqStep as StageStep, Stage, Want};

use super::{
    Engine, EngineStats, EngineUse, ErrorCode, KvCapacity, LatencyHistogram, NodeCounters, Placement, PoolCounters,
    Sampled, SeqStep, StageStats, StepDone, StepError, StepOutcome, context_length,
};
use crate::cli::EngineArgs;

/// One stage driven step by step: `submit` runs the step at once and queues its result
/// (there is no second stage to overlap with).
pub struct LocalEngine {
    stage: Stage,
    ctx: u32,
    adapter: String,
    backend: String,
    results: VecDeque<StepDone>,
    next_step: u64,
    latency: LatencyHistogram,
    steps: u64,
    rows: u64,
    busy_seconds: f64,
}

impl LocalEngine {
    pub fn load(gguf: &Gguf, args: &EngineArgs, usage: EngineUse) -> anyhow::Result<LocalEngine> {
        let config = ModelConfig::from_gguf(gguf)?;
        let ctx = context_length(gguf, args)?;
        let gpu = Arc::new(Gpu::new(&args.device.gpu_config())?);
        // No `--ctx`: the model's own context, or the most this device's memory holds, with
        // the pool sized by that memory (as a pipeline's plan sizes it over its nodes).
        let (ctx, kv_positions) = if args.ctx.is_none() {
            let memory = strata_node::memory::probe(&gpu);
            tracing::info!(bytes = memory.bytes, source = memory.source, "usable memory");
            let budget = [NodeBudget::new("local", memory.bytes).with_int8_dot(gpu.int8_dot)];
            let binding = gpu.max_binding();
            let (ctx, plan) = super::fit_context(gguf, args, usage, ctx, &budget, None, |_| Some(binding))
                .with_context(|| format!("planning {} on this machine", args.model.display()))?;
            (ctx, Some(plan.kv_positions))
        } else {
            (ctx, None)
        };
        let spec = super::stage_spec(args, &config, usage, ctx, 0..config.n_layer(), kv_positions)?;
        let stage = Stage::load(gpu, gguf, spec).with_context(|| format!("loading {}", args.model.display()))?;
        let device = stage.device();
        Ok(LocalEngine {
            stage,
            ctx,
            adapter: device.name,
            backend: device.backend,
            results: VecDeque::new(),
            next_step: 0,
            latency: LatencyHistogram::default(),
            steps: 0,
            rows: 0,
            busy_seconds: 0.0,
        })
    }

    fn run(&mut self, seqs: &[SeqStep<'_>]) -> Vec<(SeqId, StepOutcome)> {
        let steps: Vec<StageStep<'_>> = seqs
            .iter()
            .map(|s| StageStep {
                seq: s.seq,
                pos: s.pos,
                rows: s.ids.len() as u32,
                tokens: s.ids,
                want: if s.want_token {
                    Want::Token { sampling: s.sampling.clone(), logprobs: s.logprobs.map(|n| n as usize) }
                } else {
                    Want::Nothing
                },
                history: s.history,
                allowed: s.allowed,
                checkpoint: s.checkpoint,
                fork_from: s.fork_from,
                verify: s.verify,
                keep: s.keep,
                draft: s.draft,
            })
            .collect();
        match self.stage.step(&steps, None) {
            Ok(out) => out
                .seqs
                .into_iter()
                .zip(out.drafts)
                .map(|((seq, r), drafts)| {
                    let outcome = match r {
                        Ok(Produced::Token(token, logprobs)) => {
                            Ok(Some(Sampled { token, logprobs, after: Vec::new(), drafts }))
                        }
                        Ok(Produced::Tokens(tokens)) => Ok(Sampled::verified(tokens).map(|s| Sampled { drafts, ..s })),
                        Ok(_) => Ok(None),
                        Err(e) => Err(step_error(e)),
                    };
                    (seq, outcome)
                })
                .collect(),
            Err(e) => {
                let e = step_error(e);
                seqs.iter().map(|s| (s.seq, Err(e.clone()))).collect()
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
        ErrorKind::Exhausted => ErrorCode::Exhausted,
        ErrorKind::Internal => ErrorCode::Internal,
    };
    StepError::new(code, e.to_string())
}

impl Engine for LocalEngine {
    fn submit(&mut self, seqs: &[SeqStep<'_>]) -> anyhow::Result<u64> {
        let t0 = Instant::now();
        let outcomes = self.run(seqs);
        let took = t0.elapsed();
        self.latency.observe(took);
        self.steps += 1;
        self.rows += seqs.iter().map(|s| s.ids.len() as u64).sum::<u64>();
        self.busy_seconds += took.as_secs_f64();
        let step = self.next_step;
        self.next_step += 1;
        self.results.push_back(StepDone { step, outcomes });
        Ok(step)
    }

    fn next_result(&mut self) -> anyhow::Result<StepDone> {
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
        self.stage.spec().max_batch
    }

    fn max_seqs(&self) -> u32 {
        self.stage.spec().max_seqs
    }

    fn draft_max(&self) -> u32 {
        self.stage.spec().draft_max
    }

    fn mtp(&self) -> bool {
        self.stage.spec().mtp
    }

    fn checkpoints(&self) -> bool {
        self.stage.spec().checkpoints
    }

    fn kv_capacity(&self) -> Option<KvCapacity> {
        let p = self.stage.pool();
        (p.blocks > 0).then_some(KvCapacity { block_size: p.block_size, blocks: p.blocks })
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
                rows: self.rows,
                busy_seconds: self.busy_seconds,
                pool: self.pool(),
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

    fn profile_step(&self, rows: u32, seqs: u32, pos: u32) -> anyhow::Result<Option<Vec<strata_node::bench::OpTime>>> {
        // Enough repetitions that a submission's own cost is noise.
        Ok(Some(self.stage.profile_step(rows, seqs, pos, 50)?))
    }

    fn node_counters(&self) -> anyhow::Result<Vec<NodeCounters>> {
        let stage = &self.stage;
        Ok(vec![NodeCounters {
            steps: self.steps,
            rows: self.rows,
            compute_seconds: self.busy_seconds,
            waited_steps: 0,
            downstream_wait_seconds: 0.0,
            weight_bytes: stage.weight_bytes(),
            cache_bytes: stage.cache_bytes(),
            sequences: stage.sequences(),
            pool: self.pool(),
        }])
    }
}

impl LocalEngine {
    fn pool(&self) -> PoolCounters {
        let p = self.stage.pool();
        PoolCounters {
            block_size: p.block_size,
            blocks: p.blocks,
            used_blocks: p.used_blocks,
            slots: p.slots,
            used_slots: p.used_slots,
        }
    }
}
