//! Tensor types and their CPU (de)quantisation.
//!
//! These functions are the ground truth that the WGSL kernels are tested against.

mod dequant;
mod q8_0;
mod types;

#[cfg(test)]
pub(crate) mod tests;

pub use dequant::{dequantize, dequantize_into};
pub use q8_0::quantize_q8_0;
pub use types::GgmlType;
