//! SwiGLU feed-forward with its pre-norm: `x += W_down(silu(W_gate n) * (W_up n))`.

use strata_model::config::{ModelConfig, layer_tensor};

use super::LoadCtx;
use crate::Result;
use crate::gpu::{Dispatch, Gpu, KernelCache};
use crate::ops::norm::{self, RmsNorm};
use crate::ops::{elementwise, matmul::matmul};
use crate::scratch::Scratch;
use crate::weights::QuantMatrix;

pub struct Ffn {
    norm: wgpu::Buffer,
    gate: QuantMatrix,
    up: QuantMatrix,
    down: QuantMatrix,
}

impl Ffn {
    pub fn load(ctx: &LoadCtx, cfg: &ModelConfig, i: usize) -> Result<Ffn> {
        let (e, f) = (cfg.n_embd, cfg.n_ff);
        Ok(Ffn {
            norm: ctx.vector(&layer_tensor(i, &format!("{}.weight", cfg.ffn_norm_name())), e)?,
            gate: ctx.matrix(&layer_tensor(i, "ffn_gate.weight"), e, f)?,
            up: ctx.matrix(&layer_tensor(i, "ffn_up.weight"), e, f)?,
            down: ctx.matrix(&layer_tensor(i, "ffn_down.weight"), f, e)?,
        })
    }

    pub fn bytes(&self) -> u64 {
        self.gate.bytes() + self.up.bytes() + self.down.bytes()
    }

    pub fn record(&self, gpu: &Gpu, kc: &KernelCache, cfg: &ModelConfig, s: &Scratch, max_tokens: u32, out: &mut Vec<Dispatch>) -> Result<()> {
        out.push(norm::rms_norm(gpu, kc, &s.step, &s.x, &self.norm, &s.n, RmsNorm::new(cfg.n_embd as u32, 1, cfg.eps), max_tokens)?);
        out.extend(matmul(gpu, kc, &s.step, &self.gate, &s.n, &s.ffn_gate, max_tokens, false)?);
        out.extend(matmul(gpu, kc, &s.step, &self.up, &s.n, &s.ffn_up, max_tokens, false)?);
        out.push(elementwise::swiglu(gpu, kc, &s.step, &s.ffn_gate, &s.ffn_up, &s.ffn_gate, cfg.n_ff as u32, max_tokens)?);
        out.extend(matmul(gpu, kc, &s.step, &self.down, &s.ffn_gate, &s.x, max_tokens, true)?);
        Ok(())
    }
}
