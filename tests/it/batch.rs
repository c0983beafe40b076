//! Many sequences per step: a row's tokens do not depend on what else shares its step,
//! through one stage and through three nodes; the KV pool makes requests wait, not fail,
//! and refuses one that could never fit.

use std::path::Path;

use crate::golden;
use crate::support::{
    Cluster, fixture, golden as load_golden, model_dir, path_str, smol_q8_0, strata_coop, strata_json, strip_ansi,
};

/// Prompts of very different lengths beside the golden ones: one token, a long one (past
/// several prefill chunks), and a few in between.
const OTHERS: [&str; 5] = [
    "Hi",
    "The history of computing is long and winding. Early machines filled whole rooms, drew \
     kilowatts of power and were programmed by rewiring panels of switches by hand. Then came \
     stored programs, transistors, integrated circuits and finally microprocessors, each step \
     making machines smaller, cheaper and faster than the last, until computers fit in a pocket \
     and talked to each other across the whole planet. Today",
    "1 2 3 4 5 6 7 8",
    "The quick brown fox",
    "Once upon a time, in a land far away, there lived",
];

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v["generated_ids"].as_array().expect("generated_ids").iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// The arguments of `strata run --json` for `prompts` (one, or several batched into
/// shared steps) with `flags`.
fn run_args<'a>(model: &'a Path, prompts: &[&'a str], flags: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["run", "--json", "--model", path_str(model)];
    for p in prompts {
        args.extend(["--prompt", p]);
    }
    args.extend_from_slice(flags);
    args
}

/// `strata run` of one prompt alone: its generated ids.
fn alone(model: &Path, prompt: &str, flags: &[&str]) -> Vec<u32> {
    ids(&strata_json(&run_args(model, &[prompt], flags)))
}

/// `strata run` of every prompt at once (batched into shared steps): each one's ids.
fn batched(model: &Path, prompts: &[&str], flags: &[&str]) -> Vec<Vec<u32>> {
    let out = strata_json(&run_args(model, prompts, flags));
    out.as_array().unwrap_or_else(|| panic!("a JSON array: {out}")).iter().map(ids).collect()
}

/// Each golden prompt and the others, alone and then all eight at once, on one stage and
/// on three nodes: the same tokens. Steps of 8 rows, so decode rows of some sequences
/// share steps with prefill chunks of others.
fn batched_equals_alone(model: &Path, golden_name: &str, flags: &[&str]) {
    let g = load_golden(golden_name);
    let seqs = golden::sequences(&g);
    let mut prompts: Vec<&str> = seqs.iter().map(|s| s.prompt.as_str()).collect();
    prompts.extend(OTHERS);
    let mut common = vec!["--max-tokens", "24", "--ignore-eos", "--batch-tokens", "8"];
    common.extend_from_slice(flags);
    let solo: Vec<Vec<u32>> = prompts.iter().map(|p| alone(model, p, &common)).collect();
    let one = batched(model, &prompts, &common);
    let cluster = Cluster::start(3, &model_dir(&[model.to_owned()]));
    // Three steps in flight, as on three machines (one machine's nodes default to one).
    let mut piped_flags = common.clone();
    piped_flags.extend(["--micro-batches", "3"]);
    let cluster_flags = cluster.flags();
    piped_flags.extend(cluster_flags.iter().map(String::as_str));
    let three = batched(model, &prompts, &piped_flags);
    for (i, p) in prompts.iter().enumerate() {
        assert_eq!(solo[i].len(), 24, "prompt {i} {p:?} alone");
        assert_eq!(one[i], solo[i], "{golden_name} {flags:?}: prompt {i} {p:?} batched with 7 others on one stage");
        assert_eq!(three[i], solo[i], "{golden_name} {flags:?}: prompt {i} {p:?} batched with 7 others on three nodes");
    }
    // The greedy answers are the reference's, up to its first near-tie.
    if flags.is_empty() {
        for (i, s) in seqs.iter().enumerate() {
            let n = s.greedy_must_match().min(24);
            assert_eq!(
                one[i][..n],
                s.ref_greedy_ids[..n],
                "{golden_name} sequence {i} batched: the reference's greedy ids"
            );
        }
    }
}

#[test]
fn batched_equals_alone_tiny_qwen3() {
    batched_equals_alone(&fixture("tiny-qwen3.gguf"), "tiny-qwen3.golden.json", &[]);
}

#[test]
fn batched_equals_alone_tiny_qwen35() {
    batched_equals_alone(&fixture("tiny-qwen35.gguf"), "tiny-qwen35.golden.json", &[]);
}

#[test]
fn batched_equals_alone_tiny_qwen35moe() {
    batched_equals_alone(&fixture("tiny-qwen35moe.gguf"), "tiny-qwen35moe.golden.json", &[]);
}

#[test]
fn batched_equals_alone_smollm2_q8_0() {
    batched_equals_alone(&smol_q8_0(), "smollm2-135m-q8_0.golden.json", &[]);
}

/// With Q8_0 products through integer dot products (`--int8-dot on`), too, a sequence's
/// tokens do not depend on what shares its steps: three prompts alone, then batched with
/// five others in steps of 8 rows (decode rows beside prefill chunks), on one stage.
#[test]
fn batched_equals_alone_with_int8_dot_products_smollm2_q8_0() {
    let model = smol_q8_0();
    let g = load_golden("smollm2-135m-q8_0.golden.json");
    let seqs = golden::sequences(&g);
    let mut prompts: Vec<&str> = seqs.iter().map(|s| s.prompt.as_str()).collect();
    prompts.extend(OTHERS);
    let flags = ["--max-tokens", "16", "--ignore-eos", "--batch-tokens", "8", "--int8-dot", "on"];
    let all = batched(&model, &prompts, &flags);
    for (i, p) in prompts.iter().enumerate().take(3) {
        let solo = alone(&model, p, &flags);
        assert_eq!(solo.len(), 16, "prompt {i} {p:?} alone");
        assert_eq!(all[i], solo, "prompt {i} {p:?} batched with {} others", prompts.len() - 1);
    }
}

/// With every product through cooperative matrices (`--coop-matrix on`, on a lavapipe
/// that offers them), too, a sequence's tokens do not depend on what shares its steps: the
/// hybrid fixture's prompts alone, then batched with the others in steps of 8 rows (decode
/// rows beside prefill chunks), on one stage.
#[test]
fn batched_equals_alone_with_cooperative_matrices_tiny_qwen35() {
    let model = fixture("tiny-qwen35.gguf");
    let g = load_golden("tiny-qwen35.golden.json");
    let seqs = golden::sequences(&g);
    let mut prompts: Vec<&str> = seqs.iter().map(|s| s.prompt.as_str()).collect();
    prompts.extend(OTHERS);
    let run = |prompts: &[&str]| {
        let flags = ["--max-tokens", "16", "--ignore-eos", "--batch-tokens", "8", "--coop-matrix", "on"];
        let args = run_args(&model, prompts, &flags);
        // The flag alone asks for them.
        let mut cmd = strata_coop();
        cmd.env_remove("STRATA_COOP_MATRIX");
        let o = cmd.args(&args).env("RUST_LOG", "strata_node::gpu=info").output().expect("run strata");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "strata {args:?} ({}):\n{err}", o.status);
        assert!(
            strip_ansi(&err).contains("coop_matrix=Some("),
            "the products went through cooperative matrices:\n{err}"
        );
        let out: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
        match out.as_array() {
            Some(each) => each.iter().map(ids).collect::<Vec<_>>(),
            None => vec![ids(&out)],
        }
    };
    let all = run(&prompts);
    for (i, p) in prompts.iter().enumerate() {
        let solo = run(&[p]).remove(0);
        assert_eq!(solo.len(), 16, "prompt {i} {p:?} alone");
        assert_eq!(all[i], solo, "prompt {i} {p:?} batched with {} others", prompts.len() - 1);
    }
}

/// Seeded sampling draws by position, whatever the batch: the same text alone and batched.
#[test]
fn seeded_sampling_is_the_same_alone_and_batched() {
    let flags = ["--temperature", "0.9", "--top-k", "40", "--seed", "4242", "--repeat-penalty", "1.1"];
    batched_equals_alone(&fixture("tiny-qwen35.gguf"), "tiny-qwen35.golden.json", &flags);
}
