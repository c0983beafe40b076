//! Architecture configs read from GGUF metadata.
//!
//! One [`ModelConfig`] describes every supported architecture; per-layer differences
//! (the `qwen35` hybrid) are a [`LayerKind`] per layer, so executors branch once per
//! layer at construction, never per token. The keys every architecture shares are read
//! here; what is particular to one, and its tensor schema, is in its file in [`crate::arch`].

pub use crate::arch::Arch;
use crate::arch::{ArchMetadata, AttentionStyle};
use crate::gguf::Gguf;
use crate::{Error, Result};

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

/// A routed mixture of experts with one shared expert (`qwen35moe`, see `qwen35moe.md`).
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    /// Experts per layer (n_exp).
    pub n_expert: usize,
    /// Experts routed per token (k).
    pub n_expert_used: usize,
    /// FFN width of one routed expert (f).
    pub expert_ff: usize,
    /// FFN width of the shared expert (fs).
    pub shared_ff: usize,
}

impl MoeConfig {
    /// The share of a routed-expert tensor one token reads: k of n_exp experts.
    pub fn read_fraction(&self) -> (u64, u64) {
        (self.n_expert_used as u64, self.n_expert as u64)
    }
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
    /// FFN width of the dense feed-forward; with experts, the shared expert's.
    pub n_ff: usize,
    pub n_vocab: usize,
    pub eps: f32,
    pub context_length: usize,
    pub attention: AttentionConfig,
    pub deltanet: Option<DeltaNetConfig>,
    /// Every layer's feed-forward is a mixture of experts (`qwen35moe`).
    pub moe: Option<MoeConfig>,
    /// The main forward pass's layers, in order (MTP blocks excluded).
    pub layers: Vec<LayerKind>,
    /// Trailing multi-token-prediction blocks present in the file (not run).
    pub n_mtp: usize,
    /// `output.weight` is absent and the embedding doubles as the output head.
    pub tied_output: bool,
}

impl ModelConfig {
    pub fn from_gguf(g: &Gguf) -> Result<ModelConfig> {
        let name = g.architecture()?;
        let arch = Arch::from_name(name).ok_or_else(|| Error::UnsupportedArch(name.to_owned()))?;
        let m = ArchMetadata::new(g, arch);
        let n_embd = m.require("embedding_length")?;
        let n_ff = m.get("feed_forward_length")?;
        let block_count = m.require("block_count")?;
        let attention = AttentionConfig::read(&m, n_embd, arch.attention())?;
        let eps = m.get_f64("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5) as f32;
        let n_vocab = vocab_size(g, n_embd)?;
        let context_length = m.get("context_length")?.unwrap_or(4096);
        let params = arch.params(&m, block_count, n_ff)?;
        let n_ff = match (&params.moe, n_ff) {
            (Some(moe), _) => moe.shared_ff,
            (None, Some(f)) => f,
            (None, None) => return Err(Error::MissingKey(format!("{}.feed_forward_length", arch.name()))),
        };
        Ok(ModelConfig {
            arch,
            n_embd,
            n_ff,
            n_vocab,
            eps,
            context_length,
            attention,
            deltanet: params.deltanet,
            moe: params.moe,
            layers: params.layers,
            n_mtp: params.n_mtp,
            tied_output: g.tensor("output.weight").is_none(),
        })
    }

    pub fn n_layer(&self) -> usize {
        self.layers.len()
    }

    /// Bytes of one sequence's recurrent state, every DeltaNet layer together (f32); 0
    /// without DeltaNet layers.
    pub fn recurrent_state_bytes(&self) -> u64 {
        let layers = self.layers.iter().filter(|&&k| k == LayerKind::DeltaNet).count() as u64;
        self.deltanet.as_ref().map_or(0, |d| layers * d.state_values() as u64 * 4)
    }
}

impl AttentionConfig {
    /// The head counts and RoPE of `m`, with the architecture's `style`.
    fn read(m: &ArchMetadata, n_embd: usize, style: AttentionStyle) -> Result<AttentionConfig> {
        let n_head = m.require("attention.head_count")?;
        let n_head_kv = m.get("attention.head_count_kv")?.unwrap_or(n_head);
        if n_head == 0 || n_head_kv == 0 || n_head % n_head_kv != 0 {
            return Err(Error::Config(format!("{n_head} query heads cannot share {n_head_kv} KV heads")));
        }
        let head_dim = match m.get("attention.key_length")? {
            Some(d) => d,
            None if n_embd.is_multiple_of(n_head) => n_embd / n_head,
            None => return Err(Error::Config(format!("embedding {n_embd} is not a multiple of {n_head} heads"))),
        };
        let n_rot = m.get("rope.dimension_count")?.unwrap_or(head_dim);
        if n_rot > head_dim || n_rot % 2 != 0 {
            return Err(Error::Config(format!(
                "rope.dimension_count {n_rot} must be even and at most the head dim {head_dim}"
            )));
        }
        Ok(AttentionConfig {
            n_head,
            n_head_kv,
            head_dim,
            n_rot,
            rope_theta: m.get_f64("rope.freq_base")?.unwrap_or(10_000.0) as f32,
            rope_style: style.rope_style,
            qk_norm: style.qk_norm,
            output_gate: style.output_gate,
        })
    }
}

/// Rows of `token_embd.weight`, whose rows must be `n_embd` long. Read by name: the
/// schema needs the vocabulary size this finds.
fn vocab_size(g: &Gguf, n_embd: usize) -> Result<usize> {
    let embd = g.require_tensor("token_embd.weight")?;
    if embd.row_len() as usize != n_embd {
        return Err(Error::Config(format!(
            "token_embd.weight rows have {} values, embedding_length is {n_embd}",
            embd.row_len()
        )));
    }
    Ok(embd.n_rows() as usize)
}
