//! The gRPC contract of Strata (generated from `proto/strata.proto`).
//!
//! Architecture invariant: the only crate that knows prost/tonic message types; other
//! crates convert to and from their own domain types by hand.

/// Bumped on any incompatible change of the contract (3: nodes check the version a
/// `LoadShard` carries, step errors carry a `StepErrorCode`; 4: a step carries the rows of
/// several sequences and answers for each, shards hold a paged KV pool).
pub const PROTOCOL_VERSION: u32 = 4;

/// The request metadata entry holding the caller's [`PROTOCOL_VERSION`]. A node refuses a
/// `LoadShard` whose entry differs (or is missing: a coordinator older than version 3).
pub const VERSION_METADATA: &str = "strata-protocol-version";

/// `message` as a request carrying this build's [`PROTOCOL_VERSION`].
pub fn versioned<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(VERSION_METADATA, PROTOCOL_VERSION.into());
    request
}

/// The protocol version a request carries; `None` if it carries none.
pub fn request_version<T>(request: &tonic::Request<T>) -> Option<u32> {
    request.metadata().get(VERSION_METADATA)?.to_str().ok()?.parse().ok()
}

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("strata.v1");
}

pub mod checksum;
pub mod transport;

/// Re-exported so that users of the contract name one version of each.
pub use {tokio_stream, tonic};
