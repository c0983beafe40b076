//! Every WGSL kernel of Strata, how their sources are put together, and the one way to
//! specialise them. No other crate holds WGSL.
//!
//! Kernels are `.wgsl` files under `wgsl/`, embedded at compile time. What several
//! kernels share (the step uniform, a params struct, the body of the matrix-vector
//! kernels, a workgroup reduction) lives once under `wgsl/common/` and is pulled in by a
//! line
//!
//! ```text
//! //#include "common/step.wgsl"
//! ```
//!
//! at column 0: a WGSL comment, so tools leave it alone ([`include`] has the rules). A
//! kernel source is assembled by [`Kernel::assemble`]: its preludes (a weight format,
//! `q_*.wgsl`, which defines `load8` for `mm_rows`, `mm_tile` and `embed`; for `mm_rows`
//! and `mm_tile` also an x prelude, `x_*.wgsl`, which binds their input rows), then the
//! kernel, includes resolved (each piece once), then [`specialise`] replaces the values
//! of chosen top-level `const`s, wherever they were declared.
//!
//! So a file is not always valid WGSL as it stands: one with includes is valid once
//! they are resolved ([`Kernel::source`]), and the kernels of
//! [`matmul::WEIGHT_READERS`] only with a format prelude in front (and those of
//! [`matmul::X_READERS`] with an x prelude too). Preludes and the
//! other kernels are complete alone. The crate's tests parse and validate every kernel
//! (with each prelude where it needs one) with naga.

pub mod deltanet;
pub mod include;
pub mod matmul;
pub mod ops;
mod registry;
mod specialise;

pub use include::IncludeError;
pub use registry::{AssembleError, Kernel, all};
pub use specialise::{SpecialiseError, specialise};

#[cfg(test)]
mod tests;
