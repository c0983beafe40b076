//! `llama` (SmolLM2, Llama 2/3): plain softmax attention over every layer, RoPE on
//! adjacent pairs because the converter permuted the Q/K rows, no Q/K norm.

use super::{ArchParams, AttentionStyle, AttentionTensors, LayerTensors, MixerTensors, main_layers};
use crate::Result;
use crate::config::{LayerKind, ModelConfig, RopeStyle};

pub(super) const FFN_NORM: &str = "ffn_norm";

pub(super) const ATTENTION: AttentionStyle =
    AttentionStyle { rope_style: RopeStyle::Adjacent, qk_norm: false, output_gate: false };

pub(super) fn params(block_count: usize) -> Result<ArchParams> {
    let n_layer = main_layers(block_count, 0)?;
    Ok(ArchParams { layers: vec![LayerKind::Attention; n_layer], n_mtp: 0, deltanet: None, moe: None })
}

pub(super) fn layer_tensors(cfg: &ModelConfig, layer: usize) -> LayerTensors {
    LayerTensors::new(cfg, layer, MixerTensors::Attention(AttentionTensors::new(cfg, layer)))
}
