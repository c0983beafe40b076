//! Command-line interface. Every flag here is documented in `--help` and the README.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "strata", version, about = "Run large language models across the GPUs of a LAN (one machine works too).")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate text from a prompt, streaming it to stdout.
    Run(RunArgs),
    /// Measure prefill and decode speed, and weight-read bandwidth against the GPU's own.
    Bench(BenchArgs),
    /// Write a copy of a GGUF model with its matrices quantised (llama.cpp's rule, bit for bit).
    Quantize(QuantizeArgs),
    /// Show how a model's layers would be split over nodes of given memory sizes.
    Plan(PlanArgs),
    /// Write an all-zero GGUF with a real model's exact shape (sparse: no disk used), for planning.
    Synthesize(SynthesizeArgs),
}

/// Where the model runs.
#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// Path to a GGUF model (llama, qwen3 or qwen35 architecture).
    #[arg(long, short)]
    pub model: PathBuf,
    /// Context length: tokens of KV cache per sequence (default: the model's, at most 4096).
    #[arg(long, value_parser = clap::value_parser!(u32).range(16..=1_048_576))]
    pub ctx: Option<u32>,
    /// GPU adapter to use: a case-insensitive substring of its name (default: the best one;
    /// also `WGPU_ADAPTER_NAME`).
    #[arg(long)]
    pub adapter: Option<String>,
    /// Tokens per prefill chunk.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub batch: u32,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// The prompt. Special tokens written in it (e.g. `<|im_start|>`) are recognised.
    #[arg(long, short)]
    pub prompt: String,
    /// Wrap the prompt as a user message in the model's chat template first.
    #[arg(long)]
    pub chat: bool,
    /// Stop after this many generated tokens.
    #[arg(long, short = 'n', default_value_t = 128, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub max_tokens: u32,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, short, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Keep only the K most likely tokens (0: no limit beyond the 64 candidates considered).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Nucleus sampling: keep the most likely tokens whose probabilities add up to P.
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Drop tokens less likely than P times the most likely one.
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// Penalise tokens seen in the last 64 (1.0: off).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Random seed for sampling: the same seed gives the same text.
    #[arg(long, short, default_value_t = 0)]
    pub seed: u64,
    /// Keep generating past end-of-generation tokens (for benchmarks and tests).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print one JSON object (prompt_ids, generated_ids, text, timings) instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Prompt tokens to prefill.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub prompt_tokens: u32,
    /// Tokens to decode.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub decode_tokens: u32,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// Input GGUF (any supported tensor types).
    pub input: PathBuf,
    /// Output GGUF.
    pub output: PathBuf,
    /// Target type (supported: q8_0).
    #[arg(long, default_value = "q8_0")]
    pub r#type: String,
}

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// Path to a GGUF model (only its header and tensor index are read).
    #[arg(long, short)]
    pub model: PathBuf,
    /// Context length: tokens of KV cache per sequence.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(16..=1_048_576))]
    pub ctx: u32,
    /// A node as NAME=SIZE (e.g. `desk=16GiB`, `mac=12GiB`), in pipeline order; repeatable.
    #[arg(long = "node", required = true)]
    pub nodes: Vec<String>,
    /// Layers per node, e.g. `10,12,8`, instead of the memory-proportional split.
    #[arg(long)]
    pub split: Option<String>,
    /// Sequences whose caches every node holds at once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub seqs: u32,
}

#[derive(Args, Debug)]
pub struct SynthesizeArgs {
    /// The shape to write (supported: qwen36-27b).
    #[arg(long, default_value = "qwen36-27b")]
    pub shape: String,
    /// Output GGUF path.
    pub output: PathBuf,
}
