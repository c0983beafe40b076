//! Weight shipping: loads a shard on a node, streaming it the tensor bytes it lacks.
//!
//! A node without the model file answers `LoadShard` with what it is missing: the header
//! (and tensor index) first, then per tensor the bytes from where its verified prefix
//! ends. This module streams exactly those bytes (`PushTensors`, chunks of
//! [`CHUNK_BYTES`], each with its checksum) and asks again, until the node loads. A
//! broken stream or a chunk that failed its checksum is followed by a fresh `LoadShard`,
//! which tells where to resume, up to [`MAX_FAILED_TRANSFERS`] times.
//!
//! With `pipeline`, this is the coordinator's boundary with the wire: it builds and reads
//! the proto messages of shard loading and tensor chunks.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use strata_model::gguf::Gguf;
use strata_proto::tokio_stream::wrappers::ReceiverStream;
use strata_proto::tonic::transport::Channel;
use strata_proto::v1::{self as pb, stage_client::StageClient};

/// Bytes of tensor data per chunk: large enough that per-message costs vanish, small
/// enough that a failed checksum costs little to send again.
pub const CHUNK_BYTES: usize = 1 << 20;
/// Transfers that may fail (broken stream, bad checksum) before loading gives up.
pub const MAX_FAILED_TRANSFERS: usize = 3;
/// The name under which the header and tensor index are streamed (see `strata_node::shard_cache`).
const HEADER: &str = "";

/// How loading one shard went.
#[derive(Debug, Clone, Copy)]
pub struct Shipped {
    pub weight_bytes: u64,
    /// Tensor and header bytes streamed to the node.
    pub streamed_bytes: u64,
    /// Seconds spent streaming.
    pub stream_secs: f64,
    /// Seconds from the first `LoadShard` to the loaded answer.
    pub total_secs: f64,
}

/// What a node answered it lacks; empty: loaded.
fn wants(r: &pb::LoadShardResponse) -> bool {
    r.need_header || !r.missing.is_empty()
}

/// Loads `req` on the node behind `client`, streaming from `source` whatever it lacks.
pub async fn load_shard(
    client: &mut StageClient<Channel>,
    req: pb::LoadShardRequest,
    source: Arc<Gguf>,
    node: &str,
) -> anyhow::Result<Shipped> {
    let t0 = Instant::now();
    let (mut streamed, mut stream_secs, mut failures) = (0u64, 0.0f64, 0usize);
    // Each pass either loads, or streams something; a node that keeps asking for what it
    // was sent (a bug) is stopped by this bound.
    for _ in 0..(MAX_FAILED_TRANSFERS + 4) {
        let resp = client
            .load_shard(strata_proto::versioned(req.clone()))
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?
            .into_inner();
        if !wants(&resp) {
            return Ok(Shipped {
                weight_bytes: resp.weight_bytes,
                streamed_bytes: streamed,
                stream_secs,
                total_secs: t0.elapsed().as_secs_f64(),
            });
        }
        let plan = transfer_plan(&resp, &source)?;
        let total: u64 = plan.iter().map(|(_, from, to)| to - from).sum();
        tracing::info!(
            node,
            bytes = total,
            header = resp.need_header,
            tensors = resp.missing.len(),
            "streaming weights"
        );
        let bar = crate::progress::bytes_bar(total, node);
        let t = Instant::now();
        let sent = push(client, &req.model_id, &plan, &source, &bar).await;
        stream_secs += t.elapsed().as_secs_f64();
        bar.finish_and_clear();
        match sent {
            Ok(n) => streamed += n,
            Err((n, status)) => {
                streamed += n;
                failures += 1;
                tracing::warn!(node, error = %status.message(), "weight transfer failed; asking the node where to resume");
                if failures > MAX_FAILED_TRANSFERS {
                    bail!("streaming weights to {node} failed {failures} times; last: {}", status.message());
                }
            }
        }
    }
    bail!("{node} still lacks weights after every transfer")
}

/// (tensor, from, to) to send: the header alone if the node has none, else the ranges it
/// named, each checked against the source file.
fn transfer_plan(resp: &pb::LoadShardResponse, source: &Gguf) -> anyhow::Result<Vec<(String, u64, u64)>> {
    if resp.need_header {
        // The node cannot know which tensors it needs before it has the index.
        let len = source.header_len;
        if len as usize > strata_proto::transport::MAX_MESSAGE_BYTES - (1 << 20) {
            bail!("the model's header and tensor index ({len} bytes) do not fit in one message");
        }
        return Ok(vec![(HEADER.to_owned(), 0, len)]);
    }
    resp.missing
        .iter()
        .map(|r| {
            let t = source
                .tensor(&r.tensor)
                .with_context(|| format!("the node asks for tensor `{}`, which the model lacks", r.tensor))?;
            if r.from >= r.to || r.to > t.size {
                bail!("the node asks for bytes {}..{} of tensor `{}` of {} bytes", r.from, r.to, r.tensor, t.size);
            }
            Ok((r.tensor.clone(), r.from, r.to))
        })
        .collect()
}

/// Streams `plan` in one `PushTensors` call; returns the bytes sent, and on failure the
/// status (the node records what it verified before it, so a retry resumes there).
async fn push(
    client: &mut StageClient<Channel>,
    model_id: &[u8],
    plan: &[(String, u64, u64)],
    source: &Arc<Gguf>,
    bar: &indicatif::ProgressBar,
) -> Result<u64, (u64, strata_proto::tonic::Status)> {
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::TensorChunk>(4);
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let producer = {
        let (plan, source, model_id, sent, bar) =
            (plan.to_vec(), source.clone(), model_id.to_vec(), sent.clone(), bar.clone());
        tokio::spawn(async move {
            for (tensor, from, to) in plan {
                let bytes = if tensor == HEADER {
                    &source.bytes()[..to as usize]
                } else {
                    &source.tensor_data(source.tensor(&tensor).expect("checked by transfer_plan"))[..to as usize]
                };
                let mut offset = from;
                while offset < to {
                    let end = (offset + CHUNK_BYTES as u64).min(to);
                    // The header goes whole: the node parses it in one piece.
                    let end = if tensor == HEADER { to } else { end };
                    let mut data = bytes[offset as usize..end as usize].to_vec();
                    let checksum = strata_proto::checksum::checksum(&data);
                    corrupt_for_tests(&mut data);
                    let chunk =
                        pb::TensorChunk { model_id: model_id.clone(), tensor: tensor.clone(), offset, data, checksum };
                    if tx.send(chunk).await.is_err() {
                        return; // the call ended (failed); its status says why
                    }
                    sent.fetch_add(end - offset, std::sync::atomic::Ordering::Relaxed);
                    bar.inc(end - offset);
                    offset = end;
                }
            }
        })
    };
    let result = client.push_tensors(ReceiverStream::new(rx)).await;
    producer.abort();
    let n = sent.load(std::sync::atomic::Ordering::Relaxed);
    match result {
        Ok(ack) => Ok(ack.into_inner().bytes_received),
        Err(s) => Err((n, s)),
    }
}

/// Fault injection for the integration tests: with `STRATA_TEST_CORRUPT_CHUNK=N`, the
/// N-th chunk this process sends (counting from 1) has a bit flipped after its checksum
/// was taken, once, so that the node's detection and this module's refetch are tested on
/// the real path.
fn corrupt_for_tests(data: &mut [u8]) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SENT: AtomicU64 = AtomicU64::new(0);
    let Some(n) = std::env::var("STRATA_TEST_CORRUPT_CHUNK").ok().and_then(|v| v.parse::<u64>().ok()) else { return };
    if SENT.fetch_add(1, Ordering::Relaxed) + 1 == n
        && let Some(b) = data.first_mut()
    {
        *b ^= 1;
    }
}
