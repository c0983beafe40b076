//! A recorded dispatch, and encoding lists of them into one compute pass.

use std::sync::Arc;

use super::{Gpu, Step};

/// One workgroup-count dimension: fixed at build time, or derived from the step (steps
/// vary in rows and sequences; their bind groups do not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dim {
    Fixed(u32),
    /// `ceil(n_tokens / group)` workgroups.
    Tokens {
        group: u32,
    },
    /// `ceil(n_seqs / group)` workgroups.
    Seqs {
        group: u32,
    },
}

impl Dim {
    fn resolve(self, step: Step) -> u32 {
        match self {
            Dim::Fixed(n) => n,
            Dim::Tokens { group } => step.n_tokens.div_ceil(group),
            Dim::Seqs { group } => step.n_seqs.div_ceil(group),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workgroups(pub Dim, pub Dim, pub Dim);

impl Workgroups {
    pub fn fixed(x: u32, y: u32, z: u32) -> Self {
        Workgroups(Dim::Fixed(x), Dim::Fixed(y), Dim::Fixed(z))
    }

    pub fn resolve(self, step: Step) -> [u32; 3] {
        [self.0.resolve(step), self.1.resolve(step), self.2.resolve(step)]
    }
}

/// Everything needed to run one kernel once: built at load time, encoded every step.
#[derive(Debug, Clone)]
pub struct Dispatch {
    pub label: &'static str,
    pub pipeline: Arc<wgpu::ComputePipeline>,
    pub bind_group: wgpu::BindGroup,
    pub workgroups: Workgroups,
}

impl Dispatch {
    /// Binds `resources` to bindings 0.. of group 0 of `pipeline`, in order.
    pub fn new(
        gpu: &Gpu,
        label: &'static str,
        pipeline: Arc<wgpu::ComputePipeline>,
        resources: &[wgpu::BindingResource<'_>],
        workgroups: Workgroups,
    ) -> Dispatch {
        let entries: Vec<(u32, wgpu::BindingResource<'_>)> =
            resources.iter().enumerate().map(|(i, r)| (i as u32, r.clone())).collect();
        Dispatch::at(gpu, label, pipeline, &entries, workgroups)
    }

    /// Binds each resource to its own binding number of group 0 (a kernel whose bindings
    /// leave a gap for a weight format's arrays, however many it has).
    pub fn at(
        gpu: &Gpu,
        label: &'static str,
        pipeline: Arc<wgpu::ComputePipeline>,
        resources: &[(u32, wgpu::BindingResource<'_>)],
        workgroups: Workgroups,
    ) -> Dispatch {
        let entries: Vec<wgpu::BindGroupEntry<'_>> =
            resources.iter().map(|(i, r)| wgpu::BindGroupEntry { binding: *i, resource: r.clone() }).collect();
        let bind_group = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(label),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        Dispatch { label, pipeline, bind_group, workgroups }
    }
}

/// Encodes `dispatches` in order into one compute pass of `encoder`, for a step of
/// `n_tokens` rows of one sequence. Dispatches whose workgroup count resolves to zero
/// (e.g. no tokens) are skipped.
pub fn encode_dispatches(encoder: &mut wgpu::CommandEncoder, dispatches: &[Dispatch], n_tokens: u32) {
    encode_pass(encoder, &[(dispatches, Step::rows(n_tokens))]);
}

/// Encodes several lists into one compute pass, each sized by its own step (a step's
/// layers at the step's rows and sequences, then the output head at its sampled rows), so
/// that a step is one pass in one submission.
pub fn encode_pass(encoder: &mut wgpu::CommandEncoder, lists: &[(&[Dispatch], Step)]) {
    let mut pass =
        encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("step"), timestamp_writes: None });
    for &(dispatches, step) in lists {
        for d in dispatches {
            let [x, y, z] = d.workgroups.resolve(step);
            if x == 0 || y == 0 || z == 0 {
                continue;
            }
            pass.set_pipeline(&d.pipeline);
            pass.set_bind_group(0, &d.bind_group, &[]);
            pass.dispatch_workgroups(x, y, z);
        }
    }
}
