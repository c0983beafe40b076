//! Sampling on the GPU, so that only a few values of a logit row ever reach the host: each
//! sampled row's repetition penalties, then its argmax or top k with the row's log-sum-exp
//! (enough for temperature, top-p and min-p sampling and for logprobs on the host). Every
//! row has its own [`RowSampling`], written per step, so greedy and sampled sequences
//! share a step.

use strata_shaders::Kernel;

use super::recorder::{Act, Recorder};
use crate::gpu::{Dim, Workgroups};
use crate::{Error, Result};

/// `top_k.wgsl`: threads per workgroup and logits per thread; a chunk is their product.
const TOP_K_WG: u32 = 256;
const TOP_K_PER: u32 = 32;
/// The largest k.
pub const MAX_TOP_K: u32 = 64;
/// Threads per workgroup of `penalize.wgsl`.
const PENALIZE_WG: u32 = 64;

/// What one sampled row asks of the sampling kernels (WGSL `RowSampling`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct RowSampling {
    /// Candidates to return: 1 for the argmax, up to [`MAX_TOP_K`]; 0 for none.
    pub k: u32,
    /// The row's recent ids the penalties look at; 0 for none.
    pub count: u32,
    pub repeat: f32,
    pub frequency: f32,
    pub presence: f32,
    /// 1: only the tokens the row's grammar mask allows (see [`Recorder::top_k`]).
    pub masked: u32,
    pub _pad: [u32; 2],
}

impl RowSampling {
    /// The `k` best candidates, penalised as `penalties` says for the row's first `count`
    /// recent ids.
    pub fn new(k: u32, count: u32, penalties: Penalties) -> RowSampling {
        let Penalties { repeat, frequency, presence } = penalties;
        RowSampling { k, count, repeat, frequency, presence, masked: 0, _pad: [0; 2] }
    }

    /// The same, over only the tokens its row of the grammar mask allows.
    pub fn masked(self) -> RowSampling {
        RowSampling { masked: 1, ..self }
    }

    /// The argmax, no penalties.
    pub fn greedy() -> RowSampling {
        RowSampling::new(1, 0, Penalties::NONE)
    }
}

/// Repetition penalties in llama.cpp's semantics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Penalties {
    /// A positive logit is divided by it, a non-positive one multiplied (1: off).
    pub repeat: f32,
    /// Subtracted once per occurrence.
    pub frequency: f32,
    /// Subtracted once if the token occurs at all.
    pub presence: f32,
}

impl Penalties {
    pub const NONE: Penalties = Penalties { repeat: 1.0, frequency: 0.0, presence: 0.0 };
}

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct TopKParams {
    n_vocab: u32,
    k_max: u32,
    n_chunks: u32,
    merge: u32,
}

/// Words of one row of a grammar mask over `n_vocab` tokens: bit `v % 32` of word `v / 32`
/// is token `v`.
pub fn mask_words(n_vocab: u32) -> u32 {
    n_vocab.div_ceil(32)
}

/// Words of one row's output of [`Recorder::top_k`] with this `k_max`.
pub fn top_k_words(k_max: u32) -> u32 {
    2 * k_max + 2
}

/// The k largest logits of a row, read back from [`Recorder::top_k`]'s output.
#[derive(Debug, Clone, PartialEq)]
pub struct TopK {
    /// (token id, logit), by logit descending, ties by lower id.
    pub entries: Vec<(u32, f32)>,
    /// The row's largest logit.
    pub max: f32,
    /// `ln(sum(exp(logits)))` over the whole row: a token's logprob is `logit - log_sum_exp`.
    pub log_sum_exp: f32,
}

impl TopK {
    /// Parses one row's [`top_k_words`]`(k_max)` words written by [`Recorder::top_k`] for a
    /// row that asked for `k` candidates.
    pub fn from_words(words: &[u32], k_max: u32, k: u32) -> TopK {
        let (k_max, k) = (k_max as usize, k.min(k_max) as usize);
        assert_eq!(words.len(), 2 * k_max + 2, "top-{k_max} output");
        let entries = (0..k).map(|i| (words[i], f32::from_bits(words[k_max + i]))).collect();
        TopK { entries, max: f32::from_bits(words[2 * k_max]), log_sum_exp: f32::from_bits(words[2 * k_max + 1]) }
    }
}

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct PenalizeParams {
    n_vocab: u32,
    max_ids: u32,
    _pad: [u32; 2],
}

impl Recorder<'_> {
    /// Binds the per-row [`RowSampling`]s of the step's rows.
    fn bind_sampling<'b>(&self, op: &'static str, sampling: &'b wgpu::Buffer) -> Result<wgpu::BindingResource<'b>> {
        self.bind(op, "sampling", sampling, u64::from(self.max_tokens()) * size_of::<RowSampling>() as u64)
    }

    /// Records the two dispatches that write, for each of the step's rows `r` of `logits`
    /// (rows of the vocabulary), its `k_r` best ids (`k_r` from its [`RowSampling`], at most
    /// `k_max`) to `out` (u32, [`top_k_words`]`(k_max)` words per row): `k_max` ids, then
    /// their logits' bits, then the bits of the row's max and log-sum-exp; read a row with
    /// [`TopK::from_words`]. Ties go to the lower id. A per-chunk pass is followed by a
    /// one-workgroup-per-row merge.
    ///
    /// A row marked [`RowSampling::masked`] sees only the tokens its row of `mask` (u32,
    /// [`mask_words`]`(n_vocab)` per row) allows: the others count as -inf, so what it gets
    /// (candidates, max, log-sum-exp) is that of the allowed tokens. Other rows never read
    /// `mask`. Masking here, where the logits are read anyway, costs no pass of its own.
    pub fn top_k(
        &mut self,
        logits: Act<'_>,
        sampling: &wgpu::Buffer,
        mask: &wgpu::Buffer,
        k_max: u32,
        out: &wgpu::Buffer,
    ) -> Result<()> {
        let shape = |message: String| Error::Shape { op: "top_k", message };
        let n_vocab = logits.width;
        if k_max == 0 || k_max > MAX_TOP_K || k_max > n_vocab {
            return Err(shape(format!("k = {k_max} of {n_vocab} (k at most {MAX_TOP_K})")));
        }
        let n_chunks = n_vocab.div_ceil(TOP_K_WG * TOP_K_PER);
        // The merge holds every chunk's k candidates in its threads.
        if n_chunks * k_max > TOP_K_WG * TOP_K_PER {
            return Err(shape(format!("top {k_max} of {n_vocab} logits: at most {} candidates", TOP_K_WG * TOP_K_PER)));
        }
        let rows = self.max_tokens();
        let logits = self.bind_act("top_k", "logits", logits, n_vocab)?;
        let sampling = self.bind_sampling("top_k", sampling)?;
        let out = self.bind("top_k", "out", out, u64::from(rows * top_k_words(k_max)) * 4)?;
        let mask = self.bind("top_k", "mask", mask, u64::from(rows * mask_words(n_vocab)) * 4)?;
        let partial = self.gpu().storage("top_k partial", u64::from(rows * n_chunks * (k_max + 1)) * 8);
        let pipeline = self.pipeline(Kernel::TOP_K, &[], &[])?;
        for (merge, groups) in [(0, n_chunks), (1, 1)] {
            let params = self.uniform("top_k", &TopKParams { n_vocab, k_max, n_chunks, merge });
            let resources = [sampling.clone(), logits.clone(), partial.as_entire_binding(), out.clone(), mask.clone()];
            let workgroups = Workgroups(Dim::Fixed(groups), Dim::Tokens { group: 1 }, Dim::Fixed(1));
            self.dispatch("top_k", pipeline.clone(), &params, &resources, workgroups);
        }
        Ok(())
    }

    /// Applies each of the step's rows' repetition penalties in place to its row of
    /// `logits` (rows of the vocabulary), for its first `count` recent tokens in its row
    /// of `ids` (u32 `[rows, max_ids]`; duplicates count as occurrences, ids past the
    /// vocabulary are ignored). A row with `count` 0 is left as it is.
    pub fn penalize(
        &mut self,
        logits: Act<'_>,
        sampling: &wgpu::Buffer,
        ids: &wgpu::Buffer,
        max_ids: u32,
    ) -> Result<()> {
        let n_vocab = logits.width;
        if n_vocab == 0 || max_ids == 0 {
            return Err(Error::Shape { op: "penalize", message: format!("n_vocab {n_vocab}, max_ids {max_ids}") });
        }
        let logits = self.bind_act("penalize", "logits", logits, n_vocab)?;
        let sampling = self.bind_sampling("penalize", sampling)?;
        let ids = self.bind("penalize", "ids", ids, u64::from(self.max_tokens() * max_ids) * 4)?;
        let params = self.uniform("penalize", &PenalizeParams { n_vocab, max_ids, _pad: [0; 2] });
        let pipeline = self.pipeline(Kernel::PENALIZE, &[], &[])?;
        let workgroups = Workgroups(Dim::Fixed(max_ids.div_ceil(PENALIZE_WG)), Dim::Tokens { group: 1 }, Dim::Fixed(1));
        self.dispatch("penalize", pipeline, &params, &[sampling, ids, logits], workgroups);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::ops::harness::{f32_buffer, record, run, step_buffer, u32_buffer};
    use crate::testing::{Rng, assert_close, gpu};

    /// The CPU twin: the top k (by logit, then id) and the log-sum-exp, in f64.
    fn cpu_top_k(row: &[f32], k: usize) -> TopK {
        let mut order: Vec<u32> = (0..row.len() as u32).collect();
        order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = row.iter().map(|&x| (f64::from(x) - f64::from(max)).exp()).sum();
        TopK {
            entries: order[..k].iter().map(|&i| (i, row[i as usize])).collect(),
            max,
            log_sum_exp: (f64::from(max) + sum.ln()) as f32,
        }
    }

    fn sampling_buffer(rows: &[RowSampling]) -> wgpu::Buffer {
        gpu().0.storage_init("sampling", bytemuck::cast_slice(rows))
    }

    /// Runs top-k of the first `ks.len()` rows of `logits` (a step of that many rows,
    /// bound for `max_tokens`), row r asking for `ks[r]` of `k_max`.
    fn gpu_top_k(logits: &[f32], n_vocab: u32, ks: &[u32], k_max: u32, max_tokens: u32) -> Vec<TopK> {
        let rows: Vec<RowSampling> = ks.iter().map(|&k| RowSampling::new(k, 0, Penalties::NONE)).collect();
        gpu_top_k_masked(logits, n_vocab, &rows, &[], k_max, max_tokens)
    }

    /// [`gpu_top_k`] with each row's own [`RowSampling`] and grammar `mask` rows (zeros
    /// where `mask` ends).
    fn gpu_top_k_masked(
        logits: &[f32],
        n_vocab: u32,
        rows: &[RowSampling],
        mask: &[u32],
        k_max: u32,
        max_tokens: u32,
    ) -> Vec<TopK> {
        let (gpu, _) = gpu();
        let step = step_buffer(gpu);
        let lb = f32_buffer(gpu, logits);
        let ks: Vec<u32> = rows.iter().map(|r| r.k).collect();
        let mut rows = rows.to_vec();
        rows.resize(max_tokens as usize, RowSampling::greedy());
        let sb = sampling_buffer(&rows);
        let mut mask = mask.to_vec();
        mask.resize((max_tokens * mask_words(n_vocab)) as usize, 0);
        let mb = u32_buffer(gpu, &mask);
        let words = top_k_words(k_max);
        let out = gpu.storage("out", u64::from(max_tokens * words) * 4);
        let la = Act::new(&lb, logits.len() as u32 / n_vocab, n_vocab);
        let d = record(&step, max_tokens, |rec| rec.top_k(la, &sb, &mb, k_max, &out)).unwrap();
        run(gpu, &step, &d, ks.len() as u32);
        let all = gpu.read_u32(&out, (max_tokens * words) as usize).unwrap();
        ks.iter()
            .enumerate()
            .map(|(r, &k)| TopK::from_words(&all[r * words as usize..][..words as usize], k_max, k))
            .collect()
    }

    #[track_caller]
    fn assert_top_k(got: &TopK, want: &TopK, what: &str) {
        assert_eq!(got.entries, want.entries, "{what}: entries");
        assert_eq!(got.max, want.max, "{what}: max");
        assert_close(&[got.log_sum_exp], &[want.log_sum_exp], 1e-5, 1e-5, &format!("{what}: log-sum-exp"));
    }

    #[test]
    fn each_row_gets_its_own_argmax_or_top_k() {
        let mut rng = Rng::new(21);
        for n_vocab in [1000u32, 49152, 248320] {
            let max_tokens = 5u32;
            let logits = rng.vec((n_vocab * max_tokens) as usize, 20.0);
            // Greedy, a full top 64, a small k, none (log-sum-exp only).
            let ks = [1, 64, 5, 0];
            let got = gpu_top_k(&logits, n_vocab, &ks, MAX_TOP_K, max_tokens);
            for (r, &k) in ks.iter().enumerate() {
                let want = cpu_top_k(&logits[r * n_vocab as usize..(r + 1) * n_vocab as usize], k as usize);
                assert_top_k(&got[r], &want, &format!("row {r}: top {k} of {n_vocab}"));
            }
        }
    }

    #[test]
    fn a_masked_row_sees_only_the_tokens_its_grammar_allows() {
        let mut rng = Rng::new(24);
        for n_vocab in [1000u32, 49152, 248320] {
            let (v, w) = (n_vocab as usize, mask_words(n_vocab) as usize);
            let logits = rng.vec(4 * v, 20.0);
            // Row 0: about half the vocabulary allowed; row 1: unmasked, its mask row all
            // zeros (never read: read, it would allow nothing); row 2: three tokens, fewer
            // than k; row 3: one token, greedy.
            let mut allowed: Vec<Vec<bool>> = vec![(0..v).map(|_| rng.below(2) == 1).collect(), vec![false; v]];
            allowed.push((0..v).map(|i| [7, v / 2, v - 1].contains(&i)).collect());
            allowed.push((0..v).map(|i| i == v / 3).collect());
            let mut mask = vec![0u32; 4 * w];
            for (r, row) in allowed.iter().enumerate() {
                for (i, _) in row.iter().enumerate().filter(|(_, a)| **a) {
                    mask[r * w + i / 32] |= 1 << (i % 32);
                }
            }
            let rows = [
                RowSampling::new(64, 0, Penalties::NONE).masked(),
                RowSampling::new(64, 0, Penalties::NONE),
                RowSampling::new(64, 0, Penalties::NONE).masked(),
                RowSampling::greedy().masked(),
            ];
            let got = gpu_top_k_masked(&logits, n_vocab, &rows, &mask, MAX_TOP_K, 4);
            for r in 0..4 {
                let mut want_row = logits[r * v..(r + 1) * v].to_vec();
                if rows[r].masked == 1 {
                    for (i, x) in want_row.iter_mut().enumerate() {
                        if !allowed[r][i] {
                            *x = f32::NEG_INFINITY;
                        }
                    }
                }
                let want = cpu_top_k(&want_row, rows[r].k as usize);
                assert_top_k(&got[r], &want, &format!("row {r} of {n_vocab}"));
                let finite: Vec<u32> = got[r].entries.iter().filter(|e| e.1.is_finite()).map(|e| e.0).collect();
                if rows[r].masked == 1 {
                    assert!(finite.iter().all(|&i| allowed[r][i as usize]), "row {r}: a token outside the mask");
                }
            }
            assert_eq!(got[3].entries[0].0, n_vocab / 3, "greedy under a one-token mask");
        }
    }

    #[test]
    fn argmax_ties_go_to_the_lowest_id() {
        let n_vocab = 49152u32;
        let mut logits = vec![0.5f32; n_vocab as usize];
        // Equal maxima in different chunks, threads and elements of a thread.
        for i in [40000, 9000, 8999, 30000, 257] {
            logits[i] = 3.0;
        }
        // A second row, all equal: id 0.
        logits.extend(vec![-1.0; n_vocab as usize]);
        let got = gpu_top_k(&logits, n_vocab, &[1, 1], 1, 2);
        assert_eq!((got[0].entries[0].0, got[1].entries[0].0), (257, 0));
    }

    #[test]
    fn top_k_matches_cpu() {
        let mut rng = Rng::new(22);
        for (n_vocab, k) in [(100u32, 64u32), (1024, 40), (49152, 64), (248320, 64), (248320, 5)] {
            let mut logits = rng.vec(n_vocab as usize, 10.0);
            // Ties, within and across chunks, and a masked token.
            for i in (0..n_vocab as usize).step_by(97) {
                logits[i] = 9.5;
            }
            logits[3] = f32::NEG_INFINITY;
            let got = gpu_top_k(&logits, n_vocab, &[k], k, 1);
            assert_top_k(&got[0], &cpu_top_k(&logits, k as usize), &format!("top {k} of {n_vocab}"));
        }
    }

    #[test]
    fn top_k_checks_shapes() {
        let (gpu, _) = gpu();
        let step = step_buffer(gpu);
        let logits = f32_buffer(gpu, &[0.0; 100]);
        let sb = sampling_buffer(&[RowSampling::greedy(); 2]);
        let out = gpu.storage("out", u64::from(top_k_words(64)) * 4);
        let (one_row, two_rows) = (Act::new(&logits, 1, 100), Act::new(&logits, 2, 50));
        let mask = gpu.storage("mask", 64);
        let top = |max_tokens, logits, k, out| record(&step, max_tokens, |rec| rec.top_k(logits, &sb, &mask, k, out));
        assert!(top(1, one_row, 65, &out).is_err());
        assert!(top(3, two_rows, 8, &out).is_err());
        assert!(top(2, two_rows, 8, &out).is_ok());
        let small = gpu.storage("out", 8);
        assert!(top(1, one_row, 1, &small).is_err());
    }

    /// llama.cpp's penalties on the CPU.
    fn cpu_penalize(row: &mut [f32], ids: &[u32], p: Penalties) {
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for &id in ids {
            *counts.entry(id).or_default() += 1;
        }
        for (&id, &c) in &counts {
            let Some(v) = row.get_mut(id as usize) else { continue };
            *v = if *v <= 0.0 { *v * p.repeat } else { *v / p.repeat };
            *v -= c as f32 * p.frequency + p.presence;
        }
    }

    #[test]
    fn penalize_matches_llama_cpp_row_by_row() {
        let (gpu, _) = gpu();
        let mut rng = Rng::new(23);
        let (n_vocab, max_tokens, max_ids) = (5000u32, 3u32, 300u32);
        let logits = rng.vec((n_vocab * max_tokens) as usize, 5.0);
        // Row 0: recent tokens with repeats and one id past the vocabulary; row 1: no
        // penalties; row 2: other tokens and penalties.
        let mut ids0: Vec<u32> = (0..250).map(|_| rng.below(400) as u32 * 7).collect();
        ids0.push(n_vocab + 3);
        let ids2: Vec<u32> = (0..40).map(|_| rng.below(n_vocab as u64) as u32).collect();
        let p0 = Penalties { repeat: 1.3, frequency: 0.25, presence: 0.5 };
        let p2 = Penalties { repeat: 0.8, frequency: -0.5, presence: 0.0 };
        let mut room = vec![0u32; (max_tokens * max_ids) as usize];
        room[..ids0.len()].copy_from_slice(&ids0);
        room[2 * max_ids as usize..][..ids2.len()].copy_from_slice(&ids2);
        let rows = [
            RowSampling::new(64, ids0.len() as u32, p0),
            RowSampling::greedy(),
            RowSampling::new(1, ids2.len() as u32, p2),
        ];
        let step = step_buffer(gpu);
        let (lb, ib, sb) = (f32_buffer(gpu, &logits), u32_buffer(gpu, &room), sampling_buffer(&rows));
        let la = Act::new(&lb, max_tokens, n_vocab);
        let d = record(&step, max_tokens, |rec| rec.penalize(la, &sb, &ib, max_ids)).unwrap();
        run(gpu, &step, &d, max_tokens);
        let mut want = logits.clone();
        let v = n_vocab as usize;
        cpu_penalize(&mut want[..v], &ids0, p0);
        cpu_penalize(&mut want[2 * v..], &ids2, p2);
        assert_close(&gpu.read_f32(&lb, logits.len()).unwrap(), &want, 1e-6, 1e-6, "penalized");
    }
}
