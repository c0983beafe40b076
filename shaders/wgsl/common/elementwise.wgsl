// Bindings 0 and 1 of the element-wise kernels (swiglu, gather_rows), whose params are
// one Rust struct (`ops::elementwise::Params`).

//#include "common/step.wgsl"

struct Params {
    // Values per token.
    n: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(1) var<uniform> params: Params;
