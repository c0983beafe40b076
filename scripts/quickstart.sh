#!/usr/bin/env bash
# From a fresh machine to generated text: set up, build, make a Q8_0 copy of SmolLM2
# with `strata quantize`, and chat with it on this machine's GPU (or lavapipe).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Quiet: cargo's "Compiling thiserror ..." lines read like errors to a new user; real
# warnings and errors still print.
printf '\033[1m==> %s\033[0m\n' "building strata (release; the first build takes a few minutes)" >&2
cargo build --release --bin strata --quiet
Q8=models/SmolLM2-135M-Instruct.Q8_0.gguf
[ -f "$Q8" ] || ./target/release/strata quantize models/SmolLM2-135M-Instruct.Q4_1.gguf "$Q8" --type q8_0
exec ./target/release/strata run --model "$Q8" --chat --max-tokens 64 \
    --prompt "${1:-Write a haiku about GPUs.}"
