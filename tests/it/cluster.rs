//! Pipelines of real `strata node` processes on loopback: the same tokens as one node,
//! whatever the split and wire format; malformed activations answered, not fatal.

use std::path::Path;

use strata_proto::tokio_stream::wrappers::ReceiverStream;
use strata_proto::v1 as pb;

use crate::golden;
use crate::support::{Cluster, fixture, golden as load_golden, model_dir, path_str, smol_q8_0, strata_json};

/// One sequence's rows of a step, asking for a token.
fn rows(seq_id: u64, pos: u32, rows: u32, token_ids: Vec<u32>) -> pb::SeqRows {
    pb::SeqRows { seq_id, pos, rows, token_ids, want_token: true, ..Default::default() }
}

/// A shard of `layers` for steps of `max_batch` rows, `ctx` positions and one sequence.
fn shard(
    gguf: &strata_model::gguf::Gguf,
    layers: std::ops::Range<u32>,
    ctx: u32,
    max_batch: u32,
) -> pb::LoadShardRequest {
    pb::LoadShardRequest {
        model_id: gguf.identity().to_vec(),
        layer_start: layers.start,
        layer_end: layers.end,
        ctx,
        max_batch,
        next_stage: String::new(),
        max_seqs: 4,
        kv_blocks: 0,
        kv_block_size: 16,
        checkpoints: false,
        draft_max: 0,
        mtp: false,
    }
}

/// `nodes` fresh nodes serving the tiny qwen3 fixture, its GGUF, config and layer count,
/// and a runtime for the tests' own gRPC clients.
struct TinyQwen3 {
    cluster: Cluster,
    gguf: strata_model::gguf::Gguf,
    cfg: strata_model::config::ModelConfig,
    n_layer: u32,
    rt: tokio::runtime::Runtime,
}

fn tiny_qwen3_nodes(nodes: usize) -> TinyQwen3 {
    let m = fixture("tiny-qwen3.gguf");
    let cluster = Cluster::start(nodes, &model_dir(std::slice::from_ref(&m)));
    let gguf = strata_model::gguf::Gguf::open(&m).unwrap();
    let cfg = strata_model::config::ModelConfig::from_gguf(&gguf).unwrap();
    let n_layer = cfg.n_layer() as u32;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    TinyQwen3 { cluster, gguf, cfg, n_layer, rt }
}

/// A client of the node at `addr`, without TLS.
async fn plain_client(addr: &str) -> pb::stage_client::StageClient<strata_proto::tonic::transport::Channel> {
    strata_proto::transport::connect(addr, &strata_proto::transport::Security::Plain).await.unwrap()
}

fn generated(out: &serde_json::Value) -> Vec<u32> {
    out["generated_ids"].as_array().expect("generated_ids").iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

/// Runs every golden prompt on one node and on the cluster (with `extra` flags on both
/// sides and `cluster_flags` on the cluster's) and returns (single, cluster) ids.
fn compare(
    model: &Path,
    golden_name: &str,
    cluster: &Cluster,
    extra: &[&str],
    cluster_flags: &[&str],
) -> Vec<(Vec<u32>, Vec<u32>)> {
    let g = load_golden(golden_name);
    golden::sequences(&g)
        .iter()
        .map(|seq| {
            let mut args = vec![
                "run",
                "--json",
                "--model",
                path_str(model),
                "--prompt",
                &seq.prompt,
                "--max-tokens",
                "32",
                "--ignore-eos",
            ];
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
    assert_same(
        "tiny-qwen3, split 2,1,3",
        &compare(&m, "tiny-qwen3.golden.json", &cluster, &["--batch", "8"], &["--split", "2,1,3"]),
    );
}

#[test]
fn three_nodes_match_one_tiny_qwen35() {
    let m = fixture("tiny-qwen35.gguf");
    let cluster = Cluster::start(3, &model_dir(std::slice::from_ref(&m)));
    // Layers 3 and 7 are attention, the rest DeltaNet: 2,1,5 puts one boundary between two
    // DeltaNet layers (1|2) and one between a DeltaNet and an attention layer (2|3).
    assert_same(
        "tiny-qwen35, split 2,1,5",
        &compare(&m, "tiny-qwen35.golden.json", &cluster, &["--batch", "8"], &["--split", "2,1,5"]),
    );
}

#[test]
fn three_nodes_match_one_tiny_qwen35moe() {
    let m = fixture("tiny-qwen35moe.gguf");
    let cluster = Cluster::start(3, &model_dir(std::slice::from_ref(&m)));
    // The same layout as tiny-qwen35: 1,3,4 puts one boundary inside the run of DeltaNet
    // layers 0..3 (0|1) and one right after the attention layer 3 (3|4).
    assert_same(
        "tiny-qwen35moe, split 1,3,4",
        &compare(&m, "tiny-qwen35moe.golden.json", &cluster, &["--batch", "8"], &["--split", "1,3,4"]),
    );
}

#[test]
fn three_nodes_match_one_smollm2_q8_0() {
    let m = smol_q8_0();
    let cluster = Cluster::start(3, &model_dir(std::slice::from_ref(&m)));
    assert_same("SmolLM2 Q8_0, auto split", &compare(&m, "smollm2-135m-q8_0.golden.json", &cluster, &[], &[]));
    assert_same(
        "SmolLM2 Q8_0, split 4,20,6",
        &compare(&m, "smollm2-135m-q8_0.golden.json", &cluster, &["--batch", "4"], &["--split", "4,20,6"]),
    );
}

#[test]
fn f16_wire_keeps_greedy_tokens() {
    let m = fixture("tiny-qwen3.gguf");
    let cluster = Cluster::start(3, &model_dir(std::slice::from_ref(&m)));
    let g = load_golden("tiny-qwen3.golden.json");
    for (i, seq) in golden::sequences(&g).iter().enumerate() {
        let mut args = vec![
            "run",
            "--json",
            "--model",
            path_str(&m),
            "--prompt",
            &seq.prompt,
            "--max-tokens",
            "32",
            "--ignore-eos",
            "--wire",
            "f16",
        ];
        let flags = cluster.flags();
        args.extend(flags.iter().map(String::as_str));
        let out = strata_json(&args);
        golden::check_greedy(&format!("tiny-qwen3 over f16, sequence {i}"), seq, &generated(&out));
    }
}

#[test]
fn malformed_activations_are_answered_and_the_node_keeps_serving() {
    let TinyQwen3 { cluster, gguf, cfg, n_layer: n, rt } = tiny_qwen3_nodes(1);
    rt.block_on(async {
        let mut client = plain_client(&cluster.addrs[0]).await;
        // The last half of the layers: a stage that takes hidden states and samples.
        client.load_shard(strata_proto::versioned(shard(&gguf, n / 2..n, 64, 8))).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let mut results = client.forward(ReceiverStream::new(rx)).await.unwrap().into_inner();
        let act = |step: u64, seqs: Vec<pb::SeqRows>, hidden: Vec<u8>| pb::Activation {
            step,
            seqs,
            hidden,
            format: pb::HiddenFormat::F32 as i32,
            failed: Vec::new(),
        };
        let row = vec![0u8; cfg.n_embd * 4];
        let good = |n: usize| row.repeat(n);
        let r = |seq, pos| rows(seq, pos, 1, Vec::new());
        use pb::StepErrorCode as C;
        // (activation, the step's error, each sequence's error or token).
        type Want = Option<(&'static str, C)>;
        type Case = (pb::Activation, Want, Vec<(u64, Want)>);
        let cases: Vec<Case> = vec![
            (act(0, vec![r(7, 0)], vec![1, 2, 3]), Some(("hidden payload of 3 bytes", C::InvalidArgument)), vec![]),
            (act(1, vec![r(7, 5)], good(1)), None, vec![(7, Some(("sequence 7", C::OutOfOrder)))]),
            (
                pb::Activation { format: 9, ..act(2, vec![r(7, 0)], good(1)) },
                Some(("unknown hidden format", C::InvalidArgument)),
                vec![],
            ),
            (act(3, vec![r(7, 0)], good(1)), None, vec![(7, None)]),
            (
                act(4, vec![r(7, 1)], good(1)[..cfg.n_embd * 2].to_vec()),
                Some(("hidden payload", C::InvalidArgument)),
                vec![],
            ),
            (act(5, vec![], Vec::new()), Some(("without sequences", C::InvalidArgument)), vec![]),
            // Two sequences: one out of order, the other runs.
            (act(6, vec![r(7, 1), r(8, 3)], good(2)), None, vec![(7, None), (8, Some(("sequence 8", C::OutOfOrder)))]),
            // Twice in one step: the first part runs, the second is refused.
            (
                act(7, vec![rows(9, 0, 2, Vec::new()), r(9, 2)], good(3)),
                None,
                vec![(9, Some(("appears twice", C::InvalidArgument)))],
            ),
            // Past the context.
            (act(8, vec![rows(10, 0, 8, Vec::new())], good(8)), None, vec![(10, None)]),
            (
                act(9, vec![rows(11, 60, 5, Vec::new())], good(5)),
                None,
                vec![(11, Some(("past the context", C::InvalidArgument)))],
            ),
        ];
        for (a, step_error, seqs) in cases {
            let step = a.step;
            tx.send(a).await.unwrap();
            let res = results.message().await.unwrap().expect("a result");
            assert_eq!(res.step, step);
            match step_error {
                Some((e, code)) => {
                    assert!(res.error.contains(e), "step {step}: error `{}` lacks `{e}`", res.error);
                    assert_eq!(res.error_code(), code, "step {step}: {res:?}");
                    continue;
                }
                None => assert!(res.error.is_empty(), "step {step}: {res:?}"),
            }
            for (seq, want) in seqs {
                // The last answer for the sequence (a refused second part comes after the first).
                let a = res
                    .seqs
                    .iter()
                    .rev()
                    .find(|a| a.seq_id == seq)
                    .unwrap_or_else(|| panic!("step {step}: no answer for {seq}: {res:?}"));
                match want {
                    Some((e, code)) => {
                        assert!(a.error.contains(e), "step {step}, seq {seq}: error `{}` lacks `{e}`", a.error);
                        assert_eq!(a.error_code(), code, "step {step}, seq {seq}: {a:?}");
                    }
                    None => assert!(
                        a.error.is_empty() && a.has_token && (a.token_id as usize) < cfg.n_vocab,
                        "step {step}: {a:?}"
                    ),
                }
            }
        }
        let h = client.health(pb::HealthRequest {}).await.unwrap().into_inner();
        // 7, 9 (its first part) and 10 hold slots and blocks.
        assert!(h.loaded && h.sequences == 3 && h.slots == 4 && h.slots_used == 3, "{h:?}");
        assert!(h.kv_blocks_used >= 3 && h.kv_blocks == 16 && h.kv_block_size == 16, "{h:?}");
        assert!(client.release(pb::ReleaseRequest { seq_id: 7 }).await.unwrap().into_inner().released);
    });
}

/// A `LoadShard` the adapter cannot hold (an absurd batch or context) or from another
/// protocol version is refused with a clear message before the loaded shard is dropped:
/// the node keeps serving it.
#[test]
fn absurd_shards_and_other_versions_are_refused_and_the_loaded_shard_keeps_serving() {
    let TinyQwen3 { cluster, gguf, cfg, n_layer: n, rt } = tiny_qwen3_nodes(1);
    let load = |ctx, max_batch| shard(&gguf, 0..n, ctx, max_batch);
    rt.block_on(async {
        let mut client = plain_client(&cluster.addrs[0]).await;
        client.load_shard(strata_proto::versioned(load(64, 8))).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let mut results = client.forward(ReceiverStream::new(rx)).await.unwrap().into_inner();
        let act = |step: u64, pos: u32| pb::Activation {
            step,
            seqs: vec![rows(3, pos, 1, vec![1])],
            hidden: Vec::new(),
            format: 0,
            failed: Vec::new(),
        };
        tx.send(act(0, 0)).await.unwrap();
        let r = results.message().await.unwrap().expect("a result");
        assert!(r.error.is_empty() && r.seqs[0].error.is_empty(), "{r:?}");

        for (ctx, max_batch, needle) in
            [(64, 4_000_000_000, "max_batch 4000000000"), (u32::MAX, 8, "context 4294967295")]
        {
            let s = client.load_shard(strata_proto::versioned(load(ctx, max_batch))).await.unwrap_err();
            assert_eq!(s.code(), strata_proto::tonic::Code::InvalidArgument, "{s:?}");
            assert!(
                s.message().contains(needle) && s.message().contains("max_storage_buffer_binding_size"),
                "{}",
                s.message()
            );
        }
        // No version (a coordinator older than 3), and another one.
        let mut other = strata_proto::tonic::Request::new(load(64, 8));
        other.metadata_mut().insert(strata_proto::VERSION_METADATA, "2".parse().unwrap());
        for (request, theirs) in [(strata_proto::tonic::Request::new(load(64, 8)), "an older one"), (other, "2")] {
            let s = client.load_shard(request).await.unwrap_err();
            assert_eq!(s.code(), strata_proto::tonic::Code::FailedPrecondition, "{s:?}");
            let want = format!("speaks protocol {}, the coordinator {theirs}", strata_proto::PROTOCOL_VERSION);
            assert!(s.message().contains(&want), "{}", s.message());
        }

        // The shard loaded first still holds sequence 3 and runs its next step.
        tx.send(act(1, 1)).await.unwrap();
        let r = results.message().await.unwrap().expect("a result");
        let a = &r.seqs[0];
        assert!(r.error.is_empty() && a.error.is_empty() && (a.token_id as usize) < cfg.n_vocab, "{r:?}");
        let h = client.health(pb::HealthRequest {}).await.unwrap().into_inner();
        assert!(h.loaded && h.sequences == 1, "{h:?}");
    });
}

/// A small deterministic generator for the fuzz test below (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Mostly small values, sometimes an extreme one.
    fn num(&mut self, small: u64) -> u64 {
        match self.below(10) {
            0 => u64::from(u32::MAX),
            1 => self.next() >> self.below(64),
            _ => self.below(small),
        }
    }
}

/// Fuzzing the node with well-formed but hostile steps: 300 random activations (random
/// sequences, positions, row counts, token ids, flags, penalty history, hidden payloads
/// of right and wrong sizes, unknown formats) to a first stage and to a last stage.
/// Every step is answered (a result or an error naming the problem), the stream survives,
/// and afterwards a valid step runs and the node reports its health.
#[test]
fn random_activations_are_answered_and_the_node_keeps_serving() {
    let TinyQwen3 { cluster, gguf, cfg, n_layer: n, rt } = tiny_qwen3_nodes(2);
    let cases = std::env::var("STRATA_FUZZ_STEPS").ok().and_then(|v| v.parse().ok()).unwrap_or(150u64);
    rt.block_on(async {
        let mut rng = Rng(0x5eed_cafe);
        let mut errors = 0;
        // Node 0 holds every layer (takes token ids and samples), node 1 the second half
        // (takes hidden rows and samples): each answers on its own.
        for (addr, layers) in [(&cluster.addrs[0], 0..n), (&cluster.addrs[1], n / 2..n)] {
            let first = layers.start == 0;
            let mut client = plain_client(addr).await;
            client.load_shard(strata_proto::versioned(shard(&gguf, layers, 64, 8))).await.unwrap();
            let (tx, rx) = tokio::sync::mpsc::channel(8);
            let mut results = client.forward(ReceiverStream::new(rx)).await.unwrap().into_inner();
            let mut sent = std::collections::BTreeSet::new();
            for step in 0..cases {
                let seqs: Vec<pb::SeqRows> = (0..rng.below(4))
                    .map(|_| {
                        let rows = rng.num(6) as u32;
                        let ids = (0..if rng.below(4) == 0 { rng.below(9) } else { u64::from(rows.min(8)) })
                            .map(|_| rng.num(cfg.n_vocab as u64 + 8) as u32)
                            .collect();
                        pb::SeqRows {
                            seq_id: rng.num(6),
                            pos: rng.num(70) as u32,
                            rows,
                            token_ids: if first { ids } else { Vec::new() },
                            want_token: rng.below(2) == 0,
                            want_logits: rng.below(8) == 0,
                            history: (0..rng.below(5)).map(|_| rng.num(cfg.n_vocab as u64 + 8) as u32).collect(),
                            ..Default::default()
                        }
                    })
                    .collect();
                sent.extend(seqs.iter().map(|s| s.seq_id));
                let rows: u64 = seqs.iter().map(|s| u64::from(s.rows)).sum();
                let hidden_len = match rng.below(4) {
                    0 => rng.below(64) as usize,
                    _ => (rows.min(64) as usize) * cfg.n_embd * 4,
                };
                let act = pb::Activation {
                    step,
                    seqs,
                    hidden: if first { Vec::new() } else { vec![0u8; hidden_len] },
                    format: if rng.below(10) == 0 { rng.below(5) as i32 } else { 0 },
                    failed: Vec::new(),
                };
                tx.send(act).await.expect("the node closed the stream");
                let r = results.message().await.expect("the stream broke").expect("a result");
                assert_eq!(r.step, step);
                errors += usize::from(!r.error.is_empty()) + r.seqs.iter().filter(|a| !a.error.is_empty()).count();
            }
            // Still serving: once the sequences the fuzzing left are released (as a
            // coordinator would), a fresh sequence's valid step runs.
            for seq_id in sent {
                client.release(pb::ReleaseRequest { seq_id }).await.unwrap();
            }
            let good = pb::Activation {
                step: cases,
                seqs: vec![rows(1000, 0, 1, if first { vec![1] } else { Vec::new() })],
                hidden: if first { Vec::new() } else { vec![0u8; cfg.n_embd * 4] },
                format: 0,
                failed: Vec::new(),
            };
            tx.send(good).await.unwrap();
            let r = results.message().await.unwrap().expect("a result");
            assert!(r.error.is_empty() && r.seqs.iter().all(|a| a.error.is_empty()), "{r:?}");
            let h = client.health(pb::HealthRequest {}).await.unwrap().into_inner();
            assert!(h.loaded, "{h:?}");
        }
        eprintln!("fuzzed {} random steps per stage: {errors} errors answered, none fatal", cases);
    });
}

/// Every forced position's logit row, one token per step, through the nodes at `addrs`
/// loaded with `split` (layers per node, in order), hidden states handed on in `format`.
fn wire_logits(
    addrs: &[String],
    model: &Path,
    split: &[u32],
    format: pb::HiddenFormat,
    seqs: &[golden::Sequence],
) -> Vec<Vec<Vec<f32>>> {
    let gguf = strata_model::gguf::Gguf::open(model).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    rt.block_on(async {
        let mut start = 0;
        for (k, &n) in split.iter().enumerate() {
            let mut client = plain_client(&addrs[k]).await;
            let next_stage = if k + 1 < split.len() { addrs[k + 1].clone() } else { String::new() };
            let load = pb::LoadShardRequest { next_stage, ..shard(&gguf, start..start + n, 256, 8) };
            client
                .load_shard(strata_proto::versioned(load))
                .await
                .unwrap_or_else(|s| panic!("loading {split:?} on {}: {}", addrs[k], s.message()));
            start += n;
        }
        let mut first = plain_client(&addrs[0]).await;
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let mut results = first.forward(ReceiverStream::new(rx)).await.unwrap().into_inner();
        let mut step = 0;
        let mut out = Vec::new();
        for (s, seq) in seqs.iter().enumerate() {
            let mut logits = Vec::new();
            for (pos, &tok) in seq.forced_ids.iter().enumerate() {
                let seq_rows = pb::SeqRows { want_logits: true, ..rows(s as u64, pos as u32, 1, vec![tok]) };
                let act = pb::Activation {
                    step,
                    seqs: vec![seq_rows],
                    hidden: Vec::new(),
                    format: format as i32,
                    failed: Vec::new(),
                };
                tx.send(act).await.unwrap();
                let r = results.message().await.unwrap().expect("a result");
                assert!(r.error.is_empty() && r.step == step && r.seqs[0].error.is_empty(), "step {step}: {r:?}");
                logits.push(
                    r.seqs[0]
                        .logits
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect::<Vec<f32>>(),
                );
                step += 1;
            }
            first.release(pb::ReleaseRequest { seq_id: s as u64 }).await.unwrap();
            out.push(logits);
        }
        out
    })
}

/// The largest |a - b| over every position of every sequence.
fn max_difference(a: &[Vec<Vec<f32>>], b: &[Vec<Vec<f32>>]) -> f32 {
    let mut worst = 0f32;
    for (sa, sb) in a.iter().zip(b) {
        assert_eq!(sa.len(), sb.len());
        for (ra, rb) in sa.iter().zip(sb) {
            assert_eq!(ra.len(), rb.len());
            worst = ra.iter().zip(rb).map(|(x, y)| (x - y).abs()).fold(worst, f32::max);
        }
    }
    worst
}

/// Teacher-forced logits: one node, then three with f32 on the wire (bit for bit the
/// same), then three with f16 (within the goldens' 0.05).
fn wire_formats_keep_logits(model: &Path, golden_name: &str, split: [u32; 3], sequences: usize) {
    let cluster = Cluster::start(3, &model_dir(&[model.to_owned()]));
    let g = load_golden(golden_name);
    let seqs: Vec<golden::Sequence> = golden::sequences(&g).into_iter().take(sequences).collect();
    let n_layer: u32 = split.iter().sum();
    let single = wire_logits(&cluster.addrs[..1], model, &[n_layer], pb::HiddenFormat::F32, &seqs);
    let f32_wire = wire_logits(&cluster.addrs, model, &split, pb::HiddenFormat::F32, &seqs);
    let f16_wire = wire_logits(&cluster.addrs, model, &split, pb::HiddenFormat::F16, &seqs);
    let (d32, d16) = (max_difference(&single, &f32_wire), max_difference(&single, &f16_wire));
    eprintln!("{golden_name}: largest logit difference from one node: f32 wire {d32:e}, f16 wire {d16:.4}");
    assert_eq!(d32, 0.0, "f32 on the wire must compute exactly what one node computes");
    assert!(d16 < golden::LOGIT_TOLERANCE, "f16 on the wire moved a logit by {d16}");
}

#[test]
fn wire_formats_keep_teacher_forced_logits_tiny_qwen3() {
    wire_formats_keep_logits(&fixture("tiny-qwen3.gguf"), "tiny-qwen3.golden.json", [2, 1, 3], 3);
}

#[test]
fn wire_formats_keep_teacher_forced_logits_smollm2_q8_0() {
    wire_formats_keep_logits(&smol_q8_0(), "smollm2-135m-q8_0.golden.json", [10, 12, 8], 1);
}

/// A stage passes a release on to the next stage and answers once that one has. A next
/// stage that is frozen (SIGSTOP: its sockets stay open and nothing answers) must not
/// hold the release open until HTTP/2's keep-alive gives up (40 s): the stage waits 3 s
/// for it, then answers for itself, and keeps serving.
#[test]
fn a_release_does_not_wait_on_a_frozen_next_stage() {
    let TinyQwen3 { cluster, gguf, n_layer: n, rt, .. } = tiny_qwen3_nodes(2);
    rt.block_on(async {
        let mut last = plain_client(&cluster.addrs[1]).await;
        last.load_shard(strata_proto::versioned(shard(&gguf, n / 2..n, 64, 8))).await.unwrap();
        let mut first = plain_client(&cluster.addrs[0]).await;
        let load = pb::LoadShardRequest { next_stage: cluster.addrs[1].clone(), ..shard(&gguf, 0..n / 2, 64, 8) };
        first.load_shard(strata_proto::versioned(load)).await.unwrap();
        // With the next stage up, for comparison.
        let t0 = std::time::Instant::now();
        first.release(pb::ReleaseRequest { seq_id: 1 }).await.unwrap();
        let up = t0.elapsed();

        cluster.signal(1, "STOP");
        let t0 = std::time::Instant::now();
        let answer =
            tokio::time::timeout(std::time::Duration::from_secs(30), first.release(pb::ReleaseRequest { seq_id: 2 }))
                .await
                .expect("the release waited 30 s on the frozen next stage")
                .expect("the release answered with an error");
        let frozen = t0.elapsed();
        eprintln!("release answered in {up:.2?} with the next stage up, {frozen:.2?} with it frozen");
        assert!(!answer.into_inner().released, "sequence 2 was never there");
        // The release was passed on and waited its 3 s (an answer at once would mean the
        // first stage never asked the frozen one), and no more than that and a margin for a
        // loaded machine.
        assert!(frozen >= std::time::Duration::from_millis(2900), "answered in {frozen:.2?}: not passed on?");
        assert!(frozen < std::time::Duration::from_secs(8), "the release took {frozen:.2?}");
        let h = first.health(pb::HealthRequest {}).await.unwrap().into_inner();
        assert!(h.loaded, "{h:?}");
        cluster.signal(1, "CONT");
    });
}
