//! SwiGLU feed-forward: `x += W_down(silu(W_gate n) * (W_up n))`, `n` the normed input.

use strata_model::arch::FfnTensors;

use super::LoadCtx;
use super::projections::Projections;
use crate::Result;
use crate::ops::{Act, Recorder};
use crate::scratch::Scratch;
use crate::weights::QuantMatrix;

pub struct Ffn {
    /// `ffn_gate` and `ffn_up`.
    gate_up: Projections,
    down: QuantMatrix,
}

impl Ffn {
    pub fn load(ctx: &LoadCtx, t: &FfnTensors) -> Result<Ffn> {
        Ok(Ffn { gate_up: Projections::load(ctx, &[&t.gate, &t.up])?, down: ctx.matrix(&t.down)? })
    }

    pub fn bytes(&self) -> u64 {
        self.gate_up.bytes() + self.down.bytes()
    }

    /// `x += ffn(n)`, on the residual stream.
    pub fn record(&self, rec: &mut Recorder, s: &Scratch) -> Result<()> {
        self.record_to(rec, s, s.x(), true)
    }

    /// `out (+)= ffn(n)` (a MoE layer's shared expert writes its own buffer).
    pub fn record_to(&self, rec: &mut Recorder, s: &Scratch, out: Act<'_>, accumulate: bool) -> Result<()> {
        self.gate_up.record(rec, s.n(), &[s.ffn_gate(), s.ffn_up()])?;
        rec.swiglu(s.ffn_gate(), s.ffn_up(), s.ffn_gate())?;
        rec.matmul(&self.down, s.ffn_gate(), out, accumulate)
    }
}
