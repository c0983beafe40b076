//! Compiled pipelines, cached by kernel and specialisation so each is built once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use strata_shaders::Kernel;

use super::Gpu;
use crate::{Error, Result};

type Key = (&'static str, Vec<(&'static str, String)>);

/// Pipelines by (kernel, specialised constants). Built at load time, reused by every op.
#[derive(Default)]
pub struct KernelCache {
    pipelines: Mutex<HashMap<Key, Arc<wgpu::ComputePipeline>>>,
}

impl KernelCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// The pipeline of `kernel`'s entry point `main`: `preludes` (e.g. a weight format, an
    /// x prelude) prepended, includes resolved, `consts` specialised ([`Kernel::assemble`]).
    pub fn pipeline(
        &self,
        gpu: &Gpu,
        kernel: Kernel,
        preludes: &[Kernel],
        consts: &[(&'static str, String)],
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        let mut key_consts = consts.to_vec();
        key_consts.extend(preludes.iter().map(|p| ("#prelude", p.name.to_owned())));
        let key = (kernel.name, key_consts);
        if let Some(p) = self.pipelines.lock().expect("kernel cache poisoned").get(&key) {
            return Ok(p.clone());
        }
        let label = std::iter::once(kernel.name).chain(preludes.iter().map(|p| p.name)).collect::<Vec<_>>().join("+");
        let source = kernel
            .assemble(preludes, consts)
            .map_err(|e| Error::Kernel { kernel: label.clone(), message: e.to_string() })?;
        let scope = gpu.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = gpu.device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(&label),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        let pipeline = gpu.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&label),
            layout: None,
            module: &module,
            entry_point: Some("main"),
            compilation_options: Default::default(),
            cache: None,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::Kernel { kernel: label, message: e.to_string() });
        }
        tracing::debug!(kernel = %label, "built pipeline");
        let pipeline = Arc::new(pipeline);
        self.pipelines.lock().expect("kernel cache poisoned").insert(key, pipeline.clone());
        Ok(pipeline)
    }
}
