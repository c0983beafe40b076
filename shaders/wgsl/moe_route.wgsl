// The router of a mixture-of-experts layer, one thread per token: the n_used experts with
// the largest logits, best first (a tie goes to the lower expert id), and their weights,
// the softmax over the chosen logits alone (= softmax over all, renormalised to them).
// Reads logits [t, n_expert]; writes ids and weights [t, n_used]. Nothing is read back:
// the expert kernels take the ids from here.

//#include "common/step.wgsl"

const WG: u32 = 64u;

struct RouteParams {
    n_expert: u32,
    n_used: u32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(1) var<uniform> params: RouteParams;
@group(0) @binding(2) var<storage, read> logits: array<f32>;
@group(0) @binding(3) var<storage, read_write> ids: array<u32>;
@group(0) @binding(4) var<storage, read_write> weights: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = gid.x;
    if t >= step.n_tokens {
        return;
    }
    let row = t * params.n_expert;
    let out = t * params.n_used;
    // The j-th choice is the best of the experts ranked after the (j-1)-th: lower logit,
    // or the same logit and a higher id.
    var prev_v = 0.0;
    var prev_e = 0u;
    var top = 0.0;
    var sum = 0.0;
    for (var j = 0u; j < params.n_used; j++) {
        var best_e = params.n_expert;
        var best_v = 0.0;
        for (var e = 0u; e < params.n_expert; e++) {
            let v = logits[row + e];
            let after = j == 0u || v < prev_v || (v == prev_v && e > prev_e);
            if after && (best_e == params.n_expert || v > best_v) {
                best_e = e;
                best_v = v;
            }
        }
        // Only NaN logits leave nothing to choose: take expert 0 rather than index out.
        best_e = select(best_e, 0u, best_e == params.n_expert);
        if j == 0u {
            top = best_v;
        }
        let w = exp(best_v - top);
        ids[out + j] = best_e;
        weights[out + j] = w;
        sum += w;
        prev_v = best_v;
        prev_e = best_e;
    }
    for (var j = 0u; j < params.n_used; j++) {
        weights[out + j] = weights[out + j] / sum;
    }
}
