//! The cluster key: `strata init`, mutual TLS between coordinator and nodes, refusals on
//! both sides for a missing or another key and for a replayed handshake, and a relay
//! between coordinator and node that sees nothing in the clear.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::{fixture, model_dir, path_str, strata, strata_json};

const KEY: &str = "security-test-cluster-key-1";
const OTHER_KEY: &str = "security-test-cluster-key-2";

fn temp_dir(tag: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("security-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A `strata node` on loopback whose log goes to a file; killed when dropped.
struct Node {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl Node {
    /// `models`: a --model-dir (`None`: an empty one, so the weights are streamed to it).
    fn start(tag: &str, models: Option<&Path>, extra: &[&str]) -> Node {
        let dir = temp_dir(tag);
        let log = dir.join("node.log");
        let empty = dir.join("models");
        std::fs::create_dir_all(&empty).unwrap();
        let mut child = strata()
            .args(["node", "--listen", "127.0.0.1:0", "--no-mdns", "--memory", "2GiB", "--name", tag])
            .args(["--model-dir", path_str(models.unwrap_or(&empty))])
            .args(["--cache-dir", path_str(&dir.join("cache"))])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start strata node");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr = line.trim().strip_prefix("listening on ").map(str::to_owned);
        let node = Node { child, addr: addr.clone().unwrap_or_default(), log };
        assert!(addr.is_some(), "the node did not start:\n{}", node.log());
        node
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (at most 10 s) for a line of the log containing `text`.
    fn wait_log(&self, text: &str) -> String {
        let t0 = Instant::now();
        loop {
            let log = self.log();
            if let Some(line) = log.lines().find(|l| l.contains(text)) {
                return line.to_owned();
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "no `{text}` in the node's log:\n{log}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run_args(model: &Path, prompt: &str) -> Vec<String> {
    ["run", "--json", "--model", path_str(model), "--prompt", prompt, "--max-tokens", "8", "--ignore-eos"]
        .map(str::to_owned)
        .to_vec()
}

/// `strata run` on `peer` alone with `extra`; its output.
fn run_on(peer: &str, model: &Path, prompt: &str, extra: &[&str]) -> std::process::Output {
    strata().args(run_args(model, prompt)).args(["--no-local", "--peer", peer]).args(extra).output().unwrap()
}

/// A node with the key answers a coordinator with the same key; a coordinator with no key
/// or another one is refused, with one clear line on each side, and nothing is loaded.
#[test]
fn a_peer_without_the_key_or_with_another_is_refused_on_both_sides() {
    let model = fixture("tiny-qwen3.gguf");
    let models = model_dir(std::slice::from_ref(&model));
    let node = Node::start("keyed", Some(&models), &["--cluster-key", KEY]);
    node.wait_log("cluster key");
    let prompt = "Paris is the capital of";

    let none = run_on(&node.addr, &model, prompt, &[]);
    let err = String::from_utf8_lossy(&none.stderr);
    assert!(!none.status.success(), "a coordinator without the key was served");
    assert!(err.contains("this coordinator has no cluster key"), "{err}");
    let refused = node.wait_log("refused a connection");
    assert!(refused.contains("does not speak this cluster's TLS"), "{refused}");

    let other = run_on(&node.addr, &model, prompt, &["--cluster-key", OTHER_KEY]);
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(!other.status.success(), "a coordinator with another key was served");
    assert!(err.contains("another cluster key"), "{err}");
    let t0 = Instant::now();
    while node.log().matches("refused a connection").count() < 2 {
        assert!(t0.elapsed() < Duration::from_secs(10), "the node logged no second refusal:\n{}", node.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!node.log().contains("loaded"), "a refused coordinator got the node to load:\n{}", node.log());

    let ok = run_on(&node.addr, &model, prompt, &["--cluster-key", KEY]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let piped: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    let single = strata_json(&run_args(&model, prompt).iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(piped["generated_ids"], single["generated_ids"]);
}

/// What a relay between coordinator and node carried, per connection and direction.
#[derive(Default)]
struct Recording {
    to_node: Vec<Vec<u8>>,
    from_node: Vec<Vec<u8>>,
}

/// Relays every connection to `target`, recording the bytes; runs until the test ends.
fn relay(target: String) -> (String, Arc<Mutex<Recording>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let rec = Arc::new(Mutex::new(Recording::default()));
    let r = rec.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(&target) else { return };
            let i = {
                let mut r = r.lock().unwrap();
                r.to_node.push(Vec::new());
                r.from_node.push(Vec::new());
                r.to_node.len() - 1
            };
            let pipe = |mut from: TcpStream, mut to: TcpStream, rec: Arc<Mutex<Recording>>, up: bool| {
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 1 << 16];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 || to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        let mut rec = rec.lock().unwrap();
                        let side = if up { &mut rec.to_node[i] } else { &mut rec.from_node[i] };
                        side.extend_from_slice(&buf[..n]);
                    }
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            };
            pipe(client.try_clone().unwrap(), server.try_clone().unwrap(), r.clone(), true);
            pipe(server, client, r.clone(), false);
        }
    });
    (addr, rec)
}

/// Splits `bytes` into TLS records (type, payload length); `None` if they are not TLS.
fn tls_records(bytes: &[u8]) -> Option<Vec<(u8, usize)>> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        if rest.len() < 5 || !(20..=23).contains(&rest[0]) || rest[1] != 3 {
            return None;
        }
        let len = u16::from_be_bytes([rest[3], rest[4]]) as usize;
        if rest.len() < 5 + len {
            // The last record may be cut where the recording ended.
            break;
        }
        out.push((rest[0], len));
        rest = &rest[5 + len..];
    }
    Some(out)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Coordinator and node through a recording relay: the model's weights are streamed to
/// the node, a prompt runs, and the recording holds only TLS records, none of the prompt's
/// text and none of the weights' bytes. Replaying the recorded client bytes to the node
/// in a new connection is refused.
#[test]
fn a_relay_sees_nothing_in_the_clear_and_a_replayed_handshake_is_refused() {
    let model = fixture("tiny-qwen3.gguf");
    let node = Node::start("relayed", None, &["--cluster-key", KEY]);
    let (relay_addr, rec) = relay(node.addr.clone());
    let prompt = "The secret launch code is zebra";
    let o = run_on(&relay_addr, &model, prompt, &["--cluster-key", KEY]);
    assert!(o.status.success(), "{}\n{}", String::from_utf8_lossy(&o.stderr), node.log());
    let piped: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let single = strata_json(&run_args(&model, prompt).iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(piped["generated_ids"], single["generated_ids"], "through the relay, the same tokens");

    let file = std::fs::read(&model).unwrap();
    let rec = rec.lock().unwrap();
    let all: Vec<&Vec<u8>> = rec.to_node.iter().chain(&rec.from_node).collect();
    let carried: usize = all.iter().map(|b| b.len()).sum();
    // The weights went through the relay (the node had no copy of the model).
    assert!(carried > file.len() / 2, "the relay carried {carried} bytes of a {}-byte model", file.len());
    for bytes in &all {
        let records = tls_records(bytes).unwrap_or_else(|| panic!("not TLS: {:?}", &bytes[..bytes.len().min(32)]));
        assert!(records.first().is_some_and(|r| r.0 == 22), "a connection that did not start with a handshake");
        assert!(!contains(bytes, prompt.as_bytes()) && !contains(bytes, b"zebra"), "the prompt's text in the clear");
        // Windows of tensor bytes from the model's data (its last 64 KiB are weights).
        for at in (file.len() - (64 << 10)..file.len() - 64).step_by(4096) {
            assert!(!contains(bytes, &file[at..at + 48]), "weight bytes at offset {at} in the clear");
        }
    }
    eprintln!("relay: {} connections, {carried} bytes, every one TLS records", rec.to_node.len());

    // Replay the first connection's client bytes to the node itself.
    let recorded = rec.to_node[0].clone();
    drop(rec);
    let mut s = TcpStream::connect(&node.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(&recorded);
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let line = node.wait_log("handshake did not verify");
    assert!(line.contains("refused a connection"), "{line}");
    eprintln!("replay: the node answered {} bytes, then closed; logged: {line}", answer.len());
}

/// A node listening beyond loopback needs a key, or `--insecure` (which warns); `init`
/// writes a private key file that nodes and coordinators then use without flags.
#[test]
fn init_and_the_rule_for_nodes_beyond_loopback() {
    let fails = |args: &[&str]| {
        let o = strata().args(args).output().unwrap();
        assert!(!o.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let err = fails(&["node", "--listen", "0.0.0.0:0", "--no-mdns"]);
    assert!(err.contains("refusing to listen on 0.0.0.0:0 without a cluster key"), "{err}");
    let err = fails(&["node", "--listen", "0.0.0.0:0", "--no-mdns", "--insecure", "--cluster-key", KEY]);
    assert!(err.contains("--insecure with a cluster key"), "{err}");
    assert!(fails(&["node", "--listen", "127.0.0.1:0", "--cluster-key", "short"]).contains("too short"));

    let mut insecure = strata()
        .args(["node", "--listen", "0.0.0.0:0", "--no-mdns", "--insecure", "--memory", "1GiB"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(insecure.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.starts_with("listening on 0.0.0.0:"), "{line}");
    let _ = insecure.kill();
    let out = insecure.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("warning: --insecure"));

    // `init` in a config directory of its own.
    let config = temp_dir("config");
    let with_config = |args: &[&str]| strata().args(args).env("XDG_CONFIG_HOME", &config).output().unwrap();
    let o = with_config(&["init"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let key = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    let file = config.join("strata/cluster.key");
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), key);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    let again = with_config(&["init"]);
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("already holds"));
    // Stored from another machine's `init`: nothing printed.
    let o = with_config(&["init", "--force", "--key", KEY]);
    assert!(o.status.success() && o.stdout.is_empty(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), KEY);

    // A node and a coordinator that find the key file need no flag.
    let model = fixture("tiny-qwen3.gguf");
    let models = model_dir(std::slice::from_ref(&model));
    let dir = temp_dir("from-file");
    let mut child = strata()
        .args(["node", "--listen", "127.0.0.1:0", "--no-mdns", "--memory", "2GiB", "--model-dir", path_str(&models)])
        .args(["--cache-dir", path_str(&dir)])
        .env("XDG_CONFIG_HOME", &config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("listening on ").unwrap().to_owned();
    let o = strata()
        .args(run_args(&model, "hi"))
        .args(["--no-local", "--peer", &addr])
        .env("XDG_CONFIG_HOME", &config)
        .output()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
