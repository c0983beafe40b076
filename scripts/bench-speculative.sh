#!/usr/bin/env bash
# The speculative-decoding benchmark behind the README's figures: SmolLM2-135M Q8_0,
# greedy, copy-heavy requests ("repeat this code exactly, with one function renamed": the
# whole 200-line scripts/data/inventory.py, and a 29-line excerpt of it), decoded with
# and without `--speculative lookup`, on one stage and on three local `strata node`s.
# Prints one JSON object per run, the ratios, and how much of the model's answer to
# each task copies the source.
# A benchmark, not a test: it reports what it measured and never fails on a number.
# Usage: [REPEAT=N] [DRAFT_MAX=N] [DECODE_TOKENS=N] scripts/bench-speculative.sh [BIN]
# (default BIN: a release build, made if missing). A shared or throttled machine's
# speed drifts by tens of percent over minutes, so a ratio is taken within a round, from
# a run without and a run with lookup made back to back (alternating which goes first);
# REPEAT rounds (default 1) give the median ratio and the range.
set -euo pipefail
cd "$(dirname "$0")/.."
REPEAT=${REPEAT:-1}
[[ $REPEAT =~ ^[1-9][0-9]*$ ]] || { echo "REPEAT must be a whole number of rounds, 1 or more, not '$REPEAT'" >&2; exit 2; }
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
SOURCE=scripts/data/inventory.py
for t in file:1,199 excerpt:97,125; do
    task "$SOURCE" "${t#*:}" >"$out/${t%%:*}.txt"
    sed -n "${t#*:}p" "$SOURCE" >"$out/${t%%:*}.source"
done

one() { # NAME TASK DECODE [FLAGS...]
    local name=$1 task=$2 decode=$3
    shift 3
    "$S" bench -m "$Q8" --prompt-file "$out/$task.txt" --decode-tokens "$decode" --ctx 4096 --json "$@" \
        2>/dev/null >"$out/$name-$task.json"
    echo "$name-$task: $(tr -d '\n ' <"$out/$name-$task.json")"
}

pair() { # WHERE ROUND TASK DECODE [FLAGS...]: off and lookup back to back
    local where=$1 round=$2 task=$3 decode=$4
    shift 4
    local off=(one "$where-off-$round" "$task" "$decode" --speculative off "$@")
    local on=(one "$where-lookup-$round" "$task" "$decode" --speculative lookup --draft-max "$DRAFT" "$@")
    if ((round % 2)); then "${on[@]}"; "${off[@]}"; else "${off[@]}"; "${on[@]}"; fi
}

both() { # WHERE [FLAGS...]
    local where=$1
    shift
    for ((round = 0; round < REPEAT; round++)); do
        pair "$where" "$round" file "$DECODE" "$@"
        pair "$where" "$round" excerpt 200 "$@"
    done
}

both one

# The greedy answer to each task (what every run above decodes): how much of it copies
# the source, which is what any draft can gain on.
answer() { # TASK DECODE
    # The prompt whole: `$(...)` alone would drop its final newline.
    local prompt
    prompt=$(cat "$out/$1.txt"; printf x)
    "$S" run -m "$Q8" --ctx 4096 -n "$2" --json -p "${prompt%x}" 2>/dev/null >"$out/answer-$1.json"
}
answer file "$DECODE"
answer excerpt 200

peers=()
for i in 0 1 2; do
    exec {fd}< <("$S" node --listen 127.0.0.1:0 --no-mdns --memory 4GiB --name "spec$i" \
        --model-dir "$(dirname "$Q8")" 2>/dev/null)
    nodes+=($!)
    read -r line <&"$fd"
    peers+=(--peer "${line#listening on }")
done
both three --no-local "${peers[@]}"

python3 - "$out" "$REPEAT" <<'PY'
import json, statistics, sys
d, repeat = sys.argv[1], int(sys.argv[2])
r = lambda n: json.load(open(f"{d}/{n}.json"))
rate = lambda j: j["per_sequence_decode_tokens_per_s"]
print()
for t in ["file", "excerpt"]:
    for w in ["one", "three"]:
        runs = [(r(f"{w}-off-{i}-{t}"), r(f"{w}-lookup-{i}-{t}")) for i in range(repeat)]
        ratios = [rate(on) / rate(off) for off, on in runs]
        offs = ", ".join(f"{rate(off):.2f}" for off, _ in runs)
        ons = ", ".join(f"{rate(on):.2f}" for _, on in runs)
        on = runs[0][1]
        s = on["speculation"]
        spread = f" (rounds {min(ratios):.2f}x to {max(ratios):.2f}x)" if repeat > 1 else ""
        print(f"{t} ({on['prompt_tokens']} prompt tokens), {'one stage' if w == 'one' else 'three nodes'}: "
              f"decode {ons} tok/s with lookup vs {offs} without: {statistics.median(ratios):.2f}x{spread}; "
              f"{s['accepted_draft_tokens']} of {s['draft_tokens']} drafts accepted ({s['acceptance']:.0%}), "
              f"{s['tokens_per_trip']:.2f} tokens per trip")
print()
# A line of the answer counts as copied when, with the rename undone, it is a line of the
# code the task quotes (blank lines and code fences aside).
for t in ["file", "excerpt"]:
    source = {l.strip() for l in open(f"{d}/{t}.source") if l.strip()}
    lines = [l.strip() for l in r(f"answer-{t}")["text"].splitlines()]
    lines = [l for l in lines if l and not l.startswith("```")]
    copied = sum(l.replace("parse_row", "parse_line") in source for l in lines)
    print(f"{t}: {copied} of {len(lines)} lines of the answer are lines of the code it quotes; it begins "
          + " / ".join(lines[:2])[:120])
PY
