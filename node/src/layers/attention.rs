//! Softmax attention with its pre-norm: llama, qwen3 (per-head Q/K RMSNorm) and
//! qwen35's gated variant (a sigmoid output gate per head).

use strata_model::config::{self, ModelConfig, layer_tensor};

use super::LoadCtx;
use crate::Result;
use crate::gpu::{Dispatch, Gpu, KernelCache};
use crate::kv_cache::KvCache;
use crate::ops::norm::{self, RmsNorm};
use crate::ops::rope::{self, Rope, RopeStyle};
use crate::ops::{attention, matmul::matmul};
use crate::scratch::Scratch;
use crate::weights::QuantMatrix;

pub struct Attention {
    norm: wgpu::Buffer,
    /// `attn_q`; for qwen35 each head's rows are `[query | gate]`, kept fused.
    q: QuantMatrix,
    k: QuantMatrix,
    v: QuantMatrix,
    o: QuantMatrix,
    q_norm: Option<wgpu::Buffer>,
    k_norm: Option<wgpu::Buffer>,
}

impl Attention {
    pub fn load(ctx: &LoadCtx, cfg: &ModelConfig, i: usize) -> Result<Attention> {
        let a = &cfg.attention;
        let (e, d) = (cfg.n_embd, a.head_dim);
        let kv = a.n_head_kv * d;
        let name = |n: &str| layer_tensor(i, n);
        let q_rows = a.n_head * d * if a.output_gate { 2 } else { 1 };
        let norm = |n: &str| if a.qk_norm { ctx.vector(&name(n), d).map(Some) } else { Ok(None) };
        Ok(Attention {
            norm: ctx.vector(&name("attn_norm.weight"), e)?,
            q: ctx.matrix(&name("attn_q.weight"), e, q_rows)?,
            k: ctx.matrix(&name("attn_k.weight"), e, kv)?,
            v: ctx.matrix(&name("attn_v.weight"), e, kv)?,
            o: ctx.matrix(&name("attn_output.weight"), a.n_head * d, e)?,
            q_norm: norm("attn_q_norm.weight")?,
            k_norm: norm("attn_k_norm.weight")?,
        })
    }

    pub fn bytes(&self) -> u64 {
        self.q.bytes() + self.k.bytes() + self.v.bytes() + self.o.bytes()
    }

    #[allow(clippy::too_many_arguments)]
    pub fn record(&self, gpu: &Gpu, kc: &KernelCache, cfg: &ModelConfig, s: &Scratch, cache: &KvCache, max_tokens: u32, out: &mut Vec<Dispatch>) -> Result<()> {
        let a = &cfg.attention;
        let (d, h, hkv) = (a.head_dim as u32, a.n_head as u32, a.n_head_kv as u32);
        let rope = |n_heads| Rope {
            n_heads,
            head_dim: d,
            n_rot: a.n_rot as u32,
            theta: a.rope_theta,
            style: match a.rope_style {
                config::RopeStyle::Neox => RopeStyle::Neox,
                config::RopeStyle::Adjacent => RopeStyle::Adjacent,
            },
        };
        out.push(norm::rms_norm(gpu, kc, &s.step, &s.x, &self.norm, &s.n, RmsNorm::new(cfg.n_embd as u32, 1, cfg.eps), max_tokens)?);
        // Gated: project [query | gate] per head into q_full; the query halves are normed
        // (always, in qwen35) into q, the gate halves read in place by attention.
        let q_out = if a.output_gate { &s.q_full } else { &s.q };
        out.extend(matmul(gpu, kc, &s.step, &self.q, &s.n, q_out, max_tokens, false)?);
        out.extend(matmul(gpu, kc, &s.step, &self.k, &s.n, &s.k, max_tokens, false)?);
        out.extend(matmul(gpu, kc, &s.step, &self.v, &s.n, &s.v, max_tokens, false)?);
        // Per-head norm (qwen3, qwen35) fused with RoPE; llama rotates only.
        match (&self.q_norm, &self.k_norm) {
            (Some(qn), Some(kn)) => {
                let q_shape = if a.output_gate { RmsNorm::new(d, h, cfg.eps).with_strides(2 * d, d) } else { RmsNorm::new(d, h, cfg.eps) };
                out.push(rope::rms_norm_rope(gpu, kc, &s.step, q_out, qn, &s.q, &s.positions, q_shape, rope(h), max_tokens)?);
                out.push(rope::rms_norm_rope(gpu, kc, &s.step, &s.k, kn, &s.k, &s.positions, RmsNorm::new(d, hkv, cfg.eps), rope(hkv), max_tokens)?);
            }
            _ => {
                out.push(rope::rope(gpu, kc, &s.step, &s.q, &s.positions, rope(h), max_tokens)?);
                out.push(rope::rope(gpu, kc, &s.step, &s.k, &s.positions, rope(hkv), max_tokens)?);
            }
        }
        out.push(attention::kv_store(gpu, kc, &s.step, cache, &s.k, &s.v, &s.positions, max_tokens)?);
        let mut attn = attention::Attention::new(h, d);
        if a.output_gate {
            attn.gate = Some(attention::OutputGate { gate: &s.q_full, stride: 2 * d, offset: d });
        }
        out.push(attention::attention(gpu, kc, &s.step, cache, &s.q, &s.positions, &s.att, attn, max_tokens)?);
        out.extend(matmul(gpu, kc, &s.step, &self.o, &s.att, &s.x, max_tokens, true)?);
        Ok(())
    }
}
