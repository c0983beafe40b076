//! Op constructors: each checks shapes and returns the dispatches that compute it.
//!
//! Activations are f32, row-major `[n_tokens, width]`. Every op binds the step
//! uniform ([`crate::gpu::Step`]) at binding 0 when its work depends on the token count.
pub mod matmul;
pub mod embed;
pub mod norm;
pub mod rope;
pub mod attention;
pub mod elementwise;
pub mod sample;
pub mod deltanet;
#[cfg(test)]
mod harness;
