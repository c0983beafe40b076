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
    stage_on(path, max_batch, &GpuConfig::default())
}

fn stage_on(path: &std::path::Path, max_batch: u32, config: &GpuConfig) -> Stage {
    let gguf = Gguf::open(path).unwrap();
    let n_layer = strata_model::config::ModelConfig::from_gguf(&gguf).unwrap().n_layer();
    let gpu = Arc::new(Gpu::new(config).unwrap());
    Stage::load(gpu, &gguf, StageSpec::new(0..n_layer, 512, max_batch)).unwrap()
}

fn teacher_forced(path: &std::path::Path, golden_name: &str) {
    teacher_forced_on(path, golden_name, &GpuConfig::default());
}

fn teacher_forced_on(path: &std::path::Path, golden_name: &str, config: &GpuConfig) {
    let mut st = stage_on(path, 7, config);
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

/// Q8_0 products through integer dot products (x quantised per block of 32) stay within
/// the goldens' bar, in decode steps and prefill chunks alike.
#[test]
fn smollm2_q8_0_teacher_forced_with_int8_dot_products() {
    let config = GpuConfig { int8_dot: Some(true), ..GpuConfig::default() };
    teacher_forced_on(&smol_q8_0(), "smollm2-135m-q8_0.golden.json", &config);
}

/// Matrix products through cooperative matrices (each value as two f16, products summed
/// in f32) stay within the goldens' bar, in decode steps and prefill chunks alike: in a
/// child process on a lavapipe that offers them (`strata_node::testing::in_coop_child`).
#[test]
fn smollm2_q8_0_teacher_forced_with_cooperative_matrices() {
    if !strata_node::testing::in_coop_child("engine::smollm2_q8_0_teacher_forced_with_cooperative_matrices") {
        return;
    }
    let config = GpuConfig { coop_matrix: Some(true), ..GpuConfig::default() };
    teacher_forced_on(&smol_q8_0(), "smollm2-135m-q8_0.golden.json", &config);
}

/// With `--int8-dot`, a stage holds one scratch of quantised x for all its recordings,
/// of exactly the bytes the planner counts for it, and a step through it decodes as the
/// float path does (the goldens' bar, teacher-forced, above).
#[test]
fn int8_dot_scratch_is_one_per_stage_and_what_the_planner_counts() {
    use strata_model::plan::{ModelCost, PlanConfig};
    let path = fixture("tiny-qwen35.gguf");
    let gguf = Gguf::open(&path).unwrap();
    let config = strata_model::config::ModelConfig::from_gguf(&gguf).unwrap();
    let n = config.n_layer();
    let cost = ModelCost::new(&gguf, &config, &PlanConfig { max_batch: 7, ..PlanConfig::new(512) }).unwrap();
    let on = GpuConfig { int8_dot: Some(true), ..GpuConfig::default() };
    let mut st = stage_on(&path, 7, &on);
    // 7 rows of ffn_down's 384 values: two bytes each, and a scale per 32.
    assert_eq!(cost.int8_bytes(0..n), 7 * 384 * 2 + 7 * 12 * 4);
    assert_eq!(st.int8_scratch_bytes(), cost.int8_bytes(0..n));
    assert_eq!(stage(&path, 7).int8_scratch_bytes(), 0);
    let g = load_golden("tiny-qwen35.golden.json");
    let seq = &golden::sequences(&g)[0];
    for (pos, (&tok, topk)) in seq.forced_ids.iter().zip(&seq.ref_topk).enumerate().take(4) {
        let logits = st.logits(0, Input::Tokens(&[tok]), &[pos as u32]).unwrap();
        check_position("tiny-qwen35 with int8 dot products", pos, &logits, topk);
    }
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
                SeqStep::new(i as u64, pos[i] as u32, n as u32, tokens, Want::Logits)
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

/// A recurrent stage loaded with checkpoints keeps a sequence's DeltaNet state where a
/// step asks, and a later step at that position resumes from it: the logits are those of
/// a sequence that computed the same tokens from the start. A position without a
/// checkpoint is refused, naming where the state and the checkpoint are.
#[test]
fn a_recurrent_stage_resumes_a_sequence_from_its_checkpoint() {
    let mut st = small_stage("tiny-qwen35.gguf", 2, true);
    let first: Vec<u32> = (0..14).map(|i| (i * 37 + 5) % 200).collect();
    let then: Vec<u32> = vec![11, 22, 33, 44];
    let run = |st: &mut Stage, seq, pos, tokens: &[u32], checkpoint| logits_of(st, seq, pos, tokens, checkpoint, None);
    // Sequence 1: 8 tokens with a checkpoint after them, 6 more, then 2 decode steps.
    run(&mut st, 1, 0, &first[..8], true).unwrap();
    run(&mut st, 1, 8, &first[8..12], false).unwrap();
    run(&mut st, 1, 12, &first[12..13], false).unwrap();
    run(&mut st, 1, 13, &first[13..14], false).unwrap();
    // Back to position 8 with other tokens: from the checkpoint.
    let resumed = run(&mut st, 1, 8, &then, false).unwrap();
    // Sequence 2 computes the same tokens from the start, in the same chunks.
    run(&mut st, 2, 0, &first[..8], false).unwrap();
    let fresh = run(&mut st, 2, 8, &then, false).unwrap();
    assert_eq!(resumed, fresh, "resumed from the checkpoint, the logits are those of a fresh run");
    // The checkpoint is still there (it holds a prefix of what sequence 1 holds now).
    assert_eq!(run(&mut st, 1, 8, &then, false).unwrap(), fresh);
    // No checkpoint at 5, and none at all for sequence 2.
    let e = run(&mut st, 1, 5, &then, false).unwrap_err();
    assert!(e.contains("recurrent state is at 12 and its checkpoint at 8"), "{e}");
    let e = run(&mut st, 2, 4, &then, false).unwrap_err();
    assert!(e.contains("recurrent state is at 12") && !e.contains("checkpoint"), "{e}");
    // Starting over at 0 drops the checkpoint.
    run(&mut st, 1, 0, &first[..4], false).unwrap();
    run(&mut st, 1, 4, &first[4..12], false).unwrap();
    let e = run(&mut st, 1, 8, &then, false).unwrap_err();
    assert!(e.contains("recurrent state is at 12") && !e.contains("checkpoint"), "{e}");
    // A stage loaded without checkpoints refuses a step that asks for one.
    let mut plain = small_stage("tiny-qwen35.gguf", 1, false);
    let e = run(&mut plain, 1, 0, &first[..8], true).unwrap_err();
    assert!(e.contains("loaded without them"), "{e}");
}

/// The whole of fixture `name` on one stage: context 64, steps of 16 rows, `seqs` slots,
/// with or without checkpoints of recurrent state.
fn small_stage(name: &str, seqs: u32, checkpoints: bool) -> Stage {
    let gguf = Gguf::open(fixture(name)).unwrap();
    let n_layer = strata_model::config::ModelConfig::from_gguf(&gguf).unwrap().n_layer();
    let gpu = Arc::new(Gpu::new(&GpuConfig::default()).unwrap());
    Stage::load(gpu, &gguf, StageSpec { checkpoints, ..StageSpec::new(0..n_layer, 64, 16).with_seqs(seqs) }).unwrap()
}

/// A step of one sequence on `st` asking for the last row's logits (`checkpoint`: keeping
/// its recurrent state after it; `fork`: a new sequence forked from that one at `pos`), or
/// the error it got.
fn logits_of(
    st: &mut Stage,
    seq: u64,
    pos: u32,
    tokens: &[u32],
    checkpoint: bool,
    fork: Option<u64>,
) -> Result<Vec<f32>, String> {
    use strata_node::stage::{Produced, SeqStep, Want};
    let step =
        SeqStep { checkpoint, fork_from: fork, ..SeqStep::new(seq, pos, tokens.len() as u32, tokens, Want::Logits) };
    let out = st.step(&[step], None).unwrap();
    match out.seqs.into_iter().next().unwrap().1 {
        Ok(Produced::Logits(l)) => Ok(l),
        Ok(other) => panic!("a logits step produced {other:?}"),
        Err(e) => Err(e.to_string()),
    }
}

/// A sequence forked from another shares its KV blocks of the common prefix: the fork's
/// logits are those of a sequence that computed the prefix itself, the source goes on
/// unchanged after the fork writes its own copy of the block they shared, the shared
/// blocks are counted once, and they are freed when the last holder lets go.
#[test]
fn a_forked_sequence_shares_the_prefix_blocks_and_copies_the_one_it_writes() {
    let mut st = small_stage("tiny-qwen3.gguf", 4, false);
    let first: Vec<u32> = (0..24).map(|i| (i * 31 + 7) % 200).collect();
    let other = [9, 8, 7, 6];
    // Sequence 1: 16, 2, 2 tokens (blocks of 16: one full, one partial).
    logits_of(&mut st, 1, 0, &first[..16], false, None).unwrap();
    logits_of(&mut st, 1, 16, &first[16..18], false, None).unwrap();
    logits_of(&mut st, 1, 18, &first[18..20], false, None).unwrap();
    assert_eq!(st.pool().used_blocks, 2);
    // Sequence 2 forks it at 18 and writes 4 other tokens: it shares block 0 and copies
    // block 1 (positions 16 and 17 are the source's).
    let forked = logits_of(&mut st, 2, 18, &other, false, Some(1)).unwrap();
    assert_eq!(st.pool().used_blocks, 3, "the shared block is counted once");
    // The source goes on as if alone.
    let source_next = logits_of(&mut st, 1, 20, &first[20..24], false, None).unwrap();
    // Sequence 3 computes the fork's tokens from the start, in the same chunks.
    logits_of(&mut st, 3, 0, &first[..16], false, None).unwrap();
    logits_of(&mut st, 3, 16, &first[16..18], false, None).unwrap();
    assert_eq!(logits_of(&mut st, 3, 18, &other, false, None).unwrap(), forked, "the fork's logits are a fresh run's");
    st.release(3);
    // And sequence 4 the source's.
    logits_of(&mut st, 4, 0, &first[..16], false, None).unwrap();
    logits_of(&mut st, 4, 16, &first[16..18], false, None).unwrap();
    logits_of(&mut st, 4, 18, &first[18..20], false, None).unwrap();
    assert_eq!(logits_of(&mut st, 4, 20, &first[20..24], false, None).unwrap(), source_next, "the source is unchanged");
    st.release(4);
    // Bad forks are refused, naming the source.
    let e = logits_of(&mut st, 5, 30, &other, false, Some(1)).unwrap_err();
    assert!(e.contains("forks sequence 1 at position 30, past its 24 positions"), "{e}");
    let e = logits_of(&mut st, 5, 4, &other, false, Some(9)).unwrap_err();
    assert!(e.contains("forks sequence 9 at position 4, which this stage does not hold"), "{e}");
    // Freed when the last holder lets go: block 0 stays with sequence 2.
    st.release(1);
    assert_eq!(st.pool().used_blocks, 2);
    st.release(2);
    assert_eq!(st.pool().used_blocks, 0);
}

/// On a recurrent stage a fork starts from the source's checkpoint or its live state, and
/// computes what a fresh sequence computes; any other position is refused.
#[test]
fn a_forked_recurrent_sequence_starts_from_the_checkpoint_or_the_live_state() {
    let mut st = small_stage("tiny-qwen35.gguf", 3, true);
    let first: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % 200).collect();
    let then = [11, 22, 33, 44];
    // Sequence 1: 8 tokens with a checkpoint after them, then 4 more.
    logits_of(&mut st, 1, 0, &first[..8], true, None).unwrap();
    logits_of(&mut st, 1, 8, &first[8..12], false, None).unwrap();
    let at_checkpoint = logits_of(&mut st, 2, 8, &then, false, Some(1)).unwrap();
    st.release(2);
    let at_end = logits_of(&mut st, 2, 12, &then, false, Some(1)).unwrap();
    st.release(2);
    let e = logits_of(&mut st, 2, 10, &then, false, Some(1)).unwrap_err();
    assert!(e.contains("but its recurrent state is at 12 and its checkpoint at 8"), "{e}");
    // Fresh runs of the same tokens in the same chunks.
    logits_of(&mut st, 3, 0, &first[..8], false, None).unwrap();
    assert_eq!(logits_of(&mut st, 3, 8, &then, false, None).unwrap(), at_checkpoint, "forked at the checkpoint");
    st.release(3);
    logits_of(&mut st, 3, 0, &first[..8], false, None).unwrap();
    logits_of(&mut st, 3, 8, &first[8..12], false, None).unwrap();
    assert_eq!(logits_of(&mut st, 3, 12, &then, false, None).unwrap(), at_end, "forked at the live state");
}
