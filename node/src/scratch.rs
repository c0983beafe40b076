//! Activation buffers of a stage, sized once for its largest batch and shared by every
//! layer and sequence (a stage runs one step at a time).

use strata_model::config::ModelConfig;

use crate::gpu::{Gpu, Step};

pub struct Scratch {
    pub max_tokens: u32,
    /// The [`Step`] uniform, written once per step.
    pub step: wgpu::Buffer,
    /// A [`Step`] uniform fixed at one token, for the output head (last row only).
    pub step_one: wgpu::Buffer,
    /// u32 `[max_tokens]`: each token's position in its sequence.
    pub positions: wgpu::Buffer,
    /// u32 `[max_tokens]`: token ids (first stage).
    pub ids: wgpu::Buffer,
    /// The residual stream, f32 `[max_tokens, n_embd]`.
    pub x: wgpu::Buffer,
    /// Normed input of the current sub-block, f32 `[max_tokens, n_embd]`.
    pub n: wgpu::Buffer,
    pub q: wgpu::Buffer,
    /// Gated attention: `[query | gate]` per head, before the query norm.
    pub q_full: wgpu::Buffer,
    pub k: wgpu::Buffer,
    pub v: wgpu::Buffer,
    pub att: wgpu::Buffer,
    pub ffn_gate: wgpu::Buffer,
    pub ffn_up: wgpu::Buffer,
}

impl Scratch {
    pub fn new(gpu: &Gpu, cfg: &ModelConfig, max_tokens: u32) -> Scratch {
        let a = &cfg.attention;
        let t = u64::from(max_tokens);
        let f32s = |label: &str, width: usize| gpu.storage(label, t * width as u64 * 4);
        let q_width = a.n_head * a.head_dim;
        Scratch {
            max_tokens,
            step: gpu.uniform("step", &Step::default()),
            step_one: gpu.uniform("step_one", &Step { n_tokens: 1, _pad: [0; 3] }),
            positions: gpu.storage("positions", t * 4),
            ids: gpu.storage("ids", t * 4),
            x: f32s("x", cfg.n_embd),
            n: f32s("n", cfg.n_embd),
            q: f32s("q", q_width),
            q_full: f32s("q_full", if a.output_gate { 2 * q_width } else { 1 }),
            k: f32s("k", a.n_head_kv * a.head_dim),
            v: f32s("v", a.n_head_kv * a.head_dim),
            att: f32s("att", q_width),
            ffn_gate: f32s("ffn_gate", cfg.n_ff),
            ffn_up: f32s("ffn_up", cfg.n_ff),
        }
    }
}
