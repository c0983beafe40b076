//! Element-wise ops on `[n_tokens, n]` activations: the SwiGLU activation, and gathering
//! chosen rows of a step (each sequence's row to sample) for the output head.

use strata_shaders::Kernel;

use super::recorder::{Act, Recorder};
use crate::gpu::{Dim, Workgroups};
use crate::{Error, Result};

/// Threads per workgroup of the element-wise kernels (their WGSL `WG`).
const WG: u32 = 256;

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct Params {
    n: u32,
    _pad: [u32; 3],
}

impl Recorder<'_> {
    /// `out = silu(gate) * up` on rows of the same width; `out` may be `gate`.
    pub fn swiglu(&mut self, gate: Act<'_>, up: Act<'_>, out: Act<'_>) -> Result<()> {
        let n = gate.width;
        if n == 0 {
            return Err(Error::Shape { op: "swiglu", message: "rows of width 0".into() });
        }
        let (gate, up, out) = (
            self.bind_act("swiglu", "gate", gate, n)?,
            self.bind_act("swiglu", "up", up, n)?,
            self.bind_act("swiglu", "out", out, n)?,
        );
        let params = self.uniform("swiglu", &Params { n, _pad: [0; 3] });
        let pipeline = self.pipeline(Kernel::SWIGLU, &[], &[])?;
        let workgroups = Workgroups(Dim::Fixed(n.div_ceil(WG)), Dim::Tokens { group: 1 }, Dim::Fixed(1));
        self.dispatch("swiglu", pipeline, &params, &[gate, up, out], workgroups);
        Ok(())
    }

    /// `dst[i] = src[rows[i]]` for the step's rows `i` (this recorder's step: e.g. the
    /// output head's, whose rows are the rows to sample). `src` is bound whole (a stage's
    /// activations, of more rows than the head's step); `rows`: u32 row indices.
    pub fn gather_rows(&mut self, src: Act<'_>, rows: Act<'_>, dst: Act<'_>) -> Result<()> {
        let op = "gather_rows";
        let n = src.width;
        if src.same_buffer(&dst) || dst.width != n || n == 0 {
            return Err(Error::Shape {
                op,
                message: format!("rows of {n} into rows of {}, distinct buffers", dst.width),
            });
        }
        let src = self.bind(op, "src", src.buffer, u64::from(src.rows) * u64::from(n) * 4)?;
        let rows = self.bind_act(op, "rows", rows, 1)?;
        let dst = self.bind_act(op, "dst", dst, n)?;
        let params = self.uniform(op, &Params { n, _pad: [0; 3] });
        let pipeline = self.pipeline(Kernel::GATHER_ROWS, &[], &[])?;
        let workgroups = Workgroups(Dim::Fixed(n.div_ceil(WG)), Dim::Tokens { group: 1 }, Dim::Fixed(1));
        self.dispatch(op, pipeline, &params, &[rows, src, dst], workgroups);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::harness::{f32_buffer, record, run, step_buffer};
    use crate::testing::{Rng, assert_close, gpu};

    #[test]
    fn swiglu_matches_cpu() {
        let (gpu, _) = gpu();
        let mut rng = Rng::new(1);
        let (n, max_tokens, t) = (1000u32, 4u32, 3usize);
        let len = (n * max_tokens) as usize;
        let (g, u) = (rng.vec(len, 8.0), rng.vec(len, 2.0));
        let step = step_buffer(gpu);
        let (gb, ub, ob) = (f32_buffer(gpu, &g), f32_buffer(gpu, &u), f32_buffer(gpu, &vec![0.0; len]));
        let act = |b| Act::new(b, max_tokens, n);
        let d = record(&step, max_tokens, |rec| {
            rec.swiglu(act(&gb), act(&ub), act(&ob))?;
            // In place too: out = gate.
            rec.swiglu(act(&gb), act(&ub), act(&gb))
        })
        .unwrap();
        run(gpu, &step, &d, t as u32);
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
    fn gather_rows_takes_the_chosen_rows() {
        let (gpu, _) = gpu();
        let mut rng = Rng::new(3);
        let (n, src_rows) = (300u32, 9u32);
        let src = rng.vec((n * src_rows) as usize, 1.0);
        let step = step_buffer(gpu);
        let sb = f32_buffer(gpu, &src);
        let row = |r: u32| src[(r * n) as usize..((r + 1) * n) as usize].to_vec();
        let picks = [8u32, 0, 3];
        let ib = crate::ops::harness::u32_buffer(gpu, &[8, 0, 3, 5]);
        let db = f32_buffer(gpu, &vec![0.0; 4 * n as usize]);
        let d = record(&step, 4, |rec| {
            rec.gather_rows(Act::new(&sb, src_rows, n), Act::new(&ib, 4, 1), Act::new(&db, 4, n))
        })
        .unwrap();
        run(gpu, &step, &d, 3);
        let got = gpu.read_f32(&db, 4 * n as usize).unwrap();
        let want: Vec<f32> = picks.iter().flat_map(|&r| row(r)).collect();
        assert_eq!(got[..3 * n as usize], want[..]);
        assert!(got[3 * n as usize..].iter().all(|&v| v == 0.0), "a row past the step was written");
    }

    #[test]
    fn shapes_are_checked() {
        let (gpu, _) = gpu();
        let step = step_buffer(gpu);
        let small = f32_buffer(gpu, &[0.0; 10]);
        let big = f32_buffer(gpu, &[0.0; 100]);
        let (big_rows, small_rows) = (Act::new(&big, 2, 50), Act::new(&small, 2, 50));
        let err = record(&step, 2, |rec| rec.swiglu(big_rows, small_rows, big_rows)).unwrap_err();
        assert!(matches!(err, Error::Shape { op: "swiglu", .. }) && err.to_string().contains("`up`"), "{err}");
        let err = record(&step, 2, |rec| rec.swiglu(big_rows, Act::new(&big, 2, 49), big_rows)).unwrap_err();
        assert!(err.to_string().contains("`up` has rows of 49"), "{err}");
        assert!(record(&step, 3, |rec| rec.swiglu(big_rows, big_rows, big_rows)).is_err());
        let (ten, small_row, idx) = (Act::new(&big, 10, 10), Act::new(&small, 1, 10), Act::new(&small, 1, 1));
        assert!(record(&step, 1, |rec| rec.gather_rows(ten, idx, small_row)).is_ok());
        assert!(record(&step, 2, |rec| rec.gather_rows(ten, idx, small_row)).is_err());
        assert!(record(&step, 1, |rec| rec.gather_rows(ten, idx, Act::new(&small, 1, 9))).is_err());
    }
}
