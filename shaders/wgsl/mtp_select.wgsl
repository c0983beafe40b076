// The inputs of the MTP block's rows (docs/qwen35.md, "The MTP block"): row r pairs a
// token with the main model's (or the previous MTP pass's) normed hidden state of the
// position before. The host writes, per row, where each comes from; the token may be one
// the GPU chose earlier in the same submission (a row's best candidate), which is what
// lets the block draft several tokens without a trip back to the host.

const WG: u32 = 256u;
// A source code with this bit set names a row of `kept` (hidden) or of `picks` (token).
const ELSEWHERE: u32 = 0x80000000u;
// A hidden source of all ones: zeros (position 0, or a state not kept).
const NONE: u32 = 0xffffffffu;

//#include "common/step.wgsl"

struct Params {
    // Values per hidden row.
    n: u32,
    // Words per row of `picks` (top-k output: the best id first).
    words: u32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(1) var<uniform> params: Params;
// Per row: (hidden source, token source). Hidden: a row of `hidden`, ELSEWHERE | a row of
// `kept`, or NONE. Token: an id, or ELSEWHERE | a row of `picks`.
@group(0) @binding(2) var<storage, read> src: array<vec2<u32>>;
@group(0) @binding(3) var<storage, read> hidden: array<f32>;
@group(0) @binding(4) var<storage, read> kept: array<f32>;
@group(0) @binding(5) var<storage, read> picks: array<u32>;
@group(0) @binding(6) var<storage, read_write> ids: array<u32>;
@group(0) @binding(7) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = wid.y;
    let i = wid.x * WG + lid;
    if r >= step.n_tokens {
        return;
    }
    let s = src[r];
    if i == 0u {
        if (s.y & ELSEWHERE) != 0u {
            ids[r] = picks[(s.y ^ ELSEWHERE) * params.words];
        } else {
            ids[r] = s.y;
        }
    }
    if i >= params.n {
        return;
    }
    var v = 0.0;
    if s.x == NONE {
        v = 0.0;
    } else if (s.x & ELSEWHERE) != 0u {
        v = kept[(s.x ^ ELSEWHERE) * params.n + i];
    } else {
        v = hidden[s.x * params.n + i];
    }
    out[r * params.n + i] = v;
}
