//! Rotary position embedding on `[n_tokens, n_heads, head_dim]` queries or keys: in place,
//! or fused with the per-head RMSNorm that qwen3 and qwen35 apply to Q and K first.

use std::f64::consts::TAU;

use strata_shaders::Kernel;

use super::norm::RmsNorm;
use super::recorder::{Act, Recorder};
use crate::gpu::{Dim, Workgroups};
use crate::{Error, Result};

/// Which dims of a head form the rotated pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `(j, j + n_rot / 2)`: NeoX, qwen3, qwen35.
    Neox,
    /// Pairs `(2j, 2j + 1)`: llama as converted to GGUF (Q/K rows permuted).
    Adjacent,
}

/// RoPE on the first `n_rot` dims of each head; pair `j` turns by
/// `pos * theta^(-2j / n_rot)`, the other dims pass unchanged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rope {
    pub n_heads: u32,
    pub head_dim: u32,
    pub n_rot: u32,
    /// The frequency base (GGUF `rope.freq_base`).
    pub theta: f32,
    pub style: RopeStyle,
}

impl Rope {
    /// The angle per unit of position of each pair: `theta^(-2j / n_rot)`, in f64.
    pub fn inv_freqs(&self) -> Vec<f64> {
        let half = self.n_rot / 2;
        (0..half).map(|j| f64::from(self.theta).powf(-2.0 * f64::from(j) / f64::from(self.n_rot))).collect()
    }
}

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct Params {
    n_heads: u32,
    head_dim: u32,
    half: u32,
    neox: u32,
    norm: u32,
    eps: f32,
    x_stride: u32,
    out_stride: u32,
}

/// `inv_freq / 2 pi` as a 0.64 fixed-point fraction of a turn, as (low, high) words: the
/// kernel multiplies it by the position in integers, exactly, so angles keep their
/// precision at any position.
fn turns_per_position(inv_freq: f64) -> [u32; 2] {
    let f = (inv_freq / TAU * 2f64.powi(64)) as u64;
    [f as u32, (f >> 32) as u32]
}

impl Recorder<'_> {
    /// Rotates `x` (rows of `n_heads * head_dim`) in place by the step's `positions` (one
    /// u32 per row).
    pub fn rope(&mut self, x: Act<'_>, positions: Act<'_>, rope: Rope) -> Result<()> {
        self.rope_op(x, None, x, positions, rope)
    }

    /// RMSNorm of each head row (`norm.row_len = head_dim`, `norm.rows_per_token = n_heads`,
    /// `weight` f32 `[head_dim]`), then RoPE, in one pass over the row: `out` gets the
    /// result, and may be `x` when the strides agree. With strides, e.g. the query halves
    /// of a fused `[query | gate]` projection (`x_stride = 2 * head_dim`) go to a
    /// contiguous `out`.
    pub fn rms_norm_rope(
        &mut self,
        x: Act<'_>,
        weight: &wgpu::Buffer,
        out: Act<'_>,
        positions: Act<'_>,
        norm: RmsNorm,
        rope: Rope,
    ) -> Result<()> {
        if norm.row_len != rope.head_dim || norm.rows_per_token != rope.n_heads {
            return Err(Error::Shape { op: "rms_norm_rope", message: format!("{norm:?} does not match {rope:?}") });
        }
        self.rope_op(x, Some((weight, norm)), out, positions, rope)
    }

    fn rope_op(
        &mut self,
        x: Act<'_>,
        norm: Option<(&wgpu::Buffer, RmsNorm)>,
        out: Act<'_>,
        positions: Act<'_>,
        rope: Rope,
    ) -> Result<()> {
        let op = if norm.is_some() { "rms_norm_rope" } else { "rope" };
        let shape = |message: String| Error::Shape { op, message };
        let Rope { n_heads, head_dim, n_rot, theta, style } = rope;
        if n_heads == 0 || n_rot == 0 || !n_rot.is_multiple_of(2) || n_rot > head_dim || theta.is_nan() || theta < 1.0 {
            return Err(shape(format!("{rope:?}")));
        }
        let (x_stride, out_stride, eps) = match norm {
            Some((_, n)) => (n.x_stride, n.out_stride, n.eps),
            None => (head_dim, head_dim, 0.0),
        };
        if x_stride < head_dim || out_stride < head_dim || (x.same_buffer(&out) && x_stride != out_stride) {
            return Err(shape(format!("strides {x_stride} and {out_stride} for heads of {head_dim}")));
        }
        let x = self.bind_act(op, "x", x, n_heads * x_stride)?;
        let out = self.bind_act(op, "out", out, n_heads * out_stride)?;
        let positions = self.bind_act(op, "positions", positions, 1)?;
        let freqs: Vec<u32> = rope.inv_freqs().into_iter().flat_map(turns_per_position).collect();
        let freqs = self.gpu().storage_init("rope freqs", bytemuck::cast_slice(&freqs));
        let weight = match norm {
            Some((w, _)) => self.bind(op, "weight", w, u64::from(head_dim) * 4)?,
            // An unread binding: any buffer that is only read.
            None => freqs.as_entire_binding(),
        };
        let params = Params {
            n_heads,
            head_dim,
            half: n_rot / 2,
            neox: u32::from(style == RopeStyle::Neox),
            norm: u32::from(norm.is_some()),
            eps,
            x_stride,
            out_stride,
        };
        let params = self.uniform(op, &params);
        let pipeline = self.pipeline(Kernel::ROPE, &[], &[("WG", format!("{}u", self.row_lanes(64)))])?;
        let workgroups = Workgroups(Dim::Fixed(n_heads), Dim::Tokens { group: 1 }, Dim::Fixed(1));
        self.dispatch(op, pipeline, &params, &[positions, freqs.as_entire_binding(), x, weight, out], workgroups);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::harness::{f32_buffer, record, run, step_buffer, u32_buffer};
    use crate::testing::{Rng, assert_close, gpu};

    /// The CPU twin, in f64: angle = pos * inv_freq exactly, then sin and cos.
    fn cpu_rope(x: &mut [f32], positions: &[u32], rope: Rope) {
        let (hd, half) = (rope.head_dim as usize, rope.n_rot as usize / 2);
        let inv = rope.inv_freqs();
        for (t, &pos) in positions.iter().enumerate() {
            for h in 0..rope.n_heads as usize {
                let head = &mut x[(t * rope.n_heads as usize + h) * hd..][..hd];
                for (j, &f) in inv.iter().enumerate() {
                    let (i0, i1) = match rope.style {
                        RopeStyle::Neox => (j, j + half),
                        RopeStyle::Adjacent => (2 * j, 2 * j + 1),
                    };
                    let (s, c) = (f64::from(pos) * f).sin_cos();
                    let (a, b) = (f64::from(head[i0]), f64::from(head[i1]));
                    head[i0] = (a * c - b * s) as f32;
                    head[i1] = (a * s + b * c) as f32;
                }
            }
        }
    }

    #[test]
    fn rope_matches_cpu() {
        let (gpu, _) = gpu();
        let mut rng = Rng::new(7);
        let cases = [
            (4, 64, 16, 1e7, RopeStyle::Neox),
            (4, 64, 64, 1e4, RopeStyle::Neox),
            (3, 64, 16, 1e4, RopeStyle::Adjacent),
            (9, 64, 64, 1e4, RopeStyle::Adjacent),
            (24, 256, 64, 1e7, RopeStyle::Neox),
        ];
        for (n_heads, head_dim, n_rot, theta, style) in cases {
            let rope_cfg = Rope { n_heads, head_dim, n_rot, theta, style };
            let (max_tokens, t) = (6u32, 5usize);
            // Small and large positions, up to 30000 and one near 2^20.
            let positions: Vec<u32> = vec![0, 1, 37, 29_999, 1_000_003, 0];
            let len = (max_tokens * n_heads * head_dim) as usize;
            let x = rng.vec(len, 2.0);
            let step = step_buffer(gpu);
            let (xb, pb) = (f32_buffer(gpu, &x), u32_buffer(gpu, &positions));
            let (xa, pa) = (Act::new(&xb, max_tokens, n_heads * head_dim), Act::new(&pb, max_tokens, 1));
            let d = record(&step, max_tokens, |rec| rec.rope(xa, pa, rope_cfg)).unwrap();
            run(gpu, &step, &d, t as u32);
            let mut want = x.clone();
            cpu_rope(&mut want[..len / max_tokens as usize * t], &positions[..t], rope_cfg);
            let got = gpu.read_f32(&xb, len).unwrap();
            assert_close(&got, &want, 1e-5, 1e-4, &format!("{rope_cfg:?}"));
        }
    }

    #[test]
    fn rms_norm_rope_matches_cpu() {
        let (gpu, _) = gpu();
        let mut rng = Rng::new(8);
        let positions: Vec<u32> = vec![3, 29_999, 0, 1_000_003, 12, 7];
        let (max_tokens, t) = (6u32, 5usize);
        // (heads, head dim, n_rot, theta, x stride, in place)
        let cases = [
            (4, 64, 16, 1e7, 128, false), // qwen35 queries, out of a fused [query | gate] projection
            (2, 64, 16, 1e7, 64, true),   // qwen35 keys
            (4, 32, 32, 1e6, 32, false),  // qwen3: the whole head
            (24, 256, 64, 1e7, 512, false),
        ];
        for (n_heads, head_dim, n_rot, theta, x_stride, in_place) in cases {
            let rope_cfg = Rope { n_heads, head_dim, n_rot, theta, style: RopeStyle::Neox };
            let norm = RmsNorm::new(head_dim, n_heads, 1e-6).with_strides(x_stride, head_dim);
            let rows = (max_tokens * n_heads) as usize;
            let x = rng.vec(rows * x_stride as usize, 3.0);
            let w = rng.vec(head_dim as usize, 1.5);
            let step = step_buffer(gpu);
            let (xb, wb, pb) = (f32_buffer(gpu, &x), f32_buffer(gpu, &w), u32_buffer(gpu, &positions));
            let out_len = rows * head_dim as usize;
            let ob = if in_place { xb.clone() } else { f32_buffer(gpu, &vec![0.0; out_len]) };
            let xa = Act::new(&xb, max_tokens, n_heads * x_stride);
            let (oa, pa) = (Act::new(&ob, max_tokens, n_heads * head_dim), Act::new(&pb, max_tokens, 1));
            let d = record(&step, max_tokens, |rec| rec.rms_norm_rope(xa, &wb, oa, pa, norm, rope_cfg)).unwrap();
            run(gpu, &step, &d, t as u32);
            let done = t * n_heads as usize;
            let mut want = crate::ops::norm::tests::cpu_rms_norm(&x, &w, norm, done);
            cpu_rope(&mut want, &positions[..t], rope_cfg);
            let got = gpu.read_f32(&ob, out_len).unwrap();
            let what = format!("{rope_cfg:?}, x stride {x_stride}, in place {in_place}");
            assert_close(&got[..want.len()], &want, 1e-5, 1e-4, &what);
            let untouched = if in_place { &x[want.len()..out_len] } else { &vec![0.0; out_len][want.len()..] };
            assert_eq!(&got[want.len()..], untouched, "{what}: rows past the step were written");
        }
    }

    #[test]
    fn rope_checks_shapes() {
        let (gpu, _) = gpu();
        let step = step_buffer(gpu);
        let x = f32_buffer(gpu, &[0.0; 256]);
        let p = u32_buffer(gpu, &[0; 2]);
        let (xa, pa) = (Act::new(&x, 2, 128), Act::new(&p, 2, 1));
        let ok = Rope { n_heads: 2, head_dim: 64, n_rot: 64, theta: 1e4, style: RopeStyle::Neox };
        let rope = |max_tokens, r| record(&step, max_tokens, |rec| rec.rope(xa, pa, r));
        assert!(rope(2, ok).is_ok());
        assert!(rope(3, ok).is_err());
        assert!(rope(1, Rope { n_rot: 66, ..ok }).is_err());
        assert!(rope(1, Rope { n_rot: 15, ..ok }).is_err());
        let w = f32_buffer(gpu, &[1.0; 64]);
        let norm = RmsNorm::new(64, 2, 1e-6);
        let norm_rope = |max_tokens, n| record(&step, max_tokens, |rec| rec.rms_norm_rope(xa, &w, xa, pa, n, ok));
        assert!(norm_rope(2, norm).is_ok());
        assert!(norm_rope(1, RmsNorm::new(64, 1, 1e-6)).is_err());
        assert!(norm_rope(1, norm.with_strides(128, 64)).is_err());
    }
}
