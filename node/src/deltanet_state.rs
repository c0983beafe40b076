//! The recurrent state of one Gated DeltaNet layer, for every sequence slot of a stage.

use strata_model::config::DeltaNetConfig;

use crate::gpu::Gpu;
use crate::{Error, Result};

/// The conv history and the delta-rule matrices of one layer, one fixed-size part per
/// sequence slot, zero at creation. Unlike the KV pool its size does not depend on the
/// context length, only on the slots. Read and advanced by the ops of
/// [`crate::ops::deltanet`], each sequence in its own slot.
pub struct DeltaNetState {
    /// f32 `[slots, conv_kernel - 1, channels]`: each slot's previous inputs of each conv
    /// channel, oldest first.
    conv: wgpu::Buffer,
    /// f32 `[slots, n_value_heads, head_dim, head_dim]`: per value head, rows by key dim
    /// and columns by value dim.
    matrices: wgpu::Buffer,
    config: DeltaNetConfig,
    slots: u32,
    /// Each slot's checkpoint, laid out as `conv` and `matrices`: a copy of its state at
    /// one earlier position, which a later prompt sharing that prefix resumes from (a
    /// recurrent state cannot be cut back). `None` on a stage loaded without them.
    checkpoints: Option<(wgpu::Buffer, wgpu::Buffer)>,
    /// Each slot's rollback state, laid out as `conv` and `matrices`: the state after the
    /// rows of a speculative step that are sure to stay (`SeqInfo::keep`), written by the
    /// kernels mid-step, which a step that drops rejected draft rows starts from again.
    /// One-word stand-ins on a stage that does not speculate (the kernels bind them
    /// always and write them only when asked).
    rollback: (wgpu::Buffer, wgpu::Buffer),
    has_rollback: bool,
}

/// A conv-history buffer and a matrices buffer laid out alike (the state, or the checkpoints).
type Pair<'a> = (&'a wgpu::Buffer, &'a wgpu::Buffer);

impl std::fmt::Debug for DeltaNetState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeltaNetState").field("config", &self.config).field("slots", &self.slots).finish()
    }
}

impl DeltaNetState {
    /// The largest head the delta-rule kernel takes (each thread keeps a column of the
    /// state in private memory); heads must also be a multiple of 4 (it reads vec4s).
    pub const MAX_HEAD_DIM: usize = 256;

    /// Bytes of one layer's state for one sequence, e.g. for the planner.
    pub fn bytes_for(cfg: &DeltaNetConfig) -> u64 {
        cfg.state_values() as u64 * 4
    }

    fn conv_bytes(cfg: &DeltaNetConfig) -> u64 {
        ((cfg.conv_kernel - 1) * cfg.conv_channels()) as u64 * 4
    }

    fn matrix_bytes(cfg: &DeltaNetConfig) -> u64 {
        (cfg.n_value_heads * cfg.head_dim * cfg.head_dim) as u64 * 4
    }

    pub fn new(gpu: &Gpu, cfg: &DeltaNetConfig, slots: u32) -> Result<DeltaNetState> {
        let shape = |message: String| Error::Shape { op: "deltanet state", message };
        let DeltaNetConfig { conv_kernel, n_key_heads, n_value_heads, head_dim } = *cfg;
        if conv_kernel == 0
            || n_key_heads == 0
            || head_dim == 0
            || head_dim > Self::MAX_HEAD_DIM
            || !head_dim.is_multiple_of(4)
            || !n_value_heads.is_multiple_of(n_key_heads)
            || slots == 0
        {
            return Err(shape(format!(
                "{cfg:?} for {slots} slots: needs conv_kernel >= 1, key heads dividing value heads, head_dim a \
                 multiple of 4 up to {}, a slot",
                Self::MAX_HEAD_DIM
            )));
        }
        let matrices = Self::matrix_bytes(cfg) * u64::from(slots);
        if matrices > gpu.max_binding() {
            return Err(shape(format!(
                "{slots} sequences' state matrices of {} bytes each ({matrices} bytes) exceed the adapter's largest \
                 binding of {}: fewer sequences at once (--max-seqs)",
                Self::matrix_bytes(cfg),
                gpu.max_binding()
            )));
        }
        Ok(DeltaNetState {
            conv: gpu.storage("deltanet conv state", Self::conv_bytes(cfg) * u64::from(slots)),
            matrices: gpu.storage("deltanet state", matrices),
            config: cfg.clone(),
            slots,
            checkpoints: None,
            rollback: (gpu.storage("deltanet conv rollback", 4), gpu.storage("deltanet rollback", 4)),
            has_rollback: false,
        })
    }

    /// The same, with a checkpoint per slot when `keep` (as much memory again).
    pub fn with_checkpoints(mut self, gpu: &Gpu, keep: bool) -> DeltaNetState {
        if keep {
            self.checkpoints = Some((
                gpu.storage("deltanet conv checkpoints", self.conv.size()),
                gpu.storage("deltanet state checkpoints", self.matrices.size()),
            ));
        }
        self
    }

    /// The same, with a rollback state per slot when `keep` (as much memory again), for
    /// speculative steps.
    pub fn with_rollback(mut self, gpu: &Gpu, keep: bool) -> DeltaNetState {
        if keep {
            self.rollback = (
                gpu.storage("deltanet conv rollback", self.conv.size()),
                gpu.storage("deltanet rollback", self.matrices.size()),
            );
            self.has_rollback = true;
        }
        self
    }

    pub fn has_rollback(&self) -> bool {
        self.has_rollback
    }

    /// The buffers the kernels write a kept state to: (conv history, matrices).
    pub fn rollback(&self) -> (&wgpu::Buffer, &wgpu::Buffer) {
        (&self.rollback.0, &self.rollback.1)
    }

    /// Copies `slot`'s rollback state back over its state, in `encoder` (before the pass).
    pub fn roll_back(&self, encoder: &mut wgpu::CommandEncoder, slot: u32) {
        if self.has_rollback {
            let (conv, matrices) = &self.rollback;
            self.copy_slot(encoder, ((conv, matrices), slot), ((&self.conv, &self.matrices), slot));
        }
    }

    pub fn has_checkpoints(&self) -> bool {
        self.checkpoints.is_some()
    }

    /// Copies `slot`'s state to its checkpoint, in `encoder` (after the step's pass).
    pub fn save(&self, encoder: &mut wgpu::CommandEncoder, slot: u32) {
        if let Some((conv, matrices)) = &self.checkpoints {
            self.copy_slot(encoder, ((&self.conv, &self.matrices), slot), ((conv, matrices), slot));
        }
    }

    /// Copies `slot`'s checkpoint back over its state, in `encoder` (before the pass).
    pub fn restore(&self, encoder: &mut wgpu::CommandEncoder, slot: u32) {
        if let Some((conv, matrices)) = &self.checkpoints {
            self.copy_slot(encoder, ((conv, matrices), slot), ((&self.conv, &self.matrices), slot));
        }
    }

    /// Copies slot `from`'s state (or, with `from_checkpoint`, its checkpoint) over slot
    /// `to`'s, in `encoder` (before the pass): a forked sequence starts from it. A copy of
    /// a live state goes through `to`'s checkpoint (wgpu copies nothing within one
    /// buffer), which a fresh sequence does not hold yet; so a stage forks live states
    /// only when it keeps checkpoints.
    pub fn fork(&self, encoder: &mut wgpu::CommandEncoder, from: u32, from_checkpoint: bool, to: u32) -> Result<()> {
        let Some((conv, matrices)) = &self.checkpoints else {
            return Err(Error::Spec("forking a recurrent state needs the stage's checkpoints".into()));
        };
        let (ckpt, live) = ((conv, matrices), (&self.conv, &self.matrices));
        if from_checkpoint {
            self.copy_slot(encoder, (ckpt, from), (live, to));
        } else {
            self.copy_slot(encoder, (live, from), (ckpt, to));
            self.copy_slot(encoder, (ckpt, to), (live, to));
        }
        Ok(())
    }

    /// Copies one slot's conv history and matrices, `((conv, matrices), slot)` to another.
    fn copy_slot(&self, encoder: &mut wgpu::CommandEncoder, from: (Pair<'_>, u32), to: (Pair<'_>, u32)) {
        let (c, m) = (Self::conv_bytes(&self.config), Self::matrix_bytes(&self.config));
        let (((fc, fm), a), ((tc, tm), b)) = (from, to);
        if c > 0 {
            encoder.copy_buffer_to_buffer(fc, u64::from(a) * c, tc, u64::from(b) * c, c);
        }
        encoder.copy_buffer_to_buffer(fm, u64::from(a) * m, tm, u64::from(b) * m, m);
    }

    pub fn config(&self) -> &DeltaNetConfig {
        &self.config
    }

    pub fn slots(&self) -> u32 {
        self.slots
    }

    pub fn conv(&self) -> &wgpu::Buffer {
        &self.conv
    }

    pub fn matrices(&self) -> &wgpu::Buffer {
        &self.matrices
    }

    /// Bytes held on the GPU, all slots (and their checkpoints).
    pub fn bytes(&self) -> u64 {
        let checkpoints = self.checkpoints.as_ref().map_or(0, |(c, m)| c.size() + m.size());
        let rollback = if self.has_rollback { self.rollback.0.size() + self.rollback.1.size() } else { 0 };
        self.conv.size() + self.matrices.size() + checkpoints + rollback
    }

    /// Zeroes `slot`'s state, for a sequence starting there, in `encoder` (before the
    /// step's pass, in the step's one submission).
    pub fn reset(&self, encoder: &mut wgpu::CommandEncoder, slot: u32) {
        let (c, m) = (Self::conv_bytes(&self.config), Self::matrix_bytes(&self.config));
        if c > 0 {
            encoder.clear_buffer(&self.conv, u64::from(slot) * c, Some(c));
        }
        encoder.clear_buffer(&self.matrices, u64::from(slot) * m, Some(m));
    }
}
