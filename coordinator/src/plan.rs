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
    let nodes = args.nodes.iter().map(|s| node_budget(s)).collect::<anyhow::Result<Vec<_>>>()?;
    let mut pc = PlanConfig::new(args.ctx as usize);
    pc.seqs = args.seqs as usize;
    let cost = ModelCost::new(&gguf, &cfg, &pc)?;
    let plan = match &args.split {
        Some(split) => Plan::manual(&cost, &nodes, &parse_split(split)?)?,
        None => Plan::auto(&cost, &nodes)?,
    };
    println!(
        "{} ({}, {} layers), context {} x {} sequence(s)\n",
        args.model.display(),
        cfg.arch.name(),
        cfg.n_layer(),
        args.ctx,
        args.seqs
    );
    print!("{}", plan.table());
    Ok(())
}

pub fn synthesize(args: SynthesizeArgs) -> anyhow::Result<()> {
    match args.shape.as_str() {
        "qwen36-27b" => strata_model::synthetic::write_qwen36_27b_shape(&args.output)?,
        other => bail!("unknown shape `{other}` (supported: qwen36-27b)"),
    }
    let len = std::fs::metadata(&args.output)?.len();
    eprintln!("wrote {} ({:.2} GB apparent size, all zeros, sparse)", args.output.display(), len as f64 / 1e9);
    Ok(())
}
