//! What one decode row's attention costs on this adapter at long contexts, with the GPU
//! kernel (`attention.wgsl`) splitting the row's keys over workgroups (a workgroup per
//! query head and chunk, then one dispatch combining the chunks) and without (a
//! workgroup per query head running every chunk): one layer of SmolLM2-135M (9 heads of
//! 64 over 3 KV heads) and of Qwen3.6-27B (24 heads of 256 over 4). Both give the same
//! bits (the tests check it); this shows what the split buys. Prints the time per layer
//! and the KV bytes it read per second.
//!
//! `cargo run --release -p strata-node --example attention_costs [-- MAX_POSITIONS]`
//! (default 8192; the dev profile is optimised too). CPU adapters run the other attention
//! kernel (`attention_sg`) in a stage; this measures `attention.wgsl` on them all the same.

mod common;

use strata_model::plan::attention_parts_bytes;
use strata_node::batch::{BatchLayout, Run};
use strata_node::gpu::{Gpu, GpuConfig, KernelCache, Step};
use strata_node::kv_pool::{BlockTable, KvLayout, LayerKv};
use strata_node::ops::attention::{Attention, AttentionKernel, PagedKv};
use strata_node::ops::{Act, Recorder};

const BLOCK: u32 = 16;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let max: u32 = match std::env::args().nth(1) {
        Some(a) => a.parse().map_err(|_| format!("MAX_POSITIONS must be a whole number, not `{a}`"))?,
        None => 8192,
    };
    let gpu = Gpu::new(&GpuConfig::default())?;
    let kernels = KernelCache::new();
    println!("adapter: {}", gpu.info.name);
    println!(
        "{:<12} {:>9} {:>12} {:>12} {:>9} {:>12}",
        "layer", "positions", "split ms", "unsplit ms", "speed-up", "split GB/s"
    );
    for (name, heads, kv_heads, head_dim) in [("SmolLM2", 9u32, 3u32, 64u32), ("Qwen3.6-27B", 24, 4, 256)] {
        let mut len = 256;
        while len <= max {
            let layout = KvLayout::new(BLOCK, len.div_ceil(BLOCK), 1, len)?;
            let kv = LayerKv::new(&gpu, layout, kv_heads, head_dim)?;
            let mut table = BlockTable::new(&gpu, layout)?;
            table.grow(&gpu.queue, 0, &mut Vec::new(), len)?;
            let width = heads * head_dim;
            let q = gpu.storage("q", u64::from(width) * 4);
            let out = gpu.storage("out", u64::from(width) * 4);
            let step = gpu.uniform("step", &Step::new(1, 1));
            let rows = BatchLayout::new(&[Run { slot: 0, pos: len - 1, n: 1, keep: 0 }]).rows;
            let rows = gpu.storage_init("rows", bytemuck::cast_slice(&rows));
            let parts = gpu.storage("parts", attention_parts_bytes(1, heads.into(), head_dim.into()));
            let mut seconds = [0.0; 2];
            for (i, split) in [true, false].into_iter().enumerate() {
                let mut rec = Recorder::new(&gpu, &kernels, &step, 1)?;
                rec.set_attention_kernel(AttentionKernel::Tiled);
                let mut attn = Attention::new(heads, head_dim);
                attn.parts = split.then_some(&parts);
                let paged = PagedKv { layer: &kv, table: &table };
                rec.attention(paged, Act::new(&q, 1, width), Act::new(&rows, 1, 4), Act::new(&out, 1, width), attn)?;
                seconds[i] = common::best_seconds(&gpu, &rec.finish(), 5)?;
            }
            let kv_bytes = f64::from(len) * f64::from(kv_heads * head_dim) * 2.0 * 2.0;
            println!(
                "{name:<12} {len:>9} {:>12.3} {:>12.3} {:>8.2}x {:>12.2}",
                seconds[0] * 1e3,
                seconds[1] * 1e3,
                seconds[1] / seconds[0],
                kv_bytes / seconds[0] / 1e9
            );
            len *= 2;
        }
    }
    Ok(())
}
