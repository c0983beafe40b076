// Gated DeltaNet: advances each sequence's conv state past its rows of the step, after
// deltanet_conv has read it. The new state is the last K-1 inputs of [old state | the
// sequence's rows], oldest first. One thread per (channel, sequence), in place: entry j
// reads entry n + j > j, which no earlier iteration (entries below j) has overwritten.
// With `keep`, the history after the sequence's first `keep` rows goes to its rollback
// slot first, from the history as it was.

const WG: u32 = 64u;

//#include "common/step.wgsl"
//#include "common/batch.wgsl"

struct Params {
    channels: u32,
    kernel: u32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(1) var<uniform> params: Params;
// [n_tokens, channels].
@group(0) @binding(2) var<storage, read> seqs: array<SeqInfo>;
@group(0) @binding(3) var<storage, read> qkv: array<f32>;
// [slots, kernel - 1, channels].
@group(0) @binding(4) var<storage, read_write> conv_state: array<f32>;
// Laid out as `conv_state`: each slot's history after its first `keep` rows of the step
// (written only where `keep` > 0, before the history moves on).
@group(0) @binding(5) var<storage, read_write> rollback: array<f32>;

// Entry `src` of [the slot's history at `base` | the sequence's rows from `first`], for
// channel `c` of `n`.
fn history(base: u32, first: u32, src: u32, hist: u32, n: u32, c: u32) -> f32 {
    if src < hist {
        return conv_state[base + src * n + c];
    }
    return qkv[(first + src - hist) * n + c];
}

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    let n = params.channels;
    if c >= n || gid.y >= step.n_seqs {
        return;
    }
    let seq = seqs[gid.y];
    let hist = params.kernel - 1u;
    let base = seq.slot * hist * n;
    if seq.keep > 0u {
        for (var j = 0u; j < hist; j++) {
            rollback[base + j * n + c] = history(base, seq.first, seq.keep + j, hist, n, c);
        }
    }
    for (var j = 0u; j < hist; j++) {
        conv_state[base + j * n + c] = history(base, seq.first, seq.n + j, hist, n, c);
    }
}
