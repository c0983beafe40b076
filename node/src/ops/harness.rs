//! Running ops in tests: buffers from slices, the step uniform, one submission per step.

use super::matmul::StepRows;
use super::recorder::Recorder;
use crate::Result;
use crate::gpu::{Dispatch, Gpu, Step, encode_pass};

pub(crate) fn f32_buffer(gpu: &Gpu, values: &[f32]) -> wgpu::Buffer {
    gpu.storage_init("f32", bytemuck::cast_slice(values))
}

pub(crate) fn u32_buffer(gpu: &Gpu, values: &[u32]) -> wgpu::Buffer {
    gpu.storage_init("u32", bytemuck::cast_slice(values))
}

/// The step uniform, to be written by [`run`].
pub(crate) fn step_buffer(gpu: &Gpu) -> wgpu::Buffer {
    gpu.uniform("step", &Step::default())
}

/// One step of `n_tokens` rows of one sequence: writes the step uniform, encodes
/// `dispatches` in one pass and submits it.
pub(crate) fn run(gpu: &Gpu, step: &wgpu::Buffer, dispatches: &[Dispatch], n_tokens: u32) {
    run_step(gpu, step, dispatches, Step::rows(n_tokens));
}

/// One step as `step` says (rows and sequences).
pub(crate) fn run_step(gpu: &Gpu, buffer: &wgpu::Buffer, dispatches: &[Dispatch], step: Step) {
    gpu.queue.write_buffer(buffer, 0, bytemuck::bytes_of(&step));
    let mut enc = gpu.device.create_command_encoder(&Default::default());
    encode_pass(&mut enc, &[(dispatches, step)]);
    gpu.queue.submit([enc.finish()]);
}

/// The dispatches `f` records on the test device for steps of up to `max_tokens` tokens.
pub(crate) fn record(
    step: &wgpu::Buffer,
    max_tokens: u32,
    f: impl FnOnce(&mut Recorder) -> Result<()>,
) -> Result<Vec<Dispatch>> {
    record_for(step, max_tokens, StepRows::of(max_tokens), f)
}

/// Like [`record`], for steps of `class` (of at most `max_tokens` rows).
pub(crate) fn record_for(
    step: &wgpu::Buffer,
    max_tokens: u32,
    class: StepRows,
    f: impl FnOnce(&mut Recorder) -> Result<()>,
) -> Result<Vec<Dispatch>> {
    let (gpu, kernels) = crate::testing::gpu();
    let mut rec = Recorder::new(gpu, kernels, step, max_tokens)?.for_rows(class);
    f(&mut rec)?;
    Ok(rec.finish())
}
