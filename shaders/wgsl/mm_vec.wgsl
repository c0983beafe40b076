// Matrix-vector product for one token (decode): out[row0 + r] (+)= sum_k W[r, k] x[k], for
// the rows r of one part of a weight matrix. Needs a weight-format prelude (`q_*.wgsl`)
// that binds the weights at 4.. and defines `load8`.
//
// Workgroups of WG threads compute ROWS rows each (common/mm_vec.wgsl), then reduce in
// shared memory. `mm_vec_sg` is the same with subgroup adds.

//#include "common/mm_vec.wgsl"

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r0 = first_row(wid);
    if step.n_tokens == 0u || r0 >= params.rows {
        return;
    }
    let acc = row_dots(r0, lid);
    for (var r = 0u; r < ROWS; r++) {
        partial[r * WG + lid] = acc[r];
    }
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if lid < s {
            for (var r = 0u; r < ROWS; r++) {
                partial[r * WG + lid] += partial[r * WG + lid + s];
            }
        }
        workgroupBarrier();
    }
    if lid < ROWS && r0 + lid < params.rows {
        store_out(params.row0 + r0 + lid, partial[lid * WG]);
    }
}
