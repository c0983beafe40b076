//! Architecture configs read from GGUF metadata.
//!
//! One [`ModelConfig`] describes every supported architecture; per-layer differences
//! (the `qwen35` hybrid) are a [`LayerKind`] per layer, so executors branch once per
//! layer at construction, never per token.

use crate::gguf::Gguf;
use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen3,
    Qwen35,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen3 => "qwen3",
            Arch::Qwen35 => "qwen35",
        }
    }
}

/// How rotary embedding pairs dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs (2j, 2j+1): llama GGUFs, whose converter permuted the Q/K rows.
    Adjacent,
    /// Pairs (j, j + n_rot/2): qwen3, qwen35.
    Neox,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// Softmax attention over a KV cache.
    Attention,
    /// Gated DeltaNet: linear attention with a fixed-size recurrent state.
    DeltaNet,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AttentionConfig {
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// Dimensions of each head that RoPE rotates (the rest pass unchanged).
    pub n_rot: usize,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    /// Per-head RMSNorm of q and k (qwen3, qwen35).
    pub qk_norm: bool,
    /// `attn_q` also yields a sigmoid output gate per head (qwen35).
    pub output_gate: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeltaNetConfig {
    pub conv_kernel: usize,
    /// Key (and query) heads, nk.
    pub n_key_heads: usize,
    /// Value heads, nv.
    pub n_value_heads: usize,
    /// Head dim, dk (= dv).
    pub head_dim: usize,
}

impl DeltaNetConfig {
    /// Channels of the causal conv: q, k and v together.
    pub fn conv_channels(&self) -> usize {
        2 * self.head_dim * self.n_key_heads + self.head_dim * self.n_value_heads
    }

    pub fn value_dim(&self) -> usize {
        self.head_dim * self.n_value_heads
    }

    /// f32 values of one sequence's recurrent state for one layer: conv history plus one
    /// dk x dk matrix per value head.
    pub fn state_values(&self) -> usize {
        (self.conv_kernel - 1) * self.conv_channels() + self.n_value_heads * self.head_dim * self.head_dim
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_vocab: usize,
    pub eps: f32,
    pub context_length: usize,
    pub attention: AttentionConfig,
    pub deltanet: Option<DeltaNetConfig>,
    /// The main forward pass's layers, in order (MTP blocks excluded).
    pub layers: Vec<LayerKind>,
    /// Trailing multi-token-prediction blocks present in the file (not run).
    pub n_mtp: usize,
    /// `output.weight` is absent and the embedding doubles as the output head.
    pub tied_output: bool,
}

impl ModelConfig {
    pub fn from_gguf(g: &Gguf) -> Result<ModelConfig> {
        let arch_name = g.architecture()?;
        let arch = match arch_name {
            "llama" => Arch::Llama,
            "qwen3" => Arch::Qwen3,
            "qwen35" => Arch::Qwen35,
            other => return Err(Error::UnsupportedArch(other.to_owned())),
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let req = |k: &str| -> Result<usize> { Ok(g.require_u64(&key(k))? as usize) };
        let opt = |k: &str| -> Result<Option<usize>> { Ok(g.get_u64(&key(k))?.map(|v| v as usize)) };

        let n_embd = req("embedding_length")?;
        let n_ff = req("feed_forward_length")?;
        let block_count = req("block_count")?;
        let n_head = req("attention.head_count")?;
        let n_head_kv = opt("attention.head_count_kv")?.unwrap_or(n_head);
        if n_head == 0 || n_head_kv == 0 || n_head % n_head_kv != 0 {
            return Err(Error::Config(format!("{n_head} query heads cannot share {n_head_kv} KV heads")));
        }
        let head_dim = match opt("attention.key_length")? {
            Some(d) => d,
            None if n_embd % n_head == 0 => n_embd / n_head,
            None => return Err(Error::Config(format!("embedding {n_embd} is not a multiple of {n_head} heads"))),
        };
        let n_rot = opt("rope.dimension_count")?.unwrap_or(head_dim);
        if n_rot > head_dim || n_rot % 2 != 0 {
            return Err(Error::Config(format!("rope.dimension_count {n_rot} must be even and at most the head dim {head_dim}")));
        }
        let eps = g.get_f64(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5) as f32;
        let rope_theta = g.get_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0) as f32;
        let embd = g.require_tensor("token_embd.weight")?;
        let n_vocab = embd.n_rows() as usize;
        if embd.row_len() as usize != n_embd {
            return Err(Error::Config(format!("token_embd.weight rows have {} values, embedding_length is {n_embd}", embd.row_len())));
        }
        let context_length = opt("context_length")?.unwrap_or(4096);
        let n_mtp = if arch == Arch::Qwen35 { opt("nextn_predict_layers")?.unwrap_or(0) } else { 0 };
        let n_layer = block_count
            .checked_sub(n_mtp)
            .filter(|&n| n > 0)
            .ok_or_else(|| Error::Config(format!("block_count {block_count} leaves no layers after {n_mtp} MTP blocks")))?;

        let (layers, deltanet) = match arch {
            Arch::Llama | Arch::Qwen3 => (vec![LayerKind::Attention; n_layer], None),
            Arch::Qwen35 => {
                let interval = opt("full_attention_interval")?.unwrap_or(4).max(1);
                let layers = (0..n_layer)
                    .map(|i| if (i + 1) % interval == 0 { LayerKind::Attention } else { LayerKind::DeltaNet })
                    .collect();
                let dn = DeltaNetConfig {
                    conv_kernel: req("ssm.conv_kernel")?,
                    n_key_heads: req("ssm.group_count")?,
                    n_value_heads: req("ssm.time_step_rank")?,
                    head_dim: req("ssm.state_size")?,
                };
                if dn.n_key_heads == 0 || dn.n_value_heads % dn.n_key_heads != 0 || dn.conv_kernel == 0 {
                    return Err(Error::Config(format!("DeltaNet heads {}/{} or conv kernel {} invalid", dn.n_key_heads, dn.n_value_heads, dn.conv_kernel)));
                }
                if let Some(inner) = opt("ssm.inner_size")?
                    && inner != dn.value_dim()
                {
                    return Err(Error::Config(format!("ssm.inner_size {inner} != state_size x time_step_rank {}", dn.value_dim())));
                }
                (layers, Some(dn))
            }
        };
        let attention = AttentionConfig {
            n_head,
            n_head_kv,
            head_dim,
            n_rot,
            rope_theta,
            rope_style: if arch == Arch::Llama { RopeStyle::Adjacent } else { RopeStyle::Neox },
            qk_norm: arch != Arch::Llama,
            output_gate: arch == Arch::Qwen35,
        };
        Ok(ModelConfig {
            arch,
            n_embd,
            n_ff,
            n_vocab,
            eps,
            context_length,
            attention,
            deltanet,
            layers,
            n_mtp,
            tied_output: g.tensor("output.weight").is_none(),
        })
    }

    pub fn n_layer(&self) -> usize {
        self.layers.len()
    }

    /// Name of the pre-FFN norm tensor, which differs between families.
    pub fn ffn_norm_name(&self) -> &'static str {
        match self.arch {
            Arch::Qwen35 => "post_attention_norm",
            Arch::Llama | Arch::Qwen3 => "ffn_norm",
        }
    }

    /// Name of the output head tensor (the embedding when tied).
    pub fn output_name(&self) -> &'static str {
        if self.tied_output { "token_embd.weight" } else { "output.weight" }
    }
}

/// `blk.{layer}.{name}.weight`-style tensor names.
pub fn layer_tensor(layer: usize, name: &str) -> String {
    format!("blk.{layer}.{name}")
}
