//! `strata quantize`: llama.cpp's Q8_0 rule bit for bit, checked on SmolLM2.

use strata_model::gguf::Gguf;
use strata_model::quant::GgmlType;

use crate::support::{SMOL_Q4_1, model, sha256, smol_q8_0};

/// sha256 of llama.cpp's own Q8_0 requantisation of the same file (fixtures README).
const LLAMA_CPP_Q8_0_SHA256: &str = "7b46609d11703c058397e5cfe4cc6e4b2508cb1eb4c80ddc472a5d421fbdb508";

#[test]
fn smollm2_q8_0_matches_llama_cpp_tensor_for_tensor() {
    let ours = Gguf::open(smol_q8_0()).unwrap();
    let src = Gguf::open(model(SMOL_Q4_1)).unwrap();
    assert_eq!(ours.tensors.len(), src.tensors.len());
    for b in &src.tensors {
        let a = ours.tensor(&b.name).unwrap_or_else(|| panic!("{} missing", b.name));
        assert_eq!(a.dims, b.dims, "{}", a.name);
        let want = if b.dims.len() >= 2 { GgmlType::Q8_0 } else { b.ty };
        assert_eq!(a.ty, want, "{}", a.name);
    }
    let ours_sha = sha256(&smol_q8_0());
    eprintln!("strata quantize sha256 {ours_sha} (llama.cpp {LLAMA_CPP_Q8_0_SHA256})");
    assert_eq!(ours_sha, LLAMA_CPP_Q8_0_SHA256, "our Q8_0 file differs from llama.cpp's byte for byte");
}
