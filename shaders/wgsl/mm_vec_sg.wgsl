// Matrix-vector product for one token (decode): out[row0 + r] (+)= sum_k W[r, k] x[k], for
// the rows r of one part of a weight matrix. Needs a weight-format prelude (`q_*.wgsl`)
// that binds the weights at 4.. and defines `load8`.
//
// Workgroups of WG threads compute ROWS rows each (common/mm_vec.wgsl), then reduce with
// subgroup adds and one pass through shared memory. For adapters with subgroups (of any
// size); `mm_vec` is the same without them.

//#include "common/mm_vec.wgsl"

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_id) sg: u32,
    @builtin(subgroup_invocation_id) sg_lane: u32,
    @builtin(num_subgroups) n_sg: u32,
) {
    let r0 = first_row(wid);
    if step.n_tokens == 0u || r0 >= params.rows {
        return;
    }
    let acc = row_dots(r0, lid);
    for (var r = 0u; r < ROWS; r++) {
        let s = subgroupAdd(acc[r]);
        if sg_lane == 0u {
            partial[r * WG + sg] = s;
        }
    }
    workgroupBarrier();
    if lid < ROWS && r0 + lid < params.rows {
        var v = 0.0;
        for (var s = 0u; s < n_sg; s++) {
            v += partial[lid * WG + s];
        }
        store_out(params.row0 + r0 + lid, v);
    }
}
