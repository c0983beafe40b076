//! The sequences a stage holds: each in a slot (its row of the block table and its place
//! in every DeltaNet state), with the KV blocks its positions take, its sampler and the
//! recent tokens its penalties look at.

use std::collections::HashMap;
use std::time::Instant;

use strata_model::sampling::{Sampler, SamplingParams};

use super::SeqId;
use crate::kv_pool::BlockTable;
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Admitted {
    pub slot: u32,
    /// Its recurrent state starts over (a step at position 0): clear its slot first.
    pub reset: bool,
    /// Its recurrent state comes back from its checkpoint (a step at its position).
    pub restore: bool,
    /// Its recurrent state is kept as its checkpoint after the step.
    pub save: bool,
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
}

impl Sequences {
    pub fn new(slots: u32, recurrent: bool, checkpoints: bool) -> Sequences {
        Sequences { seqs: HashMap::new(), free_slots: (0..slots).rev().collect(), recurrent, checkpoints }
    }

    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    pub fn contains(&self, seq: SeqId) -> bool {
        self.seqs.contains_key(&seq)
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
    /// With `checkpoint`, the state after the step becomes its checkpoint. On any error
    /// the sequence is as it was.
    pub fn admit(
        &mut self,
        queue: &wgpu::Queue,
        table: Option<&mut BlockTable>,
        seq: SeqId,
        pos: u32,
        rows: u32,
        checkpoint: bool,
    ) -> Result<Admitted> {
        let end = pos + rows;
        if checkpoint && self.recurrent && !self.checkpoints {
            let message = "asks for a checkpoint of its recurrent state on a stage loaded without them".to_owned();
            return Err(Error::Sequence { seq, message });
        }
        let known = self.seqs.get(&seq).map(|s| (s.len, s.checkpoint));
        let mut restore = false;
        match known {
            None if pos != 0 => {
                let message = format!(
                    "step at position {pos} of a sequence this stage does not hold (released, timed out, or never started at position 0)"
                );
                return Err(Error::Sequence { seq, message });
            }
            Some((len, _)) if pos > len => {
                let message = format!("step at position {pos} leaves a gap after its {len} positions");
                return Err(Error::Sequence { seq, message });
            }
            Some((len, kept)) if self.recurrent && pos != len && pos != 0 => {
                if kept != Some(pos) {
                    let at = kept.map_or(String::new(), |c| format!(" and its checkpoint at {c}"));
                    let message = format!("step at position {pos} but its recurrent state is at {len}{at}");
                    return Err(Error::Sequence { seq, message });
                }
                restore = true;
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
            };
            self.seqs.insert(seq, new);
        }
        let s = self.seqs.get_mut(&seq).expect("present or inserted above");
        if let Some(table) = table {
            if let Err(e) = table.grow(queue, s.slot, &mut s.blocks, end) {
                if fresh {
                    let s = self.seqs.remove(&seq).expect("inserted above");
                    self.free_slots.push(s.slot);
                }
                return Err(e);
            }
            // A step that starts before the end drops the positions after it.
            table.shrink(&mut s.blocks, end);
        }
        let reset = pos == 0 && self.recurrent;
        if pos == 0 {
            s.history.clear();
        }
        // A checkpoint past where the sequence starts again holds tokens it drops.
        if s.checkpoint.is_some_and(|c| c > pos) {
            s.checkpoint = None;
        }
        let save = checkpoint && self.recurrent;
        if save {
            s.checkpoint = Some(end);
        }
        s.len = end;
        s.last_used = Instant::now();
        Ok(Admitted { slot: s.slot, reset, restore, save })
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
