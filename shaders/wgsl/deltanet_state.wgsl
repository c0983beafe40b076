// Gated DeltaNet, part 2: the gates and the delta rule, for each sequence's rows of the
// step in order, over that sequence's state (in its slot).
// Per value head h (key head kh = h mod n_key_heads: heads are tiled) and token:
//   beta = sigmoid(b), g = ssm_a * softplus(a + dt_bias)
//   S = exp(g) S;  kv = S^T k;  d = beta (v - kv);  S += k d^T;  o = S^T q
// with S a DK x DK f32 matrix (rows: key dim, columns: value dim).
//
// Column j of S only ever meets column j of d, so columns are independent: one thread
// per column, holding it in private memory (as vec4s of 4 rows) for the whole step,
// COLS columns per workgroup (workgroups: value heads x DK / COLS x the step's sequences,
// `Dim::Seqs`). q and k (already
// L2-normed by deltanet_conv) go through workgroup memory once per token. Decode and
// prefill run the same kernel. DK must be a multiple of 4.

const DK: u32 = 128u;
const COLS: u32 = 64u;

//#include "common/step.wgsl"
//#include "common/batch.wgsl"

struct Params {
    n_key_heads: u32,
    n_value_heads: u32,
    // C: channels of one token of `y`.
    channels: u32,
    pad0: u32,
}

@group(0) @binding(1) var<uniform> params: Params;
// [n_tokens, channels]: q (key heads), k (key heads), v (value heads), heads of DK.
@group(0) @binding(2) var<storage, read> seqs: array<SeqInfo>;
@group(0) @binding(3) var<storage, read> y: array<f32>;
// [n_tokens, n_value_heads] each.
@group(0) @binding(4) var<storage, read> b: array<f32>;
@group(0) @binding(5) var<storage, read> a: array<f32>;
// [2, n_value_heads]: ssm_a (already -exp(A_log)), then ssm_dt.bias.
@group(0) @binding(6) var<storage, read> gate_consts: array<f32>;
// [slots, n_value_heads, DK, DK].
@group(0) @binding(7) var<storage, read_write> state: array<f32>;
// [n_tokens, n_value_heads, DK].
@group(0) @binding(8) var<storage, read_write> out: array<f32>;
// [slots, n_value_heads, DK, DK]: each slot's state after its first `keep` rows of the
// step (written only where `keep` > 0; a stand-in buffer on stages that never ask).
@group(0) @binding(9) var<storage, read_write> rollback: array<f32>;

const DK4: u32 = DK / 4u;

var<workgroup> q_s: array<vec4<f32>, DK4>;
var<workgroup> k_s: array<vec4<f32>, DK4>;

fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        return x;
    }
    return log(1.0 + exp(x));
}

@compute @workgroup_size(COLS)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wid.x;
    let j = wid.y * COLS + lid;
    if wid.z >= step.n_seqs {
        return;
    }
    let seq = seqs[wid.z];
    // Threads past the last column still help load q and k and meet every barrier.
    let owns_column = j < DK;
    let nk = params.n_key_heads;
    let nv = params.n_value_heads;
    let kh = h % nk;
    let q_base = kh * DK;
    let k_base = (nk + kh) * DK;
    let v_base = (2u * nk + h) * DK;
    let s_base = (seq.slot * nv + h) * DK * DK + j;

    // Rows 4i..4i+3 of the column.
    var col: array<vec4<f32>, DK4>;
    if owns_column {
        for (var i = 0u; i < DK4; i++) {
            let r = s_base + 4u * i * DK;
            col[i] = vec4<f32>(state[r], state[r + DK], state[r + 2u * DK], state[r + 3u * DK]);
        }
    }
    let a_h = gate_consts[h];
    let bias = gate_consts[nv + h];
    for (var t = seq.first; t < seq.first + seq.n; t++) {
        let row = t * params.channels;
        // The previous token's reads of q_s and k_s are done.
        workgroupBarrier();
        for (var i = lid; i < DK4; i += COLS) {
            let q = row + q_base + 4u * i;
            let k = row + k_base + 4u * i;
            q_s[i] = vec4<f32>(y[q], y[q + 1u], y[q + 2u], y[q + 3u]);
            k_s[i] = vec4<f32>(y[k], y[k + 1u], y[k + 2u], y[k + 3u]);
        }
        workgroupBarrier();
        let beta = 1.0 / (1.0 + exp(-b[t * nv + h]));
        let decay = exp(a_h * softplus(a[t * nv + h] + bias));
        if owns_column {
            var kv = 0.0;
            for (var i = 0u; i < DK4; i++) {
                kv += dot(col[i], k_s[i]);
            }
            let d = beta * (y[row + v_base + j] - decay * kv);
            var o = 0.0;
            for (var i = 0u; i < DK4; i++) {
                let s = decay * col[i] + k_s[i] * d;
                col[i] = s;
                o += dot(s, q_s[i]);
            }
            out[(t * nv + h) * DK + j] = o;
            if t + 1u == seq.first + seq.keep {
                for (var i = 0u; i < DK4; i++) {
                    let r = s_base + 4u * i * DK;
                    rollback[r] = col[i].x;
                    rollback[r + DK] = col[i].y;
                    rollback[r + 2u * DK] = col[i].z;
                    rollback[r + 3u * DK] = col[i].w;
                }
            }
        }
    }
    if owns_column {
        for (var i = 0u; i < DK4; i++) {
            let r = s_base + 4u * i * DK;
            let c = col[i];
            state[r] = c.x;
            state[r + DK] = c.y;
            state[r + 2u * DK] = c.z;
            state[r + 3u * DK] = c.w;
        }
    }
}
