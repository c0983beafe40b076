//! A mixture-of-experts feed-forward (`qwen35moe`): `x += sum_j w_j · expert_j(n) +
//! sigmoid(g · n) · shared(n)`, the experts chosen per row by the router on the GPU.

use strata_model::arch::MoeTensors;
use strata_model::config::{ModelConfig, MoeConfig};

use super::LoadCtx;
use super::ffn::Ffn;
use crate::gpu::Gpu;
use crate::ops::moe::IdMode;
use crate::ops::{Act, Recorder};
use crate::scratch::Scratch;
use crate::weights::QuantMatrix;
use crate::{Error, Result};

pub struct Moe {
    n_used: u32,
    /// `[E, n_exp]`, F32 as converters leave it.
    router: QuantMatrix,
    /// Every expert's SwiGLU, stacked ([`QuantMatrix::matrices`] = n_exp).
    gate: QuantMatrix,
    up: QuantMatrix,
    down: QuantMatrix,
    shared: Ffn,
    /// `[E, 1]`: the shared expert's gate logit.
    shared_gate: QuantMatrix,
}

/// The MoE config of `cfg`, which a MoE layer needs.
pub fn config(cfg: &ModelConfig) -> Result<&MoeConfig> {
    cfg.moe.as_ref().ok_or_else(|| Error::Spec("a MoE layer in a model without expert metadata".into()))
}

impl Moe {
    pub fn load(ctx: &LoadCtx, cfg: &ModelConfig, t: &MoeTensors) -> Result<Moe> {
        let moe = config(cfg)?;
        Ok(Moe {
            n_used: moe.n_expert_used as u32,
            router: ctx.matrix(&t.router)?,
            gate: ctx.experts(&t.experts.gate)?,
            up: ctx.experts(&t.experts.up)?,
            down: ctx.experts(&t.experts.down)?,
            shared: Ffn::load(ctx, &t.shared)?,
            shared_gate: ctx.matrix(&t.shared_gate)?,
        })
    }

    pub fn bytes(&self) -> u64 {
        [&self.router, &self.gate, &self.up, &self.down, &self.shared_gate].iter().map(|m| m.bytes()).sum::<u64>()
            + self.shared.bytes()
    }

    /// Bytes one token reads: the router, its chosen experts' share and the shared expert.
    pub fn bytes_read_per_token(&self) -> u64 {
        let experts = self.gate.bytes() + self.up.bytes() + self.down.bytes();
        self.bytes() - experts + experts * u64::from(self.n_used) / self.gate.matrices() as u64
    }

    pub fn record(&self, rec: &mut Recorder, s: &Scratch) -> Result<()> {
        let m = s.moe()?;
        rec.matmul(&self.router, s.n(), m.logits(), false)?;
        rec.moe_route(m.logits(), m.ids(), m.weights(), self.n_used)?;
        let mode = IdMode::for_rows(rec.step_rows());
        rec.matmul_id(&self.gate, s.n(), m.ids(), m.gate(), false, mode)?;
        rec.matmul_id(&self.up, s.n(), m.ids(), m.up(), false, mode)?;
        rec.swiglu(m.gate(), m.up(), m.gate())?;
        rec.matmul_id(&self.down, m.gate(), m.ids(), m.down(), true, mode)?;
        self.shared.record_to(rec, s, m.shared(), false)?;
        rec.matmul(&self.shared_gate, s.n(), m.shared_gate(), false)?;
        rec.moe_combine(s.x(), m.down(), m.weights(), m.shared(), m.shared_gate())
    }
}

/// A MoE layer's activations, shared by a stage's layers: f32 unless said.
pub struct MoeScratch {
    max_tokens: u32,
    n_expert: u32,
    n_used: u32,
    expert_ff: u32,
    n_embd: u32,
    /// `[T, n_exp]`: the router's logits.
    logits: wgpu::Buffer,
    /// u32 `[T, k]` and f32 `[T, k]`: each row's chosen experts and their weights.
    ids: wgpu::Buffer,
    weights: wgpu::Buffer,
    /// `[T, k, f]`: the chosen experts' gate (then SwiGLU) and up.
    gate: wgpu::Buffer,
    up: wgpu::Buffer,
    /// `[T, k, E]`: the chosen experts' outputs.
    down: wgpu::Buffer,
    /// `[T, E]` and `[T, 1]`: the shared expert's output and gate logit.
    shared: wgpu::Buffer,
    shared_gate: wgpu::Buffer,
}

impl MoeScratch {
    pub fn new(gpu: &Gpu, cfg: &ModelConfig, max_tokens: u32) -> Result<MoeScratch> {
        let moe = config(cfg)?;
        let f32s = |label: &str, width: usize| gpu.storage(label, u64::from(max_tokens) * width as u64 * 4);
        let (k, f, e) = (moe.n_expert_used, moe.expert_ff, cfg.n_embd);
        Ok(MoeScratch {
            max_tokens,
            n_expert: moe.n_expert as u32,
            n_used: k as u32,
            expert_ff: f as u32,
            n_embd: e as u32,
            logits: f32s("moe logits", moe.n_expert),
            ids: f32s("moe ids", k),
            weights: f32s("moe weights", k),
            gate: f32s("moe gate", k * f),
            up: f32s("moe up", k * f),
            down: f32s("moe down", k * e),
            shared: f32s("moe shared", e),
            shared_gate: f32s("moe shared gate", 1),
        })
    }

    fn act<'a>(&self, buffer: &'a wgpu::Buffer, width: u32) -> Act<'a> {
        Act::new(buffer, self.max_tokens, width)
    }

    pub fn logits(&self) -> Act<'_> {
        self.act(&self.logits, self.n_expert)
    }

    pub fn ids(&self) -> Act<'_> {
        self.act(&self.ids, self.n_used)
    }

    pub fn weights(&self) -> Act<'_> {
        self.act(&self.weights, self.n_used)
    }

    pub fn gate(&self) -> Act<'_> {
        self.act(&self.gate, self.n_used * self.expert_ff)
    }

    pub fn up(&self) -> Act<'_> {
        self.act(&self.up, self.n_used * self.expert_ff)
    }

    pub fn down(&self) -> Act<'_> {
        self.act(&self.down, self.n_used * self.n_embd)
    }

    pub fn shared(&self) -> Act<'_> {
        self.act(&self.shared, self.n_embd)
    }

    pub fn shared_gate(&self) -> Act<'_> {
        self.act(&self.shared_gate, 1)
    }
}
