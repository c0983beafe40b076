// x of a matrix kernel (binding 2) as a storage buffer: rows of k / 4 vec4s, as many
// rows as the step has.

@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;
