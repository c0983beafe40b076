//! llama and qwen3: a dense decoder layer,
//! `x += attention(rmsnorm(x) * attn_norm); x += ffn(rmsnorm(x) * ffn_norm)`.
//!
//! qwen3 is llama with a per-head RMSNorm of q and k before NeoX-style RoPE; both are
//! flags of `cfg.attention` that the attention part reads, so the two share this file.

use strata_model::arch::{FeedForward, LayerTensors, MixerTensors};
use strata_model::config::ModelConfig;

use super::{Layer, LayerState, StateSize, pre_norm};
use crate::gpu::Gpu;
use crate::kv_pool::LayerKv;
use crate::layers::LoadCtx;
use crate::layers::attention::Attention;
use crate::layers::ffn::Ffn;
use crate::ops::Recorder;
use crate::scratch::Scratch;
use crate::{Error, Result};

pub struct DenseLayer {
    attn_norm: wgpu::Buffer,
    attention: Attention,
    ffn_norm: wgpu::Buffer,
    ffn: Ffn,
}

impl DenseLayer {
    pub fn load(ctx: &LoadCtx, t: &LayerTensors) -> Result<DenseLayer> {
        let MixerTensors::Attention(attention) = &t.mixer else {
            return Err(Error::Spec(format!("`{}`: a dense layer mixes by attention", t.attn_norm.name)));
        };
        Ok(DenseLayer {
            attn_norm: ctx.vector(&t.attn_norm)?,
            attention: Attention::load(ctx, attention)?,
            ffn_norm: ctx.vector(&t.ffn_norm)?,
            ffn: match &t.ffn {
                FeedForward::Dense(f) => Ffn::load(ctx, f)?,
                FeedForward::Moe(_) => return Err(crate::Error::Spec("a dense layer given expert tensors".into())),
            },
        })
    }
}

impl Layer for DenseLayer {
    fn new_state(&self, gpu: &Gpu, cfg: &ModelConfig, size: &StateSize) -> Result<LayerState> {
        let a = &cfg.attention;
        Ok(LayerState::Kv(LayerKv::new(gpu, size.kv()?, a.n_head_kv as u32, a.head_dim as u32)?))
    }

    fn record(&self, rec: &mut Recorder, cfg: &ModelConfig, s: &Scratch, state: &LayerState) -> Result<()> {
        let LayerState::Kv(cache) = state else {
            return Err(Error::Spec("an attention layer needs its part of the KV pool".into()));
        };
        pre_norm(rec, cfg, s, &self.attn_norm)?;
        self.attention.record(rec, cfg, s, cache)?;
        pre_norm(rec, cfg, s, &self.ffn_norm)?;
        self.ffn.record(rec, s)
    }

    fn weight_bytes(&self) -> u64 {
        self.attention.bytes() + self.ffn.bytes() + self.attn_norm.size() + self.ffn_norm.size()
    }
}
