//! Kernels on activations: norms, RoPE, attention, element-wise ops, sampling.

crate::registry::kernels! { OPS: }
