//! Element-wise ops on `[n_tokens, n]` activations: the SwiGLU activation and copying one
//! token's row out of a batch; and [`Row`], how ops that read one row of a batch name it.

use strata_shaders::Kernel;

use super::recorder::{Act, Recorder};
use crate::gpu::{Dim, Workgroups};
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

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct Params {
    n: u32,
    row: u32,
    _pad: [u32; 2],
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
        let params = self.uniform("swiglu", &Params { n, row: 0, _pad: [0; 2] });
        let pipeline = self.pipeline(Kernel::SWIGLU, None, &[])?;
        let workgroups = Workgroups(Dim::Fixed(n.div_ceil(WG)), Dim::Tokens { group: 1 }, Dim::Fixed(1));
        self.dispatch("swiglu", pipeline, &params, &[gate, up, out], workgroups);
        Ok(())
    }

    /// Copies `row` of `src` to the single row of `dst`, e.g. the last token's hidden state
    /// before the output head, so that the head runs on one row inside the step's pass.
    pub fn copy_row(&mut self, src: Act<'_>, dst: Act<'_>, row: Row) -> Result<()> {
        let op = "copy_row";
        let n = src.width;
        if src.same_buffer(&dst) || dst.width != n || n == 0 {
            return Err(Error::Shape {
                op,
                message: format!("rows of {n} into rows of {}, distinct buffers", dst.width),
            });
        }
        let rows = row.rows_needed(self.max_tokens());
        if u64::from(src.rows) < rows {
            return Err(Error::Shape { op, message: format!("row {row:?} of {} rows", src.rows) });
        }
        let src = self.bind(op, "src", src.buffer, rows * u64::from(n) * 4)?;
        let dst = self.bind(op, "dst", dst.buffer, u64::from(n) * 4)?;
        let params = self.uniform(op, &Params { n, row: row.encode(), _pad: [0; 2] });
        let pipeline = self.pipeline(Kernel::COPY_ROW, None, &[])?;
        self.dispatch(op, pipeline, &params, &[src, dst], Workgroups::fixed(n.div_ceil(WG), 1, 1));
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
    fn copy_row_takes_a_fixed_or_the_last_row() {
        let (gpu, _) = gpu();
        let mut rng = Rng::new(3);
        let (n, max_tokens) = (300u32, 5u32);
        let src = rng.vec((n * max_tokens) as usize, 1.0);
        let step = step_buffer(gpu);
        let sb = f32_buffer(gpu, &src);
        let row = |r: usize| src[r * n as usize..(r + 1) * n as usize].to_vec();
        for (which, t, want) in [(Row::Last, 3, row(2)), (Row::Last, 5, row(4)), (Row::Index(1), 4, row(1))] {
            let db = f32_buffer(gpu, &vec![0.0; n as usize]);
            let d =
                record(&step, max_tokens, |rec| rec.copy_row(Act::new(&sb, max_tokens, n), Act::new(&db, 1, n), which));
            run(gpu, &step, &d.unwrap(), t);
            assert_eq!(gpu.read_f32(&db, n as usize).unwrap(), want, "{which:?} of {t}");
        }
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
        let (ten, small_row) = (Act::new(&big, 10, 10), Act::new(&small, 1, 10));
        assert!(record(&step, 1, |rec| rec.copy_row(ten, small_row, Row::Index(9))).is_ok());
        assert!(record(&step, 1, |rec| rec.copy_row(ten, small_row, Row::Index(10))).is_err());
        assert!(record(&step, 11, |rec| rec.copy_row(ten, small_row, Row::Last)).is_err());
    }
}
