// Gated DeltaNet: advances the conv state past the step, after deltanet_conv has read it.
// The new state is the last K-1 inputs of [old state | the step's inputs], oldest first.
// One thread per channel, in place: slot j reads slot T + j > j, which no earlier
// iteration (slots below j) has overwritten.

const WG: u32 = 64u;

//#include "common/step.wgsl"

struct Params {
    channels: u32,
    kernel: u32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(1) var<uniform> params: Params;
// [n_tokens, channels].
@group(0) @binding(2) var<storage, read> qkv: array<f32>;
// [kernel - 1, channels].
@group(0) @binding(3) var<storage, read_write> conv_state: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    let n = params.channels;
    if c >= n {
        return;
    }
    let hist = params.kernel - 1u;
    for (var j = 0u; j < hist; j++) {
        let src = step.n_tokens + j;
        var v: f32;
        if src < hist {
            v = conv_state[src * n + c];
        } else {
            v = qkv[(src - hist) * n + c];
        }
        conv_state[j * n + c] = v;
    }
}
