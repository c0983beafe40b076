//! Op constructors: each checks shapes and returns the dispatches that compute it.
//!
//! Activations are f32, row-major `[n_tokens, width]`. Every op binds the step
//! uniform ([`crate::gpu::Step`]) at binding 0 when its work depends on the token count.
