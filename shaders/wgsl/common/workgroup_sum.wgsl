// The sum over the workgroup of one value per thread, as a tree in workgroup memory.
// Needs the kernel's WG (threads per workgroup, a power of two); call it from uniform
// control flow, with every thread.

var<workgroup> partial: array<f32, WG>;

fn workgroup_sum(lid: u32, v: f32) -> f32 {
    partial[lid] = v;
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if lid < s {
            partial[lid] += partial[lid + s];
        }
    }
    workgroupBarrier();
    let sum = partial[0];
    // So that a later call cannot overwrite partial[0] before every thread has read it.
    workgroupBarrier();
    return sum;
}
