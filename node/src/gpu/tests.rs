use super::*;
use crate::testing::gpu;

/// Every kernel file becomes a pipeline on the device, includes resolved: each kernel
/// that calls `load8` with every weight-format prelude (and each x prelude, for those
/// that read x from one), which compiles each prelude too; the integer-dot kernel with
/// the Q8_0 prelude; the rest alone.
#[test]
fn every_kernel_compiles() {
    use strata_shaders::Kernel;
    use strata_shaders::matmul::{FORMATS, Q8_0_READERS, WEIGHT_READERS, X_PRELUDES, X_READERS};
    let (gpu, kernels) = gpu();
    for k in strata_shaders::all() {
        if FORMATS.contains(&k) || X_PRELUDES.contains(&k) {
            continue;
        }
        let formats: Vec<&[Kernel]> = if WEIGHT_READERS.contains(&k) {
            FORMATS.chunks(1).collect()
        } else if Q8_0_READERS.contains(&k) {
            vec![&[Kernel::Q_Q8_0]]
        } else {
            vec![&[]]
        };
        let xs: Vec<&[Kernel]> = if X_READERS.contains(&k) { X_PRELUDES.chunks(1).collect() } else { vec![&[]] };
        for f in &formats {
            for x in &xs {
                kernels.pipeline(gpu, k, &[*f, *x].concat(), &[]).unwrap_or_else(|e| panic!("{e}"));
            }
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
    let pipe = kernels.pipeline(gpu, strata_shaders::Kernel::READ_BANDWIDTH, &[], &[]).unwrap();
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
