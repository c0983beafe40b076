//! The model crate's one error type.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The file is not a well-formed GGUF; `offset` is where reading stopped.
    #[error("malformed GGUF at byte {offset}: {reason}")]
    Malformed { offset: u64, reason: String },
    #[error("GGUF metadata key `{0}` is missing")]
    MissingKey(String),
    #[error("GGUF metadata key `{key}` has type {found}, expected {expected}")]
    KeyType { key: String, expected: &'static str, found: &'static str },
    #[error("tensor `{0}` is missing")]
    MissingTensor(String),
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    TensorShape { name: String, expected: Vec<u64>, found: Vec<u64> },
    #[error("unsupported tensor type {0}")]
    UnsupportedType(String),
    #[error("unsupported architecture `{0}` (supported: llama, qwen3, qwen35)")]
    UnsupportedArch(String),
    #[error("invalid model config: {0}")]
    Config(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    /// A grammar (a JSON schema, a Lark grammar) that does not compile, or a token it
    /// does not allow.
    #[error("grammar: {0}")]
    Grammar(String),
    /// A sampling parameter out of range; `param` is its name (`top_p`), as the API spells it.
    #[error("sampling: {message}")]
    Sampling { param: &'static str, message: String },
    /// Nothing to sample from (every candidate masked).
    #[error("sampling: no candidates")]
    NoCandidates,
    #[error(transparent)]
    Plan(#[from] crate::plan::PlanError),
}

pub type Result<T> = std::result::Result<T, Error>;
