//! Speculative decoding: drafts that the pipeline checks several at a time.
//!
//! A sequence's decode step carries its newest token and, after it, up to `--draft-max`
//! draft tokens proposed by prompt lookup (the tokens that followed the earlier occurrence
//! of the sequence's latest tokens that agrees with them longest). The last stage samples
//! after every one of those rows with the draw of that row's own position, so the sample
//! after the newest token is the very token a plain step would have sampled; a draft is
//! kept while it equals the sample before it, and the first sample that differs replaces
//! it. The output is therefore the plain run's, token for token, greedy or sampled: a draft
//! that is one fixed token is accepted with probability p(draft), and a rejection leaves a
//! sample from p given "not the draft", which is the speculative-sampling rule for a draft
//! distribution that puts all its mass on one token.
//!
//! Rejected rows leave no trace: attention rewrites their positions at the next step,
//! and recurrent (DeltaNet) stages keep the state after the step's sure rows as a
//! rollback state (`strata_node::stage::SeqStep::keep`), from which the next step
//! computes the accepted drafts again.
//!
//! With `--speculative mtp` the drafts come from the model's MTP block instead, which the
//! last stage runs inside each step after the head (`strata_node::stage::SeqStep::draft`):
//! a step answers its samples and the drafts for the next step, which follow its last
//! sample. They are used when that sample is the token kept there (every draft of the
//! step accepted); after a rejection the next step carries no drafts and makes new ones.
//! Verification is the same, so the output is the plain run's whatever drafts them.

/// How the scheduler speculates, for every request that allows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Speculation {
    /// Draft tokens one sequence's step carries, at most.
    pub draft_max: u32,
    /// Some layers carry a recurrent state: rejected drafts are undone through the
    /// stages' rollback state, and the accepted ones are computed again.
    pub recurrent: bool,
    /// Drafts come from the model's MTP block on the last stage, not prompt lookup.
    pub mtp: bool,
}

impl Speculation {
    /// What `--speculative` and `--draft-max` ask of a model like `config`; `None` when off.
    pub fn new(args: &crate::cli::EngineArgs, config: &strata_model::config::ModelConfig) -> Option<Speculation> {
        let draft_max = crate::engine::draft_max(args);
        let recurrent = config.layers.contains(&strata_model::config::LayerKind::DeltaNet);
        let mtp = crate::engine::mtp(args, config).unwrap_or(false);
        (draft_max > 0).then_some(Speculation { draft_max, recurrent, mtp })
    }

    /// What drafts: `mtp` or `lookup`.
    pub fn drafter(&self) -> &'static str {
        if self.mtp { "mtp" } else { "lookup" }
    }
}

/// The longest suffix prompt lookup compares, and the shortest it accepts. Code repeats
/// short runs everywhere (indentation, `self.`, a common line's start), so a 2- to
/// 4-token suffix recurs in many places, most of them followed by something else; the
/// place whose preceding tokens agree longest with the sequence's own is the one being
/// copied. 64 tokens tell such places apart and cost little to compare.
const MATCH_MAX: usize = 64;
const NGRAM_MIN: usize = 2;

/// A step carrying this many rows already gets no drafts: by then the stages are busy
/// with the batch, and drafts would only lengthen the step.
pub const BACK_OFF_ROWS: usize = 32;

/// Prompt lookup: the tokens that followed the earlier occurrence of the sequence's
/// latest tokens that agrees with them longest (up to [`MATCH_MAX`] tokens back, at
/// least [`NGRAM_MIN`]; the latest such occurrence among equals), at most `k` of them;
/// empty when no suffix recurs.
pub fn lookup(tokens: &[u32], k: usize) -> Vec<u32> {
    let n = tokens.len();
    if k == 0 || n <= NGRAM_MIN {
        return Vec::new();
    }
    let last = tokens[n - 1];
    // (agreeing tokens, where the drafts start)
    let mut best = (0, 0);
    // Latest first, so that among equal matches the nearest context wins.
    for from in (1..n).rev() {
        if tokens[from - 1] != last {
            continue;
        }
        let agree =
            tokens[..from].iter().rev().zip(tokens.iter().rev()).take(MATCH_MAX).take_while(|(a, b)| a == b).count();
        if agree > best.0 {
            best = (agree, from);
            if agree == MATCH_MAX {
                break;
            }
        }
    }
    let (agree, from) = best;
    if agree < NGRAM_MIN {
        return Vec::new();
    }
    tokens[from..(from + k).min(n)].to_vec()
}

/// One sequence's speculation: how many drafts it tries, and the ones in flight.
#[derive(Debug, Clone, Default)]
pub struct Drafting {
    /// Drafts to propose next time, adapted to how many were accepted lately.
    pub len: u32,
    /// Its most drafts per step (`--draft-max`, or less if its request asks).
    pub max: u32,
    /// The drafts of the step in flight, and the position of the first of them.
    pub pending: Option<(Vec<u32>, usize)>,
    /// The MTP head's drafts for its next step (they follow its newest token).
    pub mtp: Vec<u32>,
    /// Drafts proposed and accepted, and the sequence's decode steps.
    pub drafted: u64,
    pub accepted: u64,
}

impl Drafting {
    pub fn new(draft_max: u32) -> Drafting {
        Drafting { len: draft_max.max(1), max: draft_max.max(1), ..Drafting::default() }
    }

    /// After a step that checked `drafted` drafts and kept `accepted`: one more next time
    /// when all were kept, else one more than were kept.
    pub fn adapt(&mut self, drafted: usize, accepted: usize, draft_max: u32) {
        self.drafted += drafted as u64;
        self.accepted += accepted as u64;
        self.len = if accepted == drafted { self.len + 1 } else { accepted as u32 + 1 }.clamp(1, draft_max.max(1));
    }
}

/// How many of `drafts` the samples keep: each draft while it equals the sample of the
/// row before it (`samples[j]` is the model's token after the row before draft `j`).
pub fn accepted(drafts: &[u32], samples: &[u32]) -> usize {
    drafts.iter().zip(samples).take_while(|(d, s)| d == s).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_continues_the_earlier_occurrence_that_agrees_longest() {
        // "1 2 3 4" occurred before, followed by 5 6 7.
        assert_eq!(lookup(&[1, 2, 3, 4, 5, 6, 7, 9, 1, 2, 3, 4], 3), [5, 6, 7]);
        // Capped by k, and by the end of the sequence.
        assert_eq!(lookup(&[1, 2, 3, 4, 5, 6, 7, 9, 1, 2, 3, 4], 1), [5]);
        assert_eq!(lookup(&[7, 8, 1, 2, 7, 8], 8), [1, 2, 7, 8]);
        // The latest occurrence wins: "8 9" was followed by 1, later by 2.
        assert_eq!(lookup(&[8, 9, 1, 8, 9, 2, 0, 8, 9], 1), [2]);
        // A longer suffix beats a later shorter one: "3 4" occurs last before 6, but
        // "2 3 4" only before 5.
        assert_eq!(lookup(&[2, 3, 4, 5, 0, 3, 4, 6, 1, 2, 3, 4], 1), [5]);
        // A single recurring token is not enough, nor an empty or short sequence.
        assert!(lookup(&[5, 1, 2, 5], 4).is_empty());
        assert!(lookup(&[], 4).is_empty());
        assert!(lookup(&[1, 2], 4).is_empty());
        assert!(lookup(&[1, 2, 1, 2], 0).is_empty());
        // Past four tokens the longest agreement still decides: "5 1 2 3 4" was followed
        // by 7, a later "0 1 2 3 4" by 8.
        assert_eq!(lookup(&[5, 1, 2, 3, 4, 7, 0, 1, 2, 3, 4, 8, 5, 1, 2, 3, 4], 1), [7]);
        // A sequence that repeats itself (the suffix overlaps its match) drafts the period.
        assert_eq!(lookup(&[3, 3, 3, 3, 3], 2), [3]);
    }

    #[test]
    fn drafts_are_kept_while_they_equal_the_samples() {
        assert_eq!(accepted(&[5, 6, 7], &[5, 6, 7, 8]), 3);
        assert_eq!(accepted(&[5, 6, 7], &[5, 9, 7, 8]), 1);
        assert_eq!(accepted(&[5, 6, 7], &[4, 6, 7, 8]), 0);
        assert_eq!(accepted(&[], &[4]), 0);
    }

    #[test]
    fn the_draft_length_follows_acceptance() {
        let mut d = Drafting::new(4);
        assert_eq!(d.len, 4);
        d.adapt(4, 1, 4);
        assert_eq!(d.len, 2);
        d.adapt(2, 2, 4);
        assert_eq!(d.len, 3);
        d.adapt(3, 0, 4);
        assert_eq!(d.len, 1);
        d.adapt(1, 1, 4);
        d.adapt(2, 2, 4);
        d.adapt(3, 3, 4);
        d.adapt(4, 4, 4);
        assert_eq!(d.len, 4);
        assert_eq!((d.drafted, d.accepted), (19, 13));
    }
}
