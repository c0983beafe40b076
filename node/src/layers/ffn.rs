//! SwiGLU feed-forward: `x += W_down(silu(W_gate n) * (W_up n))`, `n` the normed input.

use strata_model::arch::FfnTensors;

use super::LoadCtx;
use crate::Result;
use crate::ops::{Act, Recorder};
use crate::scratch::Scratch;
use crate::weights::QuantMatrix;

pub struct Ffn {
    gate: QuantMatrix,
    up: QuantMatrix,
    down: QuantMatrix,
}

impl Ffn {
    pub fn load(ctx: &LoadCtx, t: &FfnTensors) -> Result<Ffn> {
        Ok(Ffn { gate: ctx.matrix(&t.gate)?, up: ctx.matrix(&t.up)?, down: ctx.matrix(&t.down)? })
    }

    pub fn bytes(&self) -> u64 {
        self.gate.bytes() + self.up.bytes() + self.down.bytes()
    }

    /// `x += ffn(n)`, on the residual stream.
    pub fn record(&self, rec: &mut Recorder, s: &Scratch) -> Result<()> {
        self.record_to(rec, s, s.x(), true)
    }

    /// `out (+)= ffn(n)` (a MoE layer's shared expert writes its own buffer).
    pub fn record_to(&self, rec: &mut Recorder, s: &Scratch, out: Act<'_>, accumulate: bool) -> Result<()> {
        rec.matmul(&self.gate, s.n(), s.ffn_gate(), false)?;
        rec.matmul(&self.up, s.n(), s.ffn_up(), false)?;
        rec.swiglu(s.ffn_gate(), s.ffn_up(), s.ffn_gate())?;
        rec.matmul(&self.down, s.ffn_gate(), out, accumulate)
    }
}
