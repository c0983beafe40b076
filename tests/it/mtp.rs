//! The MTP head on the GPU (`--speculative mtp`): its logits against the float64
//! reference's `ref_mtp`, and its drafts against the CPU reference's.

use std::sync::Arc;

use strata_model::gguf::Gguf;
use strata_model::reference::{Mtp, Reference};
use strata_model::sampling::SamplingParams;
use strata_node::gpu::{Gpu, GpuConfig};
use strata_node::stage::{Produced, SeqStep, Stage, StageSpec, Want};

use crate::golden::{self, check_position};
use crate::support::{fixture, golden as load_golden};

const MODEL: &str = "tiny-qwen35-mtp.gguf";
const GOLDEN: &str = "tiny-qwen35-mtp.golden.json";

/// Every layer of the MTP fixture for 4 sequences, with the MTP head drafting up to
/// `draft_max` tokens.
fn mtp_stage(draft_max: u32) -> Stage {
    let gguf = Gguf::open(fixture(MODEL)).unwrap();
    let n_layer = strata_model::config::ModelConfig::from_gguf(&gguf).unwrap().n_layer();
    let gpu = Arc::new(Gpu::new(&GpuConfig::default()).unwrap());
    let spec = StageSpec { draft_max, mtp: true, ..StageSpec::new(0..n_layer, 128, 64).with_seqs(4) };
    Stage::load(gpu, &gguf, spec).unwrap()
}

/// Teacher-forced as the reference is: the row at position p pairs token p with the main
/// model's hidden state at p - 1 (zeros at 0). One token per step checks the hidden state
/// each step keeps for the next; chunks of 3 check rows paired within a step.
#[test]
fn the_gpu_mtp_head_matches_its_reference() {
    let mut st = mtp_stage(3);
    let golden = load_golden(GOLDEN);
    let mut worst = 0f32;
    let raw = golden["sequences"].as_array().unwrap();
    for (s, (seq, raw)) in golden::sequences(&golden).iter().zip(raw).enumerate() {
        let ref_mtp = golden::mtp_rows(raw);
        let ids = &seq.forced_ids;
        assert_eq!(ref_mtp.len(), ids.len() - 1, "sequence {s}: a row per position after the first");
        let id = s as u64;
        for p in 0..ids.len() {
            let logits = st.mtp_logits(id, &ids[p..=p], &[p as u32]).unwrap();
            if p > 0 {
                let what = format!("MTP sequence {s} (one row per step)");
                worst = worst.max(check_position(&what, p, &logits, &ref_mtp[p - 1]));
            }
        }
        assert!(st.release(id));
        for (c, chunk) in ids.chunks(3).enumerate() {
            let p0 = c * 3;
            let positions: Vec<u32> = (p0 as u32..(p0 + chunk.len()) as u32).collect();
            let logits = st.mtp_logits(id, chunk, &positions).unwrap();
            let last = p0 + chunk.len() - 1;
            if last > 0 {
                let what = format!("MTP sequence {s} (chunks of 3)");
                worst = worst.max(check_position(&what, last, &logits, &ref_mtp[last - 1]));
            }
        }
        assert!(st.release(id));
    }
    eprintln!("tiny-qwen35-mtp: worst top-16 MTP logit error on the GPU {worst:.2e}");
}

/// The index of the largest value and its lead over the second.
fn argmax_gap(v: &[f32]) -> (u32, f32) {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    (order[0] as u32, v[order[0]] - v[order[1]])
}

/// A greedy step of `tokens` at `pos` that asks for `draft` MTP drafts: its token and the
/// drafts.
fn drafting_step(st: &mut Stage, seq: u64, pos: u32, tokens: &[u32], draft: u32) -> (u32, Vec<u32>) {
    let greedy = Want::Token { sampling: SamplingParams::greedy(), logprobs: None };
    let step = SeqStep { draft, ..SeqStep::new(seq, pos, tokens.len() as u32, tokens, greedy) };
    let mut out = st.step(&[step], None).unwrap();
    let drafts = out.drafts.pop().unwrap();
    match out.seqs.pop().unwrap().1.unwrap() {
        Produced::Token(t, _) => (t, drafts),
        other => panic!("a token step produced {other:?}"),
    }
}

/// After a prompt and after each later token, the head drafts what the CPU reference's
/// MTP block drafts: the token the model just chose, paired with the last hidden state,
/// then each draft paired with the block's own normed output, greedily. Compared up to
/// the first near-tie of the reference.
#[test]
fn the_gpu_mtp_head_drafts_what_the_reference_drafts() {
    let gguf = Gguf::open(fixture(MODEL)).unwrap();
    let mut main = Reference::load(&gguf).unwrap();
    let mut mtp = Mtp::load(&gguf, &main.config).unwrap().expect("the fixture has an MTP block");
    let mut st = mtp_stage(3);
    let golden = load_golden(GOLDEN);
    let (mut compared, mut steps) = (0, 0);
    for (s, seq) in golden::sequences(&golden).iter().enumerate() {
        let id = 100 + s as u64;
        let mut ids = seq.prompt_ids.clone();
        main.reset();
        mtp.reset();
        let mut hidden = vec![0.0; main.config.n_embd];
        let mut logits = Vec::new();
        // The reference's cache after the prompt: one row per prompt token.
        for &t in &ids {
            mtp.step(&main, t, &hidden).unwrap();
            (logits, hidden) = main.forward_hidden(t).unwrap();
        }
        let (mut gpu_token, mut drafts) = drafting_step(&mut st, id, 0, &ids, 3);
        for _ in 0..6 {
            steps += 1;
            let (token, gap) = argmax_gap(&logits);
            if gap < 1e-3 {
                break;
            }
            assert_eq!(gpu_token, token, "sequence {s}: the main model's token at {}", ids.len());
            // The reference's drafts: a scratch copy of its cache, as the GPU's draft rows
            // are rewritten by the next step.
            let mut draft_mtp = mtp.clone();
            let (mut t, mut h) = (token, hidden.clone());
            let mut want = Vec::new();
            for _ in 0..3 {
                let (l, out) = draft_mtp.step(&main, t, &h).unwrap();
                let (next, gap) = argmax_gap(&l);
                if gap < 1e-3 {
                    break;
                }
                want.push(next);
                (t, h) = (next, out);
            }
            assert_eq!(&drafts[..want.len()], &want[..], "sequence {s}: drafts after position {}", ids.len());
            compared += want.len();
            // One more token, the plain way on both sides.
            mtp.step(&main, token, &hidden).unwrap();
            (logits, hidden) = main.forward_hidden(token).unwrap();
            ids.push(token);
            (gpu_token, drafts) = drafting_step(&mut st, id, ids.len() as u32 - 1, &[token], 3);
        }
        assert!(st.release(id));
    }
    eprintln!("tiny-qwen35-mtp: {compared} MTP drafts equal the reference's over {steps} steps");
    assert!(compared >= 20, "only {compared} drafts compared");
}

/// Asking for MTP drafts where they cannot be made is refused with the reason, and the
/// stage goes on.
#[test]
fn mtp_drafts_a_stage_cannot_make_are_refused() {
    let gguf = Gguf::open(fixture("tiny-qwen35.gguf")).unwrap();
    let n_layer = strata_model::config::ModelConfig::from_gguf(&gguf).unwrap().n_layer();
    let gpu = Arc::new(Gpu::new(&GpuConfig::default()).unwrap());
    let spec = StageSpec { draft_max: 2, mtp: true, ..StageSpec::new(0..n_layer, 64, 16) };
    let err = Stage::load(gpu, &gguf, spec).err().expect("a model without an MTP block").to_string();
    assert!(err.contains("no MTP block"), "{err}");

    let mut st = mtp_stage(2);
    let step = |draft: u32, want: Want| SeqStep { draft, ..SeqStep::new(7, 0, 2, &[1, 2], want) };
    let greedy = || Want::Token { sampling: SamplingParams::greedy(), logprobs: None };
    let refused = |st: &mut Stage, s: SeqStep<'_>| st.step(&[s], None).unwrap().seqs.pop().unwrap().1.unwrap_err();
    let e = refused(&mut st, step(3, greedy())).to_string();
    assert!(e.contains("3 MTP drafts") && e.contains("--draft-max"), "{e}");
    let e = refused(&mut st, step(1, Want::Token { sampling: SamplingParams::greedy(), logprobs: Some(2) }));
    assert!(e.to_string().contains("logprobs"), "{e}");
    let (_, drafts) = drafting_step(&mut st, 7, 0, &[1, 2], 2);
    assert_eq!(drafts.len(), 2);
}
