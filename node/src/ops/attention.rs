//! Attention over a [`KvCache`]: storing the step's keys and values, then causal softmax
//! attention of each token's query heads over the cache (grouped-query: several query
//! heads share one KV head). Decode and prefill use the same two dispatches; positions
//! come per token from a u32 buffer written by the caller each step.

use strata_shaders::Kernel;

use super::recorder::{Act, Recorder};
use crate::gpu::{Dim, Workgroups};
use crate::kv_cache::KvCache;
use crate::{Error, Result};

/// Threads per workgroup of `kv_store.wgsl`.
const STORE_WG: u32 = 64;
/// Threads per workgroup of `attention.wgsl`, and keys per tile.
const ATTN_WG: u32 = 64;

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct StoreParams {
    row_pairs: u32,
    capacity: u32,
    _pad: [u32; 2],
}

impl Recorder<'_> {
    /// Writes the step's keys `k` and values `v` (rows of `n_kv_heads * head_dim`) into
    /// `cache` at the step's `positions` (one u32 per row). Positions at or past the
    /// capacity are skipped; the caller keeps them in range.
    pub fn kv_store(&mut self, cache: &KvCache, k: Act<'_>, v: Act<'_>, positions: Act<'_>) -> Result<()> {
        let row_pairs = cache.n_kv_heads() * cache.head_dim() / 2;
        let k = self.bind_act("kv_store", "k", k, 2 * row_pairs)?;
        let v = self.bind_act("kv_store", "v", v, 2 * row_pairs)?;
        let positions = self.bind_act("kv_store", "positions", positions, 1)?;
        let params = self.uniform("kv_store", &StoreParams { row_pairs, capacity: cache.capacity(), _pad: [0; 2] });
        let pipeline = self.pipeline(Kernel::KV_STORE, None, &[])?;
        let resources = [positions, k, v, cache.k().as_entire_binding(), cache.v().as_entire_binding()];
        let workgroups = Workgroups(Dim::Fixed(row_pairs.div_ceil(STORE_WG)), Dim::Tokens { group: 1 }, Dim::Fixed(1));
        self.dispatch("kv_store", pipeline, &params, &resources, workgroups);
        Ok(())
    }
}

/// Where the output gate of gated attention (qwen35) is: the gate of value `d` of head `h`
/// of token `t` is `gate[(t * n_heads + h) * stride + offset + d]`.
#[derive(Debug, Clone, Copy)]
pub struct OutputGate<'a> {
    /// Rows of `n_heads * stride`.
    pub gate: Act<'a>,
    /// `head_dim` for a `[n_tokens, n_heads, head_dim]` buffer; `2 * head_dim` with
    /// `offset = head_dim` for the gate halves of a fused `[query | gate]` projection.
    pub stride: u32,
    pub offset: u32,
}

/// The attention of one layer: `n_heads` query heads over the cache's KV heads.
#[derive(Debug, Clone, Copy)]
pub struct Attention<'a> {
    pub n_heads: u32,
    /// Multiplies the scores; `1 / sqrt(head_dim)` by default.
    pub scale: f32,
    /// `out *= sigmoid(gate)` after attention.
    pub gate: Option<OutputGate<'a>>,
}

impl Attention<'_> {
    pub fn new(n_heads: u32, head_dim: u32) -> Self {
        Attention { n_heads, scale: 1.0 / (head_dim as f32).sqrt(), gate: None }
    }
}

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct AttnParams {
    n_heads: u32,
    n_kv_heads: u32,
    group: u32,
    capacity: u32,
    scale: f32,
    gated: u32,
    gate_stride: u32,
    gate_offset: u32,
}

impl Recorder<'_> {
    /// `out[t, h] = sum_j softmax_j(scale * q[t, h] . K[j, g]) V[j, g]` over cache positions
    /// `j = 0..=positions[t]`, for KV head `g = h / (n_heads / n_kv_heads)`; then gated if
    /// asked. `q` and `out`: rows of `n_heads * head_dim`. The step's keys and values must
    /// be stored first ([`Recorder::kv_store`], earlier in the same pass), and every
    /// position up to `positions[t]` must hold this sequence's keys.
    pub fn attention(
        &mut self,
        cache: &KvCache,
        q: Act<'_>,
        positions: Act<'_>,
        out: Act<'_>,
        attn: Attention<'_>,
    ) -> Result<()> {
        let shape = |message: String| Error::Shape { op: "attention", message };
        let (n_heads, n_kv_heads, head_dim) = (attn.n_heads, cache.n_kv_heads(), cache.head_dim());
        if n_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) {
            return Err(shape(format!("{n_heads} query heads over {n_kv_heads} KV heads")));
        }
        if out.same_buffer(&q) {
            return Err(shape("out must not be q".into()));
        }
        let q_binding = self.bind_act("attention", "q", q, n_heads * head_dim)?;
        let out_binding = self.bind_act("attention", "out", out, n_heads * head_dim)?;
        let positions = self.bind_act("attention", "positions", positions, 1)?;
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
            capacity: cache.capacity(),
            scale: attn.scale,
            gated: u32::from(attn.gate.is_some()),
            gate_stride,
            gate_offset,
        };
        let params = self.uniform("attention", &params);
        let pairs = head_dim / 2;
        let consts = [
            ("HEAD_DIM", format!("{head_dim}u")),
            ("WG", format!("{ATTN_WG}u")),
            ("PAIRS_PER_THREAD", format!("{}u", pairs.div_ceil(ATTN_WG))),
            ("SLICES", format!("{}u", (ATTN_WG / pairs).max(1))),
        ];
        let pipeline = self.pipeline(Kernel::ATTENTION, None, &consts)?;
        let resources =
            [positions, q_binding, cache.k().as_entire_binding(), cache.v().as_entire_binding(), gate, out_binding];
        let workgroups = Workgroups(Dim::Tokens { group: 1 }, Dim::Fixed(n_heads), Dim::Fixed(1));
        self.dispatch("attention", pipeline, &params, &resources, workgroups);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::*;
    use crate::gpu::Dispatch;
    use crate::ops::harness::{f32_buffer, record, run, step_buffer, u32_buffer};
    use crate::testing::{Rng, assert_close, gpu};

    /// A layer's shapes, and the CPU twin of its cache: K and V rounded to f16 as stored.
    struct Twin {
        n_heads: usize,
        n_kv: usize,
        hd: usize,
        k: Vec<f32>,
        v: Vec<f32>,
    }

    fn round_f16(x: &[f32]) -> Vec<f32> {
        x.iter().map(|&v| f16::from_f32(v).to_f32()).collect()
    }

    impl Twin {
        fn new(n_heads: usize, n_kv: usize, hd: usize, capacity: usize) -> Twin {
            Twin { n_heads, n_kv, hd, k: vec![0.0; capacity * n_kv * hd], v: vec![0.0; capacity * n_kv * hd] }
        }

        fn store(&mut self, k: &[f32], v: &[f32], positions: &[u32]) {
            let row = self.n_kv * self.hd;
            for (t, &p) in positions.iter().enumerate() {
                let p = p as usize;
                self.k[p * row..(p + 1) * row].copy_from_slice(&round_f16(&k[t * row..(t + 1) * row]));
                self.v[p * row..(p + 1) * row].copy_from_slice(&round_f16(&v[t * row..(t + 1) * row]));
            }
        }

        /// Attention in f64; `gate` as (buffer, stride, offset).
        fn attend(&self, q: &[f32], positions: &[u32], scale: f32, gate: Option<(&[f32], usize, usize)>) -> Vec<f32> {
            let (hd, row) = (self.hd, self.n_kv * self.hd);
            let group = self.n_heads / self.n_kv;
            let mut out = Vec::new();
            for (t, &pos) in positions.iter().enumerate() {
                for h in 0..self.n_heads {
                    let qh = &q[(t * self.n_heads + h) * hd..][..hd];
                    let g = h / group;
                    let scores: Vec<f64> = (0..=pos as usize)
                        .map(|j| {
                            let kj = &self.k[j * row + g * hd..][..hd];
                            qh.iter().zip(kj).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum::<f64>()
                                * f64::from(scale)
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let p: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                    let l: f64 = p.iter().sum();
                    for d in 0..hd {
                        let o: f64 = p
                            .iter()
                            .enumerate()
                            .map(|(j, pj)| pj * f64::from(self.v[j * row + g * hd + d]))
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

    /// A GPU layer: cache, buffers for up to `max_tokens`, and its two dispatches.
    struct Layer {
        cache: KvCache,
        step: wgpu::Buffer,
        q: wgpu::Buffer,
        k: wgpu::Buffer,
        v: wgpu::Buffer,
        pos: wgpu::Buffer,
        out: wgpu::Buffer,
        dispatches: Vec<Dispatch>,
        twin: Twin,
    }

    impl Layer {
        fn new(
            n_heads: u32,
            n_kv: u32,
            hd: u32,
            capacity: u32,
            max_tokens: u32,
            gate: Option<(&wgpu::Buffer, u32, u32)>,
        ) -> Layer {
            let (gpu, _) = gpu();
            let cache = KvCache::new(gpu, capacity, n_kv, hd).unwrap();
            let act = |heads: u32| gpu.storage("act", u64::from(max_tokens * heads * hd) * 4);
            let (q, k, v, out) = (act(n_heads), act(n_kv), act(n_kv), act(n_heads));
            let pos = gpu.storage("positions", u64::from(max_tokens) * 4);
            let step = step_buffer(gpu);
            let mut attn = Attention::new(n_heads, hd);
            attn.gate = gate.map(|(gate, stride, offset)| OutputGate {
                gate: Act::new(gate, max_tokens, n_heads * stride),
                stride,
                offset,
            });
            let act = |b, heads| Act::new(b, max_tokens, heads * hd);
            let dispatches = record(&step, max_tokens, |rec| {
                let positions = Act::new(&pos, max_tokens, 1);
                rec.kv_store(&cache, act(&k, n_kv), act(&v, n_kv), positions)?;
                rec.attention(&cache, act(&q, n_heads), positions, act(&out, n_heads), attn)
            })
            .unwrap();
            let twin = Twin::new(n_heads as usize, n_kv as usize, hd as usize, capacity as usize);
            Layer { cache, step, q, k, v, pos, out, dispatches, twin }
        }

        /// One step: stores k and v at `positions`, attends with q; returns the GPU output.
        fn step(&mut self, q: &[f32], k: &[f32], v: &[f32], positions: &[u32]) -> Vec<f32> {
            let (gpu, _) = gpu();
            for (b, data) in [(&self.q, q), (&self.k, k), (&self.v, v)] {
                gpu.queue.write_buffer(b, 0, bytemuck::cast_slice(data));
            }
            gpu.queue.write_buffer(&self.pos, 0, bytemuck::cast_slice(positions));
            run(gpu, &self.step, &self.dispatches, positions.len() as u32);
            self.twin.store(k, v, positions);
            gpu.read_f32(&self.out, q.len()).unwrap()
        }

        /// Stores random keys and values at `positions`, without attending (a cache filled
        /// by earlier steps).
        fn random_fill(&mut self, rng: &mut Rng, positions: &[u32]) {
            let (gpu, _) = gpu();
            let n = positions.len() * self.twin.n_kv * self.twin.hd;
            let (k, v) = (rng.vec(n, 1.0), rng.vec(n, 1.0));
            gpu.queue.write_buffer(&self.k, 0, bytemuck::cast_slice(&k));
            gpu.queue.write_buffer(&self.v, 0, bytemuck::cast_slice(&v));
            gpu.queue.write_buffer(&self.pos, 0, bytemuck::cast_slice(positions));
            run(gpu, &self.step, &self.dispatches[..1], positions.len() as u32);
            self.twin.store(&k, &v, positions);
        }

        /// A step with random q, k, v; returns (q, GPU output).
        fn random_step(&mut self, rng: &mut Rng, positions: &[u32]) -> (Vec<f32>, Vec<f32>) {
            let t = positions.len();
            let (hd, nq, nkv) = (self.twin.hd, self.twin.n_heads, self.twin.n_kv);
            let q = rng.vec(t * nq * hd, 3.0);
            let (k, v) = (rng.vec(t * nkv * hd, 1.0), rng.vec(t * nkv * hd, 1.0));
            let out = self.step(&q, &k, &v, positions);
            (q, out)
        }

        fn scale(&self) -> f32 {
            1.0 / (self.twin.hd as f32).sqrt()
        }
    }

    #[test]
    fn kv_store_rounds_to_f16_at_positions() {
        let (gpu, _) = gpu();
        let mut rng = Rng::new(11);
        let mut layer = Layer::new(4, 2, 64, 16, 4, None);
        let positions = [5, 0, 9];
        layer.random_step(&mut rng, &positions);
        let row = 2 * 64;
        for (buf, want) in [(layer.cache.k(), &layer.twin.k), (layer.cache.v(), &layer.twin.v)] {
            let bytes = gpu.read_bytes(buf, 0, buf.size()).unwrap();
            let got: Vec<f32> = bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect();
            // Bit for bit: the kernel rounds to nearest even, like `half`.
            assert_eq!(&got[..16 * row], &want[..], "stored halves");
        }
    }

    #[test]
    fn decode_matches_cpu_with_gqa() {
        let mut rng = Rng::new(12);
        // Heads of 32 (tiny-qwen3) and 80 use the kernel's other thread layouts: several
        // threads per output pair, and idle threads.
        for (n_heads, n_kv, hd) in [(4, 2, 64), (8, 8, 64), (24, 4, 256), (4, 2, 32), (2, 1, 80)] {
            for len in [1u32, 37, 300] {
                let mut layer = Layer::new(n_heads, n_kv, hd, 320, 320, None);
                if len > 1 {
                    let cached: Vec<u32> = (0..len - 1).collect();
                    layer.random_fill(&mut rng, &cached);
                }
                let (q, got) = layer.random_step(&mut rng, &[len - 1]);
                let want = layer.twin.attend(&q, &[len - 1], layer.scale(), None);
                assert_close(&got, &want, 1e-5, 1e-4, &format!("{n_heads}/{n_kv} heads of {hd}, {len} positions"));
            }
        }
    }

    #[test]
    fn decode_over_a_long_context() {
        let mut rng = Rng::new(13);
        let len = 3000u32;
        let mut layer = Layer::new(4, 2, 64, 4096, 1024, None);
        for chunk in (0..len - 1).collect::<Vec<u32>>().chunks(1024) {
            layer.random_fill(&mut rng, chunk);
        }
        let (q, got) = layer.random_step(&mut rng, &[len - 1]);
        let want = layer.twin.attend(&q, &[len - 1], layer.scale(), None);
        assert_close(&got, &want, 1e-5, 1e-4, "3000 positions");
    }

    #[test]
    fn prefill_matches_cpu_and_token_by_token() {
        let mut rng = Rng::new(14);
        for (n_heads, n_kv, hd) in [(4, 2, 64), (24, 4, 256)] {
            for t in [5u32, 40] {
                let cached: Vec<u32> = (0..10).collect();
                let new: Vec<u32> = (10..10 + t).collect();
                let row = (n_kv * hd) as usize;
                let qrow = (n_heads * hd) as usize;
                let (k0, v0) = (rng.vec(10 * row, 1.0), rng.vec(10 * row, 1.0));
                let q0 = rng.vec(10 * qrow, 1.0);
                let (q, k, v) =
                    (rng.vec(t as usize * qrow, 3.0), rng.vec(t as usize * row, 1.0), rng.vec(t as usize * row, 1.0));

                // The whole prompt in one step, bound for a larger batch than it is.
                let mut batch = Layer::new(n_heads, n_kv, hd, 64, 48, None);
                batch.step(&q0, &k0, &v0, &cached);
                let got = batch.step(&q, &k, &v, &new);
                let want = batch.twin.attend(&q, &new, batch.scale(), None);
                let what = format!("{n_heads}/{n_kv} heads of {hd}, {t} tokens after 10");
                assert_close(&got, &want, 1e-5, 1e-4, &what);

                // The same tokens one at a time.
                let mut single = Layer::new(n_heads, n_kv, hd, 64, 48, None);
                single.step(&q0, &k0, &v0, &cached);
                let mut one_by_one = Vec::new();
                for i in 0..t as usize {
                    let s = |x: &[f32], w: usize| x[i * w..(i + 1) * w].to_vec();
                    one_by_one.extend(single.step(&s(&q, qrow), &s(&k, row), &s(&v, row), &new[i..i + 1]));
                }
                assert_close(&got, &one_by_one, 1e-6, 1e-6, &format!("{what}: one by one"));
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
        let mut layer = Layer::new(n_heads, n_kv, hd, 16, t, Some((&qg_buffer, 2 * hd, hd)));
        let positions: Vec<u32> = (0..t).collect();
        let (q, got) = layer.random_step(&mut rng, &positions);
        let want = layer.twin.attend(&q, &positions, layer.scale(), Some((&qg, 2 * hd as usize, hd as usize)));
        assert_close(&got, &want, 1e-5, 1e-4, "gated");
    }

    #[test]
    fn shapes_are_checked() {
        let (gpu, _) = gpu();
        assert!(KvCache::new(gpu, 16, 2, 62).is_err());
        assert!(KvCache::new(gpu, 16, 2, 1024).is_err());
        assert!(KvCache::new(gpu, u32::MAX, 8, 256).is_err());
        let cache = KvCache::new(gpu, 16, 2, 64).unwrap();
        assert_eq!(cache.bytes(), 16 * KvCache::bytes_per_position(2, 64));
        let step = step_buffer(gpu);
        let pos = u32_buffer(gpu, &[0; 4]);
        let small = f32_buffer(gpu, &vec![0.0; 128]);
        let q = f32_buffer(gpu, &vec![0.0; 3 * 64]);
        let out = f32_buffer(gpu, &vec![0.0; 3 * 64]);
        let (small, pos) = (Act::new(&small, 1, 128), Act::new(&pos, 4, 1));
        assert!(record(&step, 1, |rec| rec.kv_store(&cache, small, small, pos)).is_ok());
        assert!(record(&step, 2, |rec| rec.kv_store(&cache, small, small, pos)).is_err());
        let attend = |heads, q: &wgpu::Buffer, out: &wgpu::Buffer| {
            let (q, out) = (Act::new(q, 1, heads * 64), Act::new(out, 1, heads * 64));
            record(&step, 1, |rec| rec.attention(&cache, q, pos, out, Attention::new(heads, 64)))
        };
        assert!(attend(3, &q, &out).is_err());
        assert!(attend(2, &q, &out).is_ok());
        assert!(attend(2, &q, &q).is_err());
    }
}
