//! How fast this adapter reads memory by each path a kernel can take: a storage buffer
//! streamed (what `strata bench` reports as the read bandwidth), a texture streamed
//! (`textureLoad`), and 64 KiB read over and over (so from cache) through a storage and
//! through a uniform binding. On a CPU adapter the gap between these and the machine's
//! own memory bandwidth is the cost of the adapter's load instructions, not of memory.
//!
//! `cargo run --release -p strata-node --example read_paths` (or with the dev profile,
//! which is optimised too).

mod common;

use strata_node::gpu::{Dispatch, Gpu, GpuConfig, Workgroups};

const TEXTURE_READ: &str = r#"
struct Params { n: u32, stride: u32, width: u32, pad: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var src: texture_2d<u32>;
@group(0) @binding(2) var<storage, read_write> sink: array<u32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    var acc = vec4<u32>(0u);
    for (var i = gid.x; i < p.n; i += p.stride) {
        acc ^= textureLoad(src, vec2<u32>(i % p.width, i / p.width), 0);
    }
    let v = acc.x ^ acc.y ^ acc.z ^ acc.w;
    // Written only when impossible-looking, so the loads stay.
    if v == 0x9e3779b9u { sink[wid.x] = v; }
}
"#;

// `KIND` is replaced by the binding's address space.
const CACHED_READ: &str = r#"
struct Params { iters: u32, pad0: u32, pad1: u32, pad2: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<KIND> src: array<vec4<u32>, 4096>;
@group(0) @binding(2) var<storage, read_write> sink: array<u32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    var acc = vec4<u32>(0u);
    var i = gid.x;
    for (var k = 0u; k < p.iters; k++) {
        acc ^= src[i & 4095u];
        i += 257u;
    }
    let v = acc.x ^ acc.y ^ acc.z ^ acc.w;
    if v == 0x9e3779b9u { sink[wid.x] = v; }
}
"#;

/// Runs `wgsl`'s `main` over `groups` workgroups with `source` at binding 1, best of
/// three (after a warm-up), and returns GB/s for `bytes` read per dispatch.
fn rate(
    gpu: &Gpu,
    wgsl: &str,
    params: &[u32; 4],
    source: wgpu::BindingResource<'_>,
    groups: u32,
    bytes: f64,
) -> Result<f64, Box<dyn std::error::Error>> {
    let params = gpu.uniform("read_paths params", params);
    let sink = gpu.storage("read_paths sink", u64::from(groups) * 4);
    let dispatch = Dispatch::new(
        gpu,
        "read_paths",
        common::pipeline(gpu, wgsl),
        &[params.as_entire_binding(), source, sink.as_entire_binding()],
        Workgroups::fixed(groups, 1, 1),
    );
    let best = common::best_seconds(gpu, std::slice::from_ref(&dispatch), 3)?;
    Ok(bytes / best / 1e9)
}

fn report(what: &str, gbps: f64) {
    println!("{what:<30} {gbps:6.2} GB/s");
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let gpu = Gpu::new(&GpuConfig::default())?;
    println!("adapter {}", gpu.describe().name);
    report("storage buffer, streamed", strata_node::bench::read_bandwidth(&gpu)?);

    // 256 MiB of rgba32uint texels, as the storage figure streams 256 MiB.
    let (width, height) = (4096u32, 4096u32);
    let texture = gpu.device.create_texture(&wgpu::TextureDescriptor {
        label: Some("read_paths texture"),
        size: wgpu::Extent3d { width, height, depth_or_array_layers: 1 },
        mip_level_count: 1,
        sample_count: 1,
        dimension: wgpu::TextureDimension::D2,
        format: wgpu::TextureFormat::Rgba32Uint,
        usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST,
        view_formats: &[],
    });
    let view = texture.create_view(&Default::default());
    let groups = 1024;
    let texels = width * height;
    let bytes = f64::from(texels) * 16.0;
    let gbps = rate(
        &gpu,
        TEXTURE_READ,
        &[texels, groups * 256, width, 0],
        wgpu::BindingResource::TextureView(&view),
        groups,
        bytes,
    )?;
    report("texture, streamed", gbps);

    let small = gpu.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("read_paths 64 KiB"),
        size: 65536,
        usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let (groups, iters) = (64, 4096);
    let bytes = f64::from(groups * 256 * iters) * 16.0;
    for (name, kind) in [("storage", "storage, read"), ("uniform", "uniform")] {
        let wgsl = CACHED_READ.replace("KIND", kind);
        let gbps = rate(&gpu, &wgsl, &[iters, 0, 0, 0], small.as_entire_binding(), groups, bytes)?;
        report(&format!("{name} buffer, 64 KiB cached"), gbps);
    }
    Ok(())
}
