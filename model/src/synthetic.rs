//! All-zero GGUFs with a real model's exact shape.
//!
//! A dense model's zeros time like its real weights, since no kernel's work depends on a
//! weight's value (measured on lavapipe for SmolLM2-135M's shape against the real file:
//! see the README's "Measuring on a GPU"), so a machine that cannot hold or download a
//! model can still measure it. Not a mixture of experts: zeros route every token to the
//! same experts, so a batch reads fewer of them than real tokens would. [`Shape::with_layers`]
//! keeps the first layers only, at full width, for measuring a few of a large model's
//! layers.
//!
//! Every tensor is [`TensorData::Zeros`], so the file is sparse: Qwen3.6-27B's shape is a
//! 29 GB file that takes next to no disk and is written in a moment. Its tensor index is
//! exactly that of a real Q8_0 conversion, which is what the planner reads, and its
//! metadata is what [`ModelConfig::from_gguf`](crate::config::ModelConfig::from_gguf) and
//! the tokenizer read, so a node can load and run it (producing nonsense) to test memory
//! and speed at full scale without downloading the weights.
//!
//! The tokenizer is a stand-in: the 256 byte tokens of GPT-2's byte map, then
//! `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, then unused padding up to the vocabulary
//! size, with no merges. Every byte is its own token; ids do not match the real model's.

use crate::arch::{Arch, TensorRole, qwen35};
use crate::config::{AttentionConfig, DeltaNetConfig, LayerKind, ModelConfig, MoeConfig};
use crate::gguf::{GgufWriter, TensorData, Value, ValueType};
use crate::quant::GgmlType;
use crate::{Error, Result};

/// The shape of a `qwen35` model (see `docs/qwen35.md`), or with `moe` of a `qwen35moe`
/// one (`docs/qwen35moe.md`).
#[derive(Debug, Clone, PartialEq)]
pub struct Qwen35Shape {
    pub name: &'static str,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_vocab: usize,
    /// Layers of the main pass.
    pub n_layer: usize,
    /// MTP blocks after them (`nextn_predict_layers`).
    pub n_mtp: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_rot: usize,
    pub rope_sections: [i32; 4],
    pub rope_theta: f32,
    pub eps: f32,
    pub full_attention_interval: usize,
    pub conv_kernel: usize,
    /// DeltaNet key heads (nk, `ssm.group_count`).
    pub ssm_key_heads: usize,
    /// DeltaNet value heads (nv, `ssm.time_step_rank`).
    pub ssm_value_heads: usize,
    /// DeltaNet head dim (dk, `ssm.state_size`).
    pub ssm_head_dim: usize,
    pub context_length: usize,
    /// Type of every matrix; vectors and `ssm_conv1d` are F32, as in llama.cpp's files.
    pub matrix_type: GgmlType,
    /// No `output.weight`: the embedding is the head.
    pub tied_output: bool,
    /// Routed experts in every layer instead of a dense FFN (`qwen35moe`); `n_ff` is then
    /// the shared expert's width.
    pub moe: Option<MoeConfig>,
}

/// The tokens before the padding: the byte tokens, then these.
const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

impl Qwen35Shape {
    /// Qwen3.6-27B (its published config), with its one MTP block, as a Q8_0 file.
    pub const QWEN36_27B: Qwen35Shape = Qwen35Shape {
        name: "Qwen3.6-27B (zeros)",
        n_embd: 5120,
        n_ff: 17408,
        n_vocab: 248_320,
        n_layer: 64,
        n_mtp: 1,
        n_head: 24,
        n_head_kv: 4,
        head_dim: 256,
        n_rot: 64,
        rope_sections: [11, 11, 10, 0],
        rope_theta: 10_000_000.0,
        eps: 1e-6,
        full_attention_interval: 4,
        conv_kernel: 4,
        ssm_key_heads: 16,
        ssm_value_heads: 48,
        ssm_head_dim: 128,
        context_length: 262_144,
        matrix_type: GgmlType::Q8_0,
        tied_output: false,
        moe: None,
    };

    /// Qwen3.6-35B-A3B (its published config: 256 experts of width 512, 8 routed, a
    /// shared expert of 512), with its one MTP block, as a Q8_0 file.
    pub const QWEN36_35B_A3B: Qwen35Shape = Qwen35Shape {
        name: "Qwen3.6-35B-A3B (zeros)",
        n_embd: 2048,
        n_ff: 512,
        n_layer: 40,
        n_head: 16,
        n_head_kv: 2,
        ssm_value_heads: 32,
        moe: Some(MoeConfig { n_expert: 256, n_expert_used: 8, expert_ff: 512, shared_ff: 512 }),
        // The rest (vocabulary, head dim, RoPE, DeltaNet key heads, MTP) as the 27B's.
        ..Qwen35Shape::QWEN36_27B
    };

    /// The architecture its file declares.
    pub fn arch(&self) -> Arch {
        if self.moe.is_some() { Arch::Qwen35Moe } else { Arch::Qwen35 }
    }

    pub fn block_count(&self) -> usize {
        self.n_layer + self.n_mtp
    }

    /// The config [`ModelConfig::from_gguf`] reads back from [`qwen35_zeros`]'s file,
    /// whose tensor schema is the file's tensor index.
    pub fn config(&self) -> ModelConfig {
        ModelConfig {
            arch: self.arch(),
            n_embd: self.n_embd,
            n_ff: self.n_ff,
            n_vocab: self.n_vocab,
            eps: self.eps,
            context_length: self.context_length,
            attention: attention(self.arch(), self.n_head, self.n_head_kv, self.head_dim, self.n_rot, self.rope_theta),
            deltanet: Some(DeltaNetConfig {
                conv_kernel: self.conv_kernel,
                n_key_heads: self.ssm_key_heads,
                n_value_heads: self.ssm_value_heads,
                head_dim: self.ssm_head_dim,
            }),
            moe: self.moe.clone(),
            layers: qwen35::layer_kinds(self.n_layer, self.full_attention_interval),
            n_mtp: self.n_mtp,
            tied_output: self.tied_output,
        }
    }
}

/// The shape of a `llama` model (SmolLM2, Llama 2/3): attention in every layer, the head
/// dim `n_embd / n_head`, every dim rotated.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaShape {
    pub name: &'static str,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_vocab: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub rope_theta: f32,
    pub eps: f32,
    pub context_length: usize,
    /// Type of every matrix, the embedding too; vectors are F32.
    pub matrix_type: GgmlType,
    /// No `output.weight`: the embedding is the head.
    pub tied_output: bool,
}

impl LlamaShape {
    /// SmolLM2-135M-Instruct (the README's benchmark model) as this project's Q8_0 copy of
    /// it holds it: every matrix Q8_0, the embedding doubling as the head.
    pub const SMOLLM2_135M: LlamaShape = LlamaShape {
        name: "SmolLM2-135M (zeros)",
        n_embd: 576,
        n_ff: 1536,
        n_vocab: 49_152,
        n_layer: 30,
        n_head: 9,
        n_head_kv: 3,
        rope_theta: 100_000.0,
        eps: 1e-5,
        context_length: 8192,
        matrix_type: GgmlType::Q8_0,
        tied_output: true,
    };

    pub fn config(&self) -> ModelConfig {
        let head_dim = self.n_embd / self.n_head;
        ModelConfig {
            arch: Arch::Llama,
            n_embd: self.n_embd,
            n_ff: self.n_ff,
            n_vocab: self.n_vocab,
            eps: self.eps,
            context_length: self.context_length,
            attention: attention(Arch::Llama, self.n_head, self.n_head_kv, head_dim, head_dim, self.rope_theta),
            deltanet: None,
            moe: None,
            layers: vec![LayerKind::Attention; self.n_layer],
            n_mtp: 0,
            tied_output: self.tied_output,
        }
    }
}

/// A shape `strata synthesize` writes.
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    Qwen35(Qwen35Shape),
    Llama(LlamaShape),
}

impl Shape {
    /// The names [`Shape::by_name`] knows, in the order `--help` lists them.
    pub const NAMES: [&str; 3] = ["qwen36-27b", "qwen36-35b-a3b", "smollm2-135m"];

    pub fn by_name(name: &str) -> Option<Shape> {
        match name {
            "qwen36-27b" => Some(Shape::Qwen35(Qwen35Shape::QWEN36_27B)),
            "qwen36-35b-a3b" => Some(Shape::Qwen35(Qwen35Shape::QWEN36_35B_A3B)),
            "smollm2-135m" => Some(Shape::Llama(LlamaShape::SMOLLM2_135M)),
            _ => None,
        }
    }

    /// Layers of the main pass.
    pub fn n_layer(&self) -> usize {
        match self {
            Shape::Qwen35(s) => s.n_layer,
            Shape::Llama(s) => s.n_layer,
        }
    }

    /// The config a file of this shape reads back as.
    pub fn config(&self) -> ModelConfig {
        match self {
            Shape::Qwen35(s) => s.config(),
            Shape::Llama(s) => s.config(),
        }
    }

    /// The same shape with only its first `n` layers (1 to [`Shape::n_layer`]); the
    /// embedding, head and any MTP block stay. A `qwen35` shape keeps its layer pattern, so
    /// `n` of at least its full-attention interval holds every kind of layer.
    pub fn with_layers(self, n: usize) -> Result<Shape> {
        let all = self.n_layer();
        if n == 0 || n > all {
            return Err(Error::Config(format!("this shape has {all} layers: keep 1 to {all} of them, not {n}")));
        }
        Ok(match self {
            Shape::Qwen35(s) => Shape::Qwen35(Qwen35Shape { n_layer: n, ..s }),
            Shape::Llama(s) => Shape::Llama(LlamaShape { n_layer: n, ..s }),
        })
    }

    /// A writer holding the shape's metadata and every tensor, all zeros.
    pub fn zeros(&self) -> Result<GgufWriter> {
        match self {
            Shape::Qwen35(s) => qwen35_zeros(s),
            Shape::Llama(s) => llama_zeros(s),
        }
    }
}

/// A writer holding a `llama` `shape`'s metadata and every tensor, all zeros, in the
/// converter's order ([`ModelConfig::tensors`]). Matrices and the embedding are
/// `matrix_type`; vectors F32.
pub fn llama_zeros(shape: &LlamaShape) -> Result<GgufWriter> {
    let s = shape;
    if s.n_head == 0 || s.n_head_kv == 0 || !s.n_head.is_multiple_of(s.n_head_kv) || !s.n_embd.is_multiple_of(s.n_head)
    {
        return Err(Error::Config(format!(
            "{} query heads over an embedding of {} cannot share {} KV heads",
            s.n_head, s.n_embd, s.n_head_kv
        )));
    }
    let cfg = s.config();
    let mut w = GgufWriter::new();
    set_common(&mut w, &cfg, s.name, s.n_layer, s.matrix_type)?;
    w.set("llama.feed_forward_length", u32v(s.n_ff)?)?;
    add_zero_tensors(&mut w, &cfg, s.matrix_type)?;
    Ok(w)
}

/// `v` as a GGUF u32.
fn u32v(v: usize) -> Result<Value> {
    u32::try_from(v).map(Value::U32).map_err(|_| Error::Config(format!("{v} does not fit a u32")))
}

/// The attention of `arch` (its RoPE style, Q/K norm and output gate) with these heads.
fn attention(
    arch: Arch,
    n_head: usize,
    n_head_kv: usize,
    head_dim: usize,
    n_rot: usize,
    rope_theta: f32,
) -> AttentionConfig {
    let style = arch.attention();
    AttentionConfig {
        n_head,
        n_head_kv,
        head_dim,
        n_rot,
        rope_theta,
        rope_style: style.rope_style,
        qk_norm: style.qk_norm,
        output_gate: style.output_gate,
    }
}

/// The metadata every synthesized file has, from its config: architecture and name, the
/// `{arch}.` sizes and attention keys every architecture reads, the stand-in tokenizer
/// and the file type. `block_count` counts MTP blocks too.
fn set_common(
    w: &mut GgufWriter,
    cfg: &ModelConfig,
    name: &str,
    block_count: usize,
    matrix_type: GgmlType,
) -> Result<()> {
    let prefix = cfg.arch.name();
    let arch = |k: &str| format!("{prefix}.{k}");
    let a = &cfg.attention;
    w.set("general.architecture", Value::String(prefix.into()))?;
    w.set("general.name", Value::String(name.into()))?;
    w.set(arch("context_length"), u32v(cfg.context_length)?)?;
    w.set(arch("embedding_length"), u32v(cfg.n_embd)?)?;
    w.set(arch("block_count"), u32v(block_count)?)?;
    w.set(arch("attention.head_count"), u32v(a.n_head)?)?;
    w.set(arch("attention.head_count_kv"), u32v(a.n_head_kv)?)?;
    w.set(arch("attention.layer_norm_rms_epsilon"), Value::F32(cfg.eps))?;
    w.set(arch("rope.dimension_count"), u32v(a.n_rot)?)?;
    w.set(arch("rope.freq_base"), Value::F32(a.rope_theta))?;
    set_tokenizer(w, cfg.n_vocab)?;
    w.set("general.file_type", Value::U32(file_type(matrix_type)))
}

/// llama.cpp's `general.file_type` for files of `matrix_type`: LLAMA_FTYPE_MOSTLY_Q8_0 is
/// 7; other types get "all F32" (0) as a placeholder.
fn file_type(matrix_type: GgmlType) -> u32 {
    if matrix_type == GgmlType::Q8_0 { 7 } else { 0 }
}

/// Every tensor of `cfg`'s schema, all zeros: matrices `matrix_type`, the rest F32.
fn add_zero_tensors(w: &mut GgufWriter, cfg: &ModelConfig, matrix_type: GgmlType) -> Result<()> {
    for t in cfg.tensors() {
        let ty = if t.role == TensorRole::Matrix { matrix_type } else { GgmlType::F32 };
        w.add_tensor(t.name, ty, t.dims, TensorData::Zeros)?;
    }
    Ok(())
}

/// A writer holding `shape`'s metadata and every tensor, all zeros.
///
/// The tensors are those of the `qwen35` schema ([`ModelConfig::tensors`]), in llama.cpp's
/// converter order: per layer `attn_norm`, `post_attention_norm`, the mixer's tensors (see
/// `docs/qwen35.md`), `ffn_gate/up/down`; each MTP block a full-attention layer's tensors
/// plus its `nextn.*` ones. Matrices are `matrix_type`; vectors and `ssm_conv1d` F32.
pub fn qwen35_zeros(shape: &Qwen35Shape) -> Result<GgufWriter> {
    let s = shape;
    let n_tokens = 256 + SPECIALS.len();
    if s.n_vocab < n_tokens {
        return Err(Error::Config(format!(
            "a synthetic vocabulary needs at least {n_tokens} tokens, got {}",
            s.n_vocab
        )));
    }
    if s.full_attention_interval == 0 {
        return Err(Error::Config("full_attention_interval must be at least 1".into()));
    }
    let cfg = s.config();
    let mut w = GgufWriter::new();
    set_common(&mut w, &cfg, s.name, s.block_count(), s.matrix_type)?;
    let prefix = s.arch().name();
    let arch = |k: &str| format!("{prefix}.{k}");
    w.set(arch("nextn_predict_layers"), u32v(s.n_mtp)?)?;
    match &s.moe {
        None => w.set(arch("feed_forward_length"), u32v(s.n_ff)?)?,
        Some(m) => {
            w.set(arch("expert_count"), u32v(m.n_expert)?)?;
            w.set(arch("expert_used_count"), u32v(m.n_expert_used)?)?;
            w.set(arch("expert_feed_forward_length"), u32v(m.expert_ff)?)?;
            w.set(arch("expert_shared_feed_forward_length"), u32v(m.shared_ff)?)?;
        }
    }
    w.set(arch("attention.key_length"), u32v(s.head_dim)?)?;
    w.set(arch("attention.value_length"), u32v(s.head_dim)?)?;
    w.set(arch("rope.dimension_sections"), Value::Array(ValueType::I32, s.rope_sections.map(Value::I32).to_vec()))?;
    w.set(arch("ssm.conv_kernel"), u32v(s.conv_kernel)?)?;
    w.set(arch("ssm.state_size"), u32v(s.ssm_head_dim)?)?;
    w.set(arch("ssm.group_count"), u32v(s.ssm_key_heads)?)?;
    w.set(arch("ssm.time_step_rank"), u32v(s.ssm_value_heads)?)?;
    w.set(arch("ssm.inner_size"), u32v(s.ssm_head_dim * s.ssm_value_heads)?)?;
    w.set(arch("full_attention_interval"), u32v(s.full_attention_interval)?)?;
    add_zero_tensors(&mut w, &cfg, s.matrix_type)?;
    Ok(w)
}

/// The stand-in byte-level tokenizer described in the module docs.
fn set_tokenizer(w: &mut GgufWriter, n_vocab: usize) -> Result<()> {
    // llama.cpp's token types: 1 normal, 3 control, 5 unused.
    let mut tokens = Vec::with_capacity(n_vocab);
    let mut types = Vec::with_capacity(n_vocab);
    for b in 0..=255u8 {
        tokens.push(Value::String(gpt2_byte_char(b).to_string()));
        types.push(Value::I32(1));
    }
    for sp in SPECIALS {
        tokens.push(Value::String(sp.into()));
        types.push(Value::I32(3));
    }
    for i in tokens.len()..n_vocab {
        tokens.push(Value::String(format!("<|pad_{i}|>")));
        types.push(Value::I32(5));
    }
    let id = |text: &str| Value::U32(256 + SPECIALS.iter().position(|s| *s == text).expect("a special token") as u32);
    w.set("tokenizer.ggml.model", Value::String("gpt2".into()))?;
    w.set("tokenizer.ggml.pre", Value::String("qwen35".into()))?;
    w.set("tokenizer.ggml.tokens", Value::Array(ValueType::String, tokens))?;
    w.set("tokenizer.ggml.token_type", Value::Array(ValueType::I32, types))?;
    w.set("tokenizer.ggml.merges", Value::Array(ValueType::String, Vec::new()))?;
    w.set("tokenizer.ggml.bos_token_id", id("<|endoftext|>"))?;
    w.set("tokenizer.ggml.eos_token_id", id("<|im_end|>"))?;
    w.set("tokenizer.ggml.padding_token_id", id("<|endoftext|>"))?;
    w.set("tokenizer.ggml.add_bos_token", Value::Bool(false))?;
    w.set("tokenizer.chat_template", Value::String(CHATML.into()))?;
    Ok(())
}

/// GPT-2's byte-to-character map: printable bytes stand for themselves, the rest take the
/// characters from U+0100 on, in byte order.
fn gpt2_byte_char(b: u8) -> char {
    let printable = |x: u8| matches!(x, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(b) {
        return char::from(b);
    }
    let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + rank).expect("U+0100 to U+0143 are characters")
}

#[cfg(test)]
pub(crate) mod tests;
