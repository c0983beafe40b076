// Repetition penalties on each sampled row of logits, as llama.cpp applies them: for each
// distinct id among the row's recent tokens, occurring c times, a positive logit is
// divided by `repeat` and a non-positive one multiplied, then c * frequency + presence is
// subtracted. Thread i of row r handles ids[r][i] only if it is that id's first
// occurrence, so no logit is touched twice. Workgroups: x over ids, y over rows.

const WG: u32 = 64u;

//#include "common/step.wgsl"
//#include "common/sample.wgsl"

struct Params {
    n_vocab: u32,
    // Ids per row of `ids`.
    max_ids: u32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(1) var<uniform> params: Params;
@group(0) @binding(2) var<storage, read> sampling: array<RowSampling>;
// [rows, max_ids]: each row's recent tokens.
@group(0) @binding(3) var<storage, read> ids: array<u32>;
@group(0) @binding(4) var<storage, read_write> logits: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    let row = gid.y;
    if row >= step.n_tokens {
        return;
    }
    let p = sampling[row];
    let count = min(p.count, params.max_ids);
    if i >= count {
        return;
    }
    let base = row * params.max_ids;
    let id = ids[base + i];
    if id >= params.n_vocab {
        return;
    }
    for (var j = 0u; j < i; j++) {
        if ids[base + j] == id {
            return;
        }
    }
    var c = 1u;
    for (var j = i + 1u; j < count; j++) {
        c += u32(ids[base + j] == id);
    }
    let at = row * params.n_vocab + id;
    var v = logits[at];
    if v <= 0.0 {
        v *= p.repeat;
    } else {
        v /= p.repeat;
    }
    logits[at] = v - (f32(c) * p.frequency + p.presence);
}
