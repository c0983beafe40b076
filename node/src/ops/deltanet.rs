//! The Gated DeltaNet mixer of qwen35 (see `qwen35.md`), after its input projections:
//! [`conv`] (causal depthwise conv, SiLU, L2 norm of q and k), [`delta_rule`] (gates and
//! the recurrence over a [`DeltaNetState`]) and [`gated_norm`]. Decode and prefill rows of
//! any sequences use the same dispatches: each sequence's rows advance its own state (its
//! slot), the recurrence running a sequence's rows in order inside the kernel.

use strata_shaders::Kernel;

use super::recorder::{Act, Recorder};
use crate::deltanet_state::DeltaNetState;
use crate::gpu::{Dim, Workgroups};
use crate::{Error, Result};

/// Threads per workgroup of `deltanet_conv`, `deltanet_conv_state` and `deltanet_gated_norm`.
const WG: u32 = 64;

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct ConvParams {
    channels: u32,
    head_dim: u32,
    kernel: u32,
    norm_heads: u32,
    q_heads: u32,
    eps: f32,
    q_scale: f32,
    _pad: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct ConvStateParams {
    channels: u32,
    kernel: u32,
    _pad: [u32; 2],
}

impl Recorder<'_> {
    /// The conv of the step's projected `qkv` (rows of `channels`: q then k then v heads)
    /// into `out` (same shape): per channel the causal depthwise conv with `weight` (f32
    /// `[channels, conv_kernel]`, the last tap on the current input) over each row's
    /// sequence's history (its slot of the state) and earlier rows, then SiLU; then each q
    /// and k head divided by `sqrt(sum(x^2) + eps)`, q heads also by `sqrt(head_dim)`. A
    /// second dispatch then advances each sequence's conv history past its rows. `batch`:
    /// the step's rows and sequences ([`crate::batch`]).
    pub fn deltanet_conv(
        &mut self,
        state: &DeltaNetState,
        qkv: Act<'_>,
        weight: &wgpu::Buffer,
        out: Act<'_>,
        batch: StepBatch<'_>,
        eps: f32,
    ) -> Result<()> {
        let op = "deltanet conv";
        let cfg = state.config();
        let (channels, head_dim, kernel) = (cfg.conv_channels() as u32, cfg.head_dim as u32, cfg.conv_kernel as u32);
        if qkv.same_buffer(&out) {
            return Err(Error::Shape { op, message: "out must not be qkv: later tokens read earlier inputs".into() });
        }
        let qkv_binding = self.bind_act(op, "qkv", qkv, channels)?;
        let out = self.bind_act(op, "out", out, channels)?;
        let weight = self.bind(op, "weight", weight, u64::from(channels * kernel) * 4)?;
        let nk = cfg.n_key_heads as u32;
        let params = ConvParams {
            channels,
            head_dim,
            kernel,
            norm_heads: 2 * nk,
            q_heads: nk,
            eps,
            q_scale: 1.0 / (head_dim as f32).sqrt(),
            _pad: 0,
        };
        let params = self.uniform("deltanet_conv", &params);
        let pipeline = self.pipeline(Kernel::DELTANET_CONV, &[], &[])?;
        let heads = channels / head_dim;
        let rows = self.bind_act(op, "rows", batch.rows, 4)?;
        let seqs = self.bind(op, "seqs", batch.seqs, batch.seqs.size())?;
        let workgroups = Workgroups(Dim::Fixed(heads), Dim::Tokens { group: 1 }, Dim::Fixed(1));
        let resources = [rows, qkv_binding.clone(), weight, state.conv().as_entire_binding(), out];
        self.dispatch("deltanet_conv", pipeline, &params, &resources, workgroups);

        let params = self.uniform("deltanet_conv_state", &ConvStateParams { channels, kernel, _pad: [0; 2] });
        let pipeline = self.pipeline(Kernel::DELTANET_CONV_STATE, &[], &[])?;
        let workgroups = Workgroups(Dim::Fixed(channels.div_ceil(WG)), Dim::Seqs { group: 1 }, Dim::Fixed(1));
        self.dispatch(
            "deltanet_conv_state",
            pipeline,
            &params,
            &[seqs, qkv_binding, state.conv().as_entire_binding(), state.rollback().0.as_entire_binding()],
            workgroups,
        );
        Ok(())
    }
}

/// Where a step's rows and sequences are described ([`crate::batch`]): per row a
/// `RowInfo` (4 words), per sequence a `SeqInfo`, as many as the stage's steps may hold.
#[derive(Debug, Clone, Copy)]
pub struct StepBatch<'a> {
    pub rows: Act<'a>,
    pub seqs: &'a wgpu::Buffer,
}

/// The per-row gate inputs of [`delta_rule`].
#[derive(Debug, Clone, Copy)]
pub struct Gates<'a> {
    /// Rows of `n_value_heads`: `beta = sigmoid(b)`.
    pub b: Act<'a>,
    /// Rows of `n_value_heads`: `g = ssm_a * softplus(a + dt_bias)`.
    pub a: Act<'a>,
    /// f32 `[2, n_value_heads]`: the layer's `ssm_a` (already `-exp(A_log)`), then its
    /// `ssm_dt.bias`.
    pub consts: &'a wgpu::Buffer,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct StateParams {
    n_key_heads: u32,
    n_value_heads: u32,
    channels: u32,
    _pad: u32,
}

/// Columns of the state per workgroup of `deltanet_state` (one thread each), at most.
const STATE_COLS: u32 = 64;

impl Recorder<'_> {
    /// The delta rule over each sequence's rows of the step in order, from the conv's
    /// output `y` (rows of `channels`: L2-normed q and k per key head, v per value head):
    /// for each value head `h` with key head `h mod n_key_heads`, `S = exp(g) S; d = beta
    /// (v - S^T k); S += k d^T; out = S^T q`, updating the sequence's matrices (its slot).
    /// `out`: rows of `n_value_heads * head_dim`; `seqs`: the step's `SeqInfo`s.
    pub fn delta_rule(
        &mut self,
        state: &DeltaNetState,
        y: Act<'_>,
        gates: Gates<'_>,
        out: Act<'_>,
        seqs: &wgpu::Buffer,
    ) -> Result<()> {
        let op = "deltanet delta_rule";
        let cfg = state.config();
        let (channels, nv, dk) = (cfg.conv_channels() as u32, cfg.n_value_heads as u32, cfg.head_dim as u32);
        if y.same_buffer(&out) {
            return Err(Error::Shape { op, message: "out must not be y".into() });
        }
        let resources = [
            self.bind(op, "seqs", seqs, seqs.size())?,
            self.bind_act(op, "y", y, channels)?,
            self.bind_act(op, "b", gates.b, nv)?,
            self.bind_act(op, "a", gates.a, nv)?,
            self.bind(op, "gate consts", gates.consts, u64::from(2 * nv) * 4)?,
            state.matrices().as_entire_binding(),
            self.bind_act(op, "out", out, nv * dk)?,
            state.rollback().1.as_entire_binding(),
        ];
        let params = StateParams { n_key_heads: cfg.n_key_heads as u32, n_value_heads: nv, channels, _pad: 0 };
        let params = self.uniform("deltanet_state", &params);
        let cols = STATE_COLS.min(dk);
        let consts = [("DK", format!("{dk}u")), ("COLS", format!("{cols}u"))];
        let pipeline = self.pipeline(Kernel::DELTANET_STATE, &[], &consts)?;
        let workgroups = Workgroups(Dim::Fixed(nv), Dim::Fixed(dk.div_ceil(cols)), Dim::Seqs { group: 1 });
        self.dispatch("deltanet_state", pipeline, &params, &resources, workgroups);
        Ok(())
    }
}

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct NormParams {
    head_dim: u32,
    n_heads: u32,
    eps: f32,
    _pad: u32,
}

impl Recorder<'_> {
    /// `o = o / sqrt(mean(o^2) + eps) * weight * silu(z)` per head of `head_dim`, in place.
    /// `o`, `z`: rows of `n_heads * head_dim`; `weight`: f32 `[head_dim]`.
    pub fn gated_norm(&mut self, o: Act<'_>, z: Act<'_>, weight: &wgpu::Buffer, head_dim: u32, eps: f32) -> Result<()> {
        let op = "deltanet gated_norm";
        if head_dim == 0 || o.width == 0 || !o.width.is_multiple_of(head_dim) || o.same_buffer(&z) {
            return Err(Error::Shape {
                op,
                message: format!("rows of {} in heads of {head_dim}, o and z distinct", o.width),
            });
        }
        let n_heads = o.width / head_dim;
        let resources = [
            self.bind_act(op, "o", o, o.width)?,
            self.bind_act(op, "z", z, o.width)?,
            self.bind(op, "weight", weight, u64::from(head_dim) * 4)?,
        ];
        let params = self.uniform("deltanet_gated_norm", &NormParams { head_dim, n_heads, eps, _pad: 0 });
        let pipeline = self.pipeline(Kernel::DELTANET_GATED_NORM, &[], &[])?;
        let workgroups = Workgroups(Dim::Fixed(n_heads), Dim::Tokens { group: 1 }, Dim::Fixed(1));
        self.dispatch("deltanet_gated_norm", pipeline, &params, &resources, workgroups);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use strata_model::config::DeltaNetConfig;

    use super::*;
    use crate::batch::{BatchLayout, Run};
    use crate::gpu::{Dispatch, Step};
    use crate::ops::harness::{f32_buffer, record, run, run_step, step_buffer};
    use crate::testing::{Rng, assert_close, gpu};

    fn config(n_key_heads: usize, n_value_heads: usize, head_dim: usize) -> DeltaNetConfig {
        DeltaNetConfig { conv_kernel: 4, n_key_heads, n_value_heads, head_dim }
    }

    fn silu(x: f64) -> f64 {
        x / (1.0 + (-x).exp())
    }

    fn softplus(x: f64) -> f64 {
        if x > 20.0 { x } else { x.exp().ln_1p() }
    }

    /// The conv's CPU twin: `t` tokens of `qkv` after the history `hist` ([K-1, C], oldest
    /// first). Returns the normed output and the new history.
    fn cpu_conv(
        cfg: &DeltaNetConfig,
        eps: f32,
        qkv: &[f32],
        t: usize,
        w: &[f32],
        hist: &[f32],
    ) -> (Vec<f32>, Vec<f32>) {
        let (c, kk, dk, nk) = (cfg.conv_channels(), cfg.conv_kernel, cfg.head_dim, cfg.n_key_heads);
        // Rows of inputs: the history, then the step's tokens.
        let all: Vec<f32> = hist.iter().chain(&qkv[..t * c]).copied().collect();
        let mut y = vec![0f64; t * c];
        for tok in 0..t {
            for ch in 0..c {
                let acc: f64 = (0..kk).map(|j| f64::from(w[ch * kk + j]) * f64::from(all[(tok + j) * c + ch])).sum();
                y[tok * c + ch] = silu(acc);
            }
            for head in 0..2 * nk {
                let row = &mut y[tok * c + head * dk..][..dk];
                let mut scale = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() + f64::from(eps)).sqrt();
                if head < nk {
                    scale /= (dk as f64).sqrt();
                }
                row.iter_mut().for_each(|v| *v *= scale);
            }
        }
        (y.iter().map(|&v| v as f32).collect(), all[t * c..].to_vec())
    }

    /// The delta rule's CPU twin over `t` tokens, updating `s` ([nv, dk, dk], f64).
    fn cpu_delta_rule(cfg: &DeltaNetConfig, x: &Inputs, s: &mut [f64], t: usize) -> Vec<f32> {
        let Inputs { y, b, a, ssm_a, dt_bias } = x;
        let (c, nk, nv, dk) = (cfg.conv_channels(), cfg.n_key_heads, cfg.n_value_heads, cfg.head_dim);
        let mut out = vec![0f32; t * nv * dk];
        for tok in 0..t {
            let row = &y[tok * c..(tok + 1) * c];
            for h in 0..nv {
                let kh = h % nk;
                let q = &row[kh * dk..][..dk];
                let k = &row[(nk + kh) * dk..][..dk];
                let v = &row[(2 * nk + h) * dk..][..dk];
                let beta = 1.0 / (1.0 + (-f64::from(b[tok * nv + h])).exp());
                let decay = (f64::from(ssm_a[h]) * softplus(f64::from(a[tok * nv + h]) + f64::from(dt_bias[h]))).exp();
                let sh = &mut s[h * dk * dk..(h + 1) * dk * dk];
                sh.iter_mut().for_each(|x| *x *= decay);
                for j in 0..dk {
                    let kv: f64 = (0..dk).map(|i| sh[i * dk + j] * f64::from(k[i])).sum();
                    let d = beta * (f64::from(v[j]) - kv);
                    (0..dk).for_each(|i| sh[i * dk + j] += f64::from(k[i]) * d);
                    let o: f64 = (0..dk).map(|i| sh[i * dk + j] * f64::from(q[i])).sum();
                    out[(tok * nv + h) * dk + j] = o as f32;
                }
            }
        }
        out
    }

    fn write(buffer: &wgpu::Buffer, values: &[f32]) {
        gpu().0.queue.write_buffer(buffer, 0, bytemuck::cast_slice(values));
    }

    /// The step's row and sequence tables, for steps of up to `max_tokens` rows and
    /// `max_seqs` sequences.
    struct Tables {
        rows: wgpu::Buffer,
        seqs: wgpu::Buffer,
        max_tokens: u32,
    }

    impl Tables {
        fn new(max_tokens: u32, max_seqs: u32) -> Tables {
            let (gpu, _) = gpu();
            Tables {
                rows: gpu.storage("rows", u64::from(max_tokens) * 16),
                seqs: gpu.storage("seqs", u64::from(max_seqs) * 16),
                max_tokens,
            }
        }

        fn batch(&self) -> StepBatch<'_> {
            StepBatch { rows: Act::new(&self.rows, self.max_tokens, 4), seqs: &self.seqs }
        }

        /// Writes the tables of `runs`; returns the step.
        fn write(&self, runs: &[Run]) -> Step {
            let (gpu, _) = gpu();
            let layout = BatchLayout::new(runs);
            gpu.queue.write_buffer(&self.rows, 0, bytemuck::cast_slice(&layout.rows));
            gpu.queue.write_buffer(&self.seqs, 0, bytemuck::cast_slice(&layout.seqs));
            Step::new(layout.n_rows(), layout.n_seqs())
        }
    }

    fn run_of(slot: u32, n: u32) -> Run {
        Run { slot, pos: 0, n, keep: 0 }
    }

    const SLOTS: u32 = 4;

    /// Runs the conv for a step of `runs` (each sequence in its slot, from its own random
    /// history), bound for `max_tokens` rows; checks each sequence's output and new history
    /// against the twin, and that slots outside the step keep theirs.
    fn check_conv(cfg: &DeltaNetConfig, runs: &[Run], max_tokens: u32, seed: u64) {
        let (gpu, _) = gpu();
        let mut rng = Rng::new(seed);
        let (c, kk) = (cfg.conv_channels(), cfg.conv_kernel);
        let eps = 1e-6;
        let state = DeltaNetState::new(gpu, cfg, SLOTS).unwrap();
        let hist = rng.vec(SLOTS as usize * (kk - 1) * c, 2.0);
        write(state.conv(), &hist);
        let qkv = rng.vec(max_tokens as usize * c, 2.0);
        let w = rng.vec(c * kk, 1.0);
        let step = step_buffer(gpu);
        let tables = Tables::new(max_tokens, SLOTS);
        let (qkv_b, w_b) = (f32_buffer(gpu, &qkv), f32_buffer(gpu, &w));
        let out = f32_buffer(gpu, &vec![0.0; max_tokens as usize * c]);
        let act = |b| Act::new(b, max_tokens, c as u32);
        let d = record(&step, max_tokens, |rec| {
            rec.deltanet_conv(&state, act(&qkv_b), &w_b, act(&out), tables.batch(), eps)
        })
        .unwrap();
        let shape = tables.write(runs);
        run_step(gpu, &step, &d, shape);
        let got = gpu.read_f32(&out, max_tokens as usize * c).unwrap();
        let new_hist = gpu.read_f32(state.conv(), hist.len()).unwrap();
        let h = (kk - 1) * c;
        let mut row = 0;
        for r in runs {
            let (slot, n) = (r.slot as usize, r.n as usize);
            let (want, want_hist) = cpu_conv(cfg, eps, &qkv[row * c..], n, &w, &hist[slot * h..][..h]);
            let what = format!("{cfg:?}, {runs:?}: slot {slot}");
            assert_close(&got[row * c..(row + n) * c], &want, 1e-5, 1e-4, &what);
            assert_eq!(new_hist[slot * h..][..h], want_hist, "{what}: conv state");
            row += n;
        }
        assert!(got[row * c..].iter().all(|&v| v == 0.0), "wrote past the step's rows");
        for slot in (0..SLOTS as usize).filter(|s| !runs.iter().any(|r| r.slot as usize == *s)) {
            assert_eq!(new_hist[slot * h..][..h], hist[slot * h..][..h], "slot {slot} is not in the step");
        }
    }

    #[test]
    fn conv_matches_cpu_from_each_sequences_history() {
        // Decode; prefill of fewer rows than the history (part old, part new); longer ones.
        for (t, max_tokens) in [(1, 1), (2, 4), (7, 9), (9, 9)] {
            check_conv(&config(2, 6, 32), &[run_of(1, t)], max_tokens, 1 + u64::from(t));
        }
        // Several sequences in one step: decode rows and prefill runs mixed.
        check_conv(&config(2, 6, 32), &[run_of(2, 1), run_of(0, 5), run_of(3, 2)], 9, 5);
        check_conv(&config(2, 4, 128), &[run_of(0, 1)], 1, 11);
        check_conv(&config(2, 4, 128), &[run_of(3, 7), run_of(1, 1)], 8, 12);
        // Other kernel sizes, heads wider than the workgroup but not a multiple of it.
        check_conv(&DeltaNetConfig { conv_kernel: 2, ..config(1, 2, 80) }, &[run_of(0, 3)], 3, 13);
        check_conv(&DeltaNetConfig { conv_kernel: 1, ..config(1, 1, 16) }, &[run_of(0, 2), run_of(1, 1)], 3, 14);
    }

    /// Random gate inputs and conv output (q and k unit-normed like the conv's) for `t` tokens.
    struct Inputs {
        y: Vec<f32>,
        b: Vec<f32>,
        a: Vec<f32>,
        ssm_a: Vec<f32>,
        dt_bias: Vec<f32>,
    }

    impl Inputs {
        fn random(cfg: &DeltaNetConfig, t: usize, rng: &mut Rng) -> Inputs {
            let (c, nk, nv, dk) = (cfg.conv_channels(), cfg.n_key_heads, cfg.n_value_heads, cfg.head_dim);
            let mut y = rng.vec(t * c, 1.0);
            for row in y.chunks_exact_mut(c) {
                for (head, x) in row[..2 * nk * dk].chunks_exact_mut(dk).enumerate() {
                    let mut n = x.iter().map(|v| v * v).sum::<f32>().sqrt();
                    if head < nk {
                        n *= (dk as f32).sqrt();
                    }
                    x.iter_mut().for_each(|v| *v /= n);
                }
            }
            Inputs {
                y,
                b: rng.vec(t * nv, 3.0),
                a: rng.vec(t * nv, 3.0),
                ssm_a: (0..nv).map(|_| -rng.f32().exp()).collect(),
                dt_bias: rng.vec(nv, 1.0),
            }
        }

        /// Rows `r` only.
        fn rows(&self, cfg: &DeltaNetConfig, r: std::ops::Range<usize>) -> Inputs {
            let (c, nv) = (cfg.conv_channels(), cfg.n_value_heads);
            Inputs {
                y: self.y[r.start * c..r.end * c].to_vec(),
                b: self.b[r.start * nv..r.end * nv].to_vec(),
                a: self.a[r.start * nv..r.end * nv].to_vec(),
                ssm_a: self.ssm_a.clone(),
                dt_bias: self.dt_bias.clone(),
            }
        }
    }

    /// A state of [`SLOTS`] slots and the buffers of one delta-rule dispatch for up to
    /// `max_tokens` rows.
    struct Rule {
        state: DeltaNetState,
        step: wgpu::Buffer,
        tables: Tables,
        y: wgpu::Buffer,
        b: wgpu::Buffer,
        a: wgpu::Buffer,
        consts: wgpu::Buffer,
        out: wgpu::Buffer,
        dispatch: Dispatch,
    }

    impl Rule {
        /// `s0`: every slot's matrices.
        fn new(cfg: &DeltaNetConfig, max_tokens: u32, s0: &[f32]) -> Rule {
            let (gpu, _) = gpu();
            let state = DeltaNetState::new(gpu, cfg, SLOTS).unwrap();
            write(state.matrices(), s0);
            let act = |w: usize| gpu.storage("act", max_tokens as u64 * w as u64 * 4);
            let nv = cfg.n_value_heads;
            let (y, b, a, out) = (act(cfg.conv_channels()), act(nv), act(nv), act(cfg.value_dim()));
            let consts = gpu.storage("gate consts", 2 * nv as u64 * 4);
            let step = step_buffer(gpu);
            let tables = Tables::new(max_tokens, SLOTS);
            let rows = |b, w: usize| Act::new(b, max_tokens, w as u32);
            let gates = Gates { b: rows(&b, nv), a: rows(&a, nv), consts: &consts };
            let (ya, oa) = (rows(&y, cfg.conv_channels()), rows(&out, cfg.value_dim()));
            let mut d = record(&step, max_tokens, |rec| rec.delta_rule(&state, ya, gates, oa, &tables.seqs)).unwrap();
            let dispatch = d.pop().unwrap();
            Rule { state, step, tables, y, b, a, consts, out, dispatch }
        }

        /// A step of `runs` with inputs `x` (their rows in order).
        fn run(&self, x: &Inputs, runs: &[Run]) -> Vec<f32> {
            let (gpu, _) = gpu();
            let consts: Vec<f32> = x.ssm_a.iter().chain(&x.dt_bias).copied().collect();
            for (buf, v) in [(&self.y, &x.y), (&self.b, &x.b), (&self.a, &x.a), (&self.consts, &consts)] {
                write(buf, v);
            }
            let shape = self.tables.write(runs);
            run_step(gpu, &self.step, std::slice::from_ref(&self.dispatch), shape);
            gpu.read_f32(&self.out, shape.n_tokens as usize * self.state.config().value_dim()).unwrap()
        }

        /// Slot `slot`'s matrices.
        fn matrices(&self, slot: usize) -> Vec<f32> {
            let cfg = self.state.config();
            let m = cfg.n_value_heads * cfg.head_dim * cfg.head_dim;
            gpu().0.read_f32(self.state.matrices(), SLOTS as usize * m).unwrap()[slot * m..][..m].to_vec()
        }
    }

    /// A step of `runs` at once against the twin, each sequence from its slot's own state;
    /// each run alone gives the same bits; one sequence row by row the same up to rounding.
    fn check_delta_rule(cfg: &DeltaNetConfig, runs: &[Run], seed: u64) {
        let mut rng = Rng::new(seed);
        let dk = cfg.head_dim;
        let m = cfg.n_value_heads * dk * dk;
        let s0 = rng.vec(SLOTS as usize * m, 0.5);
        let t: usize = runs.iter().map(|r| r.n as usize).sum();
        let x = Inputs::random(cfg, t, &mut rng);
        let what = format!("{cfg:?}, {runs:?}");
        let vd = cfg.value_dim();

        // The whole step at once, bound for more rows than it has.
        let batch = Rule::new(cfg, t as u32 + 2, &s0);
        let got = batch.run(&x, runs);
        let mut row = 0;
        for r in runs {
            let (slot, n) = (r.slot as usize, r.n as usize);
            let mut s = s0[slot * m..][..m].iter().map(|&v| f64::from(v)).collect::<Vec<_>>();
            let want = cpu_delta_rule(cfg, &x.rows(cfg, row..row + n), &mut s, n);
            assert_close(&got[row * vd..(row + n) * vd], &want, 1e-5, 1e-4, &format!("{what}: slot {slot}"));
            let s_want: Vec<f32> = s.iter().map(|&v| v as f32).collect();
            assert_close(&batch.matrices(slot), &s_want, 1e-5, 1e-4, &format!("{what}: slot {slot}'s state"));

            let alone = Rule::new(cfg, t as u32 + 2, &s0);
            let single = alone.run(&x.rows(cfg, row..row + n), &[*r]);
            assert_eq!(single, got[row * vd..(row + n) * vd], "{what}: slot {slot} alone");
            assert_eq!(alone.matrices(slot), batch.matrices(slot), "{what}: slot {slot}'s state alone");
            row += n;
        }

        // The first sequence row by row: the same, up to rounding.
        let (r, one) = (runs[0], Rule::new(cfg, 1, &s0));
        let mut one_by_one = Vec::new();
        for i in 0..r.n as usize {
            one_by_one.extend(one.run(&x.rows(cfg, i..i + 1), &[Run { n: 1, ..r }]));
        }
        assert_close(&one_by_one, &got[..r.n as usize * vd], 1e-6, 1e-5, &format!("{what}: one by one"));
    }

    #[test]
    fn delta_rule_matches_cpu_per_sequence_and_row_by_row() {
        // Fewer key heads than value heads (tiled: value head h reads key head h mod nk).
        check_delta_rule(&config(2, 6, 32), &[run_of(0, 1)], 21);
        check_delta_rule(&config(2, 6, 32), &[run_of(2, 9), run_of(0, 1), run_of(3, 4)], 22);
        // Qwen3.6's head size.
        check_delta_rule(&config(2, 4, 128), &[run_of(1, 1)], 23);
        check_delta_rule(&config(2, 4, 128), &[run_of(3, 9), run_of(1, 2)], 24);
        // A head that is not a multiple of the workgroup's columns.
        check_delta_rule(&config(1, 2, 80), &[run_of(0, 3)], 25);
    }

    #[test]
    fn delta_rule_starts_from_zero_and_resets_one_slot() {
        let (gpu, _) = gpu();
        let cfg = config(1, 2, 32);
        let mut rng = Rng::new(31);
        let x = Inputs::random(&cfg, 3, &mut rng);
        let fresh = Rule::new(&cfg, 3, &[]);
        let first = fresh.run(&x, &[run_of(1, 3)]);
        let mut s = vec![0f64; 2 * 32 * 32];
        let want = cpu_delta_rule(&cfg, &x, &mut s, 3);
        assert_close(&first, &want, 1e-5, 1e-4, "from zero");
        fresh.run(&x, &[run_of(2, 3)]);
        let hist = 3 * cfg.conv_channels();
        write(fresh.state.conv(), &vec![1.0; SLOTS as usize * hist]);
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        fresh.state.reset(&mut enc, 1);
        gpu.queue.submit([enc.finish()]);
        assert!(fresh.matrices(1).iter().all(|&v| v == 0.0), "reset matrices");
        assert!(fresh.matrices(2).iter().any(|&v| v != 0.0), "another slot's matrices");
        let conv = gpu.read_f32(fresh.state.conv(), SLOTS as usize * hist).unwrap();
        assert!(conv[hist..2 * hist].iter().all(|&v| v == 0.0), "reset conv");
        assert!(conv[..hist].iter().chain(&conv[2 * hist..]).all(|&v| v == 1.0), "other slots' conv");
        assert_eq!(fresh.run(&x, &[run_of(1, 3)]), first, "after reset");
        assert_eq!(fresh.state.bytes(), u64::from(SLOTS) * DeltaNetState::bytes_for(&cfg));
    }

    #[test]
    fn gated_norm_matches_cpu() {
        let (gpu, _) = gpu();
        let mut rng = Rng::new(41);
        for (n_heads, head_dim, max_tokens, t) in [(6u32, 32u32, 1u32, 1usize), (4, 128, 5, 3), (2, 80, 2, 2)] {
            let len = (max_tokens * n_heads * head_dim) as usize;
            let (o, z, w) = (rng.vec(len, 2.0), rng.vec(len, 4.0), rng.vec(head_dim as usize, 1.5));
            let eps = 1e-6;
            let step = step_buffer(gpu);
            let (ob, zb, wb) = (f32_buffer(gpu, &o), f32_buffer(gpu, &z), f32_buffer(gpu, &w));
            let (oa, za) =
                (Act::new(&ob, max_tokens, n_heads * head_dim), Act::new(&zb, max_tokens, n_heads * head_dim));
            let d = record(&step, max_tokens, |rec| rec.gated_norm(oa, za, &wb, head_dim, eps)).unwrap();
            run(gpu, &step, &d, t as u32);
            let n = head_dim as usize;
            let mut want = Vec::new();
            for (row, zrow) in o.chunks_exact(n).zip(z.chunks_exact(n)).take(t * n_heads as usize) {
                let ms = row.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / n as f64;
                let scale = 1.0 / (ms + f64::from(eps)).sqrt();
                want.extend(
                    (0..n).map(|i| (f64::from(row[i]) * scale * f64::from(w[i]) * silu(f64::from(zrow[i]))) as f32),
                );
            }
            let got = gpu.read_f32(&ob, len).unwrap();
            let m = want.len();
            assert_close(&got[..m], &want, 1e-5, 1e-4, &format!("{n_heads} heads of {head_dim}, {t} tokens"));
            assert_eq!(&got[m..], &o[m..], "wrote past the step's tokens");
        }
    }

    #[test]
    fn shapes_are_checked() {
        let (gpu, _) = gpu();
        let cfg = config(2, 4, 32);
        assert!(DeltaNetState::new(gpu, &config(2, 5, 32), 1).is_err());
        assert!(DeltaNetState::new(gpu, &config(1, 1, 512), 1).is_err());
        assert!(DeltaNetState::new(gpu, &config(1, 1, 30), 1).is_err());
        assert!(DeltaNetState::new(gpu, &DeltaNetConfig { conv_kernel: 0, ..cfg.clone() }, 1).is_err());
        assert!(DeltaNetState::new(gpu, &cfg, 0).is_err());
        let e = DeltaNetState::new(gpu, &config(16, 16, 256), 1 << 14).unwrap_err().to_string();
        assert!(e.contains("--max-seqs"), "{e}");
        let state = DeltaNetState::new(gpu, &cfg, 2).unwrap();
        let step = step_buffer(gpu);
        let c = cfg.conv_channels();
        let act = f32_buffer(gpu, &vec![0.0; 2 * c]);
        let out = f32_buffer(gpu, &vec![0.0; 2 * c]);
        let w = f32_buffer(gpu, &vec![0.0; 4 * c]);
        let tables = Tables::new(2, 2);
        let (c32, v32) = (c as u32, cfg.value_dim() as u32);
        let (qkv, qkv_out) = (Act::new(&act, 2, c32), Act::new(&out, 2, c32));
        let conv = |max_tokens, out, w| {
            record(&step, max_tokens, |rec| rec.deltanet_conv(&state, qkv, w, out, tables.batch(), 1e-6))
        };
        assert!(conv(2, qkv_out, &w).is_ok());
        assert!(conv(3, qkv_out, &w).is_err());
        assert!(conv(1, qkv, &w).is_err());
        assert!(conv(1, qkv_out, &act).is_err());
        let small = f32_buffer(gpu, &[0.0; 8]);
        let gates = Gates { b: Act::new(&small, 2, 4), a: Act::new(&small, 2, 4), consts: &small };
        let rule =
            |max_tokens, out| record(&step, max_tokens, |rec| rec.delta_rule(&state, qkv, gates, out, &tables.seqs));
        assert!(rule(2, Act::new(&out, 2, v32)).is_ok());
        assert!(rule(3, Act::new(&out, 2, v32)).is_err());
        assert!(rule(1, Act::new(&act, 2, v32)).is_err());
        let (o, z) = (Act::new(&act, 2, 128), Act::new(&out, 2, 128));
        let norm = |z, w| record(&step, 1, |rec| rec.gated_norm(o, z, w, 32, 1e-6));
        assert!(norm(z, &small).is_err());
        assert!(norm(z, &w).is_ok());
        assert!(norm(o, &w).is_err());
    }
}
