//! The synthetic shapes: what `ModelConfig`, the tokenizer and the planner read back.

use super::*;
use crate::config::{LayerKind, ModelConfig};
use crate::gguf::Gguf;
use crate::plan::{ModelCost, NodeBudget, Plan, PlanConfig, PlanError};
use crate::tokenizer::Tokenizer;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// A small qwen35 shape (4 layers, the last attention, and one MTP block) for tests that
/// need a file in memory.
pub(crate) fn tiny(tied_output: bool, n_mtp: usize) -> Qwen35Shape {
    Qwen35Shape {
        name: "tiny zeros",
        n_embd: 64,
        n_ff: 128,
        n_vocab: 320,
        n_layer: 4,
        n_mtp,
        n_head: 4,
        n_head_kv: 2,
        head_dim: 16,
        n_rot: 8,
        rope_sections: [2, 1, 1, 0],
        rope_theta: 10_000.0,
        eps: 1e-6,
        full_attention_interval: 4,
        conv_kernel: 4,
        ssm_key_heads: 2,
        ssm_value_heads: 4,
        ssm_head_dim: 16,
        context_length: 4096,
        matrix_type: GgmlType::Q8_0,
        tied_output,
        moe: None,
    }
}

pub(crate) fn open_in_memory(shape: &Qwen35Shape) -> Gguf {
    Gguf::from_bytes(qwen35_zeros(shape).unwrap().to_bytes().unwrap()).unwrap()
}

/// A path in the temp dir, removed on drop.
struct TempPath(std::path::PathBuf);

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn tiny_shape_reads_back_as_its_config_and_tokenizer() {
    let g = open_in_memory(&tiny(false, 1));
    let cfg = ModelConfig::from_gguf(&g).unwrap();
    assert_eq!(cfg.n_layer(), 4);
    assert_eq!(cfg.n_mtp, 1);
    assert_eq!(cfg.layers, [LayerKind::DeltaNet, LayerKind::DeltaNet, LayerKind::DeltaNet, LayerKind::Attention]);
    assert!(!cfg.tied_output);
    assert!(g.tensors.iter().all(|t| g.tensor_data(t).iter().all(|&b| b == 0)));

    let tok = Tokenizer::from_gguf(&g).unwrap();
    let ids = tok.encode("hi <|im_end|>", true).unwrap();
    // One token per byte (token b is byte b), and the special token recognised.
    assert_eq!(ids, [u32::from(b'h'), u32::from(b'i'), u32::from(b' '), 258]);
    assert_eq!(tok.decode(&ids), "hi <|im_end|>");
    assert_eq!(tok.eos_id(), Some(258));
    assert!(tok.is_end_of_generation(258));
}

#[test]
fn gpt2_byte_map_is_a_bijection_onto_its_known_range() {
    let chars: std::collections::BTreeSet<char> = (0..=255u8).map(gpt2_byte_char).collect();
    assert_eq!(chars.len(), 256);
    assert_eq!(gpt2_byte_char(b' '), 'Ġ');
    assert_eq!(gpt2_byte_char(b'\n'), 'Ċ');
    assert_eq!(gpt2_byte_char(b'A'), 'A');
}

#[test]
fn vocabulary_smaller_than_the_byte_tokens_is_refused() {
    let shape = Qwen35Shape { n_vocab: 100, ..tiny(false, 0) };
    assert!(qwen35_zeros(&shape).is_err());
}

/// Bytes of the Q8_0 matrix {cols, rows}.
fn q8(cols: u64, rows: u64) -> u64 {
    cols * rows / 32 * 34
}

#[test]
fn qwen36_27b_shape_is_sparse_reads_back_and_plans_on_16_12_8_gib() {
    let path = TempPath(std::env::temp_dir().join(format!("strata-synthetic-27b-{}.gguf", std::process::id())));
    Shape::by_name("qwen36-27b").unwrap().zeros().unwrap().write(&path.0).unwrap();

    let g = Gguf::open(&path.0).unwrap();
    let cfg = ModelConfig::from_gguf(&g).unwrap();
    assert_eq!(cfg.n_layer(), 64);
    assert_eq!(cfg.n_mtp, 1);
    assert_eq!(cfg.layers.iter().filter(|&&k| k == LayerKind::Attention).count(), 16);
    assert_eq!(cfg.layers.iter().filter(|&&k| k == LayerKind::DeltaNet).count(), 48);
    assert_eq!((cfg.n_embd, cfg.n_ff, cfg.n_vocab), (5120, 17408, 248_320));
    let a = &cfg.attention;
    assert_eq!((a.n_head, a.n_head_kv, a.head_dim, a.n_rot, a.rope_theta), (24, 4, 256, 64, 1e7));
    let dn = cfg.deltanet.as_ref().unwrap();
    assert_eq!((dn.n_key_heads, dn.n_value_heads, dn.head_dim, dn.conv_kernel), (16, 48, 128, 4));
    assert!(!cfg.tied_output);
    assert_eq!(Tokenizer::from_gguf(&g).unwrap().encode("hi", false).unwrap().len(), 2);

    // The exact Q8_0 sizes, from the shapes in docs/qwen35.md.
    let (e, f, v) = (5120u64, 17408u64, 248_320u64);
    let f32s = |n: u64| n * 4;
    let common = 2 * f32s(e) + 2 * q8(e, f) + q8(f, e);
    let c = 2 * 128 * 16 + 128 * 48;
    let deltanet =
        common + q8(e, c) + q8(e, 128 * 48) + f32s(4 * c) + 2 * f32s(48) + 2 * q8(e, 48) + f32s(128) + q8(128 * 48, e);
    let attention = common + q8(e, 2 * 24 * 256) + 2 * q8(e, 4 * 256) + q8(24 * 256, e) + 2 * f32s(256);
    let mtp = attention + q8(2 * e, e) + 3 * f32s(e);
    let globals = 2 * q8(e, v) + f32s(e);
    let main = 48 * deltanet + 16 * attention + globals;
    let all: u64 = g.tensors.iter().map(|t| t.size).sum();
    assert_eq!(all, main + mtp);
    let apparent = std::fs::metadata(&path.0).unwrap().len();
    assert!(apparent >= all && apparent - all < 8 * MIB, "apparent size {apparent}, tensors {all}");
    println!(
        "Qwen3.6-27B Q8_0 shape: main pass {main} bytes ({:.3} GB), MTP block {mtp} bytes, file {apparent} bytes ({:.3} GB, {:.2} GiB)",
        main as f64 / 1e9,
        apparent as f64 / 1e9,
        apparent as f64 / GIB as f64
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let on_disk = std::fs::metadata(&path.0).unwrap().blocks() * 512;
        println!("on disk: {on_disk} bytes");
        assert!(on_disk < 64 * MIB, "the file is not sparse: {on_disk} bytes on disk");
    }

    let pc = PlanConfig::new(32_768);
    let cost = ModelCost::new(&g, &cfg, &pc).unwrap();
    assert_eq!(cost.unplanned_bytes, mtp);
    for (i, l) in cost.layers.iter().enumerate() {
        match l.kind {
            LayerKind::Attention => {
                assert_eq!(l.weight_bytes, attention, "layer {i}");
                assert_eq!(l.cache_bytes, 2 * 32_768 * 4 * 256 * 2);
                assert_eq!(l.cache_bytes, 128 * MIB);
            }
            LayerKind::DeltaNet => {
                assert_eq!(l.weight_bytes, deltanet, "layer {i}");
                assert_eq!(l.cache_bytes, (3 * 10_240 + 48 * 128 * 128) * 4);
                assert_eq!(l.cache_bytes, 3_268_608);
            }
        }
    }

    let nodes =
        [NodeBudget::new("a-16g", 16 * GIB), NodeBudget::new("b-12g", 12 * GIB), NodeBudget::new("c-8g", 8 * GIB)];
    let plan = Plan::auto(&cost, &nodes).unwrap();
    println!("ctx 32768, nodes 16/12/8 GiB:\n{}", plan.table());
    assert_eq!(plan.stages.iter().map(|s| s.layers.len()).sum::<usize>(), 64);
    for (st, node) in plan.stages.iter().zip(&nodes) {
        assert!(st.total_bytes <= node.usable_bytes, "{st:?}");
        // Memory used is even: within 5% of a node's memory of the average share.
        let share = st.total_bytes as f64 / node.usable_bytes as f64;
        let mean = plan.total_bytes() as f64 / (36 * GIB) as f64;
        assert!((share - mean).abs() < 0.05, "{}: {share:.3} of its memory, {mean:.3} on average", st.name);
    }
    assert_eq!(
        plan.stages[0].cache_bytes + plan.stages[1].cache_bytes + plan.stages[2].cache_bytes,
        16 * 128 * MIB + 48 * 3_268_608
    );

    // 2 GiB less on each node (30 GiB) still holds 28.9 GiB; 3 GiB less (27 GiB) does not.
    let shrink =
        |by: u64| nodes.iter().map(|n| NodeBudget::new(n.name.clone(), n.usable_bytes - by)).collect::<Vec<_>>();
    let tight = Plan::auto(&cost, &shrink(2 * GIB)).unwrap();
    println!("ctx 32768, nodes 14/10/6 GiB:\n{}", tight.table());
    let err = Plan::auto(&cost, &shrink(3 * GIB)).unwrap_err();
    println!("ctx 32768, nodes 13/9/5 GiB:\n{err}");
    let crate::Error::Plan(PlanError::DoesNotFit { needed, available, .. }) = err else { panic!("{err:?}") };
    assert_eq!(available, 27 * GIB);
    assert!(needed > available);
    assert!(err_text(&cost, &shrink(3 * GIB)).contains("the nodes have 27.00 GiB"));

    // A quarter of a million positions: the KV cache alone is 16 GiB.
    let long = ModelCost::new(&g, &cfg, &PlanConfig::new(262_144)).unwrap();
    let err = Plan::auto(&long, &nodes).unwrap_err();
    println!("ctx 262144, nodes 16/12/8 GiB:\n{err}");
    let roomy = [NodeBudget::new("a-24g", 24 * GIB), NodeBudget::new("b-24g", 24 * GIB)];
    println!("ctx 262144, nodes 24/24 GiB:\n{}", Plan::auto(&long, &roomy).unwrap().table());
}

fn err_text(cost: &ModelCost, nodes: &[NodeBudget]) -> String {
    Plan::auto(cost, nodes).unwrap_err().to_string()
}

#[test]
fn qwen36_35b_a3b_shape_plans_on_16_12_12_gib_and_reads_its_active_experts() {
    let path = TempPath(std::env::temp_dir().join(format!("strata-synthetic-35b-{}.gguf", std::process::id())));
    Shape::by_name("qwen36-35b-a3b").unwrap().zeros().unwrap().write(&path.0).unwrap();
    let g = Gguf::open(&path.0).unwrap();
    let cfg = ModelConfig::from_gguf(&g).unwrap();
    assert_eq!(cfg.arch, crate::config::Arch::Qwen35Moe);
    assert_eq!((cfg.n_layer(), cfg.n_mtp, cfg.n_embd, cfg.n_vocab), (40, 1, 2048, 248_320));
    assert_eq!(cfg.layers.iter().filter(|&&k| k == LayerKind::Attention).count(), 10);
    let moe = cfg.moe.clone().unwrap();
    assert_eq!((moe.n_expert, moe.n_expert_used, moe.expert_ff, moe.shared_ff), (256, 8, 512, 512));
    let a = &cfg.attention;
    assert_eq!((a.n_head, a.n_head_kv, a.head_dim, a.n_rot), (16, 2, 256, 64));
    let dn = cfg.deltanet.as_ref().unwrap();
    assert_eq!((dn.n_key_heads, dn.n_value_heads, dn.head_dim), (16, 32, 128));

    // Exact Q8_0 sizes from the shapes in docs/qwen35moe.md.
    let (e, f, n_exp, v) = (2048u64, 512u64, 256u64, 248_320u64);
    let f32s = |n: u64| n * 4;
    let experts = n_exp * (2 * q8(e, f) + q8(f, e));
    let ffn = f32s(e * n_exp) + experts + f32s(e) + 2 * q8(e, f) + q8(f, e);
    let norms = 2 * f32s(e);
    let c = 2 * 128 * 16 + 128 * 32;
    let deltanet = norms
        + ffn
        + q8(e, c)
        + q8(e, 128 * 32)
        + f32s(4 * c)
        + 2 * f32s(32)
        + 2 * q8(e, 32)
        + f32s(128)
        + q8(128 * 32, e);
    let attention = norms + ffn + q8(e, 2 * 16 * 256) + 2 * q8(e, 2 * 256) + q8(16 * 256, e) + 2 * f32s(256);
    let unread = experts - experts / n_exp * 8;
    let main = 30 * deltanet + 10 * attention + 2 * q8(e, v) + f32s(e);
    let all: u64 = g.tensors.iter().map(|t| t.size).sum();
    let mtp = all - main;
    assert_eq!(mtp, attention + q8(2 * e, e) + 3 * f32s(e));

    let cost = ModelCost::new(&g, &cfg, &PlanConfig { seqs: 4, ..PlanConfig::new(32_768) }).unwrap();
    assert_eq!(cost.unplanned_bytes, mtp);
    for (i, l) in cost.layers.iter().enumerate() {
        let want = if l.kind == LayerKind::Attention { attention } else { deltanet };
        assert_eq!((l.weight_bytes, l.read_bytes), (want, want - unread), "layer {i}");
        match l.kind {
            // 4 sequences of 32k positions, 2 KV heads of 256 at f16: 64 MiB each.
            LayerKind::Attention => assert_eq!(l.cache_bytes, 4 * 64 * MIB),
            LayerKind::DeltaNet => assert_eq!(l.cache_bytes, 4 * (3 * 8192 + 32 * 128 * 128) * 4),
        }
    }
    let read = cost.read_bytes_per_token(cfg.n_vocab);
    assert_eq!(read, main - 40 * unread - q8(e, v) + q8(e, v) / v);
    println!(
        "Qwen3.6-35B-A3B Q8_0 shape: main pass {:.2} GB, MTP {:.2} GB; a token reads {:.2} GB",
        main as f64 / 1e9,
        mtp as f64 / 1e9,
        read as f64 / 1e9
    );
    // About 3 GB of the 35 are read per token, as the model card's "A3B" says.
    assert!((2_500_000_000..3_500_000_000).contains(&read), "{read}");

    let nodes =
        [NodeBudget::new("a-16g", 16 * GIB), NodeBudget::new("b-12g", 12 * GIB), NodeBudget::new("c-12g", 12 * GIB)];
    let plan = Plan::auto(&cost, &nodes).unwrap();
    println!("ctx 32768, 4 sequences, nodes 16/12/12 GiB:\n{}", plan.table());
    assert_eq!(plan.stages.iter().map(|s| s.layers.len()).sum::<usize>(), 40);
    for (st, node) in plan.stages.iter().zip(&nodes) {
        assert!(st.total_bytes <= node.usable_bytes, "{st:?}");
        assert!(st.scratch_bytes >= cost.scratch.moe, "{st:?}");
    }
    let reads: u64 = plan.stages.iter().map(|s| cost.stage_read_bytes(s.layers.clone(), cfg.n_vocab)).sum();
    assert_eq!(reads, read);
}

#[test]
fn smollm2_shape_reads_back_as_its_config_and_tokenizer() {
    let shape = Shape::by_name("smollm2-135m").unwrap();
    let g = Gguf::from_bytes(shape.zeros().unwrap().to_bytes().unwrap()).unwrap();
    let cfg = ModelConfig::from_gguf(&g).unwrap();
    assert_eq!(cfg, shape.config());
    assert_eq!((cfg.n_embd, cfg.n_ff, cfg.n_vocab, cfg.n_layer()), (576, 1536, 49_152, 30));
    let a = &cfg.attention;
    assert_eq!((a.n_head, a.n_head_kv, a.head_dim, a.n_rot, a.rope_theta), (9, 3, 64, 64, 100_000.0));
    assert!(cfg.tied_output && cfg.deltanet.is_none() && cfg.moe.is_none());
    // Every matrix Q8_0, the embedding (which is also the head) too; the norms F32.
    for t in &g.tensors {
        let want = if t.dims.len() == 2 { GgmlType::Q8_0 } else { GgmlType::F32 };
        assert_eq!(t.ty, want, "{}", t.name);
    }
    assert_eq!(g.tensors.len(), 2 + 30 * 9);
    assert_eq!(Tokenizer::from_gguf(&g).unwrap().encode("hi", false).unwrap().len(), 2);
}

#[test]
fn a_shape_keeps_its_first_layers_and_their_pattern() {
    let smol = Shape::by_name("smollm2-135m").unwrap().with_layers(2).unwrap();
    let g = Gguf::from_bytes(smol.zeros().unwrap().to_bytes().unwrap()).unwrap();
    let cfg = ModelConfig::from_gguf(&g).unwrap();
    assert_eq!((cfg.n_layer(), cfg.n_embd, cfg.n_vocab), (2, 576, 49_152));
    assert_eq!(g.tensors.len(), 2 + 2 * 9);

    // Qwen3.6-27B's first 8 layers: its pattern (attention every fourth) and its MTP block.
    let big = Shape::by_name("qwen36-27b").unwrap().with_layers(8).unwrap().config();
    use LayerKind::{Attention as A, DeltaNet as D};
    assert_eq!(big.layers, [D, D, D, A, D, D, D, A]);
    assert_eq!((big.n_mtp, big.n_embd, big.n_ff), (1, 5120, 17408));
    let tiny = Shape::Qwen35(tiny(false, 1)).with_layers(3).unwrap();
    let cfg = ModelConfig::from_gguf(&Gguf::from_bytes(tiny.zeros().unwrap().to_bytes().unwrap()).unwrap()).unwrap();
    assert_eq!((cfg.layers.as_slice(), cfg.n_mtp), ([D, D, D].as_slice(), 1));

    for n in [0, 31] {
        let err = Shape::by_name("smollm2-135m").unwrap().with_layers(n).unwrap_err().to_string();
        assert!(err.contains("30 layers") && err.contains(&format!("not {n}")), "{err}");
    }
    assert_eq!(Shape::NAMES.map(|n| Shape::by_name(n).is_some()), [true; 3]);
    assert!(Shape::by_name("llama-7b").is_none());
}
