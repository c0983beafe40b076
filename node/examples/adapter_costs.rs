//! What the pieces of a step cost on this adapter, apart from memory: the fixed cost of a
//! dispatch (hundreds of tiny ones in one submission, as a step records them), and
//! multiply-adds with everything in registers, as `mm_rows` does them for a lane's 8
//! tokens (float, on weights converted from int8) and as an int8 path would
//! (`dot4I8Packed` on the packed bytes). On a CPU adapter the first shows how much of a
//! small step is dispatches, the second whether integer dot products beat floats.
//!
//! `cargo run --release -p strata-node --example adapter_costs` (or with the dev profile,
//! which is optimised too).

mod common;

use strata_node::gpu::{Dispatch, Gpu, GpuConfig, Workgroups};

/// One tiny dispatch: each thread bumps its own counter. `WG` is replaced by the size.
const TINY: &str = r#"
struct Params { n: u32, pad0: u32, pad1: u32, pad2: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> sink: array<u32>;

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    if gid.x < p.n { sink[gid.x] += 1u; }
}
"#;

/// 8 tokens' dot products with one piece of 8 weights per iteration, the weights made from
/// the loop counter (no loads). `ACC`, `X` and `DOTS` are filled in per path.
const DOTS: &str = r#"
struct Params { iters: u32, pad0: u32, pad1: u32, pad2: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> sink: array<u32>;

fn i8x4(w: u32) -> vec4<f32> {
    return vec4<f32>((vec4<i32>(bitcast<i32>(w)) << vec4<u32>(24u, 16u, 8u, 0u)) >> vec4<u32>(24u));
}

@compute @workgroup_size(8)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let seed = gid.x * 747796405u + 2891336453u;
X
    for (var k = 0u; k < p.iters; k++) {
        let wx = seed ^ (k * 2654435769u);
        let wy = k + seed * 3u;
DOTS
    }
    var v = 0u;
ACC
    // Written only when impossible-looking, so the sums stay.
    if v == 0x9e3779b9u { sink[gid.x] = v; }
}
"#;

/// A dispatch of `wgsl`'s `main` over `groups` workgroups, with `params` at binding 0 and
/// a sink of `sink_words` at binding 1.
fn dispatch(gpu: &Gpu, wgsl: String, params: &[u32; 4], sink_words: u32, groups: u32) -> Dispatch {
    let params = gpu.uniform("adapter_costs params", params);
    let sink = gpu.storage("adapter_costs sink", u64::from(sink_words) * 4);
    Dispatch::new(
        gpu,
        "adapter_costs",
        common::pipeline(gpu, &wgsl),
        &[params.as_entire_binding(), sink.as_entire_binding()],
        Workgroups::fixed(groups, 1, 1),
    )
}

/// The dot-product kernel: float (`mm_rows`' arithmetic) or int8 (`dot4I8Packed`).
fn dots(int8: bool) -> String {
    let (mut x, mut dots, mut acc) = (String::new(), String::new(), String::new());
    if !int8 {
        // As `load8` does, once per piece for all the tokens.
        dots += "        let d = f32(k & 7u) * 0.5;\n        let w0 = i8x4(wx) * d;\n        let w1 = i8x4(wy) * d;\n";
    }
    for t in 0..8 {
        let (a, b) = (format!("seed * {}u + {}u", 2 * t + 3, 77 * t), format!("seed ^ {}u", 1_234_567 * t + 1));
        if int8 {
            x += &format!("    let xa{t} = {a};\n    let xb{t} = {b};\n    var acc{t} = 0i;\n");
            dots += &format!("        acc{t} += dot4I8Packed(wx, xa{t}) + dot4I8Packed(wy, xb{t});\n");
        } else {
            x += &format!("    let xa{t} = i8x4({a});\n    let xb{t} = i8x4({b});\n    var acc{t} = 0.0;\n");
            dots += &format!("        acc{t} += dot(w0, xa{t}) + dot(w1, xb{t});\n");
        }
        acc += &format!("    v ^= bitcast<u32>(acc{t});\n");
    }
    DOTS.replace("X\n", &x).replace("DOTS\n", &dots).replace("ACC\n", &acc)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let gpu = Gpu::new(&GpuConfig::default())?;
    println!("adapter {}", gpu.describe().name);

    let n = 400;
    for (wg, groups) in [(8u32, 1u32), (8, 8), (64, 1), (256, 1), (8, 64)] {
        let d = dispatch(&gpu, TINY.replace("WG", &wg.to_string()), &[wg * groups, 0, 0, 0], wg * groups, groups);
        let list = vec![d; n];
        let s = common::best_seconds(&gpu, &list, 5)?;
        println!(
            "{n} dispatches of {groups:>2} workgroup(s) of {wg:>3}: {:6.2} ms, {:5.1} us each",
            s * 1e3,
            s * 1e6 / n as f64
        );
    }

    let (groups, iters) = (256u32, 100_000u32);
    // 8 lanes x 8 tokens x 8 multiply-adds per iteration.
    let macs = f64::from(groups) * 8.0 * f64::from(iters) * 64.0;
    for (name, int8) in [("float (mm_rows)", false), ("int8 (dot4I8Packed)", true)] {
        let d = dispatch(&gpu, dots(int8), &[iters, 0, 0, 0], groups * 8, groups);
        let s = common::best_seconds(&gpu, std::slice::from_ref(&d), 5)?;
        println!("multiply-adds in registers, {name:<20} {:6.1} GMAC/s", macs / s / 1e9);
    }
    Ok(())
}
