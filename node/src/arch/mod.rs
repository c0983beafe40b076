//! Each architecture's forward pass over one layer, one file per architecture: which
//! parts a layer has and the order they run in. The parts themselves (attention, Gated
//! DeltaNet, feed-forward) are in [`crate::layers`]; the tensors they read are named once,
//! in `strata_model::arch`. A new architecture is a new file here (and its kernels), a
//! schema file in the model crate, and one arm in [`load_layer`].

pub mod llama;
pub mod qwen35;

use strata_model::config::{Arch, ModelConfig};

use crate::Result;
use crate::deltanet_state::DeltaNetState;
use crate::gpu::Gpu;
use crate::kv_pool::{KvLayout, LayerKv};
use crate::layers::LoadCtx;
use crate::ops::Recorder;
use crate::ops::norm::RmsNorm;
use crate::scratch::Scratch;

/// The state of every sequence in one layer: its part of the stage's KV pool, or
/// DeltaNet's fixed recurrent state per sequence slot.
pub enum LayerState {
    Kv(LayerKv),
    DeltaNet(DeltaNetState),
}

/// What a stage's sequence state is sized by: its sequence slots and, with attention
/// layers, its KV pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateSize {
    pub slots: u32,
    pub kv: Option<KvLayout>,
    /// Recurrent layers keep a checkpoint per slot (for prefix reuse).
    pub checkpoints: bool,
    /// ... and a rollback state per slot (for speculative steps).
    pub rollback: bool,
}

impl StateSize {
    /// The KV pool, for an attention layer.
    pub fn kv(&self) -> Result<KvLayout> {
        self.kv.ok_or_else(|| crate::Error::Spec("an attention layer on a stage without a KV pool".into()))
    }
}

impl LayerState {
    pub fn bytes(&self) -> u64 {
        match self {
            LayerState::Kv(c) => c.bytes(),
            LayerState::DeltaNet(d) => d.bytes(),
        }
    }
}

/// One layer of the main forward pass on the GPU, with its weights.
pub trait Layer: Send + Sync {
    /// Allocates this layer's state for every sequence the stage holds.
    fn new_state(&self, gpu: &Gpu, cfg: &ModelConfig, size: &StateSize) -> Result<LayerState>;
    /// Records `x = layer(x)` on the residual stream for a step's rows, of any sequences.
    fn record(&self, rec: &mut Recorder, cfg: &ModelConfig, s: &Scratch, state: &LayerState) -> Result<()>;
    /// Bytes of weights held.
    fn weight_bytes(&self) -> u64;
    /// Bytes of weights one token reads: all, but only its chosen experts of a mixture.
    fn bytes_read_per_token(&self) -> u64 {
        self.weight_bytes()
    }
}

/// Layer `layer` of the model in `ctx`, as its architecture builds it.
pub fn load_layer(ctx: &LoadCtx, cfg: &ModelConfig, layer: usize) -> Result<Box<dyn Layer>> {
    let tensors = cfg.layer_tensors(layer);
    Ok(match cfg.arch {
        Arch::Llama | Arch::Qwen3 => Box::new(llama::DenseLayer::load(ctx, &tensors)?),
        Arch::Qwen35 | Arch::Qwen35Moe => Box::new(qwen35::Qwen35Layer::load(ctx, cfg, &tensors)?),
    })
}

/// `n = rmsnorm(x) * weight`: the pre-norm before each sub-block.
fn pre_norm(rec: &mut Recorder, cfg: &ModelConfig, s: &Scratch, weight: &wgpu::Buffer) -> Result<()> {
    rec.rms_norm(s.x(), weight, s.n(), RmsNorm::new(cfg.n_embd as u32, 1, cfg.eps))
}
