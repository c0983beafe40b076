// Streams a buffer once and folds it into one value per workgroup, so that the
// compiler cannot drop the loads: the adapter's plain read bandwidth, the ceiling
// that `strata bench` compares the model's weight reads with.

const WG: u32 = 256u;

struct Params {
    n_vec4: u32,
    stride: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read_write> sink: array<u32>;

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    var acc = vec4<u32>(0u);
    var i = gid.x;
    loop {
        if i >= p.n_vec4 { break; }
        acc ^= src[i];
        i += p.stride;
    }
    let v = acc.x ^ acc.y ^ acc.z ^ acc.w;
    // Written only when impossible-looking, yet the compiler cannot know that.
    if v == 0x9e3779b9u {
        sink[wid.x] = v;
    }
}
