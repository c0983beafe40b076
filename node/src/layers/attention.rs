//! Softmax attention with its pre-norm: llama, qwen3 (per-head Q/K RMSNorm) and
//! qwen35's gated variant (a sigmoid output gate per head), as `cfg.attention` says.

use strata_model::arch::AttentionTensors;
use strata_model::config::{self, ModelConfig};

use super::LoadCtx;
use super::projections::Projections;
use crate::Result;
use crate::kv_pool::LayerKv;
use crate::ops::Recorder;
use crate::ops::attention::{self, OutputGate, PagedKv};
use crate::ops::norm::RmsNorm;
use crate::ops::rope::{Rope, RopeStyle};
use crate::scratch::Scratch;
use crate::weights::QuantMatrix;

pub struct Attention {
    /// `attn_q`, `attn_k` and `attn_v`; for qwen35 each head's rows of `attn_q` are
    /// `[query | gate]`, kept fused.
    qkv: Projections,
    o: QuantMatrix,
    q_norm: Option<wgpu::Buffer>,
    k_norm: Option<wgpu::Buffer>,
}

impl Attention {
    pub fn load(ctx: &LoadCtx, t: &AttentionTensors) -> Result<Attention> {
        let norm = |spec: &Option<_>| spec.as_ref().map(|s| ctx.vector(s)).transpose();
        Ok(Attention {
            qkv: Projections::load(ctx, &[&t.q, &t.k, &t.v])?,
            o: ctx.matrix(&t.o)?,
            q_norm: norm(&t.q_norm)?,
            k_norm: norm(&t.k_norm)?,
        })
    }

    pub fn bytes(&self) -> u64 {
        self.qkv.bytes() + self.o.bytes()
    }

    /// Records `x += attention(n)` over the layer's part `kv` of the pool, `n` the
    /// sub-block's normed input; each row attends to its own sequence.
    pub fn record(&self, rec: &mut Recorder, cfg: &ModelConfig, s: &Scratch, kv: &LayerKv) -> Result<()> {
        let cache = PagedKv { layer: kv, table: s.table()? };
        let rows = s.batch().rows;
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
        // Gated: project [query | gate] per head into q_full; the query halves are normed
        // (always, in qwen35) into q, the gate halves read in place by attention.
        let q_out = if a.output_gate { s.q_full() } else { s.q() };
        self.qkv.record(rec, s.n(), &[q_out, s.k(), s.v()])?;
        // Per-head norm (qwen3, qwen35) fused with RoPE; llama rotates only.
        match (&self.q_norm, &self.k_norm) {
            (Some(qn), Some(kn)) => {
                let q_shape = RmsNorm::new(d, h, cfg.eps);
                let q_shape = if a.output_gate { q_shape.with_strides(2 * d, d) } else { q_shape };
                rec.rms_norm_rope(q_out, qn, s.q(), s.positions(), q_shape, rope(h))?;
                rec.rms_norm_rope(s.k(), kn, s.k(), s.positions(), RmsNorm::new(d, hkv, cfg.eps), rope(hkv))?;
            }
            _ => {
                rec.rope(s.q(), s.positions(), rope(h))?;
                rec.rope(s.k(), s.positions(), rope(hkv))?;
            }
        }
        rec.kv_store(cache, s.k(), s.v(), rows)?;
        let mut attn = attention::Attention::new(h, d);
        attn.parts = s.attention_parts();
        if a.output_gate {
            attn.gate = Some(OutputGate { gate: s.q_full(), stride: 2 * d, offset: d });
        }
        rec.attention(cache, s.q(), rows, s.att(), attn)?;
        rec.matmul(&self.o, s.att(), s.x(), true)
    }
}
