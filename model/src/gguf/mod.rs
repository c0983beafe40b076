//! GGUF v2/v3: a header, typed metadata, a tensor index, then aligned tensor data.
//!
//! The reader memory-maps the file and validates every count, length and offset
//! against the file's size before allocating, so a hostile file gets an error, never a
//! giant allocation or a panic. The writer produces files the reader (and llama.cpp) read.

mod read;
mod value;
mod write;

#[cfg(test)]
mod tests;

pub use read::{Gguf, HeaderIndex, TensorInfo};
pub use value::{Value, ValueType};
pub use write::{GgufWriter, TensorData};

/// `GGUF` read as a little-endian u32.
pub const MAGIC: u32 = 0x4655_4747;
/// Tensor data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Largest `general.alignment` accepted: real files use 32; more is a corrupt value.
pub const MAX_ALIGNMENT: u64 = 1 << 20;
/// ggml supports at most four dimensions.
pub const MAX_DIMS: u32 = 4;
/// Arrays nest at most this deep (real files use one level); bounds the reader's recursion.
pub const MAX_NESTING: u32 = 8;
/// ggml's `GGML_MAX_NAME`: llama.cpp refuses tensor names of this many bytes or more.
pub const MAX_TENSOR_NAME: usize = 64;
