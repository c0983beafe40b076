//! The CPU reference forward pass: the oracle every GPU kernel is tested against.
//!
//! Deliberately plain: weights dequantised to f32 at load, one token at a time, no
//! batching, no cleverness. It reads like the maths in `docs` (see `qwen35.md`).

mod attention;
pub mod deltanet;
mod ffn;
pub mod moe;
pub mod ops;

use crate::arch::{FeedForward, LayerTensors, MixerTensors, TensorSpec};
use crate::config::ModelConfig;
use crate::gguf::Gguf;
use crate::quant::dequantize;
use crate::{Error, Result};
use attention::Attention;
use deltanet::DeltaNet;
use ffn::Ffn;
use moe::Moe;
use ops::{Matrix, add_in_place, rms_norm};

/// Loads the tensor of `spec` as f32, checking its shape against the spec.
pub(crate) fn load_f32(g: &Gguf, spec: &TensorSpec) -> Result<Vec<f32>> {
    let t = g.require_tensor(&spec.name)?;
    if !spec.matches(&t.dims) {
        return Err(Error::TensorShape { name: spec.name.clone(), expected: spec.dims.clone(), found: t.dims.clone() });
    }
    dequantize(t.ty, g.tensor_data(t))
}

pub(crate) fn load_matrix(g: &Gguf, spec: &TensorSpec) -> Result<Matrix> {
    Ok(Matrix { k: spec.k(), n: spec.n(), data: load_f32(g, spec)? })
}

#[derive(Clone)]
enum Mixer {
    Attention(Attention),
    DeltaNet(DeltaNet),
}

#[derive(Clone)]
enum FeedForwardBlock {
    Dense(Ffn),
    Moe(Box<Moe>),
}

impl FeedForwardBlock {
    fn forward(&self, n: &[f32]) -> Vec<f32> {
        match self {
            FeedForwardBlock::Dense(f) => f.forward(n),
            FeedForwardBlock::Moe(m) => m.forward(n),
        }
    }
}

#[derive(Clone)]
struct Block {
    attn_norm: Vec<f32>,
    mixer: Mixer,
    ffn_norm: Vec<f32>,
    ffn: FeedForwardBlock,
}

impl Block {
    /// Runs the block on the residual stream `x` of the token at `pos`, in place.
    fn forward(&mut self, x: &mut [f32], pos: usize, cfg: &ModelConfig) {
        let n = rms_norm(x, &self.attn_norm, cfg.eps);
        let mixed = match &mut self.mixer {
            Mixer::Attention(a) => a.forward(&n, pos, cfg),
            Mixer::DeltaNet(d) => d.forward(&n, cfg),
        };
        add_in_place(x, &mixed);
        let n = rms_norm(x, &self.ffn_norm, cfg.eps);
        add_in_place(x, &self.ffn.forward(&n));
    }

    fn load(g: &Gguf, cfg: &ModelConfig, t: &LayerTensors) -> Result<Block> {
        let mixer = match &t.mixer {
            MixerTensors::Attention(a) => Mixer::Attention(Attention::load(g, a)?),
            MixerTensors::DeltaNet(d) => Mixer::DeltaNet(DeltaNet::from_tensors(g, cfg, d)?),
        };
        Ok(Block {
            attn_norm: load_f32(g, &t.attn_norm)?,
            mixer,
            ffn_norm: load_f32(g, &t.ffn_norm)?,
            ffn: match &t.ffn {
                FeedForward::Dense(f) => FeedForwardBlock::Dense(Ffn::load(g, f)?),
                FeedForward::Moe(m) => FeedForwardBlock::Moe(Box::new(Moe::load(g, cfg, m)?)),
            },
        })
    }
}

/// A whole model on the CPU, with the state of one sequence.
pub struct Reference {
    pub config: ModelConfig,
    embd: Matrix,
    blocks: Vec<Block>,
    output_norm: Vec<f32>,
    /// `None` when tied to the embedding.
    output: Option<Matrix>,
    pos: usize,
}

impl Reference {
    pub fn load(g: &Gguf) -> Result<Reference> {
        let config = ModelConfig::from_gguf(g)?;
        let globals = config.global_tensors();
        let embd = load_matrix(g, &globals.token_embd)?;
        let blocks =
            (0..config.n_layer()).map(|i| Block::load(g, &config, &config.layer_tensors(i))).collect::<Result<_>>()?;
        let output_norm = load_f32(g, &globals.output_norm)?;
        let output = if config.tied_output { None } else { Some(load_matrix(g, &globals.output)?) };
        Ok(Reference { config, embd, blocks, output_norm, output, pos: 0 })
    }

    /// Forgets the sequence: the next token is at position 0.
    pub fn reset(&mut self) {
        self.pos = 0;
        for b in &mut self.blocks {
            match &mut b.mixer {
                Mixer::Attention(a) => a.reset(),
                Mixer::DeltaNet(d) => d.reset(),
            }
        }
    }

    /// Position of the next token.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Feeds one token at the next position and returns its logits.
    pub fn forward(&mut self, token: u32) -> Result<Vec<f32>> {
        Ok(self.forward_hidden(token)?.0)
    }

    /// Feeds one token at the next position and returns its logits and the final hidden
    /// state after `output_norm` (the vector the head multiplies, and what an MTP block
    /// takes: see [`Mtp::step`]).
    pub fn forward_hidden(&mut self, token: u32) -> Result<(Vec<f32>, Vec<f32>)> {
        let cfg = &self.config;
        let t = token as usize;
        if t >= cfg.n_vocab {
            return Err(Error::Config(format!("token id {token} is outside the vocabulary of {}", cfg.n_vocab)));
        }
        let mut x = self.embd.row(t).to_vec();
        for b in &mut self.blocks {
            b.forward(&mut x, self.pos, cfg);
        }
        self.pos += 1;
        let n = rms_norm(&x, &self.output_norm, cfg.eps);
        Ok((self.head().matvec(&n), n))
    }

    /// The output head (the embedding when tied).
    fn head(&self) -> &Matrix {
        self.output.as_ref().unwrap_or(&self.embd)
    }
}

/// A multi-token-prediction block on the CPU (qwen35 with `nextn_predict_layers`, see
/// `docs/qwen35.md`, "The MTP block"), with its own attention cache for one sequence: the
/// row at position p takes token `x_p` and the main model's final hidden state at `p - 1`
/// (zero at position 0) and predicts the token at `p + 1`.
#[derive(Clone)]
pub struct Mtp {
    block: Block,
    eh_proj: Matrix,
    enorm: Vec<f32>,
    hnorm: Vec<f32>,
    shared_head_norm: Vec<f32>,
    pos: usize,
}

impl Mtp {
    /// The file's first MTP block, if it has one.
    pub fn load(g: &Gguf, config: &ModelConfig) -> Result<Option<Mtp>> {
        let Some(t) = config.mtp_tensors().into_iter().next() else { return Ok(None) };
        Ok(Some(Mtp {
            block: Block::load(g, config, &t.layer)?,
            eh_proj: load_matrix(g, &t.eh_proj)?,
            enorm: load_f32(g, &t.enorm)?,
            hnorm: load_f32(g, &t.hnorm)?,
            shared_head_norm: load_f32(g, &t.shared_head_norm)?,
            pos: 0,
        }))
    }

    /// Forgets the sequence: the next row is at position 0.
    pub fn reset(&mut self) {
        self.pos = 0;
        if let Mixer::Attention(a) = &mut self.block.mixer {
            a.reset();
        }
    }

    /// Runs the row of `token` with `hidden` (the main model's `output_norm`ed state at
    /// the position before, or zeros at position 0) at the next position; returns the
    /// logits of the token after the next, through `main`'s embedding and head, and the
    /// `shared_head_norm`ed state they come from (what a further draft pairs with).
    pub fn step(&mut self, main: &Reference, token: u32, hidden: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
        let cfg = &main.config;
        let t = token as usize;
        if t >= cfg.n_vocab || hidden.len() != cfg.n_embd {
            return Err(Error::Config(format!(
                "an MTP row of token {token} (vocabulary {}) and {} hidden values (width {})",
                cfg.n_vocab,
                hidden.len(),
                cfg.n_embd
            )));
        }
        let mut joined = rms_norm(main.embd.row(t), &self.enorm, cfg.eps);
        joined.extend(rms_norm(hidden, &self.hnorm, cfg.eps));
        let mut x = self.eh_proj.matvec(&joined);
        self.block.forward(&mut x, self.pos, cfg);
        self.pos += 1;
        let out = rms_norm(&x, &self.shared_head_norm, cfg.eps);
        Ok((main.head().matvec(&out), out))
    }
}
