//! Sampling on the GPU, so that only a few values of a logit row ever reach the host:
//! repetition penalties, then the argmax or the top k with the row's log-sum-exp (enough
//! for temperature, top-p and min-p sampling and for logprobs on the host).

use strata_shaders::Kernel;

use super::elementwise::Row;
use super::recorder::{Act, Recorder};
use crate::gpu::{Dispatch, Workgroups};
use crate::{Error, Result};

/// `top_k.wgsl`: threads per workgroup and logits per thread; a chunk is their product.
const TOP_K_WG: u32 = 256;
const TOP_K_PER: u32 = 32;
/// The largest k.
pub const MAX_TOP_K: u32 = 64;
/// Threads per workgroup of `penalize.wgsl`.
const PENALIZE_WG: u32 = 64;

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct TopKParams {
    n_vocab: u32,
    row: u32,
    k: u32,
    n_chunks: u32,
    merge: u32,
    _pad: [u32; 3],
}

/// Words of the output of [`Recorder::top_k`] with this `k`.
pub fn top_k_words(k: u32) -> u32 {
    2 * k + 2
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
    /// Parses the `top_k_words(k)` words written by [`Recorder::top_k`].
    pub fn from_words(words: &[u32], k: u32) -> TopK {
        let k = k as usize;
        assert_eq!(words.len(), 2 * k + 2, "top-{k} output");
        let entries = (0..k).map(|i| (words[i], f32::from_bits(words[k + i]))).collect();
        TopK { entries, max: f32::from_bits(words[2 * k]), log_sum_exp: f32::from_bits(words[2 * k + 1]) }
    }
}

impl Recorder<'_> {
    /// Binds `row` of `logits` and every row before it (rows of the vocabulary).
    fn bind_logits<'b>(&self, op: &'static str, logits: Act<'b>, row: Row) -> Result<wgpu::BindingResource<'b>> {
        let rows = row.rows_needed(self.max_tokens());
        if u64::from(logits.rows) < rows {
            return Err(Error::Shape { op, message: format!("row {row:?} of {} rows of logits", logits.rows) });
        }
        self.bind(op, "logits", logits.buffer, rows * u64::from(logits.width) * 4)
    }

    /// Records the two dispatches that write the top `k` of `row` of `logits` (rows of the
    /// vocabulary) to `out` (u32, at least [`top_k_words`]`(k)` words): `k` ids, then their
    /// logits' bits, then the bits of the row's max and log-sum-exp; read it with
    /// [`TopK::from_words`]. Ties go to the lower id. A per-chunk pass is followed by a
    /// one-workgroup merge.
    pub fn top_k(&mut self, logits: Act<'_>, row: Row, k: u32, out: &wgpu::Buffer) -> Result<()> {
        let shape = |message: String| Error::Shape { op: "top_k", message };
        let n_vocab = logits.width;
        if k == 0 || k > MAX_TOP_K || k > n_vocab {
            return Err(shape(format!("k = {k} of {n_vocab} (k at most {MAX_TOP_K})")));
        }
        let n_chunks = n_vocab.div_ceil(TOP_K_WG * TOP_K_PER);
        // The merge holds every chunk's k candidates in its threads.
        if n_chunks * k > TOP_K_WG * TOP_K_PER {
            return Err(shape(format!("top {k} of {n_vocab} logits: at most {} candidates", TOP_K_WG * TOP_K_PER)));
        }
        let logits = self.bind_logits("top_k", logits, row)?;
        let out = self.bind("top_k", "out", out, u64::from(top_k_words(k)) * 4)?;
        let partial = self.gpu().storage("top_k partial", u64::from(n_chunks * (k + 1)) * 8);
        let pipeline = self.pipeline(Kernel::TOP_K, None, &[])?;
        for (merge, groups) in [(0, n_chunks), (1, 1)] {
            let params =
                self.uniform("top_k", &TopKParams { n_vocab, row: row.encode(), k, n_chunks, merge, _pad: [0; 3] });
            let resources = [logits.clone(), partial.as_entire_binding(), out.clone()];
            self.dispatch("top_k", pipeline.clone(), &params, &resources, Workgroups::fixed(groups, 1, 1));
        }
        Ok(())
    }

    /// The argmax of `row` of `logits`: [`Recorder::top_k`] with k = 1, so `out` (4 words)
    /// holds the id (ties: the lowest), its logit, the max again and the row's log-sum-exp.
    pub fn argmax(&mut self, logits: Act<'_>, row: Row, out: &wgpu::Buffer) -> Result<()> {
        self.top_k(logits, row, 1, out)
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

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct PenalizeParams {
    n_vocab: u32,
    row: u32,
    count: u32,
    _pad0: u32,
    repeat: f32,
    frequency: f32,
    presence: f32,
    _pad1: u32,
}

/// The penalty dispatch of one logit row, with the parameters that change per request and
/// per step (the number of recent tokens), set by [`Penalize::set`] before a submission.
#[derive(Debug)]
pub struct Penalize {
    pub dispatch: Dispatch,
    params: wgpu::Buffer,
    n_vocab: u32,
    row: Row,
    max_ids: u32,
}

impl Penalize {
    /// Penalises the first `count` ids of the ids buffer from the next submission on.
    /// `count = 0` leaves the logits untouched.
    pub fn set(&self, queue: &wgpu::Queue, count: u32, penalties: Penalties) -> Result<()> {
        if count > self.max_ids {
            return Err(Error::Shape { op: "penalize", message: format!("{count} ids, room for {}", self.max_ids) });
        }
        let Penalties { repeat, frequency, presence } = penalties;
        let params = PenalizeParams {
            n_vocab: self.n_vocab,
            row: self.row.encode(),
            count,
            _pad0: 0,
            repeat,
            frequency,
            presence,
            _pad1: 0,
        };
        queue.write_buffer(&self.params, 0, bytemuck::bytes_of(&params));
        Ok(())
    }
}

impl Recorder<'_> {
    /// Applies repetition penalties in place to `row` of `logits` (rows of the vocabulary)
    /// for the recent tokens in `ids` (u32, room for `max_ids`; duplicates count as
    /// occurrences, ids past the vocabulary are ignored). Does nothing until
    /// [`Penalize::set`] is called. The dispatch is returned, not recorded: the caller
    /// encodes it only when a request has penalties.
    pub fn penalize(&self, logits: Act<'_>, row: Row, ids: &wgpu::Buffer, max_ids: u32) -> Result<Penalize> {
        let n_vocab = logits.width;
        if n_vocab == 0 || max_ids == 0 {
            return Err(Error::Shape { op: "penalize", message: format!("n_vocab {n_vocab}, max_ids {max_ids}") });
        }
        let logits = self.bind_logits("penalize", logits, row)?;
        let ids = self.bind("penalize", "ids", ids, u64::from(max_ids) * 4)?;
        let off = PenalizeParams {
            n_vocab,
            row: row.encode(),
            count: 0,
            _pad0: 0,
            repeat: 1.0,
            frequency: 0.0,
            presence: 0.0,
            _pad1: 0,
        };
        let params = self.uniform("penalize", &off);
        let pipeline = self.pipeline(Kernel::PENALIZE, None, &[])?;
        let workgroups = Workgroups::fixed(max_ids.div_ceil(PENALIZE_WG), 1, 1);
        let dispatch = self.build("penalize", pipeline, &params, &[ids, logits], workgroups);
        Ok(Penalize { dispatch, params, n_vocab, row, max_ids })
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

    /// Runs top-k of `row` on a step of `n_tokens`.
    fn gpu_top_k(logits: &[f32], n_vocab: u32, row: Row, k: u32, n_tokens: u32, max_tokens: u32) -> TopK {
        let (gpu, _) = gpu();
        let step = step_buffer(gpu);
        let lb = f32_buffer(gpu, logits);
        let out = gpu.storage("out", u64::from(top_k_words(k)) * 4);
        let la = Act::new(&lb, logits.len() as u32 / n_vocab, n_vocab);
        let d = record(&step, max_tokens, |rec| rec.top_k(la, row, k, &out)).unwrap();
        run(gpu, &step, &d, n_tokens);
        TopK::from_words(&gpu.read_u32(&out, top_k_words(k) as usize).unwrap(), k)
    }

    #[track_caller]
    fn assert_top_k(got: &TopK, want: &TopK, what: &str) {
        assert_eq!(got.entries, want.entries, "{what}: entries");
        assert_eq!(got.max, want.max, "{what}: max");
        assert_close(&[got.log_sum_exp], &[want.log_sum_exp], 1e-5, 1e-5, &format!("{what}: log-sum-exp"));
    }

    #[test]
    fn argmax_matches_cpu() {
        let mut rng = Rng::new(21);
        for n_vocab in [1000u32, 49152, 248320] {
            let (max_tokens, t) = (3u32, 2u32);
            let logits = rng.vec((n_vocab * max_tokens) as usize, 20.0);
            for (row, r) in [(Row::Last, 1usize), (Row::Index(2), 2)] {
                let got = gpu_top_k(&logits, n_vocab, row, 1, t, max_tokens);
                let want = cpu_top_k(&logits[r * n_vocab as usize..(r + 1) * n_vocab as usize], 1);
                assert_top_k(&got, &want, &format!("argmax of {n_vocab}, row {row:?}"));
            }
        }
    }

    #[test]
    fn argmax_ties_go_to_the_lowest_id() {
        let (gpu, _) = gpu();
        let n_vocab = 49152u32;
        let mut logits = vec![0.5f32; n_vocab as usize];
        // Equal maxima in different chunks, threads and elements of a thread.
        for i in [40000, 9000, 8999, 30000, 257] {
            logits[i] = 3.0;
        }
        let step = step_buffer(gpu);
        let lb = f32_buffer(gpu, &logits);
        let out = gpu.storage("out", 16);
        let d = record(&step, 1, |rec| rec.argmax(Act::new(&lb, 1, n_vocab), Row::Index(0), &out)).unwrap();
        run(gpu, &step, &d, 1);
        assert_eq!(gpu.read_u32(&out, 1).unwrap(), vec![257]);
        // All equal: id 0.
        let lb = f32_buffer(gpu, &vec![-1.0; n_vocab as usize]);
        let d = record(&step, 1, |rec| rec.argmax(Act::new(&lb, 1, n_vocab), Row::Index(0), &out)).unwrap();
        run(gpu, &step, &d, 1);
        assert_eq!(gpu.read_u32(&out, 1).unwrap(), vec![0]);
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
            let got = gpu_top_k(&logits, n_vocab, Row::Last, k, 1, 1);
            let want = cpu_top_k(&logits, k as usize);
            assert_top_k(&got, &want, &format!("top {k} of {n_vocab}"));
        }
    }

    #[test]
    fn top_k_checks_shapes() {
        let (gpu, _) = gpu();
        let step = step_buffer(gpu);
        let logits = f32_buffer(gpu, &[0.0; 100]);
        let out = gpu.storage("out", u64::from(top_k_words(64)) * 4);
        let (one_row, two_rows) = (Act::new(&logits, 1, 100), Act::new(&logits, 2, 50));
        let top = |max_tokens, logits, row, k, out| record(&step, max_tokens, |rec| rec.top_k(logits, row, k, out));
        assert!(top(1, one_row, Row::Last, 65, &out).is_err());
        assert!(top(3, two_rows, Row::Last, 8, &out).is_err());
        assert!(top(1, two_rows, Row::Index(1), 8, &out).is_ok());
        assert!(top(1, two_rows, Row::Index(2), 8, &out).is_err());
        let small = gpu.storage("out", 8);
        assert!(top(1, one_row, Row::Last, 1, &small).is_err());
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
    fn penalize_matches_llama_cpp() {
        let (gpu, kernels) = gpu();
        let mut rng = Rng::new(23);
        let (n_vocab, max_tokens, max_ids) = (5000u32, 2u32, 300u32);
        let logits = rng.vec((n_vocab * max_tokens) as usize, 5.0);
        // Recent tokens with repeats, and one id past the vocabulary.
        let mut ids: Vec<u32> = (0..250).map(|_| rng.below(400) as u32 * 7).collect();
        ids.push(n_vocab + 3);
        let step = step_buffer(gpu);
        let mut room = ids.clone();
        room.resize(max_ids as usize, 0);
        let (lb, ib) = (f32_buffer(gpu, &logits), u32_buffer(gpu, &room));
        let rec = Recorder::new(gpu, kernels, &step, max_tokens).unwrap();
        let p = rec.penalize(Act::new(&lb, max_tokens, n_vocab), Row::Last, &ib, max_ids).unwrap();
        // Not set yet: nothing happens.
        run(gpu, &step, std::slice::from_ref(&p.dispatch), 2);
        assert_eq!(gpu.read_f32(&lb, logits.len()).unwrap(), logits);
        let penalties = Penalties { repeat: 1.3, frequency: 0.25, presence: 0.5 };
        p.set(&gpu.queue, ids.len() as u32, penalties).unwrap();
        run(gpu, &step, std::slice::from_ref(&p.dispatch), 2);
        let mut want = logits.clone();
        cpu_penalize(&mut want[n_vocab as usize..], &ids, penalties);
        assert_close(&gpu.read_f32(&lb, logits.len()).unwrap(), &want, 1e-6, 1e-6, "penalized");
        assert!(p.set(&gpu.queue, max_ids + 1, penalties).is_err());
    }
}
