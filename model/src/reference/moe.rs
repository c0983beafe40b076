//! A mixture-of-experts feed-forward (`qwen35moe.md`): the router picks the k experts
//! with the largest logits, their SwiGLU outputs are summed with softmax weights taken
//! over the chosen k, and a shared expert is added behind a sigmoid gate.

use super::ops::{Matrix, dot, sigmoid, silu};
use super::{load_f32, load_matrix};
use crate::Result;
use crate::arch::MoeTensors;
use crate::config::{ModelConfig, MoeConfig};
use crate::gguf::Gguf;

/// The k experts a token goes to, best first, with their weights: the k largest router
/// logits (a tie goes to the lower expert id), weighted by the softmax over those k alone.
/// This is `softmax(r)` over all experts renormalised to the chosen ones, as llama.cpp
/// computes it; its 6.1e-5 clamp of the sum never acts, since k of n probabilities sum to
/// at least k/n.
pub fn route(logits: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    // Stable: equal logits keep id order.
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    order.truncate(k);
    let top = logits[order[0]];
    let exps: Vec<f32> = order.iter().map(|&e| (logits[e] - top).exp()).collect();
    let sum: f32 = exps.iter().sum();
    order.into_iter().zip(exps).map(|(e, x)| (e, x / sum)).collect()
}

/// One expert's SwiGLU, its rows taken from the stacked expert tensors.
fn expert(gate: &Matrix, up: &Matrix, down: &Matrix, e: usize, n: &[f32]) -> Vec<f32> {
    fn rows(m: &Matrix, e: usize) -> impl Iterator<Item = &[f32]> {
        m.data.chunks_exact(m.k).skip(e * m.n).take(m.n)
    }
    let h: Vec<f32> = rows(gate, e).zip(rows(up, e)).map(|(g, u)| silu(dot(g, n)) * dot(u, n)).collect();
    rows(down, e).map(|d| dot(d, &h)).collect()
}

#[derive(Clone)]
pub(super) struct Moe {
    cfg: MoeConfig,
    router: Matrix,
    /// Each is `n_exp` matrices end to end; `n` is one expert's rows.
    gate: Matrix,
    up: Matrix,
    down: Matrix,
    shared_gate: Vec<f32>,
    shared: [Matrix; 3],
}

impl Moe {
    pub fn load(g: &Gguf, cfg: &ModelConfig, t: &MoeTensors) -> Result<Moe> {
        let moe = cfg.moe.clone().ok_or_else(|| crate::Error::Config("MoE tensors without MoE metadata".into()))?;
        Ok(Moe {
            cfg: moe,
            router: load_matrix(g, &t.router)?,
            gate: load_matrix(g, &t.experts.gate)?,
            up: load_matrix(g, &t.experts.up)?,
            down: load_matrix(g, &t.experts.down)?,
            shared_gate: load_f32(g, &t.shared_gate)?,
            shared: [load_matrix(g, &t.shared.gate)?, load_matrix(g, &t.shared.up)?, load_matrix(g, &t.shared.down)?],
        })
    }

    pub fn forward(&self, n: &[f32]) -> Vec<f32> {
        let chosen = route(&self.router.matvec(n), self.cfg.n_expert_used);
        let mut out = vec![0f32; n.len()];
        for (e, w) in chosen {
            for (o, v) in out.iter_mut().zip(expert(&self.gate, &self.up, &self.down, e, n)) {
                *o += w * v;
            }
        }
        let [gate, up, down] = &self.shared;
        let gate_value = sigmoid(dot(&self.shared_gate, n));
        let h: Vec<f32> = gate.matvec(n).iter().zip(up.matvec(n)).map(|(g, u)| silu(*g) * u).collect();
        for (o, v) in out.iter_mut().zip(down.matvec(&h)) {
            *o += gate_value * v;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::route;

    #[test]
    fn route_takes_the_largest_logits_ties_to_the_lower_id() {
        let r = route(&[0.5, 2.0, -1.0, 2.0, 1.0], 3);
        let ids: Vec<usize> = r.iter().map(|p| p.0).collect();
        assert_eq!(ids, [1, 3, 4]);
        let sum: f32 = r.iter().map(|p| p.1).sum();
        assert!((sum - 1.0).abs() < 1e-6);
        let (e1, e2) = ((0f32).exp(), (-1f32).exp());
        assert!((r[0].1 - e1 / (2.0 * e1 + e2)).abs() < 1e-6 && r[0].1 == r[1].1);
        assert_eq!(route(&[3.0; 4], 2).iter().map(|p| p.0).collect::<Vec<_>>(), [0, 1]);
    }
}
