//! Turning logits into a token id: greedy, or seeded sampling with temperature, top-k,
//! top-p, min-p and repetition penalties, in llama.cpp's order.
//!
//! The GPU never sends a whole logit row back: it sends the best [`Candidate`]s (sorted,
//! at most [`MAX_CANDIDATES`]) after applying the penalties, and the host samples among them.

use crate::{Error, Result};

/// The most candidates a sampling step considers (and a node reads back).
pub const MAX_CANDIDATES: usize = 64;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no limit (beyond [`MAX_CANDIDATES`]).
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    /// 1.0 means off; llama.cpp semantics (positive logits divided, negative multiplied).
    pub repeat_penalty: f32,
    /// How many recent tokens the penalties look at.
    pub repeat_last_n: usize,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams { temperature: 0.0, ..Default::default() }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// Whether any penalty changes logits.
    pub fn has_penalties(&self) -> bool {
        self.repeat_penalty != 1.0 || self.presence_penalty != 0.0 || self.frequency_penalty != 0.0
    }

    /// Rejects values out of range, naming the parameter.
    pub fn validate(&self) -> Result<()> {
        let bad = |param: &'static str, range: &str, v: f32| {
            Err(Error::Sampling { param, message: format!("{param} {v} is outside {range}") })
        };
        if !(0.0..=100.0).contains(&self.temperature) {
            return bad("temperature", "0..=100", self.temperature);
        }
        if !(0.0..=1.0).contains(&self.top_p) || self.top_p.is_nan() {
            return bad("top_p", "0..=1", self.top_p);
        }
        if !(0.0..=1.0).contains(&self.min_p) || self.min_p.is_nan() {
            return bad("min_p", "0..=1", self.min_p);
        }
        if !(self.repeat_penalty > 0.0 && self.repeat_penalty <= 10.0) {
            return bad("repeat_penalty", "(0, 10]", self.repeat_penalty);
        }
        for (param, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(param, "-2..=2", v);
            }
        }
        Ok(())
    }
}

/// One candidate token and its (penalised) logit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub id: u32,
    pub logit: f32,
}

/// Applies repetition, presence and frequency penalties for `history` to `logits`, as
/// llama.cpp does: each distinct recent token once for the repeat and presence
/// penalties, `count` times for the frequency penalty.
pub fn apply_penalties(logits: &mut [f32], history: &[u32], params: &SamplingParams) {
    if !params.has_penalties() {
        return;
    }
    let recent = &history[history.len().saturating_sub(params.repeat_last_n)..];
    let mut counts: Vec<(u32, u32)> = Vec::new();
    for &t in recent {
        match counts.iter_mut().find(|(id, _)| *id == t) {
            Some((_, c)) => *c += 1,
            None => counts.push((t, 1)),
        }
    }
    for (id, count) in counts {
        let Some(l) = logits.get_mut(id as usize) else { continue };
        *l = if *l <= 0.0 { *l * params.repeat_penalty } else { *l / params.repeat_penalty };
        *l -= count as f32 * params.frequency_penalty + params.presence_penalty;
    }
}

/// The best `k` candidates of a full logit row, sorted by logit (ties: lower id first).
pub fn top_candidates(logits: &[f32], k: usize) -> Vec<Candidate> {
    let mut c: Vec<Candidate> = logits.iter().enumerate().map(|(i, &l)| Candidate { id: i as u32, logit: l }).collect();
    let k = k.min(c.len());
    let order = |a: &Candidate, b: &Candidate| b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id));
    if k < c.len() {
        c.select_nth_unstable_by(k, order);
        c.truncate(k);
    }
    c.sort_by(order);
    c
}

/// A seeded sampler for one sequence.
///
/// Its randomness is counter-based: the draw for a token is a hash of the seed and the
/// draw's index (callers use the token's position), not the next number of a stream. So a
/// sequence that is run again from its tokens (recomputed after its caches were freed,
/// replayed onto another node) or run in any batch draws exactly what it drew before.
pub struct Sampler {
    params: SamplingParams,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Sampler> {
        params.validate()?;
        Ok(Sampler { params })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks a token from `candidates` (sorted best first, penalties already applied) with
    /// draw number `draw` (the position the token will take).
    pub fn sample(&self, candidates: &[Candidate], draw: u64) -> Result<u32> {
        let first = candidates.first().ok_or(Error::NoCandidates)?;
        if self.params.is_greedy() {
            return Ok(first.id);
        }
        let p = &self.params;
        let k = if p.top_k == 0 { candidates.len() } else { p.top_k.min(candidates.len()) };
        let cands = &candidates[..k];
        // Probabilities at temperature 1 for top-p and min-p, as llama.cpp's chain does
        // (temperature is applied after the filters).
        let max = first.logit;
        let weights: Vec<f64> = cands.iter().map(|c| f64::from(c.logit - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut keep = cands.len();
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            for (i, w) in weights.iter().enumerate() {
                cum += w / total;
                if cum >= f64::from(p.top_p) {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            // Relative to the best token's probability.
            let n = weights[..keep].iter().take_while(|&&w| w >= f64::from(p.min_p)).count();
            keep = n.max(1);
        }
        let t = f64::from(p.temperature);
        let scaled: Vec<f64> = cands[..keep].iter().map(|c| (f64::from(c.logit - max) / t).exp()).collect();
        let sum: f64 = scaled.iter().sum();
        let mut u = uniform(self.params.seed, draw) * sum;
        for (c, w) in cands.iter().zip(&scaled) {
            if u < *w {
                return Ok(c.id);
            }
            u -= w;
        }
        Ok(cands[keep - 1].id)
    }

    /// Samples from a whole logit row (CPU paths and tests): penalties, candidates, sample.
    pub fn sample_logits(&self, logits: &[f32], history: &[u32], draw: u64) -> Result<u32> {
        let mut l = logits.to_vec();
        apply_penalties(&mut l, history, &self.params);
        let cands = top_candidates(&l, MAX_CANDIDATES);
        self.sample(&cands, draw)
    }
}

/// splitmix64's finaliser: a well-mixed 64-bit hash of `z`.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Uniform in [0, 1): draw number `draw` of the stream `seed`, reproducible across
/// platforms and independent of every other draw.
fn uniform(seed: u64, draw: u64) -> f64 {
    let z = mix(mix(seed.wrapping_add(0x9e37_79b9_7f4a_7c15)) ^ draw.wrapping_mul(0xd1b5_4a32_d192_ed03));
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(logits: &[f32]) -> Vec<Candidate> {
        top_candidates(logits, MAX_CANDIDATES)
    }

    #[test]
    fn greedy_takes_the_best_and_ties_go_to_the_lower_id() {
        let s = Sampler::new(SamplingParams::greedy()).unwrap();
        assert_eq!(s.sample(&cands(&[0.1, 2.0, 2.0, -1.0]), 0).unwrap(), 1);
    }

    #[test]
    fn same_seed_same_tokens_and_different_seed_differs() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let run = |seed| {
            let s = Sampler::new(SamplingParams {
                temperature: 1.5,
                top_k: 0,
                top_p: 1.0,
                min_p: 0.0,
                seed,
                ..Default::default()
            })
            .unwrap();
            (0..64).map(|i| s.sample(&cands(&logits), i).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        // A draw depends on its number only: any subset, in any order, draws the same.
        let s = Sampler::new(SamplingParams {
            temperature: 1.5,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 7,
            ..Default::default()
        })
        .unwrap();
        let all = run(7);
        for i in [40u64, 3, 63, 0] {
            assert_eq!(s.sample(&cands(&logits), i).unwrap(), all[i as usize]);
        }
    }

    #[test]
    fn top_k_one_is_greedy() {
        let s = Sampler::new(SamplingParams { temperature: 5.0, top_k: 1, ..Default::default() }).unwrap();
        for i in 0..20 {
            assert_eq!(s.sample(&cands(&[0.0, 0.5, 0.4]), i).unwrap(), 1);
        }
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        // p ~ [0.66, 0.24, 0.09, 0.01]: top_p 0.5 keeps only the first.
        let logits = [3.0, 2.0, 1.0, -1.0];
        let s =
            Sampler::new(SamplingParams { temperature: 1.0, top_k: 0, top_p: 0.5, min_p: 0.0, ..Default::default() })
                .unwrap();
        assert!((0..50).all(|i| s.sample(&cands(&logits), i).unwrap() == 0));
        // min_p 0.3 keeps tokens with p >= 0.3 * p_max: ids 0 and 1 (e^-1 = 0.37).
        let s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.3,
            seed: 3,
            ..Default::default()
        })
        .unwrap();
        let seen: std::collections::BTreeSet<u32> = (0..300).map(|i| s.sample(&cands(&logits), i).unwrap()).collect();
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![0, 1]);
    }

    #[test]
    fn sampling_frequencies_follow_the_temperature() {
        let logits = [1.0f32, 0.0];
        let s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 11,
            ..Default::default()
        })
        .unwrap();
        let n = 20_000;
        let zeros = (0..n).filter(|&i| s.sample(&cands(&logits), i).unwrap() == 0).count();
        let p = zeros as f64 / n as f64;
        let want = 1.0 / (1.0 + (-1.0f64).exp());
        assert!((p - want).abs() < 0.015, "p(0) = {p}, want {want}");
    }

    #[test]
    fn penalties_follow_llama_cpp() {
        let mut l = vec![2.0, -2.0, 1.0, 0.5];
        let p = SamplingParams {
            repeat_penalty: 2.0,
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..Default::default()
        };
        apply_penalties(&mut l, &[0, 1, 0, 9999], &p);
        assert_eq!(l, vec![2.0 / 2.0 - 0.5 - 0.5, -4.0 - 0.25 - 0.5, 1.0, 0.5]);
    }

    #[test]
    fn out_of_range_parameters_are_named() {
        let e = SamplingParams { top_p: 1.5, ..Default::default() }.validate().unwrap_err();
        assert!(e.to_string().contains("top_p"));
        let e = SamplingParams { temperature: -1.0, ..Default::default() }.validate().unwrap_err();
        assert!(e.to_string().contains("temperature"));
    }
}
