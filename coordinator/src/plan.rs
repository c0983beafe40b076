//! `strata plan` and `strata synthesize`: the layer split for given nodes, offline.

use anyhow::{Context, bail};
use strata_model::config::ModelConfig;
use strata_model::gguf::Gguf;
use strata_model::plan::{ModelCost, NodeBudget, Plan, PlanConfig, parse_split};
use strata_node::memory::{MemoryLimit, parse_size};

use crate::cli::{PlanArgs, SynthesizeArgs};

/// `NAME=SIZE` to a node budget.
fn node_budget(spec: &str) -> anyhow::Result<NodeBudget> {
    let (name, size) =
        spec.split_once('=').with_context(|| format!("--node `{spec}`: expected NAME=SIZE, e.g. desk=16GiB"))?;
    match parse_size(size)? {
        MemoryLimit::Bytes(b) => Ok(NodeBudget::new(name.trim(), b)),
        MemoryLimit::Auto => bail!("--node `{spec}`: give a size; `auto` needs a running node"),
    }
}

pub fn run(args: PlanArgs) -> anyhow::Result<()> {
    let gguf = Gguf::open(&args.model).with_context(|| format!("reading {}", args.model.display()))?;
    let cfg = ModelConfig::from_gguf(&gguf)?;
    let nodes = args
        .nodes
        .iter()
        .map(|s| Ok(node_budget(s)?.with_int8_dot(args.int8_dot)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let asked = args.ctx.map(|c| c as usize);
    let pc = PlanConfig {
        seqs: args.seqs as usize,
        checkpoints: !args.no_prefix_cache,
        draft_max: if args.mtp && args.draft_max == 0 { 4 } else { args.draft_max as usize },
        mtp: args.mtp,
        max_batch: args.batch_tokens as usize,
        kv_positions: args.kv_pool.map(u64::from),
        ..PlanConfig::new(asked.unwrap_or(cfg.context_length))
    };
    let split = args.split.as_deref().map(parse_split).transpose()?;
    let (ctx, cost, plan) = match asked {
        Some(ctx) => {
            let cost = ModelCost::new(&gguf, &cfg, &pc)?;
            let plan = Plan::fitted(&cost, &nodes, split.as_deref())?;
            (ctx, cost, plan)
        }
        None => Plan::largest_context(&gguf, &cfg, &pc, &nodes, split.as_deref())?,
    };
    let whose = match asked {
        Some(_) => String::new(),
        None if ctx == cfg.context_length => " (the model's own)".to_owned(),
        None => format!(" (the model's own is {}: this is the most these nodes hold)", cfg.context_length),
    };
    println!(
        "{} ({}, {} layers), context {ctx}{whose}, {} sequence(s) at once, steps of {} rows\n",
        args.model.display(),
        cfg.arch.name(),
        cfg.n_layer(),
        args.seqs,
        args.batch_tokens
    );
    print!("{}", plan.table());
    let gb = |b: u64| format!("{:.2} GB", b as f64 / 1e9);
    let per_node: Vec<String> = plan
        .stages
        .iter()
        .map(|s| format!("{} {}", s.name, gb(cost.stage_read_bytes(s.layers.clone(), cfg.n_vocab))))
        .collect();
    let held: u64 = plan.stages.iter().map(|s| s.weight_bytes).sum();
    println!(
        "weights read per decoded token: {} of the {} held{} ({})",
        gb(cost.read_bytes_per_token(cfg.n_vocab)),
        gb(held),
        if cfg.moe.is_some() { ", the routed experts it chooses only" } else { "" },
        per_node.join(", ")
    );
    if cfg.deltanet.is_some() {
        let state = cfg.recurrent_state_bytes();
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        if pc.checkpoints {
            println!(
                "prefix reuse: each of the {} sequence slots keeps a checkpoint of its DeltaNet state beside it, {:.1} MiB each, {:.1} MiB in all (--no-prefix-cache gives it to the KV pool)",
                args.seqs,
                mib(state),
                mib(state * u64::from(args.seqs))
            );
        } else {
            println!("prefix reuse off: no DeltaNet checkpoints ({:.1} MiB a sequence)", mib(state));
        }
        if pc.draft_max > 0 {
            println!(
                "speculation (--draft-max {}): each slot keeps a rollback state of its DeltaNet state too, {:.1} MiB each, {:.1} MiB in all",
                pc.draft_max,
                mib(state),
                mib(state * u64::from(args.seqs))
            );
        }
    }
    if let Some(m) = &cost.mtp {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        let embedding = if cfg.tied_output { 0 } else { cost.embedding_bytes };
        println!(
            "MTP drafts (--draft-max {}): the last stage holds the MTP block, {:.1} MiB of weights (and the embedding again, {:.1} MiB, unless it is also the first), its attention layer's share of the pool, {:.1} MiB, and {:.1} MiB of activations",
            pc.draft_max,
            mib(m.weight_bytes),
            mib(embedding),
            mib(m.kv_bytes_per_position * plan.kv_positions),
            mib(m.scratch_bytes)
        );
    }
    if args.int8_dot {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        let per_stage: Vec<String> = plan
            .stages
            .iter()
            .map(|s| format!("{} {:.1} MiB", s.name, mib(cost.int8_bytes(s.layers.clone()))))
            .collect();
        println!(
            "integer dot products (--int8-dot on): each stage's scratch holds x quantised for its Q8_0 matrices ({})",
            per_stage.join(", ")
        );
    }
    if plan.kv_positions < cost.kv_positions {
        println!(
            "the pool holds {} of the {} positions {} sequences of context {} could take: more sequences wait in the queue",
            plan.kv_positions, cost.kv_positions, args.seqs, ctx
        );
    }
    Ok(())
}

pub fn synthesize(args: SynthesizeArgs) -> anyhow::Result<()> {
    use strata_model::synthetic::Shape;
    let Some(mut shape) = Shape::by_name(&args.shape) else {
        bail!("unknown shape `{}` (supported: {})", args.shape, Shape::NAMES.join(", "));
    };
    if let Some(n) = args.layers {
        shape = shape.with_layers(n).with_context(|| format!("--layers {n} of {}", args.shape))?;
    }
    let layers = shape.n_layer();
    shape.zeros()?.write(&args.output).with_context(|| format!("writing {}", args.output.display()))?;
    let len = std::fs::metadata(&args.output)?.len();
    eprintln!(
        "wrote {} ({}, {layers} layers, {:.2} GB apparent size, all zeros, sparse)",
        args.output.display(),
        args.shape,
        len as f64 / 1e9
    );
    Ok(())
}
