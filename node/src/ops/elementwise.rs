//! Element-wise ops on `[n_tokens, n]` activations: the SwiGLU activation, the residual
//! add, and copying one token's row out of a batch.
#![allow(clippy::too_many_arguments)] // the device, the step and every buffer, explicitly

use strata_shaders::Kernel;

use super::matmul::binding;
use crate::gpu::{Dim, Dispatch, Gpu, KernelCache, Workgroups};
use crate::{Error, Result};

/// Threads per workgroup of the element-wise kernels (their WGSL `WG`).
const WG: u32 = 256;

/// One row of a `[n_tokens, n]` buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Row {
    /// A fixed row.
    Index(u32),
    /// The step's last token, `n_tokens - 1`: after a prefill chunk of any size.
    Last,
}

impl Row {
    /// The kernels' encoding: the index, or `u32::MAX` for the last token.
    pub(crate) fn encode(self) -> u32 {
        match self {
            Row::Index(i) => i,
            Row::Last => u32::MAX,
        }
    }

    /// Rows a buffer must hold for this row to exist in every step of up to `max_tokens`.
    pub(crate) fn rows_needed(self, max_tokens: u32) -> u64 {
        match self {
            Row::Index(i) => u64::from(i) + 1,
            Row::Last => u64::from(max_tokens),
        }
    }
}

/// Fails unless `buffer` holds at least `bytes` bytes.
pub(crate) fn require_bytes(op: &'static str, what: &str, buffer: &wgpu::Buffer, bytes: u64) -> Result<()> {
    if buffer.size() < bytes {
        return Err(Error::Shape { op, message: format!("`{what}` holds {} bytes, needs {bytes}", buffer.size()) });
    }
    Ok(())
}

/// The binding of the first `bytes` of `buffer`, which must hold them, within the
/// adapter's largest binding.
pub(crate) fn bind<'a>(
    gpu: &Gpu,
    op: &'static str,
    what: &str,
    buffer: &'a wgpu::Buffer,
    bytes: u64,
) -> Result<wgpu::BindingResource<'a>> {
    require_bytes(op, what, buffer, bytes)?;
    if bytes > gpu.max_binding() {
        let message = format!("`{what}`: {bytes} bytes exceed the largest binding, {}", gpu.max_binding());
        return Err(Error::Shape { op, message });
    }
    Ok(binding(buffer, bytes))
}

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct Params {
    n: u32,
    row: u32,
    _pad: [u32; 2],
}

fn check_width(op: &'static str, n: u32, max_tokens: u32) -> Result<u64> {
    if n == 0 || max_tokens == 0 {
        return Err(Error::Shape { op, message: format!("width {n} and max_tokens {max_tokens} must be positive") });
    }
    Ok(u64::from(n) * u64::from(max_tokens) * 4)
}

/// `out = silu(gate) * up` on `[n_tokens, n]` f32 buffers; `out` may be `gate`.
pub fn swiglu(
    gpu: &Gpu,
    kernels: &KernelCache,
    step: &wgpu::Buffer,
    gate: &wgpu::Buffer,
    up: &wgpu::Buffer,
    out: &wgpu::Buffer,
    n: u32,
    max_tokens: u32,
) -> Result<Dispatch> {
    let bytes = check_width("swiglu", n, max_tokens)?;
    let (gate, up, out) = (
        bind(gpu, "swiglu", "gate", gate, bytes)?,
        bind(gpu, "swiglu", "up", up, bytes)?,
        bind(gpu, "swiglu", "out", out, bytes)?,
    );
    let params = gpu.uniform("swiglu", &Params { n, row: 0, _pad: [0; 2] });
    let pipeline = kernels.pipeline(gpu, Kernel::SWIGLU, None, &[])?;
    let resources = [step.as_entire_binding(), params.as_entire_binding(), gate, up, out];
    Ok(Dispatch::new(
        gpu,
        "swiglu",
        pipeline,
        &resources,
        Workgroups(Dim::Fixed(n.div_ceil(WG)), Dim::Tokens { group: 1 }, Dim::Fixed(1)),
    ))
}

/// `x += y` on `[n_tokens, n]` f32 buffers.
pub fn add(
    gpu: &Gpu,
    kernels: &KernelCache,
    step: &wgpu::Buffer,
    x: &wgpu::Buffer,
    y: &wgpu::Buffer,
    n: u32,
    max_tokens: u32,
) -> Result<Dispatch> {
    let bytes = check_width("add", n, max_tokens)?;
    if x == y {
        return Err(Error::Shape { op: "add", message: "x and y must be different buffers".into() });
    }
    let (x, y) = (bind(gpu, "add", "x", x, bytes)?, bind(gpu, "add", "y", y, bytes)?);
    let params = gpu.uniform("add", &Params { n, row: 0, _pad: [0; 2] });
    let pipeline = kernels.pipeline(gpu, Kernel::ADD, None, &[])?;
    let resources = [step.as_entire_binding(), params.as_entire_binding(), x, y];
    Ok(Dispatch::new(
        gpu,
        "add",
        pipeline,
        &resources,
        Workgroups(Dim::Fixed(n.div_ceil(WG)), Dim::Tokens { group: 1 }, Dim::Fixed(1)),
    ))
}

/// Copies `row` of `src` (f32 `[n_tokens, n]`) to `dst[0..n]`, e.g. the last token's hidden
/// state before the output head, so that the head runs on one row.
pub fn copy_row(
    gpu: &Gpu,
    kernels: &KernelCache,
    step: &wgpu::Buffer,
    src: &wgpu::Buffer,
    dst: &wgpu::Buffer,
    n: u32,
    row: Row,
    max_tokens: u32,
) -> Result<Dispatch> {
    check_width("copy_row", n, max_tokens)?;
    if src == dst {
        return Err(Error::Shape { op: "copy_row", message: "src and dst must be different buffers".into() });
    }
    let src = bind(gpu, "copy_row", "src", src, row.rows_needed(max_tokens) * u64::from(n) * 4)?;
    let dst = bind(gpu, "copy_row", "dst", dst, u64::from(n) * 4)?;
    let params = gpu.uniform("copy_row", &Params { n, row: row.encode(), _pad: [0; 2] });
    let pipeline = kernels.pipeline(gpu, Kernel::COPY_ROW, None, &[])?;
    let resources = [step.as_entire_binding(), params.as_entire_binding(), src, dst];
    Ok(Dispatch::new(gpu, "copy_row", pipeline, &resources, Workgroups::fixed(n.div_ceil(WG), 1, 1)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::harness::{f32_buffer, run, step_buffer};
    use crate::testing::{Rng, assert_close, gpu};

    #[test]
    fn swiglu_matches_cpu() {
        let (gpu, kernels) = gpu();
        let mut rng = Rng::new(1);
        let (n, max_tokens, t) = (1000u32, 4u32, 3usize);
        let len = (n * max_tokens) as usize;
        let (g, u) = (rng.vec(len, 8.0), rng.vec(len, 2.0));
        let step = step_buffer(gpu);
        let (gb, ub, ob) = (f32_buffer(gpu, &g), f32_buffer(gpu, &u), f32_buffer(gpu, &vec![0.0; len]));
        let d = swiglu(gpu, kernels, &step, &gb, &ub, &ob, n, max_tokens).unwrap();
        // In place too: out = gate.
        let d2 = swiglu(gpu, kernels, &step, &gb, &ub, &gb, n, max_tokens).unwrap();
        run(gpu, &step, &[d, d2], t as u32);
        let want: Vec<f32> = g
            .iter()
            .zip(&u)
            .map(|(&g, &u)| (f64::from(g) / (1.0 + (-f64::from(g)).exp()) * f64::from(u)) as f32)
            .collect();
        let got = gpu.read_f32(&ob, len).unwrap();
        let m = t * n as usize;
        assert_close(&got[..m], &want[..m], 1e-6, 1e-5, "swiglu");
        assert!(got[m..].iter().all(|&v| v == 0.0), "swiglu wrote past the step's tokens");
        assert_close(&gpu.read_f32(&gb, len).unwrap()[..m], &want[..m], 1e-6, 1e-5, "swiglu in place");
    }

    #[test]
    fn add_matches_cpu() {
        let (gpu, kernels) = gpu();
        let mut rng = Rng::new(2);
        let (n, max_tokens, t) = (576u32, 3u32, 2usize);
        let len = (n * max_tokens) as usize;
        let (x, y) = (rng.vec(len, 1.0), rng.vec(len, 1.0));
        let step = step_buffer(gpu);
        let (xb, yb) = (f32_buffer(gpu, &x), f32_buffer(gpu, &y));
        let d = add(gpu, kernels, &step, &xb, &yb, n, max_tokens).unwrap();
        run(gpu, &step, &[d], t as u32);
        let m = t * n as usize;
        let want: Vec<f32> = x.iter().zip(&y).enumerate().map(|(i, (a, b))| if i < m { a + b } else { *a }).collect();
        assert_eq!(gpu.read_f32(&xb, len).unwrap(), want);
    }

    #[test]
    fn copy_row_takes_a_fixed_or_the_last_row() {
        let (gpu, kernels) = gpu();
        let mut rng = Rng::new(3);
        let (n, max_tokens) = (300u32, 5u32);
        let src = rng.vec((n * max_tokens) as usize, 1.0);
        let step = step_buffer(gpu);
        let sb = f32_buffer(gpu, &src);
        let row = |r: usize| src[r * n as usize..(r + 1) * n as usize].to_vec();
        for (which, t, want) in [(Row::Last, 3, row(2)), (Row::Last, 5, row(4)), (Row::Index(1), 4, row(1))] {
            let db = f32_buffer(gpu, &vec![0.0; n as usize]);
            let d = copy_row(gpu, kernels, &step, &sb, &db, n, which, max_tokens).unwrap();
            run(gpu, &step, &[d], t);
            assert_eq!(gpu.read_f32(&db, n as usize).unwrap(), want, "{which:?} of {t}");
        }
    }

    #[test]
    fn shapes_are_checked() {
        let (gpu, kernels) = gpu();
        let step = step_buffer(gpu);
        let small = f32_buffer(gpu, &[0.0; 10]);
        let big = f32_buffer(gpu, &[0.0; 100]);
        let err = swiglu(gpu, kernels, &step, &big, &small, &big, 50, 2).unwrap_err();
        assert!(matches!(err, Error::Shape { op: "swiglu", .. }) && err.to_string().contains("`up`"), "{err}");
        assert!(add(gpu, kernels, &step, &big, &big, 10, 1).is_err());
        assert!(copy_row(gpu, kernels, &step, &big, &small, 10, Row::Index(10), 1).is_err());
        assert!(copy_row(gpu, kernels, &step, &big, &small, 10, Row::Last, 11).is_err());
    }
}
