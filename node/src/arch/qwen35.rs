//! qwen35 (Qwen3.5 and Qwen3.6 dense) and qwen35moe (their MoE models): a hybrid of
//! Gated DeltaNet and gated attention layers (one in `full_attention_interval` is
//! attention), each followed by SwiGLU or, in qwen35moe, a mixture of experts:
//! `x += mixer(rmsnorm(x) * attn_norm); x += ffn(rmsnorm(x) * post_attention_norm)`.
//! See `docs/qwen35.md` and `docs/qwen35moe.md` for the maths.
//!
//! DeltaNet layers hold a fixed-size recurrent state per sequence slot instead of KV blocks;
//! the attention layers gate each head's output with a sigmoid of a second half of
//! `attn_q` (the attention part reads that from `cfg.attention.output_gate`).

use strata_model::arch::{FeedForward, LayerTensors, MixerTensors};
use strata_model::config::ModelConfig;

use super::{Layer, LayerState, StateSize, pre_norm};
use crate::deltanet_state::DeltaNetState;
use crate::gpu::Gpu;
use crate::kv_pool::LayerKv;
use crate::layers::LoadCtx;
use crate::layers::attention::Attention;
use crate::layers::deltanet::{self, DeltaNet};
use crate::layers::ffn::Ffn;
use crate::layers::moe::Moe;
use crate::ops::Recorder;
use crate::scratch::Scratch;
use crate::{Error, Result};

enum Mixer {
    DeltaNet(DeltaNet),
    Attention(Attention),
}

/// Boxed: the two differ a lot in size, and a layer is built once.
enum FeedForwardLayer {
    Dense(Box<Ffn>),
    Moe(Box<Moe>),
}

pub struct Qwen35Layer {
    attn_norm: wgpu::Buffer,
    mixer: Mixer,
    post_attention_norm: wgpu::Buffer,
    ffn: FeedForwardLayer,
}

impl Qwen35Layer {
    pub fn load(ctx: &LoadCtx, cfg: &ModelConfig, t: &LayerTensors) -> Result<Qwen35Layer> {
        let mixer = match &t.mixer {
            MixerTensors::DeltaNet(d) => Mixer::DeltaNet(DeltaNet::load(ctx, d)?),
            MixerTensors::Attention(a) => Mixer::Attention(Attention::load(ctx, a)?),
        };
        Ok(Qwen35Layer {
            attn_norm: ctx.vector(&t.attn_norm)?,
            mixer,
            post_attention_norm: ctx.vector(&t.ffn_norm)?,
            ffn: match &t.ffn {
                FeedForward::Dense(f) => FeedForwardLayer::Dense(Box::new(Ffn::load(ctx, f)?)),
                FeedForward::Moe(m) => FeedForwardLayer::Moe(Box::new(Moe::load(ctx, cfg, m)?)),
            },
        })
    }
}

impl Layer for Qwen35Layer {
    fn new_state(&self, gpu: &Gpu, cfg: &ModelConfig, size: &StateSize) -> Result<LayerState> {
        Ok(match self.mixer {
            Mixer::DeltaNet(_) => LayerState::DeltaNet(
                DeltaNetState::new(gpu, deltanet::config(cfg)?, size.slots)?
                    .with_checkpoints(gpu, size.checkpoints)
                    .with_rollback(gpu, size.rollback),
            ),
            Mixer::Attention(_) => {
                let a = &cfg.attention;
                LayerState::Kv(LayerKv::new(gpu, size.kv()?, a.n_head_kv as u32, a.head_dim as u32)?)
            }
        })
    }

    fn record(&self, rec: &mut Recorder, cfg: &ModelConfig, s: &Scratch, state: &LayerState) -> Result<()> {
        pre_norm(rec, cfg, s, &self.attn_norm)?;
        match (&self.mixer, state) {
            (Mixer::DeltaNet(d), LayerState::DeltaNet(st)) => d.record(rec, cfg, s, st)?,
            (Mixer::Attention(a), LayerState::Kv(cache)) => a.record(rec, cfg, s, cache)?,
            _ => return Err(Error::Spec("a layer's state is not of its mixer's kind".into())),
        }
        pre_norm(rec, cfg, s, &self.post_attention_norm)?;
        match &self.ffn {
            FeedForwardLayer::Dense(f) => f.record(rec, s),
            FeedForwardLayer::Moe(m) => m.record(rec, s),
        }
    }

    fn weight_bytes(&self) -> u64 {
        let mixer = match &self.mixer {
            Mixer::DeltaNet(d) => d.bytes(),
            Mixer::Attention(a) => a.bytes(),
        };
        let ffn = match &self.ffn {
            FeedForwardLayer::Dense(f) => f.bytes(),
            FeedForwardLayer::Moe(m) => m.bytes(),
        };
        mixer + ffn + self.attn_norm.size() + self.post_attention_norm.size()
    }

    fn bytes_read_per_token(&self) -> u64 {
        match &self.ffn {
            FeedForwardLayer::Dense(_) => self.weight_bytes(),
            FeedForwardLayer::Moe(m) => self.weight_bytes() - m.bytes() + m.bytes_read_per_token(),
        }
    }
}
