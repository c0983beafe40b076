//! Gated DeltaNet (qwen35's linear-attention layers), one token at a time, exactly
//! as `qwen35.md` states the recurrence.

use super::ops::{Matrix, l2_norm, rms_norm, sigmoid, silu, softplus};
use super::{load_f32, load_matrix};
use crate::arch::{DeltaNetTensors, MixerTensors};
use crate::config::ModelConfig;
use crate::gguf::Gguf;
use crate::{Error, Result};

/// One Gated DeltaNet mixer and one sequence's state; public as the oracle of the GPU
/// layer's tests.
#[derive(Clone)]
pub struct DeltaNet {
    qkv: Matrix,
    gate: Matrix,
    beta: Matrix,
    alpha: Matrix,
    /// `[channel][kernel]`: the last tap multiplies the current input.
    conv: Vec<f32>,
    dt_bias: Vec<f32>,
    a: Vec<f32>,
    norm: Vec<f32>,
    out: Matrix,
    /// The previous `kernel - 1` conv inputs, oldest first, `[tap][channel]`.
    conv_state: Vec<f32>,
    /// One `dk x dk` matrix per value head, `[head][key dim][value dim]`.
    state: Vec<f32>,
}

impl DeltaNet {
    /// Layer `i` of `cfg`, which must be a DeltaNet layer.
    pub fn load(g: &Gguf, cfg: &ModelConfig, i: usize) -> Result<DeltaNet> {
        // The schema of a DeltaNet layer needs `cfg.deltanet`.
        check_config(cfg)?;
        let not_deltanet =
            || Error::Config(format!("layer {i} of the {} model is not a DeltaNet layer", cfg.arch.name()));
        if i >= cfg.n_layer() {
            return Err(not_deltanet());
        }
        match cfg.layer_tensors(i).mixer {
            MixerTensors::DeltaNet(t) => DeltaNet::from_tensors(g, cfg, &t),
            MixerTensors::Attention(_) => Err(not_deltanet()),
        }
    }

    pub(super) fn from_tensors(g: &Gguf, cfg: &ModelConfig, t: &DeltaNetTensors) -> Result<DeltaNet> {
        check_config(cfg)?;
        let mut s = DeltaNet {
            qkv: load_matrix(g, &t.qkv)?,
            gate: load_matrix(g, &t.gate)?,
            beta: load_matrix(g, &t.beta)?,
            alpha: load_matrix(g, &t.alpha)?,
            conv: load_f32(g, &t.conv1d)?,
            dt_bias: load_f32(g, &t.dt_bias)?,
            a: load_f32(g, &t.a)?,
            norm: load_f32(g, &t.norm)?,
            out: load_matrix(g, &t.out)?,
            conv_state: Vec::new(),
            state: Vec::new(),
        };
        s.reset_with(cfg);
        Ok(s)
    }

    fn reset_with(&mut self, cfg: &ModelConfig) {
        let dn = cfg.deltanet.as_ref().expect("checked at load");
        self.conv_state = vec![0.0; (dn.conv_kernel - 1) * dn.conv_channels()];
        self.state = vec![0.0; dn.n_value_heads * dn.head_dim * dn.head_dim];
    }

    pub fn reset(&mut self) {
        self.conv_state.iter_mut().for_each(|v| *v = 0.0);
        self.state.iter_mut().for_each(|v| *v = 0.0);
    }

    pub fn forward(&mut self, x: &[f32], cfg: &ModelConfig) -> Vec<f32> {
        let dn = cfg.deltanet.as_ref().expect("checked at load");
        let (kk, c, nk, nv, dk) = (dn.conv_kernel, dn.conv_channels(), dn.n_key_heads, dn.n_value_heads, dn.head_dim);
        let u = self.qkv.matvec(x);
        let z = self.gate.matvec(x);
        let b = self.beta.matvec(x);
        let a = self.alpha.matvec(x);

        // Causal depthwise conv over [state..., u], then SiLU; shift the state.
        let mut y = vec![0f32; c];
        for ch in 0..c {
            let w = &self.conv[ch * kk..(ch + 1) * kk];
            let mut acc = w[kk - 1] * u[ch];
            for (j, w) in w[..kk - 1].iter().enumerate() {
                acc += w * self.conv_state[j * c + ch];
            }
            y[ch] = silu(acc);
        }
        if kk > 1 {
            self.conv_state.copy_within(c.., 0);
            let last = (kk - 2) * c;
            self.conv_state[last..].copy_from_slice(&u);
        }

        let (q_all, rest) = y.split_at_mut(dk * nk);
        let (k_all, v_all) = rest.split_at_mut(dk * nk);
        let q_scale = 1.0 / (dk as f32).sqrt();
        for h in q_all.chunks_exact_mut(dk) {
            l2_norm(h, cfg.eps);
            h.iter_mut().for_each(|v| *v *= q_scale);
        }
        for h in k_all.chunks_exact_mut(dk) {
            l2_norm(h, cfg.eps);
        }

        let mut o_all = vec![0f32; nv * dk];
        for h in 0..nv {
            let kh = h % nk;
            let q = &q_all[kh * dk..(kh + 1) * dk];
            let k = &k_all[kh * dk..(kh + 1) * dk];
            let v = &v_all[h * dk..(h + 1) * dk];
            let beta = sigmoid(b[h]);
            let g = self.a[h] * softplus(a[h] + self.dt_bias[h]);
            let decay = g.exp();
            let s = &mut self.state[h * dk * dk..(h + 1) * dk * dk];
            s.iter_mut().for_each(|v| *v *= decay);
            // kv = S^T k; d = beta (v - kv); S += k d^T; o = S^T q.
            let mut kv = vec![0f32; dk];
            for i in 0..dk {
                for j in 0..dk {
                    kv[j] += s[i * dk + j] * k[i];
                }
            }
            let d: Vec<f32> = (0..dk).map(|j| beta * (v[j] - kv[j])).collect();
            for i in 0..dk {
                for j in 0..dk {
                    s[i * dk + j] += k[i] * d[j];
                }
            }
            let o = &mut o_all[h * dk..(h + 1) * dk];
            for i in 0..dk {
                for j in 0..dk {
                    o[j] += s[i * dk + j] * q[i];
                }
            }
            let n = rms_norm(o, &self.norm, cfg.eps);
            for j in 0..dk {
                o[j] = n[j] * silu(z[h * dk + j]);
            }
        }
        self.out.matvec(&o_all)
    }
}

/// The forward pass reads `cfg.deltanet`; refuse a config without it at load.
fn check_config(cfg: &ModelConfig) -> Result<()> {
    match cfg.deltanet {
        Some(_) => Ok(()),
        None => Err(Error::Config("DeltaNet layer without ssm.* metadata".into())),
    }
}
