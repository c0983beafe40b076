//! The sequences a stage holds: each in a slot (its row of the block table and its place
//! in every DeltaNet state), with the KV blocks its positions take, its sampler and the
//! recent tokens its penalties look at.

use std::collections::HashMap;
use std::time::Instant;

use strata_model::sampling::{Sampler, SamplingParams};

use super::SeqId;
use crate::kv_pool::{BlockCopy, BlockTable};
use crate::{Error, Result};

/// Recent tokens the repetition penalties look at, at most.
pub const MAX_RECENT: usize = 256;

pub(super) struct Sequence {
    pub slot: u32,
    /// The KV blocks of its positions, in order (none on a stage without attention).
    pub blocks: Vec<u32>,
    /// Positions it holds: its next step starts here (or, on a stage without recurrent
    /// layers, anywhere before).
    pub len: u32,
    pub sampler: Option<Sampler>,
    /// Its prompt and sampled tokens, the last [`MAX_RECENT`] of them.
    pub history: Vec<u32>,
    pub last_used: Instant,
    /// The position its recurrent state's checkpoint is at (the state after that many
    /// positions), if it has one.
    pub checkpoint: Option<u32>,
    /// The position its recurrent rollback state is at (kept mid-step by a speculative
    /// step, see `SeqStep::keep`), if it has one.
    pub rollback: Option<u32>,
    /// The position of the first of the hidden rows the MTP head kept for its next step
    /// (see `mtp::MtpHead`), if it kept any.
    pub mtp_kept: Option<u32>,
}

impl Sequence {
    /// The sampler for `params`, made anew when they change.
    pub fn sampler(&mut self, params: &SamplingParams) -> Result<&Sampler> {
        if self.sampler.as_ref().is_none_or(|s| s.params() != params) {
            self.sampler = Some(Sampler::new(params.clone())?);
        }
        Ok(self.sampler.as_ref().expect("set above"))
    }

    pub fn note(&mut self, ids: &[u32]) {
        self.history.extend_from_slice(ids);
        let over = self.history.len().saturating_sub(MAX_RECENT);
        self.history.drain(..over);
    }
}

/// Where a step of a sequence starts, as [`Sequences::admit`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Admitted {
    pub slot: u32,
    /// Its recurrent state starts over (a step at position 0): clear its slot first.
    pub reset: bool,
    /// Its recurrent state comes back from its checkpoint (a step at its position).
    pub restore: bool,
    /// Its recurrent state is kept as its checkpoint after the step.
    pub save: bool,
    /// Its recurrent state comes back from its rollback state (a step at its position,
    /// dropping rejected draft rows); the step keeps a new one mid-step.
    pub roll_back: bool,
    pub keep: bool,
    /// Shared KV blocks the step writes, to copy first (copy on write).
    pub copies: Vec<BlockCopy>,
    /// A fork's recurrent state: the slot it comes from, and whether from that slot's
    /// checkpoint (else its live state).
    pub fork: Option<(u32, bool)>,
}

/// What a fork starts with: its source's blocks of their common prefix, and the slot its
/// recurrent state is copied from (and whether from that slot's checkpoint).
struct Fork {
    blocks: Vec<u32>,
    state: Option<(u32, bool)>,
}

/// Every sequence on the stage, their slots and (with attention layers) their blocks.
pub(super) struct Sequences {
    seqs: HashMap<SeqId, Sequence>,
    /// Free slots, the next to hand out last.
    free_slots: Vec<u32>,
    /// The stage has layers whose state only moves forward.
    recurrent: bool,
    /// ... and keeps a checkpoint of it per slot.
    checkpoints: bool,
    /// ... and a rollback state per slot (the stage verifies drafts).
    rollback: bool,
}

impl Sequences {
    pub fn new(slots: u32, recurrent: bool, checkpoints: bool, rollback: bool) -> Sequences {
        Sequences { seqs: HashMap::new(), free_slots: (0..slots).rev().collect(), recurrent, checkpoints, rollback }
    }

    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    pub fn contains(&self, seq: SeqId) -> bool {
        self.seqs.contains_key(&seq)
    }

    pub fn get(&self, seq: SeqId) -> Option<&Sequence> {
        self.seqs.get(&seq)
    }

    pub fn get_mut(&mut self, seq: SeqId) -> Option<&mut Sequence> {
        self.seqs.get_mut(&seq)
    }

    /// The recent tokens of `seq` (none if unknown).
    pub fn history(&self, seq: SeqId) -> &[u32] {
        self.seqs.get(&seq).map_or(&[], |s| &s.history[..])
    }

    pub fn free_slots(&self) -> u32 {
        self.free_slots.len() as u32
    }

    /// Readies `seq` for a step of `rows` rows from `pos`: a new sequence (at position 0)
    /// takes a slot; its blocks grow to cover the step (`table`, when the stage has a KV
    /// pool). Checks the order first: a step starts where the sequence's positions end, or
    /// at 0 (starting over); on a stage without recurrent layers anywhere before the end
    /// too (attention rewrites the positions), and on one with them at its checkpoint.
    /// A new sequence may start at `pos` as a fork of `fork`: it shares that sequence's
    /// blocks of positions `0..pos` and starts from its recurrent state there (its live
    /// state or its checkpoint). With `checkpoint`, the state after the step becomes its
    /// checkpoint. With `keep`, the state after its first `keep` rows becomes its rollback
    /// state, which a later step starting there resumes from (dropping what the rows after
    /// did: rejected speculative drafts). The blocks cover `ahead` positions past its rows
    /// too (the MTP head's draft rows). On any error the sequence is as it was.
    #[allow(clippy::too_many_arguments)]
    pub fn admit(
        &mut self,
        queue: &wgpu::Queue,
        table: Option<&mut BlockTable>,
        seq: SeqId,
        pos: u32,
        rows: u32,
        ahead: u32,
        checkpoint: bool,
        fork: Option<SeqId>,
        keep: u32,
    ) -> Result<Admitted> {
        let end = pos + rows;
        if checkpoint && self.recurrent && !self.checkpoints {
            let message = "asks for a checkpoint of its recurrent state on a stage loaded without them".to_owned();
            return Err(Error::Sequence { seq, message });
        }
        if keep > 0 && self.recurrent && !self.rollback {
            let message = "asks to keep a rollback state on a stage loaded without speculation".to_owned();
            return Err(Error::Sequence { seq, message });
        }
        let known = self.seqs.get(&seq).map(|s| (s.len, s.checkpoint, s.rollback));
        let (mut restore, mut roll_back) = (false, false);
        let mut forked: Option<Fork> = None;
        match known {
            None if pos != 0 && fork.is_some_and(|f| f != seq) => {
                let src = fork.expect("checked above");
                forked = Some(self.fork_source(table.as_deref(), seq, src, pos)?);
            }
            None if pos != 0 => {
                let message = format!(
                    "step at position {pos} of a sequence this stage does not hold (released, timed out, or never started at position 0)"
                );
                return Err(Error::Sequence { seq, message });
            }
            Some((len, _, _)) if pos > len => {
                let message = format!("step at position {pos} leaves a gap after its {len} positions");
                return Err(Error::Sequence { seq, message });
            }
            Some((len, kept, back)) if self.recurrent && pos != len && pos != 0 => {
                if back == Some(pos) {
                    roll_back = true;
                } else if kept == Some(pos) {
                    restore = true;
                } else {
                    let at = kept.map_or(String::new(), |c| format!(" and its checkpoint at {c}"));
                    let back = back.map_or(String::new(), |r| format!(" (rollback state at {r})"));
                    let message = format!("step at position {pos} but its recurrent state is at {len}{at}{back}");
                    return Err(Error::Sequence { seq, message });
                }
            }
            _ => {}
        }
        let fresh = known.is_none();
        if fresh {
            let Some(slot) = self.free_slots.pop() else {
                let n = self.seqs.len();
                return Err(Error::Exhausted(format!(
                    "all {n} sequence slots of this stage are taken (sequences held at once: --max-seqs)"
                )));
            };
            let new = Sequence {
                slot,
                blocks: Vec::new(),
                len: 0,
                sampler: None,
                history: Vec::new(),
                last_used: Instant::now(),
                checkpoint: None,
                rollback: None,
                mtp_kept: None,
            };
            self.seqs.insert(seq, new);
        }
        let s = self.seqs.get_mut(&seq).expect("present or inserted above");
        let mut copies = Vec::new();
        if let Some(table) = table {
            if let Some(f) = &forked {
                table.share(queue, s.slot, &mut s.blocks, &f.blocks);
            }
            // Blocks up to `end`, its own copy of any shared block it writes, and none
            // past `end` (a step that starts before the end drops the positions after it).
            match table.prepare(queue, s.slot, &mut s.blocks, pos, end + ahead) {
                Ok(c) => copies = c,
                Err(e) => {
                    if fresh {
                        table.shrink(&mut s.blocks, 0);
                        let s = self.seqs.remove(&seq).expect("inserted above");
                        self.free_slots.push(s.slot);
                    }
                    return Err(e);
                }
            }
        }
        let reset = pos == 0 && self.recurrent;
        if pos == 0 {
            s.history.clear();
        }
        // A checkpoint past where the sequence starts again holds tokens it drops.
        if s.checkpoint.is_some_and(|c| c > pos) {
            s.checkpoint = None;
        }
        if s.rollback.is_some_and(|r| r > pos) {
            s.rollback = None;
        }
        let save = checkpoint && self.recurrent;
        if save {
            s.checkpoint = Some(end);
        }
        let keep_rows = keep;
        let keep = keep > 0 && self.recurrent;
        if keep {
            s.rollback = Some(pos + keep_rows);
        }
        s.len = end;
        s.last_used = Instant::now();
        Ok(Admitted { slot: s.slot, reset, restore, save, roll_back, keep, copies, fork: forked.and_then(|f| f.state) })
    }

    /// What a new sequence `seq` forked from `src` at `pos` starts with: `src`'s blocks of
    /// positions `0..pos`, and (on a recurrent stage) the slot and kind of the state it
    /// copies: `src`'s checkpoint at `pos`, or its live state when that is at `pos`.
    fn fork_source(&self, table: Option<&BlockTable>, seq: SeqId, src: SeqId, pos: u32) -> Result<Fork> {
        let refuse = |message: String| Err(Error::Sequence { seq, message });
        let Some(s) = self.seqs.get(&src) else {
            return refuse(format!("forks sequence {src} at position {pos}, which this stage does not hold"));
        };
        if s.len < pos {
            return refuse(format!("forks sequence {src} at position {pos}, past its {} positions", s.len));
        }
        let state = if !self.recurrent {
            None
        } else if !self.checkpoints {
            return refuse(format!("forks sequence {src}'s recurrent state on a stage loaded without checkpoints"));
        } else if s.checkpoint == Some(pos) {
            Some((s.slot, true))
        } else if s.len == pos {
            Some((s.slot, false))
        } else {
            let at = s.checkpoint.map_or(String::new(), |c| format!(" and its checkpoint at {c}"));
            return refuse(format!(
                "forks sequence {src} at position {pos}, but its recurrent state is at {}{at}",
                s.len
            ));
        };
        let blocks = table.map_or_else(Vec::new, |t| s.blocks[..(t.layout().blocks_for(pos) as usize)].to_vec());
        Ok(Fork { blocks, state })
    }

    /// Frees a sequence's slot and blocks.
    pub fn release(&mut self, table: Option<&mut BlockTable>, seq: SeqId) -> bool {
        let Some(mut s) = self.seqs.remove(&seq) else { return false };
        if let Some(t) = table {
            t.shrink(&mut s.blocks, 0);
        }
        self.free_slots.push(s.slot);
        true
    }

    /// Frees the sequences unused for `idle`; returns how many.
    pub fn release_idle(&mut self, mut table: Option<&mut BlockTable>, idle: std::time::Duration) -> usize {
        let stale: Vec<SeqId> =
            self.seqs.iter().filter(|(_, s)| s.last_used.elapsed() >= idle).map(|(&k, _)| k).collect();
        for seq in &stale {
            self.release(table.as_deref_mut(), *seq);
        }
        stale.len()
    }
}
