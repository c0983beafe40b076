//! The `strata` command line: help, bad input, and `bench`.

use crate::support::{fixture, path_str, strata, strata_fails as fails, strata_json};

#[test]
fn help_explains_every_command_and_flag() {
    let o = strata().arg("--help").output().unwrap();
    let top = String::from_utf8_lossy(&o.stdout);
    for cmd in ["run", "bench", "quantize", "node", "init"] {
        assert!(top.contains(cmd), "--help lacks `{cmd}`");
    }
    let o = strata().args(["run", "--help"]).output().unwrap();
    let run = String::from_utf8_lossy(&o.stdout);
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    for flag in [
        "--model",
        "--prompt",
        "--chat",
        "--max-tokens",
        "--temperature",
        "--top-k",
        "--top-p",
        "--min-p",
        "--repeat-penalty",
        "--seed",
        "--json",
        "--ctx",
        "--batch",
        "--adapter",
        "--int8-dot",
        "--coop-matrix",
        "--ignore-eos",
        "--peer",
        "--no-local",
        "--split",
        "--wire",
        "--cluster-key",
        "--cluster-key-file",
    ] {
        assert!(run.contains(flag), "`strata run --help` lacks {flag}");
        assert!(readme.contains(flag), "README lacks {flag}");
    }
}

#[test]
fn missing_and_malformed_models_are_named() {
    let err = fails(&["run", "--model", "/nonexistent/model.gguf", "--prompt", "hi"]);
    assert!(err.contains("/nonexistent/model.gguf"), "{err}");

    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let full = std::fs::read(fixture("tiny-qwen3.gguf")).unwrap();
    for (i, cut) in [3usize, 100, 5000, full.len() / 2, full.len() - 1].into_iter().enumerate() {
        let p = dir.join(format!("truncated-{i}.gguf"));
        std::fs::write(&p, &full[..cut]).unwrap();
        let err = fails(&["run", "--model", path_str(&p), "--prompt", "hi"]);
        assert!(err.contains("malformed GGUF") || err.contains("truncated"), "cut at {cut}: {err}");
    }
    let p = dir.join("not-a-gguf.gguf");
    std::fs::write(&p, b"this is not a model at all, just text").unwrap();
    let err = fails(&["run", "--model", path_str(&p), "--prompt", "hi"]);
    assert!(err.contains("bad magic"), "{err}");
}

#[test]
fn flags_out_of_range_are_refused() {
    let m = fixture("tiny-qwen3.gguf");
    let m = path_str(&m);
    assert!(fails(&["run", "--model", m, "--prompt", "hi", "--temperature", "-1"]).contains("temperature"));
    assert!(fails(&["run", "--model", m, "--prompt", "hi", "--top-p", "1.5"]).contains("top_p"));
    assert!(fails(&["run", "--model", m, "--prompt", "hi", "--batch", "0"]).contains("--batch"));
    assert!(fails(&["run", "--model", m, "--prompt", "hi", "--ctx", "5"]).contains("--ctx"));
    let err = fails(&["run", "--model", m, "--prompt", "hi", "--ctx", "16", "--max-tokens", "100"]);
    assert!(err.contains("context length 16"), "{err}");
    assert!(fails(&["quantize", m, "/tmp/x.gguf", "--type", "q5_k"]).contains("q5_k"));
    let err = fails(&["run", "--model", m, "--prompt", "hi", "--int8-dot", "maybe"]);
    assert!(err.contains("--int8-dot") && err.contains("`on` or `off`"), "{err}");
    let o = strata().args(["run", "--model", m, "--prompt", "hi"]).env("STRATA_INT8_DOT", "maybe").output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("STRATA_INT8_DOT=maybe"), "{err}");
    let err = fails(&["run", "--model", m, "--prompt", "hi", "--coop-matrix", "maybe"]);
    assert!(err.contains("--coop-matrix") && err.contains("`on` or `off`"), "{err}");
    let err = fails(&["run", "--model", m, "--prompt", "hi", "--coop-matrix", "on", "--int8-dot", "on"]);
    assert!(err.contains("--coop-matrix") && err.contains("cooperative matrices"), "{err}");
}

/// `--int8-dot on`: a Q8_0 model's matrix products go through `quantize_x` and `mm_dot`
/// (one of each per product) in the profiled 4-row step, and the bench's prefill and
/// one-row decode run on them too.
#[test]
fn bench_with_int8_dot_runs_q8_0_products_through_integer_dots() {
    let m = crate::support::smol_q8_0();
    let out = strata_json(&[
        "bench",
        "--model",
        path_str(&m),
        "--prompt-tokens",
        "16",
        "--decode-tokens",
        "2",
        "--profile",
        "--profile-rows",
        "4",
        "--profile-seqs",
        "4",
        "--int8-dot",
        "on",
        "--json",
    ]);
    let ops = out["profile"].as_array().unwrap_or_else(|| panic!("no profile: {out:#}"));
    let count = |name: &str| ops.iter().find(|o| o["op"] == name).map_or(0, |o| o["dispatches"].as_u64().unwrap());
    assert_eq!(count("mm_rows"), 0, "{ops:#?}");
    assert!(count("mm_dot") > 0 && count("mm_dot") == count("quantize_x"), "{ops:#?}");
    for key in ["prefill_tokens_per_s", "decode_tokens_per_s"] {
        assert!(out[key].as_f64().unwrap() > 0.0, "{key}: {out:#}");
    }
    let adapter = out["adapter"].as_str().unwrap_or_else(|| panic!("no adapter: {out:#}"));
    assert!(adapter.ends_with("[int8 dot]"), "the report says which path ran: {adapter}");
}

/// Nothing the user did not cause prints "error": without `XDG_RUNTIME_DIR` (a bare
/// container, a service, an ssh session) opening the GPU must not make the Vulkan
/// loader's layers complain on stderr.
#[test]
fn a_run_without_a_runtime_dir_prints_no_error() {
    let m = fixture("tiny-qwen3.gguf");
    let mut cmd = strata();
    cmd.args(["run", "--model", path_str(&m), "--prompt", "hi", "--max-tokens", "4"]);
    for var in
        ["XDG_RUNTIME_DIR", "WAYLAND_DISPLAY", "WAYLAND_SOCKET", "NODEVICE_SELECT", "MESA_VK_DEVICE_SELECT", "RUST_LOG"]
    {
        cmd.env_remove(var);
    }
    let o = cmd.output().expect("run strata");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "strata run failed:\n{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.to_lowercase().contains("error")).collect();
    assert!(errors.is_empty(), "stderr mentions errors nobody caused:\n{}", errors.join("\n"));
}

#[test]
fn bench_reports_what_it_measured() {
    let m = fixture("tiny-qwen3.gguf");
    // A context past the model's own (4096) runs, with a warning naming both.
    let o = strata()
        .args(["bench", "--model", path_str(&m), "--prompt-tokens", "8", "--decode-tokens", "2", "--ctx", "5000"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("--ctx 5000 is past the 4096 positions the model was trained on"), "{err}");
    let out =
        strata_json(&["bench", "--model", path_str(&m), "--prompt-tokens", "16", "--decode-tokens", "8", "--json"]);
    for key in [
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
        "decode_weight_gb_per_s",
        "read_bandwidth_gb_per_s",
        "bandwidth_fraction",
    ] {
        let v = out[key].as_f64().unwrap_or_else(|| panic!("{key} missing"));
        assert!(v.is_finite() && v > 0.0, "{key} = {v}");
    }
    assert!(out["weight_bytes_per_token"].as_u64().unwrap() > 1_000_000, "tiny-qwen3 reads over 1 MB per token");
}

/// `bench --profile` on the MoE model: a token reads only its chosen experts, and the
/// decode step's time is broken down by op, the MoE kernels among them.
#[test]
fn bench_profiles_a_moe_decode_step_and_counts_its_active_bytes() {
    let m = fixture("tiny-qwen35moe.gguf");
    let args = ["bench", "--model", path_str(&m), "--prompt-tokens", "16", "--decode-tokens", "8", "--json"];
    let out = strata_json(&[&args[..], &["--profile"]].concat());
    // 8 layers of 8 experts, 2 chosen: of 3 x 8 x 64 x 128 Q8_0 values a layer, a token
    // reads a quarter.
    let experts = 3 * 8 * 64 * 128 / 32 * 34;
    let g = strata_model::gguf::Gguf::open(&m).unwrap();
    let held: u64 = g.tensors.iter().map(|t| t.size).sum();
    let embd_row = g.tensor("token_embd.weight").unwrap().size / 1024;
    let want = held - g.tensor("token_embd.weight").unwrap().size + embd_row - 8 * (experts - experts / 4);
    let read = out["weight_bytes_per_token"].as_u64().unwrap();
    // What the GPU holds differs from the file by a few bytes per tensor (padding to a
    // word; small vectors the kernels do not count as weights).
    assert!(read.abs_diff(want) < want / 200, "reads {read}, want {want}");
    assert!(read < held * 3 / 5, "reads {read} of {held}: the unchosen experts are not read");
    let ops = out["profile"].as_array().unwrap_or_else(|| panic!("no profile: {out:#}"));
    let op = |name: &str| ops.iter().find(|o| o["op"] == name).unwrap_or_else(|| panic!("no {name}: {ops:#?}"));
    assert_eq!(op("step")["share"].as_f64().unwrap(), 1.0);
    for (name, per_layer) in [("moe_route", 1), ("matmul_id", 3), ("moe_combine", 1)] {
        assert_eq!(op(name)["dispatches"].as_u64().unwrap(), 8 * per_layer, "{name}");
        let ms = op(name)["ms_per_step"].as_f64().unwrap();
        assert!(ms > 0.0 && ms < op("step")["ms_per_step"].as_f64().unwrap(), "{name}: {ms} ms");
    }
}

/// `bench --profile --profile-seqs`: a decode step of several sequences, one row each,
/// op by op on a hybrid model (attention and DeltaNet layers); rows that do not split
/// evenly over the sequences are refused with a message naming both flags.
#[test]
fn bench_profiles_a_decode_step_of_several_sequences() {
    let m = fixture("tiny-qwen35.gguf");
    let args = ["bench", "--model", path_str(&m), "--prompt-tokens", "16", "--decode-tokens", "4", "--profile"];
    let out = strata_json(&[&args[..], &["--profile-rows", "4", "--profile-seqs", "4", "--json"]].concat());
    assert_eq!(out["profile_rows"], 4, "{out:#}");
    assert_eq!(out["profile_seqs"], 4, "{out:#}");
    let ops = out["profile"].as_array().unwrap_or_else(|| panic!("no profile: {out:#}"));
    let step = ops.iter().find(|o| o["op"] == "step").expect("the whole step");
    assert!(step["ms_per_step"].as_f64().unwrap() > 0.0, "{step}");
    for name in ["attention", "deltanet_state"] {
        let op = ops.iter().find(|o| o["op"] == name).unwrap_or_else(|| panic!("no {name}: {ops:#?}"));
        assert!(op["dispatches"].as_u64().unwrap() > 0, "{op}");
    }
    let err = fails(&[&args[..], &["--profile-rows", "4", "--profile-seqs", "3"]].concat());
    assert!(err.contains("--profile-rows 4") && err.contains("--profile-seqs 3"), "{err}");
}

/// `bench --concurrency`: several sequences through the scheduler, one stage and a
/// pipeline of two nodes; every figure it reports is there and sane.
#[test]
fn bench_with_concurrency_reports_batched_figures() {
    let m = fixture("tiny-qwen3.gguf");
    let cluster = crate::support::Cluster::start(2, &crate::support::model_dir(std::slice::from_ref(&m)));
    let flags = cluster.flags();
    for extra in [vec![], flags.iter().map(String::as_str).collect::<Vec<_>>()] {
        let mut args = vec![
            "bench",
            "--model",
            path_str(&m),
            "--prompt-tokens",
            "24",
            "--decode-tokens",
            "12",
            "--concurrency",
            "4",
            "--json",
        ];
        args.extend(extra.iter());
        let out = strata_json(&args);
        for key in [
            "aggregate_decode_tokens_per_s",
            "per_sequence_decode_tokens_per_s",
            "ttft_p50_ms",
            "ttft_p99_ms",
            "prefill_tokens_per_s",
            "output_tokens_per_s",
            "rows_per_step",
        ] {
            let v = out[key].as_f64().unwrap_or_else(|| panic!("{key} missing: {out:#}"));
            assert!(v.is_finite() && v > 0.0, "{key} = {v}: {out:#}");
        }
        assert_eq!(out["concurrency"].as_u64(), Some(4));
        assert!(out["ttft_p99_ms"].as_f64() >= out["ttft_p50_ms"].as_f64(), "{out:#}");
        // Four sequences share steps: more than one row per step on average.
        assert!(out["rows_per_step"].as_f64().unwrap() > 1.5, "{out:#}");
        let stages = out["stages"].as_array().unwrap();
        assert_eq!(stages.len(), if extra.is_empty() { 1 } else { 2 }, "{out:#}");
        for s in stages {
            let b = s["busy_fraction"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&b), "{s}");
        }
        let bubble = out["bubble"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&bubble), "{out:#}");
    }
}

/// `strata synthesize --shape SHAPE` into the test temp dir, then `strata plan` on it at
/// 32k context over `nodes` (plus `more` flags): the file and the printed plan.
fn synthesize_and_plan(shape: &str, nodes: [&str; 3], more: &[&str]) -> (std::path::PathBuf, String) {
    let model = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{shape}-shape.gguf"));
    let o = strata().args(["synthesize", "--shape", shape]).arg(&model).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut args = vec!["plan", "--model", path_str(&model), "--ctx", "32768"];
    for n in &nodes {
        args.extend(["--node", n]);
    }
    let o = strata().args(args).args(more).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8_lossy(&o.stdout).into_owned();
    eprintln!("{table}");
    (model, table)
}

#[test]
fn plan_splits_the_27b_shape_over_three_nodes() {
    let (model, table) = synthesize_and_plan("qwen36-27b", ["a=16GiB", "b=12GiB", "c=8GiB"], &[]);
    let m = path_str(&model);
    for row in ["a      0..", "b      ", "c      ", "..64 (", "64 layers"] {
        assert!(table.contains(row), "plan table lacks `{row}`:\n{table}");
    }
    // 36 GiB cannot hold the 27B at 256k context: the error gives the numbers.
    let err =
        fails(&["plan", "--model", m, "--ctx", "262144", "--node", "a=16GiB", "--node", "b=12GiB", "--node", "c=8GiB"]);
    assert!(err.contains("GiB") && err.contains("36.00"), "{err}");
    // Without --ctx, the most those nodes hold, said as such.
    let o = strata()
        .args(["plan", "--model", m, "--node", "a=16GiB", "--node", "b=12GiB", "--node", "c=8GiB"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out.lines().next().unwrap();
    assert!(line.contains("(the model's own is 262144: this is the most these nodes hold)"), "{out}");
    let ctx: u64 = line.split("context ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(ctx > 32768 && ctx < 262144, "{out}");
    eprintln!("the 27B shape on 16+12+8 GiB: {line}");
    std::fs::remove_file(&model).unwrap();
}

#[test]
fn plan_splits_the_35b_a3b_shape_and_counts_the_bytes_a_token_reads() {
    let (model, table) = synthesize_and_plan("qwen36-35b-a3b", ["a=16GiB", "b=12GiB", "c=12GiB"], &["--seqs", "4"]);
    for row in ["(qwen35moe, 40 layers)", "a      0..", "..40 (", "40 layers", "the routed experts it chooses only"] {
        assert!(table.contains(row), "plan table lacks `{row}`:\n{table}");
    }
    // About 3 GB of the 37 are read per token: "A3B".
    assert!(table.contains("weights read per decoded token: 3.20 GB of the 36.89 GB held"), "{table}");
    std::fs::remove_file(&model).unwrap();
}

/// `strata synthesize --shape smollm2-135m` writes SmolLM2-135M's exact tensor index (as
/// our Q8_0 copy of the real file has it), and a few layers of it load and run: what the
/// device benchmark (`scripts/bench-device.sh`) relies on where no model file can travel.
#[test]
fn synthesized_smollm2_shape_matches_the_real_index_and_runs() {
    use strata_model::gguf::Gguf;
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let full = dir.join("smollm2-shape.gguf");
    let o = strata().args(["synthesize", "--shape", "smollm2-135m"]).arg(&full).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The same tensors (names, shapes, types); the real file lists them in another order.
    let index = |g: &Gguf| {
        g.tensors
            .iter()
            .map(|t| (t.name.clone(), (t.dims.clone(), format!("{:?}", t.ty))))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let real = Gguf::open(crate::support::smol_q8_0()).unwrap();
    let zeros = Gguf::open(&full).unwrap();
    assert_eq!(index(&zeros), index(&real));
    std::fs::remove_file(&full).unwrap();

    let two = dir.join("smollm2-shape-2-layers.gguf");
    let o = strata().args(["synthesize", "--shape", "smollm2-135m", "--layers", "2"]).arg(&two).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("2 layers"));
    let m = path_str(&two);
    let out = strata_json(&["bench", "--model", m, "--prompt-tokens", "8", "--decode-tokens", "4", "--json"]);
    assert!(out["decode_tokens_per_s"].as_f64().unwrap() > 0.0, "{out}");
    let out = strata_json(&[
        "bench",
        "--model",
        m,
        "--prompt-tokens",
        "8",
        "--decode-tokens",
        "4",
        "--concurrency",
        "4",
        "--json",
    ]);
    assert!(out["aggregate_decode_tokens_per_s"].as_f64().unwrap() > 0.0, "{out}");
    std::fs::remove_file(&two).unwrap();

    let err = fails(&["synthesize", "--shape", "smollm2-135m", "--layers", "31", m]);
    assert!(err.contains("30 layers") && err.contains("not 31"), "{err}");
    let err = fails(&["synthesize", "--shape", "llama-7b", m]);
    assert!(err.contains("unknown shape `llama-7b`") && err.contains("smollm2-135m"), "{err}");
}

/// `scripts/bench-device.sh run`, cut short by its deadline after the first bench: the
/// script a borrowed GPU runs blind still synthesizes its models, runs `strata bench` with
/// flags `strata` accepts and writes its results and summary.
#[test]
fn device_benchmark_script_runs_and_summarizes() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-device");
    let _ = std::fs::remove_dir_all(&dir);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let o = std::process::Command::new("bash")
        .arg(root.join("scripts/bench-device.sh"))
        .arg("run")
        .env("STRATA", env!("CARGO_BIN_EXE_strata"))
        .env("ATTENTION_COSTS", "/nonexistent")
        .env("QUICK", "1")
        .env("DEADLINE", "1")
        .env("OUT", dir.join("out"))
        .env("WORK", dir.join("work"))
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{log}\n{}", String::from_utf8_lossy(&o.stderr));
    let results = std::fs::read_to_string(dir.join("out/results.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(results.lines().next().unwrap()).unwrap();
    assert_eq!(first["label"], "smollm2-single", "{results}");
    assert!(first["result"]["decode_tokens_per_s"].as_f64().unwrap() > 0.0, "{results}");
    let summary = std::fs::read_to_string(dir.join("out/summary.md")).unwrap();
    assert!(summary.contains("| smollm2-single |") && summary.contains("of read bandwidth"), "{summary}");
    assert!(log.contains("skipped: past the 1s deadline"), "{log}");
    std::fs::remove_dir_all(&dir).unwrap();
}
