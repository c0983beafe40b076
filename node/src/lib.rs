//! The Strata worker: runs a contiguous range of a model's layers on one GPU.
//!
//! Architecture invariant: everything that touches wgpu lives here (and WGSL in
//! `strata-shaders`); the node never speaks HTTP.

pub mod bench;
pub mod error;
pub mod gpu;
pub mod layers;
pub mod advertise;
pub mod memory;
pub mod scratch;
pub mod service;
pub mod shard_cache;
pub mod stage;
pub mod ops;
#[cfg(test)]
mod testing;
pub mod weights;

pub use error::{Error, Result};
pub use wgpu;
pub mod kv_cache;
pub mod deltanet_state;
