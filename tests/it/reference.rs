//! The CPU reference forward pass against the float64 goldens: if it is right, it can
//! be the oracle for everything else.

use strata_model::gguf::Gguf;
use strata_model::reference::Reference;

use crate::golden::{self, check_position};
use crate::support::{fixture, golden as load_golden, model};

fn teacher_forced(gguf: &std::path::Path, golden_name: &str) {
    let g = Gguf::open(gguf).unwrap();
    let mut r = Reference::load(&g).unwrap();
    let golden = load_golden(golden_name);
    let mut worst = 0f32;
    for (s, seq) in golden::sequences(&golden).iter().enumerate() {
        r.reset();
        for (pos, (&id, topk)) in seq.forced_ids.iter().zip(&seq.ref_topk).enumerate() {
            let logits = r.forward(id).unwrap();
            worst = worst.max(check_position(&format!("{golden_name} sequence {s}"), pos, &logits, topk));
        }
    }
    eprintln!("{golden_name}: worst top-16 logit error {worst:.2e}");
}

#[test]
fn tiny_qwen3_teacher_forced() {
    teacher_forced(&fixture("tiny-qwen3.gguf"), "tiny-qwen3.golden.json");
}

#[test]
fn tiny_qwen35_teacher_forced() {
    teacher_forced(&fixture("tiny-qwen35.gguf"), "tiny-qwen35.golden.json");
}

#[test]
fn tiny_qwen35moe_teacher_forced() {
    teacher_forced(&fixture("tiny-qwen35moe.gguf"), "tiny-qwen35moe.golden.json");
}

#[test]
fn smollm2_q4_1_teacher_forced() {
    teacher_forced(&model("SmolLM2-135M-Instruct.Q4_1.gguf"), "smollm2-135m-q4_1.golden.json");
}

/// The MTP block on the CPU against `ref_mtp`, teacher-forced as llama.cpp feeds it: the
/// row at position p pairs token p with the main model's final (normed) hidden state at
/// p - 1 (zeros for row 0, which stays in the block's cache) and predicts token p + 1.
/// The main pass of the same file is checked too.
#[test]
fn tiny_qwen35_mtp_block_matches_its_reference() {
    use strata_model::reference::Mtp;

    let path = fixture("tiny-qwen35-mtp.gguf");
    teacher_forced(&path, "tiny-qwen35-mtp.golden.json");
    let g = Gguf::open(&path).unwrap();
    let mut main = Reference::load(&g).unwrap();
    let mut mtp = Mtp::load(&g, &main.config).unwrap().expect("the fixture has an MTP block");
    let golden = load_golden("tiny-qwen35-mtp.golden.json");
    let mut worst = 0f32;
    for (s, (seq, raw)) in golden::sequences(&golden).iter().zip(golden["sequences"].as_array().unwrap()).enumerate() {
        let ref_mtp = golden::mtp_rows(raw);
        let ids = &seq.forced_ids;
        assert_eq!(ref_mtp.len(), ids.len() - 1, "sequence {s}: a row per position after the first");
        main.reset();
        let hidden: Vec<Vec<f32>> = ids.iter().map(|&id| main.forward_hidden(id).unwrap().1).collect();
        mtp.reset();
        mtp.step(&main, ids[0], &vec![0.0; main.config.n_embd]).unwrap();
        for p in 1..ids.len() {
            let (logits, _) = mtp.step(&main, ids[p], &hidden[p - 1]).unwrap();
            worst = worst.max(check_position(&format!("MTP sequence {s}"), p, &logits, &ref_mtp[p - 1]));
        }
    }
    eprintln!("tiny-qwen35-mtp: worst top-16 MTP logit error on the CPU {worst:.2e}");
    // A row of the wrong width is an error, not a panic.
    assert!(mtp.step(&main, 1, &[0.0; 3]).is_err());
}
