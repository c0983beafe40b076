// Repetition penalties on one row of logits, as llama.cpp applies them: for each distinct
// id among the recent tokens, occurring c times, a positive logit is divided by `repeat`
// and a non-positive one multiplied, then c * frequency + presence is subtracted.
// Thread i handles ids[i] only if it is that id's first occurrence, so no logit is
// touched twice.

const WG: u32 = 64u;

//#include "common/step.wgsl"

struct Params {
    n_vocab: u32,
    // 0xffffffff: the step's last token.
    row: u32,
    // Valid entries of `ids`.
    count: u32,
    pad0: u32,
    repeat: f32,
    frequency: f32,
    presence: f32,
    pad1: u32,
}

@group(0) @binding(1) var<uniform> params: Params;
@group(0) @binding(2) var<storage, read> ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> logits: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if step.n_tokens == 0u || i >= params.count {
        return;
    }
    let id = ids[i];
    if id >= params.n_vocab {
        return;
    }
    for (var j = 0u; j < i; j++) {
        if ids[j] == id {
            return;
        }
    }
    var c = 1u;
    for (var j = i + 1u; j < params.count; j++) {
        c += u32(ids[j] == id);
    }
    var row = params.row;
    if row == 0xffffffffu {
        row = step.n_tokens - 1u;
    }
    let at = row * params.n_vocab + id;
    var v = logits[at];
    if v <= 0.0 {
        v *= params.repeat;
    } else {
        v /= params.repeat;
    }
    logits[at] = v - (f32(c) * params.frequency + params.presence);
}
