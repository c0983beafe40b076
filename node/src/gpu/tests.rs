use super::*;
use crate::testing::gpu;

/// Every kernel file becomes a pipeline on the device, includes resolved: each kernel
/// that calls `load8` with every weight-format prelude (which compiles each prelude
/// too), the rest alone.
#[test]
fn every_kernel_compiles() {
    use strata_shaders::matmul::{FORMATS, WEIGHT_READERS};
    let (gpu, kernels) = gpu();
    for k in strata_shaders::all() {
        if FORMATS.contains(&k) {
            continue;
        }
        let preludes: Vec<Option<strata_shaders::Kernel>> =
            if WEIGHT_READERS.contains(&k) { FORMATS.iter().copied().map(Some).collect() } else { vec![None] };
        for p in preludes {
            kernels.pipeline(gpu, k, p, &[]).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

#[test]
fn read_bandwidth_kernel_runs() {
    let (gpu, kernels) = gpu();
    #[repr(C)]
    #[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
    struct P {
        n_vec4: u32,
        stride: u32,
    }
    let src = gpu.storage_init("src", &vec![7u8; 1 << 20]);
    let sink = gpu.storage("sink", 4096);
    let p = gpu.uniform("p", &P { n_vec4: (1 << 20) / 16, stride: 64 * 256 });
    let pipe = kernels.pipeline(gpu, strata_shaders::Kernel::READ_BANDWIDTH, None, &[]).unwrap();
    let d = Dispatch::new(
        gpu,
        "bw",
        pipe,
        &[p.as_entire_binding(), src.as_entire_binding(), sink.as_entire_binding()],
        Workgroups::fixed(64, 1, 1),
    );
    let mut enc = gpu.device.create_command_encoder(&Default::default());
    encode_dispatches(&mut enc, &[d], 1);
    gpu.queue.submit([enc.finish()]);
    assert_eq!(gpu.read_u32(&sink, 4).unwrap(), vec![0; 4]);
}
