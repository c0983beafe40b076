//! `strata run --json` against the goldens: prompt tokenisation and greedy generation
//! through the WGSL kernels.

use crate::golden;
use crate::support::{SMOL_Q4_1, fixture, golden as load_golden, model, path_str, smol_q8_0, strata_json};

fn greedy_matches(model: &std::path::Path, golden_name: &str) {
    let g = load_golden(golden_name);
    for (i, seq) in golden::sequences(&g).iter().enumerate() {
        let n = seq.ref_greedy_ids.len().to_string();
        let out = strata_json(&[
            "run",
            "--model",
            path_str(model),
            "--prompt",
            &seq.prompt,
            "--max-tokens",
            &n,
            "--ignore-eos",
            "--json",
        ]);
        let ids =
            |k: &str| -> Vec<u32> { out[k].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect() };
        assert_eq!(ids("prompt_ids"), seq.prompt_ids, "{golden_name} sequence {i}: prompt ids");
        golden::check_greedy(&format!("{golden_name} sequence {i}"), seq, &ids("generated_ids"));
        assert!(out["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn tiny_qwen3_greedy() {
    greedy_matches(&fixture("tiny-qwen3.gguf"), "tiny-qwen3.golden.json");
}

#[test]
fn tiny_qwen35_greedy() {
    greedy_matches(&fixture("tiny-qwen35.gguf"), "tiny-qwen35.golden.json");
}

#[test]
fn tiny_qwen35moe_greedy() {
    greedy_matches(&fixture("tiny-qwen35moe.gguf"), "tiny-qwen35moe.golden.json");
}

#[test]
fn smollm2_q4_1_greedy() {
    greedy_matches(&model(SMOL_Q4_1), "smollm2-135m-q4_1.golden.json");
}

#[test]
fn smollm2_q8_0_by_strata_quantize_greedy() {
    greedy_matches(&smol_q8_0(), "smollm2-135m-q8_0.golden.json");
}

#[test]
fn chat_flag_applies_the_template() {
    let out = strata_json(&[
        "run",
        "--model",
        path_str(&fixture("tiny-qwen3.gguf")),
        "--chat",
        "--prompt",
        "Write a haiku about GPUs.",
        "--max-tokens",
        "4",
        "--json",
    ]);
    let g = load_golden("tiny-qwen3.golden.json");
    let want = &golden::sequences(&g)[0].prompt_ids;
    let got: Vec<u32> = out["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    assert_eq!(&got, want);
}

#[test]
fn seeded_sampling_is_reproducible() {
    let m = fixture("tiny-qwen3.gguf");
    let run = |seed: &str| {
        strata_json(&[
            "run",
            "--model",
            path_str(&m),
            "--prompt",
            "Hello",
            "--max-tokens",
            "24",
            "--temperature",
            "1.0",
            "--top-k",
            "0",
            "--top-p",
            "1",
            "--min-p",
            "0",
            "--seed",
            seed,
            "--ignore-eos",
            "--json",
        ])["generated_ids"]
            .clone()
    };
    let a = run("42");
    assert_eq!(a, run("42"), "same seed, same tokens");
    assert_ne!(a, run("43"), "another seed, other tokens");
}
