//! Pipelines of real `strata node` processes on loopback: the same tokens as one node,
//! whatever the split and wire format; malformed activations answered, not fatal.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Stdio};

use strata_proto::tokio_stream::wrappers::ReceiverStream;
use strata_proto::v1 as pb;

use crate::golden;
use crate::support::{fixture, golden as load_golden, path_str, smol_q8_0, strata, strata_json};

/// `strata node` processes, killed (by process id) however the test ends.
struct Cluster {
    nodes: Vec<Child>,
    /// Kept open while the nodes run.
    _stdouts: Vec<BufReader<ChildStdout>>,
    addrs: Vec<String>,
}

impl Cluster {
    /// Starts `n` nodes serving the models in `model_dir`, each offering the same memory.
    fn start(n: usize, model_dir: &Path) -> Cluster {
        // Every model the tests load is in `model_dir`; a cache of their own keeps the
        // nodes out of the user's.
        let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("cluster-cache-{}", std::process::id()));
        let mut cluster = Cluster { nodes: Vec::new(), _stdouts: Vec::new(), addrs: Vec::new() };
        for i in 0..n {
            let mut child = strata()
                .args(["node", "--listen", "127.0.0.1:0", "--no-mdns", "--memory", "4GiB", "--name", &format!("node{i}"), "--model-dir", path_str(model_dir), "--cache-dir", path_str(&cache)])
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("start strata node");
            let mut stdout = BufReader::new(child.stdout.take().expect("node stdout"));
            cluster.nodes.push(child);
            let mut line = String::new();
            stdout.read_line(&mut line).expect("read node stdout");
            let addr = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("node {i} printed `{}`", line.trim()));
            cluster.addrs.push(addr.to_owned());
            cluster._stdouts.push(stdout);
        }
        cluster
    }

    /// `--no-local --peer A --peer B ...`.
    fn flags(&self) -> Vec<String> {
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
fn model_dir(models: &[PathBuf]) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("cluster-models-{}-{}", std::process::id(), models.len()));
    let _ = std::fs::create_dir_all(&dir);
    for m in models {
        let link = dir.join(m.file_name().expect("file name"));
        if !link.exists() {
            std::os::unix::fs::symlink(m, &link).expect("link model");
        }
    }
    dir
}

fn generated(out: &serde_json::Value) -> Vec<u32> {
    out["generated_ids"].as_array().expect("generated_ids").iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

/// Runs every golden prompt on one node and on the cluster (with `extra` flags on both
/// sides and `cluster_flags` on the cluster's) and returns (single, cluster) ids.
fn compare(model: &Path, golden_name: &str, cluster: &Cluster, extra: &[&str], cluster_flags: &[&str]) -> Vec<(Vec<u32>, Vec<u32>)> {
    let g = load_golden(golden_name);
    golden::sequences(&g)
        .iter()
        .map(|seq| {
            let mut args = vec!["run", "--json", "--model", path_str(model), "--prompt", &seq.prompt, "--max-tokens", "32", "--ignore-eos"];
            args.extend_from_slice(extra);
            let single = strata_json(&args);
            let flags = cluster.flags();
            args.extend(flags.iter().map(String::as_str));
            args.extend_from_slice(cluster_flags);
            let piped = strata_json(&args);
            (generated(&single), generated(&piped))
        })
        .collect()
}

fn assert_same(what: &str, pairs: &[(Vec<u32>, Vec<u32>)]) {
    for (i, (single, cluster)) in pairs.iter().enumerate() {
        assert_eq!(single.len(), 32, "{what} prompt {i}");
        assert_eq!(single, cluster, "{what} prompt {i}: the cluster's tokens differ from one node's");
    }
}

#[test]
fn three_nodes_match_one_tiny_qwen3() {
    let m = fixture("tiny-qwen3.gguf");
    let cluster = Cluster::start(3, &model_dir(std::slice::from_ref(&m)));
    // Equal memory: the planner gives every node layers.
    assert_same("tiny-qwen3, auto split", &compare(&m, "tiny-qwen3.golden.json", &cluster, &[], &[]));
    // Uneven, and prefill in chunks of 8 so that several chunks are in flight at once.
    assert_same("tiny-qwen3, split 2,1,3", &compare(&m, "tiny-qwen3.golden.json", &cluster, &["--batch", "8"], &["--split", "2,1,3"]));
}

#[test]
fn three_nodes_match_one_tiny_qwen35() {
    let m = fixture("tiny-qwen35.gguf");
    let cluster = Cluster::start(3, &model_dir(std::slice::from_ref(&m)));
    // Layers 3 and 7 are attention, the rest DeltaNet: 2,1,5 puts one boundary between two
    // DeltaNet layers (1|2) and one between a DeltaNet and an attention layer (2|3).
    assert_same("tiny-qwen35, split 2,1,5", &compare(&m, "tiny-qwen35.golden.json", &cluster, &["--batch", "8"], &["--split", "2,1,5"]));
}

#[test]
fn three_nodes_match_one_smollm2_q8_0() {
    let m = smol_q8_0();
    let cluster = Cluster::start(3, &model_dir(std::slice::from_ref(&m)));
    assert_same("SmolLM2 Q8_0, auto split", &compare(&m, "smollm2-135m-q8_0.golden.json", &cluster, &[], &[]));
    assert_same("SmolLM2 Q8_0, split 4,20,6", &compare(&m, "smollm2-135m-q8_0.golden.json", &cluster, &["--batch", "4"], &["--split", "4,20,6"]));
}

#[test]
fn f16_wire_keeps_greedy_tokens() {
    let m = fixture("tiny-qwen3.gguf");
    let cluster = Cluster::start(3, &model_dir(std::slice::from_ref(&m)));
    let g = load_golden("tiny-qwen3.golden.json");
    for (i, seq) in golden::sequences(&g).iter().enumerate() {
        let mut args = vec!["run", "--json", "--model", path_str(&m), "--prompt", &seq.prompt, "--max-tokens", "32", "--ignore-eos", "--wire", "f16"];
        let flags = cluster.flags();
        args.extend(flags.iter().map(String::as_str));
        let out = strata_json(&args);
        golden::check_greedy(&format!("tiny-qwen3 over f16, sequence {i}"), seq, &generated(&out));
    }
}

#[test]
fn malformed_activations_are_answered_and_the_node_keeps_serving() {
    let m = fixture("tiny-qwen3.gguf");
    let cluster = Cluster::start(1, &model_dir(std::slice::from_ref(&m)));
    let gguf = strata_model::gguf::Gguf::open(&m).unwrap();
    let cfg = strata_model::config::ModelConfig::from_gguf(&gguf).unwrap();
    let n = cfg.n_layer() as u32;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    rt.block_on(async {
        let mut client = strata_proto::transport::connect(&cluster.addrs[0]).await.unwrap();
        // The last half of the layers: a stage that takes hidden states and samples.
        let load = pb::LoadShardRequest { model_id: gguf.identity().to_vec(), layer_start: n / 2, layer_end: n, ctx: 64, max_batch: 8, next_stage: String::new() };
        client.load_shard(load).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let mut results = client.forward(ReceiverStream::new(rx)).await.unwrap().into_inner();
        let act = |step: u64, pos: u32, hidden: Vec<u8>| pb::Activation {
            seq_id: 7,
            step,
            positions: vec![pos],
            hidden,
            format: pb::HiddenFormat::F32 as i32,
            want_token: true,
            ..Default::default()
        };
        let good = vec![0u8; cfg.n_embd * 4];
        let cases = [
            (act(0, 0, vec![1, 2, 3]), Some("hidden payload of 3 bytes")),
            (act(1, 5, good.clone()), Some("unknown sequence 7")),
            (pb::Activation { format: 9, ..act(2, 0, good.clone()) }, Some("unknown hidden format")),
            (act(3, 0, good.clone()), None),
            (act(4, 1, good[..cfg.n_embd * 2].to_vec()), Some("hidden payload")),
            (act(5, 1, good.clone()), None),
        ];
        for (a, want_error) in cases {
            let step = a.step;
            tx.send(a).await.unwrap();
            let r = results.message().await.unwrap().expect("a result");
            assert_eq!(r.step, step);
            match want_error {
                Some(e) => assert!(r.error.contains(e), "step {step}: error `{}` lacks `{e}`", r.error),
                None => assert!(r.error.is_empty() && (r.token_id as usize) < cfg.n_vocab, "step {step}: {r:?}"),
            }
        }
        let h = client.health(pb::HealthRequest {}).await.unwrap().into_inner();
        assert!(h.loaded && h.sequences == 1, "{h:?}");
        assert!(client.release(pb::ReleaseRequest { seq_id: 7 }).await.unwrap().into_inner().released);
    });
}
