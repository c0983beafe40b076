//! Weight streaming: nodes without the model file are sent exactly their shard's bytes,
//! keep them across restarts, resume cut transfers, and refuse corrupted chunks; the
//! cluster then generates what one node does.

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout};
use std::time::{Duration, Instant};

use strata_model::config::ModelConfig;
use strata_model::gguf::Gguf;
use strata_model::plan::shard_tensors;
use strata_proto::tokio_stream::wrappers::ReceiverStream;
use strata_proto::tonic::Code;
use strata_proto::v1 as pb;

use crate::support::{fixture, path_str, spawn_node, strata};

const PROMPT: &str = "The capital of France is";

/// A `strata node` process with an empty --model-dir, killed (by id) when dropped.
struct Node {
    child: Child,
    _stdout: BufReader<ChildStdout>,
    addr: String,
}

impl Node {
    fn start(name: &str, cache: &Path) -> Node {
        let empty = temp_dir(&format!("{name}-models"));
        let (child, stdout, addr) = spawn_node(name, "127.0.0.1:0", "4GiB", &empty, cache);
        Node { child, _stdout: stdout, addr }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh, empty directory under the test temp dir.
fn temp_dir(tag: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("streaming-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `strata run` greedy on `model`: on one in-process node without `nodes`, else on them.
/// Returns the generated ids and stderr; `env` is set for the coordinator.
fn run(model: &Path, nodes: &[&Node], extra: &[&str], env: &[(&str, &str)]) -> (Vec<u32>, String) {
    let mut cmd = strata();
    cmd.args(["run", "--json", "--model", path_str(model), "--prompt", PROMPT, "--max-tokens", "16", "--ignore-eos"]);
    if !nodes.is_empty() {
        cmd.arg("--no-local");
        for n in nodes {
            cmd.args(["--peer", &n.addr]);
        }
    }
    cmd.args(extra).envs(env.iter().copied());
    let o = cmd.output().expect("run strata");
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "strata run failed:\n{stderr}");
    let out: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    let ids =
        out["generated_ids"].as_array().expect("generated_ids").iter().map(|v| v.as_u64().unwrap() as u32).collect();
    (ids, stderr)
}

/// Bytes the coordinator says it streamed to `node` (its line `streamed N bytes to NODE in ...`).
fn streamed(stderr: &str, node: &str) -> u64 {
    let lines: Vec<&str> =
        stderr.lines().filter(|l| l.starts_with("streamed ") && l.contains(&format!(" bytes to {node} in "))).collect();
    assert_eq!(lines.len(), 1, "one `streamed` line for {node} in:\n{stderr}");
    lines[0]
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unreadable line `{}`", lines[0]))
}

/// Header plus every tensor of `layers`: what a node without the file must be sent.
fn shard_bytes(g: &Gguf, layers: std::ops::Range<usize>) -> u64 {
    let cfg = ModelConfig::from_gguf(g).unwrap();
    g.header_len + shard_tensors(g, &cfg, layers, false).unwrap().iter().map(|t| t.size).sum::<u64>()
}

fn n_layer(g: &Gguf) -> usize {
    ModelConfig::from_gguf(g).unwrap().n_layer()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// A `LoadShard` as a coordinator of this version sends it.
fn load_req(g: &Gguf, layers: std::ops::Range<usize>) -> strata_proto::tonic::Request<pb::LoadShardRequest> {
    strata_proto::versioned(pb::LoadShardRequest {
        model_id: g.identity().to_vec(),
        layer_start: layers.start as u32,
        layer_end: layers.end as u32,
        ctx: 64,
        max_batch: 8,
        next_stage: String::new(),
        max_seqs: 1,
        kv_blocks: 0,
        kv_block_size: 16,
        checkpoints: false,
        draft_max: 0,
        mtp: false,
    })
}

fn chunk(g: &Gguf, tensor: &str, offset: u64, data: &[u8]) -> pb::TensorChunk {
    pb::TensorChunk {
        model_id: g.identity().to_vec(),
        tensor: tensor.to_owned(),
        offset,
        data: data.to_vec(),
        checksum: strata_proto::checksum::checksum(data),
    }
}

fn header_chunk(g: &Gguf) -> pb::TensorChunk {
    chunk(g, "", 0, &g.bytes()[..g.header_len as usize])
}

fn missing_total(r: &pb::LoadShardResponse) -> u64 {
    r.missing.iter().map(|m| m.to - m.from).sum()
}

#[test]
fn a_node_without_the_model_is_streamed_its_shard_and_a_restart_transfers_nothing() {
    let m = fixture("tiny-qwen3.gguf");
    let g = Gguf::open(&m).unwrap();
    let n = n_layer(&g);
    let split = format!("2,{}", n - 2);
    let (single, _) = run(&m, &[], &[], &[]);
    assert_eq!(single.len(), 16);
    let caches = [temp_dir("restart-cache0"), temp_dir("restart-cache1")];
    let want = [shard_bytes(&g, 0..2), shard_bytes(&g, 2..n)];
    {
        let nodes = [Node::start("node0", &caches[0]), Node::start("node1", &caches[1])];
        let (ids, err) = run(&m, &[&nodes[0], &nodes[1]], &["--split", &split], &[]);
        assert_eq!(ids, single, "the streamed cluster's tokens differ from one node's");
        // Exactly the header and the shard's tensors, not the whole file.
        assert_eq!(streamed(&err, "node0"), want[0]);
        assert_eq!(streamed(&err, "node1"), want[1]);
        assert!(want[0] < g.bytes().len() as u64 / 2, "node0's shard is a fraction of the file");
    }
    // Restarted with the same caches: nothing is sent again.
    let nodes = [Node::start("node0", &caches[0]), Node::start("node1", &caches[1])];
    let (ids, err) = run(&m, &[&nodes[0], &nodes[1]], &["--split", &split], &[]);
    assert_eq!(ids, single);
    assert_eq!((streamed(&err, "node0"), streamed(&err, "node1")), (0, 0), "{err}");
}

#[test]
fn a_transfer_cut_halfway_resumes_where_it_stopped() {
    let m = fixture("tiny-qwen3.gguf");
    let g = Gguf::open(&m).unwrap();
    let n = n_layer(&g);
    let node = Node::start("node0", &temp_dir("cut-cache"));
    let rt = rt();
    let (cut_tensor, cut_at, remaining) = rt.block_on(async {
        let mut client =
            strata_proto::transport::connect(&node.addr, &strata_proto::transport::Security::Plain).await.unwrap();
        let first = client.load_shard(load_req(&g, 0..n)).await.unwrap().into_inner();
        assert!(first.need_header && first.missing.is_empty(), "{first:?}");
        client.push_tensors(strata_proto::tokio_stream::iter(vec![header_chunk(&g)])).await.unwrap();
        let missing = client.load_shard(load_req(&g, 0..n)).await.unwrap().into_inner();
        assert!(!missing.need_header && missing.weight_bytes == 0);
        let total = missing_total(&missing);
        assert_eq!(total + g.header_len, shard_bytes(&g, 0..n));
        // Every tensor before the largest whole, then half of the largest's chunks; then
        // the call is dropped mid-stream (an HTTP/2 reset, as when a coordinator dies).
        const CHUNK: u64 = 16 << 10;
        let big = missing.missing.iter().max_by_key(|r| r.to).unwrap().clone();
        assert!(big.to >= 4 * CHUNK, "{big:?}");
        let cut_at = big.to / CHUNK / 2 * CHUNK;
        let mut chunks = Vec::new();
        for r in missing.missing.iter().take_while(|r| r.tensor != big.tensor) {
            let data = g.tensor_data(g.tensor(&r.tensor).unwrap());
            for off in (0..r.to).step_by(CHUNK as usize) {
                chunks.push(chunk(&g, &r.tensor, off, &data[off as usize..(off + CHUNK).min(r.to) as usize]));
            }
        }
        let data = g.tensor_data(g.tensor(&big.tensor).unwrap());
        for off in (0..cut_at).step_by(CHUNK as usize) {
            chunks.push(chunk(&g, &big.tensor, off, &data[off as usize..(off + CHUNK) as usize]));
        }
        let sent: u64 = chunks.iter().map(|c| c.data.len() as u64).sum();
        let (tx, rx) = tokio::sync::mpsc::channel(chunks.len() + 1);
        for c in chunks {
            tx.send(c).await.unwrap();
        }
        let mut pusher = client.clone();
        let call = tokio::spawn(async move { pusher.push_tensors(ReceiverStream::new(rx)).await });
        // The sender stays open (no clean end of stream): the node takes the chunks, then
        // the call is aborted under it.
        tokio::time::sleep(Duration::from_secs(1)).await;
        call.abort();
        let remaining = total - sent;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let r = client.load_shard(load_req(&g, 0..n)).await.unwrap().into_inner();
            if missing_total(&r) == remaining {
                // Resumes exactly after the last verified chunk, mid-tensor.
                let resumed =
                    r.missing.iter().find(|x| x.tensor == big.tensor).expect("the cut tensor is still missing");
                assert_eq!((resumed.from, resumed.to), (cut_at, big.to));
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the node never recorded the cut transfer's bytes: {} missing, want {remaining}",
                missing_total(&r)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        drop(tx);
        (big.tensor, cut_at, remaining)
    });
    assert!(cut_at > 0 && !cut_tensor.is_empty());
    // The coordinator sends only the rest, and the node then generates what one node does.
    let (single, _) = run(&m, &[], &[], &[]);
    let (ids, err) = run(&m, &[&node], &[], &[]);
    assert_eq!(ids, single);
    assert_eq!(streamed(&err, "node0"), remaining, "{err}");
}

#[test]
fn a_corrupted_chunk_is_refused_and_fetched_again() {
    let m = fixture("tiny-qwen3.gguf");
    let g = Gguf::open(&m).unwrap();
    let n = n_layer(&g);
    let node = Node::start("node0", &temp_dir("corrupt-cache"));
    let rt = rt();
    rt.block_on(async {
        let mut client =
            strata_proto::transport::connect(&node.addr, &strata_proto::transport::Security::Plain).await.unwrap();
        client.push_tensors(strata_proto::tokio_stream::iter(vec![header_chunk(&g)])).await.unwrap();
        let missing = client.load_shard(load_req(&g, 0..n)).await.unwrap().into_inner();
        let r = missing.missing.iter().max_by_key(|r| r.to).unwrap().clone();
        let data = g.tensor_data(g.tensor(&r.tensor).unwrap());
        let good = chunk(&g, &r.tensor, 0, &data[..4096]);
        let mut bad = chunk(&g, &r.tensor, 4096, &data[4096..8192]);
        bad.data[100] ^= 0x40;
        let e = client.push_tensors(strata_proto::tokio_stream::iter(vec![good, bad])).await.unwrap_err();
        assert_eq!(e.code(), Code::DataLoss, "{e:?}");
        assert!(
            e.message().contains(&r.tensor) && e.message().contains("offset 4096") && e.message().contains("checksum"),
            "{}",
            e.message()
        );
        // The good chunk is kept, the bad one is not.
        let after = client.load_shard(load_req(&g, 0..n)).await.unwrap().into_inner();
        let still = after.missing.iter().find(|x| x.tensor == r.tensor).unwrap();
        assert_eq!((still.from, still.to), (4096, r.to));
        // Chunks that do not fit are refused with a reason, and the node keeps serving.
        let gap = client
            .push_tensors(strata_proto::tokio_stream::iter(vec![chunk(&g, &r.tensor, 8192, &data[8192..9000])]))
            .await
            .unwrap_err();
        assert!(gap.message().contains("must continue"), "{}", gap.message());
        let unknown = client
            .push_tensors(strata_proto::tokio_stream::iter(vec![chunk(&g, "blk.99.nope", 0, &[1, 2])]))
            .await
            .unwrap_err();
        assert!(unknown.message().contains("no tensor `blk.99.nope`"), "{}", unknown.message());
    });
    let (single, _) = run(&m, &[], &[], &[]);
    // The coordinator itself corrupts its 3rd chunk: the node refuses it, the coordinator
    // asks where to resume and sends the rest, and the tokens are right.
    let (ids, err) = run(&m, &[&node], &[], &[("STRATA_TEST_CORRUPT_CHUNK", "3")]);
    assert_eq!(ids, single);
    assert!(err.contains("weight transfer failed") && err.contains("checksum"), "{err}");
    let rest = shard_bytes(&g, 0..n) - g.header_len - 4096;
    assert!(streamed(&err, "node0") > rest, "the refused chunks were sent again:\n{err}");
    // And now the cache is complete: nothing more to send.
    let (ids, err) = run(&m, &[&node], &[], &[]);
    assert_eq!(ids, single);
    assert_eq!(streamed(&err, "node0"), 0);
}

#[test]
fn smollm2_q8_0_streamed_to_a_node_matches_one_node() {
    let m = crate::support::smol_q8_0();
    let node = Node::start("node0", &temp_dir("smol-cache"));
    let g = Gguf::open(&m).unwrap();
    let (single, _) = run(&m, &[], &[], &[]);
    let (ids, err) = run(&m, &[&node], &[], &[]);
    assert_eq!(ids, single);
    assert_eq!(streamed(&err, "node0"), shard_bytes(&g, 0..n_layer(&g)));
}
