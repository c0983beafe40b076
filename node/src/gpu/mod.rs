//! The GPU side of a node: device, buffers, kernels and the recording of dispatches.
//!
//! Work is described before it is done: an op constructor checks shapes and returns a
//! [`Dispatch`] (pipeline, bind group, workgroup counts). A forward pass is a list of
//! dispatches built once at load time and encoded into one compute pass per step.

mod context;
mod dispatch;
mod kernels;
mod step;

pub use context::{DeviceInfo, Gpu, GpuConfig, parse_on_off};
pub use dispatch::{Dim, Dispatch, Workgroups, encode_dispatches, encode_pass};
pub use kernels::KernelCache;
pub use step::Step;

#[cfg(test)]
mod tests;
