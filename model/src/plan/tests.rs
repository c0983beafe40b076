//! The planner on hand-made costs (the algorithm), the fixtures and small synthetic files
//! (the pricing).

use super::*;
use crate::quant::tests::Rng;
use crate::synthetic::tests::{open_in_memory, tiny};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/");

/// Attention layers of the given weights, no cache or scratch, `embedding` on the first
/// stage and `head` on the last.
fn cost(layers: &[u64], embedding: u64, head: u64) -> ModelCost {
    ModelCost {
        layers: layers
            .iter()
            .map(|&w| LayerCost {
                kind: LayerKind::Attention,
                weight_bytes: w,
                cache_bytes: 0,
                kv_bytes_per_position: 0,
                read_bytes: w,
            })
            .collect(),
        embedding_bytes: embedding,
        head_bytes: head,
        tied_head: false,
        scratch: ScratchCost { common: 0, attention: 0, deltanet: 0, head: 0, moe: 0 },
        unplanned_bytes: 0,
        int8: Int8Cost { layer_widths: vec![0; layers.len()], ..Int8Cost::default() },
        mtp: None,
        kv_positions: 0,
        kv_block_size: 16,
        kv_least_positions: 0,
        kv_fixed: false,
    }
}

fn nodes(gib: &[f64]) -> Vec<NodeBudget> {
    gib.iter().enumerate().map(|(i, &g)| NodeBudget::new(format!("n{i}"), (g * GIB as f64) as u64)).collect()
}

fn lens(plan: &Plan) -> Vec<usize> {
    plan.stages.iter().map(|s| s.layers.len()).collect()
}

#[track_caller]
fn plan_err(r: Result<Plan>) -> PlanError {
    match r {
        Err(Error::Plan(e)) => e,
        other => panic!("expected a plan error, got {other:?}"),
    }
}

/// The ranges are contiguous, cover every layer in order, one per node, and fit.
#[track_caller]
fn assert_valid(plan: &Plan, cost: &ModelCost, nodes: &[NodeBudget]) {
    assert_eq!(plan.stages.len(), nodes.len());
    let mut next = 0;
    for (k, (s, n)) in plan.stages.iter().zip(nodes).enumerate() {
        assert_eq!((s.node, &s.name, s.layers.start), (k, &n.name, next));
        assert!(!s.layers.is_empty());
        next = s.layers.end;
        let c = cost.stage_on(s.layers.clone(), n);
        assert_eq!(
            (s.weight_bytes, s.cache_bytes, s.scratch_bytes, s.total_bytes),
            (c.weight_bytes, c.cache_bytes, c.scratch_bytes, c.total())
        );
        assert!(s.total_bytes <= n.usable_bytes);
        assert_eq!(s.free_bytes, n.usable_bytes - s.total_bytes);
    }
    assert_eq!(next, cost.n_layer());
}

#[test]
fn heterogeneous_memories_get_proportional_ranges() {
    let c = cost(&[200 * MIB; 60], 0, 0);
    let n = nodes(&[16.0, 12.0, 8.0]);
    let plan = Plan::auto(&c, &n).unwrap();
    assert_valid(&plan, &c, &n);
    // 60 layers as 16:12:8 is 26.7, 20, 13.3; the most even whole split is 27, 20, 13.
    assert_eq!(lens(&plan), [27, 20, 13]);

    // The order of the nodes is kept, whatever their sizes.
    let n = nodes(&[8.0, 16.0, 12.0]);
    let plan = Plan::auto(&c, &n).unwrap();
    assert_valid(&plan, &c, &n);
    assert_eq!(lens(&plan), [13, 27, 20]);
}

#[test]
fn fixed_costs_shift_layers_away_from_the_ends() {
    // The embedding and head weigh 5 layers each: equal nodes give the middle more layers.
    let c = cost(&[GIB; 32], 5 * GIB, 5 * GIB);
    let n = nodes(&[16.0, 16.0, 16.0]);
    let plan = Plan::auto(&c, &n).unwrap();
    assert_valid(&plan, &c, &n);
    assert_eq!(lens(&plan), [9, 14, 9]);
    assert_eq!(plan.stages.iter().map(|s| s.total_bytes / GIB).collect::<Vec<_>>(), [14, 14, 14]);
}

#[test]
fn the_split_is_the_exact_leximax_optimum() {
    // Against every split, on random layer weights and budgets.
    let mut rng = Rng::new(7);
    for case in 0..200 {
        let n_layer = 2 + rng.below(7) as usize;
        let n_node = 1 + rng.below(n_layer.min(4) as u64) as usize;
        let layers: Vec<u64> = (0..n_layer).map(|_| 1 + rng.below(1000)).collect();
        let c = cost(&layers, rng.below(500), rng.below(500));
        let budgets: Vec<NodeBudget> =
            (0..n_node).map(|i| NodeBudget::new(format!("n{i}"), 500 + rng.below(3000))).collect();
        let key = |ranges: &[Range<usize>]| {
            let mut fs: Vec<Fraction> = ranges
                .iter()
                .zip(&budgets)
                .map(|(r, b)| Fraction { used: c.stage(r.clone()).total(), of: b.usable_bytes })
                .collect();
            fs.sort_by(|a, b| b.cmp(a));
            fs
        };
        let best = all_splits(n_layer, n_node).into_iter().map(|r| key(&r)).min().unwrap();
        let fits = best[0] <= Fraction { used: 1, of: 1 };
        match Plan::auto(&c, &budgets) {
            Ok(plan) => {
                assert!(fits, "case {case}");
                assert_valid(&plan, &c, &budgets);
                let ranges: Vec<_> = plan.stages.iter().map(|s| s.layers.clone()).collect();
                assert!(key(&ranges) == best, "case {case}: {ranges:?} is not optimal");
            }
            Err(e) => assert!(!fits, "case {case}: {e} although a split fits"),
        }
    }
}

/// Every split of `n_layer` layers into `n_node` non-empty contiguous ranges.
fn all_splits(n_layer: usize, n_node: usize) -> Vec<Vec<Range<usize>>> {
    if n_node == 1 {
        return vec![vec![0..n_layer]];
    }
    let mut out = Vec::new();
    for first in 1..=n_layer - (n_node - 1) {
        for rest in all_splits(n_layer - first, n_node - 1) {
            let split = std::iter::once(0..first).chain(rest.into_iter().map(|r| r.start + first..r.end + first));
            out.push(split.collect());
        }
    }
    out
}

#[test]
fn a_node_too_small_for_any_layer_is_named() {
    let c = cost(&[512 * MIB; 8], 256 * MIB, 256 * MIB);
    let n =
        vec![NodeBudget::new("big", 16 * GIB), NodeBudget::new("tiny", 100 * MIB), NodeBudget::new("last", 16 * GIB)];
    let e = plan_err(Plan::auto(&c, &n));
    assert_eq!(e, PlanError::NodeTooSmall { node: "tiny".into(), needed: 512 * MIB, available: 100 * MIB });
    assert_eq!(
        e.to_string(),
        "node `tiny` is too small for even one layer: the smallest stage it could hold needs 0.50 GiB, it has 0.10 GiB"
    );

    // The first node must hold the embedding too: 768 MiB do not fit in 700.
    let n = vec![NodeBudget::new("first", 700 * MIB), NodeBudget::new("last", 16 * GIB)];
    let e = plan_err(Plan::auto(&c, &n));
    assert_eq!(e, PlanError::NodeTooSmall { node: "first".into(), needed: 768 * MIB, available: 700 * MIB });
}

#[test]
fn a_model_that_cannot_fit_reports_every_node() {
    let c = cost(&[GIB; 10], GIB, GIB);
    let n = vec![NodeBudget::new("a", 4 * GIB), NodeBudget::new("b", 4 * GIB)];
    let e = plan_err(Plan::auto(&c, &n));
    let PlanError::DoesNotFit { stages, needed, available } = &e else { panic!("{e:?}") };
    assert_eq!((*needed, *available), (12 * GIB, 8 * GIB));
    assert_eq!(
        stages.iter().map(|s| (s.layers.clone(), s.needed)).collect::<Vec<_>>(),
        [(0..5, 6 * GIB), (5..10, 6 * GIB)]
    );
    assert_eq!(
        e.to_string(),
        "the model does not fit: it needs 12.00 GiB in all, the nodes have 8.00 GiB; the most even split would need:\n  \
         node `a`: layers 0..5 need 6.00 GiB of 4.00 GiB available  <- over\n  \
         node `b`: layers 5..10 need 6.00 GiB of 4.00 GiB available  <- over"
    );

    // Enough memory in all, but no contiguous split fits: still refused, with the numbers.
    let c = cost(&[2 * GIB, 3 * GIB, 2 * GIB], 0, 0);
    let n = nodes(&[3.5, 3.5]);
    let msg = plan_err(Plan::auto(&c, &n)).to_string();
    assert!(msg.contains("it needs 7.00 GiB in all, the nodes have 7.00 GiB"), "{msg}");
    assert!(msg.contains("need 5.00 GiB of 3.50 GiB available  <- over"), "{msg}");
}

#[test]
fn node_and_layer_counts_are_checked() {
    let c = cost(&[GIB; 3], 0, 0);
    assert_eq!(plan_err(Plan::auto(&c, &[])), PlanError::NoNodes);
    let e = plan_err(Plan::auto(&c, &nodes(&[8.0; 4])));
    assert_eq!(e, PlanError::MoreNodesThanLayers { nodes: 4, layers: 3 });
    assert!(e.to_string().contains("4 nodes but the model has only 3 layers"));
    // As many nodes as layers: one each.
    assert_eq!(lens(&Plan::auto(&c, &nodes(&[8.0; 3])).unwrap()), [1, 1, 1]);
}

#[test]
fn manual_split_is_validated() {
    let c = cost(&[GIB; 10], GIB, GIB);
    let n = nodes(&[8.0, 6.0, 4.0]);
    let plan = Plan::manual(&c, &n, &[5, 3, 2]).unwrap();
    assert_valid(&plan, &c, &n);
    assert_eq!(plan.stages.iter().map(|s| s.layers.clone()).collect::<Vec<_>>(), [0..5, 5..8, 8..10]);

    assert_eq!(plan_err(Plan::manual(&c, &n, &[5, 5])), PlanError::SplitCount { given: 2, nodes: 3 });
    assert_eq!(plan_err(Plan::manual(&c, &n, &[5, 3, 3])), PlanError::SplitSum { sum: 11, layers: 10 });
    let e = plan_err(Plan::manual(&c, &n, &[10, 0, 0]));
    assert_eq!(e, PlanError::SplitEmpty { node: "n1".into() });
    assert!(e.to_string().contains("gives node `n1` no layers"));

    let e = plan_err(Plan::manual(&c, &n, &[2, 3, 5]));
    assert_eq!(e, PlanError::StageTooBig { node: "n2".into(), layers: 5..10, needed: 6 * GIB, available: 4 * GIB });
    assert_eq!(e.to_string(), "node `n2` cannot hold layers 5..10: they need 6.00 GiB, it has 4.00 GiB");
}

#[test]
fn split_flag_parses() {
    assert_eq!(parse_split("10,12,8").unwrap(), [10, 12, 8]);
    assert_eq!(parse_split(" 4, 4 ").unwrap(), [4, 4]);
    for bad in ["", "10,,8", "a,b", "10;12", "-1,2"] {
        let e = parse_split(bad).unwrap_err();
        assert!(matches!(e, Error::Plan(PlanError::SplitSyntax(_))), "{bad:?}: {e}");
    }
}

fn fixture(name: &str) -> (Gguf, ModelConfig) {
    let g = Gguf::open(format!("{FIXTURES}{name}")).unwrap();
    let cfg = ModelConfig::from_gguf(&g).unwrap();
    (g, cfg)
}

fn layer_tensor_bytes(g: &Gguf, i: usize) -> u64 {
    let prefix = format!("blk.{i}.");
    g.tensors.iter().filter(|t| t.name.starts_with(&prefix)).map(|t| t.size).sum()
}

#[test]
fn kv_cache_grows_with_context_and_deltanet_state_does_not() {
    let (g, cfg) = fixture("tiny-qwen35.gguf");
    let dn = cfg.deltanet.as_ref().unwrap();
    // 2 key heads and 4 value heads of 32, conv 4: 3 x 256 conv values, 4 x 32 x 32 state.
    assert_eq!(dn.state_values(), 3 * 256 + 4 * 32 * 32);
    for (ctx, seqs) in [(1024, 1), (4096, 1), (4096, 3)] {
        let c = ModelCost::new(&g, &cfg, &PlanConfig { seqs, ..PlanConfig::new(ctx) }).unwrap();
        assert_eq!(c.n_layer(), 8);
        for (i, l) in c.layers.iter().enumerate() {
            assert_eq!(l.kind, cfg.layers[i]);
            assert_eq!(l.weight_bytes, layer_tensor_bytes(&g, i), "layer {i}");
            let cache = match l.kind {
                // K and V, 2 KV heads of 64, f16.
                LayerKind::Attention => 2 * ctx as u64 * 2 * 64 * 2,
                LayerKind::DeltaNet => (3 * 256 + 4 * 32 * 32) * 4,
            };
            assert_eq!(l.cache_bytes, cache * seqs as u64, "layer {i} at ctx {ctx}, {seqs} sequences");
        }
        assert_eq!(c.kv_positions, (seqs * ctx) as u64);
    }
    assert_eq!(cfg.layers.iter().filter(|&&k| k == LayerKind::Attention).count(), 2);
    // A pool asked for is priced as asked, in whole blocks.
    let c =
        ModelCost::new(&g, &cfg, &PlanConfig { seqs: 4, kv_positions: Some(1000), ..PlanConfig::new(4096) }).unwrap();
    assert_eq!((c.kv_positions, c.kv_fixed), (1008, true));
    assert_eq!(c.layers[3].cache_bytes, 1008 * 2 * 2 * 64 * 2);
    // Prefix reuse's checkpoints: a second DeltaNet state per slot, the KV pool as it was.
    let with = ModelCost::new(&g, &cfg, &PlanConfig { seqs: 3, checkpoints: true, ..PlanConfig::new(4096) }).unwrap();
    let without = ModelCost::new(&g, &cfg, &PlanConfig { seqs: 3, ..PlanConfig::new(4096) }).unwrap();
    for (w, o) in with.layers.iter().zip(&without.layers) {
        let factor = if w.kind == LayerKind::DeltaNet { 2 } else { 1 };
        assert_eq!(w.cache_bytes, o.cache_bytes * factor, "{:?}", w.kind);
    }
}

/// Memory for every sequence's whole context is not there: the pool gets one context plus
/// what the tightest stage with attention layers has left, in whole blocks; a pool asked
/// for is kept (and does not fit).
#[test]
fn a_pool_that_cannot_hold_every_context_gets_what_memory_leaves() {
    let (g, cfg) = fixture("tiny-qwen3.gguf");
    let pc = PlanConfig { seqs: 16, ..PlanConfig::new(4096) };
    let c = ModelCost::new(&g, &cfg, &pc).unwrap();
    let per_position: u64 = c.layers.iter().map(|l| l.kv_bytes_per_position).sum();
    assert!(per_position > 0);
    let n = vec![NodeBudget::new("a", 12 * MIB), NodeBudget::new("b", 10 * MIB)];
    assert!(Plan::auto(&c, &n).is_err(), "16 x 4096 positions should not fit");
    let plan = Plan::fitted(&c, &n, None).unwrap();
    assert!(plan.kv_positions >= 4096 && plan.kv_positions < 16 * 4096, "{}", plan.kv_positions);
    assert_eq!(plan.kv_positions % 16, 0);
    assert_valid(&plan, &c.with_pool(plan.kv_positions), &n);
    // The tightest stage has less than a block's room left.
    let tight = plan.stages.iter().map(|s| s.free_bytes / s.kv_bytes_per_position).min().unwrap();
    assert!(tight < 16, "{tight} positions left on the tightest stage:\n{}", plan.table());
    assert!(
        plan.table().contains(&format!("kv pool: {} blocks of 16 positions", plan.kv_blocks())),
        "{}",
        plan.table()
    );
    // Enough memory: every context, as priced.
    let big = vec![NodeBudget::new("a", GIB), NodeBudget::new("b", GIB)];
    assert_eq!(Plan::fitted(&c, &big, None).unwrap().kv_positions, 16 * 4096);
    // The same with a manual split.
    let manual = Plan::fitted(&c, &n, Some(&[3, 3])).unwrap();
    assert!(manual.kv_positions >= 4096 && manual.kv_positions < 16 * 4096);
    // A pool fixed by the user is not shrunk: it does not fit, and says so.
    let fixed = ModelCost::new(&g, &cfg, &PlanConfig { kv_positions: Some(16 * 4096), ..pc.clone() }).unwrap();
    assert!(Plan::fitted(&fixed, &n, None).is_err());
    // Not even one context fits: the error of that plan.
    let tiny = vec![NodeBudget::new("a", MIB), NodeBudget::new("b", MIB)];
    assert!(Plan::fitted(&c, &tiny, None).is_err());
}

#[test]
fn scratch_follows_the_layer_kinds_of_the_stage() {
    let (g, cfg) = fixture("tiny-qwen35.gguf");
    let c = ModelCost::new(&g, &cfg, &PlanConfig { max_batch: 16, ..PlanConfig::new(256) }).unwrap();
    // E 128, F 384, 4 heads / 2 KV heads of 64 with a gate, C = 2*32*2 + 32*4 = 256, Vd 128, nv 4.
    let s = &c.scratch;
    assert_eq!(s.common, 16 * (3 * 128 + 2 * 384) * 4 + 16 * 8);
    // ... and the split attention's partial states: 8 rows, 4 heads, 16 chunks, 64 + 2 values.
    assert_eq!(s.attention, 16 * (4 * 64 * 4 + 2 * 2 * 64) * 4 + 8 * 4 * 16 * 66 * 4);
    assert_eq!(s.deltanet, 16 * (2 * 256 + 2 * 128 + 2 * 4) * 4);
    assert_eq!(s.head, (2 * 128 + 1024) * 4);
    // Layers 0..3 are DeltaNet, 3 is attention, 7 (the last) is attention.
    assert_eq!(c.stage(0..3).scratch_bytes, s.common + s.deltanet);
    assert_eq!(c.stage(1..4).scratch_bytes, s.common + s.deltanet + s.attention);
    assert_eq!(c.stage(7..8).scratch_bytes, s.common + s.attention + s.head);

    let (g, cfg) = fixture("tiny-qwen3.gguf");
    let c = ModelCost::new(&g, &cfg, &PlanConfig { max_batch: 16, ..PlanConfig::new(256) }).unwrap();
    // No gate in qwen3's attn_q: q and the attention output only.
    assert_eq!(c.scratch.attention, 16 * (4 * 32 * 2 + 2 * 2 * 32) * 4 + 8 * 4 * 16 * 34 * 4);
    // A stage whose steps are smaller than the split rows keeps states for those only.
    let c = ModelCost::new(&g, &cfg, &PlanConfig { max_batch: 2, ..PlanConfig::new(256) }).unwrap();
    assert_eq!(c.scratch.attention, 2 * (4 * 32 * 2 + 2 * 2 * 32) * 4 + 2 * 4 * 16 * 34 * 4);
    assert_eq!(c.scratch.deltanet, 0);
}

/// A node taking the integer-dot path (`--int8-dot`) holds x quantised for its widest
/// Q8_0 matrix besides, and the plan counts it on that node only; with MTP drafts the
/// last stage's rows include a draft row per sequence.
#[test]
fn int8_dot_nodes_are_charged_their_quantised_x() {
    let (g, cfg) = fixture("tiny-qwen35.gguf");
    let c = ModelCost::new(&g, &cfg, &PlanConfig { max_batch: 16, ..PlanConfig::new(256) }).unwrap();
    // Every layer's widest Q8_0 matrix is ffn_down (F = 384); the head's rows are E = 128.
    assert_eq!(c.int8.layer_widths, vec![384; cfg.n_layer()]);
    assert_eq!(c.int8.head_width, 128);
    let per_stage = int8_scratch_bytes(16, 384);
    assert_eq!(per_stage, 16 * 384 * 2 + 16 * 12 * 4);
    let plain = NodeBudget::new("a", 64 * MIB);
    let int8 = plain.clone().with_int8_dot(true);
    for r in [0..3, 3..8, 0..8] {
        assert_eq!(c.stage_on(r.clone(), &plain), c.stage(r.clone()));
        assert_eq!(c.stage_on(r.clone(), &int8).scratch_bytes, c.stage(r.clone()).scratch_bytes + per_stage);
        // What the node allocates for the same stage.
        assert_eq!(stage_int8_width(&g, &cfg, r, false).unwrap(), 384);
    }
    let nodes = [NodeBudget::new("a", 8 * MIB).with_int8_dot(true), NodeBudget::new("b", 8 * MIB)];
    let plan = Plan::auto(&c, &nodes).unwrap();
    assert_valid(&plan, &c, &nodes);
    let s = &plan.stages;
    assert_eq!(s[0].scratch_bytes, c.stage(s[0].layers.clone()).scratch_bytes + per_stage);
    assert_eq!(s[1].scratch_bytes, c.stage(s[1].layers.clone()).scratch_bytes);

    let (g, cfg) = fixture("tiny-qwen35-mtp.gguf");
    let pc = PlanConfig { max_batch: 16, seqs: 4, mtp: true, draft_max: 2, ..PlanConfig::new(256) };
    let c = ModelCost::new(&g, &cfg, &pc).unwrap();
    let n = cfg.n_layer();
    let width = stage_int8_width(&g, &cfg, 0..n, true).unwrap();
    assert!(width >= 128, "{width}");
    assert_eq!(c.int8_bytes(0..n), int8_scratch_bytes(16 + 4, width));
    assert_eq!(c.int8_bytes(0..n - 1), int8_scratch_bytes(16, stage_int8_width(&g, &cfg, 0..n - 1, true).unwrap()));
}

#[test]
fn fixtures_plan_and_the_ends_carry_embedding_and_head() {
    for name in ["tiny-qwen35.gguf", "tiny-qwen3.gguf"] {
        let (g, cfg) = fixture(name);
        let c = ModelCost::new(&g, &cfg, &PlanConfig::new(4096)).unwrap();
        let embd = g.tensor("token_embd.weight").unwrap().size;
        let head = g.tensor("output_norm.weight").unwrap().size + g.tensor("output.weight").unwrap().size;
        assert_eq!((c.embedding_bytes, c.head_bytes, c.tied_head, c.unplanned_bytes), (embd, head, false, 0));
        let layers: u64 = (0..cfg.n_layer()).map(|i| layer_tensor_bytes(&g, i)).sum();
        assert_eq!(layers + embd + head, g.tensors.iter().map(|t| t.size).sum::<u64>());

        let n = vec![NodeBudget::new("a", 12 * MIB), NodeBudget::new("b", 8 * MIB), NodeBudget::new("c", 8 * MIB)];
        let plan = Plan::auto(&c, &n).unwrap();
        assert_valid(&plan, &c, &n);
        let s = &plan.stages;
        assert_eq!(s[0].weight_bytes, embd + s[0].layers.clone().map(|i| layer_tensor_bytes(&g, i)).sum::<u64>());
        assert_eq!(s[1].weight_bytes, s[1].layers.clone().map(|i| layer_tensor_bytes(&g, i)).sum::<u64>());
        assert_eq!(s[2].weight_bytes, head + s[2].layers.clone().map(|i| layer_tensor_bytes(&g, i)).sum::<u64>());
        println!("{name}, ctx 4096:\n{}", plan.table());
    }
}

#[test]
fn tied_head_is_charged_to_the_last_stage_too() {
    let (tied, untied) = (open_in_memory(&tiny(true, 0)), open_in_memory(&tiny(false, 0)));
    let pc = PlanConfig::new(512);
    let cost_of = |g: &Gguf| ModelCost::new(g, &ModelConfig::from_gguf(g).unwrap(), &pc).unwrap();
    let (t, u) = (cost_of(&tied), cost_of(&untied));
    let embd = tied.tensor("token_embd.weight").unwrap().size;
    let norm = tied.tensor("output_norm.weight").unwrap().size;
    assert!(tied.tensor("output.weight").is_none());
    assert_eq!((t.tied_head, t.embedding_bytes, t.head_bytes), (true, embd, norm + embd));
    assert_eq!((u.tied_head, u.head_bytes), (false, norm + untied.tensor("output.weight").unwrap().size));
    assert_eq!(t.layers, u.layers);

    // Two stages each hold the table; one stage holds it once.
    let n = vec![NodeBudget::new("a", GIB), NodeBudget::new("b", GIB)];
    let plan = Plan::auto(&t, &n).unwrap();
    let layer_bytes = |r: Range<usize>| r.map(|i| t.layers[i].weight_bytes).sum::<u64>();
    assert_eq!(plan.stages[0].weight_bytes, embd + layer_bytes(plan.stages[0].layers.clone()));
    assert_eq!(plan.stages[1].weight_bytes, norm + embd + layer_bytes(plan.stages[1].layers.clone()));
    let one = Plan::auto(&t, &n[..1]).unwrap();
    assert_eq!(one.stages[0].weight_bytes, embd + norm + layer_bytes(0..4));
    assert_eq!(one.stages[0].weight_bytes, tied.tensors.iter().map(|t| t.size).sum::<u64>());
}

#[test]
fn mtp_blocks_are_not_planned_but_reported() {
    let g = open_in_memory(&tiny(false, 1));
    let cfg = ModelConfig::from_gguf(&g).unwrap();
    assert_eq!((cfg.n_layer(), cfg.n_mtp), (4, 1));
    let c = ModelCost::new(&g, &cfg, &PlanConfig::new(512)).unwrap();
    assert_eq!(c.n_layer(), 4);
    let mtp = layer_tensor_bytes(&g, 4);
    assert!(mtp > 0);
    assert_eq!(c.unplanned_bytes, mtp);
    // Every byte is either planned or reported.
    let planned: u64 = c.layers.iter().map(|l| l.weight_bytes).sum::<u64>() + c.embedding_bytes + c.head_bytes;
    assert_eq!(planned + mtp, g.tensors.iter().map(|t| t.size).sum::<u64>());

    let n = vec![NodeBudget::new("a", GIB), NodeBudget::new("b", GIB)];
    let plan = Plan::auto(&c, &n).unwrap();
    assert_valid(&plan, &c, &n);
    assert_eq!(plan.stages.last().unwrap().layers.end, 4);
    assert_eq!(plan.unplanned_bytes, mtp);
    assert!(plan.table().contains("not loaded: "), "{}", plan.table());
}

#[test]
fn invalid_settings_are_refused() {
    let (g, cfg) = fixture("tiny-qwen3.gguf");
    for pc in [
        PlanConfig::new(0),
        PlanConfig { seqs: 0, ..PlanConfig::new(8) },
        PlanConfig { max_batch: 0, ..PlanConfig::new(8) },
        PlanConfig { kv_block_size: 0, ..PlanConfig::new(8) },
        PlanConfig { kv_positions: Some(0), ..PlanConfig::new(8) },
    ] {
        assert!(matches!(ModelCost::new(&g, &cfg, &pc), Err(Error::Plan(PlanError::Invalid(_)))), "{pc:?}");
    }
}

#[test]
fn table_lists_nodes_and_totals() {
    let c = ModelCost { unplanned_bytes: 300 * MIB, ..cost(&[GIB; 10], GIB, GIB) };
    let n = vec![NodeBudget::new("gpu-a", 8 * GIB), NodeBudget::new("gpu-b", 8 * GIB)];
    let table = Plan::auto(&c, &n).unwrap().table();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 5, "{table}");
    for col in ["node", "layers", "weights", "kv pool", "cache", "scratch", "total", "usable", "free"] {
        assert!(lines[0].contains(col), "{table}");
    }
    assert!(lines[1].starts_with("gpu-a  0..5 (5)") && lines[1].contains("6.00 GiB"), "{table}");
    assert!(lines[2].starts_with("gpu-b  5..10 (5)"), "{table}");
    assert!(
        lines[3].starts_with("total  10 layers") && lines[3].contains("12.00 GiB") && lines[3].contains("16.00 GiB"),
        "{table}"
    );
    assert_eq!(lines[4], "not loaded: 300.00 MiB (MTP blocks, tensors the forward pass does not read)");
    assert_eq!(human(0), "0 B");
    assert_eq!(human(1536), "1.50 KiB");
}

#[test]
fn shard_tensors_are_the_layers_plus_embedding_and_head_at_the_ends() {
    let g = crate::gguf::Gguf::open(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny-qwen3.gguf")).unwrap();
    let cfg = ModelConfig::from_gguf(&g).unwrap();
    let n = cfg.n_layer();
    let names = |r: std::ops::Range<usize>| -> Vec<String> {
        shard_tensors(&g, &cfg, r, false).unwrap().iter().map(|t| t.name.clone()).collect()
    };
    let first = names(0..1);
    assert!(first.contains(&"token_embd.weight".to_owned()) && !first.contains(&"output_norm.weight".to_owned()));
    assert!(first.iter().all(|t| t == "token_embd.weight" || t.starts_with("blk.0.")), "{first:?}");
    let last = names(n - 1..n);
    assert!(last.contains(&"output_norm.weight".to_owned()) && last.contains(&cfg.global_tensors().output.name));
    let all = names(0..n);
    assert_eq!(all.len(), all.iter().collect::<std::collections::HashSet<_>>().len(), "each tensor once");
    assert!(shard_tensors(&g, &cfg, 0..n + 1, false).is_err() && shard_tensors(&g, &cfg, 1..1, false).is_err());
}

/// With no context asked for, the largest one (in whole blocks) that the nodes hold:
/// the model's own when it fits, else the most that one sequence can have, and an error
/// only when not even a block fits.
#[test]
fn the_largest_context_that_fits_is_found() {
    let (g, cfg) = fixture("tiny-qwen3.gguf");
    let pc = PlanConfig { seqs: 4, ..PlanConfig::new(1 << 20) };
    let roomy = vec![NodeBudget::new("a", 64 * GIB)];
    let (ctx, _, _) = Plan::largest_context(&g, &cfg, &pc, &roomy, None).unwrap();
    assert_eq!(ctx, 1 << 20);

    let n = vec![NodeBudget::new("a", 12 * MIB), NodeBudget::new("b", 10 * MIB)];
    let (ctx, cost, plan) = Plan::largest_context(&g, &cfg, &pc, &n, None).unwrap();
    assert!(ctx < 1 << 20 && ctx.is_multiple_of(16), "{ctx}");
    assert_valid(&plan, &cost.with_pool(plan.kv_positions), &n);
    // One block more does not fit.
    let more = ModelCost::new(&g, &cfg, &PlanConfig { ctx: ctx + 16, ..pc.clone() }).unwrap();
    assert!(Plan::fitted(&more, &n, None).is_err(), "context {} fits too", ctx + 16);
    // A fixed pool bounds the context.
    let fixed = PlanConfig { kv_positions: Some(256), ..pc.clone() };
    assert_eq!(Plan::largest_context(&g, &cfg, &fixed, &n, None).unwrap().0, 256);
    // Nothing fits: the plan's own error.
    let tiny = vec![NodeBudget::new("a", 1024)];
    assert!(Plan::largest_context(&g, &cfg, &pc, &tiny, None).is_err());
}

/// With `mtp` the last stage holds the MTP block (the tensors otherwise unplanned), the
/// embedding it embeds with, its attention layer's share of the pool and its passes'
/// activations; a model without the block refuses it.
#[test]
fn the_mtp_block_is_planned_on_the_last_stage() {
    let g = Gguf::open(format!("{FIXTURES}tiny-qwen35-mtp.gguf")).unwrap();
    let cfg = ModelConfig::from_gguf(&g).unwrap();
    let n = cfg.n_layer();
    let pc = PlanConfig { seqs: 2, draft_max: 3, ..PlanConfig::new(256) };
    let without = ModelCost::new(&g, &cfg, &pc).unwrap();
    let with = ModelCost::new(&g, &cfg, &PlanConfig { mtp: true, ..pc.clone() }).unwrap();
    let block: u64 = g.tensors.iter().filter(|t| t.name.starts_with(&format!("blk.{n}."))).map(|t| t.size).sum();
    assert!(block > 0);
    assert_eq!((without.unplanned_bytes, with.unplanned_bytes), (block, 0));
    let m = with.mtp.clone().expect("an MTP cost");
    assert_eq!(m.weight_bytes, block);
    let (a, b) = (without.stage(n / 2..n), with.stage(n / 2..n));
    let embedding = if cfg.tied_output { 0 } else { with.embedding_bytes };
    assert_eq!(b.weight_bytes, a.weight_bytes + block + embedding);
    assert_eq!(b.cache_bytes, a.cache_bytes + m.kv_bytes_per_position * with.kv_positions);
    assert!(b.scratch_bytes > a.scratch_bytes);
    // A first stage costs the same either way; one stage of everything holds no second
    // embedding.
    assert_eq!(with.stage(0..n / 2), without.stage(0..n / 2));
    assert_eq!(with.stage(0..n).weight_bytes, without.stage(0..n).weight_bytes + block);
    let plain = Gguf::open(format!("{FIXTURES}tiny-qwen35.gguf")).unwrap();
    let plain_cfg = ModelConfig::from_gguf(&plain).unwrap();
    let err = ModelCost::new(&plain, &plain_cfg, &PlanConfig { mtp: true, ..pc }).unwrap_err().to_string();
    assert!(err.contains("without an MTP block"), "{err}");
}
