//! The gRPC contract of Strata (generated from `proto/strata.proto`).
//!
//! Architecture invariant: the only crate that knows prost/tonic message types; other
//! crates convert to and from their own domain types by hand.

/// Bumped on any incompatible change of the contract (3: nodes check the version a
/// `LoadShard` carries, step errors carry a `StepErrorCode`; 4: a step carries the rows of
/// several sequences and answers for each, shards hold a paged KV pool).
pub const PROTOCOL_VERSION: u32 = 8;

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
pub mod security;
pub mod transport;

/// Re-exported so that users of the contract name one version of each.
pub use {tokio_stream, tonic};

#[cfg(test)]
mod fuzz {
    //! Property-based fuzzing of the wire: every message type decoded from arbitrary bytes
    //! (an error or a message, never a panic), and what decodes re-encodes to bytes that
    //! decode to the same message. What a node then does with a well-formed but hostile
    //! message is fuzzed against a real node in the integration tests.

    use proptest::prelude::*;
    use prost::Message;

    use crate::v1 as pb;

    fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(bytes: &[u8]) {
        if let Ok(m) = M::decode(bytes) {
            let again = M::decode(m.encode_to_vec().as_slice()).expect("a re-encoded message decodes");
            assert_eq!(again, m);
        }
    }

    proptest! {
            #[test]
        fn every_message_decodes_or_is_refused(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            round_trip::<pb::NodeInfo>(&bytes);
            round_trip::<pb::InfoRequest>(&bytes);
            round_trip::<pb::LoadShardRequest>(&bytes);
            round_trip::<pb::LoadShardResponse>(&bytes);
            round_trip::<pb::TensorRange>(&bytes);
            round_trip::<pb::TensorChunk>(&bytes);
            round_trip::<pb::TransferAck>(&bytes);
            round_trip::<pb::Sampling>(&bytes);
            round_trip::<pb::SeqRows>(&bytes);
            round_trip::<pb::Activation>(&bytes);
            round_trip::<pb::SeqResult>(&bytes);
            round_trip::<pb::StepResult>(&bytes);
            round_trip::<pb::ReleaseRequest>(&bytes);
            round_trip::<pb::ReleaseResponse>(&bytes);
            round_trip::<pb::HealthRequest>(&bytes);
            round_trip::<pb::HealthResponse>(&bytes);
        }

        /// A valid activation with bytes flipped, cut or appended.
        #[test]
        fn damaged_activations_decode_or_are_refused(
            seqs in prop::collection::vec((any::<u64>(), any::<u32>(), 0u32..16, prop::collection::vec(any::<u32>(), 0..8)), 0..4),
            hidden in prop::collection::vec(any::<u8>(), 0..64),
            flips in prop::collection::vec((any::<usize>(), any::<u8>()), 0..6),
            cut in any::<usize>(),
        ) {
            let act = pb::Activation {
                step: 1,
                seqs: seqs.into_iter().map(|(seq_id, pos, rows, token_ids)| pb::SeqRows { seq_id, pos, rows, token_ids, ..Default::default() }).collect(),
                hidden,
                format: 0,
                failed: Vec::new(),
            };
            let mut bytes = act.encode_to_vec();
            if !bytes.is_empty() {
                for (at, b) in flips {
                    let i = at % bytes.len();
                    bytes[i] ^= b;
                }
                bytes.truncate(cut % (bytes.len() + 1));
            }
            round_trip::<pb::Activation>(&bytes);
        }
    }
}
