//! The GPU stage against the float64 goldens, logit by logit: every teacher-forced
//! position one token at a time (the decode kernels), and the same sequences in
//! prefill chunks (the batched kernels), checking the last row of each chunk.

use std::sync::Arc;

use strata_model::gguf::Gguf;
use strata_node::gpu::{Gpu, GpuConfig};
use strata_node::stage::{Input, Stage, StageSpec};

use crate::golden::{self, check_position};
use crate::support::{SMOL_Q4_1, fixture, golden as load_golden, model, smol_q8_0};

fn stage(path: &std::path::Path, max_batch: u32) -> Stage {
    let gguf = Gguf::open(path).unwrap();
    let n_layer = strata_model::config::ModelConfig::from_gguf(&gguf).unwrap().n_layer();
    let gpu = Arc::new(Gpu::new(&GpuConfig::default()).unwrap());
    Stage::load(gpu, &gguf, StageSpec::new(0..n_layer, 512, max_batch)).unwrap()
}

fn teacher_forced(path: &std::path::Path, golden_name: &str) {
    let mut st = stage(path, 7);
    let g = load_golden(golden_name);
    let mut worst = 0f32;
    for (s, seq) in golden::sequences(&g).iter().enumerate() {
        let what = format!("{golden_name} sequence {s} (decode)");
        let id = s as u64;
        for (pos, (&tok, topk)) in seq.forced_ids.iter().zip(&seq.ref_topk).enumerate() {
            let logits = st.logits(id, Input::Tokens(&[tok]), &[pos as u32]).unwrap();
            worst = worst.max(check_position(&what, pos, &logits, topk));
        }
        st.release(id);
        // Prefill in chunks of 7: batched matmul and causal attention over earlier chunks.
        let what = format!("{golden_name} sequence {s} (prefill)");
        for (c, chunk) in seq.forced_ids.chunks(7).enumerate() {
            let p0 = c * 7;
            let positions: Vec<u32> = (p0 as u32..(p0 + chunk.len()) as u32).collect();
            let logits = st.logits(id, Input::Tokens(chunk), &positions).unwrap();
            let last = p0 + chunk.len() - 1;
            worst = worst.max(check_position(&what, last, &logits, &seq.ref_topk[last]));
        }
        st.release(id);
    }
    assert_eq!(st.sequences(), 0);
    eprintln!("{golden_name}: worst top-16 logit error on the GPU {worst:.2e}");
}

#[test]
fn tiny_qwen3_teacher_forced_on_gpu() {
    teacher_forced(&fixture("tiny-qwen3.gguf"), "tiny-qwen3.golden.json");
}

#[test]
fn smollm2_q4_1_teacher_forced_on_gpu() {
    teacher_forced(&model(SMOL_Q4_1), "smollm2-135m-q4_1.golden.json");
}

#[test]
fn smollm2_q8_0_teacher_forced_on_gpu() {
    teacher_forced(&smol_q8_0(), "smollm2-135m-q8_0.golden.json");
}

#[test]
fn bad_steps_are_errors_not_panics() {
    let mut st = stage(&fixture("tiny-qwen3.gguf"), 4);
    let greedy = strata_model::sampling::SamplingParams::greedy();
    let cases: Vec<(Vec<u32>, Vec<u32>, &str)> = vec![
        (vec![], vec![], "1..=4 rows"),
        (vec![1; 5], (0..5).collect(), "1..=4 rows"),
        (vec![1, 2], vec![0], "2 token ids for 1 positions"),
        (vec![5000], vec![0], "outside the vocabulary"),
        (vec![1], vec![512], "past the context length"),
    ];
    for (ids, pos, want) in cases {
        let e = st.forward(9, Input::Tokens(&ids), &pos, &greedy).unwrap_err().to_string();
        assert!(e.contains(want), "{ids:?} at {pos:?}: `{e}` should mention `{want}`");
    }
    let e = st.forward(9, Input::Hidden(&[0.0; 128]), &[0], &greedy).unwrap_err().to_string();
    assert!(e.contains("first stage"), "{e}");
}

/// A long prompt prefilled in chunks, then decoded, against the CPU reference fed one
/// token at a time: the batched kernels (and chunk boundaries) agree with decode.
fn long_prefill_matches_reference(path: &std::path::Path) {
    let gguf = Gguf::open(path).unwrap();
    let mut reference = strata_model::reference::Reference::load(&gguf).unwrap();
    let mut st = stage(path, 64);
    let vocab = reference.config.n_vocab as u32;
    let prompt: Vec<u32> = (0..300u32).map(|i| 3 + (i * 7919 + 13) % (vocab - 3)).collect();
    let mut want = Vec::new();
    for &t in &prompt {
        want = reference.forward(t).unwrap();
    }
    let mut got = Vec::new();
    for (c, chunk) in prompt.chunks(64).enumerate() {
        let positions: Vec<u32> = (c as u32 * 64..c as u32 * 64 + chunk.len() as u32).collect();
        got = st.logits(0, Input::Tokens(chunk), &positions).unwrap();
    }
    let close = |got: &[f32], want: &[f32], what: &str| {
        let worst = got.iter().zip(want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
        assert!(worst < 0.02, "{what}: worst logit difference {worst}");
    };
    close(&got, &want, "after a 300-token prefill");
    let mut tok = 5;
    for i in 0..8u32 {
        let want = reference.forward(tok).unwrap();
        let got = st.logits(0, Input::Tokens(&[tok]), &[300 + i]).unwrap();
        close(&got, &want, &format!("decode step {i} after the prefill"));
        tok = 7 + i * 31;
    }
}

#[test]
fn tiny_qwen3_long_prefill_matches_reference() {
    long_prefill_matches_reference(&fixture("tiny-qwen3.gguf"));
}

#[test]
fn tiny_qwen35_teacher_forced_on_gpu() {
    teacher_forced(&fixture("tiny-qwen35.gguf"), "tiny-qwen35.golden.json");
}

#[test]
fn tiny_qwen35moe_teacher_forced_on_gpu() {
    teacher_forced(&fixture("tiny-qwen35moe.gguf"), "tiny-qwen35moe.golden.json");
}

#[test]
fn tiny_qwen35moe_long_prefill_matches_reference() {
    long_prefill_matches_reference(&fixture("tiny-qwen35moe.gguf"));
}

#[test]
fn tiny_qwen35_long_prefill_matches_reference() {
    long_prefill_matches_reference(&fixture("tiny-qwen35.gguf"));
}

/// The goldens' sequences teacher-forced together in shared steps: the first in prefill
/// chunks of 5 rows, the others one row per step beside it, every step's last row of each
/// sequence within the bar of the reference's logits.
fn teacher_forced_batched(path: &std::path::Path, golden_name: &str) {
    use strata_node::stage::{Produced, SeqStep, Want};
    let gguf = Gguf::open(path).unwrap();
    let n_layer = strata_model::config::ModelConfig::from_gguf(&gguf).unwrap().n_layer();
    let gpu = Arc::new(Gpu::new(&GpuConfig::default()).unwrap());
    let mut st = Stage::load(gpu, &gguf, StageSpec::new(0..n_layer, 512, 16).with_seqs(4)).unwrap();
    let g = load_golden(golden_name);
    let seqs = golden::sequences(&g);
    let mut pos = vec![0usize; seqs.len()];
    let mut worst = 0f32;
    while pos.iter().zip(&seqs).any(|(p, s)| *p < s.forced_ids.len()) {
        let steps: Vec<SeqStep> = seqs
            .iter()
            .enumerate()
            .filter(|(i, s)| pos[*i] < s.forced_ids.len())
            .map(|(i, s)| {
                let n = if i == 0 { 5 } else { 1 }.min(s.forced_ids.len() - pos[i]);
                let tokens = &s.forced_ids[pos[i]..pos[i] + n];
                SeqStep {
                    seq: i as u64,
                    pos: pos[i] as u32,
                    rows: n as u32,
                    tokens,
                    want: Want::Logits,
                    history: &[],
                    allowed: &[],
                }
            })
            .collect();
        let out = st.step(&steps, None).unwrap();
        for (step, (seq, produced)) in steps.iter().zip(out.seqs) {
            let Ok(Produced::Logits(logits)) = produced else { panic!("sequence {seq}: {produced:?}") };
            let i = seq as usize;
            let last = pos[i] + step.rows as usize - 1;
            let what = format!("{golden_name} sequence {i} (batched)");
            worst = worst.max(check_position(&what, last, &logits, &seqs[i].ref_topk[last]));
            pos[i] += step.rows as usize;
        }
    }
    eprintln!("{golden_name}: worst top-16 logit error batched {worst:.2e}");
}

#[test]
fn tiny_qwen3_teacher_forced_batched() {
    teacher_forced_batched(&fixture("tiny-qwen3.gguf"), "tiny-qwen3.golden.json");
}

#[test]
fn tiny_qwen35_teacher_forced_batched() {
    teacher_forced_batched(&fixture("tiny-qwen35.gguf"), "tiny-qwen35.golden.json");
}

#[test]
fn tiny_qwen35moe_teacher_forced_batched() {
    teacher_forced_batched(&fixture("tiny-qwen35moe.gguf"), "tiny-qwen35moe.golden.json");
}

#[test]
fn smollm2_q8_0_teacher_forced_batched() {
    teacher_forced_batched(&smol_q8_0(), "smollm2-135m-q8_0.golden.json");
}
