//! The schema against real files: every tensor it names is in the file with its shape,
//! and every tensor in the file is one it names.

use std::collections::HashMap;
use std::path::PathBuf;

use super::*;
use crate::gguf::{Gguf, TensorInfo};
use crate::quant::GgmlType;
use crate::synthetic::Qwen35Shape;
use crate::synthetic::tests::{open_in_memory, tiny};

fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// Checks `g` against its config's schema; `converter_order`: the file was written by
/// llama.cpp's converter (not its quantiser), so its tensors are in the schema's order.
fn check_schema(file: &str, g: &Gguf, converter_order: bool) -> ModelConfig {
    let cfg = ModelConfig::from_gguf(g).unwrap_or_else(|e| panic!("{file}: {e}"));
    let schema = cfg.tensors();
    let in_file: HashMap<&str, &TensorInfo> = g.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut problems = Vec::new();
    for spec in &schema {
        match in_file.get(spec.name.as_str()) {
            None => problems.push(format!("{} is missing", spec.name)),
            Some(t) if t.dims != spec.dims => {
                problems.push(format!("{} has dims {:?}, the schema {:?}", spec.name, t.dims, spec.dims))
            }
            // Converted files keep vectors and kernels in F32 and only those.
            Some(t) if (t.ty == GgmlType::F32) != (spec.role != TensorRole::Matrix) => {
                problems.push(format!("{} is {} but a {:?}", spec.name, t.ty, spec.role))
            }
            Some(_) => {}
        }
    }
    for t in &g.tensors {
        if !schema.iter().any(|s| s.name == t.name) {
            problems.push(format!("{} is in the file but not in the schema", t.name));
        }
    }
    assert!(problems.is_empty(), "{file}:\n{}", problems.join("\n"));
    assert_eq!(schema.len(), g.tensors.len(), "{file}: a tensor named twice in the schema");
    if converter_order {
        let names: Vec<&str> = g.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(schema.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), names, "{file}: order");
    }
    cfg
}

#[test]
fn every_fixture_holds_exactly_the_schemas_tensors() {
    let fixtures = [
        ("tests/fixtures/tiny-qwen3.gguf", true),
        ("tests/fixtures/tiny-qwen35.gguf", true),
        ("tests/fixtures/tiny-qwen35-mtp.gguf", true),
        // Its own converter's order (by name within a block), not llama.cpp's.
        ("models/SmolLM2-135M-Instruct.Q4_1.gguf", false),
    ];
    let mut archs = Vec::new();
    for (file, converter_order) in fixtures {
        let path = root().join(file);
        assert!(path.exists(), "{file} is missing (SmolLM2 comes with `bash scripts/setup.sh`)");
        let g = Gguf::open(&path).unwrap();
        let cfg = check_schema(&path.display().to_string(), &g, converter_order);
        archs.push((cfg.arch, cfg.n_mtp, cfg.tied_output));
    }
    assert!(archs.contains(&(Arch::Qwen3, 0, false)) && archs.contains(&(Arch::Qwen35, 0, false)), "{archs:?}");
    assert!(archs.iter().any(|&(arch, n_mtp, _)| arch == Arch::Qwen35 && n_mtp > 0), "{archs:?}");
    assert!(archs.iter().any(|&(arch, _, tied)| arch == Arch::Llama && tied), "{archs:?}");
}

#[test]
fn synthetic_files_hold_exactly_the_schemas_tensors_and_read_back_as_their_config() {
    for shape in [
        tiny(false, 1),
        tiny(true, 0),
        Qwen35Shape { n_layer: 7, full_attention_interval: 3, n_mtp: 2, ..tiny(false, 0) },
    ] {
        let g = open_in_memory(&shape);
        let cfg = check_schema(shape.name, &g, true);
        assert_eq!(cfg, shape.config());
        assert_eq!(cfg.mtp_tensors().len(), shape.n_mtp);
    }
}

#[test]
fn layer_schemas_follow_the_config() {
    let cfg = tiny(false, 1).config();
    let (e, a, dn) = (cfg.n_embd, &cfg.attention, cfg.deltanet.clone().unwrap());
    let l0 = cfg.layer_tensors(0);
    assert_eq!(l0.ffn_norm, TensorSpec::vector("blk.0.post_attention_norm.weight", e));
    let MixerTensors::DeltaNet(d) = &l0.mixer else { panic!("{l0:?}") };
    assert_eq!((d.qkv.k(), d.qkv.n()), (e, dn.conv_channels()));
    assert_eq!(
        (d.conv1d.dims.as_slice(), d.conv1d.role),
        ([dn.conv_kernel as u64, dn.conv_channels() as u64].as_slice(), TensorRole::Kernel)
    );
    assert_eq!((d.a.k(), d.a.n()), (dn.n_value_heads, 1));

    let MixerTensors::Attention(at) = cfg.layer_tensors(3).mixer else { panic!("layer 3 is attention") };
    assert_eq!(at.q, TensorSpec::matrix("blk.3.attn_q.weight", e, 2 * a.n_head * a.head_dim));
    assert_eq!(at.k_norm, Some(TensorSpec::vector("blk.3.attn_k_norm.weight", a.head_dim)));

    let mtp = &cfg.mtp_tensors()[0];
    assert_eq!(mtp.block, 4);
    assert_eq!(mtp.eh_proj, TensorSpec::matrix("blk.4.nextn.eh_proj.weight", 2 * e, e));
    assert!(matches!(mtp.layer.mixer, MixerTensors::Attention(_)));

    let tied = tiny(true, 0).config().global_tensors();
    assert_eq!(tied.output, tied.token_embd);
    assert_eq!(tied.tensors().len(), 2);
}
