//! RMSNorm of rows, one workgroup per row: the per-token norms of a layer and, with
//! `rows_per_token = n_heads` and `row_len = head_dim`, the per-head Q/K norms.

use strata_shaders::Kernel;

use super::recorder::{Act, Recorder};
use crate::gpu::{Dim, Workgroups};
use crate::{Error, Result};

/// The shape of an RMSNorm: `rows_per_token` rows of `row_len` values per token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RmsNorm {
    pub row_len: u32,
    pub rows_per_token: u32,
    pub eps: f32,
    /// Values from one row of `x` to the next (default `row_len`).
    pub x_stride: u32,
    /// Values from one row of `out` to the next (default `row_len`).
    pub out_stride: u32,
}

impl RmsNorm {
    /// Contiguous rows.
    pub fn new(row_len: u32, rows_per_token: u32, eps: f32) -> Self {
        RmsNorm { row_len, rows_per_token, eps, x_stride: row_len, out_stride: row_len }
    }

    /// Strided rows, e.g. for the query halves of a fused `[query | gate]` projection per
    /// head (`x_stride = 2 * head_dim`) written contiguously (`out_stride = head_dim`).
    pub fn with_strides(self, x_stride: u32, out_stride: u32) -> Self {
        RmsNorm { x_stride, out_stride, ..self }
    }
}

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct Params {
    row_len: u32,
    rows_per_token: u32,
    x_stride: u32,
    out_stride: u32,
    eps: f32,
    _pad: [u32; 3],
}

impl RmsNorm {
    /// Values per token: `rows_per_token` rows `stride` apart.
    fn width(&self, stride: u32) -> u32 {
        self.rows_per_token * stride
    }
}

impl Recorder<'_> {
    /// `out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight` for each row `r` of the step's
    /// tokens. `weight`: f32 `[row_len]`; `x` and `out` have `rows_per_token` rows per token,
    /// at their strides. `out` may be `x` (in place) when the strides agree.
    pub fn rms_norm(&mut self, x: Act<'_>, weight: &wgpu::Buffer, out: Act<'_>, norm: RmsNorm) -> Result<()> {
        let shape = |message: String| Error::Shape { op: "rms_norm", message };
        let RmsNorm { row_len, rows_per_token, eps, x_stride, out_stride } = norm;
        if row_len == 0 || rows_per_token == 0 || x_stride < row_len || out_stride < row_len {
            return Err(shape(format!("{norm:?}")));
        }
        if x.same_buffer(&out) && x_stride != out_stride {
            return Err(shape("in place needs equal strides".into()));
        }
        let x = self.bind_act("rms_norm", "x", x, norm.width(x_stride))?;
        let out = self.bind_act("rms_norm", "out", out, norm.width(out_stride))?;
        let weight = self.bind("rms_norm", "weight", weight, u64::from(row_len) * 4)?;
        let params =
            self.uniform("rms_norm", &Params { row_len, rows_per_token, x_stride, out_stride, eps, _pad: [0; 3] });
        let pipeline = self.pipeline(Kernel::RMS_NORM, &[], &[("WG", format!("{}u", self.row_lanes(256)))])?;
        let workgroups = Workgroups(Dim::Fixed(rows_per_token), Dim::Tokens { group: 1 }, Dim::Fixed(1));
        self.dispatch("rms_norm", pipeline, &params, &[x, weight, out], workgroups);
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ops::harness::{f32_buffer, record, run, step_buffer};
    use crate::testing::{Rng, assert_close, gpu};

    /// The CPU twin: rows `0..rows` of `x`, in f64, written contiguously.
    pub(crate) fn cpu_rms_norm(x: &[f32], w: &[f32], norm: RmsNorm, rows: usize) -> Vec<f32> {
        let n = norm.row_len as usize;
        let mut out = Vec::with_capacity(rows * n);
        for r in 0..rows {
            let row = &x[r * norm.x_stride as usize..][..n];
            let ms = row.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / n as f64;
            let scale = 1.0 / (ms + f64::from(norm.eps)).sqrt();
            out.extend(row.iter().zip(w).map(|(&v, &w)| (f64::from(v) * scale * f64::from(w)) as f32));
        }
        out
    }

    fn check(norm: RmsNorm, max_tokens: u32, t: u32, in_place: bool, seed: u64) {
        let (gpu, _) = gpu();
        let mut rng = Rng::new(seed);
        let rows = (max_tokens * norm.rows_per_token) as usize;
        let x = rng.vec(rows * norm.x_stride as usize, 3.0);
        let w = rng.vec(norm.row_len as usize, 1.5);
        let step = step_buffer(gpu);
        let (xb, wb) = (f32_buffer(gpu, &x), f32_buffer(gpu, &w));
        let out_len = rows * norm.out_stride as usize;
        let ob = if in_place { xb.clone() } else { f32_buffer(gpu, &vec![0.0; out_len]) };
        let (xa, oa) = (
            Act::new(&xb, max_tokens, norm.width(norm.x_stride)),
            Act::new(&ob, max_tokens, norm.width(norm.out_stride)),
        );
        let d = record(&step, max_tokens, |rec| rec.rms_norm(xa, &wb, oa, norm)).unwrap();
        run(gpu, &step, &d, t);
        let got = gpu.read_f32(&ob, out_len).unwrap();
        let done = (t * norm.rows_per_token) as usize;
        let want = cpu_rms_norm(&x, &w, norm, done);
        let (n, os) = (norm.row_len as usize, norm.out_stride as usize);
        let got_rows: Vec<f32> = (0..done).flat_map(|r| got[r * os..r * os + n].to_vec()).collect();
        assert_close(&got_rows, &want, 1e-5, 1e-4, &format!("{norm:?} t={t} in_place={in_place}"));
        let untouched = if in_place { &x[done * os..] } else { &vec![0.0; out_len][done * os..] };
        assert_eq!(&got[done * os..], untouched, "{norm:?}: rows past the step were written");
    }

    #[test]
    fn rms_norm_matches_cpu() {
        check(RmsNorm::new(576, 1, 1e-5), 3, 3, false, 1);
        check(RmsNorm::new(576, 1, 1e-5), 4, 2, true, 2);
        // Per-head Q/K norms.
        check(RmsNorm::new(64, 4, 1e-6), 5, 5, false, 3);
        check(RmsNorm::new(64, 2, 1e-6), 3, 2, true, 4);
        // Wider than the workgroup, not a multiple of it.
        check(RmsNorm::new(5120 + 7, 1, 1e-6), 2, 2, false, 5);
        // The query halves of a fused [query | gate] projection, written contiguously.
        check(RmsNorm::new(64, 4, 1e-6).with_strides(128, 64), 3, 3, false, 6);
    }

    #[test]
    fn rms_norm_checks_shapes() {
        let (gpu, _) = gpu();
        let step = step_buffer(gpu);
        let x = f32_buffer(gpu, &[0.0; 128]);
        let w = f32_buffer(gpu, &[0.0; 64]);
        let xa = Act::new(&x, 1, 128);
        let norm = |max_tokens, n| record(&step, max_tokens, |rec| rec.rms_norm(xa, &w, xa, n));
        assert!(norm(1, RmsNorm::new(64, 2, 1e-6)).is_ok());
        let err = norm(2, RmsNorm::new(64, 2, 1e-6)).unwrap_err();
        assert!(err.to_string().contains("`x`"), "{err}");
        assert!(norm(1, RmsNorm::new(65, 1, 1e-6)).is_err());
        assert!(norm(1, RmsNorm::new(32, 2, 1e-6).with_strides(64, 32)).is_err());
    }
}
