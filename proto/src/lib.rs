//! The gRPC contract of Strata (generated from `proto/strata.proto`).
//!
//! Architecture invariant: the only crate that knows prost/tonic message types; other
//! crates convert to and from their own domain types by hand.

/// Bumped on any incompatible change of the contract.
pub const PROTOCOL_VERSION: u32 = 2;

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("strata.v1");
}

pub mod checksum;
pub mod transport;

/// Re-exported so that users of the contract name one version of each.
pub use {tokio_stream, tonic};
