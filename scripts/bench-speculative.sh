#!/usr/bin/env bash
# The speculative-decoding benchmark behind the README's figures: SmolLM2-135M Q8_0,
# greedy, one copy-heavy request (a 200-line Python file, "repeat this code exactly, with
# one function renamed"), decoded with and without `--speculative lookup`, on one stage
# and on three local `strata node`s. Prints one JSON object per run and the ratios.
# A benchmark, not a test: it reports what it measured and never fails on a number.
# Usage: scripts/bench-speculative.sh [BIN] (default: a release build, made if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
S=${1:-./target/release/strata}
[ -x "$S" ] || cargo build --release --bin strata --quiet
Q8=models/SmolLM2-135M-Instruct.Q8_0.gguf
[ -f "$Q8" ] || "$S" quantize models/SmolLM2-135M-Instruct.Q4_1.gguf "$Q8" --type q8_0 >/dev/null
DECODE=${DECODE_TOKENS:-256}
DRAFT=${DRAFT_MAX:-4}
out=$(mktemp -d)
nodes=()
cleanup() { for p in "${nodes[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$out"; }
trap cleanup EXIT

prompt=$out/copy.txt
{
    printf '<|im_start|>user\nRepeat this code exactly, with the function parse_line renamed to parse_row:\n'
    cat scripts/data/inventory.py
    printf '<|im_end|>\n<|im_start|>assistant\n'
} >"$prompt"

one() { # NAME [FLAGS...]
    local name=$1
    shift
    "$S" bench -m "$Q8" --prompt-file "$prompt" --decode-tokens "$DECODE" --ctx 4096 --json "$@" \
        2>/dev/null >"$out/$name.json"
    echo "$name: $(tr -d '\n ' <"$out/$name.json")"
}

one one-off --speculative off
one one-lookup --speculative lookup --draft-max "$DRAFT"

peers=()
for i in 0 1 2; do
    exec {fd}< <("$S" node --listen 127.0.0.1:0 --no-mdns --memory 4GiB --name "spec$i" \
        --model-dir "$(dirname "$Q8")" 2>/dev/null)
    nodes+=($!)
    read -r line <&"$fd"
    peers+=(--peer "${line#listening on }")
done
one three-off --speculative off --no-local "${peers[@]}"
one three-lookup --speculative lookup --draft-max "$DRAFT" --no-local "${peers[@]}"

python3 - "$out" <<'PY'
import json, sys
d = sys.argv[1]
r = {n: json.load(open(f"{d}/{n}.json")) for n in ["one-off", "one-lookup", "three-off", "three-lookup"]}
rate = lambda n: r[n]["per_sequence_decode_tokens_per_s"]
print()
for where in ["one", "three"]:
    s = r[f"{where}-lookup"]["speculation"]
    print(f"{where} {'stage' if where == 'one' else 'nodes'}: decode {rate(where + '-lookup'):.2f} tok/s with lookup vs "
          f"{rate(where + '-off'):.2f} without: {rate(where + '-lookup') / rate(where + '-off'):.2f}x; "
          f"{s['accepted_draft_tokens']} of {s['draft_tokens']} drafts accepted ({s['acceptance']:.0%}), "
          f"{s['tokens_per_trip']:.2f} tokens per trip")
PY
