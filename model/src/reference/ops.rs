//! Plain f32 maths shared by the reference layers.

/// A dense f32 matrix of `n` rows of `k` values (the GGUF `[k, n]` layout, dequantised).
#[derive(Clone)]
pub struct Matrix {
    pub k: usize,
    pub n: usize,
    pub data: Vec<f32>,
}

impl Matrix {
    /// `W x`.
    pub fn matvec(&self, x: &[f32]) -> Vec<f32> {
        assert_eq!(x.len(), self.k, "matvec width");
        self.data.chunks_exact(self.k).map(|row| dot(row, x)).collect()
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.k..(i + 1) * self.k]
    }
}

/// Dot product with eight partial sums (vectorises; f32 like the GPU path).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `x / rms(x) * w`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let s = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, w)| v * s * w).collect()
}

/// `x / sqrt(sum(x^2) + eps)`, in place.
pub fn l2_norm(x: &mut [f32], eps: f32) {
    let s = 1.0 / (x.iter().map(|v| v * v).sum::<f32>() + eps).sqrt();
    x.iter_mut().for_each(|v| *v *= s);
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

pub fn softplus(x: f32) -> f32 {
    // ln(1 + e^x) without overflow for large x.
    if x > 20.0 { x } else { x.exp().ln_1p() }
}

/// Rotates the first `n_rot` dims of one head in place.
pub fn rope(x: &mut [f32], pos: usize, n_rot: usize, theta: f32, style: crate::config::RopeStyle) {
    let half = n_rot / 2;
    for j in 0..half {
        let freq = theta.powf(-2.0 * j as f32 / n_rot as f32);
        let (sin, cos) = (pos as f32 * freq).sin_cos();
        let (a, b) = match style {
            crate::config::RopeStyle::Neox => (j, j + half),
            crate::config::RopeStyle::Adjacent => (2 * j, 2 * j + 1),
        };
        let (x0, x1) = (x[a], x[b]);
        x[a] = x0 * cos - x1 * sin;
        x[b] = x0 * sin + x1 * cos;
    }
}

pub fn softmax_in_place(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    x.iter_mut().for_each(|v| {
        *v = (*v - max).exp();
        sum += *v;
    });
    x.iter_mut().for_each(|v| *v /= sum);
}

pub fn add_in_place(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
}
