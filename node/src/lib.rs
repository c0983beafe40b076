//! The Strata worker: runs a contiguous range of a model's layers on one GPU.
//!
//! Architecture invariant: everything that touches wgpu lives here (and WGSL in
//! `strata-shaders`); the node never speaks HTTP.

pub mod advertise;
pub mod arch;
pub mod batch;
pub mod bench;
pub mod deltanet_state;
pub mod error;
pub mod gpu;
pub mod kv_pool;
pub mod layers;
pub mod memory;
pub mod ops;
pub mod scratch;
pub mod service;
pub mod shard_cache;
pub mod stage;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;
pub mod weights;

pub use error::{Error, ErrorKind, Result};
pub use wgpu;
