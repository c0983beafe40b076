use super::*;
use crate::testing::gpu;

/// Every kernel file becomes a pipeline on the device, includes resolved: each kernel
/// that calls `load8` with every weight-format prelude (and each x prelude, for those
/// that read x from one), which compiles each prelude too; the integer-dot kernel with
/// the Q8_0 prelude; the rest alone. (`mm_coop` and its preludes need an adapter with
/// cooperative matrices: `ops::matmul`'s test of them compiles it with every format.)
#[test]
fn every_kernel_compiles() {
    use strata_shaders::Kernel;
    use strata_shaders::matmul::{COOP_PRELUDES, FORMATS, Q8_0_READERS, WEIGHT_READERS, X_PRELUDES, X_READERS};
    let (gpu, kernels) = gpu();
    for k in strata_shaders::all() {
        if FORMATS.contains(&k) || X_PRELUDES.contains(&k) || COOP_PRELUDES.contains(&k) || k == Kernel::MM_COOP {
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

/// Asking for cooperative matrices on an adapter that offers none (the system's lavapipe
/// in CI) is an error naming the adapter and what is missing, not a panic; and the same
/// request in a child process on a lavapipe that offers them opens a device that says so.
#[test]
fn cooperative_matrices_are_refused_where_missing_and_named_where_used() {
    if crate::testing::in_coop_child("gpu::tests::cooperative_matrices_are_refused_where_missing_and_named_where_used")
    {
        let gpu = Gpu::new(&GpuConfig { coop_matrix: Some(true), ..GpuConfig::default() }).unwrap();
        let size = gpu.coop_matrix.expect("a size");
        assert!(gpu.describe().name.ends_with(&format!(" [coop matrix {size}x{size}]")), "{}", gpu.describe().name);
        let both = GpuConfig { coop_matrix: Some(true), int8_dot: Some(true), ..GpuConfig::default() };
        let e = Gpu::new(&both).unwrap_err().to_string();
        assert!(e.contains("turn one off"), "{e}");
        return;
    }
    let plain = &crate::testing::gpu().0;
    if plain.features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) {
        eprintln!("{} offers cooperative matrices: the refusal is checked where they are missing", plain.info.name);
    } else {
        let e = Gpu::new(&GpuConfig { coop_matrix: Some(true), ..GpuConfig::default() }).unwrap_err().to_string();
        assert!(e.contains("--coop-matrix: cooperative matrices: "), "{e}");
        assert!(e.contains(&plain.info.name), "{e}");
    }
}
