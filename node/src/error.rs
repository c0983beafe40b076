//! The node crate's one error type.
//!
//! Variants are what a caller can act on: a step that cannot run as sent is not a GPU
//! fault, and a transfer that breaks the protocol is not a full disk. [`Error::kind`]
//! sorts them into the few classes the wire carries with a step error.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] strata_model::Error),
    #[error("no GPU adapter found{0}")]
    NoAdapter(String),
    #[error("cannot open the GPU device: {0}")]
    Device(String),
    #[error("GPU error in {context}: {message}")]
    Gpu { context: String, message: String },
    #[error("kernel `{kernel}`: {message}")]
    Kernel { kernel: String, message: String },
    #[error("shape mismatch in {op}: {message}")]
    Shape { op: &'static str, message: String },
    #[error("tensor `{name}` of type {ty} is not supported on the GPU")]
    UnsupportedTensor { name: String, ty: String },
    /// What a stage was asked to hold cannot be held: a layer range outside the model, a
    /// context or batch of zero or beyond the adapter's limits.
    #[error("{0}")]
    Spec(String),
    /// A step that cannot run as sent: no tokens or too many, a position past the
    /// context, token ids for a stage that is not first, hidden states of the wrong size.
    #[error("{0}")]
    Step(String),
    /// A step out of order for a sequence whose recurrent state only moves forward.
    #[error("sequence {seq}: {message}")]
    Sequence { seq: u64, message: String },
    /// The stage has no room for it now: its KV pool or its sequence slots are all taken.
    /// Sending it again may work once other sequences are released.
    #[error("{0}")]
    Exhausted(String),
    /// Asked of a stage that does not hold the part needed (the output head, say).
    #[error("{0}")]
    NotOnStage(String),
    /// A streamed shard that breaks the transfer protocol (bad id, chunk out of range).
    #[error("{0}")]
    Transfer(String),
    /// Bytes that fail their checksum (a streamed chunk).
    #[error("{0}")]
    Corrupt(String),
    /// Advertising the node over mDNS failed.
    #[error("mDNS: {0}")]
    Mdns(String),
    /// A setting out of range: a node name, a memory size.
    #[error("{0}")]
    Setting(String),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
}

/// The class of an error, as a step error on the wire carries it next to its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request was wrong (a bad step, spec, shape or setting): sending it again fails again.
    InvalidArgument,
    /// The step came out of order for its sequence.
    OutOfOrder,
    /// The stage does not hold what was asked of it (no shard, no head).
    NotOnStage,
    /// Transferred bytes failed their checksum.
    DataLoss,
    /// No room now (KV blocks, sequence slots): may succeed later.
    Exhausted,
    /// The device or the host failed.
    Internal,
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Spec(_)
            | Error::Step(_)
            | Error::Shape { .. }
            | Error::Setting(_)
            | Error::Transfer(_)
            | Error::UnsupportedTensor { .. } => ErrorKind::InvalidArgument,
            Error::Model(_) => ErrorKind::InvalidArgument,
            Error::Sequence { .. } => ErrorKind::OutOfOrder,
            Error::NotOnStage(_) => ErrorKind::NotOnStage,
            Error::Corrupt(_) => ErrorKind::DataLoss,
            Error::Exhausted(_) => ErrorKind::Exhausted,
            Error::NoAdapter(_)
            | Error::Device(_)
            | Error::Gpu { .. }
            | Error::Kernel { .. }
            | Error::Mdns(_)
            | Error::Io { .. } => ErrorKind::Internal,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
