// How a step's rows belong to its sequences (Rust: `stage::batch`). The rows of one
// sequence are consecutive and at consecutive positions; a sequence's state on the stage
// (its KV blocks, its DeltaNet state) is found by its slot.

// Per row of the step.
struct RowInfo {
    // The row's position in its sequence.
    pos: u32,
    // The sequence's slot on the stage.
    slot: u32,
    // The step's row holding the sequence's first row here.
    first: u32,
    // The sequence's index among the step's sequences.
    seq: u32,
}

// Per sequence of the step.
struct SeqInfo {
    slot: u32,
    // Its first row in the step, and how many rows it has.
    first: u32,
    n: u32,
    // The position of its first row.
    pos: u32,
    // Recurrent layers copy the sequence's state after this many of its rows to its
    // rollback slot (0: they do not): the state a rejected speculative draft goes back to.
    keep: u32,
}
