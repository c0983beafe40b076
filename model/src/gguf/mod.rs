//! GGUF v2/v3: a header, typed metadata, a tensor index, then aligned tensor data.
//!
//! The reader memory-maps the file and validates every count, length and offset
//! against the file's size before allocating, so a hostile file gets an error, never a
//! giant allocation or a panic. The writer produces files the reader (and llama.cpp) read.

mod read;
mod value;
mod write;

pub use read::{Gguf, TensorInfo};
pub use value::{Value, ValueType};
pub use write::{GgufWriter, TensorData};

/// `GGUF` read as a little-endian u32.
pub const MAGIC: u32 = 0x4655_4747;
/// Tensor data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml supports at most four dimensions.
pub const MAX_DIMS: u32 = 4;
