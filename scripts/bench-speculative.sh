#!/usr/bin/env bash
# The speculative-decoding benchmark behind the README's figures: SmolLM2-135M Q8_0,
# greedy, copy-heavy requests ("repeat this code exactly, with one function renamed": the
# whole 200-line scripts/data/inventory.py, and a 29-line excerpt of it), decoded with
# and without `--speculative lookup`, on one stage and on three local `strata node`s.
# Prints one JSON object per run and the ratios.
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

task() { # FILE LINES: the request for lines FIRST,LAST of the file
    printf '<|im_start|>user\nRepeat this code exactly, with the function parse_line renamed to parse_row:\n'
    sed -n "$2p" "$1"
    printf '<|im_end|>\n<|im_start|>assistant\n'
}
task scripts/data/inventory.py 1,199 >"$out/file.txt"
task scripts/data/inventory.py 97,125 >"$out/excerpt.txt"

one() { # NAME TASK DECODE [FLAGS...]
    local name=$1 task=$2 decode=$3
    shift 3
    "$S" bench -m "$Q8" --prompt-file "$out/$task.txt" --decode-tokens "$decode" --ctx 4096 --json "$@" \
        2>/dev/null >"$out/$name-$task.json"
    echo "$name-$task: $(tr -d '\n ' <"$out/$name-$task.json")"
}

both() { # WHERE [FLAGS...]
    local where=$1
    shift
    one "$where-off" file "$DECODE" --speculative off "$@"
    one "$where-lookup" file "$DECODE" --speculative lookup --draft-max "$DRAFT" "$@"
    one "$where-off" excerpt 200 --speculative off "$@"
    one "$where-lookup" excerpt 200 --speculative lookup --draft-max "$DRAFT" "$@"
}

both one

peers=()
for i in 0 1 2; do
    exec {fd}< <("$S" node --listen 127.0.0.1:0 --no-mdns --memory 4GiB --name "spec$i" \
        --model-dir "$(dirname "$Q8")" 2>/dev/null)
    nodes+=($!)
    read -r line <&"$fd"
    peers+=(--peer "${line#listening on }")
done
both three --no-local "${peers[@]}"

python3 - "$out" <<'PY'
import json, sys
d = sys.argv[1]
names = [f"{w}-{s}-{t}" for w in ["one", "three"] for s in ["off", "lookup"] for t in ["file", "excerpt"]]
r = {n: json.load(open(f"{d}/{n}.json")) for n in names}
rate = lambda n: r[n]["per_sequence_decode_tokens_per_s"]
print()
for t in ["file", "excerpt"]:
    for w in ["one", "three"]:
        on, off = f"{w}-lookup-{t}", f"{w}-off-{t}"
        s = r[on]["speculation"]
        print(f"{t} ({r[on]['prompt_tokens']} prompt tokens), {'one stage' if w == 'one' else 'three nodes'}: "
              f"decode {rate(on):.2f} tok/s with lookup vs {rate(off):.2f} without: {rate(on) / rate(off):.2f}x; "
              f"{s['accepted_draft_tokens']} of {s['draft_tokens']} drafts accepted ({s['acceptance']:.0%}), "
              f"{s['tokens_per_trip']:.2f} tokens per trip")
PY
