//! SwiGLU feed-forward: `W_down(silu(W_gate n) * (W_up n))`.

use super::load_matrix;
use super::ops::{Matrix, silu};
use crate::Result;
use crate::config::{ModelConfig, layer_tensor};
use crate::gguf::Gguf;

pub(super) struct Ffn {
    gate: Matrix,
    up: Matrix,
    down: Matrix,
}

impl Ffn {
    pub fn load(g: &Gguf, cfg: &ModelConfig, i: usize) -> Result<Ffn> {
        let (e, f) = (cfg.n_embd, cfg.n_ff);
        Ok(Ffn {
            gate: load_matrix(g, &layer_tensor(i, "ffn_gate.weight"), e, f)?,
            up: load_matrix(g, &layer_tensor(i, "ffn_up.weight"), e, f)?,
            down: load_matrix(g, &layer_tensor(i, "ffn_down.weight"), f, e)?,
        })
    }

    pub fn forward(&self, n: &[f32]) -> Vec<f32> {
        let gate = self.gate.matvec(n);
        let up = self.up.matvec(n);
        let h: Vec<f32> = gate.iter().zip(&up).map(|(g, u)| silu(*g) * u).collect();
        self.down.matvec(&h)
    }
}
