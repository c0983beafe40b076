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
