//! `strata node`: serve this machine's GPU as a pipeline stage; and the hidden
//! `strata bench-hop`, which times handing one hidden state to another process.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use strata_node::gpu::{Gpu, GpuConfig};
use strata_node::memory::{parse_size, probe};
use strata_node::service::{self, NodeConfig, NodeIdentity, StageService};
use strata_proto::tokio_stream::wrappers::ReceiverStream;
use strata_proto::v1 as pb;

use crate::cli::{BenchHopArgs, NodeArgs, Wire};

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "node".into())
}

/// `$XDG_CACHE_HOME/strata`, else `~/.cache/strata`.
fn default_cache_dir() -> Option<std::path::PathBuf> {
    let xdg = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()).map(std::path::PathBuf::from);
    let base = xdg.or_else(|| std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| std::path::PathBuf::from(h).join(".cache")))?;
    Some(base.join("strata"))
}

pub fn run(args: NodeArgs) -> anyhow::Result<()> {
    let memory = parse_size(&args.memory).context("--memory")?;
    if let Some(d) = &args.model_dir
        && !d.is_dir()
    {
        bail!("--model-dir {} is not a directory", d.display());
    }
    let cache_dir = match &args.cache_dir {
        Some(d) => d.clone(),
        None => default_cache_dir().context("no --cache-dir given and neither XDG_CACHE_HOME nor HOME is set")?,
    };
    tracing::info!(dir = %cache_dir.display(), "shard cache");
    let gpu = Arc::new(Gpu::new(&GpuConfig { adapter: args.adapter.clone() })?);
    let name = args.name.clone().unwrap_or_else(host_name);
    let identity = NodeIdentity {
        node_id: format!("{name}-{}-{}", std::process::id(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos() % 1_000_000),
        name,
        usable_memory: {
            let probe = memory.resolve(|| probe(&gpu));
            tracing::info!(bytes = probe.bytes, source = probe.source, "usable memory");
            probe.bytes
        },
        adapter: gpu.info.name.clone(),
        backend: format!("{:?}", gpu.info.backend),
    };
    let config = NodeConfig {
        identity: identity.clone(),
        model_dir: args.model_dir.clone(),
        model_files: Vec::new(),
        cache_dir: Some(cache_dir),
        idle_timeout: Duration::from_secs(args.idle_timeout.max(1)),
    };
    let service = StageService::new(config, gpu)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let listener = strata_proto::transport::bind(args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
        let addr = listener.local_addr()?;
        {
            let mut out = std::io::stdout().lock();
            writeln!(out, "listening on {addr}")?;
            out.flush()?;
        }
        // Kept alive while serving; dropping it sends mDNS goodbyes.
        let _advertisement = crate::discovery::advertise_node(
            &strata_node::advertise::NodeAdvert {
                node_id: identity.node_id.clone(),
                name: identity.name.clone(),
                protocol_version: strata_proto::PROTOCOL_VERSION,
                usable_memory: identity.usable_memory,
                adapter: identity.adapter.clone(),
                backend: identity.backend.clone(),
            },
            addr,
            args.no_mdns,
        )?;
        service::serve(listener, service, std::future::pending()).await?;
        Ok(())
    })
}

/// A child process killed (by its id) when dropped.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Serialize)]
struct HopReport {
    values: usize,
    wire: String,
    payload_bytes: usize,
    iterations: usize,
    round_trip_p50_ms: f64,
    round_trip_p99_ms: f64,
    /// Half the round trip: one hand-over, as the activation is the large direction.
    hop_p50_ms: f64,
    hop_p99_ms: f64,
}

/// Times round trips of one hidden state to a node holding no shard: the node decodes
/// the activation and answers at once (with a "no shard" error), so this measures the
/// transport (serialisation, HTTP/2, loopback TCP), not any compute.
pub fn bench_hop(args: BenchHopArgs) -> anyhow::Result<()> {
    let mut _child = None;
    let addr = match &args.connect {
        Some(a) => a.clone(),
        None => {
            let exe = std::env::current_exe()?;
            let mut child = Command::new(exe)
                .args(["node", "--listen", "127.0.0.1:0", "--no-mdns", "--name", "hop-bench", "--memory", "1GiB"])
                // Every answer is a "no shard" step error; do not log 2000 of them.
                .env("RUST_LOG", "error")
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .context("starting a node")?;
            let stdout = child.stdout.take().context("node stdout")?;
            let guard = ChildGuard(child);
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line)?;
            let addr = line.trim().strip_prefix("listening on ").with_context(|| format!("unexpected node output `{}`", line.trim()))?.to_owned();
            _child = Some(guard);
            addr
        }
    };
    if args.iterations == 0 {
        bail!("--iterations must be at least 1");
    }
    let (format, width) = match args.wire {
        Wire::F32 => (pb::HiddenFormat::F32, 4),
        Wire::F16 => (pb::HiddenFormat::F16, 2),
    };
    let payload = vec![0u8; args.values * width];
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut times = rt.block_on(async {
        let mut client = strata_proto::transport::connect(&addr).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut results = client.forward(ReceiverStream::new(rx)).await?.into_inner();
        let mut times = Vec::with_capacity(args.iterations);
        for i in 0..args.warmup + args.iterations {
            let act = pb::Activation {
                seq_id: 1,
                step: i as u64,
                positions: vec![0],
                hidden: payload.clone(),
                format: format as i32,
                want_token: true,
                ..Default::default()
            };
            let t0 = Instant::now();
            tx.send(act).await?;
            results.message().await?.context("the node closed the stream")?;
            if i >= args.warmup {
                times.push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        anyhow::Ok(times)
    })?;
    times.sort_by(f64::total_cmp);
    let pct = |p: f64| times[((times.len() as f64 - 1.0) * p).round() as usize];
    let (p50, p99) = (pct(0.50), pct(0.99));
    let report = HopReport {
        values: args.values,
        wire: format!("{format:?}").to_lowercase(),
        payload_bytes: payload.len(),
        iterations: args.iterations,
        round_trip_p50_ms: p50,
        round_trip_p99_ms: p99,
        hop_p50_ms: p50 / 2.0,
        hop_p99_ms: p99 / 2.0,
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
