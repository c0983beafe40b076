//! The adapter's own streaming-read bandwidth, the ceiling for weight-bound decode, and
//! where a decode step's time goes, op by op.

use std::time::Instant;

use strata_shaders::Kernel;

use crate::Result;
use crate::gpu::{Dispatch, Gpu, KernelCache, Step, Workgroups, encode_dispatches, encode_pass};

const WG: u32 = 256;

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct Params {
    n_vec4: u32,
    stride: u32,
}

/// Streams a buffer (up to 256 MiB, within one binding) through a plain read kernel
/// several times and returns the best rate in GB/s.
pub fn read_bandwidth(gpu: &Gpu) -> Result<f64> {
    let bytes = gpu.max_binding().min(256 << 20) / 16 * 16;
    let src = gpu.storage("bandwidth_src", bytes);
    let groups = 1024u32;
    let sink = gpu.storage("bandwidth_sink", u64::from(groups) * 4);
    let n_vec4 = (bytes / 16) as u32;
    let params = gpu.uniform("bandwidth_params", &Params { n_vec4, stride: groups * WG });
    let kernels = KernelCache::new();
    let pipeline = kernels.pipeline(gpu, Kernel::READ_BANDWIDTH, &[], &[("WG", format!("{WG}u"))])?;
    let d = Dispatch::new(
        gpu,
        "read_bandwidth",
        pipeline,
        &[params.as_entire_binding(), src.as_entire_binding(), sink.as_entire_binding()],
        Workgroups::fixed(groups, 1, 1),
    );
    let run = |reps: u32| -> Result<f64> {
        let t = Instant::now();
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        for _ in 0..reps {
            encode_dispatches(&mut enc, std::slice::from_ref(&d), 1);
        }
        gpu.queue.submit([enc.finish()]);
        gpu.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| crate::Error::Gpu { context: "bandwidth".into(), message: e.to_string() })?;
        Ok(t.elapsed().as_secs_f64())
    };
    run(1)?; // warm-up: first-use costs stay out of the figure
    // Enough repetitions for about a second on the slowest adapters we know (lavapipe).
    let first = run(1)?;
    let reps = ((0.5 / first).ceil() as u32).clamp(1, 200);
    let best = (0..3).map(|_| run(reps)).collect::<Result<Vec<f64>>>()?.into_iter().fold(f64::INFINITY, f64::min);
    let gbps = bytes as f64 * f64::from(reps) / best / 1e9;
    tracing::info!(bytes, reps, gbps, "read bandwidth");
    Ok(gbps)
}

/// What one kind of op (dispatches sharing a label) costs a decode step of one row.
#[derive(Debug, Clone, PartialEq)]
pub struct OpTime {
    pub label: &'static str,
    /// Its dispatches per step.
    pub dispatches: usize,
    /// Seconds per step, all its dispatches together.
    pub seconds: f64,
}

/// Times each label's dispatches of `lists` (each at its own step size), `reps` times over
/// in one pass and one submission, best of three; the first entry is the whole list
/// (label `step`). The buffers hold whatever the last step left: the figures are costs,
/// the values computed are thrown away (and the sequences' state is spoiled).
pub fn profile(gpu: &Gpu, lists: &[(&[Dispatch], Step)], reps: u32) -> Result<Vec<OpTime>> {
    let time = |what: &[(Vec<Dispatch>, Step)]| -> Result<f64> {
        let mut best = f64::INFINITY;
        for _ in 0..3 {
            let t = Instant::now();
            let mut enc = gpu.device.create_command_encoder(&Default::default());
            let pass: Vec<(&[Dispatch], Step)> = what.iter().map(|(l, s)| (&l[..], *s)).collect();
            for _ in 0..reps {
                encode_pass(&mut enc, &pass);
            }
            gpu.queue.submit([enc.finish()]);
            gpu.device
                .poll(wgpu::PollType::wait_indefinitely())
                .map_err(|e| crate::Error::Gpu { context: "profile".into(), message: e.to_string() })?;
            best = best.min(t.elapsed().as_secs_f64() / f64::from(reps));
        }
        Ok(best)
    };
    let whole: Vec<(Vec<Dispatch>, Step)> = lists.iter().map(|(l, s)| (l.to_vec(), *s)).collect();
    let count = whole.iter().map(|(l, _)| l.len()).sum();
    let mut out = vec![OpTime { label: "step", dispatches: count, seconds: time(&whole)? }];
    let mut labels: Vec<&'static str> = Vec::new();
    for d in lists.iter().flat_map(|(l, _)| l.iter()) {
        if !labels.contains(&d.label) {
            labels.push(d.label);
        }
    }
    for label in labels {
        let only: Vec<(Vec<Dispatch>, Step)> =
            lists.iter().map(|(l, s)| (l.iter().filter(|d| d.label == label).cloned().collect(), *s)).collect();
        let dispatches = only.iter().map(|(l, _)| l.len()).sum();
        out.push(OpTime { label, dispatches, seconds: time(&only)? });
    }
    Ok(out)
}
