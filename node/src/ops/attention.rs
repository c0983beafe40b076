//! Attention over a [`KvCache`]: storing the step's keys and values, then causal softmax
//! attention of each token's query heads over the cache (grouped-query: several query
//! heads share one KV head). Decode and prefill use the same two dispatches; positions
//! come per token from a u32 buffer written by the caller each step.
#![allow(clippy::too_many_arguments)] // the device, the step and every buffer, explicitly

use strata_shaders::Kernel;

use super::elementwise::bind;
use crate::gpu::{Dim, Dispatch, Gpu, KernelCache, Workgroups};
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

/// Writes the step's keys `k` and values `v` (f32 `[n_tokens, n_kv_heads, head_dim]`) into
/// `cache` at `positions[t]` (u32 `[n_tokens]`). Positions at or past the capacity are
/// skipped; the caller keeps them in range.
pub fn kv_store(
    gpu: &Gpu,
    kernels: &KernelCache,
    step: &wgpu::Buffer,
    cache: &KvCache,
    k: &wgpu::Buffer,
    v: &wgpu::Buffer,
    positions: &wgpu::Buffer,
    max_tokens: u32,
) -> Result<Dispatch> {
    if max_tokens == 0 {
        return Err(Error::Shape { op: "kv_store", message: "max_tokens must be at least 1".into() });
    }
    let row_pairs = cache.n_kv_heads() * cache.head_dim() / 2;
    let tokens = u64::from(max_tokens);
    let k = bind(gpu, "kv_store", "k", k, tokens * u64::from(row_pairs) * 8)?;
    let v = bind(gpu, "kv_store", "v", v, tokens * u64::from(row_pairs) * 8)?;
    let positions = bind(gpu, "kv_store", "positions", positions, tokens * 4)?;
    let params = gpu.uniform("kv_store", &StoreParams { row_pairs, capacity: cache.capacity(), _pad: [0; 2] });
    let pipeline = kernels.pipeline(gpu, Kernel::KV_STORE, None, &[])?;
    let resources = [
        step.as_entire_binding(),
        params.as_entire_binding(),
        positions,
        k,
        v,
        cache.k().as_entire_binding(),
        cache.v().as_entire_binding(),
    ];
    let workgroups = Workgroups(Dim::Fixed(row_pairs.div_ceil(STORE_WG)), Dim::Tokens { group: 1 }, Dim::Fixed(1));
    Ok(Dispatch::new(gpu, "kv_store", pipeline, &resources, workgroups))
}

/// Where the output gate of gated attention (qwen35) is: the gate of value `d` of head `h`
/// of token `t` is `gate[(t * n_heads + h) * stride + offset + d]`.
#[derive(Debug, Clone, Copy)]
pub struct OutputGate<'a> {
    pub gate: &'a wgpu::Buffer,
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

/// `out[t, h] = sum_j softmax_j(scale * q[t, h] . K[j, g]) V[j, g]` over cache positions
/// `j = 0..=positions[t]`, for KV head `g = h / (n_heads / n_kv_heads)`; then gated if
/// asked. `q` and `out`: f32 `[n_tokens, n_heads, head_dim]`. The step's keys and values
/// must be stored first ([`kv_store`], earlier in the same pass), and every position up
/// to `positions[t]` must hold this sequence's keys.
pub fn attention(
    gpu: &Gpu,
    kernels: &KernelCache,
    step: &wgpu::Buffer,
    cache: &KvCache,
    q: &wgpu::Buffer,
    positions: &wgpu::Buffer,
    out: &wgpu::Buffer,
    attn: Attention<'_>,
    max_tokens: u32,
) -> Result<Dispatch> {
    let shape = |message: String| Error::Shape { op: "attention", message };
    let (n_heads, n_kv_heads, head_dim) = (attn.n_heads, cache.n_kv_heads(), cache.head_dim());
    if max_tokens == 0 || n_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) {
        return Err(shape(format!("{n_heads} query heads over {n_kv_heads} KV heads, max_tokens {max_tokens}")));
    }
    let tokens = u64::from(max_tokens);
    let act_bytes = tokens * u64::from(n_heads * head_dim) * 4;
    if out == q {
        return Err(shape("out must not be q".into()));
    }
    let q_binding = bind(gpu, "attention", "q", q, act_bytes)?;
    let out_binding = bind(gpu, "attention", "out", out, act_bytes)?;
    let positions = bind(gpu, "attention", "positions", positions, tokens * 4)?;
    let (gate, gate_stride, gate_offset) = match attn.gate {
        Some(g) => {
            if g.stride < head_dim || g.offset > g.stride - head_dim {
                return Err(shape(format!("gate stride {} and offset {} for heads of {head_dim}", g.stride, g.offset)));
            }
            // The last head's gate ends at its row's start plus offset + head_dim.
            let last_row = tokens * u64::from(n_heads) - 1;
            let gate_bytes = (last_row * u64::from(g.stride) + u64::from(g.offset + head_dim)) * 4;
            if g.gate == out {
                return Err(shape("out must not be the gate".into()));
            }
            (bind(gpu, "attention", "gate", g.gate, gate_bytes)?, g.stride, g.offset)
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
    let params = gpu.uniform("attention", &params);
    let pairs = head_dim / 2;
    let consts = [
        ("HEAD_DIM", format!("{head_dim}u")),
        ("WG", format!("{ATTN_WG}u")),
        ("PAIRS_PER_THREAD", format!("{}u", pairs.div_ceil(ATTN_WG))),
        ("SLICES", format!("{}u", (ATTN_WG / pairs).max(1))),
    ];
    let pipeline = kernels.pipeline(gpu, Kernel::ATTENTION, None, &consts)?;
    let resources = [
        step.as_entire_binding(),
        params.as_entire_binding(),
        positions,
        q_binding,
        cache.k().as_entire_binding(),
        cache.v().as_entire_binding(),
        gate,
        out_binding,
    ];
    let workgroups = Workgroups(Dim::Tokens { group: 1 }, Dim::Fixed(n_heads), Dim::Fixed(1));
    Ok(Dispatch::new(gpu, "attention", pipeline, &resources, workgroups))
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::*;
    use crate::ops::harness::{f32_buffer, run, step_buffer, u32_buffer};
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
            let (gpu, kernels) = gpu();
            let cache = KvCache::new(gpu, capacity, n_kv, hd).unwrap();
            let act = |heads: u32| gpu.storage("act", u64::from(max_tokens * heads * hd) * 4);
            let (q, k, v, out) = (act(n_heads), act(n_kv), act(n_kv), act(n_heads));
            let pos = gpu.storage("positions", u64::from(max_tokens) * 4);
            let step = step_buffer(gpu);
            let mut attn = Attention::new(n_heads, hd);
            attn.gate = gate.map(|(gate, stride, offset)| OutputGate { gate, stride, offset });
            let dispatches = vec![
                kv_store(gpu, kernels, &step, &cache, &k, &v, &pos, max_tokens).unwrap(),
                attention(gpu, kernels, &step, &cache, &q, &pos, &out, attn, max_tokens).unwrap(),
            ];
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
        let (gpu, kernels) = gpu();
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
        assert!(kv_store(gpu, kernels, &step, &cache, &small, &small, &pos, 1).is_ok());
        assert!(kv_store(gpu, kernels, &step, &cache, &small, &small, &pos, 2).is_err());
        assert!(attention(gpu, kernels, &step, &cache, &q, &pos, &out, Attention::new(3, 64), 1).is_err());
        assert!(attention(gpu, kernels, &step, &cache, &q, &pos, &out, Attention::new(2, 64), 1).is_ok());
        assert!(attention(gpu, kernels, &step, &cache, &q, &pos, &q, Attention::new(2, 64), 1).is_err());
    }
}
