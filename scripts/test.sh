#!/usr/bin/env bash
# Everything CI runs: set-up, formatting and lints, then every test (kernels on
# lavapipe when there is no GPU), then the kernel tests again with a subgroup size of 4,
# so that no reduction can rely on a particular subgroup size.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export RUST_BACKTRACE=1
# On a headless machine Mesa's device-select Vulkan layer prints "error: XDG_RUNTIME_DIR is
# invalid" from every test process that opens a GPU (nothing failed). `strata` switches
# the layer off in `main`; test binaries open the GPU on test threads, so switch it off
# here. (The test of that switch clears this variable for its own child.)
[ -n "${XDG_RUNTIME_DIR:-}${WAYLAND_DISPLAY:-}" ] || export NODEVICE_SELECT=1
# Formatting and lints first: they take a minute and fail fast.
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --no-fail-fast 2>&1
# --workspace --lib (not -p strata-node) keeps the feature set of the run above: no rebuild.
LP_NATIVE_VECTOR_WIDTH=128 cargo test --workspace --lib --no-fail-fast 2>&1
