//! Attention over the paged KV pool ([`LayerKv`] through a [`BlockTable`]): storing the
//! step's keys and values, then causal softmax attention of each row's query heads over
//! its own sequence's positions (grouped-query: several query heads share one KV head).
//! Decode and prefill rows of any sequences use the same two dispatches; each row's
//! position and slot come from the step's [`crate::batch::RowInfo`]s.

use strata_model::plan;
use strata_shaders::Kernel;

use super::matmul::{FEW_ROWS, StepRows};
use super::recorder::{Act, Recorder};
use crate::gpu::{Dim, Workgroups};
use crate::kv_pool::{BlockTable, LayerKv};
use crate::{Error, Result};

/// Threads per workgroup of `kv_store.wgsl`.
const STORE_WG: u32 = 64;
/// Threads per workgroup of `attention.wgsl`, and keys per tile.
const ATTN_WG: u32 = 64;
/// Rows of one sequence a subgroup of `attention_sg.wgsl` takes at once, each key read
/// once for all of them, at most: more spill the lanes' registers.
const LANES_ROWS: u32 = 4;

/// The most vec4s of per-lane state `attention_sg.wgsl` is given: a lane's quads of a
/// head times the query heads (a decode row) or rows (a group) its workgroup holds. On
/// lavapipe (Mesa 22.3, LLVM 15) with 4-lane subgroups (`LP_NATIVE_VECTOR_WIDTH=128`),
/// heads of 256 at 64 (4 query heads or rows of 16 quads) gave wrong outputs past a few
/// hundred positions, and at 48 right ones (`split_and_looped_chunks_give_the_same_bits`
/// found it: Qwen3.6-27B's layout, 1,200 positions). Larger layouts take `attention.wgsl`.
const LANES_MAX_QUADS: u32 = 48;

/// Whether `attention_sg.wgsl` takes heads of `head_dim` over subgroups of `sg` lanes with
/// `group` query heads per KV head: in every class of step alike (its groups hold up to
/// [`LANES_ROWS`] rows), so that a row's bits never depend on what shares its step.
fn lanes_fit(sg: u32, head_dim: u32, group: u32) -> bool {
    head_dim.is_multiple_of(4 * sg) && head_dim / 4 / sg * group.max(LANES_ROWS) <= LANES_MAX_QUADS
}

/// Rows per subgroup of `attention_sg.wgsl` in a recording for steps of `class`: no more
/// than such a step has, since every row of a group costs registers whether or not the
/// step fills it (on lavapipe a 2-row step ran its attention 118 -> 83 ms faster with
/// groups of 2 than of 4, at 1,800 positions).
fn lanes_rows(class: StepRows) -> u32 {
    match class {
        StepRows::One => 1,
        StepRows::Few(n) => n.min(LANES_ROWS),
        StepRows::Many => LANES_ROWS,
    }
}

/// Which attention kernel an adapter runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKernel {
    /// `attention.wgsl`: a workgroup of 64 threads per (row, head), keys in tiles through
    /// workgroup memory. GPUs.
    Tiled,
    /// `attention_sg.wgsl`: one subgroup of this many lanes per (row, KV head), the lanes
    /// splitting the head's dims, keys one at a time: no workgroup memory, no barriers.
    /// CPU adapters whose subgroups are SIMD lanes of one thread, where workgroup memory is
    /// a loop over the lanes.
    Lanes(u32),
}

impl AttentionKernel {
    pub fn for_gpu(gpu: &crate::gpu::Gpu) -> AttentionKernel {
        gpu.cpu_subgroup().map_or(AttentionKernel::Tiled, AttentionKernel::Lanes)
    }
}

/// One attention layer's part of the pool and the stage's block table: where a layer's
/// keys and values are.
#[derive(Clone, Copy)]
pub struct PagedKv<'a> {
    pub layer: &'a LayerKv,
    pub table: &'a BlockTable,
}

impl PagedKv<'_> {
    fn check(&self, op: &'static str) -> Result<()> {
        if self.layer.layout() != self.table.layout() {
            let message =
                format!("a layer's pool of {:?} with a table of {:?}", self.layer.layout(), self.table.layout());
            return Err(Error::Shape { op, message });
        }
        Ok(())
    }
}

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct StoreParams {
    row_pairs: u32,
    block_shift: u32,
    max_blocks: u32,
    n_blocks: u32,
}

impl Recorder<'_> {
    /// Writes the step's keys `k` and values `v` (rows of `n_kv_heads * head_dim`) into the
    /// pool, each row at its position in its sequence's blocks (`rows`: the step's
    /// [`crate::batch::RowInfo`]s, 4 words each). The stage gives every sequence its blocks
    /// before the step; a row whose block is missing is skipped.
    pub fn kv_store(&mut self, kv: PagedKv<'_>, k: Act<'_>, v: Act<'_>, rows: Act<'_>) -> Result<()> {
        kv.check("kv_store")?;
        let (layer, layout) = (kv.layer, kv.table.layout());
        let row_pairs = layer.n_kv_heads() * layer.head_dim() / 2;
        let k = self.bind_act("kv_store", "k", k, 2 * row_pairs)?;
        let v = self.bind_act("kv_store", "v", v, 2 * row_pairs)?;
        let rows = self.bind_act("kv_store", "rows", rows, 4)?;
        let params = StoreParams {
            row_pairs,
            block_shift: layout.block_shift(),
            max_blocks: layout.max_blocks,
            n_blocks: layout.blocks,
        };
        let params = self.uniform("kv_store", &params);
        let pipeline = self.pipeline(Kernel::KV_STORE, &[], &[])?;
        let table = kv.table.buffer().as_entire_binding();
        let resources = [rows, table, k, v, layer.k().as_entire_binding(), layer.v().as_entire_binding()];
        let workgroups = Workgroups(Dim::Fixed(row_pairs.div_ceil(STORE_WG)), Dim::Tokens { group: 1 }, Dim::Fixed(1));
        self.dispatch("kv_store", pipeline, &params, &resources, workgroups);
        Ok(())
    }
}

/// Where the output gate of gated attention (qwen35) is: the gate of value `d` of head `h`
/// of row `t` is `gate[(t * n_heads + h) * stride + offset + d]`.
#[derive(Debug, Clone, Copy)]
pub struct OutputGate<'a> {
    /// Rows of `n_heads * stride`.
    pub gate: Act<'a>,
    /// `head_dim` for a `[n_tokens, n_heads, head_dim]` buffer; `2 * head_dim` with
    /// `offset = head_dim` for the gate halves of a fused `[query | gate]` projection.
    pub stride: u32,
    pub offset: u32,
}

/// The attention of one layer: `n_heads` query heads over the pool's KV heads.
#[derive(Debug, Clone, Copy)]
pub struct Attention<'a> {
    pub n_heads: u32,
    /// Multiplies the scores; `1 / sqrt(head_dim)` by default.
    pub scale: f32,
    /// `out *= sigmoid(gate)` after attention.
    pub gate: Option<OutputGate<'a>>,
    /// Where `attention.wgsl` leaves the states of a decode step's chunks of keys
    /// ([`strata_model::plan::attention_parts_bytes`]): with it, steps of up to
    /// [`FEW_ROWS`] rows spread each row's keys over several workgroups per head. `None`,
    /// too small for the recording's rows, or [`crate::gpu::Gpu::split_attention`] off:
    /// each row's workgroup runs all its chunks.
    pub parts: Option<&'a wgpu::Buffer>,
}

impl Attention<'_> {
    pub fn new(n_heads: u32, head_dim: u32) -> Self {
        Attention { n_heads, scale: 1.0 / (head_dim as f32).sqrt(), gate: None, parts: None }
    }
}

/// How `attention.wgsl` runs a row's chunks of keys (its `params.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkMode {
    /// One workgroup per (row, head) runs them one after another.
    Loop = 0,
    /// One workgroup per (row, head, chunk), leaving the chunk's state in `parts` ...
    Split = 1,
    /// ... which one workgroup per (row, head) then combines.
    Merge = 2,
}

// The planner sizes `parts` for steps of up to its split rows; the recorder splits steps
// of the few-rows classes.
const _: () = assert!(FEW_ROWS as u64 == plan::ATTENTION_SPLIT_ROWS);

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct AttnParams {
    n_heads: u32,
    n_kv_heads: u32,
    group: u32,
    block_shift: u32,
    scale: f32,
    gated: u32,
    gate_stride: u32,
    gate_offset: u32,
    max_blocks: u32,
    mode: u32,
    _pad: [u32; 2],
}

impl Recorder<'_> {
    /// `out[t, h] = sum_j softmax_j(scale * q[t, h] . K[j, g]) V[j, g]` over positions
    /// `j = 0..=pos` of row `t`'s own sequence, for KV head `g = h / (n_heads /
    /// n_kv_heads)`; then gated if asked. `q` and `out`: rows of `n_heads * head_dim`;
    /// `rows`: the step's [`crate::batch::RowInfo`]s. The step's keys and values must be
    /// stored first ([`Recorder::kv_store`], earlier in the same pass), and every position
    /// up to a row's must hold its sequence's keys.
    pub fn attention(
        &mut self,
        kv: PagedKv<'_>,
        q: Act<'_>,
        rows: Act<'_>,
        out: Act<'_>,
        attn: Attention<'_>,
    ) -> Result<()> {
        let shape = |message: String| Error::Shape { op: "attention", message };
        kv.check("attention")?;
        let (layer, layout) = (kv.layer, kv.table.layout());
        let (n_heads, n_kv_heads, head_dim) = (attn.n_heads, layer.n_kv_heads(), layer.head_dim());
        if n_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) {
            return Err(shape(format!("{n_heads} query heads over {n_kv_heads} KV heads")));
        }
        if out.same_buffer(&q) {
            return Err(shape("out must not be q".into()));
        }
        let q_binding = self.bind_act("attention", "q", q, n_heads * head_dim)?;
        let out_binding = self.bind_act("attention", "out", out, n_heads * head_dim)?;
        let rows = self.bind_act("attention", "rows", rows, 4)?;
        let (gate, gate_stride, gate_offset) = match attn.gate {
            Some(g) => {
                if g.stride < head_dim || g.offset > g.stride - head_dim {
                    return Err(shape(format!(
                        "gate stride {} and offset {} for heads of {head_dim}",
                        g.stride, g.offset
                    )));
                }
                if g.gate.same_buffer(&out) {
                    return Err(shape("out must not be the gate".into()));
                }
                (self.bind_act("attention", "gate", g.gate, n_heads * g.stride)?, g.stride, g.offset)
            }
            // An unread binding: any buffer that is only read.
            None => (q_binding.clone(), 0, 0),
        };
        let params = AttnParams {
            n_heads,
            n_kv_heads,
            group: n_heads / n_kv_heads,
            block_shift: layout.block_shift(),
            scale: attn.scale,
            gated: u32::from(attn.gate.is_some()),
            gate_stride,
            gate_offset,
            max_blocks: layout.max_blocks,
            mode: ChunkMode::Loop as u32,
            _pad: [0; 2],
        };
        let resources = vec![
            rows,
            kv.table.buffer().as_entire_binding(),
            q_binding,
            layer.k().as_entire_binding(),
            layer.v().as_entire_binding(),
            gate,
            out_binding,
        ];
        match self.attention_kernel() {
            // Heads the lanes split evenly, four dims at a time, and state the lanes hold.
            AttentionKernel::Lanes(sg) if lanes_fit(sg, head_dim, n_heads / n_kv_heads) => {
                // A KV head's query heads in one workgroup.
                let consts = [
                    ("HEAD_DIM", format!("{head_dim}u")),
                    ("SG", format!("{sg}u")),
                    ("LANE_QUADS", format!("{}u", head_dim / 4 / sg)),
                    ("ROWS", format!("{}u", lanes_rows(self.step_rows()))),
                    ("GQ", format!("{}u", n_heads / n_kv_heads)),
                ];
                let pipeline = self.pipeline(Kernel::ATTENTION_SG, &[], &consts)?;
                let params = self.uniform("attention", &params);
                let workgroups = Workgroups(Dim::Tokens { group: 1 }, Dim::Fixed(n_kv_heads), Dim::Fixed(1));
                self.dispatch("attention", pipeline, &params, &resources, workgroups);
                Ok(())
            }
            _ => self.attention_tiled(params, head_dim, attn.parts, resources),
        }
    }

    /// `attention.wgsl`: a workgroup per query head, and per chunk of keys where the
    /// recording's steps are small enough for `parts` (then a second dispatch combines
    /// the chunks). `resources`: bindings 2 to 8.
    fn attention_tiled<'b>(
        &mut self,
        params: AttnParams,
        head_dim: u32,
        parts: Option<&'b wgpu::Buffer>,
        mut resources: Vec<wgpu::BindingResource<'b>>,
    ) -> Result<()> {
        let pairs = head_dim / 2;
        let consts = [
            ("HEAD_DIM", format!("{head_dim}u")),
            ("WG", format!("{ATTN_WG}u")),
            ("PAIRS_PER_THREAD", format!("{}u", pairs.div_ceil(ATTN_WG))),
            ("SLICES", format!("{}u", (ATTN_WG / pairs).max(1))),
            ("SPLITS", format!("{}u", plan::ATTENTION_SPLITS)),
            ("CHUNK_MIN", format!("{}u", plan::ATTENTION_CHUNK_MIN)),
        ];
        let pipeline = self.pipeline(Kernel::ATTENTION, &[], &consts)?;
        let heads = params.n_heads;
        let split_rows = match self.step_rows() {
            StepRows::One => Some(1),
            StepRows::Few(n) => Some(n),
            StepRows::Many => None,
        };
        let parts = parts.filter(|_| self.gpu().split_attention).filter(|p| {
            split_rows.is_some_and(|r| p.size() >= plan::attention_parts_bytes(r.into(), heads.into(), head_dim.into()))
        });
        let modes: &[(ChunkMode, u32)] = match parts {
            Some(parts) => {
                resources.push(parts.as_entire_binding());
                &[(ChunkMode::Split, plan::ATTENTION_SPLITS as u32), (ChunkMode::Merge, 1)]
            }
            None => {
                // An unread binding: the output, already bound read-write.
                resources.push(resources[6].clone());
                &[(ChunkMode::Loop, 1)]
            }
        };
        for &(mode, chunks) in modes {
            let params = self.uniform("attention", &AttnParams { mode: mode as u32, ..params });
            let workgroups = Workgroups(Dim::Fixed(chunks), Dim::Fixed(heads), Dim::Tokens { group: 1 });
            self.dispatch("attention", pipeline.clone(), &params, &resources, workgroups);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::*;
    use crate::batch::{BatchLayout, Run};
    use crate::gpu::{Dispatch, Step};
    use crate::kv_pool::KvLayout;
    use crate::ops::harness::{f32_buffer, record, record_for, run_step, step_buffer};
    use crate::testing::{Rng, assert_close, gpu};

    fn round_f16(x: &[f32]) -> Vec<f32> {
        x.iter().map(|&v| f16::from_f32(v).to_f32()).collect()
    }

    /// The CPU twin of one sequence's cache: K and V by position, rounded to f16 as stored.
    #[derive(Default, Clone)]
    struct Twin {
        k: Vec<f32>,
        v: Vec<f32>,
    }

    /// A GPU attention layer over a pool, with sequences in slots, buffers for steps of
    /// up to `max_tokens` rows and its two dispatches, and the CPU twin of each slot.
    struct Layer {
        kv: LayerKv,
        table: BlockTable,
        step: wgpu::Buffer,
        q: wgpu::Buffer,
        k: wgpu::Buffer,
        v: wgpu::Buffer,
        rows: wgpu::Buffer,
        out: wgpu::Buffer,
        /// Where split attention leaves its chunks' states.
        _parts: wgpu::Buffer,
        /// A list per class of step, as a stage records them: small steps split each
        /// row's keys over workgroups (`attention.wgsl`), large ones do not.
        dispatches: Vec<(StepRows, Vec<Dispatch>)>,
        held: Vec<Vec<u32>>,
        twins: Vec<Twin>,
        n_heads: usize,
        n_kv: usize,
        hd: usize,
    }

    impl Layer {
        #[allow(clippy::too_many_arguments)]
        fn new(
            kernel: AttentionKernel,
            n_heads: u32,
            n_kv: u32,
            hd: u32,
            ctx: u32,
            blocks: u32,
            slots: u32,
            max_tokens: u32,
            gate: Option<(&wgpu::Buffer, u32, u32)>,
        ) -> Layer {
            let (gpu, _) = gpu();
            let layout = KvLayout::new(16, blocks, slots, ctx).unwrap();
            let kv = LayerKv::new(gpu, layout, n_kv, hd).unwrap();
            let table = BlockTable::new(gpu, layout).unwrap();
            let act = |heads: u32| gpu.storage("act", u64::from(max_tokens * heads * hd) * 4);
            let (q, k, v, out) = (act(n_heads), act(n_kv), act(n_kv), act(n_heads));
            let rows = gpu.storage("rows", u64::from(max_tokens) * 16);
            let step = step_buffer(gpu);
            let parts = gpu.storage("parts", plan::attention_parts_bytes(max_tokens.into(), n_heads.into(), hd.into()));
            let mut attn = Attention::new(n_heads, hd);
            attn.gate = gate.map(|(gate, stride, offset)| OutputGate {
                gate: Act::new(gate, max_tokens, n_heads * stride),
                stride,
                offset,
            });
            attn.parts = Some(&parts);
            let act = |b, heads| Act::new(b, max_tokens, heads * hd);
            let dispatches = StepRows::up_to(max_tokens)
                .into_iter()
                .map(|class| {
                    let list = record_for(&step, max_tokens, class, |rec| {
                        rec.set_attention_kernel(kernel);
                        let (paged, rows) = (PagedKv { layer: &kv, table: &table }, Act::new(&rows, max_tokens, 4));
                        rec.kv_store(paged, act(&k, n_kv), act(&v, n_kv), rows)?;
                        rec.attention(paged, act(&q, n_heads), rows, act(&out, n_heads), attn)
                    });
                    (class, list.unwrap())
                })
                .collect();
            let (n_heads, n_kv, hd) = (n_heads as usize, n_kv as usize, hd as usize);
            let slots = slots as usize;
            Layer {
                kv,
                table,
                step,
                q,
                k,
                v,
                rows,
                out,
                _parts: parts,
                dispatches,
                held: vec![Vec::new(); slots],
                twins: vec![Twin::default(); slots],
                n_heads,
                n_kv,
                hd,
            }
        }

        /// Writes a step of `runs` with its k and v rows, giving each sequence its blocks;
        /// `attend`: run attention too (else only store, a cache filled by earlier steps).
        fn submit(&mut self, runs: &[Run], q: &[f32], k: &[f32], v: &[f32], attend: bool) {
            let (gpu, _) = gpu();
            let layout = BatchLayout::new(runs);
            for r in runs {
                self.table.grow(&gpu.queue, r.slot, &mut self.held[r.slot as usize], r.pos + r.n).unwrap();
            }
            for (b, data) in [(&self.q, q), (&self.k, k), (&self.v, v)] {
                gpu.queue.write_buffer(b, 0, bytemuck::cast_slice(data));
            }
            gpu.queue.write_buffer(&self.rows, 0, bytemuck::cast_slice(&layout.rows));
            let step = Step::new(layout.n_rows(), layout.n_seqs());
            let class = StepRows::of(layout.n_rows());
            let list = &self.dispatches.iter().find(|(c, _)| *c == class).expect("a list for every class").1;
            let list = if attend { &list[..] } else { &list[..1] };
            run_step(gpu, &self.step, list, step);
            let row = self.n_kv * self.hd;
            for (info, (kr, vr)) in layout.rows.iter().zip(k.chunks_exact(row).zip(v.chunks_exact(row))) {
                let twin = &mut self.twins[info.slot as usize];
                let at = info.pos as usize * row;
                if twin.k.len() < at + row {
                    twin.k.resize(at + row, 0.0);
                    twin.v.resize(at + row, 0.0);
                }
                twin.k[at..at + row].copy_from_slice(&round_f16(kr));
                twin.v[at..at + row].copy_from_slice(&round_f16(vr));
            }
        }

        fn step(&mut self, runs: &[Run], q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
            self.submit(runs, q, k, v, true);
            gpu().0.read_f32(&self.out, q.len()).unwrap()
        }

        fn rows_of(runs: &[Run]) -> usize {
            runs.iter().map(|r| r.n as usize).sum()
        }

        /// Stores random keys and values for `runs` without attending.
        fn random_fill(&mut self, rng: &mut Rng, runs: &[Run]) {
            let n = Self::rows_of(runs) * self.n_kv * self.hd;
            let (k, v) = (rng.vec(n, 1.0), rng.vec(n, 1.0));
            let q = vec![0.0; Self::rows_of(runs) * self.n_heads * self.hd];
            self.submit(runs, &q, &k, &v, false);
        }

        /// Random q, k, v for a step of `runs`.
        fn random_inputs(&self, rng: &mut Rng, runs: &[Run]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
            let t = Self::rows_of(runs);
            let q = rng.vec(t * self.n_heads * self.hd, 3.0);
            (q, rng.vec(t * self.n_kv * self.hd, 1.0), rng.vec(t * self.n_kv * self.hd, 1.0))
        }

        fn random_step(&mut self, rng: &mut Rng, runs: &[Run]) -> (Vec<f32>, Vec<f32>) {
            let (q, k, v) = self.random_inputs(rng, runs);
            let out = self.step(runs, &q, &k, &v);
            (q, out)
        }

        /// Attention in f64 of each row over its own sequence's twin; `gate` as (buffer,
        /// stride, offset).
        fn want(&self, runs: &[Run], q: &[f32], gate: Option<(&[f32], usize, usize)>) -> Vec<f32> {
            let (hd, row) = (self.hd, self.n_kv * self.hd);
            let scale = 1.0 / (hd as f64).sqrt();
            let group = self.n_heads / self.n_kv;
            let mut out = Vec::new();
            for (t, info) in BatchLayout::new(runs).rows.iter().enumerate() {
                let twin = &self.twins[info.slot as usize];
                for h in 0..self.n_heads {
                    let qh = &q[(t * self.n_heads + h) * hd..][..hd];
                    let g = h / group;
                    let scores: Vec<f64> = (0..=info.pos as usize)
                        .map(|j| {
                            let kj = &twin.k[j * row + g * hd..][..hd];
                            qh.iter().zip(kj).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum::<f64>() * scale
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let p: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                    let l: f64 = p.iter().sum();
                    for d in 0..hd {
                        let o: f64 = p
                            .iter()
                            .enumerate()
                            .map(|(j, pj)| pj * f64::from(twin.v[j * row + g * hd + d]))
                            .sum::<f64>()
                            / l;
                        let o = match gate {
                            Some((gate, stride, offset)) => {
                                let gv = f64::from(gate[(t * self.n_heads + h) * stride + offset + d]);
                                o / (1.0 + (-gv).exp())
                            }
                            None => o,
                        };
                        out.push(o as f32);
                    }
                }
            }
            out
        }
    }

    fn run(slot: u32, pos: u32, n: u32) -> Run {
        Run { slot, pos, n, keep: 0 }
    }

    /// Every attention kernel this adapter can run.
    fn kernels() -> Vec<AttentionKernel> {
        let mut k = vec![AttentionKernel::Tiled];
        match gpu().0.cpu_subgroup() {
            Some(sg) => k.push(AttentionKernel::Lanes(sg)),
            None => eprintln!("no fixed CPU subgroup on this adapter: the lanes kernel is not run"),
        }
        k
    }

    #[test]
    fn lanes_kernel_takes_only_the_layouts_it_runs_right() {
        // SmolLM2 (heads of 64, 3 per KV head) on 8 or 4 lanes; Qwen3.6-27B (256, 6) on 8.
        assert!(lanes_fit(8, 64, 3) && lanes_fit(4, 64, 3) && lanes_fit(8, 256, 6));
        // Qwen3.6-27B on 4 lanes: 16 quads a lane for 6 heads, or for a group's 4 rows.
        assert!(!lanes_fit(4, 256, 6) && !lanes_fit(4, 256, 2));
        // Heads the lanes cannot split evenly.
        assert!(!lanes_fit(8, 80, 2));
    }

    #[test]
    fn kv_store_rounds_to_f16_in_each_sequences_blocks() {
        let (gpu, _) = gpu();
        let mut rng = Rng::new(11);
        let mut layer = Layer::new(AttentionKernel::Tiled, 4, 2, 64, 64, 8, 2, 24, None);
        // Two sequences, one across a block boundary, stored in one step.
        layer.random_step(&mut rng, &[run(1, 10, 9), run(0, 0, 3)]);
        let row = 2 * 64;
        for (buf, which) in [(layer.kv.k(), 0), (layer.kv.v(), 1)] {
            let bytes = gpu.read_bytes(buf, 0, buf.size()).unwrap();
            let pool: Vec<f32> = bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect();
            for (slot, positions) in [(1usize, 10..19usize), (0, 0..3)] {
                let twin = &layer.twins[slot];
                let want = if which == 0 { &twin.k } else { &twin.v };
                for p in positions {
                    let at = layer.held[slot][p / 16] as usize * 16 + p % 16;
                    // Bit for bit: the kernel rounds to nearest even, like `half`.
                    assert_eq!(&pool[at * row..(at + 1) * row], &want[p * row..(p + 1) * row], "slot {slot} at {p}");
                }
            }
        }
    }

    #[test]
    fn decode_matches_cpu_with_gqa() {
        let mut rng = Rng::new(12);
        // Heads of 32 (tiny-qwen3) and 80 use the kernel's other thread layouts: several
        // threads per output pair, and idle threads.
        for (kernel, (n_heads, n_kv, hd)) in kernels()
            .into_iter()
            .flat_map(|k| [(4, 2, 64), (8, 8, 64), (24, 4, 256), (4, 2, 32), (2, 1, 80)].map(|s| (k, s)))
        {
            for len in [1u32, 37, 300] {
                let mut layer = Layer::new(kernel, n_heads, n_kv, hd, 320, 20, 1, 320, None);
                if len > 1 {
                    layer.random_fill(&mut rng, &[run(0, 0, len - 1)]);
                }
                let runs = [run(0, len - 1, 1)];
                let (q, got) = layer.random_step(&mut rng, &runs);
                let want = layer.want(&runs, &q, None);
                let what = format!("{kernel:?}: {n_heads}/{n_kv} heads of {hd}, {len} positions");
                assert_close(&got, &want, 1e-5, 1e-4, &what);
            }
        }
    }

    #[test]
    fn decode_over_a_long_context() {
        let mut rng = Rng::new(13);
        let len = 3000u32;
        for kernel in kernels() {
            let mut layer = Layer::new(kernel, 4, 2, 64, 4096, 256, 1, 1024, None);
            for start in (0..len - 1).step_by(1024) {
                layer.random_fill(&mut rng, &[run(0, start, (len - 1 - start).min(1024))]);
            }
            let runs = [run(0, len - 1, 1)];
            let (q, got) = layer.random_step(&mut rng, &runs);
            assert_close(&got, &layer.want(&runs, &q, None), 1e-5, 1e-4, &format!("{kernel:?}: 3000 positions"));
        }
    }

    /// At long contexts a row's keys come in chunks: a small step spreads them over
    /// workgroups and combines their states in a second dispatch, a large one runs them
    /// in the row's workgroup. Both give the row the same bits, for every head layout.
    #[test]
    fn split_and_looped_chunks_give_the_same_bits() {
        let (gpu, _) = gpu();
        let mut rng = Rng::new(17);
        for (kernel, (n_heads, n_kv, hd)) in
            kernels().into_iter().flat_map(|k| [(4, 2, 64), (24, 4, 256), (2, 1, 80)].map(|s| (k, s)))
        {
            // Gated for one layout (the gate applied where the chunks are combined): the
            // same gates in every row, so that a row's output is the same in any step.
            let gated = n_heads == 4;
            let stride = 2 * hd as usize;
            let heads_gate = rng.vec(n_heads as usize * stride, 4.0);
            let qg: Vec<f32> = heads_gate.iter().copied().cycle().take(1024 * heads_gate.len()).collect();
            let qg_buffer = f32_buffer(gpu, &qg);
            let gate = gated.then_some((&qg_buffer, 2 * hd, hd));
            let mut layer = Layer::new(kernel, n_heads, n_kv, hd, 2048, 128, 2, 1024, gate);
            if kernel == AttentionKernel::Tiled && gpu.split_attention {
                // kv_store, then the chunks and their combination.
                assert_eq!(layer.dispatches[0].0, StepRows::One);
                assert_eq!(layer.dispatches[0].1.len(), 3);
                assert_eq!(layer.dispatches.last().unwrap().1.len(), 2);
            }
            layer.random_fill(&mut rng, &[run(0, 0, 1000), run(1, 0, 24)]);
            layer.random_fill(&mut rng, &[run(0, 1000, 200), run(1, 24, 676)]);
            // 12 rows of one sequence and a decode row of another: one large step ...
            let runs = [run(0, 1200, 12), run(1, 700, 1)];
            let (q, k, v) = layer.random_inputs(&mut rng, &runs);
            let got = layer.step(&runs, &q, &k, &v);
            let what = format!("{kernel:?}: {n_heads}/{n_kv} heads of {hd}, gated {gated}");
            let want_gate = gated.then_some((&qg[..], stride, hd as usize));
            assert_close(&got, &layer.want(&runs, &q, want_gate), 1e-5, 1e-4, &what);
            // ... the same rows in steps of 1 and of 4 (split where the kernel splits).
            let (qr, kr) = ((n_heads * hd) as usize, (n_kv * hd) as usize);
            let rows: Vec<Run> = (0..12).map(|i| run(0, 1200 + i, 1)).chain([run(1, 700, 1)]).collect();
            for size in [1, 4] {
                let mut again = Vec::new();
                for (i, group) in rows.chunks(size).enumerate() {
                    let at = i * size;
                    let n = group.len();
                    let merged: Vec<Run> = if group.iter().all(|r| r.slot == 0) {
                        vec![run(0, group[0].pos, n as u32)]
                    } else {
                        group.to_vec()
                    };
                    let s = |x: &[f32], w: usize| x[at * w..(at + n) * w].to_vec();
                    again.extend(layer.step(&merged, &s(&q, qr), &s(&k, kr), &s(&v, kr)));
                }
                assert_eq!(again, got, "{what}: steps of {size}");
            }
        }
    }

    #[test]
    fn prefill_matches_cpu_and_token_by_token() {
        let mut rng = Rng::new(14);
        for (kernel, (n_heads, n_kv, hd)) in
            kernels().into_iter().flat_map(|k| [(4, 2, 64), (24, 4, 256)].map(|s| (k, s)))
        {
            for t in [5u32, 40] {
                let cached = [run(0, 0, 10)];
                let new = [run(0, 10, t)];
                let layer = |k| Layer::new(k, n_heads, n_kv, hd, 64, 4, 1, 48, None);
                let (q0, k0, v0) = layer(kernel).random_inputs(&mut rng, &cached);
                let mut batch = layer(kernel);
                let (q, k, v) = batch.random_inputs(&mut rng, &new);

                // The whole prompt in one step, bound for a larger batch than it is.
                batch.step(&cached, &q0, &k0, &v0);
                let got = batch.step(&new, &q, &k, &v);
                let what = format!("{kernel:?}: {n_heads}/{n_kv} heads of {hd}, {t} tokens after 10");
                assert_close(&got, &batch.want(&new, &q, None), 1e-5, 1e-4, &what);

                // The same rows one at a time give the same bits.
                let mut single = layer(kernel);
                single.step(&cached, &q0, &k0, &v0);
                let (qr, kr) = (n_heads * hd, n_kv * hd);
                let mut one_by_one = Vec::new();
                for i in 0..t {
                    let s = |x: &[f32], w: u32| x[(i * w) as usize..((i + 1) * w) as usize].to_vec();
                    one_by_one.extend(single.step(&[run(0, 10 + i, 1)], &s(&q, qr), &s(&k, kr), &s(&v, kr)));
                }
                assert_eq!(got, one_by_one, "{what}: one by one");
            }
        }
    }

    /// Rows of different sequences, decode rows and a prefill run of different lengths
    /// mixed in one step, each attend to their own cache only, with the same bits as
    /// their sequence's step alone.
    #[test]
    fn each_row_attends_to_its_own_sequence_whatever_shares_its_step() {
        let mut rng = Rng::new(16);
        let (n_heads, n_kv, hd) = (4, 2, 64);
        for kernel in kernels() {
            let mut layer = Layer::new(kernel, n_heads, n_kv, hd, 256, 40, 4, 64, None);
            for runs in [&[run(2, 0, 60), run(0, 0, 3)][..], &[run(2, 60, 60)], &[run(2, 120, 30), run(3, 0, 34)]] {
                layer.random_fill(&mut rng, runs);
            }
            let runs = [run(2, 150, 1), run(1, 0, 7), run(0, 3, 1), run(3, 34, 5)];
            let (q, k, v) = layer.random_inputs(&mut rng, &runs);
            let got = layer.step(&runs, &q, &k, &v);
            assert_close(&got, &layer.want(&runs, &q, None), 1e-5, 1e-4, "a mixed step");
            let (qr, kr) = ((n_heads * hd) as usize, (n_kv * hd) as usize);
            let mut row = 0;
            for r in runs {
                let n = r.n as usize;
                let alone =
                    layer.step(&[r], &q[row * qr..][..n * qr], &k[row * kr..][..n * kr], &v[row * kr..][..n * kr]);
                assert_eq!(alone, got[row * qr..][..n * qr], "{kernel:?}: {r:?} alone");
                row += n;
            }
        }
    }

    #[test]
    fn gated_attention_reads_a_fused_query_gate_projection() {
        let (gpu, _) = gpu();
        let mut rng = Rng::new(15);
        let (n_heads, n_kv, hd, t) = (4u32, 2u32, 64u32, 6u32);
        // [query | gate] per head: the gates at offset hd of rows of 2 hd.
        let qg = rng.vec((t * n_heads * 2 * hd) as usize, 4.0);
        let qg_buffer = f32_buffer(gpu, &qg);
        for kernel in kernels() {
            let mut layer = Layer::new(kernel, n_heads, n_kv, hd, 16, 1, 1, t, Some((&qg_buffer, 2 * hd, hd)));
            let runs = [run(0, 0, t)];
            let (q, got) = layer.random_step(&mut rng, &runs);
            let want = layer.want(&runs, &q, Some((&qg, 2 * hd as usize, hd as usize)));
            assert_close(&got, &want, 1e-5, 1e-4, &format!("{kernel:?}: gated"));
        }
    }

    #[test]
    fn shapes_are_checked() {
        let (gpu, _) = gpu();
        let layout = KvLayout::new(16, 1, 1, 16).unwrap();
        let (kv, table) = (LayerKv::new(gpu, layout, 2, 64).unwrap(), BlockTable::new(gpu, layout).unwrap());
        let paged = PagedKv { layer: &kv, table: &table };
        let step = step_buffer(gpu);
        let rows = gpu.storage("rows", 4 * 16);
        let small = f32_buffer(gpu, &vec![0.0; 128]);
        let q = f32_buffer(gpu, &vec![0.0; 3 * 64]);
        let out = f32_buffer(gpu, &vec![0.0; 3 * 64]);
        let (small, rows) = (Act::new(&small, 1, 128), Act::new(&rows, 4, 4));
        assert!(record(&step, 1, |rec| rec.kv_store(paged, small, small, rows)).is_ok());
        assert!(record(&step, 2, |rec| rec.kv_store(paged, small, small, rows)).is_err());
        let attend = |heads, q: &wgpu::Buffer, out: &wgpu::Buffer| {
            let (q, out) = (Act::new(q, 1, heads * 64), Act::new(out, 1, heads * 64));
            record(&step, 1, |rec| rec.attention(paged, q, rows, out, Attention::new(heads, 64)))
        };
        assert!(attend(3, &q, &out).is_err());
        assert!(attend(2, &q, &out).is_ok());
        assert!(attend(2, &q, &q).is_err());
        // A layer's pool with another layout's table.
        let other = BlockTable::new(gpu, KvLayout::new(16, 2, 1, 16).unwrap()).unwrap();
        let e = record(&step, 1, |rec| rec.kv_store(PagedKv { layer: &kv, table: &other }, small, small, rows));
        assert!(e.is_err());
    }
}
