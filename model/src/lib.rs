//! Model files and model maths, independent of any GPU or network.
//!
//! - [`gguf`]: reading (memory-mapped) and writing GGUF v2/v3 files.
//! - [`quant`]: tensor types, CPU dequantisation and Q8_0 quantisation.
//! - [`config`]: architecture configs (`llama`, `qwen3`, `qwen35`) read from GGUF metadata.
//! - [`arch`]: one file per architecture: its metadata and its tensor schema, the one place
//!   tensor names and shapes are written.
//! - [`tokenizer`], [`chat`]: text to token ids and back; chat templates.
//! - [`sampling`]: turning logits into a token id, seeded and reproducible.
//! - [`grammar`]: JSON schemas and Lark grammars as a mask of the tokens allowed next.
//! - [`reference`](mod@reference): a plain CPU forward pass, the oracle for every GPU kernel.
//! - [`plan`]: which layers each node holds, from the tensor index and memory budgets.
//! - [`synthetic`]: all-zero GGUFs of real models' exact shapes (sparse files), for planning
//!   and loading tests without the weights.

pub mod error;
pub mod gguf;
pub mod quant;
pub mod quantize;

pub use error::{Error, Result};
pub mod arch;
pub mod chat;
pub mod config;
pub mod grammar;
pub mod plan;
pub mod reference;
pub mod sampling;
pub mod synthetic;
pub mod tokenizer;

#[cfg(test)]
mod fuzz;
