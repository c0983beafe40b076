//! SwiGLU feed-forward: `W_down(silu(W_gate n) * (W_up n))`.

use super::load_matrix;
use super::ops::{Matrix, silu};
use crate::Result;
use crate::arch::FfnTensors;
use crate::gguf::Gguf;

#[derive(Clone)]
pub(super) struct Ffn {
    gate: Matrix,
    up: Matrix,
    down: Matrix,
}

impl Ffn {
    pub fn load(g: &Gguf, t: &FfnTensors) -> Result<Ffn> {
        Ok(Ffn { gate: load_matrix(g, &t.gate)?, up: load_matrix(g, &t.up)?, down: load_matrix(g, &t.down)? })
    }

    pub fn forward(&self, n: &[f32]) -> Vec<f32> {
        let gate = self.gate.matvec(n);
        let up = self.up.matvec(n);
        let h: Vec<f32> = gate.iter().zip(&up).map(|(g, u)| silu(*g) * u).collect();
        self.down.matvec(&h)
    }
}
