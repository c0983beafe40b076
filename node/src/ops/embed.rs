//! Embedding lookup: the rows of a quantised table named by token ids, as f32.

use strata_shaders::Kernel;

use super::recorder::{Act, Recorder};
use crate::Result;
use crate::gpu::{Dim, Workgroups};
use crate::weights::QuantMatrix;

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

impl Recorder<'_> {
    /// Records `out[t] = table[ids[t]]` for the first `step.n_tokens` tokens.
    ///
    /// `ids`: one u32 per row; `out`: rows of `table.k()`. A split table runs once per
    /// part. An id past the table gives a row of zeros.
    pub fn embed(&mut self, table: &QuantMatrix, ids: Act<'_>, out: Act<'_>) -> Result<()> {
        let what = |part: &str| format!("{}: {part}", table.name());
        let k = table.k() as u32;
        let ids = self.bind_act("embed", &what("ids"), ids, 1)?;
        let out = self.bind_act("embed", &what("out"), out, k)?;
        let pipeline = self.pipeline(Kernel::EMBED, &[table.format()], &[("WG", format!("{WG}u"))])?;
        let k8 = k / 8;
        for (i, part) in table.parts().iter().enumerate() {
            let params = Params {
                k8,
                rows: part.rows as u32,
                row0: part.row0 as u32,
                n: table.n() as u32,
                zero_missing: u32::from(i == 0),
                _pad: [0; 3],
            };
            let params = self.uniform("embed", &params);
            let mut resources = vec![ids.clone(), out.clone()];
            resources.extend(part.buffers.iter().map(|b| b.as_entire_binding()));
            let workgroups = Workgroups(Dim::Fixed(k8.div_ceil(WG)), Dim::Tokens { group: 1 }, Dim::Fixed(1));
            self.dispatch("embed", pipeline.clone(), &params, &resources, workgroups);
        }
        Ok(())
    }
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
        let step = gpu.uniform("step", &Step::rows(t));
        let (idb, out) =
            (gpu.storage_init("ids", bytemuck::cast_slice(ids)), gpu.storage_init("out", bytemuck::cast_slice(init)));
        let rows = ids.len() as u32;
        let mut rec = Recorder::new(gpu, kernels, &step, rows).unwrap();
        rec.embed(table, Act::new(&idb, rows, 1), Act::new(&out, rows, table.k() as u32)).unwrap();
        let d = rec.finish();
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
            let split = QuantMatrix::upload_with_max_part(
                &gpu().0,
                "token_embd.weight",
                ty,
                k,
                n,
                &bytes,
                bytes.len() as u64 / 3,
            )
            .unwrap();
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
