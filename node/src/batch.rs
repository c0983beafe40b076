//! How a step's rows belong to its sequences: the layout the kernels read
//! (`common/batch.wgsl`). A step is a list of runs, each some consecutive rows of one
//! sequence at consecutive positions; kernels find a row's sequence state by its slot.

/// Per row of a step (WGSL `RowInfo`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct RowInfo {
    /// The row's position in its sequence.
    pub pos: u32,
    /// Its sequence's slot on the stage.
    pub slot: u32,
    /// The step's row where its sequence's run starts.
    pub first: u32,
    /// Its sequence's index among the step's runs.
    pub seq: u32,
}

/// Per run of a step (WGSL `SeqInfo`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SeqInfo {
    pub slot: u32,
    /// The run's first row in the step, and its length.
    pub first: u32,
    pub n: u32,
    /// The position of its first row.
    pub pos: u32,
    /// Recurrent layers keep its state after this many of its rows in its rollback slot
    /// (0: not kept).
    pub keep: u32,
}

/// One sequence's rows in a step: `n` rows at positions `pos..pos + n`, its state in `slot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub slot: u32,
    pub pos: u32,
    pub n: u32,
    /// See [`SeqInfo::keep`].
    pub keep: u32,
}

/// What the kernels read about a step of runs, in order: per row, per run, and each row's
/// position on its own (RoPE reads only that).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchLayout {
    pub rows: Vec<RowInfo>,
    pub seqs: Vec<SeqInfo>,
    pub positions: Vec<u32>,
}

impl BatchLayout {
    pub fn new(runs: &[Run]) -> BatchLayout {
        let mut layout = BatchLayout::default();
        for (i, run) in runs.iter().enumerate() {
            let first = layout.rows.len() as u32;
            layout.seqs.push(SeqInfo { slot: run.slot, first, n: run.n, pos: run.pos, keep: run.keep });
            for j in 0..run.n {
                let pos = run.pos + j;
                layout.rows.push(RowInfo { pos, slot: run.slot, first, seq: i as u32 });
                layout.positions.push(pos);
            }
        }
        layout
    }

    pub fn n_rows(&self) -> u32 {
        self.rows.len() as u32
    }

    pub fn n_seqs(&self) -> u32 {
        self.seqs.len() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_become_rows_and_sequences() {
        let l = BatchLayout::new(&[Run { slot: 3, pos: 10, n: 1, keep: 0 }, Run { slot: 0, pos: 0, n: 3, keep: 2 }]);
        assert_eq!(l.positions, [10, 0, 1, 2]);
        assert_eq!(l.rows[0], RowInfo { pos: 10, slot: 3, first: 0, seq: 0 });
        assert_eq!(l.rows[3], RowInfo { pos: 2, slot: 0, first: 1, seq: 1 });
        assert_eq!(
            l.seqs,
            [
                SeqInfo { slot: 3, first: 0, n: 1, pos: 10, keep: 0 },
                SeqInfo { slot: 0, first: 1, n: 3, pos: 0, keep: 2 }
            ]
        );
        assert_eq!((l.n_rows(), l.n_seqs()), (4, 2));
    }
}
