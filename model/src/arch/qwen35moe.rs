//! `qwen35moe` (Qwen3.5/3.6 MoE, e.g. Qwen3.6-35B-A3B; see `qwen35moe.md`): the `qwen35`
//! hybrid with every layer's dense SwiGLU replaced by a routed mixture of experts and a
//! shared expert behind a sigmoid gate. The mixers, norms, RoPE and MTP blocks are
//! `qwen35`'s, so only the metadata and the feed-forward's tensors are written here.

use super::{ArchMetadata, ArchParams, FfnTensors, MoeTensors, TensorSpec, blk, qwen35};
use crate::config::{ModelConfig, MoeConfig};
use crate::{Error, Result};

/// `qwen35`'s keys plus the experts' (`n_ff`: `feed_forward_length`, optional here).
pub(super) fn params(m: &ArchMetadata, block_count: usize, n_ff: Option<usize>) -> Result<ArchParams> {
    let mut p = qwen35::params(m, block_count)?;
    let n_expert = m.require("expert_count")?;
    let n_expert_used = m.require("expert_used_count")?;
    if n_expert == 0 || n_expert_used == 0 || n_expert_used > n_expert {
        return Err(Error::Config(format!("{n_expert_used} experts used of {n_expert}: need 1 <= used <= count")));
    }
    // As llama.cpp: without their own keys, the widths come from feed_forward_length.
    let expert_ff = match (m.get("expert_feed_forward_length")?, n_ff) {
        (Some(f), _) => f,
        (None, Some(f)) => f / n_expert_used,
        (None, None) => return Err(Error::MissingKey("qwen35moe.expert_feed_forward_length".into())),
    };
    let shared_ff = match (m.get("expert_shared_feed_forward_length")?, n_ff) {
        (Some(f), _) => f,
        (None, Some(f)) => f,
        (None, None) => return Err(Error::MissingKey("qwen35moe.expert_shared_feed_forward_length".into())),
    };
    if expert_ff == 0 || shared_ff == 0 {
        return Err(Error::Config(format!(
            "expert FFN widths {expert_ff} (routed) and {shared_ff} (shared) must be positive"
        )));
    }
    p.moe = Some(MoeConfig { n_expert, n_expert_used, expert_ff, shared_ff });
    Ok(p)
}

/// Layer `layer`'s router, routed experts, shared expert and its gate.
pub(super) fn moe_tensors(cfg: &ModelConfig, moe: &MoeConfig, layer: usize) -> MoeTensors {
    let (e, f, fs, n) = (cfg.n_embd, moe.expert_ff, moe.shared_ff, moe.n_expert);
    let name = |s: &str| blk(layer, s);
    MoeTensors {
        router: TensorSpec::kernel(name("ffn_gate_inp.weight"), e, n),
        experts: FfnTensors {
            gate: TensorSpec::experts(name("ffn_gate_exps.weight"), e, f, n),
            up: TensorSpec::experts(name("ffn_up_exps.weight"), e, f, n),
            down: TensorSpec::experts(name("ffn_down_exps.weight"), f, e, n),
        },
        shared: FfnTensors {
            gate: TensorSpec::matrix(name("ffn_gate_shexp.weight"), e, fs),
            up: TensorSpec::matrix(name("ffn_up_shexp.weight"), e, fs),
            down: TensorSpec::matrix(name("ffn_down_shexp.weight"), fs, e),
        },
        shared_gate: TensorSpec::kernel(name("ffn_gate_inp_shexp.weight"), e, 1),
    }
}
