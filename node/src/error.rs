//! The node crate's one error type.

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
    #[error("{0}")]
    Invalid(String),
    /// Bytes that fail their checksum (a streamed chunk).
    #[error("{0}")]
    Corrupt(String),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
}

pub type Result<T> = std::result::Result<T, Error>;
