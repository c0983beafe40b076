//! `qwen35` (Qwen3.5 and Qwen3.6 dense; see `qwen35.md`): Gated DeltaNet layers with a
//! gated full-attention layer every `full_attention_interval`, `post_attention_norm` as
//! the pre-FFN norm, and optional trailing MTP blocks (`nextn_predict_layers`).

use super::{
    ArchMetadata, ArchParams, AttentionStyle, AttentionTensors, DeltaNetTensors, LayerTensors, MixerTensors,
    MtpTensors, TensorSpec, blk, main_layers,
};
use crate::config::{DeltaNetConfig, LayerKind, ModelConfig, RopeStyle};
use crate::{Error, Result};

pub(super) const FFN_NORM: &str = "post_attention_norm";

/// Q/K norms, NeoX RoPE (the multimodal sections reduce to it for text), and `attn_q`
/// rows of `[query | gate]` per head.
pub(crate) const ATTENTION: AttentionStyle =
    AttentionStyle { rope_style: RopeStyle::Neox, qk_norm: true, output_gate: true };

pub(super) fn params(m: &ArchMetadata, block_count: usize) -> Result<ArchParams> {
    let n_mtp = m.get("nextn_predict_layers")?.unwrap_or(0);
    let n_layer = main_layers(block_count, n_mtp)?;
    let interval = m.get("full_attention_interval")?.unwrap_or(4).max(1);
    let dn = DeltaNetConfig {
        conv_kernel: m.require("ssm.conv_kernel")?,
        n_key_heads: m.require("ssm.group_count")?,
        n_value_heads: m.require("ssm.time_step_rank")?,
        head_dim: m.require("ssm.state_size")?,
    };
    if dn.n_key_heads == 0 || !dn.n_value_heads.is_multiple_of(dn.n_key_heads) || dn.conv_kernel == 0 {
        return Err(Error::Config(format!(
            "DeltaNet heads {}/{} or conv kernel {} invalid",
            dn.n_key_heads, dn.n_value_heads, dn.conv_kernel
        )));
    }
    if let Some(inner) = m.get("ssm.inner_size")?
        && inner != dn.value_dim()
    {
        return Err(Error::Config(format!("ssm.inner_size {inner} != state_size x time_step_rank {}", dn.value_dim())));
    }
    Ok(ArchParams { layers: layer_kinds(n_layer, interval), n_mtp, deltanet: Some(dn), moe: None })
}

/// Layer i is full attention iff `(i + 1) % interval == 0`, else DeltaNet.
pub(crate) fn layer_kinds(n_layer: usize, interval: usize) -> Vec<LayerKind> {
    (0..n_layer)
        .map(|i| if (i + 1).is_multiple_of(interval) { LayerKind::Attention } else { LayerKind::DeltaNet })
        .collect()
}

pub(super) fn layer_tensors(cfg: &ModelConfig, layer: usize) -> LayerTensors {
    let mixer = match cfg.layers[layer] {
        LayerKind::Attention => MixerTensors::Attention(AttentionTensors::new(cfg, layer)),
        LayerKind::DeltaNet => MixerTensors::DeltaNet(deltanet_tensors(cfg, layer)),
    };
    LayerTensors::new(cfg, layer, mixer)
}

/// E the embedding, C = 2·dk·nk + dk·nv the conv channels, K the conv kernel.
fn deltanet_tensors(cfg: &ModelConfig, layer: usize) -> DeltaNetTensors {
    let dn = cfg.deltanet.as_ref().expect("a qwen35 config has DeltaNet metadata");
    let (e, c, nv, v) = (cfg.n_embd, dn.conv_channels(), dn.n_value_heads, dn.value_dim());
    let name = |n: &str| blk(layer, n);
    DeltaNetTensors {
        qkv: TensorSpec::matrix(name("attn_qkv.weight"), e, c),
        gate: TensorSpec::matrix(name("attn_gate.weight"), e, v),
        beta: TensorSpec::matrix(name("ssm_beta.weight"), e, nv),
        alpha: TensorSpec::matrix(name("ssm_alpha.weight"), e, nv),
        conv1d: TensorSpec::kernel(name("ssm_conv1d.weight"), dn.conv_kernel, c),
        dt_bias: TensorSpec::vector(name("ssm_dt.bias"), nv),
        a: TensorSpec::vector(name("ssm_a"), nv),
        norm: TensorSpec::vector(name("ssm_norm.weight"), dn.head_dim),
        out: TensorSpec::matrix(name("ssm_out.weight"), v, e),
    }
}

/// Block `block` is always a gated full-attention layer, whatever its index.
pub(super) fn mtp_tensors(cfg: &ModelConfig, block: usize) -> MtpTensors {
    let e = cfg.n_embd;
    let name = |n: &str| blk(block, n);
    MtpTensors {
        block,
        layer: LayerTensors::new(cfg, block, MixerTensors::Attention(AttentionTensors::new(cfg, block))),
        eh_proj: TensorSpec::matrix(name("nextn.eh_proj.weight"), 2 * e, e),
        enorm: TensorSpec::vector(name("nextn.enorm.weight"), e),
        hnorm: TensorSpec::vector(name("nextn.hnorm.weight"), e),
        shared_head_norm: TensorSpec::vector(name("nextn.shared_head_norm.weight"), e),
    }
}
