//! The Strata worker: runs a contiguous range of a model's layers on one GPU.
//!
//! Architecture invariant: everything that touches wgpu lives here (and WGSL in
//! `strata-shaders`); the node never speaks HTTP.

pub mod error;
pub mod gpu;
pub mod ops;
#[cfg(test)]
mod testing;
pub mod weights;

pub use error::{Error, Result};
pub use wgpu;
