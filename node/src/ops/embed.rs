//! Embedding lookup: the rows of a quantised table named by token ids, as f32.

use strata_shaders::Kernel;

use super::matmul::binding;
use crate::gpu::{Dim, Dispatch, Gpu, KernelCache, Workgroups};
use crate::weights::QuantMatrix;
use crate::{Error, Result};

/// Threads per workgroup of `embed.wgsl`, each one piece of 8 values.
const WG: u32 = 64;

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct Params {
    k8: u32,
    rows: u32,
    row0: u32,
    n: u32,
    zero_missing: u32,
    _pad: [u32; 3],
}

/// The dispatches that write `out[t] = table[ids[t]]` for the first `step.n_tokens` tokens.
///
/// `ids`: u32 `[max_tokens]`; `out`: f32 `[max_tokens, table.k()]`. A split table runs once
/// per part. An id past the table gives a row of zeros.
pub fn embed(
    gpu: &Gpu,
    kernels: &KernelCache,
    step: &wgpu::Buffer,
    table: &QuantMatrix,
    ids: &wgpu::Buffer,
    out: &wgpu::Buffer,
    max_tokens: u32,
) -> Result<Vec<Dispatch>> {
    let shape = |message: String| Error::Shape { op: "embed", message: format!("`{}`: {message}", table.name()) };
    if max_tokens == 0 {
        return Err(shape("max_tokens must be at least 1".into()));
    }
    let k = table.k() as u64;
    let (ids_bytes, out_bytes) = (u64::from(max_tokens) * 4, u64::from(max_tokens) * k * 4);
    if ids.size() < ids_bytes {
        return Err(shape(format!("ids hold {} bytes, {max_tokens} u32 need {ids_bytes}", ids.size())));
    }
    if out.size() < out_bytes {
        return Err(shape(format!("out holds {} bytes, {max_tokens} x {k} f32 need {out_bytes}", out.size())));
    }
    let pipeline = kernels.pipeline(gpu, Kernel::EMBED, Some(table.format()), &[("WG", format!("{WG}u"))])?;
    let k8 = (k / 8) as u32;
    let mut dispatches = Vec::with_capacity(table.parts().len());
    for (i, part) in table.parts().iter().enumerate() {
        let params = Params {
            k8,
            rows: part.rows as u32,
            row0: part.row0 as u32,
            n: table.n() as u32,
            zero_missing: u32::from(i == 0),
            _pad: [0; 3],
        };
        let params = gpu.uniform("embed", &params);
        let mut resources = vec![step.as_entire_binding(), params.as_entire_binding(), binding(ids, ids_bytes), binding(out, out_bytes)];
        resources.extend(part.buffers.iter().map(|b| b.as_entire_binding()));
        let workgroups = Workgroups(Dim::Fixed(k8.div_ceil(WG)), Dim::Tokens { group: 1 }, Dim::Fixed(1));
        dispatches.push(Dispatch::new(gpu, "embed", pipeline.clone(), &resources, workgroups));
    }
    Ok(dispatches)
}

#[cfg(test)]
mod tests {
    use strata_model::quant::dequantize;

    use super::*;
    use crate::gpu::{Step, encode_dispatches};
    use crate::testing::{Rng, assert_close, gpu};
    use crate::weights::tests::{TYPES, random_weights};

    /// `out` after gathering `ids` (of which the step covers `t`) from `table`.
    fn gpu_embed(table: &QuantMatrix, ids: &[u32], t: u32, init: &[f32]) -> Vec<f32> {
        let (gpu, kernels) = gpu();
        let step = gpu.uniform("step", &Step { n_tokens: t, _pad: [0; 3] });
        let (idb, out) = (gpu.storage_init("ids", bytemuck::cast_slice(ids)), gpu.storage_init("out", bytemuck::cast_slice(init)));
        let d = embed(gpu, kernels, &step, table, &idb, &out, ids.len() as u32).unwrap();
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        encode_dispatches(&mut enc, &d, t);
        gpu.queue.submit([enc.finish()]);
        gpu.read_f32(&out, init.len()).unwrap()
    }

    #[test]
    fn embed_gathers_rows_of_every_type_whole_and_split() {
        let mut rng = Rng::new(11);
        let n = 50;
        for ty in TYPES {
            let k = if ty.block_len() == 256 { 512 } else { 576 };
            let bytes = random_weights(&mut rng, ty, k, n);
            let wf = dequantize(ty, &bytes).unwrap();
            let whole = QuantMatrix::upload(&gpu().0, "token_embd.weight", ty, k, n, &bytes).unwrap();
            let split = QuantMatrix::upload_with_max_part(&gpu().0, "token_embd.weight", ty, k, n, &bytes, bytes.len() as u64 / 3).unwrap();
            assert!(split.parts().len() >= 3);
            // Repeats, both ends of the table, an id past it; 2 ids past the step.
            let ids = [3u32, 0, 49, 3, 17, 1000, 25, 8, 9];
            let t = 7;
            let init = rng.vec(ids.len() * k, 1.0);
            for table in [&whole, &split] {
                let got = gpu_embed(table, &ids, t as u32, &init);
                let mut want = Vec::new();
                for &id in &ids[..t] {
                    match wf.get(id as usize * k..(id as usize + 1) * k) {
                        Some(row) => want.extend_from_slice(row),
                        None => want.extend(std::iter::repeat_n(0.0, k)),
                    }
                }
                let what = format!("{ty} embed, {} parts", table.parts().len());
                assert_close(&got[..t * k], &want, 1e-7, 1e-6, &what);
                assert_eq!(&got[t * k..], &init[t * k..], "{what}: tokens past the step were written");
            }
        }
    }
}
