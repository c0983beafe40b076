//! Command-line interface. Every flag here is documented in `--help` and the README.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "strata",
    version,
    about = "Run large language models across the GPUs of a LAN (one machine works too)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate text from a prompt (or several at once, batched), streaming it to stdout.
    Run(RunArgs),
    /// Serve the model over an OpenAI-compatible HTTP API, with a web chat page at `/`.
    Serve(ServeArgs),
    /// Chat with the model in the terminal.
    Chat(ChatArgs),
    /// Measure prefill and decode speed, and weight-read bandwidth against the GPU's own.
    Bench(BenchArgs),
    /// Write a copy of a GGUF model with its matrices quantised (llama.cpp's rule, bit for bit).
    Quantize(QuantizeArgs),
    /// Show how a model's layers would be split over nodes of given memory sizes.
    Plan(PlanArgs),
    /// Write an all-zero GGUF with a real model's exact shape (sparse: no disk used), for planning.
    Synthesize(SynthesizeArgs),
    /// List the nodes on this LAN (found over mDNS) and static peers, with their memory and latency.
    Nodes(NodesArgs),
    /// Serve this machine's GPU as a pipeline stage (a worker for `run`/`bench --peer`).
    Node(NodeArgs),
    /// Create this cluster's secret key (or store a given one) in the user's config directory.
    Init(InitArgs),
    /// Measure the latency of handing one hidden state to another process (hidden).
    #[command(hide = true)]
    BenchHop(BenchHopArgs),
}

/// `--batch-tokens` unless given: see the README for the measurement behind it.
pub const DEFAULT_BATCH_TOKENS: u32 = 64;

/// How a chat answer's reasoning is returned (`--reasoning-format`, or per request
/// `reasoning_format`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReasoningFormat {
    /// `<think>…</think>` as `reasoning_content` (streamed as `delta.reasoning_content`),
    /// the content without it.
    #[default]
    Deepseek,
    /// The raw text, tags and all, as `content`.
    None,
}

/// How hidden states cross the wire between stages.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Wire {
    #[default]
    F32,
    F16,
}

/// Speculative decoding's drafts.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SpeculativeMode {
    /// One token per step and sequence.
    #[default]
    Off,
    /// Prompt lookup: the tokens that followed the sequence's latest tokens where they
    /// occurred before in its prompt or output, at the place that agrees longest (no
    /// weights; large gains when text or code is quoted, edited or repeated).
    Lookup,
    /// The model's own multi-token-prediction block (qwen35 and qwen35moe models that carry
    /// one, e.g. Qwen3.6): the last stage drafts with it inside each step, no extra trip.
    Mtp,
    /// The best draft the model allows: its MTP block where it has one, else prompt
    /// lookup.
    Auto,
}

/// Where the model runs.
#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// Path to a GGUF model (llama, qwen3, qwen35 or qwen35moe architecture).
    #[arg(long, short)]
    pub model: PathBuf,
    /// Context length: tokens of KV cache per sequence (default: the model's own, or the
    /// most the memory holds for one sequence, with the KV pool sized by that memory).
    /// Past the model's own it runs, with a warning.
    #[arg(long, value_parser = clap::value_parser!(u32).range(16..=1_048_576))]
    pub ctx: Option<u32>,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Rows one step carries, all sequences together: every decode row of the step's
    /// sequences, then prefill chunks up to this budget (so a long prompt never stalls the
    /// others' streams). Larger speeds up prefill, smaller keeps decode steps short.
    #[arg(long = "batch-tokens", alias = "batch", value_name = "N", default_value_t = DEFAULT_BATCH_TOKENS,
        value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub batch: u32,
    /// Steps kept in flight over a pipeline, each with its own sequences, so that while one
    /// stage runs one step the next runs another (default: one per distinct device among the
    /// stages; nodes sharing one machine's CPU or GPU cannot overlap, so they count once).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub micro_batches: Option<u32>,
    /// Positions of KV cache all sequences share, on every stage (blocks of 16; default:
    /// enough for every sequence's whole context, or what the nodes' memory leaves).
    #[arg(long, value_name = "TOKENS", value_parser = clap::value_parser!(u32).range(16..))]
    pub kv_pool: Option<u32>,
    /// A `strata node` to run layers on, as HOST:PORT (repeatable; in pipeline order,
    /// after this machine's own in-process stage).
    #[arg(long = "peer", value_name = "HOST:PORT")]
    pub peers: Vec<String>,
    /// Run no layers on this machine: only the peers hold the model.
    #[arg(long)]
    pub no_local: bool,
    /// Layers per stage, in pipeline order, e.g. `10,12,8` (default: by each node's memory).
    #[arg(long)]
    pub split: Option<String>,
    /// Encoding of hidden states between stages.
    #[arg(long, value_enum, default_value_t = Wire::F32)]
    pub wire: Wire,
    /// Find `strata node`s on the LAN over mDNS and run layers on them too (after this
    /// machine's own stage and any `--peer`, in name order).
    #[arg(long)]
    pub discover: bool,
    /// With `--discover`: stop looking as soon as this many nodes are found, and fail if
    /// fewer turn up within `--discover-timeout`.
    #[arg(long, value_name = "N", requires = "discover", value_parser = clap::value_parser!(u32).range(1..=256))]
    pub expect_nodes: Option<u32>,
    /// With `--discover`: seconds to look for nodes (mDNS has no "that is everyone" signal).
    #[arg(long, value_name = "SECS", default_value_t = 3.0, value_parser = parse_seconds)]
    pub discover_timeout: f64,
    /// Speculative decoding: each decode step also carries draft tokens, which the last
    /// stage checks in the same step; every draft up to the first the model would not
    /// have produced is kept, so the output is exactly what `off` gives (greedy or
    /// sampled), in fewer trips through the pipeline. Requests with penalties, logprobs
    /// or a grammar decode one token per step.
    #[arg(long, value_enum, default_value_t = SpeculativeMode::Off)]
    pub speculative: SpeculativeMode,
    /// With `--speculative`: draft tokens per step and sequence, at most (each sequence
    /// adapts its own count to how many it gets accepted).
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub draft_max: u32,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// The cluster secret: nodes and coordinators holding the same one talk over mutual TLS
/// and take no one else; `--discover` takes only nodes of this cluster.
#[derive(Args, Debug, Clone, Default)]
pub struct ClusterArgs {
    /// The cluster's secret key (default: the file `strata init` wrote, if there is one).
    #[arg(
        long,
        env = "STRATA_CLUSTER_KEY",
        hide_env_values = true,
        value_name = "KEY",
        conflicts_with = "cluster_key_file"
    )]
    pub cluster_key: Option<String>,
    /// Read the cluster's secret key from this file.
    #[arg(long, value_name = "PATH")]
    pub cluster_key_file: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// Store this key (made by `strata init` on another machine) instead of making one.
    #[arg(long, value_name = "KEY")]
    pub key: Option<String>,
    /// Replace an existing key file (nodes and coordinators holding the old key can no
    /// longer talk to this machine).
    #[arg(long)]
    pub force: bool,
    /// Where to write the key (default: `$XDG_CONFIG_HOME/strata/cluster.key`, else
    /// `~/.config/strata/cluster.key`).
    #[arg(long, value_name = "PATH")]
    pub key_file: Option<PathBuf>,
}

/// Which GPU runs the model's layers here, and which optional kernels it uses: the same
/// flags for `run`, `serve`, `chat`, `bench` (their local node) and `node`.
#[derive(Args, Debug, Clone, Default)]
pub struct DeviceArgs {
    /// GPU adapter to use: a case-insensitive substring of its name (default: the best one;
    /// also `WGPU_ADAPTER_NAME`).
    #[arg(long)]
    pub adapter: Option<String>,
    /// Q8_0 matrix products through 4x8-bit integer dot products (`dot4I8Packed`; x
    /// quantised per block of 32 values to two bytes a value), `on` or `off` (default:
    /// `STRATA_INT8_DOT`, else off). Off by default: measured only on lavapipe, which
    /// lowers the instruction and runs it slower than float products.
    #[arg(long, value_name = "on|off", value_parser = parse_on_off)]
    pub int8_dot: Option<bool>,
    /// Every matrix product through cooperative matrices (tensor cores; wgpu's experimental
    /// f16 8x8 or 16x16 matrices, each value as two f16, f32 sums), `on` or `off` (default:
    /// `STRATA_COOP_MATRIX`, else off). `on` refuses to start on an adapter without them,
    /// naming what it lacks; not with `--int8-dot on`. Off by default until measured on a
    /// GPU: on lavapipe it runs far slower than the float kernels.
    #[arg(long, value_name = "on|off", value_parser = parse_on_off)]
    pub coop_matrix: Option<bool>,
}

impl DeviceArgs {
    /// The device these flags ask for.
    pub fn gpu_config(&self) -> strata_node::gpu::GpuConfig {
        strata_node::gpu::GpuConfig {
            adapter: self.adapter.clone(),
            int8_dot: self.int8_dot,
            coop_matrix: self.coop_matrix,
        }
    }
}

impl EngineArgs {
    /// Whether the model runs as a pipeline of stage services rather than in-process.
    pub fn is_pipeline(&self) -> bool {
        !self.peers.is_empty() || self.no_local || self.split.is_some() || self.discover
    }
}

/// A switch, as `strata_node::gpu::parse_on_off` reads it.
fn parse_on_off(s: &str) -> Result<bool, String> {
    strata_node::gpu::parse_on_off(s).ok_or_else(|| format!("`{s}`: expected `on` or `off`"))
}

/// A duration in seconds: finite, 0 to one hour.
fn parse_seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if !(0.0..=3600.0).contains(&v) {
        return Err(format!("{v} s is out of range (0 to 3600)"));
    }
    Ok(v)
}

#[derive(Args, Debug)]
pub struct NodeArgs {
    /// Name shown to coordinators (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Address to listen on; port 0 picks a free port. Prints `listening on ADDR` once bound.
    #[arg(long, default_value = "0.0.0.0:7470")]
    pub listen: std::net::SocketAddr,
    /// Memory this node offers for weights and caches, e.g. `12GiB` or `800MB`; `auto`
    /// probes it (CPU adapters: available system memory; Apple: 75% of unified memory; Vulkan GPUs: device-local heaps).
    #[arg(long, default_value = "auto")]
    pub memory: String,
    /// Directory holding GGUF models; a shard is loaded from the file whose identity matches.
    #[arg(long)]
    pub model_dir: Option<PathBuf>,
    /// Directory for weight shards streamed from coordinators, for models not in
    /// --model-dir (default: `$XDG_CACHE_HOME/strata`, else `~/.cache/strata`). A
    /// restarted node finds its shards here and is sent nothing again.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Free a sequence's caches after this many seconds unused.
    #[arg(long, default_value_t = 600)]
    pub idle_timeout: u64,
    /// Do not advertise this node on mDNS (coordinators then need `--peer`).
    #[arg(long)]
    pub no_mdns: bool,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Listen beyond loopback without a cluster key: anyone on the network can load models
    /// into this node, stream files into its cache and use its GPU. Warns on every start.
    #[arg(long)]
    pub insecure: bool,
    /// On SIGTERM or Ctrl-C while a pipeline runs through this node: seconds to wait for
    /// its coordinator to move the layers to the other nodes before exiting anyway (a
    /// second signal exits at once).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub leave_timeout: u64,
}

#[derive(Args, Debug)]
pub struct BenchHopArgs {
    /// A running node to measure against (default: start one as a child process).
    #[arg(long)]
    pub connect: Option<String>,
    /// Timed round trips.
    #[arg(long, default_value_t = 2000)]
    pub iterations: usize,
    /// Untimed round trips first.
    #[arg(long, default_value_t = 200)]
    pub warmup: usize,
    /// Values in the hidden state.
    #[arg(long, default_value_t = 5120)]
    pub values: usize,
    /// Encoding of the hidden state.
    #[arg(long, value_enum, default_value_t = Wire::F16)]
    pub wire: Wire,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// The prompt. Special tokens written in it (e.g. `<|im_start|>`) are recognised.
    /// Repeat it to generate for several prompts at once, batched into shared steps: each
    /// answer is the one its prompt gets alone.
    #[arg(long, short, required = true)]
    pub prompt: Vec<String>,
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
    /// Hold the answer to the JSON schema in FILE: every token is sampled from those that
    /// keep it a valid prefix of such a value (llguidance), and the answer ends when the
    /// value is whole. `{"type": "object"}` is any JSON object.
    #[arg(long, value_name = "FILE", conflicts_with = "grammar")]
    pub json_schema: Option<std::path::PathBuf>,
    /// Hold the answer to the grammar in FILE, in llguidance's Lark dialect (which embeds
    /// JSON schemas as `%json { ... }`), e.g. `start: "yes" | "no"`.
    #[arg(long, value_name = "FILE")]
    pub grammar: Option<std::path::PathBuf>,
    /// Print one JSON object (prompt_ids, generated_ids, text, timings) instead of streaming
    /// text; with several prompts, a JSON array of them.
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
    /// Run N sequences at once (each with its own prompt of --prompt-tokens, decoding
    /// --decode-tokens) through serve's continuous batching, and report aggregate and
    /// per-sequence decode tok/s, time to first token p50/p99, prefill tok/s, and each
    /// stage's busy fraction and the pipeline's bubble.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=256))]
    pub concurrency: Option<u32>,
    /// Every sequence's prompt from this file (its text, special tokens such as
    /// `<|im_start|>` recognised) instead of --prompt-tokens made-up ones: e.g. a
    /// copy-heavy request, to measure what --speculative gains. Runs through the
    /// scheduler, as --concurrency does.
    #[arg(long, value_name = "PATH", conflicts_with = "profile")]
    pub prompt_file: Option<PathBuf>,
    /// After measuring, time a decode step op by op (each kind of kernel alone,
    /// repeated in one submission) and print where the step's time goes. One machine
    /// only (not with --peer or --discover).
    #[arg(long, conflicts_with = "concurrency")]
    pub profile: bool,
    /// With --profile: time a step of N rows of one sequence, every row sampled, as a
    /// speculative step verifying N - 1 drafts (default 1: a plain decode step).
    #[arg(long, value_name = "N", default_value_t = 1, requires = "profile", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub profile_rows: u32,
    /// With --profile: split the step's rows evenly over N sequences, each at the same
    /// position and reading the same cache (--profile-rows 8 --profile-seqs 8: a decode
    /// step of 8 sequences, as --concurrency 8 runs).
    #[arg(long, value_name = "N", default_value_t = 1, requires = "profile", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub profile_seqs: u32,
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
    /// Context length: tokens of KV cache per sequence (default: the model's own, or the
    /// most the nodes hold for one sequence, which is then printed).
    #[arg(long, value_parser = clap::value_parser!(u32).range(16..=1_048_576))]
    pub ctx: Option<u32>,
    /// A node as NAME=SIZE (e.g. `desk=16GiB`, `mac=12GiB`), in pipeline order; repeatable.
    #[arg(long = "node", required = true)]
    pub nodes: Vec<String>,
    /// Layers per node, e.g. `10,12,8`, instead of the memory-proportional split.
    #[arg(long)]
    pub split: Option<String>,
    /// Sequences held at once (serve's --max-seqs): their DeltaNet state, and by default a
    /// KV pool holding every one's whole context (less if memory is short).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub seqs: u32,
    /// Positions of KV cache all sequences share (default: every sequence's whole context,
    /// or what the nodes' memory leaves).
    #[arg(long, value_name = "TOKENS", value_parser = clap::value_parser!(u32).range(16..))]
    pub kv_pool: Option<u32>,
    /// Rows one step carries: sizes each stage's activation scratch.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_BATCH_TOKENS, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub batch_tokens: u32,
    /// Plan as `serve --no-prefix-cache` runs: without a checkpoint of each sequence's
    /// DeltaNet state beside it (which doubles that state's memory).
    #[arg(long)]
    pub no_prefix_cache: bool,
    /// Plan for speculative decoding with this `--draft-max` (0: without): each DeltaNet
    /// slot keeps a rollback state, and the head samples every draft's row.
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=16))]
    pub draft_max: u32,
    /// Plan as `--speculative mtp` runs (with `--draft-max`, default 4 then): the last
    /// stage also holds the model's MTP block, the embedding it embeds with, its attention
    /// layer's share of the KV pool and its activations.
    #[arg(long)]
    pub mtp: bool,
    /// Plan as nodes running `--int8-dot on` do: each stage also holds x quantised for
    /// the integer-dot path (a step's rows, two bytes a value of its widest Q8_0 matrix).
    #[arg(long, value_name = "on|off", value_parser = parse_on_off, default_value = "off", action = clap::ArgAction::Set)]
    pub int8_dot: bool,
}

#[derive(Args, Debug)]
pub struct SynthesizeArgs {
    /// The shape to write: qwen36-27b (dense, about 29 GB apparent), qwen36-35b-a3b (the
    /// MoE, about 38 GB apparent) or smollm2-135m (the README's benchmark model, Q8_0,
    /// 145 MB). A dense model's zeros run as fast as its real weights, so these also serve
    /// to measure speed where the real file is not at hand (not a mixture of experts:
    /// zeros route every token to the same experts).
    #[arg(long, default_value = "qwen36-27b")]
    pub shape: String,
    /// Keep only the first N layers of the shape, at full width (the embedding, head and
    /// MTP block stay): a few of a large model's layers to measure on one device.
    #[arg(long, value_name = "N")]
    pub layers: Option<usize>,
    /// Output GGUF path.
    pub output: PathBuf,
}

#[derive(Args, Debug)]
pub struct NodesArgs {
    /// Seconds to listen for mDNS answers (mDNS has no "everyone answered" signal).
    #[arg(long, default_value_t = 3.0)]
    pub timeout: f64,
    /// Stop listening as soon as this many nodes are known.
    #[arg(long, value_name = "N")]
    pub expect: Option<usize>,
    /// Also list this node, as HOST:PORT (repeatable; listed by address: only mDNS tells details).
    #[arg(long = "peer", value_name = "HOST:PORT")]
    pub peers: Vec<String>,
    /// Do not browse mDNS: list only the `--peer` nodes.
    #[arg(long)]
    pub no_mdns: bool,
    /// Ignore IPv6 mDNS answers and interfaces.
    #[arg(long)]
    pub no_ipv6: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Address to listen on; port 0 picks a free port. Prints `listening on http://ADDR` once bound.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
    /// Sequences generating at once; further requests wait in a queue.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub max_seqs: u32,
    /// Requests that may wait for a sequence slot; past that the server answers 503 with
    /// `Retry-After` instead of queueing without bound.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    pub max_queue: u32,
    /// Require this key from every client, as `Authorization: Bearer KEY` (or `x-api-key:
    /// KEY`), compared in constant time. `/health` and the web page's files stay open; the
    /// page asks for the key. Without it anyone who reaches --listen can use the server.
    #[arg(long, env = "STRATA_API_KEY", hide_env_values = true, value_parser = parse_api_key)]
    pub api_key: Option<String>,
    /// Serve HTTPS with this certificate chain (PEM, leaf first); needs --tls-key.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Largest request body accepted, e.g. `16MiB`; a larger one gets 413.
    #[arg(long, value_name = "SIZE", default_value = "16MiB", value_parser = parse_body_limit)]
    pub max_body: usize,
    /// How chat answers return a Qwen3-family model's `<think>…</think>` reasoning:
    /// `deepseek` as `message.reasoning_content` (streamed as `delta.reasoning_content`)
    /// and the content without it; `none` keeps the raw text as content. A request may
    /// override it with `reasoning_format`.
    #[arg(long, value_enum, default_value_t = ReasoningFormat::Deepseek)]
    pub reasoning_format: ReasoningFormat,
    /// Use this Jinja chat template instead of the model's `tokenizer.chat_template`.
    #[arg(long, value_name = "PATH")]
    pub chat_template_file: Option<PathBuf>,
    /// Release every sequence when its request ends. By default a finished sequence's
    /// caches stay on the stages (till their room or slot is wanted, or 5 minutes pass),
    /// and a later prompt that begins with its tokens (an agent's next turn) computes
    /// only what follows; `usage.prompt_tokens_details.cached_tokens` says how many were
    /// reused. Models with recurrent layers (qwen35) resume where the prompt begins with
    /// all of the earlier sequence's tokens, or from a checkpoint of their state kept a
    /// little before its prompt's end (where a chat's next turn rewrites the template's
    /// generation prompt); the checkpoints double the DeltaNet state's memory.
    #[arg(long)]
    pub no_prefix_cache: bool,
}

fn parse_api_key(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        return Err("the API key is empty".into());
    }
    if s.chars().any(|c| c.is_control() || c == ' ') {
        return Err("the API key must not hold spaces or control characters (it travels in an HTTP header)".into());
    }
    Ok(s.to_owned())
}

/// Body limits from 1 KiB to 1 GiB, in the units `--memory` takes.
fn parse_body_limit(s: &str) -> Result<usize, String> {
    const RANGE: std::ops::RangeInclusive<u64> = 1 << 10..=1 << 30;
    match strata_node::memory::parse_size(s).map_err(|e| e.to_string())? {
        strata_node::memory::MemoryLimit::Bytes(b) if RANGE.contains(&b) => Ok(b as usize),
        strata_node::memory::MemoryLimit::Bytes(b) => Err(format!("{b} bytes is outside 1KiB..=1GiB")),
        strata_node::memory::MemoryLimit::Auto => Err("give a size, e.g. 16MiB".into()),
    }
}

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// A system message to start the conversation with.
    #[arg(long)]
    pub system: Option<String>,
    /// Stop each answer after this many tokens.
    #[arg(long, short = 'n', default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_tokens: u32,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, short, default_value_t = 0.7)]
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
    /// Random seed for sampling.
    #[arg(long, short, default_value_t = 0)]
    pub seed: u64,
}
