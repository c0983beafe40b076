//! Every WGSL kernel of Strata, and the one way to specialise them.
//!
//! Kernels are plain `.wgsl` files (valid WGSL with default constants, so editors and
//! naga can check them as they are). [`Kernel::source`] returns a kernel with
//! some of its `const` declarations replaced, e.g. a workgroup size or a weight format
//! snippet prepended. No other crate holds WGSL.

pub mod deltanet;
pub mod matmul;
pub mod ops;
mod registry;
mod specialise;

pub use registry::{Kernel, all};
pub use specialise::{specialise, SpecialiseError};
