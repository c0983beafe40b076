//! `strata node`: serve this machine's GPU as a pipeline stage; and the hidden
//! `strata bench-hop`, which times handing one hidden state to another process.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;
use strata_node::memory::parse_size;
use strata_node::service::{self, NodeOptions, StageService};
use strata_proto::transport::Security;

use crate::cli::{BenchHopArgs, NodeArgs};

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
    let base = xdg.or_else(|| {
        std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| std::path::PathBuf::from(h).join(".cache"))
    })?;
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
    let security = crate::cluster_key::resolve(&args.cluster)?;
    match (&security, args.insecure) {
        (Security::Cluster(_), true) => bail!("--insecure with a cluster key: drop one of them"),
        (Security::Plain, false) if !args.listen.ip().is_loopback() => bail!(
            "refusing to listen on {} without a cluster key: anyone on the network could use this node. \
             Run `strata init` (or pass --cluster-key, STRATA_CLUSTER_KEY or --cluster-key-file), \
             listen on 127.0.0.1, or accept the risk with --insecure",
            args.listen
        ),
        (Security::Plain, true) => eprintln!(
            "warning: --insecure: {} accepts anyone on the network (no cluster key, no TLS): \
             they can load models, fill the shard cache and use the GPU",
            args.listen
        ),
        _ => {}
    }
    let name = args.name.clone().unwrap_or_else(host_name);
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    let service = StageService::open(NodeOptions {
        node_id: format!("{name}-{}-{}", std::process::id(), started.as_nanos() % 1_000_000),
        name,
        gpu: args.device.gpu_config(),
        memory,
        model_dir: args.model_dir.clone(),
        model_files: Vec::new(),
        cache_dir: Some(cache_dir),
        idle_timeout: Duration::from_secs(args.idle_timeout.max(1)),
        security: security.clone(),
    })?;
    let leave_timeout = Duration::from_secs(args.leave_timeout);
    let mut advert = service.identity().advert();
    advert.cluster = security.fingerprint().map(str::to_owned);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let listener = strata_proto::transport::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let addr = listener.local_addr()?;
        {
            let mut out = std::io::stdout().lock();
            writeln!(out, "listening on {addr}")?;
            out.flush()?;
        }
        // Kept alive while serving; dropping it sends mDNS goodbyes.
        let _advertisement = crate::discovery::advertise_node(&advert, addr, args.no_mdns)?;
        let leaving = leave_on_signal(service.clone(), leave_timeout);
        service::serve(listener, service, leaving).await?;
        Ok(())
    })
}

/// SIGTERM or SIGINT.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C leaves gracefully");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// Resolves when the node should stop serving: at a stop signal when no pipeline runs
/// through it; otherwise it first says it is leaving (its coordinator's heartbeat reads
/// that, re-plans without it and closes its streams, so clients see no error) and waits
/// for that, for `timeout`, or for a second signal.
async fn leave_on_signal(service: StageService, timeout: Duration) {
    stop_signal().await;
    if !service.in_use() {
        eprintln!("stopping: no pipeline runs through this node");
        return;
    }
    service.leave();
    eprintln!(
        "leaving: waiting up to {} s for the coordinator to move this node's layers elsewhere \
         (send the signal again to stop at once)",
        timeout.as_secs()
    );
    let t0 = std::time::Instant::now();
    tokio::select! {
        _ = service.released() => {
            eprintln!("left the pipeline after {:.2} s; stopping", t0.elapsed().as_secs_f64());
        }
        _ = tokio::time::sleep(timeout) => {
            eprintln!("the coordinator did not move off within {} s; stopping anyway", timeout.as_secs());
        }
        _ = stop_signal() => eprintln!("second signal: stopping now"),
    }
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
            let addr = line
                .trim()
                .strip_prefix("listening on ")
                .with_context(|| format!("unexpected node output `{}`", line.trim()))?
                .to_owned();
            _child = Some(guard);
            addr
        }
    };
    if args.iterations == 0 {
        bail!("--iterations must be at least 1");
    }
    // The child node finds the same default key file, if there is one.
    let security = crate::cluster_key::resolve(&crate::cli::ClusterArgs::default())?;
    let hops = crate::engine::time_hops(&addr, &security, args.wire, args.values, args.warmup, args.iterations)?;
    let mut times = hops.round_trips_ms;
    times.sort_by(f64::total_cmp);
    let pct = |p: f64| times[((times.len() as f64 - 1.0) * p).round() as usize];
    let (p50, p99) = (pct(0.50), pct(0.99));
    let report = HopReport {
        values: args.values,
        wire: hops.format.into(),
        payload_bytes: hops.payload_bytes,
        iterations: args.iterations,
        round_trip_p50_ms: p50,
        round_trip_p99_ms: p99,
        hop_p50_ms: p50 / 2.0,
        hop_p99_ms: p99 / 2.0,
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
