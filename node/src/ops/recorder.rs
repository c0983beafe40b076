//! The op recorder: the context every op is recorded in, and activations as typed views.
//!
//! Ops are methods of [`Recorder`] (each in its own module): a call checks shapes, builds
//! the op's uniform, pipeline and bind group once, and appends its [`Dispatch`]es. The
//! recorder holds what every op needs and used to be passed one by one — the device, the
//! kernel cache, the step uniform and the largest token count the dispatches must serve
//! — so a layer's forward pass reads as a list of ops on [`Act`]s.

use std::num::NonZeroU64;
use std::sync::Arc;

use strata_shaders::Kernel;

use super::attention::AttentionKernel;
use super::matmul::{MatmulPlan, StepRows};
use crate::gpu::{Dispatch, Gpu, KernelCache, Workgroups};
use crate::{Error, Result};

/// A view of `rows` rows of `width` 4-byte values (f32 activations, or u32 ids and
/// positions with `width` 1), row-major from the start of `buffer`.
///
/// Ops check a view's width against what they compute and bind only the rows a step can
/// reach (`Recorder::max_tokens`), so one buffer sized for the largest batch serves the
/// decode recording as well.
#[derive(Debug, Clone, Copy)]
pub struct Act<'a> {
    pub buffer: &'a wgpu::Buffer,
    pub rows: u32,
    pub width: u32,
}

impl<'a> Act<'a> {
    pub fn new(buffer: &'a wgpu::Buffer, rows: u32, width: u32) -> Act<'a> {
        Act { buffer, rows, width }
    }

    /// Whether both views are of the same buffer (ops that cannot run in place refuse it).
    pub fn same_buffer(&self, other: &Act<'_>) -> bool {
        self.buffer == other.buffer
    }

    fn bytes(&self, rows: u32) -> u64 {
        u64::from(rows) * u64::from(self.width) * 4
    }
}

/// Records ops into a dispatch list for steps of up to `max_tokens` rows, of the
/// [`StepRows`] class that picks the matrix kernels.
pub struct Recorder<'a> {
    gpu: &'a Gpu,
    kernels: &'a KernelCache,
    step: &'a wgpu::Buffer,
    max_tokens: u32,
    rows: StepRows,
    plan: MatmulPlan,
    attention: AttentionKernel,
    dispatches: Vec<Dispatch>,
    /// Scratch for the integer-dot path's quantised x, shared by the recording's products.
    pub(super) int8_x: Option<super::matmul::QuantizedX>,
}

impl<'a> Recorder<'a> {
    /// `step` is the [`crate::gpu::Step`] uniform written before each submission. The
    /// recording is for steps of `max_tokens` rows' class ([`StepRows::of`]) unless
    /// [`Recorder::for_rows`] says otherwise.
    pub fn new(
        gpu: &'a Gpu,
        kernels: &'a KernelCache,
        step: &'a wgpu::Buffer,
        max_tokens: u32,
    ) -> Result<Recorder<'a>> {
        if max_tokens == 0 {
            return Err(Error::Shape { op: "record", message: "max_tokens must be at least 1".into() });
        }
        let (rows, plan, attention) =
            (StepRows::of(max_tokens), MatmulPlan::for_gpu(gpu), AttentionKernel::for_gpu(gpu));
        Ok(Recorder { gpu, kernels, step, max_tokens, rows, plan, attention, dispatches: Vec::new(), int8_x: None })
    }

    /// The recording is for steps of `rows`' class (of at most `max_tokens` rows).
    pub fn for_rows(self, rows: StepRows) -> Self {
        Recorder { rows, ..self }
    }

    /// The integer-dot path quantises x into `scratch` (one per stage, shared by all its
    /// recordings: a stage runs one step at a time, its products one after another) where
    /// it is wide and tall enough; `None`: each recording allocates its own.
    pub fn with_int8_scratch(self, scratch: Option<&super::matmul::QuantizedX>) -> Self {
        Recorder { int8_x: scratch.cloned(), ..self }
    }

    /// The class of steps this recording serves.
    pub fn step_rows(&self) -> StepRows {
        self.rows
    }

    /// How matrix products are computed (by default the adapter's own plan).
    pub fn matmul_plan(&self) -> MatmulPlan {
        self.plan
    }

    /// Uses `plan` for matrix products from now on (tests run every plan on one adapter).
    pub fn set_matmul_plan(&mut self, plan: MatmulPlan) {
        self.plan = plan;
    }

    /// The attention kernel of this adapter (or as set).
    pub fn attention_kernel(&self) -> AttentionKernel {
        self.attention
    }

    /// Uses `kernel` for attention from now on (tests run every kernel on one adapter).
    pub fn set_attention_kernel(&mut self, kernel: AttentionKernel) {
        self.attention = kernel;
    }

    pub fn gpu(&self) -> &'a Gpu {
        self.gpu
    }

    /// Threads per workgroup for the kernels that reduce one row with `workgroup_sum`
    /// (`rms_norm`, `rope`): `default` on GPUs, and 8 on CPU adapters, where a workgroup
    /// runs on one thread as groups of SIMD lanes and every barrier of the reduction
    /// switches between all of its groups (8-row SmolLM2 steps on lavapipe: norms 8.5 ->
    /// 4.0 ms, rotations 7.5 -> 4.3 ms).
    pub(crate) fn row_lanes(&self, default: u32) -> u32 {
        if self.gpu.info.device_type == wgpu::DeviceType::Cpu { 8 } else { default }
    }

    pub fn max_tokens(&self) -> u32 {
        self.max_tokens
    }

    /// The dispatches recorded so far, leaving the recorder empty (to split a recording
    /// into lists that are encoded separately, e.g. argmax or top-k after the head).
    pub fn take(&mut self) -> Vec<Dispatch> {
        std::mem::take(&mut self.dispatches)
    }

    pub fn finish(self) -> Vec<Dispatch> {
        self.dispatches
    }

    pub(crate) fn pipeline(
        &self,
        kernel: Kernel,
        preludes: &[Kernel],
        consts: &[(&'static str, String)],
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        self.kernels.pipeline(self.gpu, kernel, preludes, consts)
    }

    pub(crate) fn uniform<T: bytemuck::Pod>(&self, label: &str, value: &T) -> wgpu::Buffer {
        self.gpu.uniform(label, value)
    }

    /// Appends a dispatch binding the step uniform at 0, `params` at 1 and `rest` from 2 on:
    /// the binding layout every op kernel shares.
    pub(crate) fn dispatch(
        &mut self,
        label: &'static str,
        pipeline: Arc<wgpu::ComputePipeline>,
        params: &wgpu::Buffer,
        rest: &[wgpu::BindingResource<'_>],
        workgroups: Workgroups,
    ) {
        let d = self.build(label, pipeline, params, rest, workgroups);
        self.dispatches.push(d);
    }

    /// Like [`Recorder::dispatch`], with `rest` at the binding numbers given (from 2 on).
    pub(crate) fn dispatch_at(
        &mut self,
        label: &'static str,
        pipeline: Arc<wgpu::ComputePipeline>,
        params: &wgpu::Buffer,
        rest: &[(u32, wgpu::BindingResource<'_>)],
        workgroups: Workgroups,
    ) {
        let mut resources = vec![(0, self.step.as_entire_binding()), (1, params.as_entire_binding())];
        resources.extend(rest.iter().cloned());
        let d = Dispatch::at(self.gpu, label, pipeline, &resources, workgroups);
        self.dispatches.push(d);
    }

    /// Like [`Recorder::dispatch`], returning the dispatch instead of appending it (ops that
    /// hand their dispatch to a caller who updates its parameters per step).
    pub(crate) fn build(
        &self,
        label: &'static str,
        pipeline: Arc<wgpu::ComputePipeline>,
        params: &wgpu::Buffer,
        rest: &[wgpu::BindingResource<'_>],
        workgroups: Workgroups,
    ) -> Dispatch {
        let mut resources = vec![self.step.as_entire_binding(), params.as_entire_binding()];
        resources.extend(rest.iter().cloned());
        Dispatch::new(self.gpu, label, pipeline, &resources, workgroups)
    }

    /// The binding of the rows of `act` a step can reach, after checking that `act` has
    /// `width` values per row and room for `max_tokens` rows.
    pub(crate) fn bind_act<'b>(
        &self,
        op: &'static str,
        what: &str,
        act: Act<'b>,
        width: u32,
    ) -> Result<wgpu::BindingResource<'b>> {
        if act.width != width {
            return Err(Error::Shape { op, message: format!("`{what}` has rows of {}, needs {width}", act.width) });
        }
        if act.rows < self.max_tokens {
            return Err(Error::Shape {
                op,
                message: format!(
                    "`{what}` has {} rows, steps of up to {} tokens need as many",
                    act.rows, self.max_tokens
                ),
            });
        }
        self.bind(op, what, act.buffer, act.bytes(self.max_tokens))
    }

    /// The binding of the first `bytes` of `buffer`, which must hold them, within the
    /// adapter's largest binding.
    pub(crate) fn bind<'b>(
        &self,
        op: &'static str,
        what: &str,
        buffer: &'b wgpu::Buffer,
        bytes: u64,
    ) -> Result<wgpu::BindingResource<'b>> {
        require_bytes(op, what, buffer, bytes)?;
        if bytes > self.gpu.max_binding() {
            let message = format!("`{what}`: {bytes} bytes exceed the largest binding, {}", self.gpu.max_binding());
            return Err(Error::Shape { op, message });
        }
        Ok(binding(buffer, bytes))
    }
}

/// Fails unless `buffer` holds at least `bytes` bytes.
pub(crate) fn require_bytes(op: &'static str, what: &str, buffer: &wgpu::Buffer, bytes: u64) -> Result<()> {
    if buffer.size() < bytes {
        return Err(Error::Shape { op, message: format!("`{what}` holds {} bytes, needs {bytes}", buffer.size()) });
    }
    Ok(())
}

/// A binding of the first `bytes` of `buffer`, unchecked (weights split to fit).
pub(crate) fn binding(buffer: &wgpu::Buffer, bytes: u64) -> wgpu::BindingResource<'_> {
    wgpu::BindingResource::Buffer(wgpu::BufferBinding { buffer, offset: 0, size: NonZeroU64::new(bytes) })
}
