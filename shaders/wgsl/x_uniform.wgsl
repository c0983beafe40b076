// x of a matrix kernel (binding 2) as a uniform buffer of XN vec4s (the start of the
// buffer holding the step's rows of k / 4), for steps of a few rows on CPU adapters. There, Mesa's lavapipe reads a storage buffer
// lane by lane, in a loop with a bounds check for each value, but a uniform buffer with
// one vector gather: an 8-row SmolLM2 step's matrix products took 88 ms with x in a
// storage buffer and 75 ms with it in a uniform one.

const XN: u32 = 4u;

@group(0) @binding(2) var<uniform> x: array<vec4<f32>, XN>;
