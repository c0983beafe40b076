//! Softmax attention over a growing KV cache: llama, qwen3 (Q/K norm) and qwen35's
//! gated variant (`attn_q` yields a query and a sigmoid output gate per head).

use super::ops::{Matrix, dot, rms_norm, rope, sigmoid, softmax_in_place};
use super::{load_f32, load_matrix};
use crate::Result;
use crate::arch::AttentionTensors;
use crate::config::ModelConfig;
use crate::gguf::Gguf;

#[derive(Clone)]
pub(super) struct Attention {
    q: Matrix,
    k: Matrix,
    v: Matrix,
    o: Matrix,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    /// Per position: `n_head_kv * head_dim` values.
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
}

impl Attention {
    pub fn load(g: &Gguf, t: &AttentionTensors) -> Result<Attention> {
        let norm = |spec: &Option<_>| spec.as_ref().map(|s| load_f32(g, s)).transpose();
        Ok(Attention {
            q: load_matrix(g, &t.q)?,
            k: load_matrix(g, &t.k)?,
            v: load_matrix(g, &t.v)?,
            o: load_matrix(g, &t.o)?,
            q_norm: norm(&t.q_norm)?,
            k_norm: norm(&t.k_norm)?,
            keys: Vec::new(),
            values: Vec::new(),
        })
    }

    pub fn reset(&mut self) {
        self.keys.clear();
        self.values.clear();
    }

    pub fn forward(&mut self, x: &[f32], pos: usize, cfg: &ModelConfig) -> Vec<f32> {
        let a = &cfg.attention;
        let d = a.head_dim;
        let q_full = self.q.matvec(x);
        // Split [q | gate] per head when gated.
        let (mut q, gate): (Vec<f32>, Option<Vec<f32>>) = if a.output_gate {
            let mut q = Vec::with_capacity(a.n_head * d);
            let mut gate = Vec::with_capacity(a.n_head * d);
            for h in q_full.chunks_exact(2 * d) {
                q.extend_from_slice(&h[..d]);
                gate.extend_from_slice(&h[d..]);
            }
            (q, Some(gate))
        } else {
            (q_full, None)
        };
        let mut k = self.k.matvec(x);
        let v = self.v.matvec(x);
        for (heads, norm) in [(&mut q, &self.q_norm), (&mut k, &self.k_norm)] {
            for h in heads.chunks_exact_mut(d) {
                if let Some(w) = norm {
                    let n = rms_norm(h, w, cfg.eps);
                    h.copy_from_slice(&n);
                }
                rope(h, pos, a.n_rot, a.rope_theta, a.rope_style);
            }
        }
        self.keys.push(k);
        self.values.push(v);

        let scale = 1.0 / (d as f32).sqrt();
        let group = a.n_head / a.n_head_kv;
        let mut out = vec![0f32; a.n_head * d];
        for h in 0..a.n_head {
            let kvh = h / group;
            let qh = &q[h * d..(h + 1) * d];
            let mut scores: Vec<f32> = self.keys.iter().map(|k| dot(qh, &k[kvh * d..(kvh + 1) * d]) * scale).collect();
            softmax_in_place(&mut scores);
            let o = &mut out[h * d..(h + 1) * d];
            for (p, v) in scores.iter().zip(&self.values) {
                o.iter_mut().zip(&v[kvh * d..(kvh + 1) * d]).for_each(|(o, v)| *o += p * v);
            }
        }
        if let Some(gate) = gate {
            out.iter_mut().zip(&gate).for_each(|(o, g)| *o *= sigmoid(*g));
        }
        self.o.matvec(&out)
    }
}
