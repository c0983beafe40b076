#!/usr/bin/env bash
# The GPU figures of the batching work, taken in one prepared run on a machine with a GPU
# that cannot build Strata itself (no Rust toolchain, no network), such as the device
# machine a session is sometimes lent. Two steps:
#
#   bash scripts/bench-device.sh prepare   # here: .device/ (stripped binaries) and .gl/
#                                          # (the Vulkan loader's packages), both ignored
#   bash scripts/bench-device.sh run       # there, in the repository root, carrying
#                                          # .device and .gl; results under $OUT
#
# `run` needs no model files: it synthesizes SmolLM2-135M's shape (Q8_0) and the first
# layers of Qwen3.6-27B's (`strata synthesize --layers`), since a kernel's work does not
# depend on its weights' values. It measures, most wanted first, each model:
#   - one sequence: prefill of a 512-token prompt, decode, and the weight bytes decode
#     reads per second as a fraction of the device's plain streaming read bandwidth;
#   - aggregate decode tok/s at 1, 4, 8 and 32 concurrent sequences;
#   - the optional paths against their defaults: integer dot products (STRATA_INT8_DOT=on)
#     at 1 and 8 sequences, cooperative matrices (STRATA_COOP_MATRIX=on) for prefill and
#     at 1 and 8 sequences, and split attention off (STRATA_SPLIT_ATTENTION=off) at a
#     long context (8,000 positions: within SmolLM2's trained 8,192);
# then `attention_costs` (split against unsplit attention, up to 32768 positions).
# Every bench has its own time limit (120 s), and no new one starts past DEADLINE seconds
# (default 400), so a slow or hung step costs its own figure, not the run's, and the whole
# run ends within about 520 s (a device call of timeout_s 580 leaves room for the summary). Results: one JSON
# object per bench in $OUT/results.jsonl, a table in $OUT/summary.md, the log in
# $OUT/log.txt. QUICK=1 runs a small version (fewer tokens, 4 layers of the 27B, 1 and 4
# sequences) to check the script on a slow adapter such as lavapipe.
set -uo pipefail
cd "$(dirname "$0")/.."

prepare() {
    set -e
    echo "building strata and the attention_costs example (dev profile, as the README's figures)"
    cargo build --bin strata --quiet
    cargo build -p strata-node --example attention_costs --quiet
    mkdir -p .device
    strip -o .device/strata target/debug/strata
    strip -o .device/attention_costs target/debug/examples/attention_costs
    if [ ! -d .gl ] || ! ls .gl/libvulkan1_*.deb >/dev/null 2>&1; then
        echo "downloading the Vulkan loader's packages (amd64) into .gl"
        mkdir -p .gl /tmp/amd64/partial
        local o=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64)
        apt-get "${o[@]}" update -qq
        (cd .gl && apt-get "${o[@]}" download -qq libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
    fi
    du -sh .device .gl
    echo "ready: run \`bash scripts/bench-device.sh run\` on the device, carrying .device and .gl"
}

run() {
    local quick=${QUICK:-0} deadline=${DEADLINE:-400}
    OUT=${OUT:-$PWD/device-out}
    mkdir -p "$OUT"
    : >"$OUT/results.jsonl"
    : >"$OUT/log.txt"
    local S=${STRATA:-.device/strata} A=${ATTENTION_COSTS:-.device/attention_costs}
    [ -x "$S" ] || S=target/debug/strata
    [ -x "$A" ] || A=target/debug/examples/attention_costs
    if ! [ -x "$S" ]; then
        echo "no strata binary: run \`bash scripts/bench-device.sh prepare\` first (or set STRATA)" >&2
        exit 2
    fi
    if ! ldconfig -p 2>/dev/null | grep -q 'libvulkan.so.1 '; then
        if ls .gl/*.deb >/dev/null 2>&1; then
            for f in .gl/*.deb; do dpkg -x "$f" /; done
            ldconfig
        else
            echo "no Vulkan loader on this machine and none in .gl (run prepare)" >&2
        fi
    fi
    local icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
    if [ -z "${VK_DRIVER_FILES:-}" ] && [ -f "$icd" ]; then
        export VK_DRIVER_FILES=$icd
        export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
    fi

    local start=$SECONDS
    log() { echo "[$((SECONDS - start))s] $*" | tee -a "$OUT/log.txt"; }
    # LABEL LIMIT [VAR=VALUE...] -- strata ARGS...: one bench, its JSON kept under LABEL.
    bench() {
        local label=$1 limit=$2 vars=()
        shift 2
        while [ "$1" != "--" ]; do
            vars+=("$1")
            shift
        done
        shift
        if ((SECONDS - start > deadline)); then
            log "$label skipped: past the ${deadline}s deadline"
            return
        fi
        log "$label: strata $* ${vars[*]}"
        local json
        if json=$(timeout "$limit" env "${vars[@]}" "$S" "$@" --json 2>>"$OUT/log.txt"); then
            printf '{"label":"%s","env":"%s","result":%s}\n' "$label" "${vars[*]}" "$(tr -d '\n' <<<"$json")" \
                >>"$OUT/results.jsonl"
        else
            log "$label failed (exit $?)"
        fi
    }

    local version
    if ! version=$("$S" --version 2>&1); then
        log "$S does not start on this machine: $version"
        exit 1
    fi
    log "$version; $(nvidia-smi -L 2>/dev/null | head -1 || echo 'no nvidia-smi')"
    local W=${WORK:-/tmp/strata-device}
    mkdir -p "$W"
    local layers=8 prompt=512 decode=64 long=8000 seqs=(1 4 8 32) limit=120 cmax=32768
    if [ "$quick" = 1 ]; then
        layers=4 prompt=16 decode=4 long=256 seqs=(1 4) limit=300 cmax=1024
    fi
    "$S" synthesize --shape smollm2-135m "$W/smollm2.gguf" 2>>"$OUT/log.txt"
    "$S" synthesize --shape qwen36-27b --layers "$layers" "$W/27b.gguf" 2>>"$OUT/log.txt"
    local name model
    for name in smollm2 27b; do
        model=$W/$name.gguf
        bench "$name-single" "$limit" -- bench -m "$model" --prompt-tokens "$prompt" --decode-tokens "$decode" \
            --ctx $((prompt + decode)) --batch-tokens "$prompt"
        for n in "${seqs[@]}"; do
            bench "$name-seqs-$n" "$limit" -- bench -m "$model" --prompt-tokens 32 --decode-tokens "$decode" \
                --concurrency "$n" --ctx $((32 + decode))
        done
    done
    for name in smollm2 27b; do
        model=$W/$name.gguf
        for n in 1 8; do
            bench "$name-seqs-$n-int8" "$limit" STRATA_INT8_DOT=on -- bench -m "$model" --prompt-tokens 32 \
                --decode-tokens "$decode" --concurrency "$n" --ctx $((32 + decode))
        done
        # Cooperative matrices (tensor cores), where the device offers them: prefill, then
        # decode at 1 and 8 sequences (a device without them fails the bench, saying so).
        bench "$name-single-coop" "$limit" STRATA_COOP_MATRIX=on -- bench -m "$model" --prompt-tokens "$prompt" \
            --decode-tokens "$decode" --ctx $((prompt + decode)) --batch-tokens "$prompt"
        for n in 1 8; do
            bench "$name-seqs-$n-coop" "$limit" STRATA_COOP_MATRIX=on -- bench -m "$model" --prompt-tokens 32 \
                --decode-tokens "$decode" --concurrency "$n" --ctx $((32 + decode))
        done
        for split in on off; do
            bench "$name-long-split-$split" "$limit" STRATA_SPLIT_ATTENTION=$split -- bench -m "$model" \
                --prompt-tokens "$long" --decode-tokens "$decode" --ctx $((long + decode)) --batch-tokens 512
        done
    done
    if [ -x "$A" ] && ((SECONDS - start <= deadline)); then
        log "attention_costs $cmax"
        timeout "$limit" "$A" "$cmax" >"$OUT/attention_costs.txt" 2>>"$OUT/log.txt" || log "attention_costs failed (exit $?)"
    fi
    python3 - "$OUT" <<'PY' | tee "$OUT/summary.md"
import json, sys
out = sys.argv[1]
rows = [json.loads(l) for l in open(f"{out}/results.jsonl") if l.strip()]
if not rows:
    print("no bench finished: see log.txt")
    sys.exit()
first = rows[0]["result"]
print(f"adapter: {first.get('adapter')} ({first.get('backend', 'Vulkan')})\n")
print("| bench | env | prefill tok/s | decode tok/s (aggregate) | per sequence | weight GB/s | of read bandwidth | rows per step |")
print("|---|---|---|---|---|---|---|---|")
f = lambda v, p=2: "" if v is None else f"{v:.{p}f}"
def share(j):
    if j.get("bandwidth_fraction") is None:
        return ""
    return f"{100 * j['bandwidth_fraction']:.0f}% of {j['read_bandwidth_gb_per_s']:.0f} GB/s"
for r in rows:
    j = r["result"]
    single = "decode_tokens_per_s" in j
    print(
        f"| {r['label']} | {r['env']} | {f(j.get('prefill_tokens_per_s'), 1)} "
        f"| {f(j.get('decode_tokens_per_s') if single else j.get('aggregate_decode_tokens_per_s'))} "
        f"| {'' if single else f(j.get('per_sequence_decode_tokens_per_s'))} "
        f"| {f(j.get('decode_weight_gb_per_s'), 1)} "
        f"| {share(j)} "
        f"| {f(j.get('rows_per_step'), 1)} |"
    )
def agg(label):
    for r in rows:
        if r["label"] == label:
            return r["result"].get("aggregate_decode_tokens_per_s")
for name in ("smollm2", "27b"):
    one = agg(f"{name}-seqs-1")
    for n in (4, 8, 32):
        many = agg(f"{name}-seqs-{n}")
        if one and many:
            print(f"\n{name}: {n} sequences give {many / one:.2f}x the aggregate decode of one", end="")
print()
PY
    log "done in $((SECONDS - start))s; results in $OUT"
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *)
        echo "usage: bash scripts/bench-device.sh prepare|run   (see the comment at the top)" >&2
        exit 2
        ;;
esac
