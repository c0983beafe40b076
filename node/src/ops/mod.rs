//! Ops: each is a method of [`Recorder`] that checks shapes and records the dispatches
//! that compute it, once, at load time.
//!
//! Activations are f32 (ids and positions u32), row-major `[n_tokens, width]`, passed as
//! [`Act`] views. Every op binds the step uniform ([`crate::gpu::Step`]) at binding 0 and
//! its own parameters at binding 1.
pub mod attention;
pub mod deltanet;
pub mod elementwise;
pub mod embed;
#[cfg(test)]
mod harness;
pub mod matmul;
pub mod moe;
pub mod mtp;
pub mod norm;
#[cfg(test)]
mod params_layout;
pub mod recorder;
pub mod rope;
pub mod sample;

pub use recorder::{Act, Recorder};
