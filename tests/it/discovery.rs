//! Discovery: real `strata node` processes advertising over real mDNS, each in its own
//! network namespace ("host"), found by `strata nodes` in a third; and static peers.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::netns::Lan;
use crate::support::{fixture, model_dir, path_str, strata, strata_json};

fn strata_exe() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_BIN_EXE_strata"))
}

/// `strata nodes ...` in host `i`, parsed.
fn list_nodes(lan: &Lan, i: usize, args: &[&str]) -> (serde_json::Value, Duration) {
    let mut cmd = lan.command(i, strata_exe());
    cmd.args(["nodes", "--json", "--no-ipv6"]).args(args);
    let t0 = Instant::now();
    let o = lan.output(cmd);
    let took = t0.elapsed();
    assert!(o.status.success(), "strata nodes {args:?} failed ({}):\n{}", o.status, String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("strata nodes: stdout is not JSON ({e}):\n{}", String::from_utf8_lossy(&o.stdout)));
    (v, took)
}

fn names(listing: &serde_json::Value) -> Vec<String> {
    listing["nodes"].as_array().expect("nodes array").iter().map(|n| n["name"].as_str().unwrap().to_owned()).collect()
}

/// The cluster the test's coordinator belongs to, and another one on the same LAN.
const KEY: &str = "discovery-test-cluster-key-a";
const OTHER_KEY: &str = "discovery-test-cluster-key-b";

/// Starts `strata node` of the cluster of `key` in host `i` and waits for its
/// `listening on` line.
fn start_node(lan: &mut Lan, i: usize, name: &str, key: &str) -> usize {
    let mut cmd = lan.command(i, strata_exe());
    let models = model_dir(&[fixture("tiny-qwen3.gguf")]);
    cmd.args([
        "node",
        "--listen",
        &format!("{}:7470", lan.addr(i)),
        "--name",
        name,
        "--memory",
        "1GiB",
        "--model-dir",
        path_str(&models),
        "--cluster-key",
        key,
    ])
    .env("WGPU_ADAPTER_NAME", "llvmpipe")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    let idx = lan.spawn(cmd);
    let stdout = lan.child(idx).stdout.take().expect("node stdout");
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("read the node's first line");
    assert_eq!(
        line.trim(),
        format!("listening on {}:7470", lan.addr(i)),
        "strata node {name} did not start (see its stderr above)"
    );
    idx
}

/// Nodes in other namespaces are found over real mDNS; a coordinator with `--discover`
/// takes only those of its own cluster (a node of another cluster advertises on the same
/// LAN), runs the model across them, and a killed node vanishes from the listing.
#[test]
fn nodes_in_other_namespaces_are_found_by_mdns_and_vanish_when_killed() {
    let mut lan = Lan::new(4);
    let n2 = start_node(&mut lan, 1, "node2", KEY);
    let n3 = start_node(&mut lan, 2, "node3", KEY);
    let n4 = start_node(&mut lan, 3, "node4", OTHER_KEY);

    let (first, took) = list_nodes(&lan, 0, &["--expect", "3", "--timeout", "10"]);
    assert_eq!(names(&first), ["node2", "node3", "node4"], "every node found by mDNS alone:\n{first:#}");
    assert_eq!(first["latency"], "tcp-connect");
    let cluster = |i: usize| first["nodes"][i]["cluster"].as_str().unwrap_or("").to_owned();
    assert_eq!(cluster(0).len(), 16, "nodes advertise their cluster's fingerprint:\n{first:#}");
    assert_eq!(cluster(0), cluster(1));
    assert_ne!(cluster(0), cluster(2));
    for (node, i) in first["nodes"].as_array().unwrap().iter().zip([1, 2, 3]) {
        assert_eq!(node["address"], format!("{}:7470", lan.addr(i)), "{node:#}");
        assert_eq!(node["source"], "mdns");
        assert_eq!(node["usable_memory"], 1u64 << 30, "the TXT record carries --memory");
        assert_eq!(node["protocol_version"], strata_proto::PROTOCOL_VERSION);
        assert_eq!(node["compatible"], true);
        assert!(!node["node_id"].as_str().unwrap().is_empty());
        assert!(node["adapter"].as_str().unwrap().contains("llvmpipe"), "{node:#}");
        assert!(node["latency_ms"].as_f64().is_some(), "the node's port answers: {node:#}");
    }
    let found: Vec<f64> =
        first["nodes"].as_array().unwrap().iter().map(|n| n["found_after_ms"].as_f64().unwrap()).collect();
    eprintln!("resolution: {found:?} ms after browsing started; whole listing {:.0} ms", took.as_secs_f64() * 1e3);
    assert!(took < Duration::from_secs(9), "--expect 3 returns as soon as all are found, not at the timeout");

    // Discover, plan, generate: the coordinator in host 0 finds the two nodes by mDNS
    // alone, plans by their advertised memory and runs the model across the namespaces.
    let model = fixture("tiny-qwen3.gguf");
    let args = [
        "run",
        "--json",
        "--model",
        path_str(&model),
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "16",
        "--ignore-eos",
    ];
    let single = strata_json(&args);
    let mut cmd = lan.command(0, strata_exe());
    // No --expect-nodes: the whole window, so that the other cluster's node is seen too.
    cmd.args(args)
        .args(["--no-local", "--discover", "--discover-timeout", "4", "--cluster-key", KEY])
        .env("WGPU_ADAPTER_NAME", "llvmpipe");
    let o = lan.output(cmd);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "strata run --discover failed:\n{stderr}");
    let piped: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&o.stdout)));
    assert!(
        stderr.contains(&format!("discovered 2 node(s) over mDNS: {}:7470, {}:7470", lan.addr(1), lan.addr(2))),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("ignoring node node4 at {}:7470: it is of cluster {}", lan.addr(3), cluster(2))),
        "{stderr}"
    );
    assert_eq!(piped["generated_ids"], single["generated_ids"], "the discovered pipeline generates what one node does");
    let stages: Vec<(String, String)> = piped["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["node"].as_str().unwrap().to_owned(), s["address"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(stages.len(), 2, "{piped:#}");
    assert_eq!(stages[0], ("node2".to_owned(), format!("{}:7470", lan.addr(1))), "{piped:#}");
    assert_eq!(stages[1], ("node3".to_owned(), format!("{}:7470", lan.addr(2))), "{piped:#}");
    for s in piped["stages"].as_array().unwrap() {
        assert!(s["layers"][0].as_u64() < s["layers"][1].as_u64(), "every namespace runs layers: {piped:#}");
    }

    // Killed without a goodbye: a fresh browser must not list it (no ghosts).
    lan.kill(n3);
    let (second, took) = list_nodes(&lan, 0, &["--timeout", "3"]);
    assert_eq!(names(&second), ["node2", "node4"], "node3 was killed:\n{second:#}");
    assert!(took >= Duration::from_secs(3), "without --expect, the whole window is used");
    lan.kill(n2);
    lan.kill(n4);
}

/// `GET path` of a server listening on 127.0.0.1:`port` inside host `i`: (status, body).
fn get_in(lan: &Lan, i: usize, port: u16, path: &str, body: Option<&str>) -> (u16, String) {
    let script = "import sys, urllib.request, urllib.error\n\
        data = sys.argv[2].encode() if len(sys.argv) > 2 else None\n\
        req = urllib.request.Request(sys.argv[1], data=data, headers={'Content-Type': 'application/json'})\n\
        try:\n    r = urllib.request.urlopen(req, timeout=120); print(r.status); print(r.read().decode())\n\
        except urllib.error.HTTPError as e:\n    print(e.code); print(e.read().decode())\n";
    let mut cmd = lan.command(i, std::path::Path::new("python3"));
    cmd.args(["-c", script, &format!("http://127.0.0.1:{port}{path}")]);
    if let Some(b) = body {
        cmd.arg(b);
    }
    let o = lan.output(cmd);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let (status, body) = out.split_once('\n').unwrap_or_else(|| panic!("no answer from {path}: {o:?}"));
    (status.trim().parse().expect("status"), body.to_owned())
}

/// A server started with `--discover` keeps browsing mDNS: a node of its cluster that
/// appears later joins the pipeline at the next re-plan, taken when nothing runs.
#[test]
fn a_node_that_appears_later_joins_a_discovering_server() {
    let mut lan = Lan::new(3);
    start_node(&mut lan, 1, "node2", KEY);
    let model = fixture("tiny-qwen3.gguf");
    let mut cmd = lan.command(0, strata_exe());
    cmd.args(["serve", "--model", path_str(&model), "--listen", "127.0.0.1:8080", "--ctx", "256"])
        .args(["--no-local", "--discover", "--expect-nodes", "1", "--discover-timeout", "10", "--cluster-key", KEY])
        .env("WGPU_ADAPTER_NAME", "llvmpipe")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let server = lan.spawn(cmd);
    let stdout = lan.child(server).stdout.take().expect("serve stdout");
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("read serve's first line");
    assert_eq!(line.trim(), "listening on http://127.0.0.1:8080", "strata serve did not start");
    let nodes = |c: &serde_json::Value| c["nodes"].as_array().map_or(0, Vec::len);
    let (_, c) = get_in(&lan, 0, 8080, "/v1/cluster", None);
    assert_eq!(nodes(&serde_json::from_str(&c).unwrap()), 1, "{c}");

    start_node(&mut lan, 2, "node3", KEY);
    let t0 = Instant::now();
    let c = loop {
        let (_, c) = get_in(&lan, 0, 8080, "/v1/cluster", None);
        let c: serde_json::Value = serde_json::from_str(&c).unwrap();
        if nodes(&c) == 2 && c["state"] == "ok" {
            break c;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "the new node did not join within 60 s: {c:#}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let joined = t0.elapsed();
    let names: Vec<&str> = c["nodes"].as_array().unwrap().iter().map(|n| n["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["node2", "node3"], "{c:#}");
    assert!(c["last_recovery"]["cause"].as_str().unwrap().contains("node3"), "{c:#}");
    eprintln!("a node that appeared later joined the discovering server {joined:?} after it started");
    let (status, body) = get_in(&lan, 0, 8080, "/v1/completions", Some(r#"{"prompt":"Hello","max_tokens":4}"#));
    assert_eq!(status, 200, "{body}");
}

#[test]
fn static_peers_are_listed_without_mdns() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let o = strata().args(["nodes", "--json", "--no-mdns", "--timeout", "0", "--peer", &addr]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let nodes = v["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 1, "{v:#}");
    assert_eq!(nodes[0]["address"], addr);
    assert_eq!(nodes[0]["source"], "static");
    assert!(nodes[0]["latency_ms"].as_f64().is_some(), "{v:#}");
    assert!(nodes[0].get("usable_memory").is_none(), "a static peer's details come over gRPC, not guessed: {v:#}");

    let o = strata().args(["nodes", "--no-mdns", "--peer", "no-port-here"]).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("expected HOST:PORT"));
}
