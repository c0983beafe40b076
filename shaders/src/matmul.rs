//! Kernels that read quantised weights: matrix-vector, matrix-matrix, embedding rows.

crate::registry::kernels! { MATMUL: }
