//! The paged KV pool of a stage: every attention layer keeps keys and values in one pool of
//! fixed-size blocks of positions, shared by all sequences, and each sequence holds the
//! blocks its positions need, listed in its row of a block table the kernels read. Memory
//! follows the positions sequences actually hold, not sequences x context.
//!
//! A sequence is known to the kernels by its *slot* (a row of the block table, and its
//! place in each DeltaNet layer's state); blocks are numbered across the pool, the same
//! number in every attention layer of the stage.

use crate::gpu::Gpu;
use crate::{Error, Result};

/// How a stage's pool is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    /// Positions per block, a power of two.
    pub block_size: u32,
    /// Blocks in the pool.
    pub blocks: u32,
    /// Sequence slots on the stage: rows of the block table.
    pub slots: u32,
    /// Block-table entries per slot: the context in blocks.
    pub max_blocks: u32,
}

impl KvLayout {
    /// Positions per block unless asked otherwise: small enough that a sequence wastes
    /// little of its last block, large enough that block tables stay short.
    pub const DEFAULT_BLOCK_SIZE: u32 = 16;

    /// A pool of `blocks` blocks of `block_size` positions for `slots` sequences of up to
    /// `ctx` positions.
    pub fn new(block_size: u32, blocks: u32, slots: u32, ctx: u32) -> Result<KvLayout> {
        if !block_size.is_power_of_two() || block_size > 1024 {
            return Err(Error::Spec(format!("KV block size {block_size} is not a power of two up to 1024")));
        }
        if blocks == 0 || slots == 0 || ctx == 0 {
            return Err(Error::Spec(format!(
                "a KV pool needs blocks, slots and context: {blocks} blocks, {slots} slots, context {ctx}"
            )));
        }
        Ok(KvLayout { block_size, blocks, slots, max_blocks: ctx.div_ceil(block_size) })
    }

    pub fn block_shift(&self) -> u32 {
        self.block_size.trailing_zeros()
    }

    /// Positions the whole pool holds.
    pub fn positions(&self) -> u64 {
        u64::from(self.blocks) * u64::from(self.block_size)
    }

    /// Blocks that `positions` positions take.
    pub fn blocks_for(&self, positions: u32) -> u32 {
        positions.div_ceil(self.block_size)
    }
}

/// One attention layer's keys and values for every block of the pool: `[blocks *
/// block_size, n_kv_heads, head_dim]` as f16, two per u32 word (half the memory of f32,
/// read with aligned word loads). Written by [`crate::ops::attention`]'s `kv_store`, read
/// by its `attention`.
pub struct LayerKv {
    k: wgpu::Buffer,
    v: wgpu::Buffer,
    layout: KvLayout,
    n_kv_heads: u32,
    head_dim: u32,
}

impl std::fmt::Debug for LayerKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerKv")
            .field("layout", &self.layout)
            .field("n_kv_heads", &self.n_kv_heads)
            .field("head_dim", &self.head_dim)
            .finish()
    }
}

impl LayerKv {
    /// The largest head the attention kernel takes.
    pub const MAX_HEAD_DIM: u32 = 512;

    /// Bytes of K and V together per position, e.g. for the planner.
    pub fn bytes_per_position(n_kv_heads: u32, head_dim: u32) -> u64 {
        2 * u64::from(n_kv_heads) * u64::from(head_dim) * 2
    }

    /// Bytes of K (or of V) for the whole pool.
    pub fn bytes_each(layout: &KvLayout, n_kv_heads: u32, head_dim: u32) -> u64 {
        layout.positions() * Self::bytes_per_position(n_kv_heads, head_dim) / 2
    }

    /// The layer's part of the pool. `head_dim` must be a multiple of 4 (the kernels read 4
    /// halves at a time) and at most [`LayerKv::MAX_HEAD_DIM`]; K and V must each fit one
    /// storage binding.
    pub fn new(gpu: &Gpu, layout: KvLayout, n_kv_heads: u32, head_dim: u32) -> Result<LayerKv> {
        let shape = |message: String| Error::Shape { op: "kv pool", message };
        if n_kv_heads == 0 || head_dim == 0 || !head_dim.is_multiple_of(4) || head_dim > Self::MAX_HEAD_DIM {
            return Err(shape(format!(
                "{n_kv_heads} KV heads of {head_dim}: head_dim must be a multiple of 4 up to {}",
                Self::MAX_HEAD_DIM
            )));
        }
        let bytes = Self::bytes_each(&layout, n_kv_heads, head_dim);
        if bytes > gpu.max_binding() {
            return Err(shape(format!(
                "{} positions of {n_kv_heads} x {head_dim} f16 need {bytes} bytes each for K and V, over the \
                 adapter's largest binding of {} bytes",
                layout.positions(),
                gpu.max_binding()
            )));
        }
        Ok(LayerKv {
            k: gpu.storage("kv pool k", bytes),
            v: gpu.storage("kv pool v", bytes),
            layout,
            n_kv_heads,
            head_dim,
        })
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    pub fn n_kv_heads(&self) -> u32 {
        self.n_kv_heads
    }

    pub fn head_dim(&self) -> u32 {
        self.head_dim
    }

    pub fn k(&self) -> &wgpu::Buffer {
        &self.k
    }

    pub fn v(&self) -> &wgpu::Buffer {
        &self.v
    }

    /// Bytes held on the GPU.
    pub fn bytes(&self) -> u64 {
        self.k.size() + self.v.size()
    }

    /// Bytes of one block of K (or of V).
    pub fn block_bytes(&self) -> u64 {
        u64::from(self.layout.block_size) * Self::bytes_per_position(self.n_kv_heads, self.head_dim) / 2
    }

    /// Copies block `c.from` of K and of V to `c.to`, in `encoder`, through `bounce` (at
    /// least [`LayerKv::block_bytes`]): wgpu copies nothing within one buffer.
    pub fn copy_block(&self, encoder: &mut wgpu::CommandEncoder, c: BlockCopy, bounce: &wgpu::Buffer) {
        let n = self.block_bytes();
        for buffer in [&self.k, &self.v] {
            encoder.copy_buffer_to_buffer(buffer, u64::from(c.from) * n, bounce, 0, n);
            encoder.copy_buffer_to_buffer(bounce, 0, buffer, u64::from(c.to) * n, n);
        }
    }
}

/// Which blocks each slot's sequence holds: the allocator, and the block table `[slots,
/// max_blocks]` (u32 block numbers, `u32::MAX` where none) that the kernels read.
///
/// A sequence forked from another ([`BlockTable::share`]) holds the same blocks for their
/// common prefix; a shared block is copied before either writes it (copy on write, see
/// [`BlockTable::prepare`]), so a block is freed when the last sequence holding it lets go.
pub struct BlockTable {
    layout: KvLayout,
    table: wgpu::Buffer,
    /// Free blocks, the next to hand out last.
    free: Vec<u32>,
    /// How many sequences hold each block.
    refs: Vec<u32>,
}

/// A shared block a step is about to write, and the block that becomes the writer's own:
/// copied (every attention layer's K and V) before the step's pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockCopy {
    pub from: u32,
    pub to: u32,
}

impl BlockTable {
    pub fn new(gpu: &Gpu, layout: KvLayout) -> Result<BlockTable> {
        let entries = u64::from(layout.slots) * u64::from(layout.max_blocks);
        if entries * 4 > gpu.max_binding() {
            return Err(Error::Spec(format!(
                "a block table of {} slots x {} blocks exceeds the adapter's largest binding",
                layout.slots, layout.max_blocks
            )));
        }
        let none = vec![u32::MAX; entries as usize];
        Ok(BlockTable {
            layout,
            table: gpu.storage_init("kv block table", bytemuck::cast_slice(&none)),
            free: (0..layout.blocks).rev().collect(),
            refs: vec![0; layout.blocks as usize],
        })
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.table
    }

    /// The same table, for other activations to bind (an MTP pass's, whose attention
    /// layer keeps its KV in the stage's blocks): it reads the entries this one writes and
    /// hands out no blocks itself.
    pub fn reader(&self) -> BlockTable {
        BlockTable { layout: self.layout, table: self.table.clone(), free: Vec::new(), refs: Vec::new() }
    }

    pub fn free_blocks(&self) -> u32 {
        self.free.len() as u32
    }

    pub fn used_blocks(&self) -> u32 {
        self.layout.blocks - self.free_blocks()
    }

    /// Grows `held`, the blocks of the sequence in `slot`, to cover `positions`, writing
    /// the new table entries. Takes nothing when the pool cannot cover them all.
    pub fn grow(&mut self, queue: &wgpu::Queue, slot: u32, held: &mut Vec<u32>, positions: u32) -> Result<()> {
        let want = self.layout.blocks_for(positions) as usize;
        if want > self.layout.max_blocks as usize {
            return Err(Error::Step(format!(
                "{positions} positions are past the context of {} positions",
                u64::from(self.layout.max_blocks) * u64::from(self.layout.block_size)
            )));
        }
        if want <= held.len() {
            return Ok(());
        }
        let more = want - held.len();
        if more > self.free.len() {
            return Err(Error::Exhausted(format!(
                "the KV pool is full: {positions} positions need {more} more blocks of {}, {} of {} are free",
                self.layout.block_size,
                self.free.len(),
                self.layout.blocks
            )));
        }
        let first = held.len();
        for _ in 0..more {
            let b = self.free.pop().expect("counted above");
            self.refs[b as usize] = 1;
            held.push(b);
        }
        self.write_entries(queue, slot, held, first);
        Ok(())
    }

    /// Readies `held`, the blocks of the sequence in `slot`, for a step writing positions
    /// `pos..end`: a block of its own for every shared block the step writes (the copies
    /// to make before the pass are returned), blocks up to `end`, and none past it (a step
    /// that starts before the end drops the positions after it). Takes nothing when the
    /// pool cannot cover it all.
    pub fn prepare(
        &mut self,
        queue: &wgpu::Queue,
        slot: u32,
        held: &mut Vec<u32>,
        pos: u32,
        end: u32,
    ) -> Result<Vec<BlockCopy>> {
        let want = (self.layout.blocks_for(end) as usize).min(held.len());
        let written = (pos / self.layout.block_size) as usize..want;
        let shared: Vec<usize> = written.filter(|&i| self.refs[held[i] as usize] > 1).collect();
        let more = (self.layout.blocks_for(end) as usize).saturating_sub(held.len());
        if !shared.is_empty() && more + shared.len() > self.free.len() {
            return Err(Error::Exhausted(format!(
                "the KV pool is full: {end} positions need {} more blocks of {} ({} to copy shared ones), {} of {} are free",
                more + shared.len(),
                self.layout.block_size,
                shared.len(),
                self.free.len(),
                self.layout.blocks
            )));
        }
        self.grow(queue, slot, held, end)?;
        let mut copies = Vec::with_capacity(shared.len());
        for i in shared {
            let to = self.free.pop().expect("counted above");
            let from = std::mem::replace(&mut held[i], to);
            self.refs[from as usize] -= 1;
            self.refs[to as usize] = 1;
            self.write_entries(queue, slot, &held[..=i], i);
            copies.push(BlockCopy { from, to });
        }
        self.shrink(held, end);
        Ok(copies)
    }

    /// Makes `held`, the (empty) blocks of the sequence in `slot`, the blocks `from` of
    /// another sequence: a fork's common prefix, held by both until one writes a block.
    pub fn share(&mut self, queue: &wgpu::Queue, slot: u32, held: &mut Vec<u32>, from: &[u32]) {
        debug_assert!(held.is_empty(), "a fork starts with no blocks");
        for &b in from {
            self.refs[b as usize] += 1;
        }
        held.extend_from_slice(from);
        self.write_entries(queue, slot, held, 0);
    }

    /// Writes the table entries of `held[first..]` for `slot`.
    fn write_entries(&self, queue: &wgpu::Queue, slot: u32, held: &[u32], first: usize) {
        if first < held.len() {
            let offset = (u64::from(slot) * u64::from(self.layout.max_blocks) + first as u64) * 4;
            queue.write_buffer(&self.table, offset, bytemuck::cast_slice(&held[first..]));
        }
    }

    /// Gives back the blocks of `held` past what `positions` positions need (each freed
    /// when no other sequence holds it).
    pub fn shrink(&mut self, held: &mut Vec<u32>, positions: u32) {
        let keep = self.layout.blocks_for(positions) as usize;
        while held.len() > keep {
            let b = held.pop().expect("longer than keep");
            self.refs[b as usize] -= 1;
            if self.refs[b as usize] == 0 {
                self.free.push(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::gpu;

    #[test]
    fn blocks_are_taken_as_sequences_grow_and_given_back() {
        let (gpu, _) = gpu();
        let layout = KvLayout::new(16, 6, 3, 64).unwrap();
        assert_eq!((layout.max_blocks, layout.block_shift(), layout.positions()), (4, 4, 96));
        let mut t = BlockTable::new(gpu, layout).unwrap();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        t.grow(&gpu.queue, 0, &mut a, 1).unwrap();
        t.grow(&gpu.queue, 0, &mut a, 16).unwrap();
        assert_eq!((a.len(), t.free_blocks()), (1, 5));
        // Across a block boundary.
        t.grow(&gpu.queue, 0, &mut a, 17).unwrap();
        t.grow(&gpu.queue, 1, &mut b, 48).unwrap();
        assert_eq!((a.len(), b.len(), t.used_blocks()), (2, 3, 5));
        // One block left: a sequence needing two more gets none, and nothing is taken.
        let e = t.grow(&gpu.queue, 0, &mut a, 64).unwrap_err();
        assert!(matches!(e, Error::Exhausted(_)) && e.to_string().contains("1 of 6 are free"), "{e}");
        assert_eq!((a.len(), t.free_blocks()), (2, 1));
        // Past the context.
        let e = t.grow(&gpu.queue, 0, &mut a, 65).unwrap_err();
        assert!(e.to_string().contains("past the context"), "{e}");
        // The table holds each slot's blocks in order.
        let words = gpu.read_u32(t.buffer(), 12).unwrap();
        assert_eq!(&words[..4], &[a[0], a[1], u32::MAX, u32::MAX]);
        assert_eq!(&words[4..8], &[b[0], b[1], b[2], u32::MAX]);
        let mut all: Vec<u32> = a.iter().chain(&b).copied().collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 5, "no block is held twice");
        t.shrink(&mut b, 20);
        assert_eq!((b.len(), t.free_blocks()), (2, 2));
        t.shrink(&mut a, 0);
        t.shrink(&mut b, 0);
        assert_eq!(t.free_blocks(), 6);
    }

    #[test]
    fn bad_layouts_and_pools_past_a_binding_are_refused() {
        let (gpu, _) = gpu();
        assert!(KvLayout::new(12, 4, 1, 64).is_err());
        assert!(KvLayout::new(16, 0, 1, 64).is_err());
        assert!(KvLayout::new(16, 4, 0, 64).is_err());
        let layout = KvLayout::new(16, 4, 1, 64).unwrap();
        assert!(LayerKv::new(gpu, layout, 2, 62).is_err());
        assert!(LayerKv::new(gpu, layout, 2, 1024).is_err());
        let huge = KvLayout::new(1024, u32::MAX / 1024, 1, 64).unwrap();
        let e = LayerKv::new(gpu, huge, 8, 256).unwrap_err().to_string();
        assert!(e.contains("largest binding"), "{e}");
        let kv = LayerKv::new(gpu, layout, 2, 64).unwrap();
        assert_eq!(kv.bytes(), 64 * LayerKv::bytes_per_position(2, 64));
    }
}
