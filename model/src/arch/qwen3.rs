//! `qwen3`: llama's layers with a per-head RMSNorm of q and k (`attn_q_norm`,
//! `attn_k_norm`) and NeoX RoPE over the full head dim.

use super::{ArchParams, AttentionStyle, AttentionTensors, LayerTensors, MixerTensors, main_layers};
use crate::Result;
use crate::config::{LayerKind, ModelConfig, RopeStyle};

pub(super) const FFN_NORM: &str = "ffn_norm";

pub(super) const ATTENTION: AttentionStyle =
    AttentionStyle { rope_style: RopeStyle::Neox, qk_norm: true, output_gate: false };

pub(super) fn params(block_count: usize) -> Result<ArchParams> {
    let n_layer = main_layers(block_count, 0)?;
    Ok(ArchParams { layers: vec![LayerKind::Attention; n_layer], n_mtp: 0, deltanet: None, moe: None })
}

/// The Q/K norms come from [`ATTENTION`]'s `qk_norm`.
pub(super) fn layer_tensors(cfg: &ModelConfig, layer: usize) -> LayerTensors {
    LayerTensors::new(cfg, layer, MixerTensors::Attention(AttentionTensors::new(cfg, layer)))
}
