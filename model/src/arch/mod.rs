//! Each supported architecture, one file apiece (`llama.rs`, `qwen3.rs`, `qwen35.rs`,
//! `qwen35moe.rs`), as
//! candle lays out its models: what that architecture reads from the GGUF metadata
//! (its `params`) and its tensor schema, the one place tensor names and shapes are
//! written. The CPU reference, the synthetic writer and the GPU layers all load through
//! the [`TensorSpec`]s of [`ModelConfig::layer_tensors`], [`ModelConfig::global_tensors`]
//! and [`ModelConfig::mtp_tensors`].
//!
//! Adding an architecture is a new file here (its `params` and `layer_tensors`), a variant
//! of [`Arch`] and its arms in the `match`es below.

mod llama;
mod qwen3;
pub(crate) mod qwen35;
pub(crate) mod qwen35moe;

#[cfg(test)]
mod tests;

use crate::config::{DeltaNetConfig, LayerKind, ModelConfig, MoeConfig, RopeStyle};
use crate::gguf::Gguf;
use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen3,
    Qwen35,
    Qwen35Moe,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen3 => "qwen3",
            Arch::Qwen35 => "qwen35",
            Arch::Qwen35Moe => "qwen35moe",
        }
    }

    /// The architecture of `general.architecture` = `name`, if supported.
    pub fn from_name(name: &str) -> Option<Arch> {
        [Arch::Llama, Arch::Qwen3, Arch::Qwen35, Arch::Qwen35Moe].into_iter().find(|a| a.name() == name)
    }

    /// What this architecture reads from its `{arch}.*` metadata beyond the common keys
    /// (`n_ff`: `feed_forward_length`, which only the MoE architecture may lack).
    pub(crate) fn params(self, m: &ArchMetadata, block_count: usize, n_ff: Option<usize>) -> Result<ArchParams> {
        match self {
            Arch::Llama => llama::params(block_count),
            Arch::Qwen3 => qwen3::params(block_count),
            Arch::Qwen35 => qwen35::params(m, block_count),
            Arch::Qwen35Moe => qwen35moe::params(m, block_count, n_ff),
        }
    }

    /// How its attention differs from plain softmax attention.
    pub(crate) fn attention(self) -> AttentionStyle {
        match self {
            Arch::Llama => llama::ATTENTION,
            Arch::Qwen3 => qwen3::ATTENTION,
            Arch::Qwen35 | Arch::Qwen35Moe => qwen35::ATTENTION,
        }
    }

    /// Name (without `.weight`) of the pre-FFN norm, which differs between families.
    pub(crate) fn ffn_norm(self) -> &'static str {
        match self {
            Arch::Llama => llama::FFN_NORM,
            Arch::Qwen3 => qwen3::FFN_NORM,
            Arch::Qwen35 | Arch::Qwen35Moe => qwen35::FFN_NORM,
        }
    }
}

/// The `{arch}.{key}` metadata of one file, as the architecture's sizes.
pub(crate) struct ArchMetadata<'a> {
    gguf: &'a Gguf,
    arch: Arch,
}

impl<'a> ArchMetadata<'a> {
    pub fn new(gguf: &'a Gguf, arch: Arch) -> Self {
        ArchMetadata { gguf, arch }
    }

    fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch.name())
    }

    pub fn require(&self, k: &str) -> Result<usize> {
        Ok(self.gguf.require_u64(&self.key(k))? as usize)
    }

    pub fn get(&self, k: &str) -> Result<Option<usize>> {
        Ok(self.gguf.get_u64(&self.key(k))?.map(|v| v as usize))
    }

    pub fn get_f64(&self, k: &str) -> Result<Option<f64>> {
        self.gguf.get_f64(&self.key(k))
    }
}

/// How an architecture's attention differs from plain softmax attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AttentionStyle {
    pub rope_style: RopeStyle,
    /// Per-head RMSNorm of q and k (`attn_q_norm`, `attn_k_norm`).
    pub qk_norm: bool,
    /// `attn_q` also yields a sigmoid output gate per head.
    pub output_gate: bool,
}

/// What an architecture's file decides from the metadata.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ArchParams {
    /// The main pass's layers (MTP blocks excluded).
    pub layers: Vec<LayerKind>,
    /// Trailing MTP blocks, after `layers`.
    pub n_mtp: usize,
    pub deltanet: Option<DeltaNetConfig>,
    pub moe: Option<MoeConfig>,
}

/// How a converted file stores a tensor, which is also how it is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorRole {
    /// A projection `[k, n]`, multiplied by activations: at the file's matrix type
    /// (quantised in a quantised file).
    Matrix,
    /// A 1-D tensor (norm weights, biases, `ssm_a`): F32 in llama.cpp's conversions.
    Vector,
    /// A small 2-D tensor read whole, not multiplied (`ssm_conv1d`): F32 like the vectors,
    /// since llama.cpp's quantiser leaves it alone.
    Kernel,
}

/// A tensor the forward pass reads: its GGUF name and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    /// ggml order, as in the file: a matrix `[k, n]` has `n` rows of `k` values.
    pub dims: Vec<u64>,
    pub role: TensorRole,
}

impl TensorSpec {
    pub fn vector(name: impl Into<String>, len: usize) -> TensorSpec {
        TensorSpec { name: name.into(), dims: vec![len as u64], role: TensorRole::Vector }
    }

    pub fn matrix(name: impl Into<String>, k: usize, n: usize) -> TensorSpec {
        TensorSpec { name: name.into(), dims: vec![k as u64, n as u64], role: TensorRole::Matrix }
    }

    /// A 2-D tensor stored and loaded as f32 (see [`TensorRole::Kernel`]).
    pub fn kernel(name: impl Into<String>, k: usize, n: usize) -> TensorSpec {
        TensorSpec { name: name.into(), dims: vec![k as u64, n as u64], role: TensorRole::Kernel }
    }

    /// Whether a tensor of ggml shape `dims` is this one: trailing dimensions of 1 do not
    /// count (ggml reads `{E}` and `{E, 1}` alike, and converters write either).
    pub fn matches(&self, dims: &[u64]) -> bool {
        let trim = |d: &[u64]| d.len() - d.iter().rev().take_while(|&&x| x == 1).count();
        let (a, b) = (&self.dims[..trim(&self.dims)], &dims[..trim(dims)]);
        a == b
    }

    /// Values per row (`dims[0]`).
    pub fn k(&self) -> usize {
        self.dims[0] as usize
    }

    /// `n_exp` matrices `[k, n]` end to end, as a 3-D tensor `[k, n, n_exp]` (the routed
    /// experts of a MoE layer).
    pub fn experts(name: impl Into<String>, k: usize, n: usize, n_exp: usize) -> TensorSpec {
        TensorSpec { name: name.into(), dims: vec![k as u64, n as u64, n_exp as u64], role: TensorRole::Matrix }
    }

    /// Rows of one matrix (`dims[1]`; 1 for a vector).
    pub fn n(&self) -> usize {
        self.dims.get(1).map_or(1, |&n| n as usize)
    }

    /// Matrices end to end (`dims[2]`; 1 for a 2-D tensor).
    pub fn matrices(&self) -> usize {
        self.dims.get(2).map_or(1, |&n| n as usize)
    }

    /// Rows of all its matrices together.
    pub fn rows(&self) -> usize {
        self.n() * self.matrices()
    }
}

/// Layers of the main pass: `block_count` less the trailing MTP blocks, at least one.
fn main_layers(block_count: usize, n_mtp: usize) -> Result<usize> {
    block_count
        .checked_sub(n_mtp)
        .filter(|&n| n > 0)
        .ok_or_else(|| Error::Config(format!("block_count {block_count} leaves no layers after {n_mtp} MTP blocks")))
}

/// `blk.{layer}.{name}`.
pub(crate) fn blk(layer: usize, name: &str) -> String {
    format!("blk.{layer}.{name}")
}

/// Softmax attention; `q` has `[query | gate]` rows per head when the attention is gated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttentionTensors {
    pub q: TensorSpec,
    pub k: TensorSpec,
    pub v: TensorSpec,
    pub o: TensorSpec,
    pub q_norm: Option<TensorSpec>,
    pub k_norm: Option<TensorSpec>,
}

impl AttentionTensors {
    /// Layer `layer`'s attention as `cfg.attention` describes it: every architecture's is
    /// this one, its flags deciding the gate rows and the Q/K norms.
    fn new(cfg: &ModelConfig, layer: usize) -> AttentionTensors {
        let a = &cfg.attention;
        let (e, d) = (cfg.n_embd, a.head_dim);
        let q_rows = a.n_head * d * if a.output_gate { 2 } else { 1 };
        let norm = |name: &str| a.qk_norm.then(|| TensorSpec::vector(blk(layer, name), d));
        AttentionTensors {
            q: TensorSpec::matrix(blk(layer, "attn_q.weight"), e, q_rows),
            k: TensorSpec::matrix(blk(layer, "attn_k.weight"), e, a.n_head_kv * d),
            v: TensorSpec::matrix(blk(layer, "attn_v.weight"), e, a.n_head_kv * d),
            o: TensorSpec::matrix(blk(layer, "attn_output.weight"), a.n_head * d, e),
            q_norm: norm("attn_q_norm.weight"),
            k_norm: norm("attn_k_norm.weight"),
        }
    }

    /// In the converter's order.
    pub fn tensors(&self) -> Vec<&TensorSpec> {
        let mut t = vec![&self.q, &self.k, &self.v, &self.o];
        t.extend(self.q_norm.iter().chain(&self.k_norm));
        t
    }
}

/// qwen35's Gated DeltaNet (see `qwen35.md`); names as in the GGUF.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaNetTensors {
    /// `attn_qkv`: q, k and v before the conv.
    pub qkv: TensorSpec,
    /// `attn_gate`: z, the output gate.
    pub gate: TensorSpec,
    /// `ssm_beta`.
    pub beta: TensorSpec,
    /// `ssm_alpha`.
    pub alpha: TensorSpec,
    /// `ssm_conv1d` `[kernel, channels]`.
    pub conv1d: TensorSpec,
    /// `ssm_dt.bias`.
    pub dt_bias: TensorSpec,
    /// `ssm_a` (already `-exp(A_log)`).
    pub a: TensorSpec,
    /// `ssm_norm`.
    pub norm: TensorSpec,
    /// `ssm_out`.
    pub out: TensorSpec,
}

impl DeltaNetTensors {
    /// In the converter's order.
    pub fn tensors(&self) -> Vec<&TensorSpec> {
        vec![
            &self.qkv,
            &self.gate,
            &self.conv1d,
            &self.dt_bias,
            &self.a,
            &self.beta,
            &self.alpha,
            &self.norm,
            &self.out,
        ]
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MixerTensors {
    Attention(AttentionTensors),
    DeltaNet(DeltaNetTensors),
}

impl MixerTensors {
    pub fn tensors(&self) -> Vec<&TensorSpec> {
        match self {
            MixerTensors::Attention(a) => a.tensors(),
            MixerTensors::DeltaNet(d) => d.tensors(),
        }
    }
}

/// SwiGLU: `down(silu(gate n) * up n)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FfnTensors {
    pub gate: TensorSpec,
    pub up: TensorSpec,
    pub down: TensorSpec,
}

impl FfnTensors {
    fn dense(cfg: &ModelConfig, layer: usize) -> FfnTensors {
        let (e, f) = (cfg.n_embd, cfg.n_ff);
        FfnTensors {
            gate: TensorSpec::matrix(blk(layer, "ffn_gate.weight"), e, f),
            up: TensorSpec::matrix(blk(layer, "ffn_up.weight"), e, f),
            down: TensorSpec::matrix(blk(layer, "ffn_down.weight"), f, e),
        }
    }

    pub fn tensors(&self) -> Vec<&TensorSpec> {
        vec![&self.gate, &self.up, &self.down]
    }
}

/// A routed mixture of experts plus a shared expert behind a sigmoid gate (`qwen35moe.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoeTensors {
    /// `ffn_gate_inp`: the router `[E, n_exp]`.
    pub router: TensorSpec,
    /// `ffn_{gate,up,down}_exps`: the routed experts' SwiGLU, `[E, f, n_exp]` and `[f, E, n_exp]`.
    pub experts: FfnTensors,
    /// `ffn_{gate,up,down}_shexp`: the shared expert.
    pub shared: FfnTensors,
    /// `ffn_gate_inp_shexp`: the shared expert's gate, one row of E.
    pub shared_gate: TensorSpec,
}

impl MoeTensors {
    /// In the converter's order.
    pub fn tensors(&self) -> Vec<&TensorSpec> {
        let mut t = vec![&self.router];
        t.extend(self.experts.tensors());
        t.push(&self.shared_gate);
        t.extend(self.shared.tensors());
        t
    }
}

/// A layer's feed-forward: dense SwiGLU, or a mixture of experts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedForward {
    Dense(FfnTensors),
    Moe(Box<MoeTensors>),
}

impl FeedForward {
    pub fn tensors(&self) -> Vec<&TensorSpec> {
        match self {
            FeedForward::Dense(f) => f.tensors(),
            FeedForward::Moe(m) => m.tensors(),
        }
    }
}

/// One block: `h = x + mixer(norm(x) * attn_norm)`, `out = h + ffn(norm(h) * ffn_norm)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerTensors {
    pub attn_norm: TensorSpec,
    pub mixer: MixerTensors,
    /// The pre-FFN norm: `ffn_norm` or, in qwen35, `post_attention_norm`.
    pub ffn_norm: TensorSpec,
    pub ffn: FeedForward,
}

impl LayerTensors {
    /// The block's tensors, named as `cfg.arch` names them: a mixture of experts where the
    /// config has one, else a dense FFN.
    fn new(cfg: &ModelConfig, layer: usize, mixer: MixerTensors) -> LayerTensors {
        let e = cfg.n_embd;
        let ffn = match &cfg.moe {
            Some(moe) => FeedForward::Moe(Box::new(qwen35moe::moe_tensors(cfg, moe, layer))),
            None => FeedForward::Dense(FfnTensors::dense(cfg, layer)),
        };
        LayerTensors {
            attn_norm: TensorSpec::vector(blk(layer, "attn_norm.weight"), e),
            mixer,
            ffn_norm: TensorSpec::vector(blk(layer, &format!("{}.weight", cfg.arch.ffn_norm())), e),
            ffn,
        }
    }

    /// In the converter's order: the norms, the mixer, the FFN.
    pub fn tensors(&self) -> Vec<&TensorSpec> {
        let mut t = vec![&self.attn_norm, &self.ffn_norm];
        t.extend(self.mixer.tensors());
        t.extend(self.ffn.tensors());
        t
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalTensors {
    pub token_embd: TensorSpec,
    pub output_norm: TensorSpec,
    /// The output head; the embedding's spec when tied.
    pub output: TensorSpec,
}

impl GlobalTensors {
    /// In the converter's order, the head left out when it is the embedding.
    pub fn tensors(&self) -> Vec<&TensorSpec> {
        let mut t = vec![&self.token_embd, &self.output_norm];
        if self.output.name != self.token_embd.name {
            t.push(&self.output);
        }
        t
    }
}

/// A multi-token-prediction block `blk.{block}` (see `qwen35.md`): a full-attention
/// layer of the architecture, fed by `eh_proj [e ; h]`, and its own head norm; it shares
/// the embedding and output head with the main model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MtpTensors {
    /// Its block number: `n_layer() +` its index among the MTP blocks.
    pub block: usize,
    pub layer: LayerTensors,
    /// `nextn.eh_proj` `[2E, E]`: the concatenated embedding and hidden state to E.
    pub eh_proj: TensorSpec,
    /// `nextn.enorm`: the embedding's norm.
    pub enorm: TensorSpec,
    /// `nextn.hnorm`: the hidden state's norm.
    pub hnorm: TensorSpec,
    /// `nextn.shared_head_norm`: the norm before the output head.
    pub shared_head_norm: TensorSpec,
}

impl MtpTensors {
    /// In the converter's order: the layer's tensors, then the `nextn.*` ones.
    pub fn tensors(&self) -> Vec<&TensorSpec> {
        let mut t = self.layer.tensors();
        t.extend([&self.eh_proj, &self.enorm, &self.hnorm, &self.shared_head_norm]);
        t
    }
}

impl ModelConfig {
    /// The tensors of the main pass's layer `layer` (< `n_layer()`).
    pub fn layer_tensors(&self, layer: usize) -> LayerTensors {
        assert!(layer < self.n_layer(), "layer {layer} of a model of {} layers", self.n_layer());
        match self.arch {
            Arch::Llama => llama::layer_tensors(self, layer),
            Arch::Qwen3 => qwen3::layer_tensors(self, layer),
            Arch::Qwen35 | Arch::Qwen35Moe => qwen35::layer_tensors(self, layer),
        }
    }

    pub fn global_tensors(&self) -> GlobalTensors {
        let token_embd = TensorSpec::matrix("token_embd.weight", self.n_embd, self.n_vocab);
        let output = if self.tied_output {
            token_embd.clone()
        } else {
            TensorSpec::matrix("output.weight", self.n_embd, self.n_vocab)
        };
        GlobalTensors { token_embd, output_norm: TensorSpec::vector("output_norm.weight", self.n_embd), output }
    }

    /// The MTP blocks after the main pass, in order (none for most architectures).
    pub fn mtp_tensors(&self) -> Vec<MtpTensors> {
        match self.arch {
            Arch::Llama | Arch::Qwen3 => Vec::new(),
            Arch::Qwen35 | Arch::Qwen35Moe => {
                (0..self.n_mtp).map(|j| qwen35::mtp_tensors(self, self.n_layer() + j)).collect()
            }
        }
    }

    /// Every tensor of the model, in llama.cpp's converter order: the globals, then block
    /// by block (the MTP blocks last). A file of this architecture holds exactly these.
    pub fn tensors(&self) -> Vec<TensorSpec> {
        let globals = self.global_tensors();
        let layers: Vec<LayerTensors> = (0..self.n_layer()).map(|i| self.layer_tensors(i)).collect();
        let mtp = self.mtp_tensors();
        let all = globals
            .tensors()
            .into_iter()
            .chain(layers.iter().flat_map(LayerTensors::tensors))
            .chain(mtp.iter().flat_map(MtpTensors::tensors));
        all.cloned().collect()
    }
}
