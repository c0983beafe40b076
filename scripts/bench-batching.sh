#!/usr/bin/env bash
# The batching benchmark behind the README's figures: SmolLM2-135M Q8_0, greedy, on one
# stage and on three local `strata node`s: aggregate decode tok/s at 1 and 8 concurrent
# sequences (`strata bench --concurrency`), and prefill of a 512-token prompt against
# decode (`strata bench`). Prints one JSON object per run and a summary of the ratios.
# A benchmark, not a test: it reports what it measured and never fails on a number.
# Usage: scripts/bench-batching.sh [BIN] (default: a release build, made if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
S=${1:-./target/release/strata}
[ -x "$S" ] || cargo build --release --bin strata --quiet
Q8=models/SmolLM2-135M-Instruct.Q8_0.gguf
[ -f "$Q8" ] || "$S" quantize models/SmolLM2-135M-Instruct.Q4_1.gguf "$Q8" --type q8_0 >/dev/null
PROMPT=${PROMPT_TOKENS:-32}
DECODE=${DECODE_TOKENS:-32}
out=$(mktemp -d)
nodes=()
cleanup() { for p in "${nodes[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$out"; }
trap cleanup EXIT

concurrent() { # NAME N [FLAGS...]
    local name=$1 n=$2; shift 2
    "$S" bench -m "$Q8" --prompt-tokens "$PROMPT" --decode-tokens "$DECODE" --concurrency "$n" --json "$@" \
        2>/dev/null >"$out/$name.json"
    echo "$name: $(tr -d '\n ' <"$out/$name.json")"
}

concurrent one-1 1
concurrent one-8 8
"$S" bench -m "$Q8" --prompt-tokens 512 --decode-tokens 32 --ctx 1024 --batch-tokens "${BATCH_TOKENS:-512}" --json \
    2>/dev/null >"$out/prefill.json"
echo "prefill-512: $(tr -d '\n ' <"$out/prefill.json")"

# Three local nodes, each its own process with its own share of the layers.
peers=()
for i in 0 1 2; do
    exec {fd}< <("$S" node --listen 127.0.0.1:0 --no-mdns --memory 4GiB --name "bench$i" \
        --model-dir "$(dirname "$Q8")" 2>/dev/null)
    nodes+=($!)
    read -r line <&"$fd"
    peers+=(--peer "${line#listening on }")
done
concurrent three-1 1 --no-local "${peers[@]}"
concurrent three-8 8 --no-local "${peers[@]}"
# The default keeps one step in flight here (the three nodes share one device); this is
# what one step per stage would give.
concurrent three-8-three-steps 8 --no-local --micro-batches 3 "${peers[@]}"

python3 - "$out" <<'PY'
import json, sys
d = sys.argv[1]
r = {n: json.load(open(f"{d}/{n}.json")) for n in ["one-1", "one-8", "three-1", "three-8", "three-8-three-steps", "prefill"]}
agg = lambda n: r[n]["aggregate_decode_tokens_per_s"]
print()
print(f"one stage:   8 sequences {agg('one-8'):.2f} tok/s vs 1 {agg('one-1'):.2f}: {agg('one-8') / agg('one-1'):.2f}x")
print(f"three nodes: 8 sequences {agg('three-8'):.2f} tok/s vs 1 {agg('three-1'):.2f}: {agg('three-8') / agg('three-1'):.2f}x")
print(f"three nodes, three steps in flight (--micro-batches 3): 8 sequences {agg('three-8-three-steps'):.2f} tok/s: {agg('three-8-three-steps') / agg('three-1'):.2f}x")
for n in ["three-1", "three-8", "three-8-three-steps"]:
    busy = ", ".join(f"{s['node']} {s['busy_fraction']:.0%}" for s in r[n]["stages"])
    print(f"  busy with {r[n]['concurrency']} sequence(s), {r[n]['micro_batches']} step(s) in flight: {busy}; bubble {r[n]['bubble']:.0%}")
p = r["prefill"]
print(f"prefill (512 tokens) {p['prefill_tokens_per_s']:.1f} tok/s vs decode {p['decode_tokens_per_s']:.2f} tok/s: {p['prefill_tokens_per_s'] / p['decode_tokens_per_s']:.2f}x")
PY
