//! What the measuring examples share: a pipeline from a WGSL source, and the time of a
//! dispatch list.

use std::sync::Arc;
use std::time::Instant;

use strata_node::gpu::{Dispatch, Gpu, encode_dispatches};

/// The compute pipeline of `wgsl`'s `main`, its layout taken from the shader (not every
/// example that includes this module builds its own kernels).
#[allow(dead_code)]
pub fn pipeline(gpu: &Gpu, wgsl: &str) -> Arc<wgpu::ComputePipeline> {
    let module = gpu.device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: None,
        source: wgpu::ShaderSource::Wgsl(wgsl.into()),
    });
    Arc::new(gpu.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: None,
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    }))
}

/// Seconds for one submission of `list`, the best of `runs` after a warm-up run.
pub fn best_seconds(gpu: &Gpu, list: &[Dispatch], runs: usize) -> Result<f64, wgpu::PollError> {
    let run = || -> Result<f64, wgpu::PollError> {
        let t = Instant::now();
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        encode_dispatches(&mut enc, list, 1);
        gpu.queue.submit([enc.finish()]);
        gpu.device.poll(wgpu::PollType::wait_indefinitely())?;
        Ok(t.elapsed().as_secs_f64())
    };
    run()?;
    let mut best = f64::INFINITY;
    for _ in 0..runs {
        best = best.min(run()?);
    }
    Ok(best)
}
