#!/usr/bin/env python3
"""The prompt-prefix reuse benchmarks behind the README's figures, each on a server with
the prefix cache against one without (`--no-prefix-cache`):

- turns: an agent's second turn over a long context (a code file in the system prompt),
  its time to first token;
- forks: three requests over the same context sent while a fourth runs (parallel
  sub-agents), their mean time to first token (they fork the running sequence).

Streams with the standard library only. A benchmark, not a test: it prints what it
measured.

usage: bench-prefix.py [STRATA_BINARY] [MODEL] [turns|forks|both]
       (defaults: target/release/strata, SmolLM2 Q4_1, both)
"""

import json
import subprocess
import threading
import sys
import time
import urllib.request

STRATA = sys.argv[1] if len(sys.argv) > 1 else "target/release/strata"
MODEL = sys.argv[2] if len(sys.argv) > 2 else "models/SmolLM2-135M-Instruct.Q4_1.gguf"
SCENARIO = sys.argv[3] if len(sys.argv) > 3 else "both"
# About 1,500 tokens of code: what an editor agent sends with every turn.
CODE = "\n".join(
    f"def step_{i}(state, rows):\n    total = sum(r * {i} for r in rows)\n    return state + total  # step {i}\n"
    for i in range(60)
)


def serve(*flags):
    p = subprocess.Popen([STRATA, "serve", "--model", MODEL, "--listen", "127.0.0.1:0", *flags],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    return p, line.strip().split("://")[1]


def ttft(addr, messages, max_tokens=24):
    """Seconds to the first streamed content, the whole answer, and its usage."""
    body = json.dumps({"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(f"http://{addr}/v1/chat/completions", body, {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first, text, usage = None, "", None
    with urllib.request.urlopen(req) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices", []):
                if c["delta"].get("content"):
                    first = first or time.perf_counter() - t0
                    text += c["delta"]["content"]
    return first, text, usage


def turns(addr):
    messages = [{"role": "system", "content": "You are a coding agent. The file:\n" + CODE},
                {"role": "user", "content": "What does step_3 return?"}]
    t1, a1, u1 = ttft(addr, messages)
    messages += [{"role": "assistant", "content": a1}, {"role": "user", "content": "And step_7?"}]
    t2, a2, u2 = ttft(addr, messages)
    return {"turn1_ttft_s": t1, "turn2_ttft_s": t2, "turn2_prompt_tokens": u2["prompt_tokens"],
            "turn2_cached_tokens": u2.get("prompt_tokens_details", {}).get("cached_tokens", 0), "answers": [a1, a2]}


def forks(addr):
    """A long request over the context, and, once it streams, three others over it."""
    context = {"role": "system", "content": "You are a coding agent. The file:\n" + CODE}
    out = {}

    def ask(key, question, max_tokens):
        out[key] = ttft(addr, [context, {"role": "user", "content": question}], max_tokens)

    first = threading.Thread(target=ask, args=("first", "Summarise the file.", 64))
    first.start()
    # Its prefill done (a chunk streamed): the others find it running.
    while not metric(addr, "strata_generated_tokens_total"):
        time.sleep(0.2)
    siblings = [threading.Thread(target=ask, args=(f"s{i}", f"What does step_{i} return?", 16)) for i in (3, 7, 11)]
    for t in siblings:
        t.start()
    for t in [first, *siblings]:
        t.join()
    keys = sorted(k for k in out if k != "first")
    return {"siblings_mean_ttft_s": sum(out[k][0] for k in keys) / len(keys),
            "siblings_cached_tokens": [out[k][2].get("prompt_tokens_details", {}).get("cached_tokens", 0) for k in keys],
            "siblings_prompt_tokens": [out[k][2]["prompt_tokens"] for k in keys],
            "answers": [out["first"][1]] + [out[k][1] for k in keys]}


def metric(addr, name):
    with urllib.request.urlopen(f"http://{addr}/metrics") as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def compare(scenario, key, what):
    results = {}
    for name, flags in [("no-cache", ["--no-prefix-cache"]), ("cache", [])]:
        p, addr = serve(*flags)
        try:
            results[name] = scenario(addr)
        finally:
            p.kill()
        print(f"{name}: {json.dumps(results[name])}")
    same = results["cache"]["answers"] == results["no-cache"]["answers"]
    ratio = results["cache"][key] / results["no-cache"][key]
    print(f"{what} with the cache: {ratio:.3f}x of without ({results['cache'][key]:.2f} s against "
          f"{results['no-cache'][key]:.2f} s); answers identical: {same}")


def main():
    if SCENARIO in ("turns", "both"):
        compare(turns, "turn2_ttft_s", "turn 2 time to first token")
    if SCENARIO in ("forks", "both"):
        compare(forks, "siblings_mean_ttft_s", "the three siblings' mean time to first token")


if __name__ == "__main__":
    main()
