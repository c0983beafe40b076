//! Finding nodes: an mDNS browser for `_strata._tcp.local.` plus static `--peer` entries,
//! kept in a `NodeTable`; and `strata nodes`, which lists what it finds.
//!
//! The table never keeps ghosts: an mDNS entry goes on `ServiceRemoved` (goodbye packets,
//! or records whose TTL expired in mdns-sd's cache), and also when its lease runs out: a
//! lease is renewed by each resolution and by each successful liveness probe (a TCP
//! connect to the node's port), so a node killed without a goodbye is gone within one
//! lease even though its mDNS records would live for over an hour.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent};
use serde::Serialize;
use strata_node::advertise::{self, Advertisement, NodeAdvert, SERVICE_TYPE, txt};

use crate::cli::NodesArgs;

/// What a node says about itself in its mDNS TXT records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeDetails {
    pub node_id: String,
    pub protocol_version: u32,
    pub usable_memory: u64,
    pub adapter: String,
    pub backend: String,
    /// The fingerprint of the node's cluster key; `None`: a node without a key.
    pub cluster: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Mdns,
    Static,
}

/// One node in the table.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeEntry {
    /// Table key: the DNS-SD full name, or `static:HOST:PORT`.
    pub key: String,
    pub name: String,
    pub addr: SocketAddr,
    /// `None` for a static peer (only mDNS carries details into the table) or for an mDNS
    /// node with unreadable TXT records.
    pub details: Option<NodeDetails>,
    pub source: Source,
    /// When the entry was first added (for resolution-latency reports).
    pub found_at: Instant,
    last_seen: Instant,
}

impl NodeEntry {
    /// Speaks this coordinator's protocol version (unknown details: not yet).
    pub fn compatible(&self) -> bool {
        self.details.as_ref().is_some_and(|d| d.protocol_version == strata_proto::PROTOCOL_VERSION)
    }

    /// Advertises the cluster fingerprint `cluster` (`None`: a coordinator without a key,
    /// which can talk only to nodes without one).
    pub fn in_cluster(&self, cluster: Option<&str>) -> bool {
        self.details.as_ref().is_some_and(|d| d.cluster.as_deref() == cluster)
    }

    /// A node a coordinator of `cluster` may run on: its protocol, its cluster.
    pub fn usable_by(&self, cluster: Option<&str>) -> bool {
        self.compatible() && self.in_cluster(cluster)
    }
}

/// An mDNS-level event, already converted from mdns-sd's types.
#[derive(Debug, Clone, PartialEq)]
pub enum TableEvent {
    Resolved { fullname: String, name: String, addr: SocketAddr, details: Option<NodeDetails> },
    Removed { fullname: String },
}

/// The nodes known right now.
#[derive(Debug, Clone)]
pub struct NodeTable {
    entries: BTreeMap<String, NodeEntry>,
    lease: Duration,
}

impl NodeTable {
    /// A table whose mDNS entries expire `lease` after they were last confirmed.
    pub fn new(lease: Duration) -> NodeTable {
        NodeTable { entries: BTreeMap::new(), lease }
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// Applies one mDNS event; returns whether the table changed.
    pub fn apply(&mut self, event: TableEvent, now: Instant) -> bool {
        match event {
            TableEvent::Resolved { fullname, name, addr, details } => {
                let found_at = self.entries.get(&fullname).map_or(now, |e| e.found_at);
                let entry = NodeEntry {
                    key: fullname.clone(),
                    name,
                    addr,
                    details,
                    source: Source::Mdns,
                    found_at,
                    last_seen: now,
                };
                let changed = self.entries.get(&fullname).is_none_or(|old| {
                    (old.name.as_str(), old.addr, &old.details) != (entry.name.as_str(), entry.addr, &entry.details)
                });
                self.entries.insert(fullname, entry);
                changed
            }
            TableEvent::Removed { fullname } => self.entries.remove(&fullname).is_some(),
        }
    }

    /// Adds a static peer, known by its address alone (kept until removed).
    pub fn add_static(&mut self, addr: SocketAddr, now: Instant) {
        let key = format!("static:{addr}");
        self.entries.entry(key.clone()).or_insert(NodeEntry {
            key,
            name: addr.to_string(),
            addr,
            details: None,
            source: Source::Static,
            found_at: now,
            last_seen: now,
        });
    }

    /// Renews an entry's lease (a liveness probe answered).
    pub fn touch(&mut self, key: &str, now: Instant) {
        if let Some(e) = self.entries.get_mut(key) {
            e.last_seen = now;
        }
    }

    /// Drops mDNS entries whose lease ran out; returns their keys. Static peers stay.
    pub fn expire(&mut self, now: Instant) -> Vec<String> {
        let lease = self.lease;
        let gone: Vec<String> = self
            .entries
            .values()
            .filter(|e| e.source == Source::Mdns && now.saturating_duration_since(e.last_seen) > lease)
            .map(|e| e.key.clone())
            .collect();
        for k in &gone {
            self.entries.remove(k);
        }
        gone
    }

    /// mDNS entries not confirmed for `age`: due for a liveness probe.
    pub fn stale(&self, now: Instant, age: Duration) -> Vec<(String, SocketAddr)> {
        self.entries
            .values()
            .filter(|e| e.source == Source::Mdns && now.saturating_duration_since(e.last_seen) >= age)
            .map(|e| (e.key.clone(), e.addr))
            .collect()
    }

    /// The nodes, by name; a static peer that mDNS also found is listed once, as found.
    pub fn nodes(&self) -> Vec<&NodeEntry> {
        let mdns_addrs: Vec<SocketAddr> =
            self.entries.values().filter(|e| e.source == Source::Mdns).map(|e| e.addr).collect();
        let mut v: Vec<&NodeEntry> =
            self.entries.values().filter(|e| e.source == Source::Mdns || !mdns_addrs.contains(&e.addr)).collect();
        v.sort_by(|a, b| (&a.name, a.addr).cmp(&(&b.name, b.addr)));
        v
    }

    pub fn len(&self) -> usize {
        self.nodes().len()
    }
}

/// How to browse.
#[derive(Debug, Clone)]
pub struct BrowseConfig {
    /// Browse only on the interfaces holding these addresses (empty: all).
    pub interfaces: Vec<IpAddr>,
    /// Ignore IPv6 (tests, for determinism).
    pub no_ipv6: bool,
    /// See `NodeTable::new`.
    pub lease: Duration,
    /// Timeout of a liveness probe (TCP connect).
    pub probe_timeout: Duration,
}

impl Default for BrowseConfig {
    fn default() -> Self {
        BrowseConfig {
            interfaces: Vec::new(),
            no_ipv6: false,
            lease: Duration::from_secs(15),
            probe_timeout: Duration::from_millis(500),
        }
    }
}

/// A live mDNS browser feeding a `NodeTable`. Event-driven: `wait_until` sleeps on the
/// event channel, never for a fixed time.
pub struct Browser {
    daemon: Option<ServiceDaemon>,
    events: Option<mdns_sd::Receiver<ServiceEvent>>,
    table: NodeTable,
    config: BrowseConfig,
    started: Instant,
}

impl Browser {
    /// Starts browsing `_strata._tcp.local.`.
    pub fn start(config: BrowseConfig) -> anyhow::Result<Browser> {
        let daemon = ServiceDaemon::new().context("mDNS: cannot start the browser")?;
        if !config.interfaces.is_empty() {
            daemon.disable_interface(IfKind::All)?;
            for ip in &config.interfaces {
                daemon.enable_interface(IfKind::Addr(*ip))?;
            }
        }
        if config.no_ipv6 {
            daemon.disable_interface(IfKind::IPv6)?;
        }
        let events = daemon.browse(SERVICE_TYPE).context("mDNS: cannot browse")?;
        Ok(Browser {
            daemon: Some(daemon),
            events: Some(events),
            table: NodeTable::new(config.lease),
            config,
            started: Instant::now(),
        })
    }

    /// A browser that only holds static peers (`--no-mdns`).
    pub fn static_only(config: BrowseConfig) -> Browser {
        Browser { daemon: None, events: None, table: NodeTable::new(config.lease), config, started: Instant::now() }
    }

    pub fn add_static_peers(&mut self, peers: &[SocketAddr]) {
        let now = Instant::now();
        for p in peers {
            self.table.add_static(*p, now);
        }
    }

    pub fn table(&self) -> &NodeTable {
        &self.table
    }

    /// When browsing started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Processes events until `done(table)` holds or `timeout` passes; returns `done`'s
    /// last answer. Also renews leases (liveness probes) and drops expired entries.
    pub fn wait_until(&mut self, timeout: Duration, done: impl Fn(&NodeTable) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            self.maintain();
            if done(&self.table) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            // Wake for the next event, the deadline, or the next lease check.
            let wait = (deadline - now).min(self.config.lease / 3).max(Duration::from_millis(1));
            let Some(events) = &self.events else {
                std::thread::sleep(wait);
                continue;
            };
            match events.recv_timeout(wait) {
                Ok(ev) => {
                    handle(&mut self.table, ev);
                    while let Ok(ev) = events.try_recv() {
                        handle(&mut self.table, ev);
                    }
                }
                Err(mdns_sd::RecvTimeoutError::Timeout) => {}
                Err(mdns_sd::RecvTimeoutError::Disconnected) => {
                    tracing::warn!("mDNS browser stopped");
                    self.events = None;
                }
            }
        }
    }

    /// Waits until `n` nodes are known or `timeout` passes.
    pub fn wait_for(&mut self, n: usize, timeout: Duration) -> bool {
        self.wait_until(timeout, |t| t.len() >= n)
    }

    /// Liveness: entries unconfirmed for a third of the lease get a TCP probe (and an
    /// mDNS verify, so mdns-sd flushes records nobody answers for); expired ones go.
    fn maintain(&mut self) {
        let now = Instant::now();
        for (key, addr) in self.table.stale(now, self.table.lease() / 3) {
            if tcp_rtt(addr, self.config.probe_timeout).is_some() {
                self.table.touch(&key, Instant::now());
            } else if let Some(d) = &self.daemon {
                let _ = d.verify(key.clone(), Duration::from_secs(2));
            }
        }
        for key in self.table.expire(Instant::now()) {
            tracing::info!(service = %key, "node stopped answering; dropped");
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(d) = self.daemon.take() {
            let _ = d.stop_browse(SERVICE_TYPE);
            if let Ok(rx) = d.shutdown() {
                let _ = rx.recv_timeout(Duration::from_millis(500));
            }
        }
    }
}

/// Applies one mdns-sd event to `table`.
fn handle(table: &mut NodeTable, ev: ServiceEvent) {
    let now = Instant::now();
    let event = match ev {
        ServiceEvent::ServiceResolved(s) => {
            let Some(ip) = pick_address(s.addresses.iter().map(|a| a.to_ip_addr())) else { return };
            let val = |k: &str| s.get_property_val_str(k).map(str::to_owned);
            let details =
                parse_details(val(txt::ID), val(txt::PROTO), val(txt::MEM), val(txt::ADAPTER), val(txt::BACKEND))
                    .map(|d| NodeDetails { cluster: val(txt::CLUSTER).filter(|c| !c.is_empty()), ..d });
            if details.is_none() {
                tracing::warn!(service = %s.fullname, "mDNS: node with unreadable TXT records (another Strata version?)");
            }
            let name = instance_name(&s.fullname);
            TableEvent::Resolved { fullname: s.fullname.clone(), name, addr: SocketAddr::new(ip, s.port), details }
        }
        ServiceEvent::ServiceRemoved(_, fullname) => TableEvent::Removed { fullname },
        _ => return,
    };
    tracing::debug!(?event, "mDNS");
    table.apply(event, now);
}

/// IPv4 before IPv6, lowest first: stable across re-resolutions.
fn pick_address(addrs: impl Iterator<Item = IpAddr>) -> Option<IpAddr> {
    addrs.filter(|a| !a.is_unspecified()).min_by_key(|a| (a.is_ipv6(), a.is_loopback(), *a))
}

/// `node1._strata._tcp.local.` -> `node1` (DNS-SD escapes in the instance undone).
fn instance_name(fullname: &str) -> String {
    let instance = fullname.strip_suffix(SERVICE_TYPE).map(|s| s.trim_end_matches('.')).unwrap_or(fullname);
    instance.replace("\\.", ".").replace("\\\\", "\\")
}

fn parse_details(
    id: Option<String>,
    proto: Option<String>,
    mem: Option<String>,
    adapter: Option<String>,
    backend: Option<String>,
) -> Option<NodeDetails> {
    Some(NodeDetails {
        node_id: id.filter(|s| !s.is_empty())?,
        protocol_version: proto?.parse().ok()?,
        usable_memory: mem?.parse().ok()?,
        adapter: adapter.unwrap_or_default(),
        backend: backend.unwrap_or_default(),
        cluster: None,
    })
}

/// Round trip of a TCP connect to `addr` (SYN to SYN-ACK plus local overhead).
pub fn tcp_rtt(addr: SocketAddr, timeout: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    let s = TcpStream::connect_timeout(&addr, timeout).ok()?;
    let rtt = t0.elapsed();
    drop(s);
    Some(rtt)
}

/// Resolves `HOST:PORT` peers.
pub fn resolve_peers(peers: &[String]) -> anyhow::Result<Vec<SocketAddr>> {
    peers
        .iter()
        .map(|p| {
            p.to_socket_addrs()
                .with_context(|| format!("--peer `{p}`: expected HOST:PORT"))?
                .next()
                .with_context(|| format!("--peer `{p}`: no address"))
        })
        .collect()
}

/// For `strata node`, once its listener is bound: advertises the node on mDNS unless
/// `no_mdns`. Keep the returned value alive while serving; dropping it says goodbye.
pub fn advertise_node(info: &NodeAdvert, bound: SocketAddr, no_mdns: bool) -> anyhow::Result<Option<Advertisement>> {
    if no_mdns {
        tracing::info!(%bound, "not advertising on mDNS (--no-mdns)");
        return Ok(None);
    }
    let ad = advertise::advertise(info, bound).with_context(|| format!("advertising node `{}` on mDNS", info.name))?;
    Ok(Some(ad))
}

#[derive(Serialize)]
struct NodesReport<'a> {
    /// How `latency_ms` was measured.
    latency: &'static str,
    nodes: Vec<NodeRow<'a>>,
}

#[derive(Serialize)]
struct NodeRow<'a> {
    name: &'a str,
    address: String,
    source: Source,
    #[serde(flatten)]
    details: Option<&'a NodeDetails>,
    compatible: bool,
    /// Since browsing started.
    found_after_ms: f64,
    /// `null`: the port did not answer.
    latency_ms: Option<f64>,
}

const LATENCY_METHOD: &str = "tcp-connect";

/// The nodes a pipeline may use, found over mDNS: browses until `expect` nodes are
/// known (or for the whole `timeout` when `None`) and returns the addresses of those
/// that speak this protocol, in name order. Fewer than `expect` is an error.
pub fn discover_nodes(expect: Option<usize>, timeout: Duration, cluster: Option<&str>) -> anyhow::Result<Vec<String>> {
    let mut browser = Browser::start(BrowseConfig::default())?;
    let usable = |e: &NodeEntry| e.usable_by(cluster);
    let found = match expect {
        Some(n) => browser.wait_until(timeout, |t| t.nodes().iter().filter(|e| usable(e)).count() >= n),
        None => browser.wait_until(timeout, |_| false),
    };
    let mut nodes: Vec<&NodeEntry> = browser.table().nodes();
    for e in nodes.iter().filter(|e| !e.compatible()) {
        let proto = e
            .details
            .as_ref()
            .map_or("unreadable TXT records".to_string(), |d| format!("protocol {}", d.protocol_version));
        eprintln!(
            "ignoring node {} at {}: {proto}, this coordinator speaks {}",
            e.name,
            e.addr,
            strata_proto::PROTOCOL_VERSION
        );
    }
    for e in nodes.iter().filter(|e| e.compatible() && !e.in_cluster(cluster)) {
        let theirs = e.details.as_ref().and_then(|d| d.cluster.as_deref()).unwrap_or("none: no cluster key");
        let ours = cluster.unwrap_or("none: no cluster key");
        eprintln!("ignoring node {} at {}: it is of cluster {theirs}, this coordinator of {ours}", e.name, e.addr);
    }
    nodes.retain(|e| usable(e));
    if let Some(n) = expect
        && !found
    {
        bail!(
            "found {} of the {n} nodes expected over mDNS within {:.1} s ({}); is multicast blocked? try --peer HOST:PORT",
            nodes.len(),
            timeout.as_secs_f64(),
            if nodes.is_empty() {
                "none".to_string()
            } else {
                nodes.iter().map(|e| e.name.as_str()).collect::<Vec<_>>().join(", ")
            }
        );
    }
    for e in &nodes {
        tracing::info!(name = %e.name, addr = %e.addr, "discovered node");
    }
    Ok(nodes.iter().map(|e| e.addr.to_string()).collect())
}

/// A browser kept running in a thread, for a server whose pipeline takes in nodes of its
/// cluster that appear later. Stops when dropped.
pub struct NodeWatch {
    found: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How often the watching thread refreshes what it found (it also wakes on each event).
const WATCH_REFRESH: Duration = Duration::from_secs(1);

impl NodeWatch {
    /// Starts browsing for nodes of `cluster` (by fingerprint) that speak this protocol.
    pub fn start(cluster: Option<String>) -> anyhow::Result<NodeWatch> {
        let mut browser = Browser::start(BrowseConfig::default())?;
        let (found, stop) = (Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicBool::new(false)));
        let (f, halt) = (found.clone(), stop.clone());
        let thread = std::thread::Builder::new().name("mdns-watch".into()).spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                browser.wait_until(WATCH_REFRESH, |_| false);
                let nodes = browser.table().nodes();
                let addrs =
                    nodes.iter().filter(|e| e.usable_by(cluster.as_deref())).map(|e| e.addr.to_string()).collect();
                *f.lock().unwrap_or_else(|e| e.into_inner()) = addrs;
            }
        })?;
        Ok(NodeWatch { found, stop, thread: Some(thread) })
    }

    /// The addresses of the usable nodes known now.
    pub fn found(&self) -> Vec<String> {
        self.found.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A handle on [`NodeWatch::found`] for another thread.
    pub fn shared(&self) -> Arc<Mutex<Vec<String>>> {
        self.found.clone()
    }
}

impl Drop for NodeWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `strata nodes`.
pub fn run_nodes(args: NodesArgs) -> anyhow::Result<()> {
    let peers = resolve_peers(&args.peers)?;
    let config = BrowseConfig { no_ipv6: args.no_ipv6, ..BrowseConfig::default() };
    let mut browser = if args.no_mdns { Browser::static_only(config) } else { Browser::start(config)? };
    browser.add_static_peers(&peers);
    let timeout = Duration::from_secs_f64(args.timeout);
    match args.expect {
        Some(n) => {
            if !browser.wait_for(n, timeout) {
                tracing::warn!(
                    "found {} of the {n} nodes expected within {:.1} s",
                    browser.table().len(),
                    args.timeout
                );
            }
        }
        // No "everyone answered" signal exists in mDNS: listen for the whole window.
        None => {
            browser.wait_until(timeout, |_| false);
        }
    }
    let started = browser.started();
    let nodes = browser.table().nodes();
    let rows: Vec<NodeRow> = nodes
        .iter()
        .map(|e| NodeRow {
            name: &e.name,
            address: e.addr.to_string(),
            source: e.source,
            details: e.details.as_ref(),
            compatible: e.compatible(),
            found_after_ms: e.found_at.saturating_duration_since(started).as_secs_f64() * 1e3,
            latency_ms: tcp_rtt(e.addr, Duration::from_secs(1)).map(|d| d.as_secs_f64() * 1e3),
        })
        .collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&NodesReport { latency: LATENCY_METHOD, nodes: rows })?);
        return Ok(());
    }
    if rows.is_empty() {
        println!(
            "no nodes found in {:.1} s (is `strata node` running on this LAN? multicast blocked? try --peer HOST:PORT)",
            args.timeout
        );
        return Ok(());
    }
    println!(
        "{:<20} {:<22} {:<32} {:>12} {:>18} {:>17}",
        "NAME", "ADDRESS", "ADAPTER", "MEMORY", "RTT (TCP connect)", "CLUSTER"
    );
    for r in &rows {
        let (adapter, memory) = match r.details {
            Some(d) => {
                let a = if r.compatible {
                    d.adapter.clone()
                } else {
                    format!("{} (protocol {})", d.adapter, d.protocol_version)
                };
                (a, strata_node::memory::format_bytes(d.usable_memory))
            }
            None => ("?".to_string(), "?".to_string()),
        };
        let latency = r.latency_ms.map_or("no answer".to_string(), |ms| format!("{ms:.2} ms"));
        // The fingerprint of the node's cluster key (`strata init` prints this machine's).
        let cluster = r.details.and_then(|d| d.cluster.as_deref()).unwrap_or("none");
        println!("{:<20} {:<22} {:<32} {:>12} {:>18} {:>17}", r.name, r.address, adapter, memory, latency, cluster);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn details(mem: u64) -> NodeDetails {
        NodeDetails {
            node_id: "id1".into(),
            protocol_version: strata_proto::PROTOCOL_VERSION,
            usable_memory: mem,
            adapter: "llvmpipe".into(),
            backend: "Vulkan".into(),
            cluster: None,
        }
    }

    #[test]
    fn only_nodes_of_the_same_cluster_are_members() {
        let entry = |cluster: Option<&str>| NodeEntry {
            key: "k".into(),
            name: "n".into(),
            addr: "10.0.0.1:7470".parse().unwrap(),
            details: Some(NodeDetails { cluster: cluster.map(str::to_owned), ..details(1) }),
            source: Source::Mdns,
            found_at: Instant::now(),
            last_seen: Instant::now(),
        };
        assert!(entry(Some("aa")).in_cluster(Some("aa")));
        assert!(!entry(Some("bb")).in_cluster(Some("aa")));
        assert!(!entry(None).in_cluster(Some("aa")));
        assert!(!entry(Some("aa")).in_cluster(None));
        assert!(entry(None).in_cluster(None));
    }

    fn resolved(name: &str, addr: &str, mem: u64) -> TableEvent {
        TableEvent::Resolved {
            fullname: format!("{name}.{SERVICE_TYPE}"),
            name: name.into(),
            addr: addr.parse().unwrap(),
            details: Some(details(mem)),
        }
    }

    #[test]
    fn add_update_remove() {
        let t0 = Instant::now();
        let mut t = NodeTable::new(Duration::from_secs(10));
        assert!(t.apply(resolved("a", "10.0.0.1:7470", 1), t0));
        assert!(t.apply(resolved("b", "10.0.0.2:7470", 2), t0));
        assert_eq!(t.len(), 2);
        // The same answer again changes nothing, but renews the lease.
        assert!(!t.apply(resolved("a", "10.0.0.1:7470", 1), t0 + Duration::from_secs(5)));
        // A new address or memory is an update, not a second entry; found_at stays.
        assert!(t.apply(resolved("a", "10.0.0.9:7470", 3), t0 + Duration::from_secs(6)));
        let a = t.nodes()[0].clone();
        assert_eq!(
            (a.name.as_str(), a.addr.to_string(), a.details.as_ref().unwrap().usable_memory),
            ("a", "10.0.0.9:7470".into(), 3)
        );
        assert_eq!(a.found_at, t0);
        assert!(a.compatible());
        assert!(t.apply(TableEvent::Removed { fullname: format!("b.{SERVICE_TYPE}") }, t0));
        assert!(!t.apply(TableEvent::Removed { fullname: format!("b.{SERVICE_TYPE}") }, t0));
        assert_eq!(t.nodes().iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), ["a"]);
    }

    #[test]
    fn leases_expire_unless_renewed() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut t = NodeTable::new(s(9));
        t.apply(resolved("a", "10.0.0.1:1", 1), t0);
        t.apply(resolved("b", "10.0.0.2:1", 1), t0);
        t.add_static("10.0.0.3:1".parse().unwrap(), t0);
        assert_eq!(t.stale(t0 + s(3), s(3)).len(), 2, "both mDNS entries are due a probe; static peers never");
        t.touch(&format!("a.{SERVICE_TYPE}"), t0 + s(6));
        assert!(t.expire(t0 + s(9)).is_empty(), "exactly at the lease: still there");
        assert_eq!(t.expire(t0 + s(10)), [format!("b.{SERVICE_TYPE}")]);
        assert_eq!(t.len(), 2);
        assert_eq!(t.expire(t0 + s(16)), [format!("a.{SERVICE_TYPE}")]);
        assert_eq!(t.nodes().iter().map(|e| e.source).collect::<Vec<_>>(), [Source::Static]);
    }

    #[test]
    fn static_peers_merge_with_mdns() {
        let t0 = Instant::now();
        let mut t = NodeTable::new(Duration::from_secs(10));
        t.add_static("10.0.0.1:7470".parse().unwrap(), t0);
        t.add_static("10.0.0.2:7470".parse().unwrap(), t0);
        assert!(t.nodes().iter().all(|e| e.details.is_none() && !e.compatible()));
        t.apply(resolved("box1", "10.0.0.1:7470", 7), t0);
        let names: Vec<_> = t.nodes().iter().map(|e| (e.name.clone(), e.source)).collect();
        assert_eq!(names, [("10.0.0.2:7470".to_string(), Source::Static), ("box1".to_string(), Source::Mdns)]);
    }

    #[test]
    fn txt_records_parse_or_are_refused() {
        let s = |v: &str| Some(v.to_string());
        let d = parse_details(s("x"), s("1"), s("1024"), s("gpu"), None).unwrap();
        assert_eq!((d.protocol_version, d.usable_memory, d.backend.as_str()), (1, 1024, ""));
        assert!(parse_details(s("x"), s("one"), s("1"), None, None).is_none());
        assert!(parse_details(s(""), s("1"), s("1"), None, None).is_none());
        assert!(parse_details(s("x"), s("1"), None, None, None).is_none());
    }

    #[test]
    fn names_and_addresses() {
        assert_eq!(instance_name(&format!("node\\.1.{SERVICE_TYPE}")), "node.1");
        let ips: Vec<IpAddr> =
            ["fe80::1", "10.0.0.2", "10.0.0.1", "0.0.0.0"].iter().map(|s| s.parse().unwrap()).collect();
        assert_eq!(pick_address(ips.into_iter()), Some("10.0.0.1".parse().unwrap()));
    }
}
