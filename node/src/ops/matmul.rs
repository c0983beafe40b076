//! `out = x W^T` (or `out += x W^T`) for a quantised weight matrix `W`.
//!
//! Three shapes of step, three kernels, picked when a dispatch list is recorded
//! ([`StepRows`]): one row (decode of one sequence), a few (decode of a batch), many
//! (prefill, large batches). All read `W` in its repacked quantised form through its
//! weight-format prelude, and run once per part of a split matrix.
//!
//! Every kernel sums an output in the same order (`common/matmul.wgsl`: piece p adds to
//! partial p mod S, the S partials meet in a fixed tree), with S fixed per adapter by its
//! [`MatmulPlan`]. So a row's result is bit for bit the same whichever kernel ran it and
//! whatever else shared its step: batching never changes a token.

use strata_model::quant::GgmlType;
use strata_shaders::Kernel;

use super::recorder::{Act, Recorder, binding};
use crate::gpu::{Dim, Gpu, Workgroups};
use crate::weights::{MatrixPart, QuantMatrix};
use crate::{Error, Result};

/// The most workgroups a dispatch may have along one dimension.
const MAX_GROUPS: u32 = 65535;

/// Steps of at most this many rows use the few-rows kernel.
pub const FEW_ROWS: u32 = 8;

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct Params {
    k8: u32,
    rows: u32,
    n: u32,
    row0: u32,
    accumulate: u32,
    groups_x: u32,
    /// Where the second to fourth outputs' rows begin (`n` for those there are not).
    split1: u32,
    split2: u32,
    split3: u32,
    _pad: [u32; 3],
}

/// The most outputs one matrix product writes ([`Recorder::matmul_into`]).
pub const MAX_OUTPUTS: usize = 4;

/// How many rows the steps of a recording carry, which picks the matrix kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StepRows {
    /// One row: a decode step of one sequence.
    One,
    /// Exactly this many, 2 to [`FEW_ROWS`]: decode steps of a few sequences, speculative
    /// steps. Each count has its own recording, whose kernels do the work of exactly that
    /// many tokens (a kernel for more would do theirs too, and on CPU adapters, where a
    /// step of a few rows is bound by arithmetic, that is what costs).
    Few(u32),
    /// More: prefill chunks and large batches.
    Many,
}

impl StepRows {
    /// The class of a step of `n` rows.
    pub fn of(n: u32) -> StepRows {
        match n {
            0 | 1 => StepRows::One,
            n if n <= FEW_ROWS => StepRows::Few(n),
            _ => StepRows::Many,
        }
    }

    /// The classes a stage whose steps carry up to `max` rows records lists for.
    pub fn up_to(max: u32) -> Vec<StepRows> {
        let few = (2..=max.min(FEW_ROWS)).map(StepRows::Few);
        std::iter::once(StepRows::One).chain(few).chain((max > FEW_ROWS).then_some(StepRows::Many)).collect()
    }

    /// The most rows of the class's steps, for the few-rows classes.
    fn few_tokens(self) -> Option<u32> {
        match self {
            StepRows::Few(n) => Some(n),
            StepRows::One | StepRows::Many => None,
        }
    }
}

/// `mm_rows`: lanes in groups of `splits` (the plan's S), each group owning `rows` (1, 2,
/// 4 or 8) consecutive rows (at most: fewer for a matrix too small to give every thread
/// of the adapter work, see [`MatmulPlan::min_groups`]) for `tokens` tokens at once;
/// `broadcast`: the subgroup size through which lanes share x (S = 1 and one subgroup per
/// workgroup).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowsShape {
    pub lanes: u32,
    pub rows: u32,
    pub tokens: u32,
    pub broadcast: Option<u32>,
}

/// `mm_tile`: a workgroup's tile of `rows` x `tokens`, each thread's block of
/// `thread_rows` x `thread_tokens`, and `pieces` (of 8 values of k) per chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileShape {
    pub rows: u32,
    pub tokens: u32,
    pub thread_rows: u32,
    pub thread_tokens: u32,
    pub pieces: u32,
}

/// `mm_coop`: square cooperative matrices of `size` (8 or 16), a workgroup of one subgroup
/// of `lanes` computing `row_matrices` x `size` rows for `size` tokens, `pieces` (of 8
/// values of k) per chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoopShape {
    pub size: u32,
    pub lanes: u32,
    pub row_matrices: u32,
    pub pieces: u32,
}

/// The kernel of the many-rows class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManyShape {
    Rows(RowsShape),
    Tile(TileShape),
}

/// How one adapter computes matrix products: the summation order every kernel shares
/// (`splits`, the S of `common/matmul.wgsl`) and the kernel of each [`StepRows`] class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatmulPlan {
    pub splits: u32,
    pub one: RowsShape,
    pub few: RowsShape,
    pub many: ManyShape,
    /// Workgroups along x before the grid grows along y (tests lower it).
    pub max_groups: u32,
    /// Workgroups a matrix should give at least, so that every thread of the adapter has
    /// work: `mm_rows` takes fewer rows per lane for small matrices.
    pub min_groups: u32,
    /// `mm_rows` reads x through a uniform binding (`x_uniform.wgsl`) where the step's
    /// rows fit in one and x's buffer allows it, rather than a storage one.
    pub uniform_x: bool,
    /// Q8_0 matrices go through integer dot products (`quantize_x`, then `mm_dot`) in every
    /// class, with the plan's lanes and splits; other formats keep the float kernels. The
    /// adapter's [`Gpu::int8_dot`] decides (see [`crate::gpu::GpuConfig::int8_dot`]).
    pub int8_dot: bool,
    /// Every class's products through cooperative matrices (`mm_coop`) instead of the
    /// kernels above, whose float sums they would not match: the adapter's
    /// [`Gpu::coop_matrix`] decides.
    pub coop: Option<CoopShape>,
}

impl MatmulPlan {
    /// The plan for `gpu`'s adapter.
    pub fn for_gpu(gpu: &Gpu) -> MatmulPlan {
        let plan = if gpu.info.device_type == wgpu::DeviceType::Cpu {
            MatmulPlan::cpu(gpu.cpu_subgroup())
        } else {
            MatmulPlan::gpu()
        };
        let coop = gpu.coop_matrix.map(|size| CoopShape {
            size,
            lanes: gpu.info.subgroup_min_size,
            row_matrices: 2,
            pieces: 4,
        });
        MatmulPlan { int8_dot: gpu.int8_dot, coop, ..plan }
    }

    /// CPU adapters (lavapipe) run a workgroup as the SIMD lanes of one thread and load
    /// memory lane by lane, so loads cost most: no cross-lane sums (S = 1), many rows and
    /// tokens per lane, and x shared through subgroup broadcasts where the subgroup size
    /// is fixed. Measured on lavapipe (576 x 1536 Q8_0): 1 row 1.4 ms (mm_vec took 2.5-4),
    /// 2 rows 1.6 ms, 4 rows 2.3 ms, 8 rows 2.8 ms. Steps of several rows take 8 rows per
    /// lane, as one row does: with 32, SmolLM2's 2-row steps took 142 ms against 125, its
    /// 4-row ones 167 against 148, and a 258-token prompt prefilled at 50 tok/s against
    /// 55 (all SmolLM2-135M Q8_0 on 2 cores); 4 and 16 were slower than 8 too.
    pub fn cpu(subgroup: Option<u32>) -> MatmulPlan {
        let lanes = subgroup.unwrap_or(8);
        let one = RowsShape { lanes, rows: 8, tokens: 1, broadcast: subgroup };
        let few = RowsShape { lanes, rows: 8, tokens: FEW_ROWS, broadcast: subgroup };
        // lavapipe runs a workgroup on one of its threads, one per core.
        let threads = std::thread::available_parallelism().map_or(4, |n| n.get() as u32);
        let min_groups = (2 * threads).clamp(2, 64);
        MatmulPlan {
            splits: 1,
            one,
            few,
            many: ManyShape::Rows(few),
            max_groups: MAX_GROUPS,
            min_groups,
            uniform_x: true,
            int8_dot: false,
            coop: None,
        }
    }

    /// GPUs: four lanes per row read consecutive pieces (S = 4), and batches of many rows
    /// go through workgroup-shared tiles.
    pub fn gpu() -> MatmulPlan {
        let one = RowsShape { lanes: 64, rows: 1, tokens: 1, broadcast: None };
        let few = RowsShape { lanes: 64, rows: 1, tokens: FEW_ROWS, broadcast: None };
        let tile = TileShape { rows: 64, tokens: 32, thread_rows: 4, thread_tokens: 4, pieces: 4 };
        MatmulPlan {
            splits: 4,
            one,
            few,
            many: ManyShape::Tile(tile),
            max_groups: MAX_GROUPS,
            min_groups: 1,
            uniform_x: false,
            int8_dot: false,
            coop: None,
        }
    }

    /// Where `mm_rows` reads x through a uniform binding: the bytes of x's buffer to bind
    /// (all of it, or as much as a uniform binding of `max_uniform` bytes takes, in whole
    /// vec4s), if the plan asks for it, the class is one the few-rows kernel runs, the
    /// class's rows of `k` values lie within those bytes, and the buffer (of `size` bytes
    /// and `usage`) may be bound so. `None`: through a storage binding. The bytes bound
    /// depend on the buffer alone, not on `k` or the class, so the kernels of every
    /// matrix and class share pipelines as they did with a storage binding.
    pub fn uniform_x_bytes(
        &self,
        class: StepRows,
        k: u32,
        max_uniform: u64,
        size: u64,
        usage: wgpu::BufferUsages,
    ) -> Option<u64> {
        let tokens = match class {
            StepRows::One => self.one.tokens,
            StepRows::Few(n) => n,
            StepRows::Many => return None,
        };
        let bound = size.min(max_uniform) / 16 * 16;
        let rows = u64::from(tokens) * u64::from(k) * 4;
        (self.uniform_x && rows <= bound && usage.contains(wgpu::BufferUsages::UNIFORM)).then_some(bound)
    }

    /// Refuses shapes the kernels cannot run.
    fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Shape { op: "matmul plan", message: m });
        let s = self.splits;
        if s == 0 || !s.is_power_of_two() {
            return bad(format!("splits {s} is not a power of two"));
        }
        for r in [self.one, self.few].into_iter().chain(match self.many {
            ManyShape::Rows(r) => Some(r),
            ManyShape::Tile(_) => None,
        }) {
            // mm_rows writes its rows out one by one, up to 8 (see the kernel).
            if r.lanes == 0 || !r.lanes.is_multiple_of(s) || !matches!(r.rows, 1 | 2 | 4 | 8) || r.tokens == 0 {
                return bad(format!("{r:?} with splits {s}"));
            }
            if let Some(sg) = r.broadcast
                && (s != 1 || r.lanes != sg || !matches!(sg, 4 | 8))
            {
                return bad(format!("{r:?}: broadcasts need one subgroup of 4 or 8 lanes and splits 1"));
            }
        }
        if let Some(c) = self.coop
            && (!matches!(c.size, 8 | 16)
                || c.lanes == 0
                || c.row_matrices == 0
                || c.pieces == 0
                || !c.pieces.is_multiple_of(c.size / 8))
        {
            return bad(format!("{c:?}"));
        }
        if let ManyShape::Tile(t) = self.many
            && (!t.pieces.is_multiple_of(s)
                || t.thread_rows == 0
                || t.thread_tokens == 0
                || !t.rows.is_multiple_of(t.thread_rows)
                || !t.tokens.is_multiple_of(t.thread_tokens))
        {
            return bad(format!("{t:?} with splits {s}"));
        }
        Ok(())
    }
}

/// `groups` workgroups as a 2-D grid of at most `max` along x.
fn grid(groups: u32, max: u32) -> (u32, u32) {
    let x = groups.clamp(1, max);
    (x, groups.div_ceil(x))
}

impl Recorder<'_> {
    /// Records `out[t] (+)= W x[t]` for the step's rows `t`.
    ///
    /// `x`: rows of `w.k()`; `out`: rows of `w.n()`. With `accumulate`, adds to `out`
    /// (fusing a residual add). The kernel is the recorder's [`StepRows`] class's in its
    /// [`MatmulPlan`]; its workgroups follow the step's rows.
    pub fn matmul(&mut self, w: &QuantMatrix, x: Act<'_>, out: Act<'_>, accumulate: bool) -> Result<()> {
        self.matmul_into(w, x, &[out], accumulate)
    }

    /// [`Recorder::matmul`] for a matrix that is several with the same input end to end
    /// (see [`crate::layers::LoadCtx::fused`]): its rows go to `outs` in order, each
    /// output's rows as wide as it is (their widths add up to `w.n()`), so one dispatch
    /// does the work of several. A row's sums are the same as when its matrix runs alone.
    pub fn matmul_into(&mut self, w: &QuantMatrix, x: Act<'_>, outs: &[Act<'_>], accumulate: bool) -> Result<()> {
        let plan = self.matmul_plan();
        plan.check()?;
        let what = |part: &str| format!("{}: {part}", w.name());
        let (k, n) = (w.k() as u32, w.n() as u32);
        let widths: u32 = outs.iter().map(|o| o.width).sum();
        if outs.is_empty() || outs.len() > MAX_OUTPUTS || widths != n {
            let got: Vec<u32> = outs.iter().map(|o| o.width).collect();
            return Err(Error::Shape {
                op: "matmul",
                message: format!("{}: {n} rows into outputs of widths {got:?} (1 to {MAX_OUTPUTS} of them)", w.name()),
            });
        }
        let mut x_binding = self.bind_act("matmul", &what("x"), x, k)?;
        let mut out_bindings = Vec::with_capacity(MAX_OUTPUTS);
        for o in outs {
            out_bindings.push(self.bind_act("matmul", &what("out"), *o, o.width)?);
        }
        // Outputs there are not: the first again, never written through those bindings.
        while out_bindings.len() < MAX_OUTPUTS {
            out_bindings.push(out_bindings[0].clone());
        }
        let mut splits = [n; MAX_OUTPUTS - 1];
        let mut at = 0;
        for (i, o) in outs.iter().enumerate().take(outs.len() - 1) {
            at += o.width;
            splits[i] = at;
        }
        let outputs = Outputs { bindings: out_bindings, splits };
        if let Some(coop) = plan.coop {
            return self.matmul_coop(coop, w, x_binding, outputs, accumulate);
        }
        if plan.int8_dot && w.ty() == GgmlType::Q8_0 {
            return self.matmul_int8(w, x_binding, outputs, accumulate);
        }
        let class = self.step_rows();
        let max_uniform = self.gpu().limits.max_uniform_buffer_binding_size;
        let uniform_x = plan.uniform_x_bytes(class, k, max_uniform, x.buffer.size(), x.buffer.usage());
        if let Some(bytes) = uniform_x {
            x_binding = binding(x.buffer, bytes);
        }
        let x_prelude = if uniform_x.is_some() { Kernel::X_UNIFORM } else { Kernel::X_STORAGE };
        let s = format!("{}u", plan.splits);
        // Rows per lane: the shape's, halved (down to 4) while the matrix would give fewer
        // workgroups than the adapter has threads to keep busy. The sums are the same.
        let rows_per_lane = |r: RowsShape| {
            let mut rows = r.rows;
            while rows > 4 && n.div_ceil(r.lanes / plan.splits * rows) < plan.min_groups {
                rows /= 2;
            }
            rows
        };
        let rows_kernel = |r: RowsShape| {
            let r = RowsShape { rows: rows_per_lane(r), ..r };
            let mut consts = vec![
                ("WG", format!("{}u", r.lanes)),
                ("R", format!("{}u", r.rows)),
                ("S", s.clone()),
                ("TB", format!("{}u", r.tokens)),
                ("XB", format!("{}u", u32::from(r.broadcast.is_some()))),
                ("SG", format!("{}u", r.broadcast.unwrap_or(8))),
            ];
            if let Some(bytes) = uniform_x {
                consts.push(("XN", format!("{}u", bytes / 16)));
            }
            (Kernel::MM_ROWS, "mm_rows", consts, r.lanes / plan.splits * r.rows, r.tokens)
        };
        let (kernel, label, consts, tile_rows, tile_tokens) = match (class, plan.many) {
            (StepRows::One, _) => rows_kernel(plan.one),
            // Exactly as many tokens per lane as the class's steps have at most.
            (StepRows::Few(_), _) => {
                rows_kernel(RowsShape { tokens: class.few_tokens().unwrap_or(FEW_ROWS), ..plan.few })
            }
            (StepRows::Many, ManyShape::Rows(r)) => rows_kernel(r),
            (StepRows::Many, ManyShape::Tile(t)) => {
                let threads = (t.rows / t.thread_rows) * (t.tokens / t.thread_tokens);
                let consts = vec![
                    ("TN", format!("{}u", t.rows)),
                    ("TT", format!("{}u", t.tokens)),
                    ("RB", format!("{}u", t.thread_rows)),
                    ("TK", format!("{}u", t.thread_tokens)),
                    ("KC", format!("{}u", t.pieces)),
                    ("S", s.clone()),
                    ("WG", format!("{threads}u")),
                ];
                (Kernel::MM_TILE, "mm_tile", consts, t.rows, t.tokens)
            }
        };
        let pipeline = self.pipeline(kernel, &[w.format(), x_prelude], &consts)?;
        self.dispatch_parts(label, pipeline, w, &[(2, x_binding)], &outputs, accumulate, tile_rows, tile_tokens);
        Ok(())
    }
}

/// Where a matrix product writes: its outputs' bindings (as many as the kernels bind,
/// the first repeated where there are fewer) and where each after the first begins.
struct Outputs<'a> {
    bindings: Vec<wgpu::BindingResource<'a>>,
    splits: [u32; MAX_OUTPUTS - 1],
}

impl<'a> Outputs<'a> {
    /// The outputs at their binding numbers: 3, then 10 to 12.
    fn resources(&self) -> Vec<(u32, wgpu::BindingResource<'a>)> {
        [3, 10, 11, 12].into_iter().zip(self.bindings.iter().cloned()).collect()
    }
}

/// x of an integer-dot product: a step's rows quantised per block of 32 values, as
/// `quantize_x` writes them and `mm_dot` reads them.
#[derive(Clone)]
pub struct QuantizedX {
    /// Two signed bytes per value (per block the 32 high ones, then the 32 low ones):
    /// `2 k` bytes per row.
    q: wgpu::Buffer,
    /// One f32 scale per block: `k / 32` per row.
    d: wgpu::Buffer,
    /// The widest row `q` and `d` hold.
    k: u32,
    /// The rows they hold.
    rows: u32,
}

impl QuantizedX {
    /// Scratch for `rows` rows of up to `k` values, of the bytes
    /// [`strata_model::plan::int8_scratch_bytes`] counts.
    pub fn new(gpu: &Gpu, rows: u32, k: u32) -> QuantizedX {
        let (rows64, k64) = (u64::from(rows), u64::from(k));
        let q = gpu.storage("quantized x", rows64 * k64 * 2);
        let d = gpu.storage("quantized x scales", rows64 * k64.div_ceil(32) * 4);
        QuantizedX { q, d, k, rows }
    }

    /// Bytes of its two buffers.
    pub fn bytes(&self) -> u64 {
        self.q.size() + self.d.size()
    }
}

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct QuantizeParams {
    blocks: u32,
    groups_x: u32,
    _pad: [u32; 2],
}

/// Threads of `quantize_x`, one per block of 32 values.
const QUANTIZE_WG: u32 = 64;

impl Recorder<'_> {
    /// The params of a matrix kernel's dispatch over one part of `w`, and its workgroups:
    /// `rows` rows and `tokens` tokens a workgroup (`mm_rows`, `mm_tile` and `mm_dot` alike).
    #[allow(clippy::too_many_arguments)]
    fn part_params(
        &self,
        label: &str,
        w: &QuantMatrix,
        part: &MatrixPart,
        accumulate: bool,
        rows: u32,
        tokens: u32,
        outputs: &Outputs<'_>,
    ) -> (wgpu::Buffer, Workgroups) {
        let (gx, gy) = grid((part.rows as u32).div_ceil(rows), self.matmul_plan().max_groups);
        let params = Params {
            k8: w.k() as u32 / 8,
            rows: part.rows as u32,
            n: w.n() as u32,
            row0: part.row0 as u32,
            accumulate: accumulate.into(),
            groups_x: gx,
            split1: outputs.splits[0],
            split2: outputs.splits[1],
            split3: outputs.splits[2],
            _pad: [0; 3],
        };
        (self.uniform(label, &params), Workgroups(Dim::Fixed(gx), Dim::Fixed(gy), Dim::Tokens { group: tokens }))
    }

    /// `matmul` through cooperative matrices, for every class of step alike: each part in
    /// tiles of `coop.row_matrices * coop.size` rows x `coop.size` tokens.
    fn matmul_coop(
        &mut self,
        coop: CoopShape,
        w: &QuantMatrix,
        x: wgpu::BindingResource<'_>,
        outputs: Outputs<'_>,
        accumulate: bool,
    ) -> Result<()> {
        let prelude = if coop.size == 16 { Kernel::COOP_16 } else { Kernel::COOP_8 };
        let consts = [
            ("SG", format!("{}u", coop.lanes)),
            ("TM", format!("{}u", coop.row_matrices)),
            ("KC", format!("{}u", coop.pieces)),
        ];
        let pipeline = self.pipeline(Kernel::MM_COOP, &[prelude, w.format(), Kernel::X_STORAGE], &consts)?;
        let rows = coop.row_matrices * coop.size;
        self.dispatch_parts("mm_coop", pipeline, w, &[(2, x)], &outputs, accumulate, rows, coop.size);
        Ok(())
    }

    /// One dispatch of a matrix kernel per part of `w`: `inputs` at their binding numbers
    /// (x, and what else the kernel reads besides the weights), the part's weights from 4
    /// on, the outputs; `rows` x `tokens` a workgroup ([`Recorder::part_params`]).
    #[allow(clippy::too_many_arguments)]
    fn dispatch_parts(
        &mut self,
        label: &'static str,
        pipeline: std::sync::Arc<wgpu::ComputePipeline>,
        w: &QuantMatrix,
        inputs: &[(u32, wgpu::BindingResource<'_>)],
        outputs: &Outputs<'_>,
        accumulate: bool,
        rows: u32,
        tokens: u32,
    ) {
        for part in w.parts() {
            let (params, groups) = self.part_params(label, w, part, accumulate, rows, tokens, outputs);
            let mut resources = inputs.to_vec();
            resources.extend(part.buffers.iter().enumerate().map(|(i, b)| (4 + i as u32, b.as_entire_binding())));
            resources.extend(outputs.resources());
            self.dispatch_at(label, pipeline.clone(), &params, &resources, groups);
        }
    }

    /// Rows of x a step of the recording's class quantises at most: the class's bound, so
    /// that the one-row and few-rows recordings of a stage with a large `--batch-tokens`
    /// do not each hold scratch for the whole batch.
    fn quantized_rows(&self) -> u32 {
        match self.step_rows() {
            StepRows::One => 1,
            StepRows::Few(n) => n.min(self.max_tokens()),
            StepRows::Many => self.max_tokens(),
        }
    }

    /// The scratch for quantised rows of `k` values: the stage's shared one
    /// ([`Recorder::with_int8_scratch`]) where it is wide and tall enough, else the
    /// recording's own, grown (a new pair of buffers; dispatches recorded earlier keep
    /// theirs) when `k` is wider than any before. Products run one after another in a
    /// submission, so each may overwrite what the last one quantised.
    fn quantized_x(&mut self, k: u32) -> (wgpu::Buffer, wgpu::Buffer) {
        let rows = self.quantized_rows();
        match &self.int8_x {
            Some(s) if s.k >= k && s.rows >= rows => (s.q.clone(), s.d.clone()),
            held => {
                let k = held.as_ref().map_or(k, |s| s.k.max(k));
                tracing::debug!(rows, k, "integer-dot scratch beyond the stage's: the recording takes its own");
                let s = QuantizedX::new(self.gpu(), rows, k);
                let buffers = (s.q.clone(), s.d.clone());
                self.int8_x = Some(s);
                buffers
            }
        }
    }

    /// `matmul` for a Q8_0 matrix through integer dot products: x is quantised per block
    /// into the recorder's scratch, then `mm_dot` runs each part with the plan's lanes and
    /// splits and as many tokens per lane as the class's steps have (8 for the many-rows
    /// class). A row's sums do not depend on the class, as with the float kernels.
    fn matmul_int8(
        &mut self,
        w: &QuantMatrix,
        x: wgpu::BindingResource<'_>,
        outputs: Outputs<'_>,
        accumulate: bool,
    ) -> Result<()> {
        let plan = self.matmul_plan();
        let k = w.k() as u32;
        let (q, d) = self.quantized_x(k);
        let blocks = k / 32;
        let (gx, gy) = grid(blocks.div_ceil(QUANTIZE_WG), plan.max_groups);
        let params = self.uniform("quantize_x", &QuantizeParams { blocks, groups_x: gx, _pad: [0; 2] });
        let pipeline = self.pipeline(Kernel::QUANTIZE_X, &[], &[("WG", format!("{QUANTIZE_WG}u"))])?;
        let tokens = self.quantized_rows();
        let (q_bytes, d_bytes) = (u64::from(tokens) * u64::from(k) * 2, u64::from(tokens) * u64::from(blocks) * 4);
        let (qb, db) = (binding(&q, q_bytes), binding(&d, d_bytes));
        let one_row = Workgroups(Dim::Fixed(gx), Dim::Fixed(gy), Dim::Tokens { group: 1 });
        self.dispatch("quantize_x", pipeline, &params, &[x, qb.clone(), db.clone()], one_row);

        let shape = match self.step_rows() {
            StepRows::One => plan.one,
            StepRows::Few(t) => RowsShape { tokens: t, ..plan.few },
            StepRows::Many => RowsShape { tokens: FEW_ROWS, ..plan.few },
        };
        let consts = [
            ("WG", format!("{}u", shape.lanes)),
            ("S", format!("{}u", plan.splits)),
            ("TB", format!("{}u", shape.tokens)),
        ];
        let pipeline = self.pipeline(Kernel::MM_DOT, &[Kernel::Q_Q8_0], &consts)?;
        let rows_per_group = shape.lanes / plan.splits;
        let inputs = [(2, qb), (6, db)];
        self.dispatch_parts("mm_dot", pipeline, w, &inputs, &outputs, accumulate, rows_per_group, shape.tokens);
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
        gpu.uniform("step", &Step::rows(n_tokens))
    }

    fn f32_buffer(gpu: &Gpu, values: &[f32]) -> wgpu::Buffer {
        gpu.storage_init("f32", bytemuck::cast_slice(values))
    }

    fn submit(gpu: &Gpu, dispatches: &[Dispatch], n_tokens: u32) {
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        encode_dispatches(&mut enc, dispatches, n_tokens);
        gpu.queue.submit([enc.finish()]);
    }

    /// `out` after `matmul` on `t` rows with `plan`'s kernel for that many (buffers of
    /// `max_tokens` rows), `out` first set to `init`.
    fn gpu_matmul(
        w: &QuantMatrix,
        x: &[f32],
        init: &[f32],
        t: u32,
        max_tokens: u32,
        accumulate: bool,
        plan: MatmulPlan,
    ) -> Vec<f32> {
        let (gpu, kernels) = gpu();
        // x as stages hold it: a buffer that CPU adapters may also bind as a uniform one.
        let xb = gpu.storage("x", size_of_val(x) as u64);
        gpu.queue.write_buffer(&xb, 0, bytemuck::cast_slice(x));
        let (out, step) = (f32_buffer(gpu, init), step(gpu, t));
        let mut rec = Recorder::new(gpu, kernels, &step, max_tokens).unwrap().for_rows(StepRows::of(t));
        rec.set_matmul_plan(plan);
        let (xa, oa) = (Act::new(&xb, max_tokens, w.k() as u32), Act::new(&out, max_tokens, w.n() as u32));
        rec.matmul(w, xa, oa, accumulate).unwrap();
        let d = rec.finish();
        // The integer-dot path quantises x first.
        let quantize = usize::from(plan.int8_dot && w.ty() == GgmlType::Q8_0);
        assert_eq!(d.len(), quantize + w.parts().len());
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
        assert_rows_close_to(got, want, mag, 1e-4, what);
    }

    /// Asserts `got` matches `want` to `tol` of each output's magnitude.
    #[track_caller]
    fn assert_rows_close_to(got: &[f32], want: &[f32], mag: &[f32], tol: f32, what: &str) {
        let scaled = |v: &[f32]| v.iter().zip(mag).map(|(a, m)| a / m).collect::<Vec<f32>>();
        assert_close(&scaled(got), &scaled(want), tol, 0.0, what);
    }

    /// `k` values per row that `ty` can hold, SmolLM2's 576 where its blocks allow.
    fn widths(ty: GgmlType) -> [usize; 2] {
        if ty.block_len() == 256 { [256, 768] } else { [256, 576] }
    }

    /// Every plan this adapter can run: the CPU plan with and without subgroup broadcasts
    /// (with the adapter's own subgroup size, and 4 where that is what it has), with x
    /// through a uniform binding (on CPU adapters) and a storage one, the GPU plan, ones
    /// with a tiny grid limit so that the group index wraps into y, and one with the most
    /// rows per lane.
    fn plans() -> Vec<MatmulPlan> {
        let g = &gpu().0;
        let mut plans = vec![MatmulPlan::cpu(None), MatmulPlan::gpu()];
        if g.features.contains(wgpu::Features::SUBGROUP)
            && g.info.subgroup_min_size == g.info.subgroup_max_size
            && matches!(g.info.subgroup_min_size, 4 | 8)
        {
            plans.push(MatmulPlan::cpu(Some(g.info.subgroup_min_size)));
            plans.push(MatmulPlan { uniform_x: false, ..MatmulPlan::cpu(Some(g.info.subgroup_min_size)) });
        } else {
            eprintln!("subgroup size not fixed at 4 or 8 on this adapter: no broadcast plan");
        }
        plans.push(MatmulPlan { max_groups: 3, ..MatmulPlan::gpu() });
        plans.push(MatmulPlan { max_groups: 2, ..MatmulPlan::cpu(None) });
        plans.push(MatmulPlan { uniform_x: false, ..MatmulPlan::cpu(None) });
        // The largest rows per lane, whatever the matrix.
        plans.push(MatmulPlan { min_groups: 1, ..MatmulPlan::cpu(None) });
        plans
    }

    #[test]
    fn x_goes_through_a_uniform_binding_where_it_fits() {
        use wgpu::BufferUsages as U;
        let (cpu, usage) = (MatmulPlan::cpu(Some(8)), U::STORAGE | U::UNIFORM);
        // A stage's buffers of 64 rows: the first 64 KiB are bound, whatever the matrix.
        let (rows_576, rows_1536) = (64 * 576 * 4, 64 * 1536 * 4);
        assert_eq!(cpu.uniform_x_bytes(StepRows::One, 576, 65536, rows_576, usage), Some(65536));
        assert_eq!(cpu.uniform_x_bytes(StepRows::Few(8), 1536, 65536, rows_1536, usage), Some(65536));
        // A buffer under 64 KiB is bound whole (its rows are within it).
        assert_eq!(cpu.uniform_x_bytes(StepRows::Few(3), 576, 65536, 3 * 576 * 4, usage), Some(6912));
        // Qwen3.6-27B's down projection: one row of 17,408 values is over 64 KiB.
        assert_eq!(cpu.uniform_x_bytes(StepRows::One, 17408, 65536, 64 * 17408 * 4, usage), None);
        assert_eq!(cpu.uniform_x_bytes(StepRows::Many, 576, 65536, rows_576, usage), None);
        assert_eq!(cpu.uniform_x_bytes(StepRows::One, 576, 65536, rows_576, U::STORAGE), None);
        assert_eq!(MatmulPlan::gpu().uniform_x_bytes(StepRows::One, 576, 65536, rows_576, usage), None);
        // The stages' buffers allow it on CPU adapters, where the plan asks for it.
        let g = &gpu().0;
        let on_cpu = g.info.device_type == wgpu::DeviceType::Cpu;
        assert_eq!(g.storage("x", 64).usage().contains(U::UNIFORM), on_cpu);
        assert_eq!(MatmulPlan::for_gpu(g).uniform_x, on_cpu);
    }

    #[test]
    fn matmul_matches_cpu_for_every_type_plan_and_step_size() {
        let mut rng = Rng::new(42);
        let n = 131; // not a multiple of the rows per workgroup of any plan, nor of a tile
        for ty in TYPES {
            for k in widths(ty) {
                let bytes = random_weights(&mut rng, ty, k, n);
                let wf = dequantize(ty, &bytes).unwrap();
                let w = QuantMatrix::upload(&gpu().0, "w", ty, k, n, &bytes).unwrap();
                let rows: Vec<usize> = (0..n).collect();
                for plan in plans() {
                    // One row, a few of each class (one of them fewer than the bound batch),
                    // many with a partial token tile and a step shorter than the bound batch.
                    for (t, max_tokens) in [(1, 1), (2, 2), (3, 4), (5, 7), (33, 35)] {
                        let accumulate = t != 5;
                        let x = rng.vec(max_tokens * k, 1.0);
                        let init = rng.vec(max_tokens * n, 1.0);
                        let got = gpu_matmul(&w, &x, &init, t as u32, max_tokens as u32, accumulate, plan);
                        let (want, mag) = cpu_matmul(&wf, k, &rows, &x, &init, t, accumulate);
                        let what = format!("{ty} k={k} n={n} t={t} accumulate={accumulate} {plan:?}");
                        assert_rows_close(&got[..t * n], &want, &mag, &what);
                        assert_eq!(&got[t * n..], &init[t * n..], "{what}: tokens past the step were written");
                    }
                }
            }
        }
    }

    /// The property batching rests on: within a plan, a row's output is bit for bit the
    /// same from the one-row, few-rows and many-rows kernels, whatever rows share its step.
    #[test]
    fn every_kernel_of_a_plan_sums_a_row_alike() {
        let mut rng = Rng::new(7);
        let (k, n, t) = (576, 70, 21usize);
        for ty in [GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::F16, GgmlType::Q6_K] {
            let k = if ty.block_len() == 256 { 768 } else { k };
            let bytes = random_weights(&mut rng, ty, k, n);
            let w = QuantMatrix::upload(&gpu().0, "w", ty, k, n, &bytes).unwrap();
            let x = rng.vec(t * k, 1.0);
            let zeros = vec![0.0; t * n];
            // The integer-dot path too (it applies to Q8_0; the others keep the float kernels).
            for plan in plans().into_iter().flat_map(|p| [p, int8(p)]) {
                let many = gpu_matmul(&w, &x, &zeros, t as u32, t as u32, false, plan);
                // x through a uniform binding or a storage one: the same sums.
                for plan in [plan, MatmulPlan { uniform_x: !plan.uniform_x, ..plan }] {
                    for few in [2, 3, 6] {
                        let got = gpu_matmul(&w, &x[..few * k], &zeros[..few * n], few as u32, few as u32, false, plan);
                        assert_eq!(got[..], many[..few * n], "{ty} {plan:?}: {few} rows vs many");
                    }
                    for row in [0, 3, 20] {
                        let one = gpu_matmul(&w, &x[row * k..(row + 1) * k], &zeros[..n], 1, 1, false, plan);
                        assert_eq!(one[..], many[row * n..(row + 1) * n], "{ty} {plan:?}: row {row} alone vs many");
                    }
                }
            }
        }
    }

    /// Several matrices of one input end to end, as one product writing each output
    /// (`matmul_into`), give every output the bits its matrix gives alone: for every plan
    /// (the integer-dot path too), class and format, the matrix split across bindings or
    /// not (parts that straddle outputs), overwriting and accumulating.
    #[test]
    fn fused_products_write_each_output_as_alone() {
        let (gpu, kernels) = gpu();
        let mut rng = Rng::new(8);
        let widths = [37usize, 16, 16, 9];
        let n: usize = widths.iter().sum();
        for ty in [GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::F16, GgmlType::Q6_K] {
            let k = if ty.block_len() == 256 { 256 } else { 96 };
            let bytes = random_weights(&mut rng, ty, k, n);
            let row_bytes = bytes.len() / n;
            let mut alone = Vec::new();
            let mut at = 0;
            for &w in &widths {
                let part = &bytes[at * row_bytes..(at + w) * row_bytes];
                alone.push(QuantMatrix::upload(gpu, "alone", ty, k, w, part).unwrap());
                at += w;
            }
            let whole = QuantMatrix::upload(gpu, "fused", ty, k, n, &bytes).unwrap();
            let split =
                QuantMatrix::upload_with_max_part(gpu, "fused", ty, k, n, &bytes, bytes.len() as u64 / 3).unwrap();
            assert!(split.parts().len() >= 3, "{ty}: {} parts", split.parts().len());
            // The integer-dot path takes Q8_0 only: the others' twins would run the same.
            let int8_too = ty == GgmlType::Q8_0;
            for plan in plans().into_iter().flat_map(|p| [Some(p), int8_too.then(|| int8(p))]).flatten() {
                for (t, accumulate) in [(1u32, false), (3, true), (12, false)] {
                    let x = rng.vec(t as usize * k, 1.0);
                    let inits: Vec<Vec<f32>> = widths.iter().map(|&w| rng.vec(t as usize * w, 1.0)).collect();
                    let want: Vec<Vec<f32>> = alone
                        .iter()
                        .zip(&inits)
                        .map(|(w, init)| gpu_matmul(w, &x, init, t, t, accumulate, plan))
                        .collect();
                    for fused in [&whole, &split] {
                        let xb = gpu.storage("x", size_of_val(&x[..]) as u64);
                        gpu.queue.write_buffer(&xb, 0, bytemuck::cast_slice(&x));
                        let outs: Vec<wgpu::Buffer> = inits.iter().map(|i| f32_buffer(gpu, i)).collect();
                        let step = step(gpu, t);
                        let mut rec = Recorder::new(gpu, kernels, &step, t).unwrap().for_rows(StepRows::of(t));
                        rec.set_matmul_plan(plan);
                        let acts: Vec<Act> = outs.iter().zip(widths).map(|(b, w)| Act::new(b, t, w as u32)).collect();
                        rec.matmul_into(fused, Act::new(&xb, t, k as u32), &acts, accumulate).unwrap();
                        let d = rec.finish();
                        let quantize = usize::from(plan.int8_dot && ty == GgmlType::Q8_0);
                        assert_eq!(d.len(), quantize + fused.parts().len(), "one dispatch per part");
                        submit(gpu, &d, t);
                        for (i, (b, want)) in outs.iter().zip(&want).enumerate() {
                            let got = gpu.read_f32(b, want.len()).unwrap();
                            let what = format!("{ty} {} parts t={t} {plan:?}: output {i}", fused.parts().len());
                            assert_eq!(&got, want, "{what}");
                        }
                    }
                }
            }
        }
        // Widths that do not add up to the matrix's rows are refused.
        let w = QuantMatrix::upload(gpu, "w", GgmlType::F32, 8, 4, &[0; 8 * 4 * 4]).unwrap();
        let (x, o) = (gpu.storage("x", 32), gpu.storage("o", 16));
        let step = step(gpu, 1);
        let mut rec = Recorder::new(gpu, kernels, &step, 1).unwrap();
        let e = rec.matmul_into(&w, Act::new(&x, 1, 8), &[Act::new(&o, 1, 2), Act::new(&o, 1, 1)], false);
        assert!(matches!(e, Err(Error::Shape { .. })), "{e:?}");
    }

    /// The cooperative-matrix plans of the test adapter (whose [`Gpu::coop_matrix`] must be
    /// set): one row matrix a workgroup and two, chunks of one or two multiply-adds.
    fn coop_plans() -> Vec<MatmulPlan> {
        let g = &gpu().0;
        let size = g.coop_matrix.expect("the test adapter computes through cooperative matrices");
        let plan = MatmulPlan::for_gpu(g);
        let shape = plan.coop.expect("the adapter's plan uses them");
        assert_eq!(shape.size, size);
        let step = size / 8;
        [(1, step), (2, 2 * step), (2, step)]
            .into_iter()
            .map(|(row_matrices, pieces)| MatmulPlan {
                coop: Some(CoopShape { row_matrices, pieces, ..shape }),
                ..plan
            })
            .collect()
    }

    /// `mm_coop` (in a child process on an adapter that offers cooperative matrices, see
    /// [`crate::testing::in_coop_child`]) against the CPU for every weight type, for one
    /// row, a few and many, with row and token counts that leave partial tiles, and over a
    /// split matrix; f16 products, so within 2e-3 of each output's magnitude. And the
    /// property batching rests on: a row's bits are the same alone, among a few and among
    /// many. And values f16 cannot hold keep what it would cut.
    #[test]
    fn cooperative_matrices_match_cpu_and_sum_a_row_alike() {
        if !crate::testing::in_coop_child("ops::matmul::tests::cooperative_matrices_match_cpu_and_sum_a_row_alike") {
            return;
        }
        // x = 1 + 2^-12 is 1 in f16; its remainder 2^-12 must still be multiplied in.
        let (k, n) = (256, 3);
        let w1 = 1.0f32 + 2f32.powi(-10);
        let ones: Vec<u8> = bytemuck::cast_slice(&vec![w1; k * n]).to_vec();
        let w = QuantMatrix::upload(&gpu().0, "w", GgmlType::F32, k, n, &ones).unwrap();
        let x = vec![1.0f32 + 2f32.powi(-12); k];
        for plan in coop_plans() {
            let got = gpu_matmul(&w, &x, &[0.0; 3], 1, 1, false, plan);
            let want = k as f32 * w1 * x[0];
            assert_close(&got, &[want; 3], 1e-4, 0.0, &format!("x beyond f16's precision {plan:?}"));
        }
        let mut rng = Rng::new(21);
        let n = 131;
        for ty in TYPES {
            for k in widths(ty) {
                let bytes = random_weights(&mut rng, ty, k, n);
                let wf = dequantize(ty, &bytes).unwrap();
                let g = &gpu().0;
                let w = QuantMatrix::upload(g, "w", ty, k, n, &bytes).unwrap();
                let split =
                    QuantMatrix::upload_with_max_part(g, "w", ty, k, n, &bytes, bytes.len() as u64 / 3).unwrap();
                let rows: Vec<usize> = (0..n).collect();
                for plan in coop_plans() {
                    for (t, max_tokens) in [(1, 1), (3, 4), (8, 8), (21, 23)] {
                        let x = rng.vec(max_tokens * k, 1.0);
                        let init = rng.vec(max_tokens * n, 1.0);
                        let what = format!("{ty} k={k} n={n} t={t} {plan:?}");
                        let got = gpu_matmul(&w, &x, &init, t as u32, max_tokens as u32, true, plan);
                        let (want, mag) = cpu_matmul(&wf, k, &rows, &x, &init, t, true);
                        assert_rows_close_to(&got[..t * n], &want, &mag, 3e-4, &what);
                        assert_eq!(&got[t * n..], &init[t * n..], "{what}: tokens past the step were written");
                        let parts = gpu_matmul(&split, &x, &init, t as u32, max_tokens as u32, true, plan);
                        assert_eq!(parts, got, "{what}: split into {} parts", split.parts().len());
                        if t == 21 {
                            let zeros = vec![0.0; t * n];
                            let many = gpu_matmul(&w, &x[..t * k], &zeros, t as u32, t as u32, false, plan);
                            for few in [2, 5] {
                                let got = gpu_matmul(
                                    &w,
                                    &x[..few * k],
                                    &zeros[..few * n],
                                    few as u32,
                                    few as u32,
                                    false,
                                    plan,
                                );
                                assert_eq!(got[..], many[..few * n], "{what}: {few} rows vs many");
                            }
                            for row in [0, 9, 20] {
                                let one = gpu_matmul(&w, &x[row * k..(row + 1) * k], &zeros[..n], 1, 1, false, plan);
                                assert_eq!(one[..], many[row * n..(row + 1) * n], "{what}: row {row} alone vs many");
                            }
                        }
                    }
                }
            }
        }
    }

    /// The integer-dot twin of `plan`: the same lanes, splits and classes.
    fn int8(plan: MatmulPlan) -> MatmulPlan {
        MatmulPlan { int8_dot: true, ..plan }
    }

    /// `x`'s rows quantised as `quantize_x` does: per block of 32, the high bytes, the low
    /// bytes, and the scale max|x| / (127 * 254).
    fn cpu_quantize(x: &[f32]) -> (Vec<i8>, Vec<f32>) {
        let (mut q, mut d) = (Vec::new(), Vec::new());
        for block in x.chunks_exact(32) {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            let u: Vec<f32> = block.iter().map(|v| v * inv).collect();
            q.extend(u.iter().map(|u| u.round_ties_even() as i8));
            q.extend(u.iter().map(|u| ((u - u.round_ties_even()) * 254.0).round_ties_even() as i8));
            d.push(amax / (127.0 * 254.0));
        }
        (q, d)
    }

    /// The values quantised blocks stand for.
    fn dequantize_x(q: &[i8], d: &[f32]) -> Vec<f32> {
        q.chunks_exact(64)
            .zip(d)
            .flat_map(|(b, &d)| (0..32).map(move |i| (254.0 * f32::from(b[i]) + f32::from(b[32 + i])) * d))
            .collect()
    }

    /// `out` after an integer-dot `matmul` on `t` rows (buffers of `max_tokens` rows), and
    /// the quantised x it computed from: its signed bytes and scales, for `t` rows.
    fn gpu_matmul_int8(
        w: &QuantMatrix,
        x: &[f32],
        init: &[f32],
        t: u32,
        max_tokens: u32,
        plan: MatmulPlan,
    ) -> (Vec<f32>, Vec<i8>, Vec<f32>) {
        let (gpu, kernels) = gpu();
        let xb = f32_buffer(gpu, x);
        let (out, step) = (f32_buffer(gpu, init), step(gpu, t));
        let mut rec = Recorder::new(gpu, kernels, &step, max_tokens).unwrap().for_rows(StepRows::of(t));
        rec.set_matmul_plan(int8(plan));
        let k = w.k() as u32;
        let (xa, oa) = (Act::new(&xb, max_tokens, k), Act::new(&out, max_tokens, w.n() as u32));
        rec.matmul(w, xa, oa, true).unwrap();
        let scratch = rec.int8_x.take().expect("the integer-dot path quantised x");
        let d = rec.finish();
        assert_eq!(d.len(), 1 + w.parts().len(), "quantize_x, then mm_dot per part");
        submit(gpu, &d, t);
        let q = gpu.read_bytes(&scratch.q, 0, u64::from(t * k * 2)).unwrap().into_iter().map(|b| b as i8).collect();
        let scales = gpu.read_f32(&scratch.d, (t * k / 32) as usize).unwrap();
        (gpu.read_f32(&out, init.len()).unwrap(), q, scales)
    }

    /// The integer-dot path against its CPU twin: x quantised alike (a value may differ by
    /// one low step where the GPU's division rounds the other way), then every block's exact
    /// integer sums times the two scales, for one row, a few and many, in every plan, with
    /// odd row counts and a split matrix; and the result within 1e-4 of the float product.
    #[test]
    fn int8_dot_matches_its_cpu_twin() {
        let mut rng = Rng::new(11);
        let n = 131;
        for (k, max_part) in [(576, None), (256, Some(2048)), (1536, None)] {
            let bytes = random_weights(&mut rng, GgmlType::Q8_0, k, n);
            let wf = dequantize(GgmlType::Q8_0, &bytes).unwrap();
            let g = &gpu().0;
            let w = match max_part {
                Some(m) => QuantMatrix::upload_with_max_part(g, "w", GgmlType::Q8_0, k, n, &bytes, m).unwrap(),
                None => QuantMatrix::upload(g, "w", GgmlType::Q8_0, k, n, &bytes).unwrap(),
            };
            assert!(max_part.is_none() || w.parts().len() > 1);
            for plan in plans() {
                for (t, max_tokens) in [(1, 1), (2, 2), (3, 4), (8, 8), (21, 23)] {
                    let mut x = rng.vec(max_tokens * k, 1.0);
                    // A block of zeros (scale 0) and one of a single large value.
                    x[32..64].fill(0.0);
                    x[64..96].iter_mut().enumerate().for_each(|(i, v)| *v = if i == 5 { -40.0 } else { 0.0 });
                    let init = rng.vec(max_tokens * n, 1.0);
                    let what = format!("k={k} t={t} {plan:?}");
                    let (got, q, d) = gpu_matmul_int8(&w, &x, &init, t as u32, max_tokens as u32, plan);
                    let (want_q, want_d) = cpu_quantize(&x[..t * k]);
                    let (xq, want_xq) = (dequantize_x(&q, &d), dequantize_x(&want_q, &want_d));
                    for (i, (a, b)) in xq.iter().zip(&want_xq).enumerate() {
                        let step = d[i / 32];
                        assert!((a - b).abs() <= 1.01 * step, "{what}: value {i}: {a} vs {b} (step {step})");
                    }
                    assert_close(&d, &want_d, 1e-9, 1e-6, &format!("{what}: scales"));
                    assert_eq!(
                        (q[128 + 5], q[128 + 32 + 5]),
                        (-127, 0),
                        "{what}: a block's largest value is +-127 steps"
                    );
                    // The twin sums from the GPU's own bytes, so the comparison is of the sums.
                    let (want, mag) = cpu_matmul(&wf, k, &(0..n).collect::<Vec<_>>(), &xq, &init[..t * n], t, true);
                    assert_rows_close(&got[..t * n], &want, &mag, &what);
                    assert_eq!(&got[t * n..], &init[t * n..], "{what}: tokens past the step were written");
                    // And the quantisation keeps the product close to the float one.
                    let (exact, _) = cpu_matmul(&wf, k, &(0..n).collect::<Vec<_>>(), &x, &init, t, true);
                    assert_rows_close(&got[..t * n], &exact, &mag, &format!("{what}: against float x"));
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
            for plan in [MatmulPlan::for_gpu(&gpu().0), MatmulPlan::gpu()] {
                for t in [1, 5, 12] {
                    let x = rng.vec(t * k, 1.0);
                    let init = rng.vec(t * n, 1.0);
                    let got = gpu_matmul(&w, &x, &init, t as u32, t as u32, true, plan);
                    let (want, mag) = cpu_matmul(&wf, k, &rows, &x, &init, t, true);
                    assert_rows_close(&got, &want, &mag, &format!("split {ty} t={t} {plan:?}"));
                }
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
        let x = rng.vec(2 * k, 1.0);
        let init = rng.vec(2 * n, 1.0);
        let got = gpu_matmul(&w, &x, &init, 2, 2, true, MatmulPlan::for_gpu(gpu));
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
        let init_rows: Vec<f32> =
            (0..2).flat_map(|t| rows.iter().map(move |&r| (t, r))).map(|(t, r)| init[t * n + r]).collect();
        let (want, mag) = cpu_matmul(&wf, k, &(0..rows.len()).collect::<Vec<_>>(), &x, &init_rows, 2, true);
        let got: Vec<f32> =
            (0..2).flat_map(|t| rows.iter().map(move |&r| (t, r))).map(|(t, r)| got[t * n + r]).collect();
        assert_rows_close(&got, &want, &mag, "split output head");
    }

    #[test]
    fn matmul_rejects_small_buffers_and_bad_plans() {
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
        for plan in [
            MatmulPlan { splits: 3, ..MatmulPlan::gpu() },
            MatmulPlan { splits: 2, ..MatmulPlan::cpu(Some(8)) },
            MatmulPlan { splits: 8, ..MatmulPlan::gpu() },
        ] {
            rec.set_matmul_plan(plan);
            let err = rec.matmul(&w, Act::new(&x, 2, 64), Act::new(&out, 2, 4), false).unwrap_err();
            assert!(err.to_string().contains("matmul plan"), "{plan:?}: {err}");
        }
    }

    #[test]
    fn step_rows_classes() {
        use StepRows::*;
        assert_eq!(
            [0, 1, 2, 3, 4, 5, 8, 9, 512].map(StepRows::of),
            [One, One, Few(2), Few(3), Few(4), Few(5), Few(8), Many, Many]
        );
        assert_eq!(StepRows::up_to(1), [One]);
        assert_eq!(StepRows::up_to(3), [One, Few(2), Few(3)]);
        assert_eq!(
            StepRows::up_to(8),
            (2..=8).map(Few).fold(vec![One], |mut v, c| {
                v.push(c);
                v
            })
        );
        assert_eq!(StepRows::up_to(128).len(), 9);
        assert_eq!(StepRows::up_to(128).last(), Some(&Many));
    }
}
