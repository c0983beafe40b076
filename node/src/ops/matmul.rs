//! `out = x W^T` (or `out += x W^T`) for a quantised weight matrix `W`.
//!
//! One token (decode) uses the matrix-vector kernel `mm_vec`; a batch (prefill) the tiled
//! matrix-matrix kernel `mm_mat`. Both read `W` in its repacked quantised form through
//! its weight-format prelude, and run once per part of a split matrix.

use strata_shaders::Kernel;

use super::recorder::{Act, Recorder};
use crate::Result;
use crate::gpu::{Dim, Gpu, Workgroups};
use crate::weights::QuantMatrix;

/// `mm_mat`: rows and tokens per workgroup tile, rows per thread in vec4s, and k values
/// per step (its WGSL constants TN, TT, RV, KC). Each thread holds 8 rows x 4 tokens;
/// shared memory is 4 * KC * (TN + TT) = 10 KiB, within WebGPU's 16 KiB default.
const MAT_ROWS: u32 = 128;
const MAT_TOKENS: u32 = 32;
const MAT_ROW_VEC4S: u32 = 2;
const MAT_K_STEP: u32 = 16;

/// The most workgroups a dispatch may have along one dimension.
const MAX_GROUPS: u32 = 65535;

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct Params {
    k8: u32,
    rows: u32,
    n: u32,
    row0: u32,
    accumulate: u32,
    groups_x: u32,
    _pad: [u32; 2],
}

/// The decode kernel's variant and shape, and the grid limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Plan {
    /// `mm_vec_sg` (subgroup adds) rather than `mm_vec` (shared memory only).
    subgroups: bool,
    /// Threads per workgroup.
    threads: u32,
    /// Rows per workgroup.
    rows: u32,
    /// Workgroups along x before the grid grows along y (tests lower it).
    max_groups: u32,
}

impl Plan {
    fn for_adapter(gpu: &Gpu) -> Plan {
        let subgroups = gpu.features.contains(wgpu::Features::SUBGROUP);
        if gpu.info.device_type == wgpu::DeviceType::Cpu {
            // CPU adapters (lavapipe) run a workgroup as SIMD lanes of one thread, where
            // barriers and gathers cost most: one small workgroup per 8 rows measured
            // about twice as fast there as 64 threads per 4 rows.
            Plan { subgroups, threads: 8, rows: 8, max_groups: MAX_GROUPS }
        } else {
            Plan { subgroups, threads: 64, rows: 4, max_groups: MAX_GROUPS }
        }
    }

    fn kernel(self) -> Kernel {
        if self.subgroups { Kernel::MM_VEC_SG } else { Kernel::MM_VEC }
    }
}

/// `groups` workgroups as a 2-D grid of at most `max` along x.
fn grid(groups: u32, max: u32) -> (u32, u32) {
    let x = groups.clamp(1, max);
    (x, groups.div_ceil(x))
}

impl Recorder<'_> {
    /// Records `out[t] (+)= W x[t]` for the first `step.n_tokens` tokens.
    ///
    /// `x`: rows of `w.k()`; `out`: rows of `w.n()`. With `accumulate`, adds to `out`
    /// (fusing a residual add). A recorder for one token builds the decode kernel, with a
    /// fixed number of workgroups; otherwise the prefill kernel, whose workgroups follow
    /// the step's token count.
    pub fn matmul(&mut self, w: &QuantMatrix, x: Act<'_>, out: Act<'_>, accumulate: bool) -> Result<()> {
        let plan = Plan::for_adapter(self.gpu());
        self.matmul_with(w, x, out, accumulate, plan)
    }

    fn matmul_with(&mut self, w: &QuantMatrix, x: Act<'_>, out: Act<'_>, accumulate: bool, plan: Plan) -> Result<()> {
        let what = |part: &str| format!("{}: {part}", w.name());
        let (k, n) = (w.k() as u32, w.n() as u32);
        let x_binding = self.bind_act("matmul", &what("x"), x, k)?;
        let out_binding = self.bind_act("matmul", &what("out"), out, n)?;
        let decode = self.max_tokens() == 1;
        let (kernel, label, consts, tile_rows) = if decode {
            let consts = vec![("WG", format!("{}u", plan.threads)), ("ROWS", format!("{}u", plan.rows))];
            (plan.kernel(), "matmul_vec", consts, plan.rows)
        } else {
            let threads = MAT_ROWS / (4 * MAT_ROW_VEC4S) * MAT_TOKENS / 4;
            let consts = vec![
                ("TN", format!("{MAT_ROWS}u")),
                ("TT", format!("{MAT_TOKENS}u")),
                ("RV", format!("{MAT_ROW_VEC4S}u")),
                ("WG", format!("{threads}u")),
                ("KC", format!("{MAT_K_STEP}u")),
            ];
            (Kernel::MM_MAT, "matmul_mat", consts, MAT_ROWS)
        };
        let pipeline = self.pipeline(kernel, Some(w.format()), &consts)?;
        for part in w.parts() {
            let (gx, gy) = grid((part.rows as u32).div_ceil(tile_rows), plan.max_groups);
            let params = Params {
                k8: k / 8,
                rows: part.rows as u32,
                n,
                row0: part.row0 as u32,
                accumulate: accumulate.into(),
                groups_x: gx,
                _pad: [0; 2],
            };
            let params = self.uniform(label, &params);
            let mut resources = vec![x_binding.clone(), out_binding.clone()];
            resources.extend(part.buffers.iter().map(|b| b.as_entire_binding()));
            let tokens = if decode { Dim::Fixed(1) } else { Dim::Tokens { group: MAT_TOKENS } };
            self.dispatch(
                label,
                pipeline.clone(),
                &params,
                &resources,
                Workgroups(Dim::Fixed(gx), Dim::Fixed(gy), tokens),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {

    use strata_model::quant::{GgmlType, dequantize};

    use super::*;
    use crate::Error;
    use crate::gpu::{Dispatch, Step, encode_dispatches};
    use crate::testing::{Rng, assert_close, gpu};
    use crate::weights::tests::{TYPES, random_weights};

    fn step(gpu: &Gpu, n_tokens: u32) -> wgpu::Buffer {
        gpu.uniform("step", &Step { n_tokens, _pad: [0; 3] })
    }

    fn f32_buffer(gpu: &Gpu, values: &[f32]) -> wgpu::Buffer {
        gpu.storage_init("f32", bytemuck::cast_slice(values))
    }

    fn submit(gpu: &Gpu, dispatches: &[Dispatch], n_tokens: u32) {
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        encode_dispatches(&mut enc, dispatches, n_tokens);
        gpu.queue.submit([enc.finish()]);
    }

    /// `out` after running `matmul` on `t` of `max_tokens` tokens, `out` first set to `init`.
    fn gpu_matmul(w: &QuantMatrix, x: &[f32], init: &[f32], t: u32, max_tokens: u32, accumulate: bool) -> Vec<f32> {
        gpu_matmul_with(w, x, init, t, max_tokens, accumulate, Plan::for_adapter(&gpu().0))
    }

    fn gpu_matmul_with(
        w: &QuantMatrix,
        x: &[f32],
        init: &[f32],
        t: u32,
        max_tokens: u32,
        accumulate: bool,
        plan: Plan,
    ) -> Vec<f32> {
        let (gpu, kernels) = gpu();
        let (xb, out, step) = (f32_buffer(gpu, x), f32_buffer(gpu, init), step(gpu, t));
        let mut rec = Recorder::new(gpu, kernels, &step, max_tokens).unwrap();
        let (xa, oa) = (Act::new(&xb, max_tokens, w.k() as u32), Act::new(&out, max_tokens, w.n() as u32));
        rec.matmul_with(w, xa, oa, accumulate, plan).unwrap();
        let d = rec.finish();
        assert_eq!(d.len(), w.parts().len());
        submit(gpu, &d, t);
        gpu.read_f32(&out, init.len()).unwrap()
    }

    /// The CPU twin for `rows` of the dequantised `[k, n]` matrix `wf`: out for the first
    /// `t` tokens, and each output's magnitude (sum of |terms|) to scale the tolerance.
    fn cpu_matmul(
        wf: &[f32],
        k: usize,
        rows: &[usize],
        x: &[f32],
        init: &[f32],
        t: usize,
        accumulate: bool,
    ) -> (Vec<f32>, Vec<f32>) {
        let n = init.len() / (x.len() / k);
        let (mut want, mut mag) = (Vec::new(), Vec::new());
        for tok in 0..t {
            for &r in rows {
                let (w, x) = (&wf[r * k..(r + 1) * k], &x[tok * k..(tok + 1) * k]);
                let mut dot: f64 = w.iter().zip(x).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
                let mut m: f64 = w.iter().zip(x).map(|(&a, &b)| f64::from(a * b).abs()).sum();
                if accumulate {
                    dot += f64::from(init[tok * n + r]);
                    m += f64::from(init[tok * n + r].abs());
                }
                want.push(dot as f32);
                mag.push(m.max(1e-30) as f32);
            }
        }
        (want, mag)
    }

    /// Asserts `got` matches `want` to 1e-4 of each output's magnitude.
    #[track_caller]
    fn assert_rows_close(got: &[f32], want: &[f32], mag: &[f32], what: &str) {
        let scaled = |v: &[f32]| v.iter().zip(mag).map(|(a, m)| a / m).collect::<Vec<f32>>();
        assert_close(&scaled(got), &scaled(want), 1e-4, 0.0, what);
    }

    /// `k` values per row that `ty` can hold, SmolLM2's 576 where its blocks allow.
    fn widths(ty: GgmlType) -> [usize; 2] {
        if ty.block_len() == 256 { [256, 768] } else { [256, 576] }
    }

    /// Every decode variant this adapter can run, in both shapes, some with a tiny grid
    /// limit so that the group index wraps into y with groups left over.
    fn plans() -> Vec<Plan> {
        let subgroups = gpu().0.features.contains(wgpu::Features::SUBGROUP);
        let mut plans = Vec::new();
        for sg in [false, true].into_iter().filter(|&sg| !sg || subgroups) {
            plans.push(Plan { subgroups: sg, threads: 8, rows: 8, max_groups: MAX_GROUPS });
            plans.push(Plan { subgroups: sg, threads: 64, rows: 4, max_groups: 5 });
        }
        plans
    }

    #[test]
    fn matmul_matches_cpu_for_every_type() {
        let mut rng = Rng::new(42);
        let n = 131; // not a multiple of the rows per workgroup of any plan, nor of mm_mat's 128
        for ty in TYPES {
            for k in widths(ty) {
                let bytes = random_weights(&mut rng, ty, k, n);
                let wf = dequantize(ty, &bytes).unwrap();
                let w = QuantMatrix::upload(&gpu().0, "w", ty, k, n, &bytes).unwrap();
                let rows: Vec<usize> = (0..n).collect();
                // max_tokens 1: every mm_vec plan; else mm_mat, with a partial token tile,
                // a step shorter than the bound batch, and a grid wrapped into y.
                let runs = plans().into_iter().map(|p| (1, 1, p)).chain([
                    (3, 3, Plan::for_adapter(&gpu().0)),
                    (33, 35, Plan { max_groups: 1, ..Plan::for_adapter(&gpu().0) }),
                ]);
                for (t, max_tokens, plan) in runs {
                    for accumulate in [false, true] {
                        let x = rng.vec(max_tokens * k, 1.0);
                        let init = rng.vec(max_tokens * n, 1.0);
                        let got = gpu_matmul_with(&w, &x, &init, t as u32, max_tokens as u32, accumulate, plan);
                        let (want, mag) = cpu_matmul(&wf, k, &rows, &x, &init, t, accumulate);
                        let what = format!("{ty} k={k} n={n} t={t} accumulate={accumulate} {plan:?}");
                        assert_rows_close(&got[..t * n], &want, &mag, &what);
                        assert_eq!(&got[t * n..], &init[t * n..], "{what}: tokens past the step were written");
                    }
                }
            }
        }
    }

    #[test]
    fn split_matrix_matches_cpu_for_every_type() {
        let mut rng = Rng::new(3);
        let n = 150;
        for ty in TYPES {
            let k = 256;
            let bytes = random_weights(&mut rng, ty, k, n);
            let wf = dequantize(ty, &bytes).unwrap();
            let w = QuantMatrix::upload_with_max_part(&gpu().0, "w", ty, k, n, &bytes, bytes.len() as u64 / 4).unwrap();
            assert!(w.parts().len() >= 4, "{ty}: {} parts", w.parts().len());
            let rows: Vec<usize> = (0..n).collect();
            for t in [1, 5] {
                let x = rng.vec(t * k, 1.0);
                let init = rng.vec(t * n, 1.0);
                let got = gpu_matmul(&w, &x, &init, t as u32, t as u32, true);
                let (want, mag) = cpu_matmul(&wf, k, &rows, &x, &init, t, true);
                assert_rows_close(&got, &want, &mag, &format!("split {ty} t={t}"));
            }
        }
    }

    /// Random Q8_0 bytes, made fast: whole words of random quants, then sane scales.
    fn fast_q8_0(rng: &mut Rng, k: usize, n: usize) -> Vec<u8> {
        let mut bytes: Vec<u8> =
            (0..(k * n / 32 * 34).div_ceil(8)).flat_map(|_| rng.next_u64().to_le_bytes()).collect();
        bytes.truncate(k * n / 32 * 34);
        for block in bytes.chunks_exact_mut(34) {
            let d = 1e-3 + (block[2] as f32 / 255.0) * 19e-3;
            block[..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
        }
        bytes
    }

    #[test]
    fn matrix_larger_than_one_binding_is_split() {
        let (gpu, _) = gpu();
        let mut rng = Rng::new(9);
        let k = 4096;
        // Quants just past one binding: lavapipe's whole 128 MiB (about 147 MB of Q8_0);
        // adapters with larger bindings split at 128 MiB here, to keep the test small.
        let binding = gpu.max_binding().min(128 << 20);
        let n = (binding / k as u64 + 1000) as usize;
        let bytes = fast_q8_0(&mut rng, k, n);
        let w = QuantMatrix::upload_with_max_part(gpu, "output.weight", GgmlType::Q8_0, k, n, &bytes, binding).unwrap();
        assert!(w.parts().len() > 1, "{} parts", w.parts().len());
        assert!(w.bytes() > binding);
        let x = rng.vec(k, 1.0);
        let init = rng.vec(n, 1.0);
        let got = gpu_matmul(&w, &x, &init, 1, 1, true);
        // Rows on either side of each part boundary, and some others.
        let mut rows = vec![0, n - 1];
        for p in &w.parts()[1..] {
            rows.extend([p.row0 - 1, p.row0]);
        }
        rows.extend((0..16).map(|_| rng.below(n as u64) as usize));
        let row_bytes = k / 32 * 34;
        let wf: Vec<f32> = rows
            .iter()
            .flat_map(|&r| dequantize(GgmlType::Q8_0, &bytes[r * row_bytes..(r + 1) * row_bytes]).unwrap())
            .collect();
        let init_rows: Vec<f32> = rows.iter().map(|&r| init[r]).collect();
        let (want, mag) = cpu_matmul(&wf, k, &(0..rows.len()).collect::<Vec<_>>(), &x, &init_rows, 1, true);
        let got: Vec<f32> = rows.iter().map(|&r| got[r]).collect();
        assert_rows_close(&got, &want, &mag, "split output head");
    }

    #[test]
    fn matmul_rejects_small_buffers() {
        let (gpu, kernels) = gpu();
        let bytes = random_weights(&mut Rng::new(1), GgmlType::Q8_0, 64, 4);
        let w = QuantMatrix::upload(gpu, "w", GgmlType::Q8_0, 64, 4, &bytes).unwrap();
        let (x, out, step) = (gpu.storage("x", 64 * 4 * 2), gpu.storage("out", 4 * 4), step(gpu, 1));
        let mut rec = Recorder::new(gpu, kernels, &step, 2).unwrap();
        let err = rec.matmul(&w, Act::new(&x, 2, 64), Act::new(&out, 2, 4), false).unwrap_err();
        assert!(matches!(err, Error::Shape { .. }) && err.to_string().contains("out` holds 16 bytes"), "{err}");
        let err = rec.matmul(&w, Act::new(&x, 2, 32), Act::new(&out, 2, 4), false).unwrap_err();
        assert!(err.to_string().contains("rows of 32, needs 64"), "{err}");
        let mut rec = Recorder::new(gpu, kernels, &step, 1).unwrap();
        assert!(rec.matmul(&w, Act::new(&x, 2, 64), Act::new(&out, 2, 4), false).is_ok());
    }
}
