// Gated DeltaNet, part 1: the causal depthwise conv of the q, k, v channels, SiLU, then
// the per-head L2 norm of q and k (q also scaled by 1/sqrt(head_dim)).
//
// One workgroup per (head of head_dim channels, row t). Rows are independent given the
// inputs, since the conv looks only K-1 inputs back: inputs before the row's sequence's
// first row in the step come from that sequence's conv state (its previous K-1 inputs,
// oldest first, in its slot), which deltanet_conv_state advances in a later dispatch. So
// prefill rows and the rows of several sequences run at once.

const WG: u32 = 64u;

//#include "common/step.wgsl"
//#include "common/workgroup_sum.wgsl"
//#include "common/batch.wgsl"

struct Params {
    // C: q, k and v channels of one token.
    channels: u32,
    head_dim: u32,
    // K: taps per channel.
    kernel: u32,
    // 2 * key heads: the heads (q then k) that get the L2 norm.
    norm_heads: u32,
    // Key heads: the first heads (q), also scaled by q_scale.
    q_heads: u32,
    eps: f32,
    q_scale: f32,
    pad0: u32,
}

@group(0) @binding(1) var<uniform> params: Params;
// [n_tokens, channels]: the step's inputs u.
@group(0) @binding(2) var<storage, read> rows: array<RowInfo>;
@group(0) @binding(3) var<storage, read> qkv: array<f32>;
// [channels, kernel]: the last tap multiplies the current input.
@group(0) @binding(4) var<storage, read> weight: array<f32>;
// [slots, kernel - 1, channels], oldest first.
@group(0) @binding(5) var<storage, read> conv_state: array<f32>;
// [n_tokens, channels].
@group(0) @binding(6) var<storage, read_write> out: array<f32>;

// Input of channel c at row u of the step, for a sequence whose first row here is
// `first`: rows before it come from the sequence's conv state.
fn input(u: i32, first: i32, slot: u32, c: u32) -> f32 {
    if u < first {
        let h = u32(i32(params.kernel) - 1 + u - first);
        return conv_state[(slot * (params.kernel - 1u) + h) * params.channels + c];
    }
    return qkv[u32(u) * params.channels + c];
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let head = wid.x;
    let t = wid.y;
    if t >= step.n_tokens {
        return;
    }
    let info = rows[t];
    let n_taps = params.kernel;
    let oldest = i32(t) - i32(n_taps) + 1;
    let base = t * params.channels + head * params.head_dim;
    var ss = 0.0;
    for (var i = lid; i < params.head_dim; i += WG) {
        let c = head * params.head_dim + i;
        var acc = 0.0;
        for (var j = 0u; j < n_taps; j++) {
            acc += weight[c * n_taps + j] * input(oldest + i32(j), i32(info.first), info.slot, c);
        }
        let y = acc / (1.0 + exp(-acc));
        out[base + i] = y;
        ss += y * y;
    }
    if head >= params.norm_heads {
        return;
    }
    let sum = workgroup_sum(lid, ss);
    var scale = 1.0 / sqrt(sum + params.eps);
    if head < params.q_heads {
        scale *= params.q_scale;
    }
    // Each thread rescales only the values it wrote itself.
    for (var i = lid; i < params.head_dim; i += WG) {
        out[base + i] *= scale;
    }
}
