//! GPU weights: quantised matrices repacked into aligned layouts, split across bindings.
//!
//! A [`QuantMatrix`] is never dequantised at load: its blocks are rearranged into arrays
//! of aligned words (see `repack`) that the weight-format preludes `q_*.wgsl` read. A
//! matrix larger than one storage binding is split by rows into parts, each in its own
//! buffers; ops dispatch once per part.

mod repack;

use strata_model::quant::GgmlType;
use strata_shaders::Kernel;

use crate::gpu::Gpu;
use crate::{Error, Result};

/// A GGUF weight matrix on the GPU: ggml dims `[k, n]`, i.e. `n` rows of `k` values.
pub struct QuantMatrix {
    name: String,
    ty: GgmlType,
    k: usize,
    n: usize,
    format: Kernel,
    /// Matrices stacked end to end (the experts of a 3-D tensor); 1 for a plain matrix.
    matrices: usize,
    parts: Vec<MatrixPart>,
}

/// Rows `row0..row0 + rows` of a [`QuantMatrix`], in buffers bound at 4.. by its kernels.
pub struct MatrixPart {
    pub row0: usize,
    pub rows: usize,
    pub buffers: Vec<wgpu::Buffer>,
}

impl std::fmt::Debug for QuantMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantMatrix")
            .field("name", &self.name)
            .field("ty", &self.ty)
            .field("k", &self.k)
            .field("n", &self.n)
            .field("parts", &self.parts.len())
            .finish()
    }
}

impl QuantMatrix {
    /// Uploads the GGUF bytes of a `[k, n]` matrix of type `ty`, repacked.
    pub fn upload(gpu: &Gpu, name: &str, ty: GgmlType, k: usize, n: usize, bytes: &[u8]) -> Result<QuantMatrix> {
        Self::upload_with_max_part(gpu, name, ty, k, n, bytes, gpu.max_binding())
    }

    /// As [`QuantMatrix::upload`], with no buffer larger than `max_part_bytes` (at most the
    /// adapter's largest binding): tests use it to force splitting.
    pub fn upload_with_max_part(
        gpu: &Gpu,
        name: &str,
        ty: GgmlType,
        k: usize,
        n: usize,
        bytes: &[u8],
        max_part_bytes: u64,
    ) -> Result<QuantMatrix> {
        Self::upload_stacked(gpu, name, ty, k, n, 1, bytes, max_part_bytes)
    }

    /// `matrices` matrices `[k, n]` stored end to end (a MoE layer's experts, ggml dims
    /// `[k, n, matrices]`), as one matrix of `n · matrices` rows whose parts hold whole
    /// matrices, so that an expert is never split across bindings.
    pub fn upload_experts(
        gpu: &Gpu,
        name: &str,
        ty: GgmlType,
        (k, n, matrices): (usize, usize, usize),
        bytes: &[u8],
        max_part_bytes: u64,
    ) -> Result<QuantMatrix> {
        Self::upload_stacked(gpu, name, ty, k, n, matrices, bytes, max_part_bytes)
    }

    #[allow(clippy::too_many_arguments)]
    fn upload_stacked(
        gpu: &Gpu,
        name: &str,
        ty: GgmlType,
        k: usize,
        n_one: usize,
        matrices: usize,
        bytes: &[u8],
        max_part_bytes: u64,
    ) -> Result<QuantMatrix> {
        let n = n_one * matrices;
        let unsupported = || Error::UnsupportedTensor { name: name.to_owned(), ty: ty.name().to_owned() };
        let format = repack::format_kernel(ty).ok_or_else(unsupported)?;
        let shape = |message: String| Error::Shape { op: "upload weights", message: format!("`{name}`: {message}") };
        let block = ty.block_len() as usize;
        // Kernels read 8 values at a time; quantised blocks are multiples of 8 already.
        let unit = block.max(8);
        if k == 0 || n == 0 || matrices == 0 || !k.is_multiple_of(unit) {
            return Err(shape(format!("k = {k}, n = {n}: k must be a positive multiple of {unit} for {ty}")));
        }
        let row_bytes = (k / block) as u64 * ty.block_bytes();
        let want = row_bytes.checked_mul(n as u64).ok_or_else(|| shape(format!("{k} x {n} overflows")))?;
        if bytes.len() as u64 != want {
            return Err(shape(format!("{k} x {n} {ty} is {want} bytes, got {}", bytes.len())));
        }
        // Kernels index a part's pieces of 8 values with u32: 2 GiB parts keep them in range.
        let max_part_bytes = max_part_bytes.min(gpu.max_binding()).min(1 << 31);
        let blocks_per_row = (k / block) as u64;
        let fits =
            |rows: usize| repack::array_sizes(ty, rows as u64 * blocks_per_row).iter().all(|&s| s <= max_part_bytes);
        // The largest array decides; the f16 arrays' rounding to a word may cost a row.
        let widest = repack::array_sizes(ty, blocks_per_row).into_iter().max().unwrap_or(1);
        // Parts of stacked matrices hold whole matrices of `n_one` rows.
        let step = if matrices > 1 { n_one } else { 1 };
        let mut rows_per_part = usize::try_from(max_part_bytes / widest).unwrap_or(usize::MAX).min(n);
        rows_per_part -= rows_per_part % step;
        while rows_per_part > 0 && !fits(rows_per_part) {
            rows_per_part -= step;
        }
        if rows_per_part == 0 {
            let what = if matrices > 1 { format!("one expert of {n_one} rows") } else { "one row".into() };
            return Err(shape(format!("{what} of {k} {ty} values exceeds a binding of {max_part_bytes} bytes")));
        }
        let mut parts = Vec::with_capacity(n.div_ceil(rows_per_part));
        for row0 in (0..n).step_by(rows_per_part) {
            let rows = rows_per_part.min(n - row0);
            let src = &bytes[row0 * row_bytes as usize..(row0 + rows) * row_bytes as usize];
            let mut arrays: Vec<Vec<u8>> = repack::array_sizes(ty, rows as u64 * blocks_per_row)
                .into_iter()
                .map(|s| vec![0u8; s as usize])
                .collect();
            repack::repack(ty, src, &mut arrays);
            let buffers = arrays.iter().map(|a| gpu.storage_init(name, a)).collect();
            parts.push(MatrixPart { row0, rows, buffers });
        }
        tracing::debug!(name, %ty, k, n, parts = parts.len(), "uploaded weights");
        Ok(QuantMatrix { name: name.to_owned(), ty, k, n, format, matrices, parts })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    /// Values per row.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Rows (of all its stacked matrices).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Matrices stacked end to end (experts); 1 for a plain matrix.
    pub fn matrices(&self) -> usize {
        self.matrices
    }

    /// Rows of one of its stacked matrices.
    pub fn rows_per_matrix(&self) -> usize {
        self.n / self.matrices
    }

    /// Bytes held on the GPU.
    pub fn bytes(&self) -> u64 {
        self.parts.iter().flat_map(|p| &p.buffers).map(|b| b.size()).sum()
    }

    pub fn parts(&self) -> &[MatrixPart] {
        &self.parts
    }

    /// The weight-format prelude (`q_*.wgsl`) that kernels reading this matrix need.
    pub fn format(&self) -> Kernel {
        self.format
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use half::{bf16, f16};

    use super::*;
    use crate::testing::{Rng, gpu};

    pub(crate) const TYPES: [GgmlType; 8] = GgmlType::SUPPORTED;

    /// A random f16 scale with |d| in [1e-3, 2e-2].
    fn scale(rng: &mut Rng) -> [u8; 2] {
        let d = 1e-3 + (rng.f32() * 0.5 + 0.5) * 19e-3;
        let d = if rng.below(2) == 0 { d } else { -d };
        f16::from_f32(d).to_le_bytes()
    }

    /// Valid random GGUF bytes of a `[k, n]` matrix: random quants, sane scales.
    pub(crate) fn random_weights(rng: &mut Rng, ty: GgmlType, k: usize, n: usize) -> Vec<u8> {
        let values = k * n;
        match ty {
            GgmlType::F32 => rng.vec(values, 1.0).iter().flat_map(|v| v.to_le_bytes()).collect(),
            GgmlType::F16 => rng.vec(values, 1.0).iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect(),
            GgmlType::BF16 => rng.vec(values, 1.0).iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect(),
            _ => {
                let bb = ty.block_bytes() as usize;
                let mut bytes = rng.bytes(values / ty.block_len() as usize * bb);
                // Offsets of the f16 scales in each block.
                let scales: &[usize] = match ty {
                    GgmlType::Q8_0 | GgmlType::Q4_0 => &[0],
                    GgmlType::Q4_1 | GgmlType::Q4_K => &[0, 2],
                    GgmlType::Q6_K => &[208],
                    _ => unreachable!("{ty}"),
                };
                for block in bytes.chunks_exact_mut(bb) {
                    for &o in scales {
                        block[o..o + 2].copy_from_slice(&scale(rng));
                    }
                }
                bytes
            }
        }
    }

    #[test]
    fn upload_keeps_gguf_size_and_splits_by_rows() {
        let (gpu, _) = gpu();
        let mut rng = Rng::new(1);
        for ty in TYPES {
            let (k, n) = (512, 40);
            let bytes = random_weights(&mut rng, ty, k, n);
            let m = QuantMatrix::upload(gpu, "w", ty, k, n, &bytes).unwrap();
            assert_eq!((m.k(), m.n(), m.ty(), m.parts().len()), (k, n, ty, 1));
            // Repacked, not dequantised: the GGUF size up to word padding per array.
            assert!(m.bytes() >= bytes.len() as u64 && m.bytes() <= bytes.len() as u64 + 8, "{ty}: {}", m.bytes());
            let split = QuantMatrix::upload_with_max_part(gpu, "w", ty, k, n, &bytes, bytes.len() as u64 / 3).unwrap();
            assert!(split.parts().len() >= 3, "{ty}: {} parts", split.parts().len());
            let rows: Vec<(usize, usize)> = split.parts().iter().map(|p| (p.row0, p.rows)).collect();
            assert_eq!(rows.iter().map(|r| r.1).sum::<usize>(), n);
            assert!(rows.windows(2).all(|w| w[0].0 + w[0].1 == w[1].0));
            for b in split.parts().iter().flat_map(|p| &p.buffers) {
                assert!(b.size() <= bytes.len() as u64 / 3);
            }
        }
    }

    #[test]
    fn upload_rejects_bad_shapes_and_types() {
        let (gpu, _) = gpu();
        let q8 = GgmlType::Q8_0;
        let err = QuantMatrix::upload(gpu, "w", q8, 64, 2, &[0; 67]).unwrap_err();
        assert!(matches!(err, Error::Shape { .. }), "{err}");
        let err = QuantMatrix::upload(gpu, "w", q8, 48, 2, &[0; 102]).unwrap_err();
        assert!(matches!(err, Error::Shape { .. }) && err.to_string().contains("multiple of 32"), "{err}");
        let err = QuantMatrix::upload(gpu, "w", GgmlType::Q4_K, 128, 1, &[0; 72]).unwrap_err();
        assert!(matches!(err, Error::Shape { .. }), "{err}");
        let err = QuantMatrix::upload(gpu, "w", GgmlType::F16, 12, 1, &[0; 24]).unwrap_err();
        assert!(matches!(err, Error::Shape { .. }) && err.to_string().contains("multiple of 8"), "{err}");
        let q5 = GgmlType::from_id(6).unwrap();
        let err = QuantMatrix::upload(gpu, "blk.0.ffn_up.weight", q5, 32, 1, &[0; 22]).unwrap_err();
        assert!(matches!(err, Error::UnsupportedTensor { .. }) && err.to_string().contains("Q5_0"), "{err}");
        let err = QuantMatrix::upload_with_max_part(gpu, "w", q8, 64, 2, &[0; 136], 32).unwrap_err();
        assert!(err.to_string().contains("exceeds a binding"), "{err}");
    }
}
