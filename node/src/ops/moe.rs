//! The ops of a mixture-of-experts feed-forward (`qwen35moe.md`): the router's choice
//! (`moe_route`), the chosen experts' matrix products (`matmul_id`, llama.cpp's
//! MUL_MAT_ID) and their weighted sum with the shared expert (`moe_combine`). The expert
//! ids stay on the GPU from the router to the products: nothing is read back.
//!
//! A step's expert products run in one of two modes ([`IdMode`]): a decode step of one
//! row takes each chosen expert's rows for its one slot (`Indexed`); larger steps group
//! slots by expert (`Grouped`), so each chosen expert's weights are read once per step
//! however many rows chose it. Both sum each output in the same order, so a row's result
//! does not depend on what else shares its step.

use strata_shaders::Kernel;

use super::matmul::StepRows;
use super::recorder::{Act, Recorder};
use crate::gpu::{Dim, Workgroups};
use crate::weights::QuantMatrix;
use crate::{Error, Result};

/// Threads per workgroup of `moe_route` and `moe_combine` (their WGSL `WG`).
const ROUTE_WG: u32 = 64;
const COMBINE_WG: u32 = 256;

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct RouteParams {
    n_expert: u32,
    n_used: u32,
    _pad: [u32; 2],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct IdParams {
    k8: u32,
    rows: u32,
    n_used: u32,
    expert0: u32,
    experts: u32,
    x_per_slot: u32,
    _pad: [u32; 2],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct CombineParams {
    n: u32,
    n_used: u32,
    _pad: [u32; 2],
}

/// How `mm_id` walks a step's slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdMode {
    /// One workgroup column per slot: the expert's rows for that slot alone.
    Indexed,
    /// One workgroup column per expert, running every slot that chose it.
    Grouped,
}

impl IdMode {
    /// The mode for steps of `rows`' class: indexed for one row, grouped otherwise.
    pub fn for_rows(rows: StepRows) -> IdMode {
        if rows == StepRows::One { IdMode::Indexed } else { IdMode::Grouped }
    }
}

impl Recorder<'_> {
    /// `ids[t, j]`, `weights[t, j]`: each row's `n_used` experts with the largest of its
    /// `logits` (best first, ties to the lower id) and their softmax over the chosen.
    pub fn moe_route(&mut self, logits: Act<'_>, ids: Act<'_>, weights: Act<'_>, n_used: u32) -> Result<()> {
        let op = "moe_route";
        let n_expert = logits.width;
        if n_used == 0 || n_used > n_expert {
            return Err(Error::Shape { op, message: format!("{n_used} experts chosen of {n_expert}") });
        }
        let logits = self.bind_act(op, "logits", logits, n_expert)?;
        let ids = self.bind_act(op, "ids", ids, n_used)?;
        let weights = self.bind_act(op, "weights", weights, n_used)?;
        let params = self.uniform(op, &RouteParams { n_expert, n_used, _pad: [0; 2] });
        let pipeline = self.pipeline(Kernel::MOE_ROUTE, &[], &[])?;
        let workgroups = Workgroups(Dim::Tokens { group: ROUTE_WG }, Dim::Fixed(1), Dim::Fixed(1));
        self.dispatch(op, pipeline, &params, &[logits, ids, weights], workgroups);
        Ok(())
    }

    /// `out[t, j, :] = W_{ids[t, j]} x[t]` (or `x[t, j]` with `x_per_slot`) for the step's
    /// rows `t` and their chosen experts `j`; `w` holds the experts stacked
    /// ([`QuantMatrix::matrices`]). `out` has rows of `n_used` slots of one expert's rows.
    /// `mode`: [`IdMode::for_rows`] of the recording's class, or either (tests run both).
    pub fn matmul_id(
        &mut self,
        w: &QuantMatrix,
        x: Act<'_>,
        ids: Act<'_>,
        out: Act<'_>,
        x_per_slot: bool,
        mode: IdMode,
    ) -> Result<()> {
        let op = "matmul_id";
        let what = |part: &str| format!("{}: {part}", w.name());
        let (k, rows, experts) = (w.k() as u32, w.rows_per_matrix() as u32, w.matrices() as u32);
        let n_used = ids.width;
        if n_used == 0 || n_used > experts {
            return Err(Error::Shape { op, message: format!("{}: {n_used} experts chosen of {experts}", w.name()) });
        }
        let x_width = if x_per_slot { n_used * k } else { k };
        let x_binding = self.bind_act(op, &what("x"), x, x_width)?;
        let out_binding = self.bind_act(op, &what("out"), out, n_used * rows)?;
        let ids_binding = self.bind_act(op, &what("ids"), ids, n_used)?;
        let cpu = self.gpu().info.device_type == wgpu::DeviceType::Cpu;
        // CPU adapters run a workgroup as one thread's SIMD lanes: few lanes, more rows each.
        let (lanes, rows_per_lane) = if cpu { (8u32, 4u32) } else { (64, 1) };
        let grouped = mode == IdMode::Grouped;
        let consts = vec![
            ("WG", format!("{lanes}u")),
            ("R", format!("{rows_per_lane}u")),
            ("TB", "8u".to_owned()),
            ("GROUPED", format!("{}u", u32::from(grouped))),
        ];
        let pipeline = self.pipeline(Kernel::MM_ID, &[w.format()], &consts)?;
        let gx = rows.div_ceil(lanes * rows_per_lane);
        for part in w.parts() {
            let (expert0, part_experts) = ((part.row0 as u32) / rows, (part.rows as u32) / rows);
            let params = IdParams {
                k8: k / 8,
                rows,
                n_used,
                expert0,
                experts: part_experts,
                x_per_slot: x_per_slot.into(),
                _pad: [0; 2],
            };
            let params = self.uniform(op, &params);
            let mut resources = vec![(2, x_binding.clone()), (3, out_binding.clone()), (8, ids_binding.clone())];
            resources.extend(part.buffers.iter().enumerate().map(|(i, b)| (4 + i as u32, b.as_entire_binding())));
            let workgroups = match mode {
                IdMode::Indexed => Workgroups(Dim::Fixed(gx), Dim::Fixed(n_used), Dim::Tokens { group: 1 }),
                IdMode::Grouped => Workgroups::fixed(gx, part_experts, 1),
            };
            self.dispatch_at(op, pipeline.clone(), &params, &resources, workgroups);
        }
        Ok(())
    }

    /// `x[t] += sum_j weights[t, j] · experts[t, j] + sigmoid(gate[t]) · shared[t]`.
    pub fn moe_combine(
        &mut self,
        x: Act<'_>,
        experts: Act<'_>,
        weights: Act<'_>,
        shared: Act<'_>,
        gate: Act<'_>,
    ) -> Result<()> {
        let op = "moe_combine";
        let (n, n_used) = (x.width, weights.width);
        if n == 0 || n_used == 0 {
            return Err(Error::Shape { op, message: format!("rows of {n}, {n_used} experts") });
        }
        let resources = [
            self.bind_act(op, "x", x, n)?,
            self.bind_act(op, "experts", experts, n_used * n)?,
            self.bind_act(op, "weights", weights, n_used)?,
            self.bind_act(op, "shared", shared, n)?,
            self.bind_act(op, "gate", gate, 1)?,
        ];
        let params = self.uniform(op, &CombineParams { n, n_used, _pad: [0; 2] });
        let pipeline = self.pipeline(Kernel::MOE_COMBINE, &[], &[])?;
        let workgroups = Workgroups(Dim::Fixed(n.div_ceil(COMBINE_WG)), Dim::Tokens { group: 1 }, Dim::Fixed(1));
        self.dispatch(op, pipeline, &params, &resources, workgroups);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use strata_model::quant::dequantize;
    use strata_model::reference::moe::route;

    use super::*;
    use crate::ops::harness::{f32_buffer, record, run, step_buffer, u32_buffer};
    use crate::testing::{Rng, assert_close, gpu};
    use crate::weights::tests::{TYPES, random_weights};

    #[test]
    fn route_matches_the_reference_with_ties() {
        let (gpu, _) = gpu();
        let mut rng = Rng::new(5);
        let (n_expert, n_used, t) = (40u32, 6u32, 5u32);
        let mut logits = rng.vec((n_expert * t) as usize, 3.0);
        // Row 1: ties across the boundary of the chosen; row 2: all equal.
        for e in [3usize, 9, 17, 30, 31, 35, 38] {
            logits[n_expert as usize + e] = 7.5;
        }
        logits[2 * n_expert as usize..3 * n_expert as usize].fill(0.25);
        let step = step_buffer(gpu);
        let lb = f32_buffer(gpu, &logits);
        let (ib, wb) =
            (u32_buffer(gpu, &vec![0; (t * n_used) as usize]), f32_buffer(gpu, &vec![0.0; (t * n_used) as usize]));
        let d = record(&step, t, |rec| {
            rec.moe_route(Act::new(&lb, t, n_expert), Act::new(&ib, t, n_used), Act::new(&wb, t, n_used), n_used)
        })
        .unwrap();
        run(gpu, &step, &d, t);
        let (ids, weights) =
            (gpu.read_u32(&ib, (t * n_used) as usize).unwrap(), gpu.read_f32(&wb, (t * n_used) as usize).unwrap());
        for row in 0..t as usize {
            let want = route(&logits[row * n_expert as usize..(row + 1) * n_expert as usize], n_used as usize);
            let got_ids = &ids[row * n_used as usize..(row + 1) * n_used as usize];
            let want_ids: Vec<u32> = want.iter().map(|p| p.0 as u32).collect();
            assert_eq!(got_ids, want_ids, "row {row}");
            let want_w: Vec<f32> = want.iter().map(|p| p.1).collect();
            assert_close(&weights[row * n_used as usize..(row + 1) * n_used as usize], &want_w, 1e-6, 1e-5, "weights");
        }
        assert_eq!(&ids[n_used as usize..2 * n_used as usize], [3, 9, 17, 30, 31, 35]);
        assert_eq!(&ids[2 * n_used as usize..3 * n_used as usize], [0, 1, 2, 3, 4, 5]);
    }

    /// The CPU twin of `matmul_id`: `out[v, r] = W_{ids[v]}[r] · x[xrow(v)]`.
    fn cpu_matmul_id(
        wf: &[f32],
        k: usize,
        rows: usize,
        x: &[f32],
        ids: &[u32],
        n_used: usize,
        per_slot: bool,
    ) -> Vec<f32> {
        let mut out = Vec::new();
        for (v, &e) in ids.iter().enumerate() {
            let xr = if per_slot { v } else { v / n_used };
            let xv = &x[xr * k..(xr + 1) * k];
            for r in 0..rows {
                let w = &wf[(e as usize * rows + r) * k..(e as usize * rows + r + 1) * k];
                out.push(w.iter().zip(xv).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum::<f64>() as f32);
            }
        }
        out
    }

    #[test]
    fn matmul_id_matches_cpu_for_every_type_mode_and_routing() {
        let (gpu, _) = gpu();
        let mut rng = Rng::new(9);
        let (n_exp, n_used, rows) = (6usize, 2usize, 37usize);
        for ty in TYPES {
            let k = if ty.block_len() == 256 { 256 } else { 64 };
            let bytes = random_weights(&mut rng, ty, k, rows * n_exp);
            let wf = dequantize(ty, &bytes).unwrap();
            // Whole parts of two experts each, so that the dispatch runs once per part.
            let part = bytes.len() as u64 / 3 + 64;
            let w = QuantMatrix::upload_experts(gpu, "experts", ty, (k, rows, n_exp), &bytes, part).unwrap();
            assert!(w.parts().len() >= 2 && w.parts().iter().all(|p| p.rows % rows == 0), "{ty}: parts");
            for (t, routing) in [(1usize, "one"), (5, "all the same"), (3, "all different"), (9, "random")] {
                let ids: Vec<u32> = (0..t * n_used)
                    .map(|v| match routing {
                        "all the same" => 4,
                        "all different" => v as u32,
                        _ => rng.below(n_exp as u64) as u32,
                    })
                    .collect();
                for per_slot in [false, true] {
                    let x_rows = if per_slot { t * n_used } else { t };
                    let x = rng.vec(x_rows * k, 1.0);
                    let want = cpu_matmul_id(&wf, k, rows, &x, &ids, n_used, per_slot);
                    let mut results = Vec::new();
                    for mode in [IdMode::Indexed, IdMode::Grouped] {
                        let step = step_buffer(gpu);
                        let xb = f32_buffer(gpu, &x);
                        let ib = u32_buffer(gpu, &ids);
                        let ob = f32_buffer(gpu, &vec![0.0; t * n_used * rows]);
                        let xw = if per_slot { (n_used * k) as u32 } else { k as u32 };
                        let d = record(&step, t as u32, |rec| {
                            rec.matmul_id(
                                &w,
                                Act::new(&xb, t as u32, xw),
                                Act::new(&ib, t as u32, n_used as u32),
                                Act::new(&ob, t as u32, (n_used * rows) as u32),
                                per_slot,
                                mode,
                            )
                        })
                        .unwrap();
                        run(gpu, &step, &d, t as u32);
                        let got = gpu.read_f32(&ob, want.len()).unwrap();
                        let what = format!("{ty} t={t} {routing} per_slot={per_slot} {mode:?}");
                        assert_close(&got, &want, 2e-4, 2e-4, &what);
                        results.push(got);
                    }
                    assert_eq!(results[0], results[1], "{ty} {routing}: the modes sum differently");
                }
            }
        }
    }

    #[test]
    fn combine_adds_the_weighted_experts_and_the_gated_shared_expert() {
        let (gpu, _) = gpu();
        let mut rng = Rng::new(11);
        let (n, n_used, t, max) = (300usize, 3usize, 2usize, 3usize);
        let x = rng.vec(max * n, 1.0);
        let experts = rng.vec(max * n_used * n, 1.0);
        let weights = rng.vec(max * n_used, 1.0);
        let shared = rng.vec(max * n, 1.0);
        let gate = rng.vec(max, 2.0);
        let step = step_buffer(gpu);
        let b = |v: &[f32]| f32_buffer(gpu, v);
        let (xb, eb, wb, sb, gb) = (b(&x), b(&experts), b(&weights), b(&shared), b(&gate));
        let d = record(&step, max as u32, |rec| {
            let a = |buf, w| Act::new(buf, max as u32, w as u32);
            rec.moe_combine(a(&xb, n), a(&eb, n_used * n), a(&wb, n_used), a(&sb, n), a(&gb, 1))
        })
        .unwrap();
        run(gpu, &step, &d, t as u32);
        let got = gpu.read_f32(&xb, max * n).unwrap();
        let mut want = x.clone();
        for tok in 0..t {
            let g = 1.0 / (1.0 + (-f64::from(gate[tok])).exp());
            for c in 0..n {
                let moe: f64 = (0..n_used)
                    .map(|j| f64::from(weights[tok * n_used + j]) * f64::from(experts[(tok * n_used + j) * n + c]))
                    .sum();
                want[tok * n + c] = (f64::from(x[tok * n + c]) + moe + g * f64::from(shared[tok * n + c])) as f32;
            }
        }
        assert_close(&got, &want, 1e-5, 1e-5, "moe_combine");
        let err = record(&step, max as u32, |rec| {
            let a = |buf, w| Act::new(buf, max as u32, w as u32);
            rec.moe_combine(a(&xb, n), a(&eb, n), a(&wb, n_used), a(&sb, n), a(&gb, 1))
        })
        .unwrap_err();
        assert!(err.to_string().contains("`experts` has rows of"), "{err}");
    }
}
