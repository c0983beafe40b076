//! The scheduler's copy of the stages' KV block bookkeeping.
//!
//! Every stage hands a sequence its blocks the same way (`strata_node::kv_pool::BlockTable`):
//! new ones as it grows, a copy of its own of a shared block a step writes, none past where
//! a step ends, and, when it is forked from another sequence, that sequence's blocks of
//! their common prefix. Doing the same here, step for step, the scheduler knows how many
//! blocks are held (a block shared by a fork once) before it admits a request or a step,
//! without asking the nodes, and counts what the prefix cache alone holds.

use std::collections::HashMap;

use strata_node::stage::SeqId;

/// Blocks by sequence, each block known by a number of its own and counted once however
/// many sequences hold it.
#[derive(Debug)]
pub struct BlockLedger {
    block_size: usize,
    seqs: HashMap<SeqId, Vec<u64>>,
    /// How many sequences hold each block.
    refs: HashMap<u64, u32>,
    next: u64,
}

impl BlockLedger {
    pub fn new(block_size: u32) -> BlockLedger {
        BlockLedger { block_size: block_size.max(1) as usize, seqs: HashMap::new(), refs: HashMap::new(), next: 0 }
    }

    fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_size)
    }

    /// Blocks held by any sequence.
    pub fn used(&self) -> u32 {
        self.refs.len() as u32
    }

    /// Blocks `seq` holds, its shared ones included.
    #[cfg(test)]
    pub fn held(&self, seq: SeqId) -> usize {
        self.seqs.get(&seq).map_or(0, Vec::len)
    }

    /// The blocks a step of `seq` writing positions `pos..end` takes from the pool: those
    /// past its end, and a copy of each shared block it writes.
    pub fn need(&self, seq: SeqId, pos: usize, end: usize) -> u32 {
        let held = self.seqs.get(&seq).map_or(&[][..], Vec::as_slice);
        let want = self.blocks_for(end);
        let written = (pos / self.block_size)..want.min(held.len());
        let shared = written.filter(|&i| self.refs[&held[i]] > 1).count();
        (want.saturating_sub(held.len()) + shared) as u32
    }

    /// The blocks the first step of a fork at `pos` writing up to `end` takes: the whole
    /// blocks it shares are not taken; the one it writes into is copied.
    pub fn fork_need(&self, pos: usize, end: usize) -> u32 {
        (self.blocks_for(end) - pos / self.block_size) as u32
    }

    /// A step of `seq` writing positions `pos..end`, as a stage takes it: blocks up to
    /// `end`, its own copy of every shared block it writes, none past `end`.
    pub fn step(&mut self, seq: SeqId, pos: usize, end: usize) {
        let want = self.blocks_for(end);
        let mut held = self.seqs.remove(&seq).unwrap_or_default();
        while held.len() < want {
            held.push(self.fresh());
        }
        for b in &mut held[(pos / self.block_size)..want] {
            if self.refs[b] > 1 {
                let own = self.fresh();
                let shared = std::mem::replace(b, own);
                self.unref(shared);
            }
        }
        let dropped: Vec<u64> = held.drain(want..).collect();
        for b in dropped {
            self.unref(b);
        }
        self.seqs.insert(seq, held);
    }

    fn fresh(&mut self) -> u64 {
        self.next += 1;
        self.refs.insert(self.next, 1);
        self.next
    }

    /// `dst`, a new sequence, forked from `src` at `pos`: it holds `src`'s blocks of
    /// positions `0..pos` too.
    pub fn fork(&mut self, src: SeqId, dst: SeqId, pos: usize) {
        let n = self.blocks_for(pos);
        let shared: Vec<u64> = self.seqs.get(&src).map_or_else(Vec::new, |b| b[..n.min(b.len())].to_vec());
        for b in &shared {
            *self.refs.get_mut(b).expect("held") += 1;
        }
        if let Some(old) = self.seqs.insert(dst, shared) {
            for b in old {
                self.unref(b);
            }
        }
    }

    /// `seq` lets go of its blocks.
    pub fn release(&mut self, seq: SeqId) {
        for b in self.seqs.remove(&seq).unwrap_or_default() {
            self.unref(b);
        }
    }

    /// Every sequence is gone (a re-plan).
    pub fn clear(&mut self) {
        self.seqs.clear();
        self.refs.clear();
    }

    /// Blocks that only sequences `keep` says yes to hold: what releasing them all would
    /// free.
    pub fn held_only_by(&self, keep: impl Fn(SeqId) -> bool) -> u32 {
        let others: std::collections::HashSet<u64> =
            self.seqs.iter().filter(|(s, _)| !keep(**s)).flat_map(|(_, b)| b.iter().copied()).collect();
        self.refs.keys().filter(|b| !others.contains(b)).count() as u32
    }

    fn unref(&mut self, b: u64) {
        let r = self.refs.get_mut(&b).expect("held");
        *r -= 1;
        if *r == 0 {
            self.refs.remove(&b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same walk as the node's `BlockTable` test of forks: the counts agree with what
    /// a stage holds.
    #[test]
    fn forks_share_blocks_until_one_writes_them() {
        let mut l = BlockLedger::new(16);
        assert_eq!(l.need(1, 0, 16), 1);
        l.step(1, 0, 16);
        l.step(1, 16, 18);
        l.step(1, 18, 20);
        assert_eq!((l.used(), l.held(1)), (2, 2));
        // A fork at 18 writes block 1: a copy of its own; block 0 stays shared.
        l.fork(1, 2, 18);
        assert_eq!((l.used(), l.held(2)), (2, 2));
        assert_eq!(l.need(2, 18, 22), 1);
        l.step(2, 18, 22);
        assert_eq!(l.used(), 3);
        // The source writes its block 1, no longer shared: nothing to copy.
        assert_eq!(l.need(1, 20, 24), 0);
        l.step(1, 20, 24);
        assert_eq!(l.used(), 3);
        // What the fork alone holds, and what releasing frees.
        assert_eq!(l.held_only_by(|s| s == 2), 1);
        l.release(1);
        assert_eq!(l.used(), 2);
        // Starting over at 0 writes every block it holds; past the end is given back.
        l.fork(2, 3, 20);
        l.step(3, 0, 4);
        assert_eq!((l.held(3), l.used()), (1, 3));
        l.release(2);
        l.release(3);
        assert_eq!(l.used(), 0);
    }
}
